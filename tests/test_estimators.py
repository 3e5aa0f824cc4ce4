"""Exact moments of sampled gradient estimators (jaxrm.estimators): the known answers, the
objectives the biased placements follow, and a Monte Carlo check of the exact moments."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm import estimators as E
from jaxrm.tabular import AutoregressiveTabularPolicy, TabularPolicy

LAM = 0.3
POLICIES = {"tabular": TabularPolicy(4), "autoregressive": AutoregressiveTabularPolicy(2, 2)}


def _instance(policy):
    logits = policy.random_logits(jax.random.key(0), 1)
    ref = policy.random_logits(jax.random.key(1), 1)
    rewards = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, policy.num_outputs))
    return logits, ref, rewards


def _mean(estimator, policy, kl_coef=LAM):
    logits, ref, rewards = _instance(policy)
    return E.estimate_moments(estimator, policy, logits, rewards, kl_coef=kl_coef, ref_logits=ref)


# (estimator, the gradient its mean equals: a function of the exact gradients G)
FOLLOWS = [
    (E.Estimator("rloo", k=3), lambda G: G["reward"] - LAM * G["reverse_kl"]),
    (E.Estimator("reinforce", k=2), lambda G: G["reward"] - LAM * G["reverse_kl"]),
    (E.Estimator("reinforce_baseline", k=2), lambda G: G["reward"] - LAM * G["reverse_kl"]),
    (E.Estimator("rloo", k=3, kl_placement="loss"), lambda G: G["reward"]),
    (
        E.Estimator("rloo", k=3, kl_estimator="k2", kl_placement="loss"),
        lambda G: G["reward"] - LAM * G["token_reverse_kl"],
    ),
    (
        E.Estimator("rloo", k=3, kl_estimator="k3", kl_placement="loss"),
        lambda G: G["reward"] - LAM * G["token_forward_kl"],
    ),
    (E.Estimator("rloo", k=3, kl_estimator="k2"), lambda G: G["reward"] - LAM * G["held_k2"]),
    (E.Estimator("rloo", k=3, kl_estimator="k3"), lambda G: G["reward"] - LAM * G["held_k3"]),
    (E.Estimator("rloo", k=3, kl_estimator="k3", kl_placement="detached"), lambda G: G["reward"]),
]


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize(("estimator", "follows"), FOLLOWS, ids=[e.name for e, _ in FOLLOWS])
def test_each_placement_follows_its_objective_exactly(policy_name, estimator, follows):
    policy = POLICIES[policy_name]
    logits, ref, rewards = _instance(policy)
    moments = _mean(estimator, policy)
    target = follows(E.kl_gradients(policy, logits, rewards, ref_logits=ref))
    np.testing.assert_allclose(moments.mean, target, atol=1e-12)
    assert moments.groups == math.comb(policy.num_outputs + estimator.k - 1, estimator.k)


def test_one_token_closed_forms_of_the_followed_objectives():
    """docs/theory.md#what-each-estimator-optimizes, for L = 1: k3 in the reward follows
    KL(pi||ref) - KL(ref||pi), k2 in the reward E[delta^2/2] - KL(pi||ref); per-token and
    sequence KLs coincide. For L = 2 the held penalties differ from those forms."""
    for name, policy in POLICIES.items():
        logits, ref, rewards = _instance(policy)
        G = E.kl_gradients(policy, logits, rewards, ref_logits=ref)
        np.testing.assert_allclose(G["held_k1"], G["reverse_kl"], atol=1e-12)
        close = np.allclose(G["held_k3"], G["reverse_kl"] - G["forward_kl"], atol=1e-12)
        assert close == (name == "tabular")
        close = np.allclose(G["held_k2"], G["half_square"] - G["reverse_kl"], atol=1e-12)
        assert close == (name == "tabular")
        if name == "tabular":
            np.testing.assert_allclose(G["token_reverse_kl"], G["reverse_kl"], atol=1e-12)
            np.testing.assert_allclose(G["token_forward_kl"], G["forward_kl"], atol=1e-12)


def test_the_objective_gradient_is_the_autodiff_gradient_of_the_objective():
    policy = POLICIES["autoregressive"]
    logits, ref, rewards = _instance(policy)
    flat, unravel = jax.flatten_util.ravel_pytree(logits)

    def objective(x):
        lp = policy.log_probs(unravel(x))[0]
        ref_lp = policy.log_probs(ref)[0]
        return jnp.sum(jnp.exp(lp) * (rewards - LAM * (lp - ref_lp)))

    expected = jax.grad(objective)(flat)
    np.testing.assert_allclose(
        E.objective_gradient(policy, logits, rewards, kl_coef=LAM, ref_logits=ref), expected, atol=1e-12
    )


def test_variants_scale_filter_and_clip_as_derived():
    policy = POLICIES["tabular"]
    logits, ref, rewards = _instance(policy)
    reward_gradient = E.kl_gradients(policy, logits, rewards)["reward"]
    probs = jnp.exp(policy.log_probs(logits)[0])
    std = float(jnp.sqrt(jnp.sum(probs * (rewards - jnp.sum(probs * rewards)) ** 2)))
    # Global normalization divides by a constant: unbiased up to the scale 1 / std.
    normalized = E.compare(_mean(E.Estimator("rloo", k=2, reward_normalization="global"), policy, 0.0), reward_gradient)
    # (the kernel divides by std + 1e-8)
    assert normalized.scale == pytest.approx(1 / (std + 1e-8), rel=1e-12) and normalized.direction_bias < 1e-10
    # Dr. GRPO's advantage is (k - 1)/k times RLOO's: a pure scale; GRPO's std also turns it.
    target = E.objective_gradient(policy, logits, rewards, kl_coef=LAM, ref_logits=ref)
    dr = E.compare(_mean(E.Estimator("dr_grpo", k=3), policy), target)
    assert dr.scale == pytest.approx(2 / 3, rel=1e-12) and dr.direction_bias < 1e-12
    assert E.compare(_mean(E.Estimator("grpo", k=3), policy), target).direction_bias > 1e-3
    # Per-group normalization depends on the samples: a direction bias, not only a scale.
    grouped = E.compare(_mean(E.Estimator("rloo", k=2, reward_normalization="group"), policy, 0.0), reward_gradient)
    assert grouped.direction_bias > 1e-3
    # RLOO gives zero advantages to a group of equal rewards: filtering it changes nothing without
    # a KL term, and drops the KL gradient of such groups with k2 in the loss.
    plain, filtered = (_mean(E.Estimator("rloo", k=2, filter_zero_variance=f), policy, 0.0).mean for f in (False, True))
    np.testing.assert_allclose(plain, filtered, atol=1e-14)
    kl = dict(k=2, kl_estimator="k2", kl_placement="loss")
    plain, filtered = (_mean(E.Estimator("rloo", **kl, filter_zero_variance=f), policy).mean for f in (False, True))
    assert float(jnp.max(jnp.abs(plain - filtered))) > 1e-4
    # The clipped surrogate at ratio 1 is the token mean of the score-function loss: 1 / L of it.
    ar = POLICIES["autoregressive"]
    clipped, sequence = (_mean(E.Estimator("rloo", k=2, surrogate=s), ar).mean for s in ("clipped", "reinforce"))
    np.testing.assert_allclose(clipped, sequence / ar.length, atol=1e-12)
    # One aggregation for the whole loss: the KL in the loss is token-averaged too.
    in_loss = dict(k=2, kl_estimator="k2", kl_placement="loss")
    clipped, sequence = (_mean(E.Estimator("rloo", **in_loss, surrogate=s), ar).mean for s in ("clipped", "reinforce"))
    np.testing.assert_allclose(clipped, sequence / ar.length, atol=1e-12)


def test_exact_moments_match_monte_carlo():
    """z-tests of the exact mean and total variance against 40,000 sampled groups (GRPO,
    biased, and with k3 in the loss)."""
    policy = POLICIES["autoregressive"]
    logits, ref, rewards = _instance(policy)
    estimator = E.Estimator("grpo", k=3, kl_estimator="k3", kl_placement="loss")
    exact = E.estimate_moments(estimator, policy, logits, rewards, kl_coef=LAM, ref_logits=ref)
    n = 40_000
    samples = jax.random.categorical(jax.random.key(3), policy.log_probs(logits)[0], shape=(n, estimator.k))
    draws = jax.vmap(lambda s: E.sampled_gradient(estimator, policy, logits, rewards, s, kl_coef=LAM, ref_logits=ref))(
        samples
    )
    z = (draws.mean(0) - exact.mean) / jnp.sqrt(jnp.diag(exact.covariance) / n)
    assert float(jnp.max(jnp.abs(z))) < 4.5, z
    total = float(jnp.trace(exact.covariance))
    assert float(jnp.sum(draws.var(0))) == pytest.approx(total, rel=0.05)
    assert (
        E.compare(exact, E.objective_gradient(policy, logits, rewards, kl_coef=LAM, ref_logits=ref)).relative_bias > 0.1
    )


@pytest.mark.parametrize("chunk", [7, 16_384])
def test_multisets_weigh_what_every_ordered_group_weighs(chunk):
    """The multiset sum (with a last chunk of padding when chunk = 7) equals the plain sum over
    all |Y|^k ordered groups, mean and covariance, for an estimator whose samples interact."""
    policy = POLICIES["autoregressive"]
    logits, ref, rewards = _instance(policy)
    estimator = E.Estimator("grpo", k=3, kl_estimator="k3", kl_placement="loss")
    exact = E.estimate_moments(estimator, policy, logits, rewards, kl_coef=LAM, ref_logits=ref, chunk=chunk)
    ordered = jnp.array(list(itertools.product(range(policy.num_outputs), repeat=estimator.k)))
    p = jnp.exp(jnp.sum(policy.log_probs(logits)[0][ordered], axis=-1))
    draws = jax.vmap(lambda s: E.sampled_gradient(estimator, policy, logits, rewards, s, kl_coef=LAM, ref_logits=ref))(
        ordered
    )
    mean = p @ draws
    np.testing.assert_allclose(float(jnp.sum(p)), 1.0, atol=1e-12)
    np.testing.assert_allclose(exact.mean, mean, atol=1e-12)
    np.testing.assert_allclose(exact.covariance, (draws * p[:, None]).T @ draws - jnp.outer(mean, mean), atol=1e-12)
    assert exact.groups == 20 < len(ordered)


def test_several_prompts_get_their_own_moments_in_one_call():
    policy = POLICIES["autoregressive"]
    logits, ref = policy.random_logits(jax.random.key(4), 3), policy.random_logits(jax.random.key(5), 3)
    rewards = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, policy.num_outputs)))
    estimator = E.Estimator("rloo", k=3, kl_estimator="k2", kl_placement="loss")
    batch = E.estimate_moments(estimator, policy, logits, rewards, kl_coef=LAM, ref_logits=ref)
    assert batch.mean.shape == (3, 6) and batch.covariance.shape == (3, 6, 6)
    for s in range(3):
        prompt = jax.tree.map(lambda x: x[s : s + 1], (logits, ref))
        alone = E.estimate_moments(estimator, policy, prompt[0], rewards[s], kl_coef=LAM, ref_logits=prompt[1])
        np.testing.assert_allclose(batch.mean[s], alone.mean, atol=1e-14)
        np.testing.assert_allclose(batch.covariance[s], alone.covariance, atol=1e-14)
    with pytest.raises(ValueError, match=r"rewards must be shaped \[3, 4\]"):
        E.estimate_moments(estimator, policy, logits, rewards[0])
    with pytest.raises(ValueError, match="ref_logits must hold the 3 prompt"):
        E.estimate_moments(estimator, policy, logits, rewards, ref_logits=prompt[1])


def test_bad_estimators_and_instances_are_refused():
    with pytest.raises(ValueError, match="k >= 2"):
        E.Estimator("rloo", k=1)
    with pytest.raises(ValueError, match="kl_placement"):
        E.Estimator(kl_placement="advantage")
    policy = POLICIES["tabular"]
    logits, _, rewards = _instance(policy)
    with pytest.raises(ValueError, match="rewards must be shaped"):
        E.estimate_moments(E.Estimator(), policy, logits, rewards[:3])
    with pytest.raises(ValueError, match="max_groups"):
        E.estimate_moments(E.Estimator(k=12), policy, logits, rewards, max_groups=454)  # C(15, 12) = 455
    with pytest.raises(ValueError, match="kl_coef"):
        E.estimate_moments(E.Estimator(), policy, logits, rewards, kl_coef=-0.1)
    with pytest.raises(ValueError, match="chunk"):
        E.estimate_moments(E.Estimator(), policy, logits, rewards, chunk=0)
    with pytest.raises(ValueError, match="one k"):
        E.estimate_many_moments((E.Estimator(k=2), E.Estimator(k=3)), policy, logits, rewards)
    with pytest.raises(ValueError, match="non-empty sequence of Estimator"):
        E.estimate_many_moments((), policy, logits, rewards)


@pytest.mark.parametrize("policy_name", POLICIES)
def test_followed_gradient_is_every_closed_form_estimator_mean(policy_name):
    """Every estimator of the atlas's grid at k = 3 (one compiled program): where
    followed_gradient has a closed form the exact mean equals it; where it has none (GRPO,
    per-group normalization, filtering), the mean is really off the objective's direction."""
    policy = POLICIES[policy_name]
    logits, ref, rewards = _instance(policy)
    grid = tuple(E.grid(ks=(3,)))
    means = E.estimate_many_moments(grid, policy, logits, rewards, kl_coef=LAM, ref_logits=ref)
    target = E.objective_gradient(policy, logits, rewards, kl_coef=LAM, ref_logits=ref)
    closed = 0
    for estimator, moments in zip(grid, means):
        followed = E.followed_gradient(estimator, policy, logits, rewards, kl_coef=LAM, ref_logits=ref)
        if followed is None:
            # Off the objective's direction, except filtering: with distinct rewards an all-equal
            # group repeats one output, whose RLOO advantages are 0 anyway (ties: next test).
            if not estimator.filter_zero_variance:
                assert E.compare(moments, target).direction_bias > 1e-4, estimator.name
        else:
            closed += 1
            np.testing.assert_allclose(moments.mean, followed, atol=1e-12, err_msg=estimator.name)
    assert closed == 4 * 3 * 3 + 2  # four advantages x three KLs x three placements, global norm, clipped


def test_filtering_biases_when_rewards_tie():
    """Binary rewards: a group whose samples all score 1 can hold different outputs, with
    different KL terms; dropping it drops their KL gradient."""
    policy = POLICIES["autoregressive"]
    logits, ref, _ = _instance(policy)
    binary = jnp.array([1.0, 1.0, 0.0, 0.0])
    target = E.objective_gradient(policy, logits, binary, kl_coef=LAM, ref_logits=ref)
    plain, filtered = E.estimate_many_moments(
        (E.Estimator("rloo", k=2), E.Estimator("rloo", k=2, filter_zero_variance=True)),
        policy,
        logits,
        binary,
        kl_coef=LAM,
        ref_logits=ref,
    )
    np.testing.assert_allclose(plain.mean, target, atol=1e-12)
    assert E.compare(filtered, target).relative_bias > 1e-3


def test_constant_rewards_teach_nothing_under_global_normalization():
    """Dividing by the reward's standard deviation must not blow rounding up: constant rewards
    give a zero expected gradient (in float32 the exact mean and the closed form disagreed)."""
    policy, logits = POLICIES["tabular"], jnp.array([[0.0, 0.5, -0.5, 0.2]], jnp.float32)
    estimator = E.Estimator("rloo", k=2, reward_normalization="global")
    for value in (0.7, 1.0):
        rewards = jnp.full(4, value, jnp.float32)
        np.testing.assert_array_equal(E.followed_gradient(estimator, policy, logits, rewards), 0.0)
        moments = E.estimate_moments(estimator, policy, logits, rewards)
        np.testing.assert_array_equal(moments.mean, 0.0)
        # An estimate that is always 0 has no signal-to-noise ratio (it is not infinite).
        assert np.isnan(E.compare(moments, E.objective_gradient(policy, logits, rewards)).snr)


def test_one_sample_reinforce_has_its_hand_enumerated_moments():
    """k = 1 on a tabular prompt: the estimate is ``(r_y - b)(e_y - pi)`` with probability
    ``pi_y``, ``b = 0`` for REINFORCE and ``E_pi[r]`` with the exact baseline, whose mean is the
    same and whose covariance is smaller here."""
    policy, logits, rewards = TabularPolicy(3), jnp.array([[0.3, -0.2, 0.5]]), jnp.array([1.0, 0.2, -0.7])
    pi = np.asarray(jax.nn.softmax(logits[0]))
    traces = {}
    for name, baseline in (("reinforce", 0.0), ("reinforce_baseline", pi @ np.asarray(rewards))):
        samples = np.stack([(float(rewards[y]) - baseline) * (np.eye(3)[y] - pi) for y in range(3)])
        mean = pi @ samples
        covariance = np.einsum("y,yi,yj->ij", pi, samples - mean, samples - mean)
        moments = E.estimate_moments(E.Estimator(name, k=1), policy, logits, rewards)
        np.testing.assert_allclose(moments.mean, mean, atol=1e-15)
        np.testing.assert_allclose(moments.covariance, covariance, atol=1e-15)
        traces[name] = np.trace(covariance)
    assert traces["reinforce_baseline"] < 0.9 * traces["reinforce"]


def test_compare_measures_against_the_target_as_defined():
    """mean (1, 1) against target (1, 0): best scale 1, the residual (0, 1) is 1 of |target| and
    1/sqrt(2) of |mean|; SNR |mean|^2 / trace(Cov) = 2 / 2."""
    out = E.compare(E.Moments(np.ones(2), np.eye(2), 1), np.array([1.0, 0.0]))
    np.testing.assert_allclose(
        [out.relative_bias, out.cosine, out.scale, out.direction_bias, out.total_variance, out.snr],
        [1.0, 0.5**0.5, 1.0, 0.5**0.5, 2.0, 1.0],
        rtol=1e-15,
    )
    # A mean twice the target: unbiased in direction, biased in size.
    out = E.compare(E.Moments(np.array([2.0, 0.0]), np.eye(2), 1), np.array([1.0, 0.0]))
    assert (out.relative_bias, out.scale, out.direction_bias, out.cosine) == (1.0, 2.0, 0.0, 1.0)
