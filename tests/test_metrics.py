import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrm import metrics


def brute_accuracy(rm, gt, weights):
    agree = total = 0.0
    for i, j in itertools.combinations(range(len(rm)), 2):
        w = weights[i] * weights[j]
        total += w
        agree += w * (np.sign(rm[i] - rm[j]) == np.sign(gt[i] - gt[j]))
    return agree / total


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class TestRewardVariance:
    def test_matches_definition_and_pair_form(self):
        rng = np.random.default_rng(0)
        logits, rewards = rng.normal(size=(3, 7)), rng.uniform(-1, 1, (3, 7))
        p = softmax(logits)
        mean = (p * rewards).sum(-1, keepdims=True)
        expected = (p * (rewards - mean) ** 2).sum(-1)
        pair_form = 0.5 * np.einsum("si,sj,sij->s", p, p, (rewards[:, :, None] - rewards[:, None, :]) ** 2)
        got = metrics.reward_variance(logits, rewards)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        np.testing.assert_allclose(got, pair_form, rtol=1e-12)

    def test_scaling_rewards_scales_variance_quadratically(self):
        logits, rewards = jnp.array([0.3, -1.0, 2.0]), jnp.array([0.1, 0.5, -0.4])
        base = metrics.reward_variance(logits, rewards)
        np.testing.assert_allclose(metrics.reward_variance(logits, 1e-3 * rewards), 1e-6 * base, rtol=1e-10)

    def test_where_equals_dropping_outputs(self):
        logits, rewards = jnp.array([0.3, 50.0, 2.0, -1.0]), jnp.array([0.1, np.nan, -0.4, 0.9])
        keep = jnp.array([True, False, True, True])
        np.testing.assert_allclose(
            metrics.reward_variance(logits, rewards, where=keep),
            metrics.reward_variance(logits[keep], rewards[keep]),
            rtol=1e-12,
        )

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_stable_for_a_million_outputs_and_huge_logits(self, dtype):
        rng = np.random.default_rng(1)
        logits = rng.uniform(-1e4, 9.9e3, 10**6).astype(dtype)
        rewards = rng.uniform(-1, 1, 10**6).astype(dtype)
        logits[:3] = 1e4  # three tied maxima share the mass
        got = float(metrics.reward_variance(logits, rewards))
        top = rewards[:3].astype(np.float64)
        assert np.isfinite(got) and got >= 0
        np.testing.assert_allclose(got, top.var(), rtol=1e-4, atol=1e-6)
        flat = metrics.reward_variance(np.zeros(10**6, dtype), rewards)
        np.testing.assert_allclose(float(flat), rewards.astype(np.float64).var(), rtol=1e-4)

    def test_never_negative_when_rewards_are_constant(self):
        logits = jnp.array([1e4, -1e4, 3.0], jnp.float32)
        assert float(metrics.reward_variance(logits, jnp.full(3, 0.7, jnp.float32))) == 0.0

    def test_jit_vmap_grad(self):
        logits, rewards = jnp.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]]), jnp.array([[1.0, 0.0, -1.0]] * 2)
        f = jax.jit(jax.vmap(metrics.reward_variance))
        np.testing.assert_allclose(f(logits, rewards), metrics.reward_variance(logits, rewards))
        g = jax.grad(lambda z: metrics.reward_variance(z, rewards[0]))(logits[0])
        eps = 1e-6
        fd = [
            (
                metrics.reward_variance(logits[0].at[i].add(eps), rewards[0])
                - metrics.reward_variance(logits[0].at[i].add(-eps), rewards[0])
            )
            / (2 * eps)
            for i in range(3)
        ]
        np.testing.assert_allclose(g, fd, rtol=1e-6)

    def test_bad_input_fails_loudly(self):
        with pytest.raises(ValueError, match="finite"):
            metrics.reward_variance(jnp.zeros(3), jnp.array([0.0, np.nan, 1.0]))
        with pytest.raises(ValueError, match="shape mismatch"):
            metrics.reward_variance(jnp.zeros(3), jnp.zeros(4))

    def test_normalized_rewards_have_policy_mean_0_and_variance_1(self):
        """Under a non-uniform policy, averaged over prompts: mean_x E_pi[n] = 0 and
        mean_x E_pi[n^2] = 1, per leading set of rewards; a uniform weighting would miss both."""
        logits = 2.0 * jax.random.normal(jax.random.key(1), (3, 4, 5))
        rewards = jax.random.uniform(jax.random.key(2), (3, 4, 5), minval=-1.0, maxval=2.0)
        normalized = metrics.normalize_rewards(logits, rewards)
        probs = jax.nn.softmax(logits, -1)
        np.testing.assert_allclose(jnp.mean(jnp.sum(probs * normalized, -1), -1), 0.0, atol=1e-12)
        np.testing.assert_allclose(jnp.mean(jnp.sum(probs * normalized**2, -1), -1), 1.0, rtol=1e-12)
        # An affine map of the rewards: the same result.
        np.testing.assert_allclose(metrics.normalize_rewards(logits, 3.0 * rewards - 7.0), normalized, atol=1e-12)


class TestSampleRewardVariance:
    def test_ddof_matches_numpy(self):
        rewards = np.random.default_rng(2).normal(size=(5, 10))
        for ddof in (0, 1):
            np.testing.assert_allclose(metrics.sample_reward_variance(rewards, ddof=ddof), rewards.var(-1, ddof=ddof))

    def test_default_is_ddof_one(self):
        assert float(metrics.sample_reward_variance(jnp.array([0.0, 1.0]))) == 0.5

    def test_where(self):
        rewards = jnp.array([[1.0, 2.0, 100.0, 4.0]])
        keep = jnp.array([[True, True, False, True]])
        np.testing.assert_allclose(metrics.sample_reward_variance(rewards, where=keep), [np.var([1, 2, 4], ddof=1)])

    def test_too_few_samples(self):
        with pytest.raises(ValueError, match="more than ddof=1"):
            metrics.sample_reward_variance(jnp.zeros((4, 1)))
        with pytest.raises(ValueError, match="valid samples"):
            metrics.sample_reward_variance(jnp.zeros((2, 3)), where=jnp.array([[True] * 3, [True, False, False]]))
        with pytest.raises(ValueError, match="finite"):
            metrics.sample_reward_variance(jnp.array([[0.0, np.inf]]))

    def test_too_few_valid_samples_under_jit_give_nan(self):
        # Concrete inputs raise (above); traced ones cannot, and a row with n <= ddof is NaN, never
        # a negative or infinite "variance".
        variance = jax.jit(lambda r, w: metrics.sample_reward_variance(r, ddof=2, where=w))
        rewards = jnp.array([[0.0, 1.0, 5.0], [0.0, 2.0, 4.0]])
        out = variance(rewards, jnp.array([[True, True, False], [True, True, True]]))
        assert np.isnan(out[0]) and float(out[1]) == pytest.approx(8.0)


class TestAccuracy:
    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.floats(0.01, 1.0)), min_size=2, max_size=12))
    def test_dense_and_sorted_match_brute_force(self, rows):
        rm, gt, w = (np.array(c, float) for c in zip(*rows))
        expected = brute_accuracy(rm, gt, w)
        pad = 12 - len(rows)  # zero-weight padding keeps one compiled shape
        rm, gt, w = (np.pad(x, (0, pad))[None] for x in (rm, gt, w))
        for count in (metrics._dense_agreement, metrics._sorted_agreement):
            agree, total = count(rm, gt, w)
            np.testing.assert_allclose(agree[0] / total[0], expected, rtol=1e-10, atol=1e-12)

    def test_ties_agree_only_with_ties(self):
        # pairs: (0,1) tie/tie agree, (0,2) tie vs order disagree, (1,2) same order agree.
        assert float(metrics.accuracy(jnp.array([1.0, 1.0, 2.0]), jnp.array([0.0, 0.0, 0.0]))) == pytest.approx(1 / 3)
        assert float(metrics.accuracy(jnp.array([1.0, 1.0, 2.0]), jnp.array([5.0, 5.0, 6.0]))) == 1.0

    def test_on_policy_weights(self):
        rng = np.random.default_rng(3)
        rm, gt = rng.integers(0, 5, 9).astype(float), rng.normal(size=9)
        probs = softmax(rng.normal(size=9))
        np.testing.assert_allclose(metrics.accuracy(rm, gt, probs=probs), brute_accuracy(rm, gt, probs), rtol=1e-12)
        # A policy's probabilities sum to 1 over the whole row; dropping a position drops its pairs.
        keep = np.arange(9) != 4
        np.testing.assert_allclose(
            metrics.accuracy(rm, gt, probs=probs, where=keep),
            brute_accuracy(rm[keep], gt[keep], probs[keep]),
            rtol=1e-12,
        )

    def test_large_rows_use_the_sorted_count_and_agree_with_brute_force(self):
        rng = np.random.default_rng(4)
        n = 300  # above the dense limit
        rm, gt = rng.integers(0, 20, n).astype(float), rng.integers(0, 20, n).astype(float)
        keep = rng.random(n) > 0.2
        expected = brute_accuracy(rm[keep], gt[keep], np.ones(keep.sum()))
        np.testing.assert_allclose(metrics.accuracy(rm, gt, where=keep), expected, rtol=1e-12)

    def test_a_hundred_thousand_outputs(self):
        rng = np.random.default_rng(5)
        gt = rng.normal(size=10**5)
        assert float(metrics.accuracy(gt, gt)) == 1.0
        assert float(metrics.accuracy(-gt, gt)) == 0.0

    def test_samples_give_official_pairwise_accuracy(self):
        rm = jnp.array([[0.1, 0.5, 0.3], [0.0, 0.0, 1.0]])
        gt = jnp.array([[1.0, 2.0, 3.0], [1.0, 1.0, 0.0]])
        np.testing.assert_allclose(metrics.accuracy(rm, gt), [2 / 3, 1 / 3])

    def test_bad_input(self):
        with pytest.raises(ValueError, match="sum to 1"):
            metrics.accuracy(jnp.zeros(3), jnp.zeros(3), probs=jnp.array([0.5, 0.5, 0.5]))
        with pytest.raises(ValueError, match="shape mismatch"):
            metrics.accuracy(jnp.zeros(3), jnp.zeros(2))
        with pytest.raises(ValueError, match="finite"):
            metrics.accuracy(jnp.array([0.0, np.nan]), jnp.zeros(2))

    def test_float32_and_jit(self):
        rm = jnp.array([0.0, 1.0, 2.0, 3.0], jnp.float32)
        out = jax.jit(metrics.accuracy)(rm, rm[::-1])
        assert out.dtype == jnp.float32 and float(out) == 0.0

    @pytest.mark.parametrize("n", [3, 300])  # the dense count, and the sorted one above 256 outputs
    def test_a_peaked_policy_in_float32_keeps_its_digits(self, n):
        # One output holds all but n x 1e-7 of the mass: pair totals formed as ((sum w)^2 - sum w^2) / 2
        # cancelled to garbage in float32 (an accuracy of 1.118 at n = 3).
        rng = np.random.default_rng(12)
        rm, gt = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
        probs = np.full(n, 1e-7)
        probs[1] = 1 - (n - 1) * 1e-7
        rm32, gt32, probs32 = (jnp.asarray(x, jnp.float32) for x in (rm, gt, probs))
        got = metrics.accuracy(rm32, gt32, probs=probs32)
        np.testing.assert_allclose(got, brute_accuracy(rm, gt, probs), rtol=1e-5)


class TestKL:
    def test_exact_kl(self):
        rng = np.random.default_rng(6)
        a, b = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
        p, q = softmax(a), softmax(b)
        np.testing.assert_allclose(metrics.kl(a, b), (p * np.log(p / q)).sum(-1), rtol=1e-12)
        np.testing.assert_allclose(metrics.kl(a, a), 0.0, atol=1e-15)

    def test_where(self):
        a, b = jnp.array([0.0, 1.0, 9.0]), jnp.array([1.0, 0.0, -9.0])
        keep = jnp.array([True, True, False])
        np.testing.assert_allclose(metrics.kl(a, b, where=keep), metrics.kl(a[:2], b[:2]), rtol=1e-12)
        # The masked output's -inf log-probs never reach the gradient as NaN.
        masked = jax.grad(lambda x: metrics.kl(x, b, where=keep))(a)
        np.testing.assert_allclose(masked[:2], jax.grad(lambda x: metrics.kl(x, b[:2]))(a[:2]), rtol=1e-12)
        assert float(masked[2]) == 0.0
        # A row with nothing in its support has no KL: refused eagerly, NaN under a trace (as
        # the other exact metrics), never a made-up 0.
        empty = jnp.array([[True, True, False], [False, False, False]])
        traced = jax.jit(lambda x, y, w: metrics.kl(x, y, where=w))(jnp.stack([a, a]), jnp.stack([b, b]), empty)
        assert np.isfinite(traced[0]) and np.isnan(traced[1])

    def test_estimators_are_exact_in_expectation(self):
        """E_{y~pi}[k1] = E_{y~pi}[k3] = KL(pi || ref) exactly; k2 is half the squared log-ratio."""
        rng = np.random.default_rng(7)
        logp = jax.nn.log_softmax(jnp.array(rng.normal(size=6)))
        ref = jax.nn.log_softmax(jnp.array(rng.normal(size=6)))
        exact = metrics.kl(logp, ref)
        for kind in ("k1", "k3"):
            np.testing.assert_allclose(
                jnp.sum(jnp.exp(logp) * metrics.kl_estimate(logp, ref, kl_estimator=kind)), exact, rtol=1e-12
            )
        # k2 = (log pi - log ref)^2 / 2 (Schulman's), >= 0 and not unbiased.
        np.testing.assert_allclose(
            metrics.kl_estimate(logp, ref, kl_estimator="k2"), 0.5 * np.square(logp - ref), rtol=1e-12
        )
        assert bool(jnp.all(metrics.kl_estimate(logp, ref, kl_estimator="k3") >= 0))

    def test_unknown_kind(self):
        with pytest.raises(ValueError, match="kl_estimator='k4'"):
            metrics.kl_estimate(jnp.zeros(2), jnp.zeros(2), kl_estimator="k4")


class TestBestOfNAndCorrelations:
    @staticmethod
    def brute(p, rm, gt, n):
        total = 0.0
        for draw in itertools.product(range(len(p)), repeat=n):
            best = max(rm[i] for i in draw)
            total += np.prod(p[list(draw)]) * np.mean([gt[i] for i in draw if rm[i] == best])
        return total

    def test_closed_form_matches_enumeration_with_ties(self):
        rng = np.random.default_rng(8)
        for n in (1, 2, 3, 4):
            p = rng.dirichlet(np.ones(4))
            rm, gt = rng.integers(0, 3, 4).astype(float), rng.normal(size=4)
            got = float(metrics.best_of_n_reward(np.log(p), rm, gt, n))
            np.testing.assert_allclose(got, self.brute(p, rm, gt, n), rtol=1e-12)

    def test_many_samples_in_float32_keep_their_digits(self):
        # F^N of a float32 CDF that ends above 1 grew to 1.012 at N = 10^5 with r_G = 1 everywhere.
        best_of_n = jax.jit(metrics.best_of_n_reward)  # one program per dtype (op by op, the scans compile slowly)
        rng = np.random.default_rng(13)
        logits, rm = (jnp.asarray(rng.normal(size=256), jnp.float32) for _ in range(2))
        for n in (10**4, 10**5):
            assert float(best_of_n(logits, rm, jnp.ones_like(rm), n)) == pytest.approx(1.0, abs=1e-6)
        # Against float64 on ties and heavy logits, where a light group sits next to a heavy one.
        logits, rm, gt = rng.normal(size=256) * 6, rng.integers(0, 40, 256).astype(float), rng.normal(size=256)
        for n in (1, 64, 5000):
            exact = float(best_of_n(logits, rm, gt, n))
            got = best_of_n(*(jnp.asarray(x, jnp.float32) for x in (logits, rm, gt)), n)
            assert float(got) == pytest.approx(exact, abs=1e-5)

    def test_perfect_reward_model_is_optimal_and_n_broadcasts(self):
        rng = np.random.default_rng(9)
        logits, gt = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
        ns = np.arange(1, 9)[:, None]
        perfect = metrics.best_of_n_reward(logits, gt, gt, ns)
        noisy = metrics.best_of_n_reward(logits, gt + rng.normal(size=gt.shape), gt, ns)
        assert perfect.shape == (8, 3)
        assert bool(jnp.all(perfect >= noisy - 1e-12))
        assert bool(jnp.all(jnp.diff(perfect, axis=0) >= -1e-12))  # more samples never hurt

    def test_correlations_match_scipy(self):
        from scipy import stats

        x = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 7.0])
        y = np.array([2.0, 1.0, 2.0, 5.0, 3.0, 3.0, 0.5])
        np.testing.assert_allclose(metrics.spearman(x, y), stats.spearmanr(x, y).statistic, rtol=1e-12)
        np.testing.assert_allclose(metrics.pearson(x, y), stats.pearsonr(x, y).statistic, rtol=1e-12)
        # float32 stays float32 with float64 enabled (as in this suite); integers rank as the default float.
        assert metrics.spearman(x.astype(np.float32), y.astype(np.float32)).dtype == jnp.float32
        assert metrics.spearman(np.arange(4), np.arange(4)).dtype == jnp.result_type(float)
        # 16-bit floats rank in float32: float16 cannot sum ranks in the hundreds, bfloat16 cannot hold them.
        rng = np.random.default_rng(14)
        x = rng.normal(size=300)
        y = x + rng.normal(size=300)
        for dtype in (jnp.float16, jnp.bfloat16):
            low = metrics.spearman(jnp.asarray(x, dtype), jnp.asarray(y, dtype))
            assert low.dtype == jnp.float32
            assert float(low) == pytest.approx(
                stats.spearmanr(
                    np.asarray(jnp.asarray(x, dtype), float), np.asarray(jnp.asarray(y, dtype), float)
                ).statistic,
                abs=1e-5,
            )


class TestTiedGroupProbability:
    def test_matches_enumeration_with_ties_and_batches(self):
        rng = np.random.default_rng(10)
        logits = rng.normal(size=(2, 4))
        rewards = np.array([[0.0, 1.0, 1.0, 2.0], [0.5, -0.5, 0.3, 0.1]])  # ties, then distinct
        for k in (1, 2, 3):
            got = metrics.tied_group_probability(logits, rewards, k=k)
            for row in range(2):
                p = softmax(logits[row])
                brute = sum(
                    np.prod(p[list(draw)])
                    for draw in itertools.product(range(4), repeat=k)
                    if len({rewards[row, i] for i in draw}) == 1
                )
                np.testing.assert_allclose(got[row], brute, rtol=1e-12)
        np.testing.assert_allclose(  # distinct rewards: sum_y p(y)^k
            metrics.tied_group_probability(logits[1], rewards[1], k=5), np.sum(softmax(logits[1]) ** 5), rtol=1e-12
        )

    def test_bad_k(self):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            metrics.tied_group_probability(jnp.zeros(2), jnp.zeros(2), k=0)


class TestBootstrapCorrelation:
    def test_interval_reflects_models_and_seed_noise(self):
        rng = np.random.default_rng(11)
        x = np.linspace(0.0, 1.0, 12)
        quiet = x[:, None] + 0.01 * rng.normal(size=(12, 6))
        loud = x[:, None] + 2.0 * rng.normal(size=(12, 6))
        strong = metrics.bootstrap_correlation(x, quiet, jax.random.key(0))
        weak = metrics.bootstrap_correlation(x, loud, jax.random.key(0))
        assert float(strong.estimate) == pytest.approx(1.0) and float(strong.low) > 0.9
        assert float(weak.low) < float(strong.low) and float(weak.high - weak.low) > 0.3
        # Seed noise enters the interval: the same seed means, but spread over seeds, widen it.
        means = quiet.mean(-1, keepdims=True)
        spread = means + np.array([-1.0, 1.0] * 3) * 0.5
        tight = metrics.bootstrap_correlation(x, means, jax.random.key(1), kind="pearson")
        wide = metrics.bootstrap_correlation(x, spread, jax.random.key(1), kind="pearson")
        assert float(tight.estimate) == pytest.approx(float(wide.estimate))
        assert float(wide.high - wide.low) > float(tight.high - tight.low) + 0.05

    def test_independent_outcomes_give_an_interval_around_zero_and_1d_is_one_seed(self):
        rng = np.random.default_rng(12)
        x, y = rng.normal(size=40), rng.normal(size=40)
        out = metrics.bootstrap_correlation(x, y, jax.random.key(2), num_resamples=500)
        assert float(out.low) < 0.0 < float(out.high) and int(out.resamples) == 500
        same = metrics.bootstrap_correlation(x, y[:, None], jax.random.key(2), num_resamples=500)
        np.testing.assert_allclose([out.low, out.high], [same.low, same.high])

    def test_level_is_the_central_share_of_the_resamples(self):
        # On one set of resamples (same key), a 50% interval spans the central half of the 95% one's
        # distribution: for a near-normal spread, 0.674 / 1.96 of its width.
        rng = np.random.default_rng(14)
        x = rng.normal(size=60)
        y = 0.5 * x + rng.normal(size=60)
        wide = metrics.bootstrap_correlation(x, y, jax.random.key(4), kind="pearson")
        half = metrics.bootstrap_correlation(x, y, jax.random.key(4), kind="pearson", level=0.5)
        assert float(wide.low) < float(half.low) < float(half.high) < float(wide.high)
        ratio = (float(half.high) - float(half.low)) / (float(wide.high) - float(wide.low))
        assert 0.674 / 1.96 * 0.8 < ratio < 0.674 / 1.96 * 1.25, ratio

    def test_bad_input(self):
        key = jax.random.key(0)
        with pytest.raises(ValueError, match="M >= 3"):
            metrics.bootstrap_correlation(jnp.zeros(2), jnp.zeros(2), key)
        with pytest.raises(ValueError, match="y must be shaped"):
            metrics.bootstrap_correlation(jnp.arange(4.0), jnp.zeros((3, 2)), key)
        with pytest.raises(ValueError, match="kind"):
            metrics.bootstrap_correlation(jnp.arange(4.0), jnp.arange(4.0), key, kind="kendall")
        with pytest.raises(ValueError, match="level"):
            metrics.bootstrap_correlation(jnp.arange(4.0), jnp.arange(4.0), key, level=1.0)
        with pytest.raises(ValueError, match="num_resamples"):
            metrics.bootstrap_correlation(jnp.arange(4.0), jnp.arange(4.0), key, num_resamples=0)

    def test_the_difference_of_two_properties_is_paired_on_each_resample(self):
        rng = np.random.default_rng(13)
        x = np.linspace(0.0, 1.0, 12)
        y = x[:, None] + 0.05 * rng.normal(size=(12, 4))
        noise = rng.normal(size=12)
        out = metrics.bootstrap_correlation_difference(x, noise, y, jax.random.key(3))
        alone = metrics.bootstrap_correlation(x, y, jax.random.key(3))
        other = metrics.bootstrap_correlation(noise, y, jax.random.key(3))
        # The estimate is the difference of the two correlations; the interval excludes 0.
        assert float(out.estimate) == pytest.approx(float(alone.estimate) - float(other.estimate), abs=1e-6)
        assert float(out.low) > 0
        # A property against itself differs by exactly 0 on every resample.
        same = metrics.bootstrap_correlation_difference(x, x, y, jax.random.key(3))
        assert float(same.low) == float(same.high) == 0.0
        with pytest.raises(ValueError, match="one shape"):
            metrics.bootstrap_correlation_difference(x, x[:5], y, jax.random.key(3))


class TestDegenerateInputs:
    def test_empty_or_single_output_axes_are_refused_by_name(self):
        with pytest.raises(ValueError, match="non-empty last axis"):
            metrics.reward_variance(jnp.zeros((2, 0)), jnp.zeros((2, 0)))
        with pytest.raises(ValueError, match="at least 2 outputs"):
            metrics.accuracy(jnp.zeros((3, 1)), jnp.zeros((3, 1)))
        with pytest.raises(ValueError, match="non-empty last axis"):
            metrics.best_of_n_reward(jnp.zeros(0), jnp.zeros(0), jnp.zeros(0), 2)

    def test_zero_one_rewards_stored_as_bool_count_as_numbers(self):
        correct = jnp.array([[True, False, True], [False, False, True]])
        numbers, logits = correct.astype(jnp.float64), jnp.array([[0.0, 1.0, 2.0], [0.5, 0.0, -1.0]])
        score = jnp.array([[1.0, 0.0, 0.5], [0.2, 0.1, 0.3]])
        for kernel in (
            lambda r: metrics.reward_variance(logits, r),
            lambda r: metrics.normalize_rewards(logits, r),
            lambda r: metrics.accuracy(r, score),
            lambda r: metrics.accuracy(score, r, probs=jax.nn.softmax(logits)),
        ):
            np.testing.assert_array_equal(kernel(correct), kernel(numbers))

    def test_best_of_n_takes_whole_sample_counts(self):
        with pytest.raises(ValueError, match="whole numbers"):
            metrics.best_of_n_reward(jnp.zeros(2), jnp.arange(2.0), jnp.arange(2.0), 2.5)
        with pytest.raises(ValueError, match="whole numbers"):
            metrics.best_of_n_reward(jnp.zeros(2), jnp.arange(2.0), jnp.arange(2.0), 0)

    def test_constant_rewards_normalise_to_zero(self):
        out = metrics.normalize_rewards(jnp.zeros((2, 3)), jnp.full((2, 3), 0.7))
        np.testing.assert_array_equal(out, np.zeros((2, 3)))
        # Under a non-uniform policy too: its weighted mean of 0.7 rounds to another number, and
        # without centring the rounding came out as a variance of 1e-17 and rewards of +-1.
        logits = jax.random.normal(jax.random.key(0), (2, 3))
        for value in (0.7, 0.1, 1 / 3):
            for dtype in (jnp.float32, jnp.float64):
                rewards = jnp.full((2, 3), value, dtype)
                np.testing.assert_array_equal(metrics.normalize_rewards(logits.astype(dtype), rewards), 0.0)
                np.testing.assert_array_equal(metrics.reward_variance(logits.astype(dtype), rewards), 0.0)
        # Constant on the support, whatever lies off it.
        where = jnp.array([[True, True, False]] * 2)
        off_support = jnp.array([[0.7, 0.7, 5.0]] * 2)
        np.testing.assert_array_equal(metrics.reward_variance(logits, off_support, where=where), 0.0)
        # ... and so does its gradient: sqrt's derivative at a zero variance never enters.
        gradient = jax.grad(lambda logits: metrics.normalize_rewards(logits, jnp.full((2, 3), 0.7)).sum())
        np.testing.assert_array_equal(gradient(jnp.zeros((2, 3))), np.zeros((2, 3)))
