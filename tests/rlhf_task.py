"""A tiny deterministic RLHF task shared by the trainer tests and their subprocess workers.

The ground truth scores a response by the fraction of its tokens below 20 (graded in [0, 1]);
the policy is the ``tiny`` preset from a fixed seed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.models import CausalLM, pad_sequences, preset
from jaxrm.train.driver import run_rlhf
from jaxrm.train.rlhf import RLHFConfig

# adam_eps 1e-6: Adam divides by |g| + eps, so with the default 1e-8 a gradient component that is
# ~1e-8 turns float-summation-order noise (1 vs 4 devices) into a visible update difference.
CONFIG = RLHFConfig(prompts_per_iteration=8, max_new_tokens=6, learning_rate=3e-3, kl_coef=0.01, adam_eps=1e-6)


def ground_truth(params, prompt, prompt_mask, response, response_mask):
    del params, prompt, prompt_mask
    return jnp.sum((response < 20) & response_mask, -1) / jnp.maximum(jnp.sum(response_mask, -1), 1)


def policy() -> CausalLM:
    return CausalLM(preset("tiny"), rngs=nnx.Rngs(0))


def prompts(count: int = 32):
    rng = np.random.default_rng(0)
    return pad_sequences([list(rng.integers(1, 97, rng.integers(2, 6))) for _ in range(count)])


def run(out_dir, iterations: int, **options):
    """``run_rlhf`` of the task: the ground truth is both the teacher and the measured reward."""
    tokens, mask = prompts()
    return run_rlhf(
        policy(),
        ground_truth,
        None,
        tokens,
        mask,
        CONFIG,
        num_iterations=iterations,
        out_dir=out_dir,
        ground_truth_fn=ground_truth,
        **options,
    )
