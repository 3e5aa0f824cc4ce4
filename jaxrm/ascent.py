"""Discrete ascent on exact policies: the exact gradient, or a sampled estimate of it.

``theta_{n+1} = theta_n + update(g_n)`` with an optax optimizer under ``lax.scan``, where ``g_n``
is either the exact gradient of the RLHF objective (:func:`exact_gradient_ascent`; with
``optax.sgd(lr)`` it approaches the gradient flow of :mod:`jaxrm.flow` at ``t = lr n`` as
``lr -> 0``) or an estimate from ``k`` outputs sampled per prompt with the kernels of the
transformer trainer (:func:`sampled_gradient_ascent`, :class:`SampledGradient`), so sampled and
exact dynamics can be compared step by step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import ClosedJaxpr, Literal, jaxprs_in_params
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxrm import metrics, pg
from jaxrm._checks import check_choice, check_int, check_key, is_concrete
from jaxrm.flow import FlowMetrics, check_gamma, default_policy, flow_metrics, validate_problem
from jaxrm.tabular import ExactPolicy, TabularPolicy, objective_grad, tabular_gradient_and_normalizer

__all__ = [
    "AscentPassage",
    "SampledGradient",
    "ascent_first_passage",
    "exact_gradient_ascent",
    "sampled_gradient_ascent",
]


class AscentPassage(NamedTuple):
    """First passage of a discrete ascent (:func:`ascent_first_passage`), ``[..., S]`` arrays.

    Attributes:
      steps: updates after which the expected ``eval_rewards`` first rose by ``gamma`` over its
        start (``max_steps`` where it did not). With ``optax.sgd(lr)``, ``lr * steps`` is the
        time to compare with the flow's ``t_gamma``.
      reached: whether the gain was reached within ``max_steps`` (the others are censored).
      tied_share: the mean, over the updates taken (up to the passage), of the exact
        probability that a group of ``k`` samples has all task rewards equal
        (:func:`jaxrm.metrics.tied_group_probability`); RLOO's advantages vanish on such a group
        when ``lam = 0``, or when it repeats one output. 1 for the exact gradient (a "group" of
        one); 0 where no update was taken.
    """

    steps: Any
    reached: Any
    tied_share: Any


@dataclasses.dataclass(frozen=True)
class SampledGradient:
    """A policy-gradient estimate from ``k`` sampled outputs per prompt (hashable: a static jit argument).

    Each call draws ``k`` outputs per prompt from the exact policy, folds the KL into the reward
    (``r - lam (log pi - log pi_ref)`` at the sample, k1), forms advantages with
    :data:`jaxrm.pg.ADVANTAGE_ESTIMATORS` and differentiates the REINFORCE surrogate: the
    arithmetic of :func:`jaxrm.train.rlhf.make_iteration` with one "token" per output.
    ``rloo`` and ``reinforce`` are unbiased estimates of :func:`jaxrm.tabular.objective_grad`;
    ``grpo`` and ``dr_grpo`` subtract a mean that includes the sample itself and are not.

    Attributes:
      k: outputs sampled per prompt and step (>= 2, or >= 1 for ``reinforce``).
      advantage_estimator: a key of :data:`jaxrm.pg.ADVANTAGE_ESTIMATORS`.
    """

    k: int
    advantage_estimator: str = "rloo"

    def __post_init__(self):
        check_choice("advantage_estimator", self.advantage_estimator, pg.ADVANTAGE_ESTIMATORS)
        if (
            isinstance(self.k, bool)
            or not isinstance(self.k, (int, np.integer))
            or self.k < (1 if self.advantage_estimator == "reinforce" else 2)
        ):
            raise ValueError(
                f"k={self.k!r} samples per prompt are too few for advantage_estimator={self.advantage_estimator!r}."
            )

    def __call__(self, policy, logits, rewards, ref_log_probs, kl_coef, key):
        log_probs = policy.log_probs(logits)
        outputs = jax.random.categorical(key, log_probs[..., None, :], shape=(*log_probs.shape[:-1], self.k))

        def sampled(values):
            return jnp.take_along_axis(values, outputs, axis=-1)[..., None]  # [..., prompts, k, 1 "token"]

        mask = jnp.ones(outputs.shape + (1,), bool)
        penalized = pg.kl_penalized_rewards(
            sampled(rewards)[..., 0], sampled(log_probs), sampled(ref_log_probs), mask, kl_coef=kl_coef
        )
        advantages = pg.ADVANTAGE_ESTIMATORS[self.advantage_estimator](penalized)

        # Leading axes before [prompts, k] are independent problems: each problem's surrogate is
        # its own mean over prompts x k, so the sum over problems (not the mean) keeps each
        # problem's gradient unscaled, as the exact gradient is.
        num_problems = math.prod(outputs.shape[:-2])

        def surrogate(theta):
            # The mean over prompts x k of -A log pi: its expected gradient is -objective_grad.
            loss = pg.reinforce_loss(sampled(policy.log_probs(theta)), advantages, mask, aggregation="sequence-sum")
            return num_problems * loss

        return jax.tree.map(jnp.negative, jax.grad(surrogate)(logits))


def _exact_gradient(policy, logits, rm_rewards, ref_log_probs, kl_coef, key):
    del key
    return objective_grad(policy, logits, rm_rewards, ref_log_probs, kl_coef=kl_coef)


def _loop_inputs(gradient, rm_rewards, ref_log_probs, lam):
    """``(rewards, ref_log_probs)`` as a step of ``gradient`` reads them.

    The exact gradient depends on the reference only through ``r + lam log pi_ref``
    (``r_KL = (r + lam log pi_ref) - lam log pi``): folded once before the loop, every step
    reads one ``[S, Y]`` array fewer. A sampled gradient reads both at its samples.
    """
    if gradient is _exact_gradient:
        return rm_rewards + lam * ref_log_probs, 0.0
    return rm_rewards, ref_log_probs


def _checked_problem(
    init_logits, rm_rewards, *, policy, kl_coef, eval_rewards, num_steps, optimizer, key=None, name="num_steps"
):
    """Validate a problem before any work: ``(policy, init_logits, rm_rewards, eval_rewards, kl_coef)``."""
    policy = default_policy(policy, rm_rewards)
    init_logits, rm_rewards, eval_rewards, kl_coef = validate_problem(
        policy, init_logits, rm_rewards, eval_rewards, kl_coef
    )
    check_int(name, num_steps, low=0)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax GradientTransformation (e.g. optax.sgd(0.1)), got {optimizer!r}.")
    if key is not None:
        check_key("key", key)
    # One coefficient per prompt, with an axis for the outputs: [..., S, 1] (0 without a KL term).
    kl_coef = jnp.asarray(0.0, rm_rewards.dtype) if kl_coef is None else kl_coef[..., None]
    return policy, init_logits, rm_rewards, eval_rewards, kl_coef


def _checked_ascent(
    init_logits, rm_rewards, key, *, gradient, policy, kl_coef, eval_rewards, optimizer, num_steps, track
):
    """Validate a problem before any work, then run the compiled ascent loop.

    The exact gradient of a tabular policy carries each row's log-normalizer from step to step
    as the next step's softmax shift (:func:`jaxrm.tabular.tabular_gradient_and_normalizer`),
    which saves a pass over the logits for their maximum. The shift is unsafe only after a step
    that moves a logit by about 60 or more (float32; :func:`_shift_held`); the loop then reports
    it, and the ascent is run again with the maximum. Reading that report waits for the result.
    Under a trace (``jit``, ``vmap``) the report cannot be read, so the maximum is always used.
    """
    policy, init_logits, rm_rewards, eval_rewards, kl_coef = _checked_problem(
        init_logits,
        rm_rewards,
        policy=policy,
        kl_coef=kl_coef,
        eval_rewards=eval_rewards,
        num_steps=num_steps,
        optimizer=optimizer,
        key=key,
    )
    if not isinstance(track, bool):
        raise ValueError(f"track must be True or False, got {track!r}.")
    options = dict(policy=policy, optimizer=optimizer, num_steps=num_steps, track=track, gradient=gradient)
    arguments = (init_logits, rm_rewards, eval_rewards, kl_coef, key)
    carry_shift = (
        gradient is _exact_gradient
        and isinstance(policy, TabularPolicy)
        and all(is_concrete(x) for x in jax.tree.leaves(arguments))
    )
    if carry_shift:
        blocked = None if track else _row_blocked_layout(init_logits, optimizer)
        if blocked is not None:
            logits, shift_held = _row_blocked(
                init_logits,
                rm_rewards,
                kl_coef,
                policy=policy,
                optimizer=optimizer,
                num_steps=num_steps,
                sharding=blocked,
            )
            history = None
        else:
            logits, history, shift_held = _ascent(*arguments, carry_shift=True, **options)
        if bool(jnp.all(shift_held)):
            return logits, history
    return _ascent(*arguments, carry_shift=False, **options)[:2]


def exact_gradient_ascent(
    init_logits,
    rm_rewards: ArrayLike,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    policy: ExactPolicy | None = None,
    kl_coef: ArrayLike | None = None,
    eval_rewards: ArrayLike | None = None,
    track: bool = True,
):
    """Ascent on the exact objective gradient with an optax optimizer, under ``lax.scan``.

    ``theta_{n+1} = theta_n + update(grad phi(theta_n))``; with ``optax.sgd(lr)`` the step is
    ``lr * grad phi`` and ``theta_n`` approaches the gradient flow at ``t = lr * n`` as
    ``lr -> 0``. Leading batch axes of ``rm_rewards`` are independent problems as long as the
    optimizer acts element by element (``sgd``, ``adam``, ...); one that reads the whole gradient,
    such as ``optax.clip_by_global_norm``, couples them. The optimizer and ``num_steps`` are
    static: reuse one optimizer object to reuse the compiled program.
    Called outside a trace with a tabular policy, each step exponentiates the logits minus the
    previous step's log-normalizer rather than their maximum (one pass fewer over the logits),
    and the ascent is rerun with the maximum if a step moved a logit by about 60 or more (the
    call then waits for its result before returning); under ``jit`` or ``vmap`` every step takes
    the maximum. If moreover ``track=False``, the optimizer acts element by element (checked on
    its program, :func:`_acts_elementwise`) and the logits are sharded over several CPU devices
    along their rows, each device runs all the steps on a few rows at a time, so that a block's
    arrays stay in the core's cache (:func:`_row_blocked_ascent`; the same arithmetic row by
    row, up to rounding).

    Args:
      init_logits: initial parameters of ``policy`` (also the KL reference).
      rm_rewards: ``[..., S, Y]`` rewards the policy is trained on.
      optimizer: an optax optimizer (it minimises; the ascent direction is passed negated).
      num_steps: number of updates.
      policy: an :class:`~jaxrm.tabular.ExactPolicy` (default: tabular over ``Y`` outputs).
      kl_coef: finite ``lam >= 0``, one per problem or per prompt as in
        :func:`jaxrm.flow.first_passage`; None for no KL term.
      eval_rewards: ``[..., S, Y]`` reward measured along the way (default ``rm_rewards``).
      track: record :class:`~jaxrm.flow.FlowMetrics` before each step and after the last.

    Returns:
      ``(final_logits, metrics)``; ``metrics`` is :class:`~jaxrm.flow.FlowMetrics` with a
      leading axis of ``num_steps + 1`` entries, or None when ``track=False``.

    >>> import jax.numpy as jnp, optax
    >>> final, m = exact_gradient_ascent(jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]),
    ...                                  optimizer=optax.sgd(0.1), num_steps=3)
    >>> m.rm_reward.shape, bool(m.rm_reward[-1, 0] > m.rm_reward[0, 0])
    ((4, 1), True)
    """
    options = dict(policy=policy, kl_coef=kl_coef, eval_rewards=eval_rewards, optimizer=optimizer, track=track)
    return _checked_ascent(
        init_logits, rm_rewards, jax.random.key(0), gradient=_exact_gradient, num_steps=num_steps, **options
    )


def sampled_gradient_ascent(
    init_logits,
    rm_rewards: ArrayLike,
    key: jax.Array,
    *,
    k: int,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    advantage_estimator: str = "rloo",
    policy: ExactPolicy | None = None,
    kl_coef: ArrayLike | None = None,
    eval_rewards: ArrayLike | None = None,
    track: bool = True,
):
    """:func:`exact_gradient_ascent` with the gradient replaced by a :class:`SampledGradient`.

    Same arguments and return value, plus ``key`` (step ``n`` uses ``fold_in(key, n)``), ``k``
    (outputs per prompt and step) and ``advantage_estimator``. ``jax.vmap`` over keys runs
    several seeds.

    >>> import jax.numpy as jnp, optax
    >>> final, m = sampled_gradient_ascent(jnp.zeros((1, 4)), jnp.array([[0.0, 0.0, 0.0, 1.0]]),
    ...                                    jax.random.key(0), k=64, optimizer=optax.sgd(1.0), num_steps=20)
    >>> bool(m.rm_reward[-1, 0] > m.rm_reward[0, 0] + 0.3)
    True
    """
    options = dict(policy=policy, kl_coef=kl_coef, eval_rewards=eval_rewards, optimizer=optimizer, track=track)
    gradient = SampledGradient(k, advantage_estimator)
    return _checked_ascent(init_logits, rm_rewards, key, gradient=gradient, num_steps=num_steps, **options)


def ascent_first_passage(
    init_logits,
    rm_rewards: ArrayLike,
    gamma: ArrayLike,
    key: jax.Array | None = None,
    *,
    optimizer: optax.GradientTransformation,
    max_steps: int,
    k: int | None = None,
    advantage_estimator: str = "rloo",
    policy: ExactPolicy | None = None,
    kl_coef: ArrayLike | None = None,
    eval_rewards: ArrayLike | None = None,
) -> AscentPassage:
    """Run an ascent until each prompt's expected ``eval_rewards`` has risen by ``gamma``.

    The discrete counterpart of :func:`jaxrm.flow.first_passage`: the ascent of
    :func:`exact_gradient_ascent` (``k=None``) or of :func:`sampled_gradient_ascent` (``k``
    samples per prompt and step, ``key`` required) runs under a ``lax.while_loop`` until every
    prompt of the batch has passed or ``max_steps`` updates are done; nothing is stored per step,
    so thousands of steps on thousands of problems fit in memory. Seeds: repeat the problem along
    a leading batch axis (each problem of a batch draws its own samples) or ``jax.vmap`` over keys.

    Args:
      init_logits, rm_rewards, policy, kl_coef, eval_rewards, optimizer: as in
        :func:`exact_gradient_ascent`.
      gamma: gain to reach, broadcasting to ``[..., S]`` (> 0).
      key: the sampling key (required with ``k``; step ``n`` uses ``fold_in(key, n)``).
      max_steps: most updates (an int >= 0); a prompt not passed by then is censored. It is not
        compiled in: one program serves every budget.
      k, advantage_estimator: the :class:`SampledGradient`; ``k=None`` for the exact gradient
        (then ``advantage_estimator`` must stay at its default).

    Returns:
      :class:`AscentPassage`.

    >>> import jax.numpy as jnp, optax
    >>> out = ascent_first_passage(jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]), 0.25,
    ...                            optimizer=optax.sgd(0.01), max_steps=1000)
    >>> int(out.steps[0]), bool(out.reached[0])  # 0.01 * 244 ~ t_gamma = 2.4319 of the flow
    (244, True)
    """
    policy, init_logits, rm_rewards, eval_rewards, kl_coef = _checked_problem(
        init_logits,
        rm_rewards,
        policy=policy,
        kl_coef=kl_coef,
        eval_rewards=eval_rewards,
        num_steps=max_steps,
        optimizer=optimizer,
        key=key,
        name="max_steps",
    )
    check_gamma(gamma, rm_rewards.shape[:-1])
    if max_steps > np.iinfo(np.int32).max:
        raise ValueError(f"max_steps must fit in int32, got {max_steps}.")
    if k is None:
        if advantage_estimator != "rloo":
            raise ValueError(f"advantage_estimator={advantage_estimator!r} needs k samples per step (k is None).")
        gradient, group_size, key = _exact_gradient, 1, jax.random.key(0) if key is None else key
    else:
        if key is None:
            raise ValueError("ascent_first_passage with k samples per step needs a key.")
        gradient, group_size = SampledGradient(k, advantage_estimator), k
    gamma = jnp.broadcast_to(jnp.asarray(gamma, rm_rewards.dtype), rm_rewards.shape[:-1])
    return _passage(
        init_logits,
        rm_rewards,
        eval_rewards,
        kl_coef,
        gamma,
        key,
        jnp.int32(max_steps),
        policy=policy,
        optimizer=optimizer,
        gradient=gradient,
        group_size=group_size,
    )


def _update(gradient, optimizer, policy, logits, opt_state, loop_inputs, lam, key, shift=None, num_prompts=None):
    """One ascent step: ``gradient`` (exact or sampled), negated for the optax minimizer;
    ``loop_inputs`` from :func:`_loop_inputs`. With a ``shift`` (the exact gradient of a
    :class:`~jaxrm.tabular.TabularPolicy` only) the gradient exponentiates the logits minus it,
    and the step also returns each row's log-normalizer, the next step's shift; otherwise that
    entry is None. ``num_prompts`` (default: the rows of ``logits``) is the count the objective
    averages over, which differs when ``logits`` holds only some of the problem's rows."""
    if shift is None:
        grads = gradient(policy, logits, *loop_inputs, lam, key)
    else:
        grads, shift = tabular_gradient_and_normalizer(logits, *loop_inputs, kl_coef=lam, shift=shift)
        grads = grads / (logits.shape[-2] if num_prompts is None else num_prompts)
    updates, opt_state = optimizer.update(jax.tree.map(jnp.negative, grads), opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state, shift


def _shift_held(log_normalizer, shift):
    """Per row: whether a step that exponentiated ``theta - shift`` was safe, i.e. its
    log-normalizer ``lse(theta)`` came out within ``0.7 log(max float)`` of ``shift`` (62 in
    float32, 496 in float64). Then ``max theta - shift`` is below that margin, so no term
    overflows (nor ``e theta``), and above ``-(margin + log |Y|)``, so the largest term stays a
    normal number; a NaN fails the test too."""
    margin = 0.7 * float(np.log(np.finfo(shift.dtype).max))
    return jnp.abs(log_normalizer - shift) < margin


# Primitives that act element by element (operands of one shape, or scalars), and those that
# call a program of their own, which is judged instead.
_ELEMENTWISE_PRIMITIVES = frozenset(
    "abs add and cbrt ceil clamp convert_element_type copy copy_p cos div eq erf erf_inv exp exp2 expm1 "
    "floor ge gt integer_pow is_finite le log log1p logistic lt max min mul ne neg nextafter not or pow "
    "rem round rsqrt select_n sign sin sqrt square sub tan tanh xor".split()
)
_CALL_PRIMITIVES = frozenset("jit pjit closed_call core_call custom_jvp_call custom_vjp_call remat checkpoint".split())
_SHAPE_PARAMETERS = frozenset({"shape", "broadcast_dimensions", "sharding"})


def _elementwise_signature(program) -> tuple | None:
    """A description of a closed program that leaves out the shapes of its arrays, if only
    element-wise primitives act on arrays in it (anything may act on scalars alone, and an array
    may be broadcast from one entry); None otherwise, or if it holds an array constant. Two
    traces of one function at two shapes with equal signatures compute each entry the same way."""
    if any(np.ndim(constant) for constant in program.consts):
        return None
    signature = [tuple(np.asarray(constant).tolist() for constant in program.consts)]
    for equation in program.jaxpr.eqns:
        name = equation.primitive.name
        if name in _CALL_PRIMITIVES:
            inner = [
                _elementwise_signature(j if hasattr(j, "consts") else ClosedJaxpr(j, ()))
                for j in jaxprs_in_params(equation.params)
            ]
            if None in inner:
                return None
            signature.append((name, *inner))
            continue
        shapes = [np.shape(v.aval) for v in (*equation.invars, *equation.outvars)]
        scalars = tuple(shape == () for shape in shapes)
        broadcast_entry = name == "broadcast_in_dim" and math.prod(shapes[0]) == 1
        if not (name in _ELEMENTWISE_PRIMITIVES or all(scalars) or broadcast_entry):
            return None
        parameters = sorted((k, repr(v)) for k, v in equation.params.items() if k not in _SHAPE_PARAMETERS)
        literals = [repr(v.val) for v in equation.invars if isinstance(v, Literal)]
        signature.append((name, scalars, tuple(parameters), tuple(literals)))
    signature.append(tuple(repr(v.val) for v in program.jaxpr.outvars if isinstance(v, Literal)))
    return tuple(signature)


@functools.lru_cache(maxsize=64)
def _acts_elementwise(optimizer: optax.GradientTransformation, shape: tuple, block_shape: tuple, dtype) -> bool:
    """Whether ``optimizer`` treats each entry of parameters shaped ``shape`` on its own, and
    the same way as on ``block_shape`` ones: its ``init`` and ``update``, traced at both shapes,
    must have equal :func:`_elementwise_signature` (``sgd``, ``adam``, ``lion``, ``optax.clip``:
    yes; ``clip_by_global_norm``, added noise, or a mask or factoring that depends on the
    shape: no). Conservative: a program it cannot read as element-wise counts as coupling."""

    def signatures(shape):
        params = jax.ShapeDtypeStruct(shape, dtype)
        init = jax.make_jaxpr(optimizer.init)(params)
        update = jax.make_jaxpr(optimizer.update)(params, jax.eval_shape(optimizer.init, params), params)
        return _elementwise_signature(init), _elementwise_signature(update)

    try:
        whole, block = signatures(shape), signatures(block_shape)
    except Exception:  # an optimizer that needs other arguments: not one to reason about
        return False
    return None not in whole and whole == block


def _row_blocked_layout(logits, optimizer) -> NamedSharding | None:
    """The sharding under which :func:`_row_blocked_ascent` runs ``logits``, or None where it does
    not apply: it needs rows spread over several CPU devices (on one device the blocks run on one
    core where the unblocked step's large kernels use them all; on accelerators small blocks only
    add loop overhead), outputs kept whole on each device, and an optimizer that acts element by
    element alike on the whole array and on a block (:func:`_acts_elementwise`)."""
    sharding = getattr(logits, "sharding", None)
    if not isinstance(sharding, NamedSharding) or any(d.platform != "cpu" for d in sharding.device_set):
        return None
    spec = (*sharding.spec, *(None,) * (logits.ndim - len(sharding.spec)))
    axes = [
        axis for entry in spec[:-1] if entry is not None for axis in (entry if isinstance(entry, tuple) else (entry,))
    ]
    if spec[-1] is not None or math.prod(sharding.mesh.shape[axis] for axis in axes) < 2:
        return None
    if not _acts_elementwise(optimizer, logits.shape, _block_shape(logits, sharding), logits.dtype):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


# Entries of one row block's arrays (64 KiB in float32): a block's logits, folded rewards and
# exponentials then stay in a core's L2 cache through all of its steps.
_BLOCK_ENTRIES = 16384


def _block_shape(logits, sharding) -> tuple:
    """``[rows, |Y|]`` of the blocks that :func:`_row_blocked_ascent` runs on each device."""
    local_rows = math.prod(sharding.shard_shape(logits.shape)[:-1])
    return (min(local_rows, max(1, _BLOCK_ENTRIES // logits.shape[-1])), logits.shape[-1])


@jax.jit(static_argnames=("policy", "optimizer", "num_steps", "sharding"))
def _row_blocked_ascent(logits, rm_rewards, kl_coef, *, policy, optimizer, num_steps, sharding):
    """The exact ascent of a tabular policy (``track=False``), rows blocked in time: each device
    runs all ``num_steps`` steps on a block of ``_BLOCK_ENTRIES // |Y|`` of its rows before
    the next, rather than every step over all its rows, so a step reads its block from cache
    instead of streaming ``[S, Y]`` arrays from memory. Each block runs :func:`_ascent` on its
    rows; that is the unblocked ascent because a row's exact gradient reads only that row and the
    optimizer acts element by element (:func:`_row_blocked_layout`). On ``[1024, 4096]`` float32
    logits over two CPU devices a step took 1.1-1.45x less time
    (docs/performance.md#the-discrete-ascent). Returns ``(logits, shift_held)``, the latter per
    row (whether its block's shift held throughout).
    """
    num_prompts, num_outputs = logits.shape[-2:]
    block = _block_shape(logits, sharding)[0]
    spec = sharding.spec

    def on_device(logits, rm_rewards, lam):
        rows = math.prod(logits.shape[:-1])
        padding = -rows % block  # zero rows: a uniform policy with zero rewards, which stays put

        def blocks(x):
            x = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, padding), (0, 0)))
            return x.reshape(-1, block, x.shape[-1])

        def ascend(block_inputs):  # one block through every step: the unblocked loop on its rows
            theta, rewards, lam = block_inputs
            options = dict(policy=policy, optimizer=optimizer, num_steps=num_steps, num_prompts=num_prompts)
            options |= dict(track=False, gradient=_exact_gradient, carry_shift=True)
            theta, _, held = _ascent(theta, rewards, rewards, lam, jax.random.key(0), **options)
            return theta, held

        theta, held = jax.lax.map(ascend, (blocks(logits), blocks(rm_rewards), blocks(lam)))
        rows_held = jnp.repeat(held, block)[:rows].reshape(logits.shape[:-1])
        return theta.reshape(-1, num_outputs)[:rows].reshape(logits.shape), rows_held

    return jax.shard_map(
        on_device, mesh=sharding.mesh, in_specs=(spec, spec, spec), out_specs=(spec, PartitionSpec(*spec[:-1]))
    )(logits, rm_rewards, kl_coef)


def _row_blocked(logits, rm_rewards, kl_coef, *, sharding, **options):
    """:func:`_row_blocked_ascent` on its inputs placed as ``sharding`` says (``kl_coef`` broadcast
    to ``[..., S, 1]``): a mesh with explicit axes takes no other layout into ``shard_map``."""
    kl_coef = jnp.broadcast_to(kl_coef, (*logits.shape[:-1], 1))
    placed = jax.device_put((logits, rm_rewards, kl_coef), sharding)
    return _row_blocked_ascent(*placed, sharding=sharding, **options)


@jax.jit(static_argnames=("policy", "optimizer", "gradient", "group_size"))
def _passage(
    logits, rm_rewards, eval_rewards, kl_coef, gamma, key, max_steps, *, policy, optimizer, gradient, group_size
):
    """The first-passage loop; ``max_steps`` is traced, so one program serves every budget."""
    ref_log_probs = policy.log_probs(logits)
    lam = kl_coef  # [..., S, 1] from _checked_problem
    loop_inputs = _loop_inputs(gradient, rm_rewards, ref_log_probs, lam)
    target = metrics.expected_reward(ref_log_probs, eval_rewards) + gamma

    class Carry(NamedTuple):
        logits: Any
        opt_state: Any
        step: Any
        steps: Any  # per prompt: updates until passage (so far)
        reached: Any
        tied: Any  # per prompt: sum of the tied-group probability over the updates taken

    def running(carry):
        return (carry.step < max_steps) & ~jnp.all(carry.reached)

    def body(carry):
        if group_size == 1:
            tied = jnp.ones_like(carry.tied)
        else:
            tied = metrics.tied_group_probability(policy.log_probs(carry.logits), rm_rewards, k=group_size)
        logits, opt_state, _ = _update(
            gradient,
            optimizer,
            policy,
            carry.logits,
            carry.opt_state,
            loop_inputs,
            lam,
            jax.random.fold_in(key, carry.step),
        )
        active = ~carry.reached
        passed = metrics.expected_reward(policy.log_probs(logits), eval_rewards) >= target
        return Carry(
            logits,
            opt_state,
            carry.step + 1,
            carry.steps + active,
            carry.reached | passed,
            carry.tied + jnp.where(active, tied, 0.0),
        )

    zeros = jnp.zeros(gamma.shape, jnp.int32)
    start = Carry(
        logits, optimizer.init(logits), jnp.int32(0), zeros, gamma <= 0, jnp.zeros(gamma.shape, rm_rewards.dtype)
    )
    out = jax.lax.while_loop(running, body, start)
    return AscentPassage(out.steps, out.reached, out.tied / jnp.maximum(out.steps, 1))


@jax.jit(static_argnames=("policy", "optimizer", "num_steps", "track", "gradient", "carry_shift", "num_prompts"))
def _ascent(
    logits,
    rm_rewards,
    eval_rewards,
    kl_coef,
    key,
    *,
    policy,
    optimizer,
    num_steps,
    track,
    gradient,
    carry_shift,
    num_prompts=None,
):
    """The loop shared by exact and sampled gradients; inputs are validated by the public callers.

    ``gradient(policy, logits, rm_rewards, ref_log_probs, kl_coef, key)`` returns the gradient
    (or an estimate of it) of the objective; step ``n`` passes it ``fold_in(key, n)``. With
    ``carry_shift`` (exact gradient, tabular policy) each step's softmax shift is the previous
    step's log-normalizer (see :func:`_checked_ascent`). Returns ``(logits, history, shift_held)``:
    whether every step's shift was safe (:func:`_shift_held`; True without ``carry_shift``).
    ``num_prompts`` (with ``carry_shift``): the objective's prompt count, when ``logits`` holds
    only some of the problem's rows (:func:`_row_blocked_ascent`).
    """
    ref_log_probs = policy.log_probs(logits)
    lam = kl_coef  # [..., S, 1] from _checked_problem
    loop_inputs = _loop_inputs(gradient, rm_rewards, ref_log_probs, lam)

    def measure(logits) -> FlowMetrics | None:
        return flow_metrics(policy, logits, rm_rewards, eval_rewards, ref_log_probs) if track else None

    class Carry(NamedTuple):
        logits: Any
        opt_state: Any
        shift: Any  # the next step's softmax shift, or None
        shift_held: Any  # per row, so that a step needs no reduction across devices

    def step(carry, index):
        logits, opt_state, shift = _update(
            gradient,
            optimizer,
            policy,
            carry.logits,
            carry.opt_state,
            loop_inputs,
            lam,
            jax.random.fold_in(key, index),
            carry.shift,
            num_prompts,
        )
        held = carry.shift_held if shift is None else carry.shift_held & _shift_held(shift, carry.shift)
        return Carry(logits, opt_state, shift, held), measure(carry.logits)

    shift = jnp.max(logits, axis=-1, keepdims=True) if carry_shift else None
    start = Carry(logits, optimizer.init(logits), shift, jnp.ones_like(shift, bool) if carry_shift else True)
    end, history = jax.lax.scan(step, start, jnp.arange(num_steps))
    if track:
        history = jax.tree.map(lambda h, last: jnp.concatenate([h, last[None]]), history, measure(end.logits))
    return end.logits, history, jnp.all(end.shift_held)
