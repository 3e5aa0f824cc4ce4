"""Exact dynamics of tabular policies: the gradient flow, ``t_gamma``, trajectories.

The gradient flow of docs/theory.md#setting (Eq. 4), ``d theta/dt = grad phi(theta)``, ``theta(0) = theta_ref``,
is integrated with adaptive Dormand-Prince 5(4) steps. ``t_gamma`` (the first time the expected
``eval_rewards`` gain ``gamma`` over the initial policy) is located on the dense output of the
step in which the gain is reached, so it is exact up to the solver tolerance. :func:`first_passage`
runs its own batched stepper (:mod:`jaxrm._dopri5`: diffrax's ``Dopri5`` method with Hairer's
PI step-size rule, which rejects fewer steps than diffrax's default controller, at about 40% of
diffrax's cost per step on this problem); :func:`trajectory` uses diffrax.

Every policy of :mod:`jaxrm.tabular` is *separable*: prompt ``x`` only moves its own
parameters, at speed ``1/|S|`` (Lemma 7 for the tabular ones). So each prompt is an independent ODE in the rescaled time
``tau = t / |S|``, and ``t_gamma(x) = |S| tau_gamma(x)``. :func:`first_passage` solves all
(problem, prompt) pairs of a batch as independent items on a work queue: a fixed number of
slots each integrate one item for a short segment of steps, and finished slots take the next
item, so a batch costs about the *sum* of the items' step counts, not ``batch x max`` (the
scheduler is :mod:`jaxrm._queue`). Discrete ascent (exact or sampled gradients) lives in
:mod:`jaxrm.ascent`.

With ``kl_coef = lam > 0``, ``phi_x(pi) = lam log Z - lam KL(pi || pi*)`` for every policy, with
``pi* = pi_ref exp(r / lam) / Z`` (the flow's limit for classes that can represent it, such as
the tabular ones; log-linear and shared-parameter policies generally cannot). ``phi_x`` only grows
along the flow, so every later policy
stays in the ball ``KL(pi || pi*) <= KL(pi(t) || pi*) =: delta``. By Pinsker, its expected eval
reward is within ``(max r_eval - min r_eval) / 2 * sqrt(2 delta)`` of ``E_{pi*}[r_eval]``; once
that bound rules the gain out, the solve stops with ``NOT_REACHED`` instead of integrating a
stiff approach to ``pi*`` until ``t_max``. That machinery is compiled in only when a
``kl_coef`` is given (``kl_coef=None``, the default, is the flow without a KL term), so the
choice never depends on the coefficient's values or on whether it is a Python number or an array.

For the :class:`~jaxrm.tabular.TabularPolicy`, every field evaluation exponentiates each row of
logits minus the row's *initial* maximum rather than its current one, which saves a reduction
per evaluation (13% of a ``t_gamma`` run at ``|Y| = 64`` on one CPU device). This is safe
because the gradient of a softmax sums to zero over its row, so a row's mean logit never
changes along the flow and its maximum never falls below it; an exponential could overflow only
if a logit grew by about 700 from its row's initial maximum, and a whole row underflow only if
its initial logits spanned more than about 700. A non-finite field would make the stepper
reject the step, never accept a wrong one.
"""

from __future__ import annotations

import collections.abc
import functools
import math
from typing import Any, NamedTuple, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxrm import _dopri5, _queue, metrics
from jaxrm._checks import check_finite, check_int, is_concrete
from jaxrm._queue import Status
from jaxrm.tabular import (
    ExactPolicy,
    Logits,
    LogLinearPolicy,
    SharedAutoregressivePolicy,
    TabularPolicy,
    objective_grad,
    prompt_gradient,
)

__all__ = [
    "FirstPassage",
    "FlowMetrics",
    "Status",
    "first_passage",
    "flow_metrics",
    "t_gamma",
    "trajectory",
]


class FlowMetrics(NamedTuple):
    """Per-prompt quantities along a trajectory (each ``[..., S]``, time axis first).

    Attributes:
      rm_reward: ``E_pi[r_RM]``, the expected reward the policy is trained on.
      eval_reward: ``E_pi[r_eval]``, the expected timed or evaluated reward (e.g. the ground
        truth; ``r_RM`` itself when none is given).
      rm_variance: ``Var_pi[r_RM]``, the exact reward variance under the current policy
        (docs/theory.md#accuracy-and-reward-variance).
      kl: ``KL(pi || pi_ref)`` to the reference (initial) policy, >= 0.
    """

    rm_reward: Any
    eval_reward: Any
    rm_variance: Any
    kl: Any


class FirstPassage(NamedTuple):
    """Result of :func:`first_passage`; arrays are ``[..., S]`` (one entry per prompt).

    Attributes:
      t_gamma: the first flow time at which ``E_pi[r_eval] >= E_pi0[r_eval] + gamma``
        (docs/theory.md#setting); ``inf`` unless ``status`` is ``REACHED``.
      logits: each prompt's logits at ``t_gamma`` (or where its solve stopped), shaped like the
        initial logits.
      num_steps: ODE steps taken per prompt (accepted and rejected).
      status: a :class:`Status` per prompt: ``REACHED``, ``NOT_REACHED`` (``t_max`` passed, the
        gain was proven out of reach under a KL penalty, or ``gamma`` is at least
        ``max r_eval - E_pi0[r_eval]``, which a softmax policy only approaches: then ``t_end = 0``
        and no step is taken) or ``FAILED`` (the step size shrank until it no longer moved the
        time, or ``max_steps`` spent).
      t_end: the flow time where each prompt's solve ended: ``t_gamma`` when reached, and
        otherwise a time before which the gain was not reached (a lower bound on ``t_gamma``
        where the solve ``FAILED``).
    """

    t_gamma: Any
    logits: Any
    num_steps: Any
    status: Any
    t_end: Any


def flow_metrics(
    policy: ExactPolicy, logits: Logits, rm_rewards: ArrayLike, eval_rewards: ArrayLike, ref_log_probs: ArrayLike
) -> FlowMetrics:
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


def default_policy(policy, rm_rewards):
    """``policy``, or the tabular policy over the outputs of ``rm_rewards`` when it is None."""
    return TabularPolicy(int(np.shape(rm_rewards)[-1])) if policy is None else policy


# Policies whose parameters are one array (an autoregressive tabular policy's are a tuple of them).
_ONE_ARRAY_POLICIES = (TabularPolicy, LogLinearPolicy, SharedAutoregressivePolicy)


def validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef):
    """Check a tabular problem before any work; returns ``(init_logits, rm_rewards, eval_rewards,
    kl_coef)``, all in the rewards' floating dtype (integer rewards are cast to the default float
    dtype), with ``kl_coef`` None or one coefficient per prompt, ``[..., S]``
    (:func:`kl_per_prompt`)."""
    rm_rewards = jnp.asarray(rm_rewards)
    if not jnp.issubdtype(rm_rewards.dtype, jnp.floating):
        rm_rewards = rm_rewards.astype(jnp.result_type(float))
    if isinstance(policy, _ONE_ARRAY_POLICIES) and isinstance(init_logits, (list, tuple)):
        init_logits = np.asarray(init_logits)  # nested lists of numbers, not a pytree of scalars
    # One dtype for the whole problem (the rewards'): a float32 state against float64 rewards
    # would change type inside the solver's loop.
    init_logits = jax.tree.map(lambda x: jnp.asarray(x, rm_rewards.dtype), init_logits)
    if rm_rewards.ndim < 2:
        raise ValueError(f"rewards must be shaped [..., prompts, outputs], got {rm_rewards.shape}.")
    log_probs = _log_probs_shape(policy, *_abstract(init_logits))
    if log_probs != rm_rewards.shape:
        raise ValueError(f"the policy's outputs {log_probs} do not match rm_rewards {rm_rewards.shape}.")
    if eval_rewards is not None and jnp.shape(eval_rewards) != rm_rewards.shape:
        raise ValueError(f"eval_rewards {jnp.shape(eval_rewards)} must match rm_rewards {rm_rewards.shape}.")
    if eval_rewards is not None:
        eval_rewards = jnp.asarray(eval_rewards, rm_rewards.dtype)
    check_finite("rm_rewards", rm_rewards)
    check_finite("eval_rewards", eval_rewards)
    for leaf in jax.tree.leaves(init_logits):
        check_finite("init_logits", leaf)
    if kl_coef is not None:
        kl_coef = kl_per_prompt(kl_coef, rm_rewards.shape[:-1], rm_rewards.dtype)
    return init_logits, rm_rewards, (rm_rewards if eval_rewards is None else eval_rewards), kl_coef


def kl_per_prompt(kl_coef, item_shape, dtype) -> jax.Array:
    """``kl_coef`` as one coefficient per prompt, ``item_shape = [..., S]``, or ``ValueError``.

    By rank, so that no shape means two things: an array of rank at most that of the batch
    shape ``[...]`` holds one coefficient per problem (broadcast against ``[...]`` as numpy
    broadcasts); one axis more, with a last axis of ``S`` (or 1), holds one per prompt. Each
    must be finite and ``>= 0`` (checked where it is concrete).
    """
    lam = jnp.asarray(kl_coef, dtype)
    batch = tuple(item_shape[:-1])
    try:
        if lam.ndim <= len(batch):
            lam = jnp.broadcast_to(lam, batch)[..., None]
        elif lam.ndim > len(batch) + 1 or lam.shape[-1] not in (1, item_shape[-1]):
            raise ValueError
        lam = jnp.broadcast_to(lam, item_shape)
    except ValueError:
        raise ValueError(
            f"kl_coef {list(lam.shape)} fits neither the batch shape {list(batch)} (one per problem) nor "
            f"{list(item_shape)} (one per prompt)."
        ) from None
    if is_concrete(lam) and not np.all(np.isfinite(np.asarray(lam)) & (np.asarray(lam) >= 0)):
        raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}.")
    return lam


def check_gamma(gamma, item_shape) -> None:
    """``gamma`` must broadcast to ``[..., S]`` and, where concrete, be > 0."""
    try:
        fits = np.broadcast_shapes(np.shape(gamma), tuple(item_shape)) == tuple(item_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"gamma {list(np.shape(gamma))} must broadcast to [..., S] = {list(item_shape)}.")
    if is_concrete(gamma) and not np.all(np.asarray(gamma) > 0):
        raise ValueError(f"gamma must be > 0 (and not NaN); got {np.asarray(gamma).ravel()[:4]}.")


def _tolerances(rtol, atol, dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of a solve in ``dtype``: the given ones, checked, or by default
    ``max(1e-8, 100 eps)`` and ``max(1e-10, eps)``: 1e-8 and 1e-10 in float64, about 1.2e-5 and
    1.2e-7 in float32. An ``rtol`` below ``10 eps`` is refused: the step-size controller cannot
    see past rounding there, rejects step after step, and an item runs to ``max_steps``.
    """
    eps = float(jnp.finfo(dtype).eps)
    rtol = max(1e-8, 100 * eps) if rtol is None else rtol
    atol = max(1e-10, eps) if atol is None else atol
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (0 < value < np.inf):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    if rtol < 10 * eps:
        raise ValueError(
            f"rtol={rtol!r} is below what {jnp.dtype(dtype).name} resolves (10 eps = {10 * eps:.2g}): pass a larger "
            "rtol, or float64 rewards (jax_enable_x64)."
        )
    return float(rtol), float(atol)


def _abstract(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


@functools.lru_cache(maxsize=256)
def _log_probs_shape(policy, treedef, leaves):
    """The shape of ``policy.log_probs`` on parameters of these shapes (traced once per signature:
    tracing costs about a millisecond, a sizeable part of a small first_passage call)."""
    params = treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
    return jax.eval_shape(policy.log_probs, params).shape


def first_passage(
    init_logits: Logits,
    rm_rewards: ArrayLike,
    gamma: ArrayLike,
    *,
    policy: ExactPolicy | None = None,
    kl_coef: ArrayLike | None = None,
    eval_rewards: ArrayLike | None = None,
    t_max: float = 1e9,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
    slots: int | None = None,
    segment_steps: int = 4,
    devices: Sequence[jax.Device] | None = None,
) -> FirstPassage:
    """Integrate the gradient flow of each prompt until its ``eval_rewards`` gain reaches ``gamma``.

    ``t_gamma(x) = inf { t : E_{pi(t)}[r_eval(x, .)] >= E_{pi(0)}[r_eval(x, .)] + gamma }``
    under ``d theta/dt = grad phi(theta)`` with ``phi`` the objective of ``rm_rewards`` and KL
    coefficient ``kl_coef`` against the initial policy (docs/theory.md#setting). ``+inf`` if not
    reached by ``t_max``.

    Args:
      init_logits: initial policy parameters, prompt axis leading (``[..., S, Y]`` for the
        default tabular policy); any leading axes are a batch of independent problems.
      rm_rewards: ``[..., S, Y]`` rewards the policy is trained on.
      gamma: gain to reach; broadcasts to ``[..., S]``; must be > 0.
      policy: an :class:`~jaxrm.tabular.ExactPolicy` (default: the tabular policy over the
        outputs of ``rm_rewards``).
      kl_coef: None (default: no KL term), or finite ``lam >= 0``: of rank at most that of the
        batch shape ``[...]``, one per problem (broadcast as numpy does); one axis more, ending
        in ``S``, one per prompt (:func:`kl_per_prompt`). Any given value, even 0, compiles in
        the KL term and the out-of-reach stop of the module docstring.
      eval_rewards: ``[..., S, Y]`` reward whose gain is timed (default ``rm_rewards``).
      t_max: give up (``inf``) after this much time.
      rtol, atol: tolerances of the adaptive step-size controller; by default 1e-8 and 1e-10
        for float64 rewards, about 1.2e-5 and 1.2e-7 for float32 (``max(1e-8, 100 eps)`` and
        ``max(1e-10, eps)``); an ``rtol`` below ``10 eps`` of the dtype is refused.
      max_steps: most ODE steps (accepted and rejected) per prompt before the item counts
        as FAILED. The budget is checked between segments of ``segment_steps`` steps, so an
        item may take up to ``max_steps + segment_steps - 1`` steps.
      slots: items integrated side by side on each device (default: up to 32). The
        number of items per device is padded so that batches of nearby sizes run one compiled
        program (:func:`jaxrm._queue.bucket`): to ``slots`` times a power of two, where the
        padding is never integrated; fewer than ``slots`` items to ``2^k`` or ``3 x 2^k``, where
        the padding sits in idle slots that compute alongside (at most 1.5x the work). Each item
        keeps two arrays the size of its logits (its last point and the field there) until the
        end, for locating its crossing.
      segment_steps: steps between refills of the work queue.
      devices: distinct devices to share the items (default: the default device), each
        draining its own work queue at the same time under one compiled program (``shard_map``
        over a one-axis mesh); on a CPU, ``--xla_force_host_platform_device_count=<cores>``
        gives one device per core. The results are on the first of them. Ignored under
        ``jit``/``vmap``.

    Returns:
      :class:`FirstPassage` with ``[..., S]`` arrays.
    """
    policy = default_policy(policy, rm_rewards)
    separate_eval = eval_rewards is not None
    init_logits, rm_rewards, eval_rewards, kl_coef = validate_problem(
        policy, init_logits, rm_rewards, eval_rewards, kl_coef
    )
    check_gamma(gamma, rm_rewards.shape[:-1])
    if is_concrete(t_max) and not float(t_max) > 0:
        raise ValueError(f"t_max must be > 0, got {t_max}.")
    rtol, atol = _tolerances(rtol, atol, rm_rewards.dtype)
    for name, value in (("max_steps", max_steps), ("segment_steps", segment_steps), ("slots", slots)):
        if not (value is None and name == "slots"):
            check_int(name, value, low=1)
    if devices is not None and not (
        isinstance(devices, collections.abc.Sequence) and devices and all(isinstance(d, jax.Device) for d in devices)
    ):
        raise ValueError(f"devices must be a non-empty sequence of jax devices (e.g. jax.devices()), got {devices!r}.")
    dtype = rm_rewards.dtype
    item_shape = rm_rewards.shape[:-1]  # [..., S]: one item per (problem, prompt)
    if math.prod(item_shape) == 0:
        raise ValueError(f"rm_rewards {rm_rewards.shape} holds no (problem, prompt) pair to integrate.")
    kl_penalized = kl_coef is not None
    tau_max = jnp.asarray(t_max, dtype) / item_shape[-1]
    traced = any(
        not is_concrete(x) for x in jax.tree.leaves((init_logits, rm_rewards, eval_rewards, gamma, kl_coef, tau_max))
    )
    mesh = None if devices is None or traced else _items_mesh(tuple(devices))
    num_items = math.prod(item_shape)
    num_devices = 1 if mesh is None else mesh.size
    width, per_device = _queue.bucket(-(-num_items // num_devices), _queue.DEFAULT_SLOTS if slots is None else slots)
    items = _prepare_items(
        init_logits,
        rm_rewards,
        eval_rewards,
        gamma,
        kl_coef if kl_penalized else 0.0,
        policy=policy,
        separate_eval=separate_eval,
        num_padded=per_device * num_devices,
    )
    options = dict(
        policy=policy,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        slots=width,
        segment_steps=int(segment_steps),
        kl_penalized=kl_penalized,
    )
    if mesh is None:
        out = _solve_items(*items, num_items, tau_max, **options)
    else:
        # The results come back to one device, as a single device's would be.
        out = jax.device_put(_solve_on_mesh(*items, num_items, tau_max, mesh=mesh, **options), devices[0])
    return _first_passage_result(out, item_shape=item_shape)


@jax.jit(static_argnames="item_shape")
def _first_passage_result(out, *, item_shape):
    """Items (less the padding) back to ``[..., S]`` and rescaled time back to flow time (``t = |S| tau``)."""
    out = jax.tree.map(lambda x: x[: math.prod(item_shape)], out)
    unflat = lambda x: x.reshape(*item_shape, *x.shape[1:])  # noqa: E731
    t_end = out.tau * item_shape[-1]
    return FirstPassage(
        unflat(jnp.where(out.status == Status.REACHED, t_end, jnp.inf)),
        jax.tree.map(unflat, out.outcome),
        unflat(out.steps),
        unflat(out.status),
        unflat(t_end),
    )


@jax.jit(static_argnames=("policy", "separate_eval", "num_padded"))
def _prepare_items(init_logits, rm_rewards, eval_rewards, gamma, kl_coef, *, policy, separate_eval, num_padded):
    """Flatten ``[..., S]`` into independent items with everything their flow needs, padded to
    ``num_padded`` items with copies of the first (never integrated). Without ``separate_eval``
    the timed reward is ``rm_rewards`` itself, and the items carry it once."""
    item_shape = rm_rewards.shape[:-1]
    dtype = rm_rewards.dtype
    gamma = jnp.broadcast_to(jnp.asarray(gamma, dtype), item_shape)
    kl_coef = jnp.broadcast_to(jnp.asarray(kl_coef, dtype), item_shape)  # per prompt (kl_per_prompt) or 0
    ref_log_probs = policy.log_probs(init_logits)
    shift = jnp.max(init_logits, axis=-1, keepdims=True) if isinstance(policy, TabularPolicy) else None
    start = metrics.expected_reward(ref_log_probs, eval_rewards)
    limit = _kl_limit(ref_log_probs, rm_rewards, eval_rewards, kl_coef)
    # Every policy class here puts mass on every output, so E_pi[r_eval] < max r_eval: a gain up
    # to the maximum is approached, never reached (in floating point the condition would turn
    # true once the top probability rounds to 1, at some arbitrary time).
    attainable = start + gamma < jnp.max(eval_rewards, axis=-1)

    def flat(x):
        x = x.reshape(math.prod(item_shape), *x.shape[len(item_shape) :])
        return jnp.concatenate([x, jnp.repeat(x[:1], num_padded - x.shape[0], axis=0)])

    return (
        jax.tree.map(flat, init_logits),
        _ItemArgs(
            flat(rm_rewards),
            flat(ref_log_probs),
            flat(kl_coef),
            flat(eval_rewards) if separate_eval else None,
            (flat(start), flat(gamma)),
            jax.tree.map(flat, limit),
            None if shift is None else flat(shift),
            flat(attainable),
        ),
    )


def t_gamma(init_logits: Logits, rm_rewards: ArrayLike, gamma: ArrayLike, **options) -> jax.Array:
    """``t_gamma`` per prompt, ``[..., S]`` (``inf`` where not reached by ``t_max``).

    The first time the expected ``eval_rewards`` (default ``rm_rewards``) under the
    gradient-flow policy exceeds its initial value by ``gamma``. Keyword options as in
    :func:`first_passage`: ``policy``, ``kl_coef``, ``eval_rewards``, ``t_max``, ``rtol``,
    ``atol``, ``max_steps``, ``slots``, ``segment_steps``, ``devices``.

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
    eval_rewards: Any  # None: the timed reward is rm_rewards
    gain: Any  # (start, gamma)
    limit: _KLLimit
    shift: Any  # TabularPolicy: the initial logits' row maximum (module docstring); else None
    attainable: Any  # the gain is below max r_eval - E_pi0[r_eval]: else NOT_REACHED at once


class _Event(NamedTuple):
    """The step in which an item's gain was reached: its size and the gain at its end.

    ``locate`` takes the step again from the item's last point (six field evaluations, once per
    item) rather than every attempted step carrying its end, slope and midpoint for the one step
    that will need them (about 3-5% of the run time)."""

    h: Any
    gain1: Any


class _Point(NamedTuple):
    """An item's state on the work queue: where it is, and what the next step reuses."""

    y: Any  # the logits
    f: Any  # the field at y: the next step's first stage
    gain: Any  # the gain condition at y, < 0 while running
    controller: _dopri5.Controller  # what the step-size rule remembers


class _Outcome(NamedTuple):
    """A finished item: its last point and, if it reached the gain, the step that did."""

    point: _Point
    event: _Event


class _Carry(NamedTuple):
    """One item inside a segment: its last accepted point and the next step size."""

    tau: Any
    point: _Point
    dt: Any
    steps: Any
    status: Any
    event: _Event


def _item_flow(policy, rtol, atol, tau_max, segment_steps, kl_penalized):
    """``(start, segment, locate)`` for one item: its first :class:`_Point` and step size at
    given logits; its integration for at most ``segment_steps`` attempted steps, resumable; and
    where a finished item ended.

    Dormand-Prince 5(4) (:mod:`jaxrm._dopri5`). After an accepted step the gain condition
    ``(E_pi[r_eval] - start) / gamma - 1`` is evaluated from the probabilities the field computed
    anyway at the step's end; the item stops at the start of the step where it turns >= 0 and
    keeps that step's size (its :class:`_Outcome`). ``locate`` takes the step again and finds the
    crossing on its dense output after the whole queue has run, in chunks of items, rather than
    inside the step loop (where every slot would pay for the search, and each copy of the loop
    compile it). Under a KL penalty, an accepted step after which the gain is provably out of
    reach (the module docstring) ends the item as NOT_REACHED.
    """
    dtype = jnp.result_type(tau_max)
    # The crossing time is located to this relative tolerance (well inside the solver's).
    time_tol = max(rtol * 1e-2, 100 * float(jnp.finfo(dtype).eps))

    def log_probs_and_probs(y, args):
        if args.shift is None:
            return policy.log_probs_and_probs(y)
        return policy.log_probs_and_probs(y, shift=args.shift)

    def field(y, args):
        # The gradient computes these probabilities too; XLA evaluates them once.
        kl_coef = args.kl_coef if kl_penalized else 0.0
        grad = prompt_gradient(policy, y, args.rm_rewards, args.ref_log_probs, kl_coef=kl_coef, shift=args.shift)
        return grad, log_probs_and_probs(y, args)

    def gain(probs, args):
        start, gamma = args.gain
        # In units of gamma, so the root finder's tolerance is relative to the gain asked for.
        timed = args.rm_rewards if args.eval_rewards is None else args.eval_rewards
        return (jnp.sum(probs * timed, axis=-1) - start) / gamma - 1.0

    def out_of_reach(log_probs, args):
        start, gamma = args.gain
        distance = metrics.kl(log_probs, args.limit.log_probs)
        best = args.limit.eval_reward + args.limit.eval_half_range * jnp.sqrt(2.0 * distance)
        return (args.kl_coef > 0) & (best < start + gamma)

    def select(mask, new, old):
        return jax.tree.map(lambda a, b: jnp.where(mask, a, b), new, old)

    def start(y, args):
        """An item's first point and first step size."""
        f, (_, probs) = field(y, args)
        dt = _dopri5.initial_step_size(lambda x: field(x, args), y, f, rtol=rtol, atol=atol)
        return _Point(y, f, gain(probs, args), _dopri5.Controller.first(dtype)), dt

    def segment(tau0, point, dt0, args, active):
        carry = _Carry(
            tau0,
            point,
            dt0,
            jnp.zeros((), jnp.int32),
            # An idle slot (no item left), or an item whose gain no policy attains, takes no step
            # and searches nothing.
            jnp.where(active & args.attainable, Status.RUNNING, Status.NOT_REACHED).astype(jnp.int32),
            _Event(jnp.zeros((), dtype), jnp.zeros((), dtype)),
        )

        def attempt(_, c):
            running = c.status == Status.RUNNING
            last = c.dt >= tau_max - c.tau  # this step ends at tau_max
            h = jnp.where(last, tau_max - c.tau, c.dt)
            step = _dopri5.step(lambda y: field(y, args), c.point.y, c.point.f, h, rtol=rtol, atol=atol)
            log_probs1, probs1 = step.aux1
            accepted = running & (step.error < 1)
            gain1 = gain(probs1, args)
            hit = accepted & (gain1 >= 0)
            moved = accepted & ~hit
            stopped = moved & (last | (out_of_reach(log_probs1, args) if kl_penalized else False))
            dt, controller = _dopri5.next_step_size(h, step.error, accepted, c.point.controller)
            stuck = running & ~accepted & ~(c.tau + dt > c.tau)  # the step no longer moves time
            status = jnp.where(
                hit, Status.REACHED, jnp.where(stopped, Status.NOT_REACHED, jnp.where(stuck, Status.FAILED, c.status))
            )
            return _Carry(
                tau=jnp.where(moved, jnp.where(last, tau_max, c.tau + h), c.tau),
                point=select(
                    moved,
                    _Point(step.y1, step.f1, gain1, controller),
                    c.point._replace(controller=select(running, controller, c.point.controller)),
                ),
                dt=jnp.where(running, dt, c.dt),
                steps=c.steps + running,
                status=status,
                event=select(hit, _Event(h, gain1), c.event),
            )

        c = jax.lax.fori_loop(0, segment_steps, attempt, carry)
        # A reached item stopped at the start of the step that crosses: that point and the step
        # are all `locate` needs, so the point doubles as the item's outcome.
        return _queue.Segment(c.tau, c.point, c.dt, c.steps, c.status, _Outcome(c.point, c.event))

    def locate(tau, outcome, status, args):
        """Where a finished item ended: ``(tau, logits)``, for a reached item at the crossing,
        located on the dense output of the step that contains it (taken again from the same
        point with the same step size)."""
        reached = status == Status.REACHED
        point, event = outcome
        step = _dopri5.step(lambda y: field(y, args), point.y, point.f, event.h, rtol=rtol, atol=atol)
        interpolant = _dopri5.Interpolant.of_step(point.y, point.f, step.y1, step.f1, step.y_mid, event.h)
        safe_h = jnp.where(reached, event.h, 1.0)
        theta = _dopri5.locate_upcrossing(
            lambda theta: gain(log_probs_and_probs(interpolant(theta), args)[1], args),
            point.gain,
            event.gain1,
            tol=jnp.where(reached, time_tol * (tau + safe_h) / safe_h, jnp.inf),
        )
        return jnp.where(reached, tau + theta * event.h, tau), select(reached, interpolant(theta), point.y)

    return start, segment, locate


@jax.jit(static_argnames=("policy", "rtol", "atol", "max_steps", "slots", "segment_steps", "kl_penalized"))
def _solve_items(
    logits,
    args,
    num_valid,
    tau_max,
    *,
    policy,
    rtol,
    atol,
    max_steps,
    slots,
    segment_steps,
    kl_penalized,
):
    """One device's items on a work queue (:func:`jaxrm._queue.drain`) of ``slots`` solves."""
    start, segment, locate = _item_flow(policy, rtol, atol, tau_max, segment_steps, kl_penalized)
    points, first_dt = jax.vmap(start)(logits, args)
    out = _queue.drain(segment, points, first_dt, args, num_valid, num_slots=slots, max_steps=max_steps)
    # The searches run a chunk of `slots` items at a time: a chunk's search takes as many
    # iterations as its slowest item needs, and its arrays stay in cache.
    tau, logits = jax.lax.map(lambda a: locate(*a), (out.tau, out.outcome, out.status, args), batch_size=slots)
    return out._replace(tau=tau, outcome=logits)


@functools.lru_cache(maxsize=16)
def _items_mesh(devices: tuple) -> jax.sharding.Mesh:
    """A one-axis mesh of the devices that share a batch's items (built here rather than with
    :func:`jaxrm.sharding.make_mesh`, whose module loads flax, which the exact side never needs)."""
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct and at least one, got {devices}.")
    return jax.sharding.Mesh(np.asarray(devices), ("items",))


@jax.jit(static_argnames=("mesh", "policy", "rtol", "atol", "max_steps", "slots", "segment_steps", "kl_penalized"))
def _solve_on_mesh(logits, args, num_items, tau_max, *, mesh, **options):
    """Items dealt round-robin to the mesh's devices (item ``i`` to device ``i % D``, so that
    costly neighbours spread out), each device draining its own work queue. One program for all
    devices; its loops involve no collective, so each device's queue stops on its own."""
    num_devices = mesh.size

    def deal(x):  # item i to device i % D, as a contiguous block per device
        return x.reshape(-1, num_devices, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    def collect(x):
        return x.reshape(num_devices, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    def solve(logits, args):
        device = jax.lax.axis_index("items")
        num_valid = (num_items - device + num_devices - 1) // num_devices  # items i < N with i % D == device
        return _solve_items(logits, args, num_valid, tau_max, **options)

    spec = jax.sharding.PartitionSpec("items")
    out = jax.shard_map(solve, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(
        *jax.tree.map(deal, (logits, args))
    )
    return jax.tree.map(collect, out)


def trajectory(
    init_logits: Logits,
    rm_rewards: ArrayLike,
    ts: ArrayLike,
    *,
    policy: ExactPolicy | None = None,
    kl_coef: ArrayLike | None = None,
    eval_rewards: ArrayLike | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    solver: diffrax.AbstractSolver | None = None,
    max_steps: int = 100_000,
) -> FlowMetrics:
    """:class:`FlowMetrics` of the gradient flow at times ``ts`` (each ``[T, ..., S]``).

    Integrates the coupled system ``d theta/dt = grad phi(theta)`` (with its ``1/|S|``) for each
    problem of the leading batch, saving only the metrics. ``ts`` must be non-empty, finite,
    non-decreasing and >= 0. ``kl_coef``: None (no KL term) or finite ``lam >= 0``, one per
    problem or per prompt as in :func:`first_passage`. ``rtol``, ``atol``: as in
    :func:`first_passage`. ``solver``: a diffrax solver (default ``Dopri5``); ``max_steps``: most
    solver steps per problem (more raises an error).
    """
    policy = default_policy(policy, rm_rewards)
    init_logits, rm_rewards, eval_rewards, kl_coef = validate_problem(
        policy, init_logits, rm_rewards, eval_rewards, kl_coef
    )
    rtol, atol = _tolerances(rtol, atol, rm_rewards.dtype)
    check_int("max_steps", max_steps, low=1)
    ts = jnp.asarray(ts, rm_rewards.dtype)
    if ts.ndim != 1 or ts.shape[0] == 0:
        raise ValueError(f"ts must be a non-empty 1-d array of times, got shape {ts.shape}.")
    if is_concrete(ts) and not (
        np.all(np.isfinite(np.asarray(ts))) and np.all(np.diff(np.asarray(ts)) >= 0) and np.all(np.asarray(ts) >= 0)
    ):
        raise ValueError(f"ts must be finite, non-negative and non-decreasing, got {np.asarray(ts)[:6]}.")
    batch = rm_rewards.shape[:-2]
    size = math.prod(batch)
    flat = lambda x: x.reshape(size, *x.shape[len(batch) :])  # noqa: E731
    kl_coef = jnp.zeros(rm_rewards.shape[:-1], rm_rewards.dtype) if kl_coef is None else kl_coef
    out = _trajectories(
        jax.tree.map(flat, init_logits),
        flat(rm_rewards),
        flat(eval_rewards),
        flat(kl_coef),
        ts,
        policy=policy,
        solver=_default_solver() if solver is None else solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(len(ts), *batch, x.shape[-1]), out)


@jax.jit(static_argnames=("policy", "solver", "rtol", "atol", "max_steps"))
def _trajectories(logits, rm_rewards, eval_rewards, kl_coef, ts, *, policy, solver, rtol, atol, max_steps):
    def one(logits0, rm, ev, lam):
        ref_log_probs = policy.log_probs(logits0)

        def field(t, logits, args):
            return objective_grad(policy, logits, rm, ref_log_probs, kl_coef=lam[..., None])

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
