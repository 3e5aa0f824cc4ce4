"""Sampled policy gradient on tabular policies, with the kernels of the transformer trainer.

Each step draws ``k`` outputs per prompt from the exact policy, folds the KL into the reward
(``r - lam (log pi - log pi_ref)`` at the sample, k1), forms advantages with :mod:`jaxrm.pg`
(``rloo``, ``grpo``, ``dr_grpo`` or ``reinforce``) and differentiates the REINFORCE surrogate:
the same arithmetic as :func:`jaxrm.train.rlhf.make_iteration` with one "token" per output. The
exact objective and metrics stay available, so the sampled dynamics can be compared with the
exact flow (:mod:`jaxrm.flow`) step by step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrm import flow, pg
from jaxrm._checks import check_choice
from jaxrm.tabular import TabularPolicy

ESTIMATORS = tuple(pg.ADVANTAGES)


@dataclasses.dataclass(frozen=True)
class SampledGradient:
    """A policy-gradient estimate from ``k`` sampled outputs per prompt (hashable: a static jit argument).

    ``rloo`` and ``reinforce`` are unbiased estimates of :func:`jaxrm.tabular.objective_grad`;
    ``grpo`` and ``dr_grpo`` subtract a mean that includes the sample itself and are not.
    """

    k: int
    estimator: str = "rloo"

    def __post_init__(self):
        check_choice("estimator", self.estimator, ESTIMATORS)
        if not isinstance(self.k, int) or self.k < (1 if self.estimator == "reinforce" else 2):
            raise ValueError(f"k={self.k!r} samples per prompt are too few for estimator={self.estimator!r}.")

    def __call__(self, policy, logits, rewards, ref_log_probs, kl_coef, key):
        log_probs = policy.log_probs(logits)
        outputs = jax.random.categorical(key, log_probs[..., None, :], shape=(*log_probs.shape[:-1], self.k))

        def sampled(values):
            return jnp.take_along_axis(values, outputs, axis=-1)[..., None]  # [..., prompts, k, 1 "token"]

        mask = jnp.ones(outputs.shape + (1,), bool)
        penalized = pg.kl_penalized_rewards(
            sampled(rewards)[..., 0], sampled(log_probs), sampled(ref_log_probs), mask, kl_coef=kl_coef
        )
        advantages = pg.ADVANTAGES[self.estimator](penalized)

        def surrogate(theta):
            # The mean over prompts x k of -A log pi: its expected gradient is -objective_grad.
            return pg.reinforce_loss(sampled(policy.log_probs(theta)), advantages, mask, aggregation="sequence-sum")

        return jax.tree.map(jnp.negative, jax.grad(surrogate)(logits))


def sampled_gradient_ascent(
    init_logits,
    rm_rewards,
    key,
    *,
    k,
    optimizer,
    num_steps,
    estimator="rloo",
    policy=None,
    kl_coef=0.0,
    eval_rewards=None,
    track=True,
):
    """:func:`jaxrm.flow.exact_gradient_ascent` with the gradient replaced by a sampled estimate.

    Same arguments and return value, plus ``key`` (step ``n`` uses ``fold_in(key, n)``), ``k``
    (outputs per prompt and step) and ``estimator``. ``jax.vmap`` over keys runs several seeds.

    >>> import jax.numpy as jnp, optax
    >>> final, m = sampled_gradient_ascent(jnp.zeros((1, 4)), jnp.array([[0.0, 0.0, 0.0, 1.0]]),
    ...                                    jax.random.key(0), k=64, optimizer=optax.sgd(1.0), num_steps=20)
    >>> bool(m.rm_reward[-1, 0] > m.rm_reward[0, 0] + 0.3)
    True
    """
    policy = TabularPolicy() if policy is None else policy
    gradient = SampledGradient(k, estimator)
    rm_rewards, eval_rewards = flow.validate_problem(policy, init_logits, rm_rewards, eval_rewards, kl_coef)
    if not (isinstance(num_steps, int) and num_steps >= 0):
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
    kl_coef = jnp.asarray(kl_coef, rm_rewards.dtype)
    return flow.gradient_ascent(
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
