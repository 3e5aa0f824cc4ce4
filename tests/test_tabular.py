import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.tabular import (
    AutoregressiveTabularPolicy,
    LogLinearPolicy,
    SharedAutoregressivePolicy,
    TabularPolicy,
    objective,
    objective_grad,
    prompt_gradient,
)

FEATURES = np.random.default_rng(0).normal(size=(6, 3))
SHARED = SharedAutoregressivePolicy(np.random.default_rng(1).normal(size=(4, 3, 2)), length=3)
POLICIES = [
    (SHARED, lambda key: SHARED.random_logits(key, 3, scale=2.0)),
    (LogLinearPolicy(FEATURES), lambda key: LogLinearPolicy(FEATURES).random_logits(key, 3, scale=2.0)),
    (TabularPolicy(6), lambda key: TabularPolicy(6).random_logits(key, 3, scale=2.0)),
    (
        AutoregressiveTabularPolicy(vocab_size=3, length=3),
        lambda key: AutoregressiveTabularPolicy(3, 3).random_logits(key, 2, scale=2.0),
    ),
]


def test_autoregressive_log_probs_are_products_of_conditionals():
    policy = AutoregressiveTabularPolicy(vocab_size=3, length=2)
    logits = policy.random_logits(jax.random.key(0), 2)
    log_probs = policy.log_probs(logits)
    conditionals = [jax.nn.log_softmax(theta, -1) for theta in logits]
    for x, (i, (a, b)) in itertools.product(range(2), enumerate(policy.outputs())):
        expected = conditionals[0][x, 0, a] + conditionals[1][x, a, b]
        np.testing.assert_allclose(log_probs[x, i], expected, rtol=1e-12)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-12)
    assert policy.outputs().tolist()[:4] == [[0, 0], [0, 1], [0, 2], [1, 0]]


def test_autoregressive_logits_from_log_probs_inverts_log_probs():
    policy = AutoregressiveTabularPolicy(vocab_size=3, length=3)
    target = jax.nn.log_softmax(jax.random.normal(jax.random.key(2), (2, 4, 27)) * 3, -1)
    np.testing.assert_allclose(policy.log_probs(policy.logits_from_log_probs(target)), target, atol=1e-12)


def test_length_one_autoregressive_is_tabular():
    theta = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(
        AutoregressiveTabularPolicy(vocab_size=4, length=1).log_probs((theta[:, None, :],)),
        TabularPolicy(4).log_probs(theta),
    )


@pytest.mark.parametrize("policy,make", POLICIES)
@pytest.mark.parametrize("kl_coef", [0.0, 0.7])
def test_closed_form_gradient_equals_autodiff(policy, make, kl_coef):
    logits = make(jax.random.key(2))
    ref_logits = make(jax.random.key(3))
    shape = policy.log_probs(logits).shape
    rewards = jax.random.uniform(jax.random.key(4), shape, minval=-1, maxval=1)
    ref = policy.log_probs(ref_logits)
    closed = objective_grad(policy, logits, rewards, ref, kl_coef=kl_coef)
    auto = jax.grad(lambda theta: objective(policy, theta, rewards, ref, kl_coef=kl_coef))(logits)
    for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(auto)):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=0)
    # Rewards of one prompt broadcast against every prompt's logits: objective's mean counts the
    # prompts of the broadcast problem, and so must the closed form.
    closed = objective_grad(policy, logits, rewards[:1], ref, kl_coef=kl_coef)
    auto = jax.grad(lambda theta: objective(policy, theta, rewards[:1], ref, kl_coef=kl_coef))(logits)
    for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(auto)):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=0)
    # One prompt's logits against every prompt's rewards: summed over the prompts, as jax.grad
    # sums a broadcast parameter's gradient, and shaped like the logits.
    one = jax.tree.map(lambda x: x[:1], logits)
    closed = objective_grad(policy, one, rewards, ref, kl_coef=kl_coef)
    auto = jax.grad(lambda theta: objective(policy, theta, rewards, ref, kl_coef=kl_coef))(one)
    for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(auto)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("policy,make", POLICIES)
def test_log_prob_vjp_is_the_vjp_of_log_probs_on_both_paths(policy, make):
    """The closed-form ``sum_y c[y] grad log pi(y)`` against autodiff, for a cotangent that does
    not sum to zero (the general path) and for one that does (``centered=True``)."""
    logits = make(jax.random.key(5))
    log_probs, vjp = jax.vjp(policy.log_probs, logits)
    cotangent = jax.random.normal(jax.random.key(6), log_probs.shape)
    centered = cotangent - cotangent.mean(-1, keepdims=True)
    for c, is_centered in ((cotangent, False), (centered, True), (centered, False)):
        closed = policy.log_prob_vjp(logits, c, centered=is_centered)
        for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(vjp(c)[0])):
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("policy,make", POLICIES)
def test_float32_parameters_give_float32_log_probs_and_gradients(policy, make):
    """Under x64 (conftest) too: a policy's float64 constants (features, visit counts) must not
    promote a float32 problem, whose loop carries would then change type (an ascent crashed)."""
    logits = jax.tree.map(lambda x: x.astype(jnp.float32), make(jax.random.key(2)))
    log_probs = policy.log_probs(logits)
    assert log_probs.dtype == jnp.float32
    gradient = policy.log_prob_vjp(logits, jnp.ones_like(log_probs))
    assert {leaf.dtype for leaf in jax.tree.leaves(gradient)} == {jnp.dtype(jnp.float32)}


def test_lemma7_tabular_gradient_form():
    """d theta[x]/dt = (1/|S|) pi (r_KL - E_pi r_KL), row by row."""
    policy = TabularPolicy(5)
    logits = policy.random_logits(jax.random.key(5), 4)
    rewards = jax.random.uniform(jax.random.key(6), (4, 5))
    ref = policy.log_probs(jnp.zeros((4, 5)))
    lam = 0.3
    pi = jax.nn.softmax(logits)
    r_kl = rewards - lam * (jnp.log(pi) - ref)
    expected = pi * (r_kl - (pi * r_kl).sum(-1, keepdims=True)) / 4
    np.testing.assert_allclose(objective_grad(policy, logits, rewards, ref, kl_coef=lam), expected, atol=1e-15)
    np.testing.assert_allclose(
        prompt_gradient(policy, logits[1], rewards[1], ref[1], kl_coef=lam), 4 * expected[1], atol=1e-15
    )


def test_objective_is_reward_minus_kl():
    policy = TabularPolicy(2)
    logits = jnp.log(jnp.array([[0.2, 0.8]]))
    ref = jnp.log(jnp.array([[0.5, 0.5]]))
    rewards = jnp.array([[1.0, -1.0]])
    kl = 0.2 * np.log(0.4) + 0.8 * np.log(1.6)
    np.testing.assert_allclose(objective(policy, logits, rewards, ref, kl_coef=0.5), -0.6 - 0.5 * kl, rtol=1e-12)


def test_bad_structure():
    with pytest.raises(ValueError, match="vocab_size"):
        AutoregressiveTabularPolicy(vocab_size=1, length=2)
    with pytest.raises(ValueError, match="length"):
        AutoregressiveTabularPolicy(vocab_size=2, length=0)
    with pytest.raises(ValueError, match="num_outputs"):
        TabularPolicy(1)
    with pytest.raises(ValueError, match="num_prompts"):
        TabularPolicy(3).random_logits(jax.random.key(0), -1)
    with pytest.raises(ValueError, match="logits\\[1\\]"):
        AutoregressiveTabularPolicy(2, 2).log_probs((jnp.zeros((1, 1, 2)), jnp.zeros((1, 3, 2))))


def test_log_linear_policy_is_hashable_by_value_and_reports_its_jacobian_norm():
    a, b = LogLinearPolicy(FEATURES), LogLinearPolicy(FEATURES.copy())
    assert a == b and hash(a) == hash(b) and a != LogLinearPolicy(2 * FEATURES)
    np.testing.assert_allclose(a.jacobian_norm, np.linalg.svd(FEATURES, compute_uv=False)[0])
    identity = LogLinearPolicy(np.eye(4))
    theta = jax.random.normal(jax.random.key(7), (2, 4))
    np.testing.assert_allclose(identity.log_probs(theta), TabularPolicy(4).log_probs(theta))
    with pytest.raises(ValueError, match="features"):
        LogLinearPolicy(np.ones(3))


def test_shared_autoregressive_policy_multiplies_the_conditionals_of_one_parameter_vector():
    theta = SHARED.random_logits(jax.random.key(3), 2)
    log_probs = SHARED.log_probs(theta)
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-12)
    for index, tokens in enumerate(SHARED.outputs()):
        states = [3, *tokens[:-1]]  # the start state is V = 3, then the previous token
        manual = sum(jax.nn.log_softmax(SHARED.features[s] @ theta[1])[t] for s, t in zip(states, tokens))
        np.testing.assert_allclose(log_probs[1, index], manual, atol=1e-12)
    # J is the largest spectral norm of the Jacobian d f / d theta = Phi[s] over the states.
    jacobians = [jax.jacobian(lambda t, s=s: SHARED.features[s] @ t)(theta[0]) for s in range(4)]
    assert SHARED.jacobian_norm == pytest.approx(max(np.linalg.norm(j, 2) for j in jacobians))
    assert SHARED == SharedAutoregressivePolicy(SHARED.features.copy(), 3) and hash(SHARED) == hash(
        SharedAutoregressivePolicy(SHARED.features.copy(), 3)
    )
    assert SHARED != SharedAutoregressivePolicy(SHARED.features, 2)
    with pytest.raises(ValueError, match=r"\[V \+ 1, V, d\]"):
        SharedAutoregressivePolicy(np.ones((3, 3, 2)), 2)
    with pytest.raises(ValueError, match="length"):
        SharedAutoregressivePolicy(np.ones((3, 2, 2)), 0)
