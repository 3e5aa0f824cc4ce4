import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm import bounds, flow, metrics
from jaxrm.tabular import AutoregressiveTabularPolicy, TabularPolicy, kl_rewards, prompt_gradient


def test_theorem4_constants():
    gamma, var = 0.3, 1e-3
    expected = -np.expm1(-gamma / 9) / (8 * var ** (1 / 3))
    np.testing.assert_allclose(bounds.theorem4_lower_bound(gamma, var), expected)
    # lam enters only when 1 - e^(-7/(3 lam)) is the smaller term (large lam or gain).
    np.testing.assert_allclose(bounds.theorem4_lower_bound(gamma, var, kl_coef=0.5), expected)
    np.testing.assert_allclose(
        bounds.theorem4_lower_bound(10.0, var, kl_coef=10.0, length=2, jacobian_norm=3.0),
        -np.expm1(-7 / 30) / (8 * 4 * 9 * var ** (1 / 3)),
    )


def test_proposition2_constants():
    # 6 M^(1/3) L J Var^(1/3): M = 8 and Var = 1e-3 have exact cube roots 2 and 0.1.
    bound = bounds.proposition2_gradient_bound(1e-3, reward_bound=8.0, length=2, jacobian_norm=1.5)
    np.testing.assert_allclose(bound, 6 * 2 * 2 * 1.5 * 0.1)
    # The proposition needs M > 1: a smaller bound on |r_KL| is raised to 1.
    np.testing.assert_allclose(bounds.proposition2_gradient_bound(1e-3, reward_bound=0.5), 6 * 0.1)


def test_variance_exponents():
    var = np.array([1e-2, 1e-8])
    t4, p3, pa = (
        bounds.theorem4_lower_bound(0.1, var),
        bounds.proposition3_lower_bound(0.1, var, num_prompts=3),
        bounds.proposition_a_lower_bound(0.1, var),
    )
    np.testing.assert_allclose(np.log(t4[1] / t4[0]) / np.log(var[1] / var[0]), -1 / 3)
    np.testing.assert_allclose(np.log(p3[1] / p3[0]) / np.log(var[1] / var[0]), -1 / 2)
    np.testing.assert_allclose(p3 / pa, 6.0)  # 2 |S| with |S| = 3


@pytest.mark.parametrize(
    "policy,make",
    [
        (TabularPolicy(5), lambda k: TabularPolicy(5).random_logits(k, 64, scale=3.0)),
        (
            AutoregressiveTabularPolicy(3, 2),
            lambda k: AutoregressiveTabularPolicy(3, 2).random_logits(k, 64, scale=3.0),
        ),
    ],
)
def test_gradient_norms_obey_both_gradient_bounds(policy, make):
    """||grad phi_x|| <= sqrt(2) L J sqrt(Var[r_KL]) (score form) and Proposition 2, at random points."""
    logits, ref_logits = make(jax.random.key(0)), make(jax.random.key(1))
    log_probs = policy.log_probs(logits)
    rewards = jax.random.uniform(jax.random.key(2), log_probs.shape, minval=-1, maxval=1)
    ref = policy.log_probs(ref_logits)
    lam = 0.2
    grads = prompt_gradient(policy, logits, rewards, ref, kl_coef=lam)
    norm = jnp.sqrt(sum(jnp.sum(g**2, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads)))
    r_kl = kl_rewards(log_probs, rewards, ref, kl_coef=lam)
    var = metrics.reward_variance(log_probs, r_kl)
    m = np.maximum(np.abs(r_kl).max(-1), 1.0 + 1e-9)
    assert np.all(norm <= bounds.score_gradient_bound(var, length=policy.length) * (1 + 1e-9))
    assert np.all(norm <= bounds.proposition2_gradient_bound(var, reward_bound=m, length=policy.length))
    # Not vacuous: the largest ratio is within a small factor of the score-form bound.
    ratio = float(np.max(norm / bounds.score_gradient_bound(var, length=policy.length)))
    assert ratio > 0.3 / policy.length, ratio


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: bounds.theorem4_lower_bound(-0.1, 1e-3), "gamma"),
        (lambda: bounds.theorem4_lower_bound(np.nan, 1e-3), "gamma"),
        (lambda: bounds.theorem4_lower_bound(0.1, -1e-3), "variance"),
        (lambda: bounds.theorem4_lower_bound(0.1, 1e-3, kl_coef=-0.5), "kl_coef"),
        (lambda: bounds.theorem4_lower_bound(0.1, 1e-3, length=0), "length"),
        (lambda: bounds.proposition3_lower_bound(0.1, 1e-3, num_prompts=0), "num_prompts"),
        (lambda: bounds.proposition_a_lower_bound(0.1, np.array([1e-3, np.nan])), "variance"),
        (lambda: bounds.proposition_a_lower_bound(0.1, 1e-3, jacobian_norm=0.0), "jacobian_norm"),
        (lambda: bounds.theorem2_slow_lower_bound(0.1, 10, num_prompts=2.5), "num_prompts"),
        (lambda: bounds.score_gradient_bound(-1.0), "kl_variance"),
    ],
)
def test_bad_arguments_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_rewards_outside_the_unit_interval_are_refused_and_the_rescaling_it_names_bounds_t_gamma():
    # Rewards [0, 8] on a uniform policy over two outputs: variance 16, t_gamma = 0.01 for a gain of 0.08.
    logits, rewards, gamma = jnp.zeros((1, 2)), jnp.array([[0.0, 8.0]]), 0.08
    variance = float(metrics.reward_variance(logits, rewards)[0])
    for bound in (
        bounds.theorem4_lower_bound,
        bounds.proposition_a_lower_bound,
        functools.partial(bounds.proposition3_lower_bound, num_prompts=1),
    ):
        with pytest.raises(ValueError, match=r"variance must be at most 1, got \[16.0\].*pass variance / m\*\*2"):
            bound(gamma, variance)
    t = float(flow.t_gamma(logits, rewards, gamma)[0])
    assert 2 * -np.expm1(-gamma / 2) / np.sqrt(variance) > t  # Proposition 3's formula, applied there, bounds nothing
    m = 8.0
    assert bounds.proposition3_lower_bound(gamma / m, variance / m**2, num_prompts=1) / m <= t
    assert bounds.theorem4_lower_bound(gamma / m, variance / m**2) / m <= t


def test_zero_variance_gives_an_infinite_lower_bound():
    assert np.isinf(bounds.proposition_a_lower_bound(0.1, 0.0)) and np.isinf(bounds.theorem4_lower_bound(0.1, 0.0))
