import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.integrate import solve_ivp

from jaxrm import _dopri5, _queue, ascent, flow
from jaxrm.tabular import AutoregressiveTabularPolicy, TabularPolicy, objective


def two_output_t_gamma(p0, gap, gamma, num_prompts):
    """Closed form for Y = 2, lam = 0: dz/dt = (2 gap / S) s(z)(1 - s(z)), z the logit gap."""
    p_star = p0 + gamma / gap
    if p_star >= 1:
        return np.inf
    z0, z1 = np.log(p0 / (1 - p0)), np.log(p_star / (1 - p_star))
    return num_prompts * (z1 - z0 + np.sinh(z1) - np.sinh(z0)) / gap


def scipy_t_gamma(policy, logits, rm, eval_rewards, gamma, kl_coef, prompt):
    """Independent reference: DOP853 at rtol 1e-12 on the autodiff gradient of the objective."""
    leaves, treedef = jax.tree.flatten(logits)
    sizes = [leaf.size for leaf in leaves]
    ref = policy.log_probs(logits)
    grad = jax.jit(jax.grad(lambda theta: objective(policy, theta, rm, ref, kl_coef=kl_coef)))
    gain = jax.jit(lambda theta: jnp.sum(jnp.exp(policy.log_probs(theta)[prompt]) * eval_rewards[prompt]))

    def unflatten(v):
        chunks = np.split(v, np.cumsum(sizes)[:-1])
        return treedef.unflatten([jnp.asarray(c).reshape(leaf.shape) for c, leaf in zip(chunks, leaves)])

    start = float(gain(logits))

    def field(t, v):
        return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad(unflatten(v)))])

    def event(t, v):
        return float(gain(unflatten(v))) - start - gamma

    event.terminal, event.direction = True, 1
    v0 = np.concatenate([np.ravel(leaf) for leaf in leaves])
    sol = solve_ivp(field, (0, 1e6), v0, method="DOP853", rtol=1e-12, atol=1e-14, events=event)
    return sol.t_events[0][0] if len(sol.t_events[0]) else np.inf


@pytest.mark.parametrize("p0,gamma,num_prompts", [(0.5, 0.25, 1), (0.1, 0.6, 3), (0.9, 0.05, 2), (0.01, 0.9, 1)])
def test_two_outputs_match_closed_form(p0, gamma, num_prompts):
    gap = 1.5
    logits = jnp.tile(jnp.array([0.0, np.log(p0 / (1 - p0))]), (num_prompts, 1))
    rewards = jnp.tile(jnp.array([-0.5, 1.0]), (num_prompts, 1))
    t = flow.t_gamma(logits, rewards, gamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t, two_output_t_gamma(p0, gap, gamma, num_prompts), rtol=1e-6)
    if num_prompts == 1:  # nested Python lists are arrays too
        as_lists = flow.t_gamma(logits.tolist(), rewards.tolist(), gamma, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(as_lists, t)


def test_a_gain_no_softmax_policy_attains_is_not_reached_and_costs_no_step():
    """From p = (1/2, 1/2) and rewards (0, 1) the gain tends to 1/2 and never gets there. Asking
    for 1/2 itself was once REACHED, at whatever time the top probability rounded to 1 (about
    5e6 in float32, 5e15 in float64)."""
    logits, rewards = jnp.zeros((1, 3, 2)), jnp.array([[[0.0, 1.0]] * 3])
    gammas = jnp.array([[0.6, 0.5, 0.49]])
    for dtype in (jnp.float64, jnp.float32):
        out = flow.first_passage(logits.astype(dtype), rewards.astype(dtype), gammas.astype(dtype), t_max=1e20)
        assert out.status[0].tolist() == [flow.Status.NOT_REACHED] * 2 + [flow.Status.REACHED]
        assert out.t_end[0, :2].tolist() == [0.0, 0.0] and out.num_steps[0, :2].tolist() == [0, 0]
        assert np.isinf(out.t_gamma[0, :2]).all()
        # Below the limit, float32 with its default tolerances agrees with the closed form.
        expected = two_output_t_gamma(0.5, 1.0, 0.49, 3)
        np.testing.assert_allclose(out.t_gamma[0, 2], expected, rtol=1e-7 if dtype == jnp.float64 else 1e-3)


CASES = {
    "tabular_kl_gt": (TabularPolicy(5), lambda k: TabularPolicy(5).random_logits(k, 2), 0.3),
    "autoregressive": (
        AutoregressiveTabularPolicy(2, 2),
        lambda k: AutoregressiveTabularPolicy(2, 2).random_logits(k, 2),
        0.1,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_agrees_with_independent_high_accuracy_solution(name):
    policy, make, kl_coef = CASES[name]
    logits = make(jax.random.key(0))
    shape = policy.log_probs(logits).shape
    gt = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
    rm = 0.5 * gt + 0.3 * jax.random.uniform(jax.random.key(2), shape, minval=-1, maxval=1)
    gamma = 0.1
    got = flow.t_gamma(logits, rm, gamma, policy=policy, kl_coef=kl_coef, eval_rewards=gt, rtol=1e-10, atol=1e-12)
    for prompt in range(shape[0]):
        expected = scipy_t_gamma(policy, logits, rm, gt, gamma, kl_coef, prompt)
        assert np.isfinite(expected)
        np.testing.assert_allclose(got[prompt], expected, rtol=1e-6)


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.key(3), 3)
    logits = 1.5 * jax.random.normal(keys[0], (6, 2, 8))
    gt = jax.random.uniform(keys[1], (6, 2, 8), minval=-1, maxval=1)
    rm = gt + 0.5 * jax.random.normal(keys[2], (6, 2, 8))
    return logits, rm, gt


def test_batch_equals_problems_one_at_a_time_on_any_device_count_and_queue_size(batch):
    logits, rm, gt = batch
    kl_coef = jnp.array([0.0, 0.05, 0.5, 0.0, 0.05, 0.5])
    assert len(jax.devices()) == 4  # conftest: the batch is dealt to 4 work queues
    together = flow.first_passage(logits, rm, 0.05, eval_rewards=gt, kl_coef=kl_coef, slots=3, devices=jax.devices())
    assert together.t_gamma.shape == (6, 2)
    assert together.t_gamma.devices() == {jax.devices()[0]}  # gathered, as one device's result
    assert np.isfinite(together.t_gamma).sum() >= 8
    for b in (0, 4):
        alone = flow.t_gamma(logits[b], rm[b], 0.05, eval_rewards=gt[b], kl_coef=kl_coef[b], slots=2)
        np.testing.assert_allclose(np.asarray(together.t_gamma[b]), np.asarray(alone), rtol=1e-9)
    # kl_coef's rank decides: [6] is one per problem, [6, 2] one per prompt; the same values
    # either way are the same problem (and the same compiled queue).
    per_prompt = jnp.repeat(kl_coef[:, None], 2, axis=1)
    again = flow.first_passage(logits, rm, 0.05, eval_rewards=gt, kl_coef=per_prompt, slots=3, devices=jax.devices())
    np.testing.assert_array_equal(np.asarray(again.t_gamma), np.asarray(together.t_gamma))
    status = np.asarray(together.status)
    assert set(status.ravel()) <= {flow.Status.REACHED, flow.Status.NOT_REACHED}
    assert (np.isfinite(together.t_gamma) == (status == flow.Status.REACHED)).all()


def test_batch_sizes_in_one_bucket_share_one_compiled_queue(batch):
    logits, rm, gt = batch
    # 10 and 12 items both pad to 16 (4 slots x 4): one program, and the padding changes nothing.
    assert _queue.bucket(10, 4) == _queue.bucket(12, 4) == (4, 16)
    before = flow._solve_items._cache_size()
    five = flow.first_passage(logits[:5], rm[:5], 0.05, eval_rewards=gt[:5], slots=4)
    six = flow.first_passage(logits, rm, 0.05, eval_rewards=gt, slots=4)
    assert flow._solve_items._cache_size() - before <= 1
    np.testing.assert_array_equal(np.asarray(five.t_gamma), np.asarray(six.t_gamma)[:5])
    np.testing.assert_array_equal(np.asarray(five.num_steps), np.asarray(six.num_steps)[:5])
    # Dealt to 4 devices (2, 1, 1 and 1 items, each padded to 2): the same items, in order.
    dealt = flow.first_passage(logits[:5], rm[:5], 0.05, eval_rewards=gt[:5], slots=2, devices=jax.devices())
    np.testing.assert_allclose(np.asarray(dealt.t_gamma), np.asarray(five.t_gamma), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(dealt.logits), np.asarray(five.logits), rtol=1e-9)


def test_vmap_over_problems(batch):
    logits, rm, gt = batch
    mapped = jax.vmap(lambda theta, r, g: flow.t_gamma(theta, r, 0.05, eval_rewards=g))(logits[:2], rm[:2], gt[:2])
    np.testing.assert_allclose(mapped, flow.t_gamma(logits[:2], rm[:2], 0.05, eval_rewards=gt[:2]), rtol=1e-9)


def test_logits_at_t_gamma_realize_the_gain(batch):
    logits, rm, gt = batch
    out = flow.first_passage(logits[:2], rm[:2], 0.05, eval_rewards=gt[:2])
    reached = np.isfinite(out.t_gamma)
    gain = (jax.nn.softmax(out.logits) * gt[:2]).sum(-1) - (jax.nn.softmax(logits[:2]) * gt[:2]).sum(-1)
    np.testing.assert_allclose(np.asarray(gain)[reached], 0.05, rtol=1e-7)
    # Without a KL term, exp(-theta_y) moves by B - r_y A with A > 0 for every output y of a
    # prompt (docs/theory.md#setting): affine in the trained-on reward, with a negative slope.
    displacement = np.exp(-np.asarray(out.logits)) - np.exp(-np.asarray(logits[:2]))
    for row, rewards in zip(displacement.reshape(-1, 8), np.asarray(rm[:2]).reshape(-1, 8)):
        slope, intercept = np.polyfit(rewards, row, 1)
        assert slope < 0
        np.testing.assert_allclose(intercept + slope * rewards, row, atol=1e-6 * np.abs(row).max())
    # The flow moves logits, not their row offsets: it exponentiates each row minus its initial
    # maximum (exp(1000) would overflow), and the offset rides along unchanged.
    offsets = jnp.array([1000.0, -3.0])[None, :, None]
    moved = flow.first_passage(logits[:2] + offsets, rm[:2], 0.05, eval_rewards=gt[:2])
    # The solver's error scale, rtol * |logits|, grows with the offset: agreement to its tolerance.
    np.testing.assert_allclose(moved.t_gamma, out.t_gamma, rtol=1e-5)
    np.testing.assert_allclose(moved.logits - offsets, out.logits, atol=1e-4)


def test_perfectly_accurate_scaled_teacher_is_a_time_rescaling(batch):
    """r_RM = eps * r_G, lam = 0: t_gamma(r_G) is exactly proportional to 1/eps."""
    logits, _, gt = batch
    eps = jnp.array([1.0, 1e-2, 1e-4])[:, None, None]
    t = flow.t_gamma(
        jnp.broadcast_to(logits[0], (3, 2, 8)),
        eps * gt[0],
        0.1,
        eval_rewards=jnp.broadcast_to(gt[0], (3, 2, 8)),
        rtol=1e-10,
        atol=1e-12,
    )
    np.testing.assert_allclose(t * eps[..., 0], jnp.broadcast_to(t[0], (3, 2)), rtol=1e-7)


def test_trajectory_passes_the_gain_at_t_gamma(batch):
    logits, rm, gt = batch
    t = flow.t_gamma(logits[0], rm[0], 0.05, eval_rewards=gt[0], kl_coef=0.05, rtol=1e-10, atol=1e-12)
    ts = jnp.sort(jnp.concatenate([jnp.zeros(1), t]))
    path = flow.trajectory(logits[0], rm[0], ts, eval_rewards=gt[0], kl_coef=0.05, rtol=1e-10, atol=1e-12)
    assert path.eval_reward.shape == (3, 2)
    gains = np.asarray(path.eval_reward - path.eval_reward[0])
    order = np.argsort(np.asarray(t))
    np.testing.assert_allclose([gains[1, order[0]], gains[2, order[1]]], 0.05, rtol=1e-6)
    np.testing.assert_allclose(path.kl[0], 0.0, atol=1e-15)
    assert bool(jnp.all(path.kl[1:] > 0))


def test_discrete_ascent_converges_to_the_flow(batch):
    logits, rm, gt = batch
    horizon = 4.0
    exact = flow.trajectory(
        logits[0], rm[0], jnp.array([horizon]), eval_rewards=gt[0], kl_coef=0.05, rtol=1e-10, atol=1e-12
    )
    errors = []
    for num_steps in (10, 40, 160):
        _, metrics = ascent.exact_gradient_ascent(
            logits[0],
            rm[0],
            optimizer=optax.sgd(horizon / num_steps),
            num_steps=num_steps,
            eval_rewards=gt[0],
            kl_coef=0.05,
        )
        errors.append(float(jnp.abs(metrics.eval_reward[-1] - exact.eval_reward[0]).max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
    np.testing.assert_allclose(errors[1] / errors[2], 4.0, rtol=0.25)  # first order in the step


def test_bad_input_fails_early():
    with pytest.raises(ValueError, match="gamma must be > 0"):
        flow.t_gamma(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match="finite"):
        flow.t_gamma(jnp.zeros((1, 2)), jnp.array([[0.0, np.nan]]), 0.1)
    with pytest.raises(ValueError, match="do not match"):
        flow.t_gamma(jnp.zeros((1, 3)), jnp.zeros((1, 2)), 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        flow.t_gamma(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.1, kl_coef=-1.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        flow.t_gamma(jnp.zeros((1, 2)), jnp.zeros((1, 2)), np.nan)
    # Integer rewards are cast to floats, not refused by the solver.
    t = flow.t_gamma(jnp.zeros((1, 2)), jnp.array([[0, 1]]), 0.25)
    np.testing.assert_allclose(t, [2.43195], rtol=1e-4)
    with pytest.raises(ValueError, match="prompts, outputs"):
        flow.t_gamma(jnp.zeros(2), jnp.zeros(2), 0.1)
    with pytest.raises(ValueError, match="devices must be distinct"):
        flow.t_gamma(jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]), 0.25, devices=jax.devices()[:1] * 2)
    with pytest.raises(ValueError, match="no \\(problem, prompt\\) pair"):
        flow.t_gamma(jnp.zeros((0, 2)), jnp.zeros((0, 2)), 0.1)
    for option in ("segment_steps", "slots", "max_steps"):
        with pytest.raises(ValueError, match=option):
            flow.t_gamma(jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]), 0.25, **{option: 0})


def test_segments_resume_exactly_and_every_way_of_ending(batch):
    logits, rm, gt = batch
    options = dict(eval_rewards=gt[:2], kl_coef=jnp.array([0.0, 0.05]))
    whole = flow.first_passage(logits[:2], rm[:2], 0.05, segment_steps=64, **options)
    pieces = flow.first_passage(logits[:2], rm[:2], 0.05, segment_steps=1, **options)
    # Cutting the integration into segments changes nothing: same steps, same crossing.
    np.testing.assert_array_equal(pieces.num_steps, whole.num_steps)
    np.testing.assert_allclose(pieces.t_gamma, whole.t_gamma, rtol=1e-12)
    reached = np.asarray(whole.status) == flow.Status.REACHED
    assert reached.sum() >= 3
    t_gamma = np.asarray(whole.t_gamma)[reached]
    # A horizon before the crossing: NOT_REACHED, ending exactly at t_max.
    t_max = 0.5 * float(t_gamma.min())
    early = flow.first_passage(logits[:2], rm[:2], 0.05, t_max=t_max, **options)
    assert (np.asarray(early.status) == flow.Status.NOT_REACHED).all()
    np.testing.assert_allclose(early.t_end, t_max, rtol=1e-12)
    # Too few steps: FAILED, with t_end a lower bound on the true t_gamma.
    short = flow.first_passage(logits[:2], rm[:2], 0.05, max_steps=2, segment_steps=1, **options)
    assert np.asarray(whole.num_steps).min() > 2
    assert (np.asarray(short.status) == flow.Status.FAILED).all() and np.isinf(short.t_gamma).all()
    assert (np.asarray(short.num_steps) == 2).all()
    assert (np.asarray(short.t_end) < np.asarray(whole.t_gamma)).all()


def test_kl_regularized_gain_out_of_reach_stops_early_and_only_then():
    """With lam > 0 the flow tends to pi* = pi_ref exp(r/lam)/Z: a gain just above pi*'s is
    proven unreachable after few steps; a gain just below it is still reached."""
    logits = jnp.array([[0.5, -1.0, 0.0, 2.0]])
    rewards = jnp.array([[1.0, 0.5, -0.5, -1.0]])
    lam = 0.5
    p0 = jax.nn.softmax(logits)
    p_star = jax.nn.softmax(jnp.log(p0) + rewards / lam)
    limit_gain = float(((p_star - p0) * rewards).sum())
    above = flow.first_passage(logits, rewards, 1.01 * limit_gain, kl_coef=lam)
    below = flow.first_passage(logits, rewards, 0.99 * limit_gain, kl_coef=lam)
    assert int(above.status[0]) == flow.Status.NOT_REACHED and int(above.num_steps[0]) < 500
    assert int(below.status[0]) == flow.Status.REACHED
    # t_end is t_gamma when reached; where the solve stopped (before any crossing) otherwise.
    assert float(below.t_end[0]) == float(below.t_gamma[0])
    assert 0 < float(above.t_end[0]) < np.inf
    # The KL branch is chosen by giving kl_coef at all, never by its Python type.
    as_array = flow.first_passage(logits, rewards, 1.01 * limit_gain, kl_coef=jnp.asarray(lam))
    assert int(as_array.status[0]) == flow.Status.NOT_REACHED and int(as_array.num_steps[0]) < 500
    # lam = 0 has no limit short of the best output: a gain that needs most of the way is reached,
    # at the time of the run without a KL term.
    uniform, spread = jnp.zeros((1, 4)), jnp.array([[1.0, 0.0, -0.5, -1.0]])
    plain = flow.first_passage(uniform, spread, 0.9)
    zero = flow.first_passage(uniform, spread, 0.9, kl_coef=0.0)
    assert int(zero.status[0]) == int(plain.status[0]) == flow.Status.REACHED
    np.testing.assert_allclose(zero.t_gamma, plain.t_gamma, rtol=1e-9)


def test_kl_regularized_eval_gain_above_the_limit_on_the_way_is_reached():
    """Timed on another reward than the one trained on, the eval reward can rise above pi*'s and
    fall back: a gain between pi*'s and the peak is reached, at the trajectory's crossing (the
    Pinsker slack keeps the solve going while the policy is far from pi*)."""
    logits, rm, ev, lam = jnp.zeros((1, 3)), jnp.array([[0.0, 3.0, 3.3]]), jnp.array([[0.0, 1.0, 0.0]]), 0.1
    limit = float((jax.nn.softmax(jnp.log(jax.nn.softmax(logits)) + rm / lam) * ev).sum())
    ts = np.linspace(0.0, 3.0, 31)
    path = np.asarray(flow.trajectory(logits, rm, ts, kl_coef=lam, eval_rewards=ev).eval_reward)[:, 0]
    start, peak = path[0], path.max()
    gamma = 0.5 * (peak - start)
    assert limit < start + gamma < peak and path[-1] < peak
    out = flow.first_passage(logits, rm, gamma, kl_coef=lam, eval_rewards=ev)
    assert int(out.status[0]) == flow.Status.REACHED
    crossed = int(np.argmax(path >= start + gamma))  # the trajectory's first sample past the gain
    assert ts[crossed - 1] < float(out.t_gamma[0]) <= ts[crossed]
    np.testing.assert_allclose(float((jax.nn.softmax(out.logits[0]) * ev[0]).sum()), start + gamma, rtol=1e-7)


def _solve_to(field, y0, t_end, rtol, atol):
    """The jaxrm._dopri5 loop to a fixed time: (y at t_end, times of the accepted steps, rejected steps)."""
    f0 = field(y0)[0]
    t, y, f, dt = 0.0, y0, f0, float(_dopri5.initial_step_size(field, y0, f0, rtol=rtol, atol=atol))
    times, rejected, controller = [], 0, _dopri5.Controller.first(jnp.float64)
    while t < t_end:
        h = min(dt, t_end - t)
        step = _dopri5.step(field, y, f, h, rtol=rtol, atol=atol)
        ok = bool(step.error < 1)
        dt, controller = _dopri5.next_step_size(h, step.error, ok, controller)
        dt = float(dt)
        if ok:
            t, y, f = t + h, step.y1, step.f1
            times.append(t)
        else:
            rejected += 1
    return y, np.array(times), rejected


def test_dopri5_stepper_matches_diffrax_and_takes_hairers_step_sizes():
    """diffrax's Dopri5 tableau, error norm and first step; Hairer's PI step-size rule."""
    rewards = jnp.linspace(-1.0, 1.0, 6)

    def vector_field(y):
        p = jax.nn.softmax(y)
        return p * (rewards - p @ rewards)

    y0 = jnp.array([0.3, -1.2, 0.0, 2.0, -0.5, 0.7])
    rtol, atol = 1e-7, 1e-9
    field = lambda y: (vector_field(y), None)  # noqa: E731
    term, solver = diffrax.ODETerm(lambda t, y, args: vector_field(y)), diffrax.Dopri5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    first = controller.init(term, 0.0, 40.0, y0, None, None, solver.func, solver.error_order(term))[0]
    np.testing.assert_allclose(
        _dopri5.initial_step_size(field, y0, field(y0)[0], rtol=rtol, atol=atol), first, rtol=1e-12
    )
    # One step from the same point with the same size: diffrax's solution and error estimate.
    step = _dopri5.step(field, y0, field(y0)[0], 0.7, rtol=rtol, atol=atol)
    y1, y_error, *_ = solver.step(term, 0.0, 0.7, y0, None, solver.init(term, 0.0, 0.7, y0, None), False)
    np.testing.assert_allclose(step.y1, y1, rtol=1e-13)
    scale = atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1))
    np.testing.assert_allclose(step.error, jnp.sqrt(jnp.mean((y_error / scale) ** 2)), rtol=1e-8)
    ours, times, rejected = _solve_to(field, y0, 40.0, rtol, atol)
    sol = diffrax.diffeqsolve(term, solver, 0.0, 40.0, first, y0, stepsize_controller=controller)
    np.testing.assert_allclose(ours, sol.ys[-1], rtol=1e-6)  # other steps, the same solution
    assert len(times) > 10 and rejected < len(times) / 4

    # The rule itself (Hairer, Norsett & Wanner's dopri5): exponents 1/5 - 0.75 beta and beta.
    exponent, beta = 0.2 - 0.75 * 0.04, 0.04
    fresh = _dopri5.Controller.first(jnp.float64)
    h, memory = _dopri5.next_step_size(2.0, 0.5, True, fresh)
    np.testing.assert_allclose(h, 2.0 * 0.9 * 0.5**-exponent * 1e-4**beta, rtol=1e-14)
    assert float(memory.previous_error) == 0.5 and not bool(memory.rejected)
    h, memory = _dopri5.next_step_size(2.0, 4.0, False, memory)  # rejected: the P part only
    np.testing.assert_allclose(h, 2.0 * 0.9 * 4.0**-exponent, rtol=1e-14)
    assert float(memory.previous_error) == 0.5 and bool(memory.rejected)
    h, memory = _dopri5.next_step_size(2.0, 1e-6, True, memory)  # no growth right after a rejection
    assert float(h) == 2.0 and float(memory.previous_error) == 1e-4
    assert float(_dopri5.next_step_size(2.0, 0.0, True, memory)[0]) == 20.0  # growth capped at 10x
    assert float(_dopri5.next_step_size(2.0, jnp.nan, False, memory)[0]) == 0.4  # a failed step: 5x smaller


def test_dopri5_dense_output_and_crossing():
    # y' = -y: the quartic dense output is diffrax's, and its error shrinks like h^5.
    field = lambda y: (-y, None)  # noqa: E731
    y0 = jnp.array([1.0, -2.0])

    def dense_output(h):
        step = _dopri5.step(field, y0, -y0, h, rtol=1e-8, atol=1e-10)
        return step, _dopri5.Interpolant.of_step(y0, -y0, step.y1, step.f1, step.y_mid, h)

    step, dense = dense_output(0.4)
    np.testing.assert_allclose(dense(0.0), y0, rtol=1e-15)
    np.testing.assert_allclose(dense(1.0), step.y1, rtol=1e-14)
    term, solver = diffrax.ODETerm(lambda t, y, args: -y), diffrax.Dopri5()
    *_, dense_info, _, _ = solver.step(term, 0.0, 0.4, y0, None, solver.init(term, 0.0, 0.4, y0, None), False)
    theirs = solver.interpolation_cls(t0=0.0, t1=0.4, **dense_info)
    errors = []
    for theta in (0.25, 0.5, 0.8):
        np.testing.assert_allclose(dense(theta), theirs.evaluate(0.4 * theta), rtol=1e-13)
        errors.append(
            [
                float(jnp.max(jnp.abs(d(theta) - y0 * np.exp(-theta * h))))
                for h, d in ((0.4, dense), (0.2, dense_output(0.2)[1]))
            ]
        )
    assert all(coarse / fine > 16 for coarse, fine in errors)  # about 2^5 = 32

    # Bracketed Newton: the root of theta^3 + theta - 0.5 (0.4238537...), to the tolerance asked.
    condition = lambda theta: theta**3 + theta - 0.5  # noqa: E731
    root = _dopri5.locate_upcrossing(condition, condition(0.0), condition(1.0), tol=1e-12)
    assert abs(float(condition(root))) < 1e-12
    # A flat-then-steep crossing, where Newton from the secant point overshoots the bracket.
    steep = lambda theta: jnp.expm1(30 * (theta - 0.9))  # noqa: E731
    root = _dopri5.locate_upcrossing(steep, steep(0.0), steep(1.0), tol=1e-13)
    np.testing.assert_allclose(root, 0.9, atol=1e-12)
    # An infinite tolerance skips the search (padding lanes).
    assert float(_dopri5.locate_upcrossing(condition, -0.5, 1.5, tol=jnp.inf)) == 0.25
