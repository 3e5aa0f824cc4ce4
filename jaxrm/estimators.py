"""Exact moments of sampled policy-gradient estimators (docs/theory.md#what-each-estimator-optimizes).

A trainer estimates the gradient of ``J(theta) = E_pi[r] - lam KL(pi || pi_ref)`` from a group of
``k`` outputs sampled from the current policy: it builds a surrogate loss from the samples'
log-probs with the kernels of :mod:`jaxrm.pg` and differentiates it. On an exact policy
(:mod:`jaxrm.tabular`) every group can be enumerated, so the estimate's mean and covariance are
*exact*: :func:`estimate_moments` sums ``P(y_1..y_k) g(y_1..y_k)`` over all groups, where ``g``
is minus the gradient of the very loss the trainer minimises (:func:`sampled_gradient`). Every
estimator treats its ``k`` samples alike, so ``g`` depends on the group only through its multiset
of outputs: the sum runs over the ``C(|Y| + k - 1, k)`` multisets, each weighted by its
multinomial probability (chunked; about 1e6 multisets on a CPU in seconds; ``|Y| = 8, k = 16``
is 245,157 of them, against ``8^16`` ordered groups).

The estimators (:class:`Estimator`) cover REINFORCE with and without a baseline, RLOO(k),
GRPO(k) with its standard-deviation scaling, Dr. GRPO; the KL estimators ``k1``/``k2``/``k3``
folded into the reward, added to the loss, or added to the loss *detached* (computed from the
rollout's log-probs, so it carries no gradient); zero-variance-group filtering; global or
per-group reward normalization; and PPO's clipped surrogate at ratio 1 (the first step on fresh
samples). :func:`compare` measures the mean against a target gradient: bias, cosine, total
variance and signal-to-noise ratio. :func:`kl_gradients` gives the exact gradients of the
objectives that the biased placements follow instead (derived in docs/theory.md).

Everything is float64-friendly and pure; :func:`objective_gradient`, :func:`kl_gradients`,
:func:`followed_gradient` and :func:`sampled_gradient` trace under ``jit`` and ``vmap``, while
:func:`estimate_moments` loops over chunks of groups in Python (each chunk one compiled call), so
its ``kl_coef`` is checked and must be concrete. The policy's parameters carry a leading prompt
axis, as :mod:`jaxrm.tabular` expects: of size 1 for one prompt (the moments of several prompts
come stacked from one call of :func:`estimate_moments`); the other functions take one prompt.

>>> import jax.numpy as jnp
>>> from jaxrm.tabular import TabularPolicy
>>> policy, logits = TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]])
>>> rewards = jnp.array([1.0, 0.0, -1.0])
>>> moments = estimate_moments(Estimator("rloo", k=2), policy, logits, rewards)
>>> target = objective_gradient(policy, logits, rewards)
>>> bool(jnp.allclose(moments.mean, target))  # RLOO is unbiased
True
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxrm import pg
from jaxrm._checks import (
    check_fields,
    check_finite,
    check_int,
    check_token_ids,
    checked,
    int_at_least,
    is_concrete,
    one_of,
)
from jaxrm.metrics import KL_ESTIMATORS, kl_estimate, reward_variance
from jaxrm.tabular import ExactPolicy, Logits

__all__ = [
    "ADVANTAGES",
    "Comparison",
    "Estimator",
    "KL_PLACEMENTS",
    "Moments",
    "NORMALIZATIONS",
    "SURROGATES",
    "compare",
    "estimate_many_moments",
    "estimate_moments",
    "followed_gradient",
    "grid",
    "has_closed_form",
    "kl_gradients",
    "objective_gradient",
    "sampled_gradient",
    "token_log_probs",
]

ADVANTAGES = ("reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo")
KL_PLACEMENTS = ("reward", "loss", "detached")
NORMALIZATIONS = ("none", "global", "group")
SURROGATES = ("reinforce", "clipped")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One way a trainer turns ``k`` samples of a prompt into a gradient estimate.

    Attributes:
      advantage: ``reinforce`` (``A = r``), ``reinforce_baseline`` (``A = r - E_pi[r]``, the
        exact mean of the raw task reward, whatever the KL shaping or normalization: a baseline
        that does not depend on the samples), ``rloo``, ``grpo`` (std
        scaling, ``ddof = 1``, ``eps = 1e-4`` as :func:`jaxrm.pg.grpo_advantages`) or ``dr_grpo``.
      k: samples per prompt (an int >= 1; >= 2 for ``rloo`` and ``grpo``).
      kl_estimator: ``k1``, ``k2`` or ``k3`` (:func:`jaxrm.metrics.kl_estimate`), per token.
      kl_placement: where ``lam`` times the KL estimate goes: ``reward`` (summed over tokens and
        subtracted from each sample's reward, no gradient: RLOO), ``loss`` (added to the loss,
        summed over tokens and averaged over samples, differentiated: GRPO) or ``detached``
        (added to the loss but computed from the rollout's log-probs, so no gradient flows).
      filter_zero_variance: drop the group (estimate 0) when its ``k`` task rewards are all equal.
      reward_normalization: ``none``; ``global`` (``(r - E_pi r) / (std_pi r + 1e-8)``, exact
        statistics that do not depend on the samples, like statistics measured once on a large
        batch); or ``group`` (``(r - mean_k r) / (std_k r + 1e-8)`` over the group's samples,
        ``ddof = 0``: a per-batch normalization with one prompt per batch; under RLOO it is
        GRPO's scaling up to ``ddof``, ``eps`` and the factor ``k / (k - 1)``). Applied to the
        task reward, before the KL.
      surrogate: ``reinforce`` (``-A log pi`` summed over tokens, averaged over samples: the
        sequence-level score-function loss) or ``clipped`` (PPO's clipped surrogate with
        per-token ratios, at ratio 1: fresh samples). The whole loss, KL term included, is
        aggregated like the trainer's: the sequence sum for ``reinforce``, the token mean for
        ``clipped``.
    """

    advantage: str = checked("rloo", one_of(ADVANTAGES))
    k: int = checked(2, int_at_least(1))
    kl_estimator: str = checked("k1", one_of(KL_ESTIMATORS))
    kl_placement: str = checked("reward", one_of(KL_PLACEMENTS))
    filter_zero_variance: bool = False
    reward_normalization: str = checked("none", one_of(NORMALIZATIONS))
    surrogate: str = checked("reinforce", one_of(SURROGATES))

    def __post_init__(self):
        check_fields(self)
        if self.advantage in ("rloo", "grpo") and self.k < 2:
            raise ValueError(f"Estimator.k={self.k}: {self.advantage} needs k >= 2 samples per prompt.")

    @property
    def name(self) -> str:
        placement = "detached in loss" if self.kl_placement == "detached" else f"in {self.kl_placement}"
        parts = [f"{self.advantage}(k={self.k})", f"{self.kl_estimator} {placement}"]
        if self.filter_zero_variance:
            parts.append("filtered")
        if self.reward_normalization != "none":
            parts.append(f"{self.reward_normalization} normalization")
        if self.surrogate != "reinforce":
            parts.append(f"{self.surrogate} surrogate")
        return ", ".join(parts)


class Moments(NamedTuple):
    """Exact moments of a gradient estimate, flattened over the policy's parameters.

    Attributes:
      mean: ``[D]``, ``E[g]`` (``[S, D]`` for ``S`` prompts).
      covariance: ``[D, D]``, ``Cov[g]`` of one group's estimate (``[S, D, D]``).
      groups: how many multisets of ``k`` outputs were enumerated (``C(|Y| + k - 1, k)``).
    """

    mean: Any
    covariance: Any
    groups: int


class Comparison(NamedTuple):
    """An estimator's mean against a target gradient ``t`` (:func:`compare`).

    Attributes:
      relative_bias: ``||E g - t|| / ||t||``.
      cosine: cosine of the angle between ``E g`` and ``t``.
      scale: ``<E g, t> / ||t||^2``, the multiple of ``t`` closest to ``E g``.
      direction_bias: ``||E g - scale t|| / ||E g||``: the part of the mean that no rescaling of
        ``t`` explains (0 for an estimator unbiased up to a constant factor).
      total_variance: ``trace Cov[g]``.
      snr: ``||E g||^2 / trace Cov[g]``, the signal-to-noise ratio of one group's estimate
        (``inf`` without noise; NaN for an estimate that is always 0).
    """

    relative_bias: float
    cosine: float
    scale: float
    direction_bias: float
    total_variance: float
    snr: float


def token_log_probs(log_probs: jax.Array, *, vocab_size: int, length: int) -> jax.Array:
    """``[V**L, L]``: ``log pi(y_t | y_<t)`` of every output's tokens, from the exact
    distribution ``log_probs [V**L]`` over outputs in lexicographic order (prefix marginals, so
    any exact policy works, whatever its parametrization).

    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([0.1, 0.3, 0.2, 0.4]))
    >>> [[round(p, 3) for p in row] for row in jnp.exp(token_log_probs(lp, vocab_size=2, length=2)).tolist()]
    [[0.4, 0.25], [0.4, 0.75], [0.6, 0.333], [0.6, 0.667]]
    """
    joint = log_probs.reshape((vocab_size,) * length)
    index = jnp.arange(vocab_size**length)
    prefix = [jnp.zeros(1)]  # log P(empty prefix) = 0
    for level in range(1, length + 1):
        later = tuple(range(level, length))
        marginal = jax.scipy.special.logsumexp(joint, axis=later) if later else joint
        prefix.append(marginal.reshape(-1))
    return jnp.stack(
        [
            prefix[t + 1][index // vocab_size ** (length - t - 1)] - prefix[t][index // vocab_size ** (length - t)]
            for t in range(length)
        ],
        axis=-1,
    )


def _structure(policy: ExactPolicy) -> tuple[int, int]:
    length = int(policy.length)
    vocab = int(round(policy.num_outputs ** (1.0 / length)))
    if vocab**length != policy.num_outputs:
        raise ValueError(f"{type(policy).__name__} has {policy.num_outputs} outputs, not V**L for L = {length}.")
    return vocab, length


def _one_prompt(policy: ExactPolicy, logits: Logits, rewards) -> jax.Array:
    """``rewards`` as ``[|Y|]`` after checking that ``logits`` hold one prompt and ``rewards``
    one value per output (``[|Y|]`` or ``[1, |Y|]``): these functions read the first prompt's
    policy only, and a second prompt's rewards would broadcast against it silently."""
    prompts = jax.tree.leaves(logits)[0].shape[0]
    if prompts != 1:
        raise ValueError(
            f"logits hold {prompts} prompts; this function takes one (a prompt axis of size 1). "
            "estimate_moments gives several prompts' moments at once."
        )
    if np.shape(rewards) not in ((policy.num_outputs,), (1, policy.num_outputs)):
        raise ValueError(f"rewards must be shaped [{policy.num_outputs}] (one per output), got {np.shape(rewards)}.")
    return jnp.reshape(rewards, (policy.num_outputs,))


def objective_gradient(
    policy: ExactPolicy, logits: Logits, rewards: jax.Array, *, kl_coef: float = 0.0, ref_logits: Logits | None = None
) -> jax.Array:
    """``[D]``: the exact gradient of ``J = E_pi[r] - lam KL(pi || pi_ref)`` for one prompt
    (``pi_ref`` is ``ref_logits``' policy, the current one by default), flattened.

    >>> import jax.numpy as jnp
    >>> from jaxrm.tabular import TabularPolicy
    >>> gradient = objective_gradient(TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]]), jnp.array([1.0, 0.0, -1.0]))
    >>> [round(g, 4) for g in gradient.tolist()]  # pi (r - E_pi r), Lemma 7
    [0.2701, -0.0612, -0.2088]
    """
    grads = kl_gradients(policy, logits, rewards, ref_logits=ref_logits)
    return grads["reward"] - kl_coef * grads["reverse_kl"]


@functools.partial(jax.jit, static_argnames="policy")
def kl_gradients(
    policy: ExactPolicy, logits: Logits, rewards: jax.Array, *, ref_logits: Logits | None = None
) -> dict[str, jax.Array]:
    """Exact flattened gradients of the objectives the estimators follow (docs/theory.md):
    ``reward`` (``E_pi r``), ``reverse_kl`` (``KL(pi || pi_ref)``), ``forward_kl``
    (``KL(pi_ref || pi)``), ``half_square`` (``E_pi[(log pi - log pi_ref)^2 / 2]``) and
    ``token_reverse_kl``: ``sum_t E_{y_<t ~ pi}[KL(pi(.|y_<t) || pi_ref(.|y_<t))]`` and
    ``token_forward_kl`` (the same with ``KL(pi_ref(.|y_<t) || pi(.|y_<t))``), each with the
    prefix distribution held fixed: what a per-token k2 or k3 in the loss follows. For ``L = 1``
    they are ``reverse_kl`` and ``forward_kl``. ``held_k1``, ``held_k2``, ``held_k3``: the
    score-function gradient of ``E_pi[c(y)]`` with ``c(y) = sum_t k(y_t)`` held at its current
    value, which a KL estimate folded into the reward follows (``held_k1 = reverse_kl``)."""
    rewards = _one_prompt(policy, logits, rewards)
    ref_logits = logits if ref_logits is None else ref_logits
    vocab, length = _structure(policy)
    ref_lp = jax.lax.stop_gradient(policy.log_probs(ref_logits)[0])
    ref_tokens = token_log_probs(ref_lp, vocab_size=vocab, length=length)
    flat, unravel = ravel_pytree(logits)
    held = jax.lax.stop_gradient(jnp.exp(policy.log_probs(logits)[0]))

    def values(flat_params):
        lp = policy.log_probs(unravel(flat_params))[0]
        p = jnp.exp(lp)
        tokens = token_log_probs(lp, vocab_size=vocab, length=length)
        # Per-token KL of the next-token distributions, weighted by the (fixed) probability of the prefix:
        # sum over outputs of P(y) * (log pi_t - log ref_t) equals E_prefix KL_t for each t.
        reweight = jnp.exp(tokens - jax.lax.stop_gradient(tokens))  # pi_t / pi_t held: 1, with pi_t's gradient
        token_kl = jnp.sum(held[:, None] * (tokens - ref_tokens) * reweight)
        ref_weight = jnp.exp(ref_tokens - jax.lax.stop_gradient(tokens))  # ref_t / pi_t held
        token_forward = jnp.sum(held[:, None] * ref_weight * (ref_tokens - tokens))
        held_penalties = {  # a KL estimate folded into the reward: sum_t k(y_t), no gradient
            f"held_{name}": jnp.sum(
                p
                * jax.lax.stop_gradient(
                    jnp.sum(kl_estimate(jax.lax.stop_gradient(tokens), ref_tokens, kl_estimator=name), axis=-1)
                )
            )
            for name in KL_ESTIMATORS
        }
        return held_penalties | {
            # Centred: the same gradient (sum_y grad p(y) = 0), exactly 0 for constant rewards.
            "reward": jnp.sum(p * (rewards - jnp.max(rewards))),
            "reverse_kl": jnp.sum(p * (lp - ref_lp)),
            "forward_kl": jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp)),
            "half_square": jnp.sum(p * 0.5 * jnp.square(lp - ref_lp)),
            "token_reverse_kl": token_kl,
            "token_forward_kl": token_forward,
        }

    return jax.jacrev(values)(flat)


def has_closed_form(estimator: Estimator) -> bool:
    """Whether :func:`followed_gradient` has a closed form for ``estimator``: not for GRPO's
    std scaling, per-group normalization or zero-variance filtering, whose bias depends on the
    joint law of the group.

    >>> has_closed_form(Estimator("rloo", k=2)), has_closed_form(Estimator("grpo", k=2))
    (True, False)
    """
    return not (
        estimator.advantage == "grpo" or estimator.reward_normalization == "group" or estimator.filter_zero_variance
    )


def followed_gradient(
    estimator: Estimator,
    policy: ExactPolicy,
    logits: Logits,
    rewards: jax.Array,
    *,
    kl_coef: float = 0.0,
    ref_logits: Logits | None = None,
    gradients: dict | None = None,
) -> jax.Array | None:
    """``[D]``: the exact gradient that ``estimator``'s mean equals, from the closed forms of
    docs/theory.md#what-each-estimator-optimizes, or ``None`` where there is none (GRPO's std
    scaling, per-group normalization, zero-variance filtering: their bias depends on the
    samples' joint law).

    Advantages scale the reward part (1, or ``(k - 1)/k`` for Dr. GRPO); ``global``
    normalization divides the task reward by ``std_pi r + 1e-8``; a KL in the reward adds
    ``-lam held_k`` (scaled like the advantages), in the loss ``0`` (``k1``),
    ``-lam token_reverse_kl`` (``k2``) or ``-lam token_forward_kl`` (``k3``); detached adds 0;
    the clipped surrogate's token mean divides everything by ``L``. For ``L > 1`` the held and
    per-token terms are directions, not gradients of an objective (the prefix distribution is
    held fixed). ``gradients``: the
    :func:`kl_gradients` of the instance, when already computed (they are the same for every
    estimator).

    >>> import jax.numpy as jnp
    >>> from jaxrm.tabular import TabularPolicy
    >>> policy, logits, rewards = TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]]), jnp.array([1.0, 0.0, -1.0])
    >>> followed = followed_gradient(Estimator("dr_grpo", k=2), policy, logits, rewards)
    >>> [round(g, 4) for g in followed.tolist()]  # (k - 1) / k of objective_gradient's
    [0.135, -0.0306, -0.1044]
    """
    if not has_closed_form(estimator):
        return None
    rewards = _one_prompt(policy, logits, rewards)
    grads = kl_gradients(policy, logits, rewards, ref_logits=ref_logits) if gradients is None else gradients
    factor = (estimator.k - 1) / estimator.k if estimator.advantage == "dr_grpo" else 1.0
    task = grads["reward"]
    if estimator.reward_normalization == "global":
        task = task / (jnp.sqrt(reward_variance(policy.log_probs(logits)[0], rewards)) + 1e-8)
    score = task
    if estimator.kl_placement == "reward":
        score = score - kl_coef * grads[f"held_{estimator.kl_estimator}"]
    score = factor * score
    if estimator.kl_placement == "loss":
        loss_kl = {"k1": 0.0, "k2": grads["token_reverse_kl"], "k3": grads["token_forward_kl"]}
        score = score - kl_coef * loss_kl[estimator.kl_estimator]
    return score / policy.length if estimator.surrogate == "clipped" else score


def sampled_gradient(
    estimator: Estimator,
    policy: ExactPolicy,
    logits: Logits,
    rewards: jax.Array,
    samples: jax.Array,
    *,
    kl_coef: float = 0.0,
    ref_logits: Logits | None = None,
) -> jax.Array:
    """``[D]``: the ascent direction ``-grad loss`` that ``estimator`` computes from the output
    indices ``samples [k]`` of one prompt, built from the :mod:`jaxrm.pg` kernels exactly as a
    trainer builds it (flattened over the policy's parameters).

    >>> import jax.numpy as jnp
    >>> from jaxrm.tabular import TabularPolicy
    >>> policy, logits, rewards = TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]]), jnp.array([1.0, 0.0, -1.0])
    >>> g = sampled_gradient(Estimator("rloo", k=2), policy, logits, rewards, jnp.array([0, 1]))
    >>> print(jnp.round(g, 4) + 0.0)  # advantages +1, -1: (grad log pi(0) - grad log pi(1)) / 2
    [ 0.5 -0.5  0. ]
    """
    rewards = _one_prompt(policy, logits, rewards)
    if np.shape(samples) != (estimator.k,):
        raise ValueError(
            f"samples must be shaped [{estimator.k}] (k = {estimator.k} output indices), got {np.shape(samples)}."
        )
    check_token_ids("samples", samples, policy.num_outputs)
    tables = _tables(policy, logits, logits if ref_logits is None else ref_logits)
    return _gradient(estimator, tables, rewards, samples, kl_coef)


class _Tables(NamedTuple):
    """What every estimator's gradient needs of one prompt's policy, for every output."""

    log_probs: jax.Array  # [Y] log pi(y)
    tokens: jax.Array  # [Y, L] log pi(y_t | y_<t)
    jacobian: jax.Array  # [Y, L, D] their gradients with respect to the flattened parameters
    ref_tokens: jax.Array  # [Y, L] the reference policy's token log-probs


def _tables(policy: ExactPolicy, logits: Logits, ref_logits: Logits) -> _Tables:
    vocab, length = _structure(policy)
    flat, unravel = ravel_pytree(logits)

    def tokens_of(flat_params):
        return token_log_probs(policy.log_probs(unravel(flat_params))[0], vocab_size=vocab, length=length)

    return _Tables(
        policy.log_probs(logits)[0],
        tokens_of(flat),
        jax.jacrev(tokens_of)(flat),
        token_log_probs(policy.log_probs(ref_logits)[0], vocab_size=vocab, length=length),
    )


def _gradient(estimator: Estimator, tables: _Tables, rewards, samples, kl_coef) -> jax.Array:
    """:func:`sampled_gradient` from the prompt's :class:`_Tables`. The trainer's loss depends on
    the parameters only through the sampled outputs' token log-probs, so its gradient is
    ``J^T (d loss / d tokens)`` with ``J`` the tokens' Jacobian: the loss is differentiated
    with respect to ``k x L`` numbers, and every estimator shares one Jacobian."""
    length = tables.tokens.shape[-1]
    rollout_tokens = tables.tokens[samples]  # the tokens' values; their gradient comes through J
    ref_tokens = tables.ref_tokens[samples]
    task = raw = rewards[samples]
    mask = jnp.ones((estimator.k, length), bool)
    if estimator.reward_normalization == "global":
        mean = jnp.sum(jnp.exp(tables.log_probs) * rewards)
        task = pg.normalize_sampled_rewards(task, mean, jnp.sqrt(reward_variance(tables.log_probs, rewards)))
    elif estimator.reward_normalization == "group":
        task = pg.normalize_sampled_rewards(task, jnp.mean(task), jnp.std(task))
    shaped = task
    if estimator.kl_placement == "reward":
        shaped = pg.kl_penalized_rewards(
            task, rollout_tokens, ref_tokens, mask, kl_coef=kl_coef, kl_estimator=estimator.kl_estimator
        )
    advantages = _advantages(estimator, shaped, tables.log_probs, rewards)
    # One aggregation for the whole loss, as the trainer does (its config.aggregation).
    aggregation = "token-mean" if estimator.surrogate == "clipped" else "sequence-sum"

    def loss(tokens):
        if estimator.surrogate == "clipped":
            value, _ = pg.clipped_surrogate_loss(tokens, rollout_tokens, advantages, mask, aggregation=aggregation)
        else:
            value = pg.reinforce_loss(tokens, advantages, mask, aggregation=aggregation)
        if estimator.kl_placement in ("loss", "detached"):
            kl_tokens = tokens if estimator.kl_placement == "loss" else rollout_tokens
            kl = pg.kl_per_token(kl_tokens, ref_tokens, mask, kl_estimator=estimator.kl_estimator)
            value = value + kl_coef * pg.aggregate(kl, mask, aggregation=aggregation)
        return value

    # The samples' token cotangents, summed per output: one [Y, L] x [Y, L, D] contraction
    # (a batch of groups is one matrix product, in memory ~ groups x Y x L).
    cotangent = jnp.zeros(tables.tokens.shape, tables.tokens.dtype).at[samples].add(jax.grad(loss)(rollout_tokens))
    gradient = -jnp.einsum("yl,yld->d", cotangent, tables.jacobian)
    if estimator.filter_zero_variance:
        gradient = jnp.where(jnp.all(raw == raw[0]), 0.0, gradient)
    return gradient


def _advantages(estimator: Estimator, rewards, log_probs_now, all_rewards):
    group = rewards[None]  # one prompt: [1, k]
    if estimator.advantage == "reinforce":
        return pg.reinforce_advantages(group)[0]
    if estimator.advantage == "reinforce_baseline":
        baseline = jnp.sum(jnp.exp(log_probs_now) * all_rewards)
        return pg.reinforce_advantages(group, baseline=baseline)[0]
    return pg.ADVANTAGE_ESTIMATORS[estimator.advantage](group)[0]


def estimate_moments(
    estimator: Estimator,
    policy: ExactPolicy,
    logits: Logits,
    rewards: jax.Array,
    *,
    kl_coef: float = 0.0,
    ref_logits: Logits | None = None,
    chunk: int = 16_384,
    max_groups: int = 2_000_000,
) -> Moments:
    """Exact mean and covariance of ``estimator``'s gradient estimate for one prompt, by
    enumerating all ``C(|Y| + k - 1, k)`` multisets of ``k`` outputs with their multinomial
    probabilities ``k! / prod_y c_y! * prod_y pi(y)^(c_y)`` (``c_y``: how often ``y`` occurs).

    Several prompts at once: ``logits`` (and ``ref_logits``) with ``S`` prompts and rewards
    ``[S, |Y|]`` give each prompt's own moments, stacked (``mean [S, D]``, ``covariance
    [S, D, D]``), from the same compiled program.

    Args:
      estimator: the :class:`Estimator`.
      policy: an exact policy; ``logits`` its parameters (prompt axis of size 1, or ``S``).
      rewards: ``[|Y|]`` task rewards of every output (``[S, |Y|]`` for ``S`` prompts).
      kl_coef: ``lam >= 0``.
      ref_logits: the reference policy's parameters (default: the current ones, where every KL
        and its gradient vanish).
      chunk: multisets per vectorized batch (memory ~ ``chunk * max(|Y| * L, D)`` per prompt).
      max_groups: refuse more multisets than this.

    >>> import jax.numpy as jnp
    >>> from jaxrm.tabular import TabularPolicy
    >>> policy, logits, rewards = TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]]), jnp.array([1.0, 0.0, -1.0])
    >>> moments = estimate_moments(Estimator("rloo", k=2), policy, logits, rewards)
    >>> moments.groups, [round(g, 4) for g in moments.mean.tolist()]  # 6 multisets; unbiased
    (6, [0.2701, -0.0612, -0.2088])
    """
    options = dict(kl_coef=kl_coef, ref_logits=ref_logits, chunk=chunk, max_groups=max_groups)
    return estimate_many_moments((estimator,), policy, logits, rewards, **options)[0]


def estimate_many_moments(
    estimators: tuple[Estimator, ...],
    policy: ExactPolicy,
    logits: Logits,
    rewards: jax.Array,
    *,
    kl_coef: float = 0.0,
    ref_logits: Logits | None = None,
    chunk: int = 16_384,
    max_groups: int = 2_000_000,
) -> list[Moments]:
    """:func:`estimate_moments` of several estimators with the same ``k``, in one pass over the
    groups and one compiled program (arguments as there).

    >>> import jax.numpy as jnp
    >>> from jaxrm.tabular import TabularPolicy
    >>> policy, logits, rewards = TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]]), jnp.array([1.0, 0.0, -1.0])
    >>> rloo, grpo = estimate_many_moments((Estimator("rloo", k=2), Estimator("grpo", k=2)), policy, logits, rewards)
    >>> # RLOO's mean is the gradient; GRPO's is not a multiple of it
    >>> [round(g, 4) for g in rloo.mean.tolist()], [round(g, 4) for g in grpo.mean.tolist()]
    ([0.2701, -0.0612, -0.2088], [0.1505, -0.0433, -0.1072])
    """
    estimators = tuple(estimators)
    if not estimators or not all(isinstance(e, Estimator) for e in estimators):
        raise ValueError(f"estimators must be a non-empty sequence of Estimator, got {estimators!r}.")
    if not is_concrete(kl_coef):
        raise ValueError("estimate_moments takes a concrete kl_coef (it loops over chunks in Python).")
    if not (np.ndim(kl_coef) == 0 and np.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}.")
    check_int("chunk", chunk, low=1)
    _structure(policy)
    if len({e.k for e in estimators}) != 1:
        raise ValueError(f"estimate_many_moments needs one k, got {sorted({e.k for e in estimators})}.")
    k, num_outputs = estimators[0].k, policy.num_outputs
    groups = math.comb(num_outputs + k - 1, k)
    if groups > max_groups:
        raise ValueError(
            f"C(|Y| + k - 1, k) = {groups} multisets of k = {k} of |Y| = {num_outputs} outputs exceeds "
            f"max_groups={max_groups}; lower k or |Y|, or raise max_groups."
        )
    rewards = jnp.asarray(rewards)
    prompts = jax.tree.leaves(logits)[0].shape[0]
    ref_logits = logits if ref_logits is None else ref_logits
    if jax.tree.leaves(ref_logits)[0].shape[0] != prompts:
        raise ValueError(f"ref_logits must hold the {prompts} prompt(s) of logits.")
    if rewards.shape != (prompts, num_outputs) and not (prompts == 1 and rewards.shape == (num_outputs,)):
        expected = f"[{num_outputs}] (one per output)" if prompts == 1 else f"[{prompts}, {num_outputs}]"
        raise ValueError(f"rewards must be shaped {expected}, got {rewards.shape}.")
    check_finite("rewards", rewards)
    one_prompt = jax.tree.map(lambda x: x[:1], logits)
    dim = ravel_pytree(one_prompt)[0].size
    size = min(chunk, groups)
    num_chunks = -(-groups // size)
    samples, log_counts = _multisets(num_outputs, k, num_chunks * size)
    by_prompt = functools.partial(jax.tree.map, lambda x: x[:, None])  # [S, 1, ...]: one policy per prompt
    carry = (jnp.zeros((prompts, len(estimators), dim)), jnp.zeros((prompts, len(estimators), dim, dim)))
    for i in range(num_chunks):
        rows = slice(i * size, (i + 1) * size)
        carry = _accumulate(
            carry,
            samples[rows],
            log_counts[rows],
            by_prompt(logits),
            rewards.reshape(prompts, num_outputs),
            kl_coef,
            by_prompt(ref_logits),
            estimators=estimators,
            policy=policy,
        )
    first, second = carry  # [S, E, D], [S, E, D, D]
    covariance = second - first[..., :, None] * first[..., None, :]
    if rewards.ndim == 1:
        first, covariance = first[0], covariance[0]
    return [Moments(first[..., e, :], covariance[..., e, :, :], groups) for e in range(len(estimators))]


@functools.lru_cache(maxsize=2)
def _multisets(num_outputs: int, k: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(samples [rows, k], log_counts [rows])``: every multiset of ``k`` of ``num_outputs``
    outputs as a sorted index tuple, with the log of the number of orderings it stands for
    (``log k! - sum_y log c_y!``); rows past the last multiset repeat output 0 with a log count
    of ``-inf``, so they weigh nothing."""
    samples = np.zeros((rows, k), np.int32)
    combos = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations_with_replacement(range(num_outputs), k)), np.int32
    ).reshape(-1, k)
    samples[: len(combos)] = combos
    # Sorted tuples: an output occurring c times is a run of length c, and log c! is the sum of
    # log(position within the run) along it, so no [multisets, |Y|] count table is needed.
    run = np.ones(len(combos))
    log_counts = np.full(rows, -np.inf)
    log_counts[: len(combos)] = math.lgamma(k + 1)
    for j in range(1, k):
        run = np.where(combos[:, j] == combos[:, j - 1], run + 1, 1.0)
        log_counts[: len(combos)] -= np.log(run)
    return samples, log_counts


@functools.partial(jax.jit, static_argnames=("estimators", "policy"))
def _accumulate(carry, samples, log_counts, logits, rewards, kl_coef, ref_logits, *, estimators, policy):
    """Add one chunk of multisets to every estimator's running ``(sum p g, sum p g g^T)``, for
    each prompt (leading axis of the carry, ``logits``, ``rewards`` and ``ref_logits``); the
    instances are arguments, so one compiled program serves every instance of a shape."""
    valid = jnp.isfinite(log_counts)

    def one_prompt(carry, logits, rewards, ref_logits):
        tables = _tables(policy, logits, ref_logits)
        weight = jnp.where(valid, jnp.exp(log_counts + jnp.sum(tables.log_probs[samples], axis=-1)), 0.0)

        def gradients(estimator):
            return jax.vmap(lambda s: _gradient(estimator, tables, rewards, s, kl_coef))(samples)

        g = jnp.where(valid[None, :, None], jnp.stack([gradients(e) for e in estimators]), 0.0)  # [E, chunk, D]
        first, second = carry
        return first + jnp.einsum("c,ecd->ed", weight, g), second + jnp.einsum("c,ecd,ecf->edf", weight, g, g)

    arguments = (carry, logits, rewards, ref_logits)
    if rewards.shape[0] > 1:
        return jax.vmap(one_prompt)(*arguments)
    # One prompt: without the vmap, which costs compile time (about 1.4x for the atlas's grid).
    first, second = one_prompt(*jax.tree.map(lambda x: x[0], arguments))
    return first[None], second[None]


def compare(moments: Moments, target: jax.Array) -> Comparison:
    """Bias, cosine, best scale, direction bias, total variance and signal-to-noise ratio of
    ``moments`` against the gradient ``target`` (see :class:`Comparison`), for one prompt's
    moments (``mean [D]``; index a prompt of stacked moments first).

    >>> import jax.numpy as jnp
    >>> from jaxrm.tabular import TabularPolicy
    >>> policy, logits, rewards = TabularPolicy(3), jnp.array([[0.0, 0.5, -0.5]]), jnp.array([1.0, 0.0, -1.0])
    >>> moments = estimate_moments(Estimator("rloo", k=2), policy, logits, rewards)
    >>> comparison = compare(moments, objective_gradient(policy, logits, rewards))
    >>> round(comparison.cosine, 6), round(comparison.snr, 3)  # unbiased; |mean|^2 / trace(Cov)
    (1.0, 0.335)
    """
    mean, target = np.asarray(moments.mean), np.asarray(target)
    if mean.ndim != 1 or target.shape != mean.shape:
        raise ValueError(
            f"compare takes one prompt's moments, mean [D], and a target of the same shape; got mean "
            f"{list(mean.shape)} and target {list(target.shape)}. For stacked moments, compare "
            "Moments(m.mean[s], m.covariance[s], m.groups) one prompt at a time."
        )
    target_norm, mean_norm = np.linalg.norm(target), np.linalg.norm(mean)
    scale = float(mean @ target / target_norm**2) if target_norm > 0 else float("nan")
    total = float(np.trace(np.asarray(moments.covariance)))
    return Comparison(
        relative_bias=float(np.linalg.norm(mean - target) / target_norm) if target_norm > 0 else float("nan"),
        cosine=float(mean @ target / (mean_norm * target_norm)) if mean_norm > 0 else float("nan"),
        scale=scale,
        direction_bias=float(np.linalg.norm(mean - scale * target) / mean_norm) if mean_norm > 0 else float("nan"),
        total_variance=total,
        # A noiseless estimate has infinite SNR, unless it is identically 0: then there is none.
        snr=float(mean_norm**2 / total) if total > 0 else (float("inf") if mean_norm > 0 else float("nan")),
    )


def grid(*, ks=(2, 4), kl_estimators=KL_ESTIMATORS) -> list[Estimator]:
    """The estimators of the atlas: every advantage and KL placement at each ``k``, plus the
    variants (filtering, normalizations, clipped surrogate) on RLOO with ``k1`` in the reward
    (for ``k >= 2``; RLOO and GRPO need two samples).

    >>> len(grid(ks=(1,))), len(grid(ks=(2,)))  # 3 or 5 advantages x 3 KL estimators x 3 placements, + 4
    (27, 49)
    """
    estimators = [
        Estimator(advantage, k=k, kl_estimator=kl, kl_placement=placement)
        for k, advantage, kl, placement in itertools.product(ks, ADVANTAGES, kl_estimators, KL_PLACEMENTS)
        if not (advantage in ("rloo", "grpo") and k < 2)
    ]
    for k in (k for k in ks if k >= 2):
        base = dict(advantage="rloo", k=k, kl_estimator="k1", kl_placement="reward")
        estimators += [
            Estimator(**base, filter_zero_variance=True),
            Estimator(**base, reward_normalization="global"),
            Estimator(**base, reward_normalization="group"),
            Estimator(**base, surrogate="clipped"),
        ]
    return estimators
