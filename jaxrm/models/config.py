"""Transformer configurations: the GPT-NeoX layout of the Pythia family, as frozen dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxrm._checks import check_fields

ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only GPT-NeoX transformer.

    ``rotary_pct`` is the fraction of each head's dimensions that carry rotary position
    embeddings (Pythia: 0.25); ``parallel_residual`` adds attention and MLP outputs to the same
    residual, ``x + attn(ln1(x)) + mlp(ln2(x))`` (Pythia), instead of applying them in turn.
    ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype; attention logits and
    softmax always run in float32. Mixed precision is ``dtype="bfloat16"`` with
    ``param_dtype="float32"``: matmuls run in bfloat16 while the parameters, their gradients and
    the optimizer state stay float32 (LayerNorm statistics, the attention softmax and the
    language-model logits are computed in float32 either way). The last three fields change how the model is computed, never its
    parameters or its outputs beyond rounding. Every field is checked on construction.

    Attributes:
      vocab_size: number of token ids (rows of the input embedding, columns of the LM head);
        a positive int (the Pythia presets: 50304).
      hidden_size: ``d``, width of the residual stream; a positive int divisible by
        ``num_heads``.
      num_layers: number of transformer blocks; a positive int.
      num_heads: attention heads per block; a positive int dividing ``hidden_size``, each head
        of ``head_dim = hidden_size // num_heads`` dimensions.
      intermediate_size: width of the MLP's hidden layer (Pythia: ``4 * hidden_size``); a
        positive int.
      rotary_pct: fraction in ``[0, 1]`` of each head's dimensions rotated by the rotary
        embedding; ``rotary_dim = int(head_dim * rotary_pct)`` must be even (0 turns rotary
        embeddings off). Default 0.25 (Pythia).
      rotary_base: base ``b > 0`` of the rotary frequencies ``b^(-2i / rotary_dim)``; default
        10000.
      max_position: context length of the checkpoint (Hugging Face
        ``max_position_embeddings``), a positive int; recorded and checked only, since rotary
        embeddings are computed for any position and nothing here truncates longer inputs.
      layer_norm_eps: epsilon (> 0) added to the variance in every LayerNorm; default 1e-5.
      parallel_residual: True for ``x + attn(ln1(x)) + mlp(ln2(x))`` (Pythia), False for the
        sequential ``x = x + attn(ln1(x)); x + mlp(ln2(x))``.
      attention_bias: whether the attention's query/key/value and output projections have
        biases (the MLP projections always do).
      activation: the MLP nonlinearity, one of ``ACTIVATIONS``: ``gelu`` (exact erf form),
        ``gelu_new``, ``gelu_fast`` and ``gelu_pytorch_tanh`` (all the tanh approximation), or
        ``relu``.
      dtype: compute dtype of activations and matmuls, one of ``DTYPES`` (``float32``,
        ``bfloat16``, ``float16``, ``float64``).
      param_dtype: storage dtype of the parameters, one of ``DTYPES``.
      scan_layers: run the blocks as one ``jax.lax.scan`` over their stacked parameters (True,
        default), so the program holds one block's operations whatever ``num_layers`` (compile
        time of an RLOO iteration grows 1.5-1.7x from 6 to 24 layers, against 3.0-3.8x unrolled,
        with the optimizer on stacked layers, :mod:`jaxrm.train.optimizers`); False
        unrolls them. The parameters are stored per layer either way (the Hugging Face
        layout), and the scan stacks them on each call: one extra copy of the block parameters
        in the storage dtype (and a stacked gradient in the backward pass). On CPU each scanned
        layer also computes with a copy of its slice of the parameters and of the KV cache;
        unrolled layers copy neither (:class:`~jaxrm.models.transformer.KVCache`), which made
        generation at ``pythia-70m`` and RLOO iterations at ``pythia-10m`` faster
        (docs/performance.md). For the backward pass a scanned block keeps its input and the outputs of
        its matrix products and recomputes the elementwise work (LayerNorm, GELU, softmax)
        from them (``jax.checkpoint`` with the ``dots_saveable`` policy), which halved the
        temporaries of an RLOO iteration at ``pythia-10m``; unrolled blocks are not
        checkpointed. cuDNN attention is not a matrix product to that policy, so on a GPU it
        would run again in the backward pass (untested).
      remat: recompute each block's activations in the backward pass instead of storing them
        (``jax.checkpoint`` per layer): only each block's input is kept, for about one more
        forward pass of compute; overrides the scanned blocks' policy above. Default False.
      attention_implementation: ``"xla"`` (plain XLA, any device), ``"cudnn"`` (cuDNN flash
        attention: CUDA GPUs, 16-bit ``dtype``) or ``"auto"`` (default: cuDNN where its kernel
        accepts the call, XLA otherwise; see
        :func:`jaxrm.models.transformer.resolved_attention_implementation`); all go through
        ``jax.nn.dot_product_attention``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_position: int = 2048
    layer_norm_eps: float = 1e-5
    parallel_residual: bool = True
    attention_bias: bool = True
    activation: str = "gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    attention_implementation: str = "auto"

    def __post_init__(self):
        check_fields(self)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TransformerConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}."
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"TransformerConfig.rotary_pct must lie in [0, 1], got {self.rotary_pct!r}.")
        if self.rotary_dim % 2:
            raise ValueError(
                f"TransformerConfig: rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives an odd "
                f"rotary dimension {self.rotary_dim}; it must be even."
            )
        if not (self.rotary_base > 0 and self.layer_norm_eps > 0):
            raise ValueError("TransformerConfig.rotary_base and layer_norm_eps must be positive.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TransformerConfig.activation={self.activation!r} is not one of {list(ACTIVATIONS)}.")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"TransformerConfig.attention_implementation={self.attention_implementation!r} is not one of "
                f"{list(ATTENTION_IMPLEMENTATIONS)}."
            )
        if self.attention_implementation == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(
                f"TransformerConfig.attention_implementation='cudnn' needs a 16-bit dtype (bfloat16 or float16), "
                f"got dtype={self.dtype!r}; use 'auto' to fall back to XLA."
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r} is not one of {list(DTYPES)}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        # int() truncation as GPT-NeoX does, so checkpoints keep their exact rotary width.
        return int(self.head_dim * self.rotary_pct)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)

    def num_params(self, *, reward_head: bool = False) -> int:
        """Parameter count of the causal LM (or of the reward model with ``reward_head=True``)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attention = d * 3 * d + d * d + (4 * d if self.attention_bias else 0)
        mlp = 2 * d * f + f + d
        layer = attention + mlp + 4 * d
        head = d if reward_head else d * v
        return v * d + self.num_layers * layer + 2 * d + head

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> TransformerConfig:
        """Read a Hugging Face ``config.json`` of a GPT-NeoX model (Pythia), old or new key names."""
        model_type = hf.get("model_type")
        if model_type != "gpt_neox":
            raise ValueError(
                f"only GPT-NeoX (Pythia) checkpoints are supported; config.json has model_type={model_type!r}."
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rotary scaling {rope_type!r} is not supported (only plain rotary embeddings).")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            # As the file has them: the config's field checks refuse a string, null or a bool
            # where a number is due, and anything but true/false for the switches.
            rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
            rotary_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
            max_position=hf.get("max_position_embeddings", 2048),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            parallel_residual=hf.get("use_parallel_residual", True),
            attention_bias=hf.get("attention_bias", True),
            activation=hf.get("hidden_act", "gelu"),
        )
        if hf.get("tie_word_embeddings", False):
            raise ValueError("tied input/output embeddings are not part of the GPT-NeoX layout supported here.")
        fields.update(overrides)
        return cls(**fields)


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=4 * hidden
    )


PRESETS: dict[str, TransformerConfig] = {
    # tiny: tests; pythia-10m: a ~9M-parameter Pythia-shaped model with an 8k vocabulary for CPU studies.
    "tiny": _pythia(32, 2, 4, vocab=97),
    "pythia-10m": _pythia(256, 6, 4, vocab=8192),
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named configuration (see ``PRESETS``), optionally with some fields replaced.

    >>> preset("pythia-70m").num_params()
    70426624
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {list(PRESETS)}.")
    return PRESETS[name].replace(**overrides)
