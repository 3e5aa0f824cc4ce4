"""jaxrm.ascent: exact and sampled-gradient ascent on tabular policies against the exact dynamics."""

import jax
import numpy as np
import optax
import pytest

from jaxrm import ascent, metrics
from jaxrm.ascent import SampledGradient, ascent_first_passage, exact_gradient_ascent, sampled_gradient_ascent
from jaxrm.tabular import LogLinearPolicy, TabularPolicy, objective_grad

POLICY = TabularPolicy(8)


@pytest.fixture(scope="module")
def problem():
    logits = POLICY.random_logits(jax.random.key(0), 3)
    rewards = jax.random.uniform(jax.random.key(1), (3, 8))
    return logits, rewards


def test_rloo_estimates_average_to_the_exact_gradient_with_kl(problem):
    logits, rewards = problem
    ref_log_probs = POLICY.log_probs(POLICY.random_logits(jax.random.key(2), 3))
    estimate = SampledGradient(k=3, advantage_estimator="rloo")
    keys = jax.random.split(jax.random.key(3), 20_000)
    samples = np.asarray(
        jax.jit(jax.vmap(lambda key: estimate(POLICY, logits, rewards, ref_log_probs, 0.2, key)))(keys)
    )
    exact = np.asarray(objective_grad(POLICY, logits, rewards, ref_log_probs, kl_coef=0.2))
    z = (samples.mean(0) - exact) / (samples.std(0, ddof=1) / np.sqrt(len(keys)))
    assert np.abs(z).max() < 5.0 and np.abs(exact).max() > 1e-2


def test_many_samples_track_the_exact_ascent_and_seeds_vmap(problem):
    logits, rewards = problem
    optimizer = optax.sgd(5.0)
    _, exact = exact_gradient_ascent(logits, rewards, optimizer=optimizer, num_steps=30)

    def run(key):
        return sampled_gradient_ascent(logits, rewards, key, k=256, optimizer=optimizer, num_steps=30)[1]

    seeds = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(4), 2))
    assert seeds.rm_reward.shape == (2, 31, 3)
    gain = exact.rm_reward[-1] - exact.rm_reward[0]
    assert float(gain.min()) > 0.05
    np.testing.assert_allclose(
        seeds.rm_reward[:, -1], np.broadcast_to(exact.rm_reward[-1], (2, 3)), atol=0.1 * float(gain.max())
    )
    assert not np.array_equal(seeds.rm_reward[0], seeds.rm_reward[1])


def test_exact_ascent_carries_the_softmax_shift_and_falls_back_after_a_huge_step(problem):
    logits, rewards = problem
    # A finite log-normalizer 85 above the shift still overflows e * theta in float32: not safe.
    shifts = np.zeros((3, 1), np.float32)
    safe = ascent._shift_held(np.array([[10.0], [85.0], [np.nan]], np.float32), shifts)
    assert np.asarray(safe)[:, 0].tolist() == [True, False, False]
    for lr, shift_holds in ((5.0, True), (1e6, False)):  # 1e6: one step moves logits by far more than 60
        options = dict(optimizer=optax.sgd(lr), num_steps=4, kl_coef=0.1, track=False)
        held = ascent._ascent(
            logits,
            rewards,
            rewards,
            np.float32(0.1),
            jax.random.key(0),
            carry_shift=True,
            policy=POLICY,
            optimizer=options["optimizer"],
            num_steps=4,
            track=False,
            gradient=ascent._exact_gradient,
        )[2]
        assert bool(held) is shift_holds
        carried = exact_gradient_ascent(logits, rewards, **options)[0]
        # Under jit the shift is always the row maximum.
        traced = jax.jit(lambda x, r: exact_gradient_ascent(x, r, **options)[0])(logits, rewards)
        assert np.isfinite(carried).all()
        np.testing.assert_allclose(carried, traced, rtol=2e-5, atol=1e-5 * lr)


def test_bad_estimators_fail_clearly(problem):
    logits, rewards = problem
    with pytest.raises(ValueError, match="too few"):
        SampledGradient(k=1, advantage_estimator="rloo")
    with pytest.raises(ValueError, match="estimator"):
        SampledGradient(k=4, advantage_estimator="ppo")
    with pytest.raises(ValueError, match="match rm_rewards"):
        sampled_gradient_ascent(logits, rewards[:, :4], jax.random.key(0), k=2, optimizer=optax.sgd(1.0), num_steps=1)


def test_a_batch_of_problems_estimates_each_problems_own_gradient(problem):
    """Leading axes are independent problems: the batched estimate averages to each problem's own gradient."""
    logits, rewards = problem
    batch_logits, batch_rewards = jax.numpy.stack([logits, -logits]), jax.numpy.stack([rewards, 1 - rewards])
    ref = POLICY.log_probs(batch_logits)
    estimate = SampledGradient(k=4)
    keys = jax.random.split(jax.random.key(5), 4000)
    many = jax.jit(jax.vmap(lambda k: estimate(POLICY, batch_logits, batch_rewards, ref, 0.1, k)))(keys)
    exact = np.stack(
        [np.asarray(objective_grad(POLICY, batch_logits[b], batch_rewards[b], ref[b], kl_coef=0.1)) for b in range(2)]
    )
    z = (np.asarray(many).mean(0) - exact) / (np.asarray(many).std(0, ddof=1) / np.sqrt(len(keys)))
    assert np.abs(z).max() < 5.0 and np.abs(exact).max() > 1e-2  # a mean over problems would halve it


def test_first_passage_of_the_exact_ascent_converges_to_the_flow():
    """Two outputs, lam = 0: t_gamma = z* - z0 + sinh z* - sinh z0 (jaxrm.flow.t_gamma's closed form)."""
    logits, rewards = jax.numpy.zeros((1, 2)), jax.numpy.array([[0.0, 1.0]])
    flow_t = float(np.log(3.0) + np.sinh(np.log(3.0)))  # gamma = 0.25
    for lr in (0.01, 0.001):
        out = ascent_first_passage(logits, rewards, 0.25, optimizer=optax.sgd(lr), max_steps=10**5)
        assert bool(out.reached[0]) and abs(lr * int(out.steps[0]) - flow_t) <= 2 * lr
        assert float(out.tied_share[0]) == 1.0  # the exact gradient is a "group" of one
    # Two prompts passing at different steps: each one's share counts only its own updates.
    both = ascent_first_passage(
        jax.numpy.zeros((2, 2)),
        jax.numpy.array([[0.0, 1.0], [0.0, 0.4]]),
        0.1,
        optimizer=optax.sgd(0.1),
        max_steps=10**4,
    )
    assert bool(both.reached.all()) and int(both.steps[0]) < int(both.steps[1])
    np.testing.assert_array_equal(both.tied_share, [1.0, 1.0])


def test_sampled_first_passage_seeds_censoring_and_the_learning_rate_identity(problem):
    logits, rewards = problem
    seeds = 16
    tile = lambda x: jax.numpy.broadcast_to(x, (seeds, *x.shape))  # noqa: E731
    kwargs = dict(k=4, kl_coef=tile(jax.numpy.asarray(0.2)), max_steps=400)
    out = ascent_first_passage(tile(logits), tile(rewards), 0.1, jax.random.key(6), optimizer=optax.sgd(2.0), **kwargs)
    assert out.steps.shape == (seeds, 3) and bool(out.reached.all())
    assert len(np.unique(np.asarray(out.steps))) > 3  # the seeds differ
    exact = ascent_first_passage(logits, rewards, 0.1, optimizer=optax.sgd(2.0), max_steps=400, kl_coef=0.2)
    mean = np.asarray(out.steps).mean(0)
    assert np.all(np.abs(mean - np.asarray(exact.steps)) < 0.25 * np.asarray(exact.steps) + 2)
    # sgd(lr) on (r, lam) is sgd(1) on (lr r, lr lam): the same runs, update for update.
    kwargs["kl_coef"] = 2.0 * kwargs["kl_coef"]
    unit = ascent_first_passage(
        tile(logits),
        tile(2.0 * rewards),
        0.1,
        jax.random.key(6),
        optimizer=optax.sgd(1.0),
        eval_rewards=tile(rewards),
        **kwargs,
    )
    np.testing.assert_array_equal(unit.steps, out.steps)
    # Censored: the gain is out of reach in 5 updates; the tied share is then its start value.
    short = ascent_first_passage(logits, rewards, 0.5, jax.random.key(7), k=3, optimizer=optax.sgd(1e-6), max_steps=5)
    assert not bool(short.reached.any()) and bool((short.steps == 5).all())
    np.testing.assert_allclose(short.tied_share, metrics.tied_group_probability(logits, rewards, k=3), rtol=1e-4)


def test_first_passage_refuses_bad_input(problem):
    logits, rewards = problem
    with pytest.raises(ValueError, match="gamma must be > 0"):
        ascent_first_passage(logits, rewards, 0.0, optimizer=optax.sgd(1.0), max_steps=1)
    with pytest.raises(ValueError, match="needs a key"):
        ascent_first_passage(logits, rewards, 0.1, k=2, optimizer=optax.sgd(1.0), max_steps=1)
    with pytest.raises(ValueError, match="max_steps must be an int >= 0"):
        ascent_first_passage(logits, rewards, 0.1, optimizer=optax.sgd(1.0), max_steps=-1)
    with pytest.raises(ValueError, match="max_steps must fit in int32"):
        ascent_first_passage(logits, rewards, 0.1, optimizer=optax.sgd(1.0), max_steps=2**31)
    with pytest.raises(ValueError, match="advantage_estimator='grpo' needs k samples"):
        ascent_first_passage(logits, rewards, 0.1, optimizer=optax.sgd(1.0), max_steps=1, advantage_estimator="grpo")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        metrics.tied_group_probability(logits, rewards, k=True)


def test_first_passage_vmaps_over_seed_keys():
    """Seeds by jax.vmap over keys: each key its own run, the same as the call with that key."""
    logits, rewards = jax.numpy.zeros((1, 2)), jax.numpy.array([[0.0, 1.0]])
    keys = jax.random.split(jax.random.key(8), 4)

    def run(key):
        return ascent_first_passage(logits, rewards, 0.25, key, k=2, optimizer=optax.sgd(0.05), max_steps=1000).steps

    steps = jax.vmap(run)(keys)[:, 0]
    assert len(np.unique(np.asarray(steps))) > 1
    np.testing.assert_array_equal(steps[2], run(keys[2])[0])


def test_kl_coef_means_one_problem_whatever_its_shape(problem):
    """One coefficient per problem ([2]) or the same values per prompt ([2, 3]): the same ascent, as
    for the flow; a coefficient per prompt without a batch ([3]) is its own problem, each prompt
    pulled toward the reference by its own lam."""
    logits, rewards = problem
    batch_logits, batch_rewards = jax.numpy.stack([logits, -logits]), jax.numpy.stack([rewards, 1 - rewards])
    options = dict(optimizer=optax.sgd(1.0), num_steps=3, track=False)
    lam = jax.numpy.array([0.0, 0.5])
    per_problem, _ = exact_gradient_ascent(batch_logits, batch_rewards, kl_coef=lam, **options)
    per_prompt, _ = exact_gradient_ascent(
        batch_logits, batch_rewards, kl_coef=jax.numpy.repeat(lam[:, None], 3, 1), **options
    )
    np.testing.assert_array_equal(np.asarray(per_prompt), np.asarray(per_problem))
    lams = jax.numpy.array([0.0, 0.5, 5.0])
    mixed, _ = exact_gradient_ascent(logits, rewards, kl_coef=lams, **options)
    for prompt, each in enumerate(lams):
        alone, _ = exact_gradient_ascent(logits, rewards, kl_coef=each, **options)
        np.testing.assert_allclose(np.asarray(mixed[prompt]), np.asarray(alone[prompt]), rtol=1e-12)


def test_a_float32_problem_stays_float32_with_a_featurized_policy():
    """The log-linear policy's float64 features (x64 is on in the tests) once promoted the loop's
    carry to float64, and the sampled first passage crashed."""
    policy = LogLinearPolicy(np.eye(3))
    rewards = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = ascent_first_passage(
        np.zeros((1, 3), np.float32),
        rewards,
        0.1,
        jax.random.key(0),
        optimizer=optax.sgd(0.5),
        max_steps=50,
        k=2,
        policy=policy,
    )
    assert bool(out.reached.all()) and out.tied_share.dtype == np.float32


def test_rows_sharded_over_cpu_devices_run_in_blocks_with_the_same_result(monkeypatch):
    """Rows sharded over CPU devices with an element-wise optimizer: each device runs its rows in
    blocks through all the steps (``_row_blocked_ascent``), with the unblocked ascent's result,
    through batch axes, padding (6 rows a device in blocks of 5) and the rerun after a huge step."""
    mesh = jax.make_mesh((2,), ("problems",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("problems"))
    logits = jax.random.normal(jax.random.key(9), (2, 6, 3000))
    rewards = jax.random.uniform(jax.random.key(10), (2, 6, 3000))
    sharded = [jax.device_put(x, rows) for x in (logits, rewards)]
    calls = []
    blocked = ascent._row_blocked_ascent
    monkeypatch.setattr(ascent, "_row_blocked_ascent", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    # (optimizer, size of a step); sgd(1e6): the carried shift fails, and the ascent is rerun.
    for optimizer, step in ((optax.sgd(3.0), 3.0), (optax.adam(0.1), 0.1), (optax.sgd(1e6), 1e6)):
        options = dict(optimizer=optimizer, num_steps=4, kl_coef=jax.numpy.array([0.0, 0.3]), track=False)
        expected = exact_gradient_ascent(logits, rewards, **options)[0]
        got = exact_gradient_ascent(*sharded, **options)[0]
        assert np.isfinite(got).all() and got.sharding.is_equivalent_to(rows, got.ndim)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * step)
    # A mesh with explicit axes (jax.make_mesh's default) takes the arrays as placed; kl_coef is not.
    explicit = jax.sharding.NamedSharding(jax.make_mesh((2,), ("problems",)), jax.sharding.PartitionSpec("problems"))
    options = dict(optimizer=optax.sgd(3.0), num_steps=4, kl_coef=0.3, track=False)
    got = exact_gradient_ascent(*(jax.device_put(x, explicit) for x in (logits, rewards)), **options)[0]
    np.testing.assert_allclose(got, exact_gradient_ascent(logits, rewards, **options)[0], rtol=1e-10, atol=1e-12)
    assert len(calls) == 4
    # Where blocks would not be the same arithmetic, or not faster, the ascent is not blocked:
    # an optimizer that couples entries, or treats the whole array otherwise than a block (here by
    # its rank, or in its state), one device, replicated rows, outputs split over devices.
    on_rows = sharded[0]
    for coupled in (
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)),
        optax.adamw(0.1, weight_decay=0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim == 3, p)),
        optax.GradientTransformation(lambda p: jax.numpy.asarray(1 / p.shape[0]), lambda u, s, p=None: (-s * u, s)),
        optax.GradientTransformation(lambda p: p[0] * 0, lambda u, s, p=None: (jax.lax.cumsum(u), s)),
    ):
        assert ascent._row_blocked_layout(on_rows, coupled) is None
    assert ascent._row_blocked_layout(logits, optax.sgd(1.0)) is None
    for spec in ((), (None, None, "problems")):
        placed = jax.device_put(logits, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
        assert ascent._row_blocked_layout(placed, optax.sgd(1.0)) is None
    assert ascent._row_blocked_layout(on_rows, optax.chain(optax.clip(1.0), optax.lion(0.1))) is not None
