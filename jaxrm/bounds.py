"""The papers' bounds with their explicit constants, as pure functions (numpy or jax arrays).

Notation of docs/theory.md#setting: ``gamma`` the gain, ``variance`` the reward-model variance
under the initial policy, ``lam`` the KL coefficient, ``L`` the output length, ``J`` the bound on
the Jacobian of the logits, ``|S|`` the number of prompts. Array arguments broadcast against each
other; results are numpy (a 0-d result comes back as a numpy scalar). The arguments are checked
against each theorem's hypotheses, so these functions need concrete values: call them outside
``jit``.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

from jaxrm._checks import check_int


def _checked(name: str, value, *, positive: bool = False):
    """``value`` as a float array; ``ValueError`` naming ``name`` if any entry is NaN or out of range."""
    array = np.asarray(value, float)
    bad = ~(array > 0) if positive else ~(array >= 0)
    if bad.any():
        rule = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {rule} (and not NaN); got {array[bad].ravel()[:4].tolist()}.")
    return array


def _checked_variance(variance, *, kl: bool = False):
    """The reward variance, ``>= 0`` and at most 1: these bounds hold for rewards in ``[-1, 1]``
    (docs/theory.md#setting), whose variance is at most 1. A larger one means rewards outside that
    range, where the formulas bound nothing; the message says how to rescale instead."""
    variance = _checked("variance", variance)
    above = variance > 1.0 + 1e-9
    if above.any():
        kl_coef = ", kl_coef / m" if kl else ""
        raise ValueError(
            f"variance must be at most 1, got {variance[above].ravel()[:4].tolist()}: the bound holds for rewards in "
            f"[-1, 1] (docs/theory.md#setting), whose variance is at most 1. For rewards in [-m, m], pass "
            f"variance / m**2, gamma / m{kl_coef} and divide the bound by m (the flow of r / m runs m times slower)."
        )
    return variance


def _checked_rho(rho, mass, mass_name: str):
    """``(rho, mass)`` as float arrays, or ``ValueError``: the fast bounds of Theorems 2 and 3 hold
    for ``0 < mass < rho < 1``. ``rho`` lies in ``(0, 1)`` by the theorems' choice of ``gamma``,
    and ``mass`` (the initial mass on ``y_g``, or its floor ``c``) stays below ``rho``, since a
    policy with ``pi0(y_g) >= rho`` would already have the gain; outside that range the formulas
    return numbers that bound nothing (a negative "upper bound")."""
    rho = np.asarray(rho, float)
    mass = _checked(mass_name, mass, positive=True)
    outside = ~((0 < rho) & (rho < 1))
    if outside.any():
        raise ValueError(f"rho must lie in (0, 1); got {rho[outside].ravel()[:4].tolist()}.")
    above = np.broadcast_to(~(mass < rho), np.broadcast_shapes(mass.shape, rho.shape))
    if above.any():
        raise ValueError(
            f"{mass_name} must be below rho (a policy with that much mass on y_g already has the gain); "
            f"{int(above.sum())} entry(ies) are not."
        )
    return rho, mass


def _checked_min_prob(min_prob):
    """The smallest initial probability, in ``(0, 1]``."""
    min_prob = _checked("min_prob", min_prob, positive=True)
    if (min_prob > 1).any():
        raise ValueError(f"min_prob is a probability, at most 1; got {min_prob[min_prob > 1].ravel()[:4].tolist()}.")
    return min_prob


def _checked_horizon(horizon):
    """Theorems 2 and 3 hold for a horizon ``T >= 1`` (docs/theory.md#theorems-2-and-5)."""
    horizon = _checked("horizon", horizon, positive=True)
    if (horizon < 1).any():
        raise ValueError(f"horizon T must be >= 1; got {horizon[horizon < 1].ravel()[:4].tolist()}.")
    return horizon


def _checked_structure(length, jacobian_norm):
    check_int("length", length, low=1)
    _checked("jacobian_norm", jacobian_norm, positive=True)


__all__ = [
    "proposition2_gradient_bound",
    "proposition2_variance_rate_bound",
    "proposition3_lower_bound",
    "proposition_a_lower_bound",
    "score_gradient_bound",
    "variance_rate_bound",
    "theorem2_fast_upper_bound",
    "theorem2_kl_limit",
    "theorem2_rho",
    "theorem2_slow_lower_bound",
    "theorem3_fast_upper_bound",
    "theorem3_kl_limit",
    "theorem3_slow_lower_bound",
    "theorem4_lower_bound",
]


def theorem4_lower_bound(
    gamma: ArrayLike, variance: ArrayLike, *, kl_coef: ArrayLike = 0.0, length: int = 1, jacobian_norm: float = 1.0
) -> np.ndarray:
    """Theorem 1 / 4 of Razin et al. (docs/theory.md#theorem-4):
    ``t_gamma >= min(1 - e^(-gamma/9), 1 - e^(-7/(3 lam))) / (8 L^2 J^2 Var^(1/3))`` with ``Var``
    the prompt-mean variance and ``e^(-7/0) := 0``.

    >>> round(float(theorem4_lower_bound(0.1, 1e-6)), 4)
    0.1381
    """
    gamma, variance = _checked("gamma", gamma, positive=True), _checked_variance(variance, kl=True)
    kl_coef = _checked("kl_coef", kl_coef)
    _checked_structure(length, jacobian_norm)
    with np.errstate(divide="ignore"):
        kl_term = np.where(kl_coef > 0, -np.expm1(-7.0 / (3.0 * kl_coef)), 1.0)
        numerator = np.minimum(-np.expm1(-gamma / 9.0), kl_term)
        return numerator / (8.0 * length**2 * jacobian_norm**2 * np.cbrt(variance))


def proposition3_lower_bound(gamma: ArrayLike, variance: ArrayLike, *, num_prompts: int) -> np.ndarray:
    """Proposition 3 (tabular; docs/theory.md#proposition-3):
    ``t_gamma >= 2 |S| (1 - e^(-gamma/2)) / sqrt(Var_x)`` with ``Var_x`` the prompt's own variance.

    >>> round(float(proposition3_lower_bound(0.1, 1e-6, num_prompts=1)), 3)
    97.541
    """
    gamma, variance = _checked("gamma", gamma, positive=True), _checked_variance(variance)
    check_int("num_prompts", num_prompts, low=1)
    with np.errstate(divide="ignore"):
        return 2.0 * num_prompts * -np.expm1(-gamma / 2.0) / np.sqrt(variance)


def proposition_a_lower_bound(
    gamma: ArrayLike, variance: ArrayLike, *, length: int = 1, jacobian_norm: float = 1.0
) -> np.ndarray:
    """Proposition A (docs/theory.md#proposition-a; this project's sharper Theorem 4):
    ``t_gamma >= (1 - e^(-gamma/2)) / (L^2 J^2 sqrt(Var))``, ``Var`` the prompt mean.

    >>> round(float(proposition_a_lower_bound(0.1, 1e-6)), 3)
    48.771
    """
    gamma, variance = _checked("gamma", gamma, positive=True), _checked_variance(variance)
    _checked_structure(length, jacobian_norm)
    with np.errstate(divide="ignore"):
        return -np.expm1(-gamma / 2.0) / (length**2 * jacobian_norm**2 * np.sqrt(variance))


def proposition2_gradient_bound(
    kl_variance: ArrayLike, *, reward_bound: ArrayLike, length: int = 1, jacobian_norm: float = 1.0
) -> np.ndarray:
    """Proposition 2 (docs/theory.md#proposition-2-and-lemma-8):
    ``||grad phi(theta; x)|| <= 6 M^(1/3) L J Var[r_KL]^(1/3)`` when ``r_KL`` lies in ``[-M, M]``
    with ``M > 1``. A ``reward_bound`` below 1 is raised to 1: the bound with any ``M > 1`` holds,
    and its limit as ``M -> 1`` is the value at 1.

    >>> round(float(proposition2_gradient_bound(1e-3, reward_bound=1.0)), 6)
    0.6
    """
    m = np.maximum(_checked("reward_bound", reward_bound), 1.0)
    _checked_structure(length, jacobian_norm)
    return 6.0 * np.cbrt(m) * length * jacobian_norm * np.cbrt(_checked("kl_variance", kl_variance))


def score_gradient_bound(kl_variance: ArrayLike, *, length: int = 1, jacobian_norm: float = 1.0) -> np.ndarray:
    """Cauchy-Schwarz on the score-function form (docs/theory.md#proposition-2-and-lemma-8):
    ``||grad phi_x|| <= sqrt(2) L J sqrt(Var[r_KL])``.

    >>> round(float(score_gradient_bound(0.5)), 6)
    1.0
    """
    _checked_structure(length, jacobian_norm)
    return np.sqrt(2.0) * length * jacobian_norm * np.sqrt(_checked("kl_variance", kl_variance))


def variance_rate_bound(kl_variance: ArrayLike, *, length: int = 1, jacobian_norm: float = 1.0) -> np.ndarray:
    """Step 4 of the proof of Proposition A (docs/theory.md#proof): along the flow,
    ``d/dt Var_KL <= 2 L^2 J^2 Var_KL^(3/2)`` with ``Var_KL`` the prompt mean of ``Var_pi[r_KL]``.

    >>> round(float(variance_rate_bound(0.01)), 6)
    0.002
    """
    _checked_structure(length, jacobian_norm)
    return 2.0 * length**2 * jacobian_norm**2 * _checked("kl_variance", kl_variance) ** 1.5


def proposition2_variance_rate_bound(
    kl_variance: ArrayLike, *, length: int = 1, jacobian_norm: float = 1.0
) -> np.ndarray:
    """The variance inequality in the proof of Proposition 2 (docs/theory.md#proposition-2-and-lemma-8):
    ``d/dt Var[r_KL] <= 24 L^2 J^2 Var[r_KL]^(4/3)``.

    >>> round(float(proposition2_variance_rate_bound(1e-3)), 6)
    0.0024
    """
    _checked_structure(length, jacobian_norm)
    return 24.0 * length**2 * jacobian_norm**2 * _checked("kl_variance", kl_variance) ** (4.0 / 3.0)


def theorem2_rho(initial_value: ArrayLike, gamma: ArrayLike, good_reward: ArrayLike) -> np.ndarray:
    """``rho = (E_{pi0}[r_G] + gamma + 1) / (r_G(y_g) + 1)``: the mass on ``y_g`` that
    guarantees the gain (docs/theory.md#theorems-2-and-5 and docs/theory.md#theorems-3-and-6;
    with ``y_g'`` for the family ``Pi'``). Rewards lie in ``[-1, 1]``; ``rho`` is in ``(0, 1)``
    when ``gamma > 0`` and ``r_G(y_g) > E_{pi0}[r_G] + gamma``, as the theorems require (not
    checked here: the bounds that take ``rho`` check it).

    >>> float(theorem2_rho(0.0, 0.5, 1.0))  # (0 + 0.5 + 1) / 2
    0.75
    >>> round(float(theorem2_rho(-0.2, 0.3, 0.5)), 4)  # (-0.2 + 0.3 + 1) / 1.5
    0.7333
    """
    return (np.asarray(initial_value) + gamma + 1.0) / (np.asarray(good_reward) + 1.0)


def theorem2_slow_lower_bound(gamma: ArrayLike, horizon: ArrayLike, *, num_prompts: int) -> np.ndarray:
    """Theorem 2 (docs/theory.md#theorems-2-and-5), slow accurate teacher (values in
    ``(0, 1/T)``): ``t_gamma(r_G) >= 2 |S| (1 - e^(-gamma/2)) T``.

    >>> round(float(theorem2_slow_lower_bound(0.2, 100, num_prompts=1)), 3)
    19.033
    """
    check_int("num_prompts", num_prompts, low=1)
    gamma = _checked("gamma", gamma, positive=True)
    return 2.0 * num_prompts * -np.expm1(-gamma / 2.0) * _checked_horizon(horizon)


def theorem2_fast_upper_bound(rho: ArrayLike, good_prob: ArrayLike, *, num_prompts: int) -> np.ndarray:
    """Theorem 2 (docs/theory.md#theorems-2-and-5), fast inaccurate teacher (``1`` on ``y_g``,
    below ``pi0(y_g)`` elsewhere): ``t_gamma(r_G) <= 4 |S| / (1 - rho)^4 (1 / pi0(y_g) - 1 / rho)``,
    for ``0 < pi0(y_g) < rho < 1``.

    >>> round(float(theorem2_fast_upper_bound(0.5, 0.25, num_prompts=1)), 3)  # 64 (4 - 2)
    128.0
    """
    rho, good_prob = _checked_rho(rho, good_prob, "good_prob")
    check_int("num_prompts", num_prompts, low=1)
    return 4.0 * num_prompts / (1.0 - rho) ** 4 * (1.0 / good_prob - 1.0 / rho)


def theorem2_kl_limit(good_prob: ArrayLike, rho: ArrayLike, min_prob: ArrayLike) -> np.ndarray:
    """Largest ``lam`` for Theorem 2's fast bound:
    ``pi0(y_g) (1 - rho)^4 / (8 (1/(2e) - 2 ln min_y pi0(y)))``, for ``0 < pi0(y_g) < rho < 1``.

    >>> round(float(theorem2_kl_limit(0.25, 0.5, 0.25)), 6)
    0.000661
    >>> round(float(theorem2_kl_limit(0.25, 0.3, 0.25)), 6)  # Theorem 3's limit differs at rho != 1/2
    0.002538
    """
    rho, good_prob = _checked_rho(rho, good_prob, "good_prob")
    min_prob = _checked_min_prob(min_prob)
    above = np.broadcast_to(min_prob > good_prob, np.broadcast_shapes(min_prob.shape, good_prob.shape))
    if above.any():
        raise ValueError("min_prob, the smallest initial probability, cannot exceed good_prob, one of them.")
    return good_prob * (1.0 - rho) ** 4 / (8.0 * (0.5 / np.e - 2.0 * np.log(min_prob)))


def theorem3_fast_upper_bound(rho: ArrayLike, good_prob_floor: ArrayLike, *, num_prompts: int) -> np.ndarray:
    """Theorem 3 (docs/theory.md#theorems-3-and-6), the teacher that rewards the output the policy
    already favours (``pi0(y_g) >= c``): ``t_gamma <= 2 |S| / (1 - rho)^3 (1/c - 1/rho)``, for
    ``0 < c < rho < 1``.

    >>> round(float(theorem3_fast_upper_bound(0.5, 0.25, num_prompts=1)), 3)  # 16 (4 - 2)
    32.0
    """
    rho, floor = _checked_rho(rho, good_prob_floor, "good_prob_floor")
    check_int("num_prompts", num_prompts, low=1)
    return 2.0 * num_prompts / (1.0 - rho) ** 3 * (1.0 / floor - 1.0 / rho)


def theorem3_kl_limit(good_prob_floor: ArrayLike, rho: ArrayLike, min_prob: ArrayLike) -> np.ndarray:
    """Largest ``lam`` for Theorem 3's fast bound: ``c (1 - rho)^3 / (16 (1/(2e) - 2 ln min pi0))``,
    for ``0 < c < rho < 1``.

    >>> round(float(theorem3_kl_limit(0.25, 0.5, 0.25)), 6)  # (1 - rho)^3 / 16 = (1 - rho)^4 / 8 here
    0.000661
    >>> round(float(theorem3_kl_limit(0.25, 0.3, 0.25)), 6)
    0.001813
    """
    rho, floor = _checked_rho(rho, good_prob_floor, "good_prob_floor")
    min_prob = _checked_min_prob(min_prob)
    return floor * (1.0 - rho) ** 3 / (16.0 * (0.5 / np.e - 2.0 * np.log(min_prob)))


def theorem3_slow_lower_bound(gamma: ArrayLike, horizon: ArrayLike, *, num_prompts: int) -> np.ndarray:
    """Theorem 3 (docs/theory.md#theorems-3-and-6), the teacher that rewards an output the policy
    neglects (``pi0 <= T^-2``): ``t_gamma >= (|S| / sqrt 2) (1 - e^(-gamma/2)) T``.

    >>> round(float(theorem3_slow_lower_bound(0.2, 100, num_prompts=2)), 3)
    13.458
    """
    check_int("num_prompts", num_prompts, low=1)
    gamma = _checked("gamma", gamma, positive=True)
    return num_prompts / np.sqrt(2.0) * -np.expm1(-gamma / 2.0) * _checked_horizon(horizon)
