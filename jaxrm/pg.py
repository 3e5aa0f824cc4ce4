"""Policy-gradient kernels: advantages, KL penalties, surrogate losses, reward normalization.

Pure functions in the style of optax. Shapes: sampled rewards are ``[prompts, k]`` (k responses
per prompt); per-token arrays are ``[prompts, k, time]`` (or any ``[..., time]``) with a boolean
``mask`` that is True on response tokens. Sequence-level quantities drop the last axis.

Gradient conventions: advantages and rewards carry no gradient (the kernels apply
``stop_gradient``); a loss is *minimised*, so the policy-gradient ascent direction is
``-grad loss``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxrm._checks import check_choice, check_finite, check_int, check_same_shape, is_concrete
from jaxrm.metrics import kl_estimate

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "RATIO_LEVELS",
    "REWARD_NORMALIZATIONS",
    "aggregate",
    "clipped_surrogate_loss",
    "dr_grpo_advantages",
    "entropy_per_token",
    "grpo_advantages",
    "kl_penalized_rewards",
    "kl_per_token",
    "normalize_sampled_rewards",
    "reinforce_advantages",
    "reinforce_loss",
    "reward_statistics",
    "rloo_advantages",
    "scale_per_group",
]

AGGREGATIONS = ("token-mean", "sequence-mean", "sequence-sum")
RATIO_LEVELS = ("token", "sequence")
REWARD_NORMALIZATIONS = ("std", "rsqrt_var")
"""How :func:`normalize_sampled_rewards` scales (docs/theory.md#conventions): ``std`` divides by
``std + eps`` (ddof 0), ``rsqrt_var`` multiplies by ``rsqrt(var + eps)`` (ddof 1, the official RLOO)."""


def _check_group(rewards, minimum: int, what: str):
    if jnp.ndim(rewards) < 1 or jnp.shape(rewards)[-1] < minimum:
        raise ValueError(
            f"{what} needs rewards shaped [prompts, k] with k >= {minimum} samples per prompt, got shape "
            f"{jnp.shape(rewards)}."
        )
    check_finite("rewards", rewards)


def _check_eps(eps) -> None:
    """A stabilizing ``eps`` added to a standard deviation or variance: a number ``>= 0``."""
    if is_concrete(eps) and not (np.ndim(eps) == 0 and float(eps) >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}.")


def _check_per_sequence(what: str, values, per_token) -> None:
    """``values`` hold one number per sequence of the ``[..., time]`` array ``per_token``: without
    this check, a ``[prompts]`` array against ``[prompts, k, time]`` would broadcast silently."""
    if np.shape(values) != np.shape(per_token)[:-1]:
        raise ValueError(
            f"{what} must hold one value per sequence, shaped {list(np.shape(per_token)[:-1])} (the per-token "
            f"arrays {list(np.shape(per_token))} less their time axis), got {list(np.shape(values))}."
        )


def _check_rank(what: str, value, rewards) -> None:
    """``value`` is a finite scalar, or has ``rewards``' rank and broadcasts to them: a ``[P]``
    array against ``[P, k]`` rewards would broadcast along ``k`` (one value per sample when
    ``P == k``), not per prompt."""
    shape, target = np.shape(value), np.shape(rewards)
    fits = len(shape) == len(target) and all(a in (1, b) for a, b in zip(shape, target))
    if shape and not fits:
        raise ValueError(
            f"{what} must be a scalar or have the rank of the rewards {list(target)} and broadcast to them (e.g. "
            f"{list(target[:-1]) + [1]} for one per prompt), got shape {list(shape)}."
        )
    check_finite(what, value)


def reinforce_advantages(rewards: ArrayLike, *, baseline: ArrayLike = 0.0) -> jax.Array:
    """``A = r - b``: REINFORCE, with a baseline ``b``: a scalar, or an array of ``rewards``' rank
    that broadcasts to it (``[P, 1]`` for one per prompt against ``[P, k]``).

    A baseline that does not depend on the sample keeps the gradient estimate unbiased.

    >>> reinforce_advantages(jnp.array([[1.0, 3.0]]), baseline=1.0).tolist()
    [[0.0, 2.0]]
    """
    check_finite("rewards", rewards)
    _check_rank("baseline", baseline, rewards)
    return jax.lax.stop_gradient(jnp.asarray(rewards) - baseline)


def rloo_advantages(rewards: ArrayLike) -> jax.Array:
    """Leave-one-out: ``A_i = r_i - mean_{j != i} r_j = k / (k - 1) (r_i - mean_j r_j)`` over the last axis.

    Each sample's baseline uses only the other samples of its prompt, so the estimate stays
    unbiased (Kool et al. 2019; RLOO of Ahmadian et al. 2024).

    >>> rloo_advantages(jnp.array([[1.0, 2.0, 6.0]])).tolist()
    [[-3.0, -1.5, 4.5]]
    """
    _check_group(rewards, 2, "rloo_advantages")
    rewards = jnp.asarray(rewards)
    k = rewards.shape[-1]
    return jax.lax.stop_gradient(k / (k - 1) * (rewards - jnp.mean(rewards, axis=-1, keepdims=True)))


def grpo_advantages(rewards: ArrayLike, *, scale: bool = True, ddof: int = 1, eps: float = 1e-4) -> jax.Array:
    """GRPO group advantages ``(r_i - mean_j r_j) / (std_j r_j + eps)`` over the last axis.

    ``ddof=1`` (default) is torch's ``std``, as in TRL's GRPO; ``scale=False`` gives Dr. GRPO
    (Liu et al. 2025), ``r_i - mean_j r_j`` without the standard deviation.

    >>> [round(a, 4) for a in grpo_advantages(jnp.array([[1.0, 3.0]]), eps=0.0)[0].tolist()]
    [-0.7071, 0.7071]
    """
    check_int("ddof", ddof, low=0)
    _check_eps(eps)
    _check_group(rewards, ddof + 1 if scale else 1, "grpo_advantages")
    rewards = jnp.asarray(rewards)
    centered = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if scale:
        centered = centered / (jnp.std(rewards, axis=-1, ddof=ddof, keepdims=True) + eps)
    return jax.lax.stop_gradient(centered)


def dr_grpo_advantages(rewards: ArrayLike) -> jax.Array:
    """Dr. GRPO: ``r_i - mean_j r_j`` (GRPO without the standard-deviation scaling).

    >>> dr_grpo_advantages(jnp.array([[1.0, 3.0]])).tolist()
    [[-1.0, 1.0]]
    """
    return grpo_advantages(rewards, scale=False)


ADVANTAGE_ESTIMATORS = {
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "reinforce": reinforce_advantages,
}
"""The advantage kernels by name (chosen everywhere by ``advantage_estimator=``), each with its
defaults: ``advantages = ADVANTAGE_ESTIMATORS[advantage_estimator](rewards)``."""


def _masked_sum(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)


def kl_per_token(logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike, *, kl_estimator: str = "k1") -> jax.Array:
    """Per-token KL estimates (``k1``/``k2``/``k3`` of :func:`jaxrm.metrics.kl_estimate`), 0 off ``mask``.

    >>> kl = kl_per_token(jnp.log(jnp.array([[0.5, 0.5]])), jnp.log(jnp.array([[0.25, 0.5]])),
    ...                   jnp.array([[True, False]]), kl_estimator="k2")
    >>> [round(v, 4) for v in kl[0].tolist()]  # (log 2)^2 / 2 on the first token only
    [0.2402, 0.0]
    """
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    mask = jnp.asarray(mask, bool)
    # Padding zeroed before the estimator: whatever it holds (-inf, NaN, a huge gap) can then
    # neither fail the finiteness check nor send NaN into the gradient through `where`.
    logp, ref_logp = (jnp.where(mask, x, 0.0) for x in (logp, ref_logp))
    return jnp.where(mask, kl_estimate(logp, ref_logp, kl_estimator=kl_estimator), 0.0)


def kl_penalized_rewards(
    rewards: ArrayLike,
    logp: ArrayLike,
    ref_logp: ArrayLike,
    mask: ArrayLike,
    *,
    kl_coef: ArrayLike,
    kl_estimator: str = "k1",
) -> jax.Array:
    """``r - kl_coef * sum_t KL_t``: the KL folded into the sequence reward (RLOO,
    docs/theory.md#official-rloo-and-grpo-semantics).

    ``rewards`` is ``[...]`` and the per-token arrays ``[..., time]``; ``kl_coef`` (``>= 0``) is a
    scalar, or an array of ``rewards``' rank that broadcasts to it (``[P, 1]`` for one per prompt
    against ``[P, k]``). The result carries no gradient.

    >>> r = kl_penalized_rewards(jnp.array([1.0]), jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -2.5]]),
    ...                          jnp.array([[True, True]]), kl_coef=0.1)
    >>> round(float(r[0]), 6)
    0.9
    """
    if is_concrete(kl_coef) and not np.all(np.asarray(kl_coef) >= 0):
        raise ValueError(f"kl_coef must be >= 0 (and not NaN), got {kl_coef}.")
    _check_per_sequence("rewards", rewards, logp)
    check_finite("rewards", rewards)
    _check_rank("kl_coef", kl_coef, rewards)
    penalty = _masked_sum(kl_per_token(logp, ref_logp, mask, kl_estimator=kl_estimator), mask)
    return jax.lax.stop_gradient(jnp.asarray(rewards) - kl_coef * penalty)


def aggregate(per_token: ArrayLike, mask: ArrayLike, *, aggregation: str = "token-mean") -> jax.Array:
    """Reduce a ``[..., time]`` per-token loss to a scalar.

    - ``token-mean``: sum over every response token / number of response tokens (long responses
      weigh more);
    - ``sequence-mean``: mean over sequences of each sequence's token mean (original GRPO);
    - ``sequence-sum``: mean over sequences of each sequence's token sum (Dr. GRPO's constant
      normaliser; the sequence-level REINFORCE/RLOO loss).

    The sequence modes average over the sequences with at least one token in ``mask``: a row
    with none (padding a batch to a fixed size) changes nothing.

    >>> loss, mask = jnp.array([[1.0, 3.0], [2.0, 0.0]]), jnp.array([[True, True], [True, False]])
    >>> [float(aggregate(loss, mask, aggregation=m)) for m in AGGREGATIONS]
    [2.0, 2.0, 3.0]
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_same_shape(per_token=per_token, mask=mask)
    mask = jnp.asarray(mask, bool)
    sums = _masked_sum(per_token, mask)
    if aggregation == "token-mean":
        return jnp.sum(sums) / jnp.maximum(jnp.sum(mask), 1)
    lengths = jnp.sum(mask, axis=-1)
    sequences = jnp.maximum(jnp.sum(lengths > 0), 1)
    if aggregation == "sequence-mean":
        return jnp.sum(sums / jnp.maximum(lengths, 1)) / sequences
    return jnp.sum(sums) / sequences


def reinforce_loss(
    logp: ArrayLike, advantages: ArrayLike, mask: ArrayLike, *, aggregation: str = "sequence-sum"
) -> jax.Array:
    """``-A * log pi(y_t | ...)`` per token, aggregated: the score-function surrogate.

    ``logp`` and ``mask`` are ``[..., time]`` and ``advantages`` ``[...]`` (one per sequence).
    With ``sequence-sum`` its gradient is ``-mean_i A_i grad log pi(y_i)``.

    >>> logp, mask = jnp.array([[-1.0, -2.0], [-0.5, -9.0]]), jnp.array([[True, True], [True, False]])
    >>> float(reinforce_loss(logp, jnp.array([1.0, -2.0]), mask))  # (3 - 1) / 2
    1.0
    """
    check_same_shape(logp=logp, mask=mask)
    _check_per_sequence("advantages", advantages, logp)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    # The advantage of a fully padded row may be anything (NaN): 0 * NaN would reach the gradient.
    advantages = jnp.where(jnp.asarray(mask, bool), jax.lax.stop_gradient(advantages)[..., None], 0.0)
    return aggregate(-advantages * logp, mask, aggregation=aggregation)


def clipped_surrogate_loss(
    logp: ArrayLike,
    old_logp: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    clip_eps: float = 0.2,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)``; returns ``(loss, clip_fraction)``.

    ``ratio_level="token"``: ``rho_t = pi(y_t) / pi_old(y_t)`` per token (PPO, GRPO), aggregated by
    ``aggregation``. ``ratio_level="sequence"``: one ratio per sequence,
    ``rho = exp(sum_t log pi(y_t) - log pi_old(y_t))`` (the official RLOO), then the mean over
    sequences, whatever ``aggregation``. ``clip_fraction`` is the share of ratios (tokens or sequences) whose clipped branch
    was active. ``advantages`` hold one value per sequence (``[...]``).

    >>> logp, old = jnp.log(jnp.array([[0.6, 0.5]])), jnp.log(jnp.array([[0.4, 0.5]]))
    >>> loss, clipped = clipped_surrogate_loss(logp, old, jnp.array([1.0]), jnp.array([[True, True]]))
    >>> round(float(loss), 4), float(clipped)  # ratios 1.5 (clipped to 1.2) and 1
    (-1.1, 0.5)
    """
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if is_concrete(clip_eps) and not float(clip_eps) > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}.")
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    _check_per_sequence("advantages", advantages, logp)
    mask = jnp.asarray(mask, bool)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = jnp.where(mask, logp - jax.lax.stop_gradient(old_logp), 0.0)
    if ratio_level == "sequence":
        log_ratio, advantages, mask = jnp.sum(log_ratio, axis=-1), advantages, jnp.any(mask, axis=-1)
    else:
        advantages = jnp.broadcast_to(advantages[..., None], log_ratio.shape)
    # min(rho A, clip(rho) A) is min(rho, 1 + eps) A for A > 0 and max(rho, 1 - eps) A otherwise.
    # Bounding the log-ratio before exponentiating keeps an overflowing ratio (inf) out of every
    # branch that takes no part, where `inf * 0` would make the loss or its gradient NaN.
    positive = advantages > 0
    upper = jnp.log1p(clip_eps)
    ratio = jnp.exp(jnp.where(positive, jnp.minimum(log_ratio, upper), jnp.where(advantages < 0, log_ratio, 0.0)))
    per_item = -jnp.where(positive, ratio, jnp.maximum(ratio, 1.0 - clip_eps)) * advantages
    was_clipped = mask & (
        (positive & (log_ratio > upper)) | ((advantages < 0) & (log_ratio < jnp.log1p(-jnp.minimum(clip_eps, 1.0))))
    )
    count = jnp.maximum(jnp.sum(mask), 1)
    if ratio_level == "sequence":
        loss = jnp.sum(jnp.where(mask, per_item, 0.0)) / count
    else:
        loss = aggregate(per_item, mask, aggregation=aggregation)
    return loss, jnp.sum(was_clipped, dtype=jnp.float32) / count


def entropy_per_token(logits: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Entropy ``-sum_v p_v log p_v`` of each position's next-token distribution, 0 off ``mask``.

    ``logits`` is ``[..., time, vocab]`` and ``mask`` ``[..., time]``.

    >>> [round(h, 4) for h in entropy_per_token(jnp.zeros((1, 2, 4)), jnp.array([[True, False]]))[0].tolist()]
    [1.3863, 0.0]
    """
    if np.shape(logits)[:-1] != np.shape(mask):
        raise ValueError(
            f"logits {list(np.shape(logits))} must be mask's shape {list(np.shape(mask))} plus a vocabulary axis."
        )
    mask = jnp.asarray(mask, bool)
    log_probs = jax.nn.log_softmax(jnp.where(mask[..., None], logits, 0.0), axis=-1)
    # 0 log 0 = 0: logits of -inf (a masked or filtered vocabulary) add nothing, rather than NaN.
    probs = jnp.exp(log_probs)
    entropy = -jnp.sum(probs * jnp.where(probs > 0, log_probs, 0.0), axis=-1)
    return jnp.where(mask, entropy, 0.0)


def reward_statistics(rewards: ArrayLike, *, ddof: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(mean, std)`` over every sample, ``std`` with ``ddof`` (0: numpy; 1: torch and the
    official RLOO), measured once on the initial policy
    (docs/theory.md#experiments-of-razin-et-al). The default ``ddof=0`` is the one that
    :func:`normalize_sampled_rewards`'s default ``normalization="std"`` expects; pass ``ddof=1``
    for ``"rsqrt_var"`` (:attr:`jaxrm.train.rlhf.RLHFConfig.reward_ddof` picks it from the config).

    >>> [round(float(v), 4) for v in reward_statistics(jnp.array([0.0, 2.0]), ddof=1)]
    [1.0, 1.4142]
    """
    check_int("ddof", ddof, low=0)
    check_finite("rewards", rewards)
    rewards = jnp.asarray(rewards)
    if rewards.size < max(2, ddof + 1):
        raise ValueError(f"reward_statistics needs more than max(1, ddof={ddof}) rewards, got {rewards.size}.")
    return jnp.mean(rewards), jnp.std(rewards, ddof=ddof)


def normalize_sampled_rewards(
    rewards: ArrayLike,
    mean: ArrayLike,
    std: ArrayLike,
    *,
    normalization: str = "std",
    eps: float = 1e-8,
    clip: float | None = None,
) -> jax.Array:
    """Shift and scale sampled rewards by fixed statistics, optionally clipped to ``[-clip, clip]``.

    - ``normalization="std"``: ``(r - mean) / (std + eps)``;
    - ``normalization="rsqrt_var"``: ``(r - mean) * rsqrt(std^2 + eps)`` (the official RLOO,
      with ``std`` measured with ``ddof=1``; docs/theory.md#official-rloo-and-grpo-semantics).

    ``std = 0`` is allowed and divides by ``eps`` (or its square root) alone: a reward that was
    constant when the statistics were measured and differs later is then scaled by ``1e8``
    (``1e4`` under ``rsqrt_var``; :func:`jaxrm.train.driver.run_rlhf` refuses such statistics).

    >>> normalize_sampled_rewards(jnp.array([0.0, 4.0]), 2.0, 2.0, eps=0.0).tolist()
    [-1.0, 1.0]
    """
    check_choice("normalization", normalization, REWARD_NORMALIZATIONS)
    _check_eps(eps)
    if clip is not None and is_concrete(clip) and not (np.ndim(clip) == 0 and float(clip) > 0):
        raise ValueError(f"clip must be > 0 (rewards are clipped to [-clip, clip]) or None, got {clip}.")
    check_finite("rewards", rewards)
    check_finite("mean", mean)
    if is_concrete(std) and not np.all(np.isfinite(np.asarray(std)) & (np.asarray(std) >= 0)):
        raise ValueError(f"std must be finite and >= 0, got {std}.")
    centered = jnp.asarray(rewards) - mean
    if normalization == "std":
        normalized = centered / (std + eps)
    else:
        normalized = centered * jax.lax.rsqrt(jnp.square(std) + eps)
    return normalized if clip is None else jnp.clip(normalized, -clip, clip)


def scale_per_group(rewards: ArrayLike, *, ddof: int = 1, eps: float = 1e-8) -> jax.Array:
    """``r / (std_k r + eps)``: each prompt's rewards divided by their own standard deviation over
    the last (``k``) axis, with ``ddof=1`` (default, torch's ``std``) or ``0``; not centered.

    >>> [round(v, 4) for v in scale_per_group(jnp.array([[1.0, 3.0]]), eps=0.0)[0].tolist()]  # std 1.4142
    [0.7071, 2.1213]
    """
    check_int("ddof", ddof, low=0)
    _check_eps(eps)
    _check_group(rewards, max(2, ddof + 1), "scale_per_group")
    rewards = jnp.asarray(rewards)
    return rewards / (jnp.std(rewards, axis=-1, ddof=ddof, keepdims=True) + eps)
