"""Transformer policies and reward models in flax.nnx (the GPT-NeoX layout of Pythia).

- :class:`CausalLM` / :class:`RewardModel` built from a :class:`TransformerConfig` (or a named
  :func:`preset`, ``"tiny"`` to ``"pythia-2.8b"``);
- :func:`load_hf`: a local Hugging Face GPT-NeoX directory (safetensors only) into either, and
  :func:`read_hf_config`: its config, checked without reading a tensor;
- :func:`sample`: batched KV-cache generation with temperature / top-k / top-p / EOS, and
  :func:`make_sampler`, its pure form for use inside a jitted training step;
- :func:`sequence_log_probs` / :func:`token_log_probs`: log-probs of sampled tokens by a plain
  forward pass, under the same sampling distribution;
- :func:`save_model` / :func:`load_model` / :func:`read_metadata`: atomic model checkpoints.
"""

from jaxrm.models.checkpoint import load_model, read_metadata, save_model
from jaxrm.models.config import PRESETS, TransformerConfig, preset
from jaxrm.models.hf import load_hf, read_hf_config, read_safetensors
from jaxrm.models.sampling import (
    Samples,
    SamplingOptions,
    filter_logits,
    inverse_cdf_sample,
    make_sampler,
    pad_sequences,
    sample,
    sequence_log_probs,
    token_log_probs,
)
from jaxrm.models.transformer import CausalLM, KVCache, RewardModel, Transformer, default_positions, last_token_index

__all__ = [
    "PRESETS",
    "CausalLM",
    "KVCache",
    "RewardModel",
    "Samples",
    "SamplingOptions",
    "Transformer",
    "TransformerConfig",
    "default_positions",
    "filter_logits",
    "inverse_cdf_sample",
    "last_token_index",
    "load_hf",
    "load_model",
    "make_sampler",
    "pad_sequences",
    "preset",
    "read_hf_config",
    "read_metadata",
    "read_safetensors",
    "sample",
    "save_model",
    "sequence_log_probs",
    "token_log_probs",
]
