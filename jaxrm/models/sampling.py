"""Batched autoregressive sampling with a KV cache, as one compiled program.

Prompts are left-padded ``[batch, prompt_len]`` token ids with a boolean mask, so every row's
next token goes to the same cache slot. Generation runs in a ``lax.while_loop`` that stops when
every row has emitted EOS or ``max_new_tokens`` are drawn; finished rows are padded.

The sampling distribution at each step is ``softmax(filter(logits / temperature))`` where the
filter keeps the ``top_k`` largest logits, then the smallest set of those whose probabilities sum
to at least ``top_p`` (nucleus), in that order, as Hugging Face does.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm._checks import (
    NON_NEGATIVE,
    POSITIVE_INT,
    check_fields,
    check_int,
    check_key,
    check_token_ids,
    checked,
    is_concrete,
)
from jaxrm.models.transformer import CausalLM, KVCache, default_positions

# The smallest temperature that samples: below it float32 cannot keep logits / temperature in
# order (|logit| / T past ~1e9 rounds differently from one use to the next, and the draw's weights
# overflow or vanish). vLLM treats temperatures below this as greedy; here they are refused.
MIN_TEMPERATURE = 1e-5
SAMPLING_TEMPERATURE = (lambda v: v == 0 or v >= MIN_TEMPERATURE, f"0 (greedy) or >= {MIN_TEMPERATURE:g}")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to draw tokens.

    ``temperature=0`` is greedy decoding; its log-probs are then those of the unscaled softmax
    (after the top-k/top-p filters). ``top_k=0`` and ``top_p=1`` switch the filters off.
    Checked on construction; hashable, so one compiled sampler serves each distinct value.

    Attributes:
      max_new_tokens: most tokens generated per row (a positive int); the width of every
        :class:`Samples` array. Generation stops earlier once every row has emitted ``eos_id``.
      temperature: 0, or at least :data:`MIN_TEMPERATURE` (1e-5); logits are divided by it
        before the filters and the softmax. 0 is greedy decoding (argmax of the filtered logits).
        Default 1 (plain sampling).
      top_k: keep only the ``top_k`` largest logits (ties at the cut-off kept); an int
        ``>= 0``, with 0 (default) or any value ``>= vocab`` meaning off.
      top_p: nucleus threshold in ``(0, 1]``: after ``top_k``, keep the smallest set of most
        likely tokens whose probabilities sum to at least ``top_p``; 1 (default) is off.
      eos_id: token id that ends a row (the EOS itself is kept and masked in); None (default):
        every row runs for ``max_new_tokens``.
      pad_id: token id written after a row has ended (default 0).
      cache_phases: the decoding loop runs in this many phases (a positive int, default 4), and
        the KV cache grows at the start of each to hold the tokens of that phase: attention
        reads every slot of the cache, so early tokens then read a shorter one. Each phase is
        its own compiled loop, so more phases compile longer (and a transition briefly holds
        the old and the grown cache). 1 allocates the whole cache at once. The distribution
        is the same for every value, but the attention sums round differently, so a draw whose
        uniform number falls within rounding of a CDF boundary can differ (at ``pythia-70m``
        with random weights, 9 of 32 rows of 128 tokens diverged somewhere between 1 and 4
        phases; log-probs agreed to 2e-6 before that). The ``max_new_tokens - 1`` steps after
        the first token are split into at most that many phases.
    """

    max_new_tokens: int = dataclasses.field(metadata={"check": POSITIVE_INT})
    temperature: float = checked(1.0, SAMPLING_TEMPERATURE)
    top_k: int = checked(0, NON_NEGATIVE)
    top_p: float = checked(1.0, (lambda v: 0 < v <= 1, "in (0, 1]"))
    eos_id: int | None = checked(None, NON_NEGATIVE)
    pad_id: int = checked(0, NON_NEGATIVE)
    cache_phases: int = checked(4, POSITIVE_INT)

    def __post_init__(self):
        check_fields(self)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless ``eos_id`` and ``pad_id`` are ids of a ``vocab_size`` vocabulary."""
        for name in ("eos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and value >= vocab_size:
                raise ValueError(f"{name}={value} is outside the model's vocabulary [0, {vocab_size}).")


@flax.struct.dataclass
class Samples:
    """Generated continuations, all ``[batch, max_new_tokens]``.

    ``mask`` is True for generated tokens up to and including EOS; ``tokens`` hold ``pad_id`` and
    ``log_probs`` hold 0 where it is False.

    Attributes:
      tokens: int32 token ids of the continuations; ``pad_id`` after a row's EOS.
      log_probs: float32 log-probability of each drawn token under the distribution it was drawn
        from, ``log_softmax(filter_logits(logits, temperature, top_k, top_p))`` (see
        :class:`SamplingOptions`); 0 where ``mask`` is False.
      mask: bool, True on generated tokens up to and including the row's EOS, False after it.
    """

    tokens: jax.Array
    log_probs: jax.Array
    mask: jax.Array


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """``logits / temperature`` with tokens outside the top-k / top-p set at ``-inf`` (last axis = vocab).

    Ties at the cut-off are kept. ``temperature=0`` scales by 1.

    >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.7).tolist()[2]
    -inf
    """
    scaled = logits / temperature if temperature > 0 else logits
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        ranked = jax.lax.top_k(scaled, top_k)[0]
        scaled = jnp.where(scaled >= ranked[..., -1:], scaled, -jnp.inf)
    elif top_p < 1:
        ranked = -jnp.sort(-scaled, axis=-1)
    if top_p >= 1:
        return scaled
    # The nucleus is measured on what top_k kept, ties at its cut-off included: they enter the
    # normalizer, and (equal to the last ranked value) they come last in the order.
    probs = jnp.exp(ranked - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def token_log_probs(logits: jax.Array, tokens: jax.Array, **filters) -> jax.Array:
    """Log-probabilities of ``tokens`` under ``softmax(filter_logits(logits, **filters))``.

    ``logits`` is ``[..., vocab]`` and ``tokens`` is ``[...]``. Differentiable in ``logits`` in
    reverse mode (``jax.grad``, ``jax.vjp``; forward mode raises), with the closed form
    ``d log p(y) / d logits = onehot(y) - softmax(logits)`` taking one pass over the vocabulary
    (autodiff of ``log_softmax`` and a gather zero-fills and scatters instead).
    """
    return _log_prob_of(filter_logits(logits, **filters), tokens)


@jax.custom_vjp
def _log_prob_of(logits, tokens):
    return _log_prob_of_fwd(logits, tokens)[0]


def _log_prob_of_fwd(logits, tokens):
    # Shifted by the maximum, as log_softmax and the sampler's draws are: the same rounding.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_total = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - top[..., 0]
    return chosen - log_total, (logits, tokens, top[..., 0] + log_total)


def _log_prob_of_bwd(residuals, cotangent):
    logits, tokens, log_normalizer = residuals
    onehot = tokens[..., None] == jax.lax.broadcasted_iota(tokens.dtype, logits.shape, logits.ndim - 1)
    probs = jnp.exp(logits - log_normalizer[..., None])
    return (cotangent[..., None] * (onehot - probs)).astype(logits.dtype), None


_log_prob_of.defvjp(_log_prob_of_fwd, _log_prob_of_bwd)


_CDF_BLOCK = 128


def _first_above(cumulative, threshold, weights):
    """Index of the first ``cumulative > threshold`` with positive weight along the last axis.

    Never a zero-probability index: rounding can put a zero weight's partial sum above the
    threshold (the mass before a block is a difference of sums), or leave the threshold at or
    above the last partial sum, where the last index with positive weight is the right answer.
    """
    positive = weights > 0
    above = (cumulative > threshold) & positive
    last_positive = weights.shape[-1] - 1 - jnp.argmax(jnp.flip(positive, -1), -1)
    return jnp.where(above.any(-1), jnp.argmax(above, -1), last_positive)


def inverse_cdf_sample(key, log_probs: jax.Array) -> jax.Array:
    """One draw per row of ``[batch, vocab]`` log-probabilities by inverse-CDF sampling.

    With ``u ~ U[0, 1)`` the token is the first ``i`` with ``sum_{j<=i} p_j > u * sum_j p_j``. The
    prefix sums run in two levels (blocks of 128, then inside the chosen block), so a draw costs
    one pass over the vocabulary and one uniform number per row; Gumbel-max
    (``jax.random.categorical``) needs a random number per vocabulary entry, which dominates a
    decoding step on CPU. ``log_probs`` may be unnormalized (log-weights): each row is shifted
    by its maximum before exponentiating, so neither large nor very negative ones over- or
    underflow.
    """
    return _inverse_cdf(key, jnp.exp(log_probs - jnp.max(log_probs, axis=-1, keepdims=True)))[0]


def _inverse_cdf(key, weights):
    """``(tokens, total weight)`` of :func:`inverse_cdf_sample` on ``[batch, vocab]`` weights >= 0."""
    batch, vocab = weights.shape
    padded = -(-vocab // _CDF_BLOCK) * _CDF_BLOCK
    weights = jnp.pad(weights, ((0, 0), (0, padded - vocab))).reshape(batch, -1, _CDF_BLOCK)
    block_mass = weights.sum(-1)
    block_cumulative = jnp.cumsum(block_mass, -1)
    total = block_cumulative[:, -1]
    threshold = jax.random.uniform(key, (batch, 1), weights.dtype) * total[:, None]
    block = _first_above(block_cumulative, threshold, block_mass)
    mass_before = jnp.take_along_axis(block_cumulative - block_mass, block[:, None], -1)
    inside = jnp.take_along_axis(weights, block[:, None, None], 1)[:, 0]
    offset = _first_above(jnp.cumsum(inside, -1) + mass_before, threshold, inside)
    # Rows without a positive weight (NaN logits) still get a token of the vocabulary.
    return jnp.minimum(block * _CDF_BLOCK + offset, vocab - 1), total


def _draw(key, logits, options: SamplingOptions):
    """``(tokens, log_probs)`` of one draw per row; the exponentials are taken once, for both the
    CDF and the normalizer ``log sum_j exp(shifted_j)`` of the drawn token's log-prob."""
    filtered = filter_logits(logits, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    shifted = filtered - jnp.max(filtered, axis=-1, keepdims=True)
    if options.temperature == 0:
        tokens = jnp.argmax(filtered, axis=-1)
        log_normalizer = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    else:
        tokens, total = _inverse_cdf(key, jnp.exp(shifted))
        log_normalizer = jnp.log(total)
    chosen = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), chosen - log_normalizer


def make_sampler(graphdef: nnx.GraphDef, options: SamplingOptions):
    """A pure ``sample(state, prompt_tokens, prompt_mask, key) -> Samples`` for one model graph.

    Wrap it in ``jax.jit`` (or call it inside a jitted training step); nothing in it is Python
    side-effecting, so one program serves every call with the same shapes.
    """

    def sample(state, prompt_tokens, prompt_mask, key) -> Samples:
        model: CausalLM = nnx.merge(graphdef, state)
        batch, prompt_len = prompt_tokens.shape
        steps = options.max_new_tokens
        prompt_mask = prompt_mask.astype(bool)
        phase_ends = _phase_ends(steps, options.cache_phases)
        cache = KVCache.empty(model.config, batch, prompt_len + phase_ends[0])
        positions = default_positions(prompt_mask)
        # Transposed once per generation, not per token.
        kernel_by_vocab = model.kernel_by_vocab() if model.decodes_vocabulary_major() else None
        logits, cache = model.decode(
            prompt_tokens,
            prompt_mask,
            positions=positions,
            cache=cache,
            last_only=True,
            kernel_by_vocab=kernel_by_vocab,
        )
        next_position = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
        token, log_prob = _draw(jax.random.fold_in(key, 0), logits[:, -1], options)

        tokens = jnp.full((batch, steps), options.pad_id, jnp.int32).at[:, 0].set(token)
        log_probs = jnp.zeros((batch, steps), jnp.float32).at[:, 0].set(log_prob)
        mask = jnp.zeros((batch, steps), bool).at[:, 0].set(True)
        done = _finished(token, options)

        def unfinished_before(end):
            def unfinished(carry):
                step, *_, done = carry
                return (step < end) & ~jnp.all(done)

            return unfinished

        def generate_one(carry):
            step, cache, position, tokens, log_probs, mask, done = carry
            previous = tokens[:, step - 1]
            logits, cache = model.decode(
                previous[:, None],
                mask[:, step - 1, None],
                positions=position[:, None],
                cache=cache,
                kernel_by_vocab=kernel_by_vocab,
            )
            token, log_prob = _draw(jax.random.fold_in(key, step), logits[:, 0], options)
            live = ~done
            tokens = tokens.at[:, step].set(jnp.where(live, token, options.pad_id))
            log_probs = log_probs.at[:, step].set(jnp.where(live, log_prob, 0.0))
            mask = mask.at[:, step].set(live)
            done = done | (live & _finished(token, options))
            return step + 1, cache, position + 1, tokens, log_probs, mask, done

        carry = (jnp.int32(1), cache, next_position, tokens, log_probs, mask, done)
        for end in phase_ends:
            # Step s writes the token drawn at step s - 1 into slot prompt_len + s - 1.
            step, cache, *rest = carry
            carry = jax.lax.while_loop(
                unfinished_before(end), generate_one, (step, cache.grow(prompt_len + end), *rest)
            )
        _, _, _, tokens, log_probs, mask, _ = carry
        return Samples(tokens=tokens, log_probs=log_probs, mask=mask)

    return sample


def _phase_ends(steps: int, phases: int) -> list[int]:
    """The step at which each decoding phase stops (exclusive).

    The first token comes from the prompt's pass; the ``steps - 1`` decoding steps after it are
    split into at most ``phases`` near-equal parts.

    >>> _phase_ends(128, 4), _phase_ends(5, 4), _phase_ends(2, 4)
    ([33, 65, 97, 128], [2, 3, 4, 5], [2])
    """
    return sorted({1 + -(-(steps - 1) * (phase + 1) // phases) for phase in range(phases)})


def _finished(token, options: SamplingOptions):
    if options.eos_id is None:
        return jnp.zeros(token.shape, bool)
    return token == options.eos_id


@functools.lru_cache(maxsize=32)
def _compiled_sampler(graphdef, options: SamplingOptions):
    return jax.jit(make_sampler(graphdef, options))


def check_prompts(prompt_tokens, prompt_mask, vocab_size: int) -> None:
    """Clear errors for prompts a sampler cannot use (concrete inputs only)."""
    if np.ndim(prompt_tokens) != 2 or np.shape(prompt_tokens) != np.shape(prompt_mask):
        raise ValueError(
            f"prompt_tokens {np.shape(prompt_tokens)} and prompt_mask {np.shape(prompt_mask)} must both be "
            "[batch, prompt_len]."
        )
    check_token_ids("prompt_tokens", prompt_tokens, vocab_size)
    if not is_concrete(prompt_mask):
        return
    mask = np.asarray(prompt_mask).astype(bool)
    if not mask.any(axis=1).all():
        raise ValueError(f"prompt rows {np.flatnonzero(~mask.any(axis=1)).tolist()[:8]} are empty (all padding).")
    if (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ValueError("prompts must be left-padded (padding before the tokens); see jaxrm.models.pad_sequences.")


def sample(model: CausalLM, prompt_tokens, prompt_mask, key, **options) -> Samples:
    """Sample continuations of left-padded prompts (see :class:`SamplingOptions` for ``options``).

    One compiled program per (model graph, options, prompt shape); the model's parameters are
    an input, so training them does not recompile.
    """
    check_prompts(prompt_tokens, prompt_mask, model.config.vocab_size)
    check_key("key", key)
    options = SamplingOptions(**options)
    options.check_vocabulary(model.config.vocab_size)
    graphdef, state = nnx.split(model)
    return _compiled_sampler(graphdef, options)(state, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), key)


def pad_sequences(sequences, *, length: int | None = None, side: str = "left", pad_id: int = 0):
    """Pack token lists into ``(tokens [n, length], mask [n, length])`` padded on ``side``.

    >>> tokens, mask = pad_sequences([[5, 6], [7]])
    >>> tokens.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[True, True], [False, True]])
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is not one of ['left', 'right'].")
    for name, value in (("length", length), ("pad_id", pad_id)):
        if value is not None:
            check_int(name, value, low=0)
    for row, sequence in enumerate(sequences):
        ids = np.asarray(sequence)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sequence {row} must hold integer token ids, got dtype {ids.dtype}.")
        if ids.size and ids.min() < 0:
            raise ValueError(f"sequence {row} holds a negative token id ({int(ids.min())}).")
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence has {longest} tokens, more than length={length}.")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
        tokens[row, span] = sequence
        mask[row, span] = True
    return tokens, mask


def sequence_log_probs(model: CausalLM, prompt_tokens, prompt_mask, samples: Samples, **filters) -> jax.Array:
    """Per-token log-probs ``[batch, max_new_tokens]`` of ``samples`` recomputed by a plain forward pass.

    ``filters`` are the sampling options that shape the distribution (temperature, top_k, top_p);
    positions outside ``samples.mask`` are 0.
    """
    tokens = jnp.concatenate([prompt_tokens, samples.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), samples.mask], axis=1)
    prompt_len = prompt_tokens.shape[1]
    logits = model.head(model.trunk(tokens, mask)[:, prompt_len - 1 : -1])
    return jnp.where(samples.mask, token_log_probs(logits, samples.tokens, **filters), 0.0)
