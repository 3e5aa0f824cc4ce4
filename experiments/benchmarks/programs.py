"""Benchmark: compiled RLOO iterations, never run: compile time against depth, memory under FSDP.

Both measurements compile one full RLOO iteration (:func:`jaxrm.train.rlhf.make_iteration`:
sampling with the KV cache, reference log-probs, reward-model scoring, one Adam update) of a
policy and a reward model of the same shape, from abstract inputs (``jax.ShapeDtypeStruct``), so
no parameter is ever allocated and a Pythia-1B-shaped program compiles on a laptop.

``depth``: seconds of ``.lower().compile()`` (tracing, lowering and compiling) of the iteration
at several depths, two ways: the blocks under a ``lax.scan`` (``scan_layers=True``, the
default) and unrolled. A scanned program holds one block whatever the depth, and Adam runs on
the layers' parameters stacked by role (:mod:`jaxrm.train.optimizers`); what still grows with
depth is stacking each layer's arrays for the scan and slicing their gradients back.

``memory``: per-device bytes from the compiled program's ``memory_analysis()`` (arguments =
policy, reference, reward model and Adam state; temporaries = activations, gathered parameters
and the KV cache) under the ``replicated`` and ``fsdp`` strategies of :mod:`jaxrm.sharding` on
``--devices`` host CPU devices. Under FSDP the arguments should take about ``1/devices`` of the
replicated figure (vectors that no mesh axis divides stay replicated).

Run from the repository root: ``python -m experiments.benchmarks.programs {depth,memory} [--help]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _requested_devices(argv) -> int:
    """``--devices N`` / ``--devices=N`` read before jax starts (it fixes the host device count)."""
    for flag, value in zip(argv, [*argv[1:], ""]):
        text = (
            value if flag == "--devices" else flag.removeprefix("--devices=") if flag.startswith("--devices=") else None
        )
        if text is not None:
            return int(text) if text.isdigit() and int(text) >= 1 else 0
    return 8


if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    count = max(_requested_devices(sys.argv[1:]), 1)  # a bad value is refused by the parser below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from experiments.benchmarks.common import HelpFormatter, K, check_arguments, seconds, write_record  # noqa: E402
from jaxrm.models import CausalLM, RewardModel, TransformerConfig, preset  # noqa: E402
from jaxrm.sharding import make_mesh, param_shardings  # noqa: E402
from jaxrm.train.driver import train_state_shardings  # noqa: E402
from jaxrm.train.rlhf import RLHFConfig, TrainData, init_state, make_iteration, reward_model_fn  # noqa: E402


def lower_rloo_iteration(
    model: TransformerConfig,
    *,
    prompts: int,
    prompt_len: int,
    new_tokens: int,
    mesh=None,
    strategy="replicated",
):
    """The lowered (not compiled) RLOO iteration of a ``model``-shaped policy, reference and
    reward model, from abstract inputs; on ``mesh`` the prompts are split along ``data`` and the
    parameters, reference and Adam state placed by ``strategy``."""
    config = RLHFConfig(prompts_per_iteration=prompts, samples_per_prompt=K, max_new_tokens=new_tokens)
    policy_graphdef, policy_params = nnx.split(nnx.eval_shape(lambda: CausalLM(model, rngs=nnx.Rngs(0))))
    reward_graphdef, reward_params = nnx.split(nnx.eval_shape(lambda: RewardModel(model, rngs=nnx.Rngs(0))))
    state = jax.eval_shape(lambda: init_state(CausalLM(model, rngs=nnx.Rngs(0)), config, jax.random.key(0)))
    prompt_shape = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    data = TrainData(prompt_shape, prompt_shape.update(dtype=jnp.bool_), policy_params, reward_params, scalar, scalar)
    batch_sharding = None
    if mesh is not None:
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        policy_shardings = param_shardings(policy_params, mesh, strategy=strategy)
        data_shardings = TrainData(
            replicated,
            replicated,
            policy_shardings,
            param_shardings(reward_params, mesh, strategy=strategy),
            replicated,
            replicated,
        )
        place = lambda value, sharding: value.update(sharding=sharding)  # noqa: E731
        state = jax.tree.map(place, state, train_state_shardings(state, policy_shardings))
        data = jax.tree.map(place, data, data_shardings)
    iteration = make_iteration(config, policy_graphdef, reward_model_fn(reward_graphdef), batch_sharding=batch_sharding)
    return jax.jit(iteration).lower(state, data)


# name: TransformerConfig.scan_layers
DEPTH_VARIANTS = {"scanned": True, "unrolled": False}


def measure_depth(shape: str, layers: list[int], *, prompts: int, new_tokens: int, log=print) -> dict:
    """Seconds of ``.lower().compile()`` of the iteration at each depth (in increasing order),
    for each of :data:`DEPTH_VARIANTS`, and each variant's ratio of the deepest to the shallowest.

    A one-layer iteration is compiled first and not counted: a process's first trace and compile
    pay one-time costs (JAX's and XLA's set-up, lazy imports) that would otherwise fall on the
    first program measured only, the shallowest scanned one, and flatter its ratio."""
    layers = sorted(set(layers))
    result = {"shape": shape, "layers": layers}
    warm_up = seconds(
        lambda: lower_rloo_iteration(
            preset(shape, num_layers=1), prompts=prompts, prompt_len=16, new_tokens=new_tokens
        ).compile()
    )
    log(f"  warm-up ({shape} x 1 layer, not counted): {warm_up:.1f} s")
    result["warm_up_s"] = warm_up
    for name, scan_layers in DEPTH_VARIANTS.items():
        times = []
        for num_layers in layers:
            model = preset(shape, num_layers=num_layers, scan_layers=scan_layers)
            lower = lambda: lower_rloo_iteration(  # noqa: E731
                model, prompts=prompts, prompt_len=16, new_tokens=new_tokens
            )
            times.append(seconds(lambda: lower().compile()))
            log(f"  {shape} x {num_layers} layers, {name}: lower + compile {times[-1]:.1f} s")
        result[f"{name}_s"], result[f"{name}_ratio"] = times, times[-1] / times[0]
    return result


def memory_per_device(model: TransformerConfig, mesh, strategy: str, *, prompts: int, new_tokens: int) -> dict:
    """Per-device bytes of the compiled iteration (``memory_analysis``) under ``strategy``."""
    lowered = lower_rloo_iteration(
        model, prompts=prompts, prompt_len=16, new_tokens=new_tokens, mesh=mesh, strategy=strategy
    )
    began = time.perf_counter()
    stats = lowered.compile().memory_analysis()
    took = time.perf_counter() - began
    return {
        "arguments": stats.argument_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "compile_s": took,
    }


def measure_memory(shape: str, *, devices: int, prompts: int, new_tokens: int, log=print) -> dict:
    model = preset(shape)
    mesh = make_mesh(data=devices, devices=jax.devices()[:devices])
    result = {"shape": shape, "params": model.num_params(), "devices": devices}
    for strategy in ("replicated", "fsdp"):
        result[strategy] = memory_per_device(model, mesh, strategy, prompts=prompts, new_tokens=new_tokens)
        gib = {k: v / 2**30 for k, v in result[strategy].items() if k != "compile_s"}
        log(
            f"  {strategy:>10}: arguments {gib['arguments']:.2f} GiB, temporaries {gib['temporaries']:.2f} GiB, "
            f"outputs {gib['outputs']:.2f} GiB per device (compile {result[strategy]['compile_s']:.0f} s)"
        )
    result["argument_fraction"] = result["fsdp"]["arguments"] / result["replicated"]["arguments"]
    log(
        f"  FSDP arguments per device / replicated: {result['argument_fraction']:.3f} (1/{devices} = {1 / devices:.3f})"
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.programs",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # --devices is read before argparse, which must not take --dev for it
    )
    commands = parser.add_subparsers(dest="command", required=True)
    depth = commands.add_parser(
        "depth", formatter_class=HelpFormatter, allow_abbrev=False, help="compile time of the iteration against depth"
    )
    depth.add_argument("--shape", default="pythia-10m", help="jaxrm.models preset whose width is used")
    depth.add_argument("--layers", type=int, nargs="+", default=[6, 24], help="depths compiled (at least two)")
    memory = commands.add_parser(
        "memory", formatter_class=HelpFormatter, allow_abbrev=False, help="per-device memory under replicated and fsdp"
    )
    memory.add_argument("--shape", default="pythia-1b", help="jaxrm.models preset of the policy")
    memory.add_argument("--devices", type=int, default=8, help="host CPU devices of the data axis")
    for name, sub in (("depth", depth), ("memory", memory)):
        sub.add_argument("--prompts", type=int, default=8, help="prompts per iteration (k = 2 samples each)")
        sub.add_argument("--new-tokens", type=int, default=16, help="tokens sampled per response")
        sub.add_argument(
            "--out", type=Path, default=Path(f"results/benchmarks/programs_{name}.json"), help="JSON record"
        )
    args = parser.parse_args(argv)
    command = {"depth": depth, "memory": memory}[args.command]
    check_arguments(command, args, at_least={"prompts": 1, "new_tokens": 1}, shapes=(args.shape,))
    if args.command == "depth" and (min(args.layers) < 1 or len(set(args.layers)) < 2):
        command.error(f"--layers must be at least two distinct positive depths, got {args.layers}.")
    if args.command == "memory":
        if args.devices < 1 or args.prompts % args.devices:
            command.error(
                f"--devices must be >= 1 and divide --prompts {args.prompts} (each device samples whole prompts), "
                f"got {args.devices}."
            )
        if jax.device_count() < args.devices:
            command.error(
                f"--devices {args.devices}: only {jax.device_count()} devices here; set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} before jax starts."
            )
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    if args.command == "depth":
        result = measure_depth(args.shape, args.layers, prompts=args.prompts, new_tokens=args.new_tokens)
        ratios = ", ".join(f"{name} {result[f'{name}_ratio']:.2f}x" for name in DEPTH_VARIANTS)
        print(f"compile time {max(args.layers)} / {min(args.layers)} layers: {ratios}")
    else:
        result = measure_memory(args.shape, devices=args.devices, prompts=args.prompts, new_tokens=args.new_tokens)
    write_record(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
