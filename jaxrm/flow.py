"""Exact dynamics of tabular policies: gradient flow, ``t_gamma``, trajectories, discrete ascent.

The gradient flow of THEORY.md Eq. 4, ``d theta/dt = grad phi(theta)``, ``theta(0) = theta_ref``,
is integrated with diffrax's adaptive solvers; ``t_gamma`` (the first time the expected
``eval_rewards`` gain ``gamma`` over the initial policy) is located by diffrax's event root
finder on the solver's dense interpolant, so it is exact up to the solver tolerance.

Tabular and autoregressive-tabular policies are *separable*: prompt ``x`` only moves its own
logits, at speed ``1/|S|`` (Lemma 7). So each prompt is an independent ODE in the rescaled time
``tau = t / |S|``, and ``t_gamma(x) = |S| tau_gamma(x)``. :func:`first_passage` solves all
(problem, prompt) pairs of a batch as independent items on a work queue: a fixed number of
slots each integrate one item for a short segment of steps, and finished slots take the next
item, so a batch costs about the *sum* of the items' step counts, not ``batch x max``.

With ``kl_coef = lam > 0`` the flow converges to ``pi* = pi_ref exp(r / lam) / Z``, and
``phi_x(pi) = lam log Z - lam KL(pi || pi*)`` only grows along the flow, so every later policy
stays in the ball ``KL(pi || pi*) <= KL(pi(t) || pi*) =: delta``. By Pinsker, its expected eval
reward is within ``(max r_eval - min r_eval) / 2 * sqrt(2 delta)`` of ``E_{pi*}[r_eval]``; once
that bound rules the gain out, the solve stops with ``NOT_REACHED`` instead of integrating a
stiff approach to ``pi*`` until ``t_max``.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx

from jaxrm import metrics
from jaxrm._checks import check_finite, is_concrete
from jaxrm.tabular import TabularPolicy, objective_grad, prompt_gradient

__all__ = [
    "FirstPassage",
    "FlowMetrics",
    "exact_gradient_ascent",
    "first_passage",
    "flow_metrics",
    "t_gamma",
    "trajectory",
]

# Item status codes of :class:`FirstPassage`.
REACHED, NOT_REACHED, FAILED = 1, 2, 3
_RUNNING = 0


class FlowMetrics(NamedTuple):
    """Per-prompt quantities along a trajectory (each ``[..., S]``, time axis first)."""

    rm_reward: Any  # E_pi[r_RM]
    eval_reward: Any  # E_pi[r_eval] (e.g. the ground truth)
    rm_variance: Any  # Var_pi[r_RM]
    kl: Any  # KL(pi || pi_ref)


class FirstPassage(NamedTuple):
    """Result of :func:`first_passage`; arrays are ``[..., S]`` (one entry per prompt)."""

    t_gamma: Any  # first time E_pi[r_eval] >= E_pi0[r_eval] + gamma; inf if not reached
    logits: Any  # each prompt's logits at t_gamma (or where its solve stopped)
    num_steps: Any  # ODE steps taken (accepted and rejected)
    status: Any  # REACHED (1), NOT_REACHED by t_max (2), or FAILED (3: solver error, max_steps)


def flow_metrics(policy, logits, rm_rewards, eval_rewards, ref_log_probs) -> FlowMetrics:
    """Expected proxy and eval reward, proxy-reward variance and KL to the reference."""
    log_probs = policy.log_probs(logits)
    return FlowMetrics(
        rm_reward=metrics.expected_reward(log_probs, rm_rewards),
        eval_reward=metrics.expected_reward(log_probs, eval_rewards),
        rm_variance=metrics.reward_variance(log_probs, rm_rewards),
        kl=metrics.kl(log_probs, ref_log_probs),
    )


def _default_solver():
    return diffrax.Dopri5()


def validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef):
    """Check a tabular problem before any work; returns ``(rm_rewards, eval_rewards)`` as arrays."""
    rm_rewards = jnp.asarray(rm_rewards)
    if rm_rewards.ndim < 2:
        raise ValueError(f"rewards must be shaped [..., prompts, outputs], got {rm_rewards.shape}.")
    log_probs = jax.eval_shape(policy.log_probs, init_logits)
    if log_probs.shape != rm_rewards.shape:
        raise ValueError(f"the policy's outputs {log_probs.shape} do not match rm_rewards {rm_rewards.shape}.")
    if eval_rewards is not None and jnp.shape(eval_rewards) != rm_rewards.shape:
        raise ValueError(f"eval_rewards {jnp.shape(eval_rewards)} must match rm_rewards {rm_rewards.shape}.")
    check_finite("rm_rewards", rm_rewards)
    check_finite("eval_rewards", eval_rewards)
    for leaf in jax.tree.leaves(init_logits):
        check_finite("init_logits", leaf)
    if is_concrete(kl_coef) and np.any(np.asarray(kl_coef) < 0):
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}.")
    return rm_rewards, (rm_rewards if eval_rewards is None else jnp.asarray(eval_rewards))


def first_passage(
    init_logits,
    rm_rewards,
    gamma,
    *,
    policy=None,
    kl_coef=0.0,
    eval_rewards=None,
    t_max=1e9,
    rtol=1e-8,
    atol=1e-10,
    solver=None,
    max_steps=100_000,
    slots=None,
    segment_steps=16,
    devices=None,
) -> FirstPassage:
    """Integrate the gradient flow of each prompt until its ``eval_rewards`` gain reaches ``gamma``.

    ``t_gamma(x) = inf { t : E_{pi(t)}[r_eval(x, .)] >= E_{pi(0)}[r_eval(x, .)] + gamma }``
    under ``d theta/dt = grad phi(theta)`` with ``phi`` the objective of ``rm_rewards`` and KL
    coefficient ``kl_coef`` against the initial policy (THEORY.md §1). ``+inf`` if not reached
    by ``t_max``.

    Args:
      init_logits: initial policy parameters, prompt axis leading (``[..., S, Y]`` for the
        default tabular policy); any leading axes are a batch of independent problems.
      rm_rewards: ``[..., S, Y]`` rewards the policy is trained on.
      gamma: gain to reach; broadcasts to ``[..., S]``; must be > 0.
      policy: :class:`~jaxrm.tabular.TabularPolicy` (default) or
        :class:`~jaxrm.tabular.AutoregressiveTabularPolicy`.
      kl_coef: ``lam >= 0``; broadcasts to the batch shape ``[...]`` (or ``[..., S]``). A Python
        ``0`` or ``0.0`` leaves out the KL machinery (the out-of-reach stop); arrays keep it.
      eval_rewards: ``[..., S, Y]`` reward whose gain is timed (default ``rm_rewards``).
      t_max: give up (``inf``) after this much time.
      rtol, atol: tolerances of the adaptive step-size controller.
      solver: a diffrax solver (default ``Dopri5``).
      max_steps: most ODE steps per prompt before the item counts as FAILED.
      slots: items integrated side by side on each device (default: up to 64).
      segment_steps: steps between refills of the work queue.
      devices: several devices to share the items, each running its own work queue at the
        same time (default: one; on a CPU, ``--xla_force_host_platform_device_count=<cores>``
        gives one device per core). Each device compiles the queue once; ignored under
        ``jit``/``vmap``.

    Returns:
      :class:`FirstPassage` with ``[..., S]`` arrays.
    """
    policy = TabularPolicy() if policy is None else policy
    rm_rewards, eval_rewards = validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef)
    if is_concrete(gamma) and np.any(np.asarray(gamma) <= 0):
        raise ValueError(f"gamma must be > 0; the smallest given is {np.min(gamma)}.")
    if is_concrete(t_max) and not float(t_max) > 0:
        raise ValueError(f"t_max must be > 0, got {t_max}.")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    dtype = rm_rewards.dtype
    item_shape = rm_rewards.shape[:-1]  # [..., S]: one item per (problem, prompt)
    items = _prepare_items(init_logits, rm_rewards, eval_rewards, gamma, kl_coef, policy=policy)
    tau_max = jnp.asarray(t_max, dtype) / item_shape[-1]
    traced = any(not is_concrete(x) for x in jax.tree.leaves((items, tau_max)))
    devices = (None,) if devices is None or traced else tuple(devices)
    num_items = math.prod(item_shape)
    per_device = -(-num_items // len(devices))
    options = dict(
        policy=policy,
        solver=_default_solver() if solver is None else solver,
        rtol=float(rtol),
        atol=float(atol),
        max_steps=max_steps,
        slots=min(per_device, _DEFAULT_SLOTS if slots is None else int(slots)),
        segment_steps=int(segment_steps),
        # Decided by the argument's kind, not its values, so new values never recompile.
        kl_penalized=not (isinstance(kl_coef, (int, float)) and kl_coef == 0),
    )
    if len(devices) == 1:
        if devices[0] is not None:
            items = jax.device_put(items, devices[0])
        out = _work_queue(*items, num_items, tau_max, **options)
    else:
        out = _on_devices(items, num_items, tau_max, devices, options)
    tau, logits, num_steps, status = out
    unflat = lambda x: x.reshape(*item_shape, *x.shape[1:])  # noqa: E731
    t = jnp.where(status == REACHED, tau * item_shape[-1], jnp.inf)
    return FirstPassage(unflat(t), jax.tree.map(unflat, logits), unflat(num_steps), unflat(status))


@jax.jit(static_argnames="policy")
def _prepare_items(init_logits, rm_rewards, eval_rewards, gamma, kl_coef, *, policy):
    """Flatten ``[..., S]`` into independent items with everything their flow needs."""
    item_shape = rm_rewards.shape[:-1]
    num_prompts = item_shape[-1]
    dtype = rm_rewards.dtype
    gamma = jnp.broadcast_to(jnp.asarray(gamma, dtype), item_shape)
    kl_coef = jnp.asarray(kl_coef, dtype)
    if kl_coef.ndim == len(item_shape) - 1 or kl_coef.shape[-1:] != (num_prompts,):
        kl_coef = kl_coef[..., None]  # one coefficient per problem
    kl_coef = jnp.broadcast_to(kl_coef, item_shape)
    ref_log_probs = policy.log_probs(init_logits)
    start = metrics.expected_reward(ref_log_probs, eval_rewards)
    limit = _kl_limit(ref_log_probs, rm_rewards, eval_rewards, kl_coef)

    def flat(x):
        return x.reshape(math.prod(item_shape), *x.shape[len(item_shape) :])

    return (
        jax.tree.map(flat, init_logits),
        _ItemArgs(
            flat(rm_rewards),
            flat(ref_log_probs),
            flat(kl_coef),
            flat(eval_rewards),
            (flat(start), flat(gamma)),
            jax.tree.map(flat, limit),
        ),
    )


def t_gamma(init_logits, rm_rewards, gamma, **options):
    """``t_gamma`` per prompt, ``[..., S]`` (``inf`` where not reached by ``t_max``).

    The first time the expected ``eval_rewards`` (default ``rm_rewards``) under the
    gradient-flow policy exceeds its initial value by ``gamma``. Keyword options as in
    :func:`first_passage`: ``policy``, ``kl_coef``, ``eval_rewards``, ``t_max``, ``rtol``,
    ``atol``, ``solver``, ``max_steps``.

    Two outputs, ``lam = 0``: ``t_gamma = |S| (z* - z0 + sinh z* - sinh z0) / (r_1 - r_0)`` with
    ``z`` the logit gap, ``z* = logit(p0 + gamma / (r_1 - r_0))``.

    >>> import jax.numpy as jnp
    >>> t = t_gamma(jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]), 0.25)
    >>> round(float(t[0]), 4)  # z* = log 3: log 3 + sinh(log 3) = 2.43195
    2.4319
    """
    return first_passage(init_logits, rm_rewards, gamma, **options).t_gamma


class _KLLimit(NamedTuple):
    log_probs: Any  # log pi* = log_softmax(log pi_ref + r / lam)
    eval_reward: Any  # E_{pi*}[r_eval]
    eval_half_range: Any  # (max r_eval - min r_eval) / 2


def _kl_limit(ref_log_probs, rm_rewards, eval_rewards, kl_coef):
    lam = jnp.where(kl_coef > 0, kl_coef, 1.0)[..., None]
    log_probs = jax.nn.log_softmax(ref_log_probs + rm_rewards / lam, axis=-1)
    return _KLLimit(
        log_probs,
        metrics.expected_reward(log_probs, eval_rewards),
        0.5 * (jnp.max(eval_rewards, -1) - jnp.min(eval_rewards, -1)),
    )


class _ItemArgs(NamedTuple):
    rm_rewards: Any
    ref_log_probs: Any
    kl_coef: Any
    eval_rewards: Any
    gain: Any  # (start, gamma)
    limit: _KLLimit


def _prompt_field(policy):
    def field(tau, logits, args):
        return prompt_gradient(policy, logits, args.rm_rewards, args.ref_log_probs, kl_coef=args.kl_coef)

    return field


def _gain_condition(policy):
    def condition(t, y, args, **unused):  # diffrax passes t, y by keyword
        start, gamma = args.gain
        # In units of gamma, so the root finder's tolerance is relative to the gain asked for.
        return (metrics.expected_reward(policy.log_probs(y), args.eval_rewards) - start) / gamma - 1.0

    return condition


def _out_of_reach_condition(policy):
    """True once the KL ball around pi* (see the module docstring) excludes the gain."""

    def condition(t, y, args, **unused):
        start, gamma = args.gain
        distance = metrics.kl(policy.log_probs(y), args.limit.log_probs)
        best = args.limit.eval_reward + args.limit.eval_half_range * jnp.sqrt(2.0 * distance)
        return (args.kl_coef > 0) & (best < start + gamma)

    return condition


class _Segment(NamedTuple):
    tau: Any
    logits: Any
    dt: Any
    num_steps: Any
    status: Any


def _segment_solver(policy, solver, controller, tau_max, segment_steps, kl_penalized):
    """One item's integration for at most ``segment_steps`` steps, resumable."""
    term = diffrax.ODETerm(_prompt_field(policy))
    dtype = jnp.result_type(tau_max)
    newton_tol = max(controller.rtol * 1e-2, 100 * float(jnp.finfo(dtype).eps))
    conditions = [_gain_condition(policy)] + ([_out_of_reach_condition(policy)] if kl_penalized else [])
    event = diffrax.Event(
        conditions, optx.Newton(rtol=newton_tol, atol=newton_tol), direction=[True] + [None] * kl_penalized
    )
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(steps=True)])

    def run(tau0, logits0, dt0, args):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            tau0,
            tau_max,
            dt0,
            logits0,
            args=args,
            saveat=saveat,
            stepsize_controller=controller,
            event=event,
            max_steps=segment_steps,
            throw=False,
        )
        (tau_end, tau_steps), (logits_end, logits_steps) = sol.ts, sol.ys
        accepted = sol.stats["num_accepted_steps"]
        # An event in the last step counts even when the root finder could not meet its
        # tolerance on the gain: its iterate stays inside that step, and the steps can be
        # shorter than the float resolution of t allows the gain to be evaluated at.
        hit = sol.event_mask[0]
        out_of_reach = sol.event_mask[1] if kl_penalized else False
        running = (sol.result == diffrax.RESULTS.max_steps_reached) & ~hit & ~out_of_reach
        # Reached tau_max without the event, or the gain was proven out of reach.
        done = (sol.result == diffrax.RESULTS.successful) | out_of_reach
        status = jnp.where(hit, REACHED, jnp.where(running, _RUNNING, jnp.where(done, NOT_REACHED, FAILED)))
        # Resume from the last *accepted* step. (diffrax 0.7, vmapped with events: an element
        # without an event, when another element had one, reports its last *attempted* step,
        # which may have been rejected; the per-step saves are reliable.)
        last = jnp.maximum(accepted - 1, 0)
        before = jnp.maximum(accepted - 2, 0)
        moved = accepted > 0
        resume_tau = jnp.where(moved, tau_steps[last], tau0)
        resume_dt = jnp.where(moved, resume_tau - jnp.where(accepted > 1, tau_steps[before], tau0), 0.25 * dt0)
        resume_logits = jax.tree.map(lambda saved, start: jnp.where(moved, saved[last], start), logits_steps, logits0)
        end_logits = jax.tree.map(lambda saved: saved[0], logits_end)
        tau = jnp.where(running, resume_tau, tau_end[0])
        logits = jax.tree.map(lambda resume, end: jnp.where(running, resume, end), resume_logits, end_logits)
        return _Segment(tau, logits, resume_dt, sol.stats["num_steps"], status)

    return run


def _on_devices(items, num_items, tau_max, devices, options):
    """One work queue per device, all running at once.

    Items are dealt round-robin (item ``i`` to device ``i % D``) so that costly neighbours
    spread out; padding sits past each device's count of valid items. Each queue is launched
    from its own thread: a CPU program with host callbacks (diffrax's error checks) runs
    synchronously in the thread that launched it. Each device compiles the queue once (XLA
    executables are bound to a device); the compiles run in parallel too."""
    num_devices = len(devices)
    per_device = -(-num_items // num_devices)
    pad = per_device * num_devices - num_items

    padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]), items)

    def run(device):
        shard = jax.tree.map(lambda x: x[device::num_devices], padded)
        shard, num_valid, limit = jax.device_put(
            (shard, len(range(device, num_items, num_devices)), tau_max), devices[device]
        )
        return jax.block_until_ready(_work_queue(*shard, num_valid, limit, **options))

    with concurrent.futures.ThreadPoolExecutor(num_devices) as pool:
        runs = list(pool.map(run, range(num_devices)))
    home = jax.devices()[0]
    gathered = jax.tree.map(lambda *parts: jnp.stack([jax.device_put(p, home) for p in parts], axis=1), *runs)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:num_items], gathered)


@jax.jit(static_argnames=("policy", "solver", "rtol", "atol", "max_steps", "slots", "segment_steps", "kl_penalized"))
def _work_queue(
    logits,
    args,
    num_valid,
    tau_max,
    *,
    policy,
    solver,
    rtol,
    atol,
    max_steps,
    slots,
    segment_steps,
    kl_penalized,
):
    """One device's items: ``slots`` integrate side by side; finished slots take queued items."""
    num_items = args.rm_rewards.shape[0]
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    term = diffrax.ODETerm(_prompt_field(policy))
    error_order = solver.error_order(term)

    def initial_dt(logits0, item_args):
        tnext, _ = controller.init(term, 0.0, tau_max, logits0, None, item_args, solver.func, error_order)
        return tnext

    first_dt = jax.vmap(initial_dt)(logits, args)
    segment = jax.vmap(_segment_solver(policy, solver, controller, tau_max, segment_steps, kl_penalized))
    take = lambda tree, index: jax.tree.map(lambda x: x[index], tree)  # noqa: E731

    def load(item):
        """Slots holding ``item`` (-1: idle) at the start of their integration."""
        index = jnp.clip(item, 0, num_items - 1)
        return _Slots(
            item,
            jnp.zeros(item.shape, tau_max.dtype),
            take(logits, index),
            first_dt[index],
            jnp.zeros(item.shape, jnp.int32),
        )

    def body(carry):
        slots, next_item, out = carry
        active = slots.item >= 0
        result = segment(slots.tau, slots.logits, slots.dt, take(args, jnp.clip(slots.item, 0, num_items - 1)))
        steps = slots.steps + result.num_steps
        status = jnp.where((result.status == _RUNNING) & (steps >= max_steps), FAILED, result.status)
        finished = active & (status != _RUNNING)
        write = jnp.where(finished, slots.item, num_items)  # out of range: dropped
        out = _Outputs(
            out.tau.at[write].set(result.tau, mode="drop"),
            jax.tree.map(lambda o, new: o.at[write].set(new, mode="drop"), out.logits, result.logits),
            out.steps.at[write].set(steps, mode="drop"),
            out.status.at[write].set(status, mode="drop"),
        )
        # Finished slots take the next items of the queue, in slot order.
        queued = next_item + jnp.cumsum(finished) - 1
        item = jnp.where(finished, jnp.where(queued < num_valid, queued, -1), slots.item)
        fresh = finished & (item >= 0)
        continued = _Slots(item, result.tau, result.logits, result.dt, steps)
        slots = jax.tree.map(
            lambda new, old: jnp.where(fresh.reshape(-1, *([1] * (old.ndim - 1))), new, old), load(item), continued
        )
        return slots, next_item + jnp.sum(finished), out

    def run(slots, next_item, out, keep_going):
        return jax.lax.while_loop(lambda c: keep_going(*c), body, (slots, next_item, out))

    out = _Outputs(
        jnp.full(num_items, jnp.inf, tau_max.dtype),
        logits,
        jnp.zeros(num_items, jnp.int32),
        jnp.zeros(num_items, jnp.int32),
    )
    first = jnp.arange(slots)
    slots, next_item, out = load(jnp.where(first < num_valid, first, -1)), jnp.asarray(slots), out
    # The queue drains at full width; once few items are left, the stragglers (the longest
    # solves) move to a narrow set of slots, so they no longer pay for idle ones.
    tail = min(_TAIL_SLOTS, slots.item.shape[0])
    slots, next_item, out = run(slots, next_item, out, lambda s, n, o: (n < num_valid) | (jnp.sum(s.item >= 0) > tail))
    order = jnp.argsort(slots.item < 0, stable=True)[:tail]
    slots, next_item, out = run(take(slots, order), next_item, out, lambda s, n, o: jnp.any(s.item >= 0))
    return out.tau, out.logits, out.steps, out.status


class _Slots(NamedTuple):
    item: Any  # index of the item in each slot; -1 when idle
    tau: Any
    logits: Any
    dt: Any
    steps: Any


class _Outputs(NamedTuple):
    tau: Any
    logits: Any
    steps: Any
    status: Any


# Slots per device, and the width of the work queue's last phase (see _work_queue).
_DEFAULT_SLOTS = 64
_TAIL_SLOTS = 16


def trajectory(
    init_logits,
    rm_rewards,
    ts,
    *,
    policy=None,
    kl_coef=0.0,
    eval_rewards=None,
    rtol=1e-8,
    atol=1e-10,
    solver=None,
    max_steps=100_000,
) -> FlowMetrics:
    """:class:`FlowMetrics` of the gradient flow at times ``ts`` (each ``[T, ..., S]``).

    Integrates the coupled system ``d theta/dt = grad phi(theta)`` (with its ``1/|S|``) for each
    problem of the leading batch, saving only the metrics. ``ts`` must be non-decreasing, >= 0.
    """
    policy = TabularPolicy() if policy is None else policy
    rm_rewards, eval_rewards = validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef)
    ts = jnp.asarray(ts, rm_rewards.dtype)
    if ts.ndim != 1:
        raise ValueError(f"ts must be a 1-d array of times, got shape {ts.shape}.")
    if is_concrete(ts) and (np.any(np.diff(np.asarray(ts)) < 0) or np.any(np.asarray(ts) < 0)):
        raise ValueError("ts must be non-negative and non-decreasing.")
    batch = rm_rewards.shape[:-2]
    size = math.prod(batch)
    flat = lambda x: x.reshape(size, *x.shape[len(batch) :])  # noqa: E731
    kl_coef = jnp.broadcast_to(jnp.asarray(kl_coef, rm_rewards.dtype), batch)
    out = _trajectories(
        jax.tree.map(flat, init_logits),
        flat(rm_rewards),
        flat(eval_rewards),
        flat(kl_coef),
        ts,
        policy=policy,
        solver=_default_solver() if solver is None else solver,
        rtol=float(rtol),
        atol=float(atol),
        max_steps=max_steps,
    )
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(len(ts), *batch, x.shape[-1]), out)


@jax.jit(static_argnames=("policy", "solver", "rtol", "atol", "max_steps"))
def _trajectories(logits, rm_rewards, eval_rewards, kl_coef, ts, *, policy, solver, rtol, atol, max_steps):
    def one(logits0, rm, ev, lam):
        ref_log_probs = policy.log_probs(logits0)

        def field(t, logits, args):
            return objective_grad(policy, logits, rm, ref_log_probs, kl_coef=lam)

        def save(t, logits, args):
            return flow_metrics(policy, logits, rm, ev, ref_log_probs)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            ts[-1],
            None,
            logits0,
            saveat=diffrax.SaveAt(ts=ts, fn=save),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
        )
        return sol.ys

    return jax.vmap(one)(logits, rm_rewards, eval_rewards, kl_coef)


def exact_gradient_ascent(
    init_logits,
    rm_rewards,
    *,
    optimizer,
    num_steps,
    policy=None,
    kl_coef=0.0,
    eval_rewards=None,
    track=True,
):
    """Discrete ascent on the exact objective gradient with an optax optimizer, under ``lax.scan``.

    ``theta_{n+1} = theta_n + update(grad phi(theta_n))``; with ``optax.sgd(lr)`` the step is
    ``lr * grad phi`` and ``theta_n`` approaches the gradient flow at ``t = lr * n`` as
    ``lr -> 0``. Leading batch axes of ``rm_rewards`` are independent problems. The optimizer
    and ``num_steps`` are static: reuse one optimizer object to reuse the compiled program.

    Returns:
      ``(final_logits, metrics)``; ``metrics`` is :class:`FlowMetrics` with a leading axis of
      ``num_steps + 1`` entries (before each step and after the last), or None when
      ``track=False``.

    >>> import jax.numpy as jnp, optax
    >>> final, m = exact_gradient_ascent(jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]),
    ...                                  optimizer=optax.sgd(0.1), num_steps=3)
    >>> m.rm_reward.shape, bool(m.rm_reward[-1, 0] > m.rm_reward[0, 0])
    ((4, 1), True)
    """
    policy = TabularPolicy() if policy is None else policy
    rm_rewards, eval_rewards = validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef)
    if not (isinstance(num_steps, int) and num_steps >= 0):
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
    kl_coef = jnp.asarray(kl_coef, rm_rewards.dtype)
    return gradient_ascent(
        init_logits,
        rm_rewards,
        eval_rewards,
        kl_coef,
        jax.random.key(0),
        policy=policy,
        optimizer=optimizer,
        num_steps=num_steps,
        track=track,
        gradient=_exact_gradient,
    )


def _exact_gradient(policy, logits, rm_rewards, ref_log_probs, kl_coef, key):
    del key
    return objective_grad(policy, logits, rm_rewards, ref_log_probs, kl_coef=kl_coef)


@jax.jit(static_argnames=("policy", "optimizer", "num_steps", "track", "gradient"))
def gradient_ascent(logits, rm_rewards, eval_rewards, kl_coef, key, *, policy, optimizer, num_steps, track, gradient):
    """The ascent loop shared by exact and sampled gradients (see :func:`exact_gradient_ascent`).

    ``gradient(policy, logits, rm_rewards, ref_log_probs, kl_coef, key)`` returns the gradient
    (or an estimate of it) of the objective; step ``n`` passes it ``fold_in(key, n)``. Inputs are
    validated by the public callers.
    """
    ref_log_probs = policy.log_probs(logits)
    lam = kl_coef[..., None, None] if kl_coef.ndim else kl_coef

    def measure(logits):
        return flow_metrics(policy, logits, rm_rewards, eval_rewards, ref_log_probs) if track else None

    def step(carry, index):
        logits, opt_state = carry
        grads = gradient(policy, logits, rm_rewards, ref_log_probs, lam, jax.random.fold_in(key, index))
        ascent = jax.tree.map(jnp.negative, grads)  # optax minimizes
        updates, opt_state = optimizer.update(ascent, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), measure(logits)

    (logits, _), history = jax.lax.scan(step, (logits, optimizer.init(logits)), jnp.arange(num_steps))
    if track:
        history = jax.tree.map(lambda h, last: jnp.concatenate([h, last[None]]), history, measure(logits))
    return logits, history
