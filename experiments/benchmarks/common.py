"""What the benchmarks share: timing, the in-run matmul peak, and model FLOP counts."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from jaxrm.models import TransformerConfig

K = 2  # responses per prompt in the RLOO benchmarks (the official RLOO's k)

# Environment variables that change how the process allocates host memory: glibc's tunables and
# its older MALLOC_* variables, a preloaded allocator and its options (jemalloc's MALLOC_CONF,
# tcmalloc's TCMALLOC_*). They moved the RLOO update phase by about 20% on CPU
# (docs/performance.md), so a benchmark records the ones that are set.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD")
ALLOCATOR_PREFIXES = ("MALLOC_", "TCMALLOC_")


def allocator_settings() -> dict[str, str]:
    """The allocator variables set in this process's environment, by name (empty: the C library's defaults)."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if value and (name in ALLOCATOR_VARIABLES or name.startswith(ALLOCATOR_PREFIXES))
    }


def allocator_line() -> str:
    """One line saying which allocator settings a run measured under."""
    settings = allocator_settings()
    if not settings:
        return "host memory: the C library's default allocator settings"
    return "host memory: " + ", ".join(f"{name}={value}" for name, value in settings.items())


def seconds(fn) -> float:
    """Wall-clock seconds of one call of ``fn()``."""
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def compiled_timings(fn, *args, repeats: int):
    """``(times, compile_seconds, output)``: the seconds of ``repeats`` calls of
    ``jax.jit(fn)(*args)`` after a warm-up call, the seconds its ``.lower().compile()`` took,
    and the warm-up call's output."""
    began = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - began
    output = jax.block_until_ready(compiled(*args))
    return [seconds(lambda: jax.block_until_ready(compiled(*args))) for _ in range(repeats)], compile_s, output


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a ``size`` x ``size`` float32 matrix product under jit (best of ``repeats``), measured now."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    return 2 * size**3 / min(seconds(lambda: product(a).block_until_ready()) for _ in range(repeats))


def dense_params(config: TransformerConfig, *, reward_head: bool = False) -> int:
    """Parameters that cost a multiply-add per token: all but the input embedding (a lookup)."""
    return config.num_params(reward_head=reward_head) - config.vocab_size * config.hidden_size


def model_flops_per_iteration(config: TransformerConfig, *, sequences: int, length: int) -> float:
    """Model FLOPs of one RLOO iteration: generation, the reference's log-probs, the reward model
    (forward passes, ``2 x params`` per token) and the policy's update (forward and backward,
    ``6 x params``), over ``sequences`` sequences of ``length`` tokens; recomputation (remat, old
    log-probs) is not counted."""
    tokens = sequences * length
    return float((2 + 2 + 6) * dense_params(config) * tokens + 2 * dense_params(config, reward_head=True) * tokens)
