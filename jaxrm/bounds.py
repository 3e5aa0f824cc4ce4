"""The papers' bounds with their explicit constants, as pure functions (numpy or jax arrays).

Notation of THEORY.md: ``gamma`` the gain, ``variance`` the reward-model variance under the
initial policy, ``lam`` the KL coefficient, ``L`` the output length, ``J`` the bound on the
Jacobian of the logits, ``|S|`` the number of prompts.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "proposition2_gradient_bound",
    "proposition3_lower_bound",
    "proposition_a_lower_bound",
    "score_gradient_bound",
    "theorem4_lower_bound",
]


def theorem4_lower_bound(gamma, variance, *, kl_coef=0.0, length=1, jacobian_norm=1.0):
    """Theorem 1 / 4 of Razin et al.: ``t_gamma >= min(1 - e^(-gamma/9), 1 - e^(-7/(3 lam)))
    / (8 L^2 J^2 Var^(1/3))`` with ``Var`` the prompt-mean variance and ``e^(-7/0) := 0``.

    >>> round(float(theorem4_lower_bound(0.1, 1e-6)), 4)
    0.1381
    """
    kl_coef = np.asarray(kl_coef, float)
    with np.errstate(divide="ignore"):
        kl_term = np.where(kl_coef > 0, -np.expm1(-7.0 / (3.0 * kl_coef)), 1.0)
    numerator = np.minimum(-np.expm1(-np.asarray(gamma) / 9.0), kl_term)
    return numerator / (8.0 * length**2 * jacobian_norm**2 * np.cbrt(variance))


def proposition3_lower_bound(gamma, variance, *, num_prompts):
    """Proposition 3 (tabular): ``t_gamma >= 2 |S| (1 - e^(-gamma/2)) / sqrt(Var_x)`` with
    ``Var_x`` the prompt's own variance.

    >>> round(float(proposition3_lower_bound(0.1, 1e-6, num_prompts=1)), 3)
    97.541
    """
    return 2.0 * num_prompts * -np.expm1(-np.asarray(gamma) / 2.0) / np.sqrt(variance)


def proposition_a_lower_bound(gamma, variance, *, length=1, jacobian_norm=1.0):
    """Proposition A of THEORY.md §3b (this project's sharper Theorem 4, to be checked):
    ``t_gamma >= (1 - e^(-gamma/2)) / (L^2 J^2 sqrt(Var))``, ``Var`` the prompt mean.

    >>> round(float(proposition_a_lower_bound(0.1, 1e-6)), 3)
    48.771
    """
    return -np.expm1(-np.asarray(gamma) / 2.0) / (length**2 * jacobian_norm**2 * np.sqrt(variance))


def proposition2_gradient_bound(kl_variance, *, reward_bound, length=1, jacobian_norm=1.0):
    """Proposition 2: ``||grad phi(theta; x)|| <= 6 M^(1/3) L J Var[r_KL]^(1/3)`` when
    ``r_KL`` lies in ``[-M, M]`` with ``M > 1``.

    >>> round(float(proposition2_gradient_bound(1e-3, reward_bound=1.0)), 6)
    0.6
    """
    m = np.maximum(reward_bound, 1.0)
    return 6.0 * np.cbrt(m) * length * jacobian_norm * np.cbrt(kl_variance)


def score_gradient_bound(kl_variance, *, length=1, jacobian_norm=1.0):
    """Cauchy-Schwarz on the score-function form: ``||grad phi_x|| <= sqrt(2) L J sqrt(Var[r_KL])``.

    >>> round(float(score_gradient_bound(0.5)), 6)
    1.0
    """
    return np.sqrt(2.0) * length * jacobian_norm * np.sqrt(kl_variance)
