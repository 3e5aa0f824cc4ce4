"""Transformer policies and reward models in flax.nnx (the GPT-NeoX layout of Pythia)."""

from jaxrm.models.config import PRESETS, TransformerConfig, preset
from jaxrm.models.transformer import CausalLM, KVCache, RewardModel, Transformer, default_positions, last_token_index

__all__ = [
    "PRESETS",
    "CausalLM",
    "KVCache",
    "RewardModel",
    "Transformer",
    "TransformerConfig",
    "default_positions",
    "last_token_index",
    "preset",
]
