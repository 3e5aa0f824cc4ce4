"""A decoder-only GPT-NeoX transformer (the Pythia layout) in flax.nnx.

Submodules carry the Hugging Face names (``embed_in``, ``layers[i].attention.query_key_value``,
``mlp.dense_h_to_4h``, ``final_layer_norm``, ``embed_out``, ``score``) so that checkpoints map one
to one. Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``,
``norm``) in its ``out_sharding`` metadata; :mod:`jaxrm.sharding` maps them onto a mesh.

Sequences are ``[batch, time]`` token ids with a boolean ``mask`` (``True`` = real token); padding
may be on the left or the right. Position ids default to ``cumsum(mask) - 1``, so a left-padded
prompt sees the same positions as the unpadded one.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm._checks import check_token_ids, is_concrete
from jaxrm.models.config import TransformerConfig


def _param_metadata(*axes: str | None) -> dict:
    # Logical names only: variables are placed on a mesh later, by jaxrm.sharding, not at creation.
    return {"out_sharding": axes, "eager_sharding": False}


def _linear(config: TransformerConfig, features_in, features_out, axes, *, rngs, bias=True) -> nnx.Linear:
    return nnx.Linear(
        features_in,
        features_out,
        use_bias=bias,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=_param_metadata(*axes),
        bias_metadata=_param_metadata(axes[1]),
        rngs=rngs,
    )


def _layer_norm(config: TransformerConfig, *, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        use_fast_variance=False,
        scale_metadata=_param_metadata("norm"),
        bias_metadata=_param_metadata("norm"),
        rngs=rngs,
    )


def _gelu(x):
    """Exact GELU in PyTorch's form, ``x (1 + erf(x / sqrt 2)) / 2``, computed in at least float32
    (as PyTorch does for 16-bit inputs: in bfloat16, ``1 + erf`` cancels for negative ``x``).
    ``jax.nn.gelu`` takes ``erfc``, which XLA CPU evaluates 1.6x slower; in float32 both agree
    with PyTorch to about 1e-6."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (0.5 * wide * (1 + jax.lax.erf(wide * jnp.asarray(0.5**0.5, wide.dtype)))).astype(x.dtype)


def _per_position(fn, x):
    """``fn`` applied to ``x`` as ``[positions, features]`` rows, the leading axes restored.

    Every linear layer and the unembedding run this way: a kernel's gradient then contracts one
    axis, which XLA CPU computes without first transposing the cotangent. With ``[batch, time]``
    axes it copied the ``[positions, vocab]`` logits cotangent transposed, and an RLOO update at
    ``pythia-10m`` ran 1.2x slower.
    """
    out = fn(x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


_ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``length`` slots, filled up to ``index``.

    With scanned layers (``config.scan_layers``), ``keys`` and ``values`` are each one
    ``[layers, batch, heads, length, head_dim]`` array: the scan carries the whole cache, each
    layer updates its own slice in place and attends to a copy of it (a matrix product cannot
    read a slice of a larger array in place on CPU). With unrolled layers they are tuples of one
    ``[batch, heads, length, head_dim]`` array per layer, which attention reads as stored: no
    copy, which made generation at ``pythia-70m`` about 10% faster. ``valid[b, s]`` says whether
    slot ``s`` holds a real token (padding slots are never attended to).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: TransformerConfig, batch: int, length: int) -> KVCache:
        shape = (batch, config.num_heads, length, config.head_dim)
        if config.scan_layers:
            zeros = jnp.zeros((config.num_layers, *shape), config.compute_dtype)
        else:
            zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
        return cls(zeros, zeros, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

    def grow(self, length: int) -> KVCache:
        """This cache with ``length`` slots (at least its current number); the new slots are empty.

        Attention reads every slot of the cache, valid or not, so a sampler that grows its cache
        as it fills (:attr:`jaxrm.models.sampling.SamplingOptions.cache_phases`) reads less.
        """
        extra = length - self.valid.shape[1]
        if extra < 0:
            raise ValueError(f"cannot grow a cache of {self.valid.shape[1]} slots to {length}.")

        def pad(stored):  # [(layers,) batch, heads, slots, head_dim]
            return jnp.pad(stored, ((0, 0),) * (stored.ndim - 2) + ((0, extra), (0, 0)))

        return self.replace(
            keys=jax.tree.map(pad, self.keys),
            values=jax.tree.map(pad, self.values),
            valid=jnp.pad(self.valid, ((0, 0), (0, extra))),
        )


def default_positions(mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` (clipped at 0): padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _rotate(x: jax.Array, positions: jax.Array, config: TransformerConfig) -> jax.Array:
    """Rotary embedding on the first ``rotary_dim`` features of each head (GPT-NeoX half-split form)."""
    dim = config.rotary_dim
    if dim == 0:
        return x
    inv_freq = 1.0 / (config.rotary_base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, time, dim/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :].astype(x.dtype)
    rotary, passthrough = x[..., :dim], x[..., dim:]
    first, second = rotary[..., : dim // 2], rotary[..., dim // 2 :]
    rotated = rotary * cos + jnp.concatenate([-second, first], -1) * sin
    return jnp.concatenate([rotated, passthrough], -1)


def resolved_attention_implementation(config: TransformerConfig, query_len: int, key_len: int) -> str:
    """The ``jax.nn.dot_product_attention`` implementation used for one call's static shapes.

    ``"auto"`` takes cuDNN only where its flash kernel accepts the call: a CUDA GPU, 16-bit
    compute, a head size that is a multiple of 8 and at most 128 (256 from compute capability
    9.0, Hopper), and even query and key lengths (cuDNN refuses the backward pass of a masked
    call with odd lengths, e.g. a decoding step's one query); XLA otherwise.
    """
    if config.attention_implementation != "auto":
        return config.attention_implementation
    device = jax.devices()[0]
    if device.platform != "gpu" or "rocm" in getattr(device.client, "platform_version", "").lower():
        return "xla"
    capability = float(getattr(device, "compute_capability", "0") or 0)
    largest_head = 256 if capability >= 9.0 else 128
    fits = config.head_dim % 8 == 0 and config.head_dim <= largest_head and query_len % 2 == 0 == key_len % 2
    half = config.compute_dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if fits and half else "xla"


class Attention(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.query_key_value = _linear(config, d, 3 * d, ("embed", "heads"), rngs=rngs, bias=config.attention_bias)
        self.dense = _linear(config, d, d, ("heads", "embed"), rngs=rngs, bias=config.attention_bias)

    def __call__(self, x, *, positions, visible, cache=None, layer=None):
        """Attention output, and with a cache the cache with this call's keys and values written.

        ``visible[b, t, s]`` says whether query ``t`` may attend to key slot ``s`` (passed to
        ``dot_product_attention`` as a mask, which cuDNN applies as a dense bias). ``cache`` is
        the whole :class:`KVCache`; this layer writes its new keys and values into its own slice
        or array (``layer``, a scanned index or, with unrolled layers, a Python int) at
        ``cache.index``, in place, and attends to them.
        """
        config = self.config
        batch, time, _ = x.shape
        # The fused projection is laid out per head as [q | k | v], as in GPT-NeoX.
        qkv = _per_position(self.query_key_value, x).reshape(batch, time, config.num_heads, 3 * config.head_dim)
        query, key, value = jnp.split(qkv, 3, axis=-1)
        query, key = _rotate(query, positions, config), _rotate(key, positions, config)
        if cache is None:
            keys, values = key, value
        else:
            # The cache is head-major ([batch, heads, slots, dim]) because the CPU's batched
            # matmuls want the batch dimensions first: a slot-major cache cost a transpose of
            # every layer's cache per decoding step (1.6x slower generation at pythia-10m). The
            # transpose to the [batch, slots, heads, dim] that dot_product_attention takes below
            # cancels against the one inside it, so XLA reads the cache as stored.
            zero = jnp.zeros((), jnp.int32)  # all indices one integer type, also under jax_enable_x64
            head_major = (key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3))
            if isinstance(cache.keys, tuple):  # one array per layer
                written = [
                    jax.lax.dynamic_update_slice(
                        stored[layer], new.astype(stored[layer].dtype), (zero, zero, cache.index, zero)
                    )
                    for stored, new in zip((cache.keys, cache.values), head_major)
                ]
                cache = cache.replace(
                    keys=(*cache.keys[:layer], written[0], *cache.keys[layer + 1 :]),
                    values=(*cache.values[:layer], written[1], *cache.values[layer + 1 :]),
                )
            else:
                start = (jnp.asarray(layer, jnp.int32), zero, zero, cache.index, zero)
                stacked = [
                    jax.lax.dynamic_update_slice(stored, new[None].astype(stored.dtype), start)
                    for stored, new in zip((cache.keys, cache.values), head_major)
                ]
                cache = cache.replace(keys=stacked[0], values=stacked[1])
                written = [jax.lax.dynamic_index_in_dim(a, layer, keepdims=False) for a in stacked]
            keys, values = (a.transpose(0, 2, 1, 3) for a in written)
        implementation = resolved_attention_implementation(config, time, keys.shape[1])
        out = jax.nn.dot_product_attention(
            query.astype(keys.dtype), keys, values, mask=visible[:, None], implementation=implementation
        )
        return _per_position(self.dense, out.reshape(batch, time, -1)), cache


class MLP(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = _linear(config, d, f, ("embed", "mlp"), rngs=rngs)
        self.dense_4h_to_h = _linear(config, f, d, ("mlp", "embed"), rngs=rngs)
        self.activation = config.activation

    def __call__(self, x):
        return _per_position(
            lambda rows: self.dense_4h_to_h(_ACTIVATIONS[self.activation](self.dense_h_to_4h(rows))), x
        )


class Block(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = _layer_norm(config, rngs=rngs)
        self.post_attention_layernorm = _layer_norm(config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, **attention_kwargs):
        attended, cache = self.attention(self.input_layernorm(x), **attention_kwargs)
        if self.parallel_residual:
            return x + attended + self.mlp(self.post_attention_layernorm(x)), cache
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Transformer(nnx.Module):
    """The trunk: token embedding, ``num_layers`` blocks, final LayerNorm -> hidden states."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if config.dtype == "float16" and jax.default_backend() == "cpu":
            # Refused here rather than at the first matmul, where XLA names only its precision.
            raise ValueError(
                "TransformerConfig.dtype='float16': XLA's CPU backend has no float16 matrix products; "
                "compute in bfloat16 or float32 on a CPU (param_dtype may stay float16)."
            )
        self.config = config
        self.embed_in = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.compute_dtype,
            param_dtype=config.storage_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata=_param_metadata("vocab", "embed"),
            rngs=rngs,
        )
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_layer_norm = _layer_norm(config, rngs=rngs)

    def __call__(self, tokens, mask=None, *, positions=None, cache: KVCache | None = None):
        """Hidden states ``[batch, time, hidden]`` (and the updated cache when one is given).

        With a cache, ``tokens`` fill slots ``cache.index .. cache.index + time`` and attend to
        every earlier valid slot; ``mask`` then marks which of the new tokens are real.

        Called outside a trace, the token ids are checked against the vocabulary (an id beyond
        the embedding table would give NaN, a negative one another token's row) and the cache
        against overflowing (a write past its last slot would land on the last slots); under
        ``jit`` the values cannot be read, and the callers in jaxrm check them before tracing.
        """
        check_token_ids("tokens", tokens, self.config.vocab_size)
        if cache is not None and is_concrete(cache.index) and int(cache.index) + tokens.shape[1] > cache.valid.shape[1]:
            raise ValueError(
                f"the KV cache holds {cache.valid.shape[1]} slots, {int(cache.index)} filled: no room for "
                f"{tokens.shape[1]} more token(s); allocate a larger cache (KVCache.empty)."
            )
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        if positions is None:
            if cache is not None:
                raise ValueError("pass positions explicitly when decoding with a cache.")
            positions = default_positions(mask)
        time = tokens.shape[1]
        if cache is None:
            key_valid, query_slots = mask, jnp.arange(time)
        else:
            zero = jnp.zeros((), jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (zero, cache.index))
            query_slots = cache.index + jnp.arange(time)
        # A key is visible when it is a real token and its slot is not after the query's slot.
        key_slots = jnp.arange(key_valid.shape[1])
        visible = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])
        x, cache = self._blocks(self.embed_in(tokens), cache, positions=positions, visible=visible)
        if cache is None:
            return self.final_layer_norm(x)
        return self.final_layer_norm(x), cache.replace(valid=key_valid, index=cache.index + time)

    def _blocks(self, x, cache, **attention_kwargs):
        """Every block in turn; returns the output and the cache with every layer's keys written.

        The blocks run as one pure function of a block's parameters, either scanned over the
        stacked parameters or unrolled (``config.scan_layers``). Without a cache (training,
        scoring), what a block keeps for the backward pass: with ``config.remat`` only its
        input; otherwise, scanned, its input and its matrix products' outputs (the elementwise
        work is recomputed); unrolled, everything (no checkpoint).
        """
        config = self.config
        graphdef = nnx.graphdef(self.layers[0])
        states = [nnx.state(block) for block in self.layers]

        def block(carry, state_and_layer):
            x, cache = carry
            state, layer = state_and_layer
            return nnx.merge(graphdef, state)(x, cache=cache, layer=layer, **attention_kwargs), None

        # A decoding step is never differentiated, and a checkpointed block would save the whole
        # carried cache at every layer if it were.
        if cache is None and config.remat:
            block = jax.checkpoint(block, prevent_cse=not config.scan_layers)
        elif cache is None and config.scan_layers:
            # A scan saves each layer's residuals into stacked arrays, which costs more than an
            # unrolled layer's own buffers (on CPU they are zero-filled, then written and read
            # once more); keeping only the products' outputs halves an RLOO iteration's
            # temporaries (docs/performance.md).
            block = jax.checkpoint(block, prevent_cse=False, policy=jax.checkpoint_policies.dots_saveable)
        if config.scan_layers:
            stacked = jax.tree.map(lambda *layer: jnp.stack(layer), *states)
            carry, _ = jax.lax.scan(block, (x, cache), (stacked, jnp.arange(config.num_layers)))
            return carry
        carry = (x, cache)
        for layer, state in enumerate(states):
            carry, _ = block(carry, (state, layer))
        return carry


class CausalLM(nnx.Module):
    """GPT-NeoX causal language model: the trunk plus an untied unembedding ``embed_out``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.trunk = Transformer(config, rngs=rngs)
        self.embed_out = _linear(
            config, config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs, bias=False
        )

    def __call__(self, tokens, mask=None, *, positions=None):
        """Next-token logits ``[batch, time, vocab]`` (float32) for every position."""
        return self.head(self.trunk(tokens, mask, positions=positions))

    def head(self, hidden, *, kernel_by_vocab=None):
        """Float32 logits of trunk outputs ``[..., hidden]``: apply it to the positions whose
        next token is wanted only (the unembedding is the widest matmul of a small model).

        The matmul runs in the compute dtype and accumulates and returns float32, so bfloat16
        compute does not round the logits that log-probs, ratios and KL are taken from.

        ``kernel_by_vocab``: the unembedding kernel transposed, ``[vocab, hidden]``
        (:meth:`kernel_by_vocab`), for a caller that takes the logits of a few rows many times,
        as a sampler does. The product then runs vocabulary-major, which XLA CPU computes
        1.3x faster for a decoding step's 32 rows at ``pythia-70m`` width (with the kernel
        ``[hidden, vocab]`` as stored, the few rows make a skinny product); take the transpose
        once, outside the loop. Same logits up to float32 rounding. Float32 compute only on CPU
        (:meth:`decodes_vocabulary_major`).
        """
        if kernel_by_vocab is None:
            kernel = self.embed_out.kernel[...].astype(hidden.dtype)
            return _per_position(
                lambda rows: jnp.einsum("td,dv->tv", rows, kernel, preferred_element_type=jnp.float32), hidden
            )
        rows = hidden.reshape(-1, hidden.shape[-1])
        by_vocab = jnp.einsum(
            "vd,td->vt", kernel_by_vocab.astype(hidden.dtype), rows, preferred_element_type=jnp.float32
        )
        # Without the barrier XLA folds the transpose into the product, which then runs as
        # slowly as the hidden-major one.
        return jax.lax.optimization_barrier(by_vocab).T.reshape(*hidden.shape[:-1], kernel_by_vocab.shape[0])

    def decodes_vocabulary_major(self) -> bool:
        """Whether a sampler should pass :meth:`kernel_by_vocab` to :meth:`decode`: with float32
        compute on a CPU, where it was measured faster. XLA CPU has no bfloat16 x bfloat16 ->
        float32 product in that layout, and on accelerators it is unmeasured."""
        return jax.devices()[0].platform == "cpu" and self.config.compute_dtype == jnp.float32

    def kernel_by_vocab(self) -> jax.Array:
        """The unembedding kernel transposed, ``[vocab, hidden]``, in the compute dtype, for
        :meth:`head` and :meth:`decode`."""
        return self.embed_out.kernel[...].T.astype(self.config.compute_dtype)

    def decode(self, tokens, mask, *, positions, cache: KVCache, last_only: bool = False, kernel_by_vocab=None):
        """Logits of ``tokens`` written into ``cache`` at ``cache.index``; returns ``(logits, cache)``.

        ``last_only``: logits of the last position only (``[batch, 1, vocab]``), all a sampler
        needs. ``kernel_by_vocab``: as in :meth:`head`.
        """
        hidden, cache = self.trunk(tokens, mask, positions=positions, cache=cache)
        return self.head(hidden[:, -1:] if last_only else hidden, kernel_by_vocab=kernel_by_vocab), cache


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row (left or right padding); 0 for an all-padding row."""
    slots = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask.astype(bool), slots, 0), axis=-1)


class RewardModel(nnx.Module):
    """The trunk plus a scalar head ``score`` read at the last real token of each sequence.

    This is Hugging Face's ``GPTNeoXForSequenceClassification`` with one label. The head starts at
    zero, so a reward model initialised from a language model first scores every response 0.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.trunk = Transformer(config, rngs=rngs)
        self.score = nnx.Linear(
            config.hidden_size,
            1,
            use_bias=False,
            dtype=config.compute_dtype,
            param_dtype=config.storage_dtype,
            kernel_init=nnx.initializers.zeros,
            kernel_metadata=_param_metadata("embed", None),
            rngs=rngs,
        )

    def __call__(self, tokens, mask=None, *, positions=None):
        """Rewards ``[batch]`` (float32) of whole sequences. As for :meth:`CausalLM.head`, the
        score's product runs in the compute dtype and accumulates and returns float32, so
        bfloat16 compute does not round the rewards to 8 significant bits.

        A row without a real token has no last token to read: called outside a trace, such a row
        is refused (under ``jit`` it would be scored at position 0)."""
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask
        if is_concrete(mask):
            empty = np.flatnonzero(~np.asarray(mask, bool).any(-1))
            if empty.size:
                raise ValueError(f"mask rows {empty[:8].tolist()} have no real token to score.")
        hidden = self.trunk(tokens, mask, positions=positions)
        last = jnp.take_along_axis(hidden, last_token_index(mask)[:, None, None], axis=1)[:, 0]
        kernel = self.score.kernel[...].astype(last.dtype)
        return jnp.einsum("bd,d->b", last, kernel[:, 0], preferred_element_type=jnp.float32)
