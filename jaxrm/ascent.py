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
import math

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jaxrm import pg
from jaxrm._checks import check_choice
from jaxrm.flow import FlowMetrics, default_policy, flow_metrics, validate_problem
from jaxrm.tabular import ExactPolicy, objective_grad

__all__ = ["SampledGradient", "exact_gradient_ascent", "sampled_gradient_ascent"]


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
        if not isinstance(self.k, int) or self.k < (1 if self.advantage_estimator == "reinforce" else 2):
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


def _checked_ascent(
    init_logits, rm_rewards, key, *, gradient, policy, kl_coef, eval_rewards, optimizer, num_steps, track
):
    """Validate a problem before any work, then run the compiled ascent loop."""
    policy = default_policy(policy, rm_rewards)
    init_logits, rm_rewards, eval_rewards = validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef)
    if not (isinstance(num_steps, int) and num_steps >= 0):
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
    kl_coef = jnp.asarray(0.0 if kl_coef is None else kl_coef, rm_rewards.dtype)
    return _ascent(
        init_logits,
        rm_rewards,
        eval_rewards,
        kl_coef,
        key,
        policy=policy,
        optimizer=optimizer,
        num_steps=num_steps,
        track=track,
        gradient=gradient,
    )


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
    ``lr -> 0``. Leading batch axes of ``rm_rewards`` are independent problems. The optimizer
    and ``num_steps`` are static: reuse one optimizer object to reuse the compiled program.

    Args:
      init_logits: initial parameters of ``policy`` (also the KL reference).
      rm_rewards: ``[..., S, Y]`` rewards the policy is trained on.
      optimizer: an optax optimizer (it minimises; the ascent direction is passed negated).
      num_steps: number of updates.
      policy: an :class:`~jaxrm.tabular.ExactPolicy` (default: tabular over ``Y`` outputs).
      kl_coef: ``lam >= 0`` (scalar or one per problem); None for no KL term.
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


@jax.jit(static_argnames=("policy", "optimizer", "num_steps", "track", "gradient"))
def _ascent(logits, rm_rewards, eval_rewards, kl_coef, key, *, policy, optimizer, num_steps, track, gradient):
    """The loop shared by exact and sampled gradients; inputs are validated by the public callers.

    ``gradient(policy, logits, rm_rewards, ref_log_probs, kl_coef, key)`` returns the gradient
    (or an estimate of it) of the objective; step ``n`` passes it ``fold_in(key, n)``.
    """
    ref_log_probs = policy.log_probs(logits)
    lam = kl_coef[..., None, None] if kl_coef.ndim else kl_coef

    def measure(logits) -> FlowMetrics | None:
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
