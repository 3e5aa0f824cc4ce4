"""What the benchmarks share: timing, the in-run matmul peak, and model FLOP counts."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxrm.models import TransformerConfig
from jaxrm.studies import check_out_directory, write_json

K = 2  # responses per prompt in the RLOO benchmarks (the official RLOO's k)

# Environment variables that change how the process allocates host memory: glibc's tunables and
# its older MALLOC_* variables, a preloaded allocator and its options (jemalloc's MALLOC_CONF,
# tcmalloc's TCMALLOC_*). They moved the RLOO update phase by about 20% on CPU
# (docs/performance.md), so a benchmark records the ones that are set.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD")
ALLOCATOR_PREFIXES = ("MALLOC_", "TCMALLOC_")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The benchmarks' ``--help``: each option's default after its help, descriptions as written.
    An option whose default is None says in its own help what it then does."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


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


# The packages whose versions a benchmark's figures depend on: JAX's stack, and the baselines.
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "torch", "transformers", "trl")


def package_versions() -> dict[str, str]:
    """The installed version of each of :data:`RECORDED_PACKAGES` (those not installed left out)."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_record(path: Path, record: dict) -> None:
    """Write a benchmark's JSON record atomically, with the package versions under ``versions``."""
    write_json(path, {**record, "versions": package_versions()})


def seconds(fn) -> float:
    """Wall-clock seconds of one call of ``fn()``."""
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def alternating_rounds(timers: dict, *, rounds: int) -> dict[str, list[float]]:
    """Seconds of each of ``timers`` (name: a function that times its own work and returns
    seconds) in each of ``rounds`` rounds, the timers taking turns within a round.

    This machine's speed drifts by 10-20% within minutes (docs/performance.md); timing one side
    fully and then the other compares them at different speeds, while taking turns exposes both to
    the same drift, and round ``i`` of one side pairs with round ``i`` of another.
    """
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return times


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


def _forward_flops(config: TransformerConfig, *, positions: int, attended: float, head_positions: int, head: int):
    """FLOPs of one forward pass over one sequence: the blocks' products (2 x their parameters per
    position), causal attention (``4 x layers x hidden`` per attended pair of positions) and the
    head on ``head_positions`` positions (``head`` its parameters)."""
    blocks = config.num_params() - 2 * config.vocab_size * config.hidden_size  # less both embeddings
    return 2 * blocks * positions + 4 * config.num_layers * config.hidden_size * attended + 2 * head * head_positions


def generation_flops(config: TransformerConfig, *, sequences: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of generating ``new_tokens`` after ``prompt_len``-token prompts, as the sampler
    computes them: the blocks run over every position but the last, the unembedding only where a
    token is drawn, causal attention over the filled positions (not the empty cache slots)."""
    length = prompt_len + new_tokens
    per_sequence = _forward_flops(
        config,
        positions=length - 1,
        attended=(length - 1) * length / 2,
        head_positions=new_tokens,
        head=config.vocab_size * config.hidden_size,
    )
    return float(sequences * per_sequence)


def model_flops_per_iteration(config: TransformerConfig, *, sequences: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of one RLOO iteration as jaxrm computes it: generation (:func:`generation_flops`),
    the reference's log-probs and the policy's update (forward, and backward at twice the forward)
    with the head on the response positions only, and the reward model (its scalar head read at
    one position). Recomputation (remat) is not counted, nor work a baseline does that jaxrm does
    not (TRL recomputes the rollout's log-probs with a forward pass; jaxrm takes the sampler's)."""
    length = prompt_len + new_tokens
    unembedding = config.vocab_size * config.hidden_size
    scored = dict(positions=length, attended=length * (length + 1) / 2)
    policy_pass = _forward_flops(config, **scored, head_positions=new_tokens, head=unembedding)
    reward_pass = _forward_flops(config, **scored, head_positions=1, head=config.hidden_size)
    per_sequence = policy_pass + reward_pass + 3 * policy_pass  # the reference, the reward model, the update
    return generation_flops(config, sequences=sequences, prompt_len=prompt_len, new_tokens=new_tokens) + float(
        sequences * per_sequence
    )


def check_arguments(parser, args, *, at_least: dict[str, int], positive=(), shapes=()) -> None:
    """End the program with a usage error (before any work) unless every ``args.NAME`` is at least
    ``at_least[NAME]``, every name in ``positive`` is a finite number > 0 (or None, when that is
    its default), every name in ``shapes`` is a :func:`jaxrm.models.preset`, and the record can be
    written at ``args.out`` (:func:`check_record_path`)."""
    from jaxrm.models import preset

    for name, low in at_least.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}.")
    for name in positive:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}.")
    if getattr(args, "out", None) is not None:
        check_record_path(parser, args.out)
    for shape in shapes:
        try:
            preset(shape)
        except ValueError as error:
            parser.error(f"--shape(s): {error}")


def check_record_path(parser, path: Path) -> None:
    """End the program with a usage error naming ``--out`` unless a JSON record can be written at
    ``path``: not a directory, in a directory that exists or can be created and takes files
    (checked before the measurements, which it would otherwise throw away)."""
    if Path(path).is_dir():
        parser.error(f"--out {path} is a directory; name the JSON file to write.")
    try:
        check_out_directory(Path(path).parent, option=f"--out {path}: its directory")
    except ValueError as error:
        parser.error(str(error))
