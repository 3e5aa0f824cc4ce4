"""Benchmark for a GPU or TPU: generation and full RLOO iterations at Pythia-160M, 410M and 1B shapes.

Every model runs as a GPU/TPU user would run it: bfloat16 compute with float32 master parameters
and Adam state, attention through ``jax.nn.dot_product_attention`` (cuDNN flash attention on a
GPU where its kernel accepts the call, so not for the one-token decoding steps; see
:func:`jaxrm.models.transformer.resolved_attention_implementation`), the blocks under a
``lax.scan`` and rematerialised per layer. Weights are random (no
download); throughput does not depend on them.

For each shape it prints generated tokens/s of :func:`jaxrm.models.sampling.sample` (``--batch``
prompts of ``--prompt-len`` tokens, ``--new-tokens`` new tokens, temperature 1, no EOS) and of a
full RLOO iteration (:func:`jaxrm.train.rlhf.make_iteration`, ``--batch`` / 2 prompts x k = 2),
with the model FLOP utilisation (MFU) of each: model FLOPs as jaxrm computes them
(:func:`experiments.benchmarks.common.model_flops_per_iteration`: per position ``2 x`` the
blocks' parameters, both embeddings excluded, plus causal attention at ``4 x layers x hidden``
per attended pair, and the unembedding only where logits are used; a backward pass at twice its
forward; recomputation not counted) over time over the device's datasheet peak for dense bfloat16 matmuls (``PEAK_TFLOPS`` by
device kind, or ``--peak-tflops``; on a device not in the table MFU is left out rather than
guessed). Compile time is reported separately; figures are medians after a warm-up. The JSON
record (``--out``, with the installed package versions) is rewritten after each shape, so a run
stopped by a time limit keeps the shapes it measured.

Run from the repository root: ``python -m experiments.benchmarks.accelerator [--help]``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks.common import (
    HelpFormatter,
    K,
    check_arguments,
    compiled_timings,
    generation_flops,
    model_flops_per_iteration,
    write_record,
)
from jaxrm.models import CausalLM, RewardModel, preset
from jaxrm.models.sampling import make_sampler
from jaxrm.models.transformer import resolved_attention_implementation
from jaxrm.train.rlhf import RLHFConfig, TrainData, init_state, make_iteration, reward_model_fn

DEFAULT_SHAPES = ("pythia-160m", "pythia-410m", "pythia-1b")
# Dense bfloat16 matmul peaks from the vendors' datasheets, TFLOP/s (no structured sparsity).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,  # v5p, as some jaxlib versions name it
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def datasheet_peak_tflops(device_kind: str) -> float | None:
    """The dense bfloat16 peak of a device kind (``PEAK_TFLOPS``), or None when it is not listed."""
    return PEAK_TFLOPS.get(device_kind)


def run_shape(shape: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, peak: float | None):
    config = preset(shape, dtype="bfloat16", param_dtype="float32", remat=True, scan_layers=True)
    policy = CausalLM(config, rngs=nnx.Rngs(0))
    reward_model = RewardModel(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (batch // K, prompt_len)), jnp.int32)
    prompt_mask = jnp.ones(prompts.shape, bool)
    rlhf = RLHFConfig(prompts_per_iteration=batch // K, samples_per_prompt=K, max_new_tokens=new_tokens)
    graphdef, params = nnx.split(policy)
    reward_graphdef, reward_params = nnx.split(reward_model)

    sampler = make_sampler(graphdef, rlhf.sampling)
    repeated = jnp.repeat(prompts, K, axis=0), jnp.repeat(prompt_mask, K, axis=0)
    generation, generation_compile, _ = compiled_timings(sampler, params, *repeated, jax.random.key(0), repeats=repeats)

    data = TrainData(prompts, prompt_mask, params, reward_params, jnp.float32(0), jnp.float32(1))
    state = init_state(policy, rlhf, jax.random.key(0))
    iteration = make_iteration(rlhf, graphdef, reward_model_fn(reward_graphdef))
    iterations, iteration_compile, _ = compiled_timings(iteration, state, data, repeats=repeats)

    generation_s, iteration_s = statistics.median(generation), statistics.median(iterations)
    new = batch * new_tokens
    length = prompt_len + new_tokens
    result = {
        "shape": shape,
        "params": config.num_params(),
        # Where cuDNN flash attention applies: the whole-sequence passes, and one decoding step
        # over a full cache (earlier cache phases, and the prefill, may resolve otherwise).
        "attention": {
            "sequence_passes": resolved_attention_implementation(config, length, length),
            "decoding_step": resolved_attention_implementation(config, 1, length),
        },
        "generation_tokens_per_s": new / generation_s,
        "generation_compile_s": generation_compile,
        "iteration_s": iteration_s,
        "iteration_tokens_per_s": new / iteration_s,
        "iteration_compile_s": iteration_compile,
        "generation_mfu": None,
        "iteration_mfu": None,
    }
    if peak is not None:
        sizes = dict(sequences=batch, prompt_len=prompt_len, new_tokens=new_tokens)
        iteration_flops = model_flops_per_iteration(config, **sizes)
        result["generation_mfu"] = generation_flops(config, **sizes) / generation_s / peak
        result["iteration_mfu"] = iteration_flops / iteration_s / peak
    mfu = lambda value: "n/a" if value is None else f"{value:.1%}"  # noqa: E731
    print(
        f"{shape} ({config.num_params() / 1e6:.1f}M parameters): generation {result['generation_tokens_per_s']:,.0f} tokens/s "
        f"(MFU {mfu(result['generation_mfu'])}, compile {generation_compile:.0f} s); RLOO iteration "
        f"{iteration_s:.2f} s = {result['iteration_tokens_per_s']:,.0f} tokens/s (MFU {mfu(result['iteration_mfu'])}, "
        f"compile {iteration_compile:.0f} s)",
        flush=True,
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.accelerator",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="jaxrm.models presets")
    parser.add_argument("--batch", type=int, default=64, help="sequences per call (an even number)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bfloat16 peak, TFLOP/s (default: the datasheet's, for the devices listed in "
        "PEAK_TFLOPS; on any other device MFU is left out)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/accelerator.json"), help="JSON record")
    args = parser.parse_args(argv)
    check_arguments(
        parser,
        args,
        at_least={"batch": K, "prompt_len": 1, "new_tokens": 1, "repeats": 1},
        positive=("peak_tflops",),
        shapes=args.shapes,
    )
    if args.batch % K:
        parser.error(f"--batch must be a multiple of k = {K}, got {args.batch}.")
    device = jax.devices()[0]
    peak_tflops = datasheet_peak_tflops(device.device_kind) if args.peak_tflops is None else args.peak_tflops
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}); peak "
        + (f"{peak_tflops:.0f} TFLOP/s" if peak_tflops else "unknown: MFU not reported (pass --peak-tflops)")
    )
    peak = None if peak_tflops is None else peak_tflops * 1e12
    record = {
        "device": device.device_kind,
        "peak_tflops": peak_tflops,
        "settings": {name: getattr(args, name) for name in ("batch", "prompt_len", "new_tokens", "repeats")},
        "shapes_requested": list(args.shapes),  # more than in "results": the run was cut short
        "results": [],
    }
    for shape in args.shapes:
        record["results"].append(
            run_shape(
                shape,
                batch=args.batch,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                peak=peak,
            )
        )
        # Rewritten after every shape: a run stopped by a time limit keeps the shapes it measured
        # (and one stopped in its first shape leaves nothing behind, not even the directory).
        write_record(args.out, record)
        print(f"wrote {args.out} ({len(record['results'])} of {len(args.shapes)} shapes)", flush=True)


if __name__ == "__main__":
    main()
