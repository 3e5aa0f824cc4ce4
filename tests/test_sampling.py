"""jaxrm.models.sampling: KV-cache generation against cache-free decoding and the softmax itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxrm.models import CausalLM, preset
from jaxrm.models.sampling import (
    SamplingOptions,
    _compiled_sampler,
    _first_above,
    _inverse_cdf,
    filter_logits,
    inverse_cdf_sample,
    pad_sequences,
    sample,
    sequence_log_probs,
)
from jaxrm.train.rlhf import RLHFConfig

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model():
    lm = CausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    # Sharpen the random model so its next-token distributions are far from uniform.
    lm.embed_out.kernel[...] = lm.embed_out.kernel[...] * 60.0
    return lm


@pytest.fixture(scope="module")
def prompts():
    return pad_sequences(PROMPTS)


def test_greedy_equals_stepwise_argmax_without_cache(model, prompts):
    tokens, mask = prompts
    steps = 5
    samples = sample(model, tokens, mask, jax.random.key(0), max_new_tokens=steps, temperature=0.0)
    # Cache-free reference: the whole right-padded sequence through a plain forward pass each step.
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda t, m: nnx.merge(graphdef, state)(t, m))
    sequences = [list(prompt) for prompt in PROMPTS]
    for _ in range(steps):
        padded, padded_mask = pad_sequences(sequences, length=tokens.shape[1] + steps, side="right")
        logits = forward(padded, padded_mask)
        for row, sequence in enumerate(sequences):
            sequence.append(int(jnp.argmax(logits[row, len(sequence) - 1])))
    for row, prompt in enumerate(PROMPTS):
        assert samples.tokens[row].tolist() == sequences[row][len(prompt) :]
    assert bool(samples.mask.all())


def test_returned_log_probs_equal_a_plain_forward_pass(model, prompts):
    tokens, mask = prompts
    options = dict(temperature=0.7, top_k=12, top_p=0.9)
    samples = sample(model, tokens, mask, jax.random.key(1), max_new_tokens=6, **options)
    recomputed = sequence_log_probs(model, jnp.asarray(tokens), jnp.asarray(mask), samples, **options)
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(samples.log_probs), atol=1e-5)
    assert np.all(np.asarray(samples.log_probs) <= 0) and np.any(np.asarray(samples.log_probs) < 0)


def test_eos_stops_a_row_and_pads_it(model, prompts):
    tokens, mask = prompts
    greedy = sample(model, tokens, mask, jax.random.key(0), max_new_tokens=5, temperature=0.0)
    # An EOS drawn mid-way (row 0's second token), and one drawn first (row 1's first token).
    for eos, (row_ending, end_there) in ((int(greedy.tokens[0, 1]), (0, 2)), (int(greedy.tokens[1, 0]), (1, 1))):
        stopped = sample(
            model, tokens, mask, jax.random.key(0), max_new_tokens=5, temperature=0.0, eos_id=eos, pad_id=96
        )
        for row in range(len(PROMPTS)):
            expected = greedy.tokens[row].tolist()
            end = expected.index(eos) + 1 if eos in expected else 5
            assert stopped.tokens[row, :end].tolist() == expected[:end]
            assert stopped.tokens[row, end:].tolist() == [96] * (5 - end)
            assert stopped.mask[row].tolist() == [True] * end + [False] * (5 - end)
            assert np.all(np.asarray(stopped.log_probs[row, end:]) == 0.0)
        assert int(stopped.mask[row_ending].sum()) <= end_there


def test_growing_the_cache_in_phases_gives_the_same_samples(model, prompts):
    tokens, mask = prompts
    greedy = sample(model, tokens, mask, jax.random.key(0), max_new_tokens=7, temperature=0.0)
    options = dict(max_new_tokens=7, top_k=20, eos_id=int(greedy.tokens[0, 3]))
    whole = sample(model, tokens, mask, jax.random.key(7), cache_phases=1, **options)
    for phases in (3, 9):  # 9 > the 6 steps after the first token: one phase per step
        grown = sample(model, tokens, mask, jax.random.key(7), cache_phases=phases, **options)
        np.testing.assert_array_equal(np.asarray(grown.tokens), np.asarray(whole.tokens))
        np.testing.assert_array_equal(np.asarray(grown.mask), np.asarray(whole.mask))
        # Attention sums over fewer (empty) slots: the same values up to float32 rounding.
        np.testing.assert_allclose(np.asarray(grown.log_probs), np.asarray(whole.log_probs), rtol=1e-5, atol=1e-6)
    assert not bool(whole.mask.all())  # some row ended at eos_id, mid-way through a phase


def _first_token_counts(model, key, draws, **options):
    tokens, mask = pad_sequences([PROMPTS[0]] * draws)
    samples = sample(model, tokens, mask, key, max_new_tokens=1, **options)
    return np.bincount(np.asarray(samples.tokens[:, 0]), minlength=model.config.vocab_size)


def _chi_square_p(counts, probs):
    expected = probs / probs.sum() * counts.sum()
    keep = expected >= 5  # pool the rare outcomes into one bin, as the test requires
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    return stats.chisquare(observed[expected > 0], expected[expected > 0]).pvalue


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=6)], ids=["plain", "top-k"])
def test_first_token_frequencies_match_the_softmax(model, options):
    logits = model(jnp.asarray([PROMPTS[0]]))[0, -1]
    probs = np.asarray(jax.nn.softmax(filter_logits(logits, **options)), np.float64)
    counts = _first_token_counts(model, jax.random.key(2024), 6000, **options)
    assert _chi_square_p(counts, probs) > 1e-3
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    # The test has power: the same counts reject the distribution at another temperature.
    other = np.asarray(jax.nn.softmax(logits / 2.0), np.float64)
    assert _chi_square_p(counts, other) < 1e-6


def test_filter_logits_keeps_top_k_then_nucleus():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
    assert np.isinf(filter_logits(logits, top_k=2)).tolist() == [False, False, True, True]
    # Mass before each token: 0, .4, .7, .9 -> top_p=0.7 keeps the first two, top_p=0.71 three.
    assert np.isinf(filter_logits(logits, top_p=0.7)).tolist() == [False, False, True, True]
    assert np.isinf(filter_logits(logits, top_p=0.71)).tolist() == [False, False, False, True]
    # top-p runs on the top-k renormalised: .4/.7 = .571 < 0.6, so two tokens survive.
    assert np.isinf(filter_logits(logits, top_k=3, top_p=0.6)).tolist() == [False, False, True, True]
    np.testing.assert_allclose(filter_logits(logits, temperature=0.5), 2 * logits)
    # Ties at the top-k cut-off stay, and top-p measures its mass with them: after top_k=2 the
    # probabilities are .576, .212, .212, so 0.7 keeps all three, as top-p alone does.
    tied = jnp.array([2.0, 1.0, 1.0, 0.0])
    assert np.isinf(filter_logits(tied, top_k=2, top_p=0.7)).tolist() == [False, False, False, True]
    assert np.isinf(filter_logits(tied, top_k=2, top_p=0.5)).tolist() == [False, True, True, True]


def test_one_program_serves_new_parameters_and_keys(model, prompts):
    tokens, mask = prompts
    other = nnx.clone(model)
    other.embed_out.kernel[...] = -other.embed_out.kernel[...]
    first = sample(model, tokens, mask, jax.random.key(5), max_new_tokens=3, top_k=7)
    second = sample(other, tokens, mask, jax.random.key(6), max_new_tokens=3, top_k=7)
    program = _compiled_sampler(nnx.graphdef(model), SamplingOptions(max_new_tokens=3, top_k=7))
    assert program._cache_size() == 1
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(second.tokens))


def test_bad_prompts_and_options_fail_clearly(model, prompts):
    tokens, mask = prompts
    key = jax.random.key(0)
    right_tokens, right_mask = pad_sequences(PROMPTS, side="right")
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, right_tokens, right_mask, key, max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(model, np.where(mask, 500, 0), mask, key, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        sample(model, np.zeros_like(tokens), np.zeros_like(mask), key, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, tokens, mask, key, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, tokens, mask, key, max_new_tokens=0)
    with pytest.raises(ValueError, match="cache_phases"):
        sample(model, tokens, mask, key, max_new_tokens=2, cache_phases=0)
    # Below 1e-5, float32 cannot keep logits / temperature in order (tokens outside the vocabulary came out).
    with pytest.raises(ValueError, match=r"temperature=1e-10: must be 0 \(greedy\) or >= 1e-05"):
        sample(model, tokens, mask, key, max_new_tokens=2, temperature=1e-10)
    with pytest.raises(ValueError, match=r"RLHFConfig\.temperature=1e-06: must be >= 1e-05"):
        RLHFConfig(temperature=1e-6)


def test_bfloat16_models_sample_and_score_close_to_float32(model, prompts):
    tokens, mask = prompts
    low = CausalLM(preset("tiny", dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(low, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model)))
    samples = sample(low, tokens, mask, jax.random.key(3), max_new_tokens=3, temperature=0.0)
    reference = sample(model, tokens, mask, jax.random.key(3), max_new_tokens=3, temperature=0.0)
    assert low.trunk.layers[0].mlp.dense_h_to_4h.kernel[...].dtype == jnp.bfloat16
    assert np.mean(np.asarray(samples.tokens) == np.asarray(reference.tokens)) >= 2 / 3
    assert samples.log_probs.dtype == jnp.float32 and np.all(np.isfinite(samples.log_probs))


def test_an_inverse_cdf_draw_never_lands_on_a_zero_weight_or_outside_the_vocabulary():
    # Rounding put the mass before a block (a difference of sums) one ulp above the threshold, so
    # the block's first entry, of weight 0, counted as the first partial sum above it.
    cumulative, threshold, weights = jnp.array([[0.6, 0.6, 1.3]]), jnp.array([[0.59]]), jnp.array([[0.0, 0.0, 0.7]])
    assert int(_first_above(cumulative, threshold, weights)[0]) == 2
    # Weights that are all NaN (a model gone wrong) still give ids of the vocabulary, not of its padding.
    tokens, _ = _inverse_cdf(jax.random.key(0), jnp.full((2, 97), jnp.nan))
    assert int(jnp.max(tokens)) < 97


def test_inverse_cdf_draws_follow_the_distribution_across_blocks():
    # 300 entries: two full blocks of 128 and a partial one; every third entry has probability 0.
    weights = np.where(np.arange(300) % 3 == 0, 0.0, 1.0 + np.sin(np.arange(300)) ** 2)
    probs = weights / weights.sum()
    log_probs = jnp.log(jnp.asarray(np.tile(probs, (20_000, 1)), jnp.float32))
    draws = np.asarray(inverse_cdf_sample(jax.random.key(11), log_probs))
    counts = np.bincount(draws, minlength=300)
    assert counts[probs == 0].sum() == 0
    assert _chi_square_p(counts, probs) > 1e-3
    # Unnormalized log-weights far from 0 neither overflow nor underflow.
    for shift in (300.0, -300.0):
        draws = np.asarray(inverse_cdf_sample(jax.random.key(12), log_probs + shift))
        assert _chi_square_p(np.bincount(draws, minlength=300), probs) > 1e-3
