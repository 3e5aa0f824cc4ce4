"""Reward variance, accuracy and KL: exact (from logits) and from samples.

All functions are pure and work under ``jit``, ``vmap`` and ``grad`` (where differentiable) in
float32 and float64. Conventions (docs/theory.md#conventions):

- Exact quantities take ``logits`` of a categorical distribution over the **last axis** (the
  outputs); any leading axes (prompts, batches) are kept. ``where`` (bool, same shape) removes
  outputs from the support, as if their logit were ``-inf``.
- Sampled quantities take rewards shaped ``[..., k]``: ``k`` samples per prompt on the last axis.
- Sampled variance defaults to ``ddof=1`` (as torch ``var`` and the official code); exact
  variance has no ddof.
- Accuracy ties: a pair agrees when ``sign(rm_i - rm_j) == sign(gt_i - gt_j)`` with
  ``sign`` in ``{-1, 0, +1}``, so a tie agrees only with a tie.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxrm._checks import check_choice, check_finite, check_int, check_key, check_same_shape, is_concrete

__all__ = [
    "accuracy",
    "best_of_n_reward",
    "bootstrap_correlation",
    "bootstrap_correlation_difference",
    "CorrelationInterval",
    "expected_reward",
    "kl",
    "KL_ESTIMATORS",
    "kl_estimate",
    "normalize_rewards",
    "pearson",
    "probabilities",
    "reward_variance",
    "sample_reward_variance",
    "spearman",
    "tied_group_probability",
]

# Up to this many outputs per row, accuracy compares all pairs at once (an n x n block);
# beyond it, a sort-based O(n log^2 n) count keeps memory linear in n.
_DENSE_PAIR_LIMIT = 256


def probabilities(logits: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """``softmax(logits)`` over the last axis, with ``where=False`` outputs given probability 0.

    >>> import jax.numpy as jnp
    >>> print(probabilities(jnp.log(jnp.array([1.0, 3.0]))).round(6))
    [0.25 0.75]
    """
    logits = jnp.asarray(logits)
    if where is not None:
        logits = jnp.where(where, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def _check_support(where):
    """Raise if a concrete ``where`` leaves a row without any output (its distribution would be
    NaN); under a trace such a row gives NaN."""
    if where is not None and is_concrete(where) and np.ndim(where) >= 1:
        empty = ~np.any(np.asarray(where, bool), axis=-1)
        if empty.any():
            index = tuple(int(i) for i in np.argwhere(np.atleast_1d(empty))[0])
            raise ValueError(
                f"where leaves {int(empty.sum())} row(s) without any output (first at index {index}): "
                "every row needs at least one True."
            )


def _numeric(rewards) -> jax.Array:
    """``rewards`` as an array that arithmetic accepts: 0/1 rewards stored as bool become the
    default float dtype (integers already promote)."""
    rewards = jnp.asarray(rewards)
    return rewards.astype(jnp.result_type(float)) if rewards.dtype == jnp.bool_ else rewards


def _masked(values, where):
    """Zero out excluded entries, so ``0 * value`` cannot produce NaN from garbage there."""
    return values if where is None else jnp.where(where, values, 0)


def _centered(rewards, where, *, axis):
    """``rewards`` less their largest value over ``axis`` (on the support ``where``; 0 off it).

    Variances and normalizations are invariant to the shift, and it makes rewards that are
    constant on the support exactly 0, so that their variance is exactly 0: a weighted mean of a
    constant is not always that constant in floating point, and ``(r - mean) / std`` would then
    turn rounding into +-1.
    """
    largest = jnp.max(rewards if where is None else jnp.where(where, rewards, -jnp.inf), axis=axis, keepdims=True)
    return _masked(rewards - largest, where)


def _validate_exact(logits, rewards, where):
    check_same_shape(logits=logits, rewards=rewards, where=where)
    if np.ndim(rewards) < 1 or np.shape(rewards)[-1] == 0:
        raise ValueError(f"rewards need a non-empty last axis of outputs, got shape {np.shape(rewards)}.")
    _check_support(where)
    check_finite("rewards", _masked(rewards, where) if where is not None else rewards)
    check_finite("logits", _masked(logits, where) if where is not None else logits)


def expected_reward(logits: ArrayLike, rewards: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Exact ``E_{y ~ softmax(logits)}[r(y)] = sum_y p(y) r(y)`` over the last axis.

    >>> import jax.numpy as jnp
    >>> float(expected_reward(jnp.zeros(4), jnp.array([0.0, 1.0, 2.0, 3.0])))
    1.5
    """
    _validate_exact(logits, rewards, where)
    probs = probabilities(logits, where=where)
    return jnp.sum(probs * _masked(jnp.asarray(rewards), where), axis=-1)


def reward_variance(logits: ArrayLike, rewards: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Exact reward variance under the policy, over the last axis.

    ``Var_{y ~ p}[r] = sum_y p(y) (r(y) - sum_y' p(y') r(y'))^2`` with ``p = softmax(logits)``
    (Definition 2 of Razin et al., docs/theory.md#accuracy-and-reward-variance; no ddof). Computed in two passes from a max-shifted softmax,
    so it is never negative and stays finite for logits up to ``+-1e4`` and ``10^6`` outputs.

    Args:
      logits: ``[..., Y]`` unnormalized log-probabilities of the outputs.
      rewards: ``[..., Y]`` reward of each output.
      where: optional ``[..., Y]`` bool; ``False`` removes an output from the support.

    Returns:
      ``[...]`` variances.

    >>> import jax.numpy as jnp
    >>> float(reward_variance(jnp.zeros(2), jnp.array([-1.0, 1.0])))
    1.0
    """
    _validate_exact(logits, rewards, where)
    probs = probabilities(logits, where=where)
    rewards = _centered(_numeric(rewards), where, axis=-1)
    mean = jnp.sum(probs * rewards, axis=-1, keepdims=True)
    return jnp.sum(probs * jnp.square(rewards - mean), axis=-1)


def tied_group_probability(logits: ArrayLike, rewards: ArrayLike, *, k: int) -> jax.Array:
    """Probability that ``k`` independent samples of the policy all get the same reward.

    ``P(r(y_1) = ... = r(y_k)) = sum_y p(y) P(r = r(y))^(k - 1)`` with ``p = softmax(logits)``:
    the share of groups whose sampled reward variance is zero (docs/theory.md#theorem-1-under-sampling).
    RLOO's and GRPO's task advantages vanish on them; with a KL folded into the reward, so do
    the whole advantages when the group repeats one output, which is the only way to tie when
    rewards are distinct (then the probability is ``sum_y p(y)^k``). Exact ties only (``O(Y^2)``
    memory).

    Args:
      logits: ``[..., Y]`` unnormalized log-probabilities of the outputs.
      rewards: ``[..., Y]`` reward of each output.
      k: samples per group (an int >= 1).

    Returns:
      ``[...]`` probabilities.

    >>> import jax.numpy as jnp
    >>> float(tied_group_probability(jnp.log(jnp.array([0.5, 0.25, 0.25])), jnp.array([0.0, 1.0, 1.0]), k=2))
    0.5
    """
    check_int("k", k, low=1)
    _validate_exact(logits, rewards, None)
    probs = probabilities(logits)
    rewards = jnp.asarray(rewards)
    same = rewards[..., :, None] == rewards[..., None, :]
    share = jnp.sum(jnp.where(same, probs[..., None, :], 0.0), axis=-1)  # P(r = r(y)) for each y
    return jnp.sum(probs * share ** (k - 1), axis=-1)


def normalize_rewards(logits: ArrayLike, rewards: ArrayLike) -> jax.Array:
    """Rewards ``[..., S, Y]`` shifted and scaled by one mean and standard deviation over all
    prompts under the policy (docs/theory.md#experiments-of-razin-et-al, exact form): ``(r - mu) / sigma`` with
    ``mu = mean_x E_{pi(.|x)}[r]`` and ``sigma^2 = mean_x E_{pi(.|x)}[(r - mu)^2]``.

    Leading axes are independent sets of rewards (e.g. reward models), each normalized alone.
    The within-prompt variance of the result is what a policy-gradient learner feels. Rewards
    that are the same on every output of every prompt (``sigma = 0``) normalise to exactly 0: they
    teach nothing.

    >>> import jax.numpy as jnp
    >>> print(normalize_rewards(jnp.zeros((2, 2)), jnp.array([[0.0, 2.0], [4.0, 6.0]])).round(4))
    [[-1.3416 -0.4472]
     [ 0.4472  1.3416]]
    """
    _validate_exact(logits, rewards, None)
    if np.ndim(rewards) < 2:
        raise ValueError(
            f"normalize_rewards takes rewards [..., S, Y] with a prompt axis, got shape {np.shape(rewards)}; "
            "for one prompt pass shape [1, Y]."
        )
    probs = probabilities(logits)
    rewards = _centered(_numeric(rewards), None, axis=(-2, -1))
    mean = jnp.mean(jnp.sum(probs * rewards, -1), -1)[..., None, None]
    variance = jnp.mean(jnp.sum(probs * jnp.square(rewards - mean), -1), -1)[..., None, None]
    # The square root of a safe value: sqrt's derivative at 0 would make the gradient NaN.
    std = jnp.sqrt(jnp.where(variance > 0, variance, 1.0))
    return jnp.where(variance > 0, (rewards - mean) / std, 0.0)


def sample_reward_variance(rewards: ArrayLike, *, ddof: int = 1, where: ArrayLike | None = None) -> jax.Array:
    """Per-prompt variance of sampled rewards ``[..., k]`` (``k`` samples on the last axis).

    ``sum_i (r_i - mean(r))^2 / (n - ddof)`` with ``n`` the number of valid samples
    (``where``); ``ddof=1`` (default) is torch's ``var`` and the official code's convention,
    ``ddof=0`` numpy's. Rows with ``n <= ddof`` give NaN under ``jit``; with concrete inputs
    they raise.

    >>> import jax.numpy as jnp
    >>> sample_reward_variance(jnp.array([[0.0, 2.0], [1.0, 1.0]])).tolist()
    [2.0, 0.0]
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim < 1:
        raise ValueError("rewards must have a sample axis: shape [..., k].")
    check_int("ddof", ddof, low=0)
    check_same_shape(rewards=rewards, where=where)
    k = rewards.shape[-1]
    if where is None and k <= ddof:
        raise ValueError(f"sample_reward_variance needs more than ddof={ddof} samples per prompt, got k={k}.")
    if where is not None and is_concrete(where):
        fewest = int(np.min(np.sum(np.asarray(where), axis=-1), initial=k))
        if fewest <= ddof:
            raise ValueError(
                f"sample_reward_variance needs more than ddof={ddof} valid samples per prompt; "
                f"a row of `where` has only {fewest}."
            )
    check_finite("rewards", _masked(rewards, where))
    if where is None:
        return jnp.var(rewards, axis=-1, ddof=ddof)
    count = jnp.sum(where, axis=-1)
    rewards = _masked(rewards, where)
    mean = jnp.sum(rewards, axis=-1, keepdims=True) / jnp.expand_dims(count, -1)
    squares = _masked(jnp.square(rewards - mean), where)
    return jnp.where(count > ddof, jnp.sum(squares, axis=-1) / jnp.maximum(count - ddof, 1), jnp.nan)


def kl(logits_p: ArrayLike, logits_q: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Exact ``KL(p || q) = sum_y p(y) (log p(y) - log q(y))`` over the last axis.

    ``p = softmax(logits_p)``, ``q = softmax(logits_q)``; ``where`` restricts both supports (a
    row it leaves without any output raises, or gives NaN under a trace). Clipped at 0 against
    rounding.

    >>> import jax.numpy as jnp
    >>> round(float(kl(jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.9, 0.1])))), 6)
    0.510826
    """
    check_same_shape(logits_p=logits_p, logits_q=logits_q, where=where)
    _check_support(where)
    check_finite("logits_p", _masked(logits_p, where))
    check_finite("logits_q", _masked(logits_q, where))
    logits_p, logits_q = jnp.asarray(logits_p), jnp.asarray(logits_q)
    if where is not None:
        logits_p = jnp.where(where, logits_p, -jnp.inf)
        logits_q = jnp.where(where, logits_q, -jnp.inf)
    log_p = jax.nn.log_softmax(logits_p, axis=-1)
    log_q = jax.nn.log_softmax(logits_q, axis=-1)
    # Outputs outside p's support contribute 0, even where q is 0 too. Their log-probs are
    # replaced before the difference, not after: -inf - -inf is NaN, and a NaN behind a `where`
    # still reaches the gradient.
    support = log_p > -jnp.inf
    log_p, log_q = jnp.where(support, log_p, 0.0), jnp.where(support, log_q, 0.0)
    terms = jnp.where(support, jnp.exp(log_p) * (log_p - log_q), 0.0)
    divergence = jnp.maximum(jnp.sum(terms, axis=-1), 0.0)
    return divergence if where is None else jnp.where(jnp.any(where, axis=-1), divergence, jnp.nan)


KL_ESTIMATORS = ("k1", "k2", "k3")
"""The per-sample KL estimators of :func:`kl_estimate`, chosen everywhere by ``kl_estimator=``."""


def kl_estimate(logp: ArrayLike, ref_logp: ArrayLike, *, kl_estimator: str = "k1") -> jax.Array:
    """Per-sample estimators of ``KL(pi || pi_ref)`` from log-probs of samples ``y ~ pi``.

    With ``log_ratio = ref_logp - logp`` (log of ``pi_ref / pi`` at the sample):

    - ``k1 = -log_ratio``: unbiased, can be negative;
    - ``k2 = log_ratio^2 / 2``: biased, low variance, non-negative;
    - ``k3 = exp(log_ratio) - 1 - log_ratio``: unbiased and non-negative (GRPO's choice).

    Works elementwise on any shape (per token or per sequence).

    >>> import jax.numpy as jnp
    >>> [round(float(kl_estimate(jnp.log(0.5), jnp.log(0.25), kl_estimator=k)), 4) for k in KL_ESTIMATORS]
    [0.6931, 0.2402, 0.1931]
    """
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    check_finite("logp", logp)
    check_finite("ref_logp", ref_logp)
    log_ratio = jnp.asarray(ref_logp) - jnp.asarray(logp)
    if kl_estimator == "k1":
        return -log_ratio
    if kl_estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(log_ratio) - log_ratio


def accuracy(
    rm_rewards: ArrayLike,
    gt_rewards: ArrayLike,
    *,
    probs: ArrayLike | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Pairwise accuracy of a reward model against the ground truth, over the last axis.

    ``acc = sum_{i<j} w_i w_j 1[sign(rm_i - rm_j) == sign(gt_i - gt_j)] / sum_{i<j} w_i w_j``
    over unordered pairs of distinct positions, ``sign`` in ``{-1, 0, +1}`` (a tie agrees only
    with a tie). Weights ``w = 1`` (uniform over pairs) when ``probs`` is None, else
    ``w = probs`` (pairs of *distinct* outputs drawn from the policy: on-policy accuracy).
    ``where=False`` drops a position (and its pairs). On ``[prompts, k]`` samples with
    ``probs=None`` this is the official pairwise accuracy over all sample pairs, where two
    samples of one output are a tie that agrees: it estimates ``P(y = y') + (1 - P(y = y'))``
    times the exact on-policy accuracy, not that accuracy itself (docs/theory.md#accuracy-and-reward-variance).

    Rows with more than 256 entries are counted by sorting (``O(n log^2 n)`` time, ``O(n)``
    memory; no ``n x n`` matrix), so ``n = 10^6`` outputs is fine.

    Args:
      rm_rewards: ``[..., n]`` reward-model scores.
      gt_rewards: ``[..., n]`` ground-truth rewards.
      probs: optional ``[..., n]`` policy probabilities (each row sums to 1 over all ``n``
        positions, the dropped ones included).
      where: optional ``[..., n]`` bool mask of valid positions.

    Returns:
      ``[...]`` accuracies (NaN for a row with fewer than two valid positions, and for one whose
      pair weights all underflow to 0: ``probs`` with all its mass, to the dtype's precision, on
      one output; in float32 that happens once the other outputs are ``e^-88`` times as likely).

    >>> import jax.numpy as jnp
    >>> round(float(accuracy(jnp.array([0.0, 1.0, 2.0]), jnp.array([0.0, 2.0, 1.0]))), 6)  # 2 of 3 pairs
    0.666667
    """
    rm_rewards, gt_rewards = _numeric(rm_rewards), _numeric(gt_rewards)
    check_same_shape(rm_rewards=rm_rewards, gt_rewards=gt_rewards, probs=probs, where=where)
    if rm_rewards.ndim < 1 or rm_rewards.shape[-1] < 2:
        raise ValueError(
            f"accuracy needs at least 2 outputs on the last axis (one pair), got shape {rm_rewards.shape}."
        )
    check_finite("rm_rewards", _masked(rm_rewards, where))
    check_finite("gt_rewards", _masked(gt_rewards, where))
    if probs is not None:
        check_finite("probs", probs)
        if is_concrete(probs):
            values = np.asarray(probs, dtype=np.float64)
            if (values < 0).any():
                raise ValueError("probs must be non-negative.")
            sums = values.sum(axis=-1)
            tol = 1e-3 if np.asarray(probs).dtype.itemsize < 8 else 1e-6
            if np.abs(sums - 1.0).max(initial=0.0) > tol:
                raise ValueError(
                    f"probs must sum to 1 over the last axis (found sums from {sums.min():.6g} to {sums.max():.6g})."
                )
    dtype = jnp.result_type(rm_rewards.dtype, gt_rewards.dtype, jnp.float32)
    weights = jnp.ones(rm_rewards.shape, dtype) if probs is None else jnp.asarray(probs, dtype)
    weights = _masked(weights, where)
    n = rm_rewards.shape[-1]
    count = _dense_agreement if n <= _DENSE_PAIR_LIMIT else _sorted_agreement
    agree, total = count(rm_rewards, gt_rewards, weights)
    return agree / total


def _sums_within_groups(values, restart, *, reverse=False):
    """Running sums of ``values`` along the last axis, inclusive, restarting at every position
    where ``restart`` (scanning from the end when ``reverse``)."""

    def combine(a, b):
        return a[0] | b[0], jnp.where(b[0], b[1], a[1] + b[1])

    return jax.lax.associative_scan(combine, (restart, values), reverse=reverse, axis=values.ndim - 1)[1]


def _earlier_in_group(values, new_group):
    """For each position, the sum of ``values`` at the earlier positions of its (contiguous) group."""
    return jnp.where(new_group, 0.0, jnp.roll(_sums_within_groups(values, new_group), 1, axis=-1))


def _pair_total(weights, new_group=None):
    """``sum_{i<j} w_i w_j`` over pairs in one group: ``sum_j w_j (w_1 + ... + w_{j-1})``, the
    groups starting where ``new_group`` (default: one group).

    A sum of non-negative products: ``((sum w)^2 - sum w^2) / 2`` loses every digit to
    cancellation in float32 when one weight holds nearly all the mass (a peaked policy).
    """
    if new_group is None:
        earlier = jnp.concatenate([jnp.zeros_like(weights[..., :1]), jnp.cumsum(weights[..., :-1], -1)], -1)
    else:
        earlier = _earlier_in_group(weights, new_group)
    return jnp.sum(weights * earlier, -1)


@jax.jit
def _dense_agreement(rm, gt, weights):
    agree = jnp.sign(rm[..., :, None] - rm[..., None, :]) == jnp.sign(gt[..., :, None] - gt[..., None, :])
    n = rm.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    pair_weights = jnp.where(upper, weights[..., :, None] * weights[..., None, :], 0.0)
    # Both sums over the same array in the same order, so rounding keeps agreed <= total.
    agreed = jnp.sum(jnp.where(agree, pair_weights, 0.0), axis=(-2, -1))
    return agreed, jnp.sum(pair_weights, axis=(-2, -1))


@jax.jit
def _sorted_agreement(rm, gt, weights):
    batch = rm.shape[:-1]
    n = rm.shape[-1]
    flat = [x.reshape(-1, n) for x in (rm, gt, weights)]
    agreed, total = jax.vmap(_sorted_agreement_row)(*flat)
    return agreed.reshape(batch), total.reshape(batch)


def _tied_pair_weight(keys, weights):
    """Weight of pairs equal in every key: :func:`_pair_total` within each group of equal keys."""
    order = jnp.lexsort(keys[::-1])
    sorted_keys = [k[order] for k in keys]
    new_group = jnp.zeros(weights.shape, bool).at[0].set(True)
    for k in sorted_keys:
        new_group = new_group | jnp.concatenate([jnp.ones(1, bool), k[1:] != k[:-1]])
    return _pair_total(weights[order], new_group)


def _signed_order_weight(values, weights):
    """``sum_{i<j} w_i w_j sign(v_j - v_i)`` over positions in the given order.

    Bottom-up merge: at each level every element of a right half is compared with the whole
    (sorted) left half of its block by binary search, so all ``i < j`` pairs are seen once.
    """
    n = values.shape[0]
    size = 1 << math.ceil(math.log2(n))
    pad = size - n
    values = jnp.concatenate([values, jnp.full((pad,), values[0], values.dtype)])
    weights = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)])
    total = jnp.zeros((), weights.dtype)
    half = 1
    while half < size:
        blocks = (values.reshape(-1, 2, half), weights.reshape(-1, 2, half))
        left_v, right_v = blocks[0][:, 0], blocks[0][:, 1]
        left_w, right_w = blocks[1][:, 0], blocks[1][:, 1]
        order = jnp.argsort(left_v, axis=-1)
        left_v = jnp.take_along_axis(left_v, order, -1)
        cum_w = jnp.cumsum(jnp.take_along_axis(left_w, order, -1), axis=-1)
        cum_w = jnp.concatenate([jnp.zeros_like(cum_w[:, :1]), cum_w], axis=-1)
        below = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(left_v, right_v)
        at_or_below = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right"))(left_v, right_v)
        lighter = jnp.take_along_axis(cum_w, below, -1)
        heavier = cum_w[:, -1:] - jnp.take_along_axis(cum_w, at_or_below, -1)
        total = total + jnp.sum(right_w * (lighter - heavier))
        half *= 2
    return total


def _sorted_agreement_row(rm, gt, weights):
    # Kendall-style decomposition: pairs are concordant (C), discordant (D), tied in rm only,
    # tied in gt only, or tied in both (T_both). Agreement = C + T_both.
    total = _pair_total(weights)
    tied_rm = _tied_pair_weight([rm], weights)
    tied_gt = _tied_pair_weight([gt], weights)
    tied_both = _tied_pair_weight([rm, gt], weights)
    order = jnp.lexsort((gt, rm))  # by rm, ties broken by gt ascending
    signed = _signed_order_weight(gt[order], weights[order])
    # Pairs tied in rm (but not gt) appear in gt-ascending order, adding +w_i w_j each.
    concordant_minus_discordant = signed - (tied_rm - tied_both)
    concordant_plus_discordant = total - tied_rm - tied_gt + tied_both
    concordant = 0.5 * (concordant_plus_discordant + concordant_minus_discordant)
    return concordant + tied_both, total


def best_of_n_reward(
    logits: ArrayLike,
    rm_rewards: ArrayLike,
    gt_rewards: ArrayLike,
    n: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Exact expected ground-truth reward of Best-of-N sampling, over the last axis.

    Draw ``N`` outputs i.i.d. from ``p = softmax(logits)`` and keep one with the highest
    ``rm_rewards`` (ties broken uniformly). With the outputs grouped by equal ``rm`` value
    ``v_1 < v_2 < ...``, ``F_k = P(r_RM <= v_k)`` and ``m_k`` the mean ``r_G`` of group ``k``
    under ``p``: ``E[r_G] = sum_k (F_k^N - F_{k-1}^N) m_k`` (a sample from the winning group is
    distributed as ``p`` restricted to it).

    Args:
      logits, rm_rewards, gt_rewards: ``[..., Y]``.
      n: number of samples; an array broadcasts against the leading axes (e.g.
        ``n[:, None]`` against ``[S, Y]`` inputs gives ``[len(n), S]``).

    >>> import jax.numpy as jnp
    >>> gt = jnp.array([0.0, 1.0])
    >>> [float(best_of_n_reward(jnp.zeros(2), gt, gt, n)) for n in (1, 2)]  # 1 - 0.5^N
    [0.5, 0.75]
    """
    check_same_shape(logits=logits, rm_rewards=rm_rewards, gt_rewards=gt_rewards, where=where)
    _check_support(where)
    check_finite("logits", _masked(logits, where))
    check_finite("rm_rewards", _masked(rm_rewards, where))
    check_finite("gt_rewards", _masked(gt_rewards, where))
    if is_concrete(n) and not np.all((np.asarray(n) >= 1) & (np.asarray(n) == np.floor(np.asarray(n)))):
        raise ValueError(f"n must hold whole numbers >= 1 (samples drawn), got {n}.")
    if np.ndim(rm_rewards) < 1 or np.shape(rm_rewards)[-1] == 0:
        raise ValueError(f"rm_rewards need a non-empty last axis of outputs, got shape {np.shape(rm_rewards)}.")
    return _best_of_n(logits, rm_rewards, gt_rewards, n, where)


@jax.jit
def _best_of_n(logits, rm_rewards, gt_rewards, n, where):
    """:func:`best_of_n_reward` after its checks, as one program (op by op, its scans compile slowly)."""
    probs = probabilities(logits, where=where)
    rm = jnp.asarray(rm_rewards)
    if where is not None:
        rm = jnp.where(where, rm, -jnp.inf)  # outside the support, never the best (mass 0 anyway)
    order = jnp.argsort(rm, axis=-1)
    rm_sorted = jnp.take_along_axis(rm, order, -1)
    p_sorted = jnp.take_along_axis(probs, order, -1)
    value_sorted = jnp.take_along_axis(_masked(jnp.asarray(gt_rewards), where), order, -1) * p_sorted
    boundary = rm_sorted[..., 1:] != rm_sorted[..., :-1]
    first_of_group = jnp.concatenate([jnp.ones_like(rm_sorted[..., :1], bool), boundary], -1)
    last_of_group = jnp.concatenate([boundary, jnp.ones_like(rm_sorted[..., :1], bool)], -1)
    # Every mass below is a sum of non-negative terms, never a difference of cumulative sums,
    # which in float32 loses a light group's mass next to a heavy one.
    group_mass = _earlier_in_group(p_sorted, first_of_group) + _sums_within_groups(
        p_sorted, last_of_group, reverse=True
    )
    # F_k = P(r_RM <= v_k) summed from below, and 1 - F_k (the mass above group k) from above:
    # F_k^N takes whichever is the smaller, so F_k near 1 keeps its digits at large N.
    cdf = _group_end_values(jnp.cumsum(p_sorted, -1), last_of_group)
    above = jnp.concatenate([jnp.cumsum(p_sorted[..., :0:-1], -1)[..., ::-1], jnp.zeros_like(p_sorted[..., :1])], -1)
    above = -_group_end_values(-above, last_of_group)
    n = jnp.asarray(n, probs.dtype)[..., None]
    small = cdf <= 0.5
    cdf_power = jnp.where(small, cdf**n, jnp.exp(n * jnp.log1p(-jnp.where(small, 0.0, above))))
    # P(the best sample falls in this output's group) = F_k^N - F_{k-1}^N
    # = F_k^N (1 - (1 - mass_k / F_k)^N): no difference of two numbers near 1 at large N.
    has_mass_below = group_mass < cdf
    share_of_cdf = jnp.where(has_mass_below, group_mass / jnp.where(has_mass_below, cdf, 1.0), 0.0)
    win = cdf_power * jnp.where(has_mass_below, -jnp.expm1(n * jnp.log1p(-share_of_cdf)), 1.0)
    share = jnp.where(group_mass > 0, value_sorted / jnp.where(group_mass > 0, group_mass, 1.0), 0.0)
    return jnp.sum(win * share, axis=-1)


def _group_end_values(cum, last_of_group):
    """For each position, ``cum`` at the last position of its tie group (``cum`` non-decreasing)."""
    at_end = jnp.where(last_of_group, cum, jnp.inf)
    return jax.lax.cummin(at_end, axis=cum.ndim - 1, reverse=True)


def pearson(x: ArrayLike, y: ArrayLike, *, axis: int = -1) -> jax.Array:
    """Pearson correlation of ``x`` and ``y`` along ``axis``.

    >>> import jax.numpy as jnp
    >>> round(float(pearson(jnp.arange(5.0), 2 * jnp.arange(5.0) + 1)), 6)
    1.0
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    check_same_shape(x=x, y=y)
    check_finite("x", x)
    check_finite("y", y)
    x = x - jnp.mean(x, axis=axis, keepdims=True)
    y = y - jnp.mean(y, axis=axis, keepdims=True)
    return jnp.sum(x * y, axis=axis) / jnp.sqrt(jnp.sum(x * x, axis=axis) * jnp.sum(y * y, axis=axis))


def spearman(x: ArrayLike, y: ArrayLike, *, axis: int = -1) -> jax.Array:
    """Spearman rank correlation along ``axis``: Pearson of the ranks, ties given their average rank.

    Ranks come from one sort along ``axis`` (``O(n log n)``).

    >>> import jax.numpy as jnp
    >>> round(float(spearman(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 4.0, 9.0]))), 6)
    1.0
    """
    # Ranks would place a NaN last without a word: refuse it here, before ranking.
    check_same_shape(x=x, y=y)
    check_finite("x", x)
    check_finite("y", y)
    return pearson(_average_ranks(x, axis), _average_ranks(y, axis), axis=axis)


class CorrelationInterval(NamedTuple):
    """A correlation with its percentile-bootstrap interval (:func:`bootstrap_correlation`).

    Attributes:
      estimate: the correlation of ``x`` with ``y`` averaged over seeds.
      low, high: the interval's ends.
      resamples: resamples whose correlation is defined (a resample that repeats one model, or
        whose ``x`` or averaged ``y`` is constant, has none and is left out).
    """

    estimate: jax.Array
    low: jax.Array
    high: jax.Array
    resamples: jax.Array


def bootstrap_correlation(
    x: ArrayLike,
    y: ArrayLike,
    key: jax.Array,
    *,
    kind: str = "spearman",
    num_resamples: int = 2000,
    level: float = 0.95,
) -> CorrelationInterval:
    """Correlation over models of a property ``x`` with an outcome ``y`` measured on several
    seeds, with a two-stage percentile-bootstrap interval.

    The estimate is ``corr(x, mean_s y[:, s])``. Each resample draws ``M`` models with
    replacement and, for each drawn model, its ``S`` seeds with replacement, so the interval
    carries both the choice of models and the seed noise of each outcome (Davison & Hinkley
    1997, §3.8, for resampling in two stages). With a handful of models the interval is wide:
    that is the information, not a defect.

    Args:
      x: ``[M]`` property of each model (e.g. reward variance), ``M >= 3``.
      y: ``[M]`` or ``[M, S]`` outcome of each model on each seed (e.g. ground-truth gain).
      key: ``jax.random`` key of the resamples.
      kind: ``spearman`` (ranks, ties averaged) or ``pearson``.
      num_resamples: bootstrap resamples (an int >= 1).
      level: coverage of the interval, in ``(0, 1)``.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(8.0)
    >>> y = x[:, None] + 0.1 * jax.random.normal(jax.random.key(0), (8, 5))
    >>> out = bootstrap_correlation(x, y, jax.random.key(1))
    >>> float(out.estimate), bool(0.9 < out.low <= out.high <= 1.0)
    (1.0, True)
    """
    if np.ndim(x) != 1:
        raise ValueError(f"x must be shaped [M] with M >= 3 models, got {np.shape(x)}.")
    estimate, resampled = _bootstrapped_correlations(jnp.asarray(x)[None], y, key, kind, num_resamples, level)
    return _interval(estimate[0], resampled[:, 0], level)


def bootstrap_correlation_difference(
    x_a: ArrayLike,
    x_b: ArrayLike,
    y: ArrayLike,
    key: jax.Array,
    *,
    kind: str = "spearman",
    num_resamples: int = 2000,
    level: float = 0.95,
) -> CorrelationInterval:
    """``corr(x_a, y) - corr(x_b, y)`` over models, with the interval of the same two-stage
    bootstrap as :func:`bootstrap_correlation`, both correlations computed on each resample
    (a paired bootstrap: does property ``a`` predict the outcome better than property ``b``?).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(8.0)
    >>> y = x[:, None] + 0.1 * jax.random.normal(jax.random.key(0), (8, 5))
    >>> out = bootstrap_correlation_difference(x, -x, y, jax.random.key(1))
    >>> float(out.estimate), bool(out.low > 1.5)
    (2.0, True)
    """
    if np.shape(x_a) != np.shape(x_b) or np.ndim(x_a) != 1:
        raise ValueError(f"x_a and x_b must have one shape [M], got {np.shape(x_a)} and {np.shape(x_b)}.")
    stacked = jnp.stack([jnp.asarray(x_a), jnp.asarray(x_b)])
    estimate, resampled = _bootstrapped_correlations(stacked, y, key, kind, num_resamples, level, name="x_a and x_b")
    return _interval(estimate[0] - estimate[1], resampled[:, 0] - resampled[:, 1], level)


def _bootstrapped_correlations(x, y, key, kind, num_resamples, level, *, name="x"):
    """Checks, then the correlation of each row of ``x [P, M]`` with the seed mean of ``y`` and
    the same correlations on ``num_resamples`` two-stage resamples, ``[num_resamples, P]``.
    ``name``: the caller's argument that ``x`` holds, for the error messages."""
    check_choice("kind", kind, ("spearman", "pearson"))
    check_int("num_resamples", num_resamples, low=1)
    check_key("key", key)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or x.shape[1] < 3:
        raise ValueError(f"{name} must be shaped [M] with M >= 3 models, got {x.shape[1:]}.")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[1]:
        raise ValueError(f"y must be shaped [M] or [M, S] with M = {x.shape[1]} models, got {y.shape}.")
    check_finite(name, x)
    check_finite("y", y)
    y = y if y.ndim == 2 else y[:, None]
    return _resampled_correlations(x, y, key, kind=kind, num_resamples=num_resamples)


@functools.partial(jax.jit, static_argnames=("kind", "num_resamples"))
def _resampled_correlations(x, y, key, *, kind, num_resamples):
    # One compiled program per shape: op-by-op, the resampling dispatched hundreds of small programs.
    correlate = jax.vmap(spearman if kind == "spearman" else pearson, in_axes=(0, None))
    num_models, num_seeds = y.shape
    model_key, seed_key = jax.random.split(key)
    models = jax.random.randint(model_key, (num_resamples, num_models), 0, num_models)
    seeds = jax.random.randint(seed_key, (num_resamples, num_models, num_seeds), 0, num_seeds)

    def resample(picks):
        drawn, drawn_seeds = picks
        return correlate(x[:, drawn], jnp.take_along_axis(y[drawn], drawn_seeds, axis=-1).mean(-1))

    return correlate(x, y.mean(-1)), jax.vmap(resample)((models, seeds))


def _interval(estimate, resampled, level) -> CorrelationInterval:
    low, high = jnp.nanquantile(resampled, jnp.array([(1 - level) / 2, (1 + level) / 2]))
    return CorrelationInterval(estimate, low, high, jnp.sum(jnp.isfinite(resampled)).astype(jnp.int32))


def _average_ranks(x, axis):
    """0-based ranks, ties given their average: ``#{below} + (#{equal} - 1) / 2``, from one sort
    (two binary searches per element), ``O(n log n)``."""
    x = jnp.asarray(x)
    # float32 stays float32 under x64 and float64 stays float64; 16-bit floats cannot hold ranks
    # (nor pearson's sums of them), so they rank in float32; integers in the default float.
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    dtype = jnp.promote_types(x.dtype, jnp.float32) if floating else jnp.result_type(float)
    x = jnp.moveaxis(x.astype(dtype), axis, -1)
    ordered = jnp.sort(x, axis=-1)

    def row(sorted_row, values):
        below = jnp.searchsorted(sorted_row, values, side="left")
        rank = below + (jnp.searchsorted(sorted_row, values, side="right") - below - 1) / 2.0
        return rank.astype(sorted_row.dtype)

    flat = row
    for _ in range(x.ndim - 1):
        flat = jax.vmap(flat)
    return jnp.moveaxis(flat(ordered, x), -1, axis)
