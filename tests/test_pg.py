"""jaxrm.pg: hand-computed values, and unbiasedness against the exact tabular gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm import pg
from jaxrm.tabular import AutoregressiveTabularPolicy, objective_grad


def test_advantages_by_hand():
    rewards = jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # Leave-one-out: 1 - (2 + 6) / 2 = -3, ...
    np.testing.assert_allclose(pg.rloo_advantages(rewards), [[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]])
    np.testing.assert_allclose(pg.dr_grpo_advantages(rewards), [[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]])
    std = np.std([1.0, 2.0, 6.0], ddof=1)
    np.testing.assert_allclose(pg.grpo_advantages(rewards, eps=0.0)[0], np.array([-2.0, -1.0, 3.0]) / std)
    np.testing.assert_allclose(
        pg.grpo_advantages(rewards, eps=0.0, ddof=0)[0], np.array([-2.0, -1.0, 3.0]) / np.std([1, 2, 6])
    )
    # eps is added to the standard deviation (not under a square root): it matters for near-tied groups.
    close = jnp.array([[1.0, 1.0 + 2e-4]])
    np.testing.assert_allclose(
        pg.grpo_advantages(close, eps=1e-4)[0], np.array([-1e-4, 1e-4]) / (np.sqrt(2) * 1e-4 + 1e-4), rtol=1e-3
    )
    np.testing.assert_allclose(pg.reinforce_advantages(rewards, baseline=1.0), rewards - 1.0)
    with pytest.raises(ValueError, match="k >= 2"):
        pg.rloo_advantages(jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="finite"):
        pg.rloo_advantages(jnp.array([[1.0, np.nan]]))


def test_kl_penalties_by_hand():
    logp = jnp.array([[-1.0, -2.0, -9.0]])
    ref = jnp.array([[-1.5, -1.0, 0.0]])
    mask = jnp.array([[True, True, False]])
    k1 = np.array([0.5, -1.0])
    k3 = np.expm1(-k1) + k1
    np.testing.assert_allclose(pg.kl_per_token(logp, ref, mask)[0, :2], k1)
    np.testing.assert_allclose(pg.kl_per_token(logp, ref, mask, kl_estimator="k3")[0, :2], k3, rtol=1e-6)
    assert float(pg.kl_per_token(logp, ref, mask, kl_estimator="k3")[0, 2]) == 0.0
    np.testing.assert_allclose(pg.kl_penalized_rewards(jnp.array([2.0]), logp, ref, mask, kl_coef=0.5), [2.25])


def test_aggregation_and_losses_by_hand():
    logp = jnp.log(jnp.array([[0.5, 0.25], [0.8, 1.0]]))
    old = jnp.log(jnp.array([[0.25, 0.25], [1.0, 1.0]]))
    mask = jnp.array([[True, True], [True, False]])
    advantages = jnp.array([1.0, -2.0])
    # Token ratios: 2, 1 | 0.8 (masked: 1). Clipped at 0.2: 1.2 (A > 0 so min picks 1.2), 1 | max(0.8, 0.8)...
    loss, clip_fraction = pg.clipped_surrogate_loss(logp, old, advantages, mask, aggregation="token-mean")
    # Per token: -min(2 * 1, 1.2 * 1) = -1.2; -1; -min(0.8 * -2, 0.8 * -2) = 1.6 -> mean of 3 tokens.
    np.testing.assert_allclose(loss, (-1.2 - 1.0 + 1.6) / 3, rtol=1e-6)
    np.testing.assert_allclose(clip_fraction, 1 / 3)
    # Sequence ratios: 2 and 0.8 -> -min(2, 1.2) = -1.2 and -min(-1.6, -1.6) = 1.6.
    loss, clip_fraction = pg.clipped_surrogate_loss(logp, old, advantages, mask, ratio_level="sequence")
    np.testing.assert_allclose(loss, (-1.2 + 1.6) / 2, rtol=1e-6)
    np.testing.assert_allclose(clip_fraction, 0.5)
    # At ratio 1 the surrogate's gradient is the REINFORCE gradient.
    for level in ("token", "sequence"):
        ppo = jax.grad(lambda lp: pg.clipped_surrogate_loss(lp, logp, advantages, mask, ratio_level=level)[0])(logp)
        aggregation = "token-mean" if level == "token" else "sequence-sum"
        reinforce = jax.grad(lambda lp: pg.reinforce_loss(lp, advantages, mask, aggregation=aggregation))(logp)
        np.testing.assert_allclose(ppo, reinforce, rtol=1e-6)
    # A ratio below 1 - eps with A > 0 (and above 1 + eps with A < 0) is not clipped: min picks the unclipped term.
    inactive = jnp.log(jnp.array([[0.5], [2.0]]))
    _, clip_fraction = pg.clipped_surrogate_loss(inactive, jnp.zeros((2, 1)), jnp.array([1.0, -1.0]), jnp.ones((2, 1)))
    assert float(clip_fraction) == 0.0
    # ... and the other way round both are clipped: ratio 2 with A > 0, ratio 0.5 with A < 0.
    active = jnp.log(jnp.array([[2.0], [0.5]]))
    loss, clip_fraction = pg.clipped_surrogate_loss(active, jnp.zeros((2, 1)), jnp.array([1.0, -1.0]), jnp.ones((2, 1)))
    assert float(clip_fraction) == 1.0
    np.testing.assert_allclose(loss, (-1.2 * 1.0 - 0.8 * -1.0) / 2, rtol=1e-6)
    per_token = jnp.array([[1.0, 3.0], [2.0, 5.0]])
    assert [float(pg.aggregate(per_token, mask, aggregation=m)) for m in pg.AGGREGATIONS] == [2.0, 2.0, 3.0]
    # Unequal lengths: token-mean weighs tokens (10 / 4), sequence-mean weighs sequences ((3 + 1) / 2).
    values, lengths_3_and_1 = jnp.array([[1.0, 3.0, 5.0], [1.0, 0.0, 0.0]]), jnp.array([[1, 1, 1], [1, 0, 0]], bool)
    assert float(pg.aggregate(values, lengths_3_and_1, aggregation="token-mean")) == 2.5
    assert float(pg.aggregate(values, lengths_3_and_1, aggregation="sequence-mean")) == 2.0
    with pytest.raises(ValueError, match="aggregation='mean'"):
        pg.aggregate(per_token, mask, aggregation="mean")


def test_padding_and_overflowing_ratios_never_make_a_loss_or_its_gradient_nan():
    mask = jnp.array([[True, False]])
    ref = jnp.array([[-1.0, 0.0]])
    spread = jnp.array([[1.0, 100.0]])  # the padded slot's log-prob ends far from the reference's
    for kind in ("k1", "k2", "k3"):
        grad = jax.jit(
            jax.grad(lambda a: pg.aggregate(pg.kl_per_token(a * spread, ref, mask, kl_estimator=kind), mask))
        )(-1.5)
        alone = jax.jit(
            jax.grad(
                lambda a: pg.aggregate(
                    pg.kl_per_token(a * spread[:, :1], ref[:, :1], mask[:, :1], kl_estimator=kind), mask[:, :1]
                )
            )
        )(-1.5)
        assert float(grad) == pytest.approx(float(alone))
    # A fully padded row's advantage may be anything: it reaches neither loss nor gradient.
    logp, rows = jnp.array([[-1.0, -2.0], [-0.5, -0.7]]), jnp.array([[True, True], [False, False]])
    for advantages in (jnp.array([1.0, jnp.nan]), jnp.array([1.0, 5.0])):
        gradient = jax.grad(lambda lp: pg.reinforce_loss(lp, advantages, rows))(logp)  # noqa: B023
        np.testing.assert_array_equal(gradient, [[-1.0, -1.0], [0.0, 0.0]])
    # -inf padding (log 0) is padding too, eagerly as under jit.
    padded = jnp.array([[-1.0, -jnp.inf]]), jnp.array([[-1.2, -jnp.inf]])
    np.testing.assert_allclose(pg.kl_per_token(*padded, mask), jax.jit(pg.kl_per_token)(*padded, mask))
    np.testing.assert_allclose(pg.kl_per_token(*padded, mask), [[0.2, 0.0]], rtol=1e-6)
    # An entropy over a vocabulary with filtered (-inf) entries: 0 log 0 = 0.
    filtered = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(pg.entropy_per_token(filtered, jnp.array([[True]])), [[np.log(2)]], rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: pg.entropy_per_token(x, jnp.array([[True]])).sum())(filtered))))
    # A ratio that overflows (log-ratio 99.99) with A = 0 adds nothing, with A > 0 is clipped,
    # and with A < 0 is the infinite loss it is.
    logp, old = jnp.array([[-0.01, -0.01]], jnp.float32), jnp.full((1, 2), -100.0, jnp.float32)
    for level in ("token", "sequence"):
        for advantage, loss in ((0.0, 0.0), (1.0, -1.2)):
            surrogate = jax.jit(
                lambda lp: pg.clipped_surrogate_loss(  # noqa: E731
                    lp, old, jnp.array([advantage]), jnp.ones((1, 2), bool), ratio_level=level
                )[0]
            )
            assert (
                float(surrogate(logp)) == pytest.approx(loss)
                and float(jnp.abs(jax.jit(jax.grad(surrogate))(logp)).max()) == 0.0
            )
        assert (
            float(pg.clipped_surrogate_loss(logp, old, jnp.array([-1.0]), jnp.ones((1, 2), bool), ratio_level=level)[0])
            == np.inf
        )
    # clip_eps above 1 leaves ratios unclipped from below, without a NaN on the way (jax_debug_nans).
    with jax.debug_nans(True):
        loss, clipped = pg.clipped_surrogate_loss(
            logp, logp - 3.0, jnp.array([-1.0]), jnp.ones((1, 2), bool), clip_eps=2.0
        )
    assert float(clipped) == 0.0 and float(loss) == pytest.approx(np.exp(3.0), rel=1e-5)
    # A row with no valid token (a batch padded to a fixed size) changes no aggregation.
    values, valid = jnp.array([[1.0, 3.0], [2.0, 0.0]]), jnp.array([[True, True], [True, False]])
    with_empty_row = jnp.concatenate([values, jnp.full((1, 2), 7.0)]), jnp.concatenate([valid, jnp.zeros((1, 2), bool)])
    for mode in pg.AGGREGATIONS:
        assert float(pg.aggregate(*with_empty_row, aggregation=mode)) == float(
            pg.aggregate(values, valid, aggregation=mode)
        )


def test_entropy_and_reward_normalization():
    logits = jnp.zeros((2, 3, 5))
    np.testing.assert_allclose(pg.entropy_per_token(logits, jnp.ones((2, 3), bool)), np.full((2, 3), np.log(5)))
    p = np.array([0.7, 0.2, 0.1])
    np.testing.assert_allclose(
        pg.entropy_per_token(jnp.log(jnp.asarray(p))[None], jnp.ones(1, bool)), [-(p * np.log(p)).sum()], rtol=1e-6
    )
    rewards = jnp.array([[1.0, 3.0], [5.0, 7.0]])
    mean, std = pg.reward_statistics(rewards)
    assert (float(mean), float(std)) == (4.0, np.sqrt(5.0))
    np.testing.assert_allclose(
        pg.normalize_sampled_rewards(rewards, mean, std, clip=1.0), [[-1, -0.4472136], [0.4472136, 1]], rtol=1e-6
    )
    np.testing.assert_allclose(pg.scale_per_group(rewards, eps=0.0), rewards / np.sqrt(2.0))


# --- unbiasedness on an exactly enumerable autoregressive policy ---------------------------------

POLICY = AutoregressiveTabularPolicy(vocab_size=3, length=2)
KL_COEF = 0.1
NUM_PROMPTS, K, BATCHES = 2, 4, 20_000


def _token_log_probs(logits, outputs):
    """Per-token log-probs ``[prompts, k, L]`` of sampled output indices ``[prompts, k]``."""
    tokens = jnp.asarray(POLICY.outputs())[outputs]  # [prompts, k, L]
    per_token, prefix = [], jnp.zeros(outputs.shape, int)
    for level, theta in enumerate(logits):
        log_probs = jax.nn.log_softmax(theta, axis=-1)  # [prompts, V**level, V]
        rows = jnp.take_along_axis(log_probs, prefix[..., None], axis=1)  # [prompts, k, V]
        per_token.append(jnp.take_along_axis(rows, tokens[..., level, None], axis=-1)[..., 0])
        prefix = prefix * POLICY.vocab_size + tokens[..., level]
    return jnp.stack(per_token, axis=-1)


@pytest.fixture(scope="module")
def problem():
    logits = POLICY.random_logits(jax.random.key(0), NUM_PROMPTS)
    ref_logits = POLICY.random_logits(jax.random.key(1), NUM_PROMPTS)
    rewards = 2.0 + jax.random.uniform(jax.random.key(2), (NUM_PROMPTS, POLICY.num_outputs))
    ref_log_probs = POLICY.log_probs(ref_logits)
    exact = objective_grad(POLICY, logits, rewards, ref_log_probs, kl_coef=KL_COEF)
    return logits, ref_logits, rewards, exact


def _gradient_estimates(problem, advantage_fn):
    logits, ref_logits, rewards, _ = problem
    mask = jnp.ones((NUM_PROMPTS, K, POLICY.length), bool)

    def one_estimate(key):
        outputs = jax.random.categorical(key, POLICY.log_probs(logits)[:, None, :], shape=(NUM_PROMPTS, K))
        ref_logp = _token_log_probs(ref_logits, outputs)
        sampled = jnp.take_along_axis(rewards, outputs, axis=1)
        penalized = pg.kl_penalized_rewards(sampled, _token_log_probs(logits, outputs), ref_logp, mask, kl_coef=KL_COEF)
        advantages = advantage_fn(penalized)

        def loss(theta):
            # -mean over prompts x k of A log pi: in expectation its negative gradient is objective_grad.
            return pg.reinforce_loss(_token_log_probs(theta, outputs), advantages, mask, aggregation="sequence-sum")

        return jax.tree.map(lambda g: -g, jax.grad(loss)(logits))

    estimates = jax.jit(jax.vmap(one_estimate))(jax.random.split(jax.random.key(3), BATCHES))
    return [np.asarray(e) for e in estimates]


def _z_scores(estimates, exact):
    return np.concatenate(
        [
            ((e.mean(0) - np.asarray(x)) / (e.std(0, ddof=1) / np.sqrt(BATCHES) + 1e-12)).ravel()
            for e, x in zip(estimates, exact)
        ]
    )


@pytest.mark.parametrize("name", ["reinforce", "rloo"])
def test_sampled_policy_gradients_are_unbiased(problem, name):
    advantage_fn = {"reinforce": pg.reinforce_advantages, "rloo": pg.rloo_advantages}[name]
    estimates = _gradient_estimates(problem, advantage_fn)
    exact = problem[3]
    # Each component's mean over 20,000 independent estimates lies within 5 standard errors of
    # the exact gradient (the chance that any of the 36 components fails by luck is ~1e-5).
    assert np.max(np.abs(_z_scores(estimates, exact))) < 5.0
    assert max(np.abs(np.asarray(x)).max() for x in exact) > 1e-2  # a real gradient, not zero


def test_the_unbiasedness_test_has_power(problem):
    # Subtracting the mean *including* the sample itself shrinks the gradient by (k - 1) / k.
    biased = _gradient_estimates(problem, pg.dr_grpo_advantages)
    assert np.max(np.abs(_z_scores(biased, problem[3]))) > 10.0
    scaled = [e * K / (K - 1) for e in biased]
    assert np.max(np.abs(_z_scores(scaled, problem[3]))) < 5.0
