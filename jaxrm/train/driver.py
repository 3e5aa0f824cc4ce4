"""The Python driver of an RLHF run: chunks of compiled iterations, a run directory, resume.

The run directory holds ``config.json``, ``metrics.jsonl`` (one line per iteration),
``summary.json`` and ``checkpoints/``. A run started again on the same directory continues from
its newest readable checkpoint and ends with the same parameters, bit for bit, as a run that was
never interrupted: iteration ``t`` draws its randomness from ``fold_in(key, t)`` and the prompts
it visits from ``t``, and chunks always end on checkpoint steps, so the same compiled programs run
on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm.checkpoint import RunCheckpoints
from jaxrm.models.sampling import check_prompts
from jaxrm.models.transformer import CausalLM
from jaxrm.sharding import param_shardings, put_global
from jaxrm.train.rlhf import RewardFn, RLHFConfig, TrainData, TrainState, init_state, make_iteration


def params_fingerprint(params) -> str:
    """A short hash of parameter values: checks that a resumed run uses the same reference."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()[:16]


def _is_writer() -> bool:
    # With several processes (jax.distributed), process 0 alone writes the run's files.
    return jax.process_index() == 0


def _write_json(path: Path, value) -> None:
    if not _is_writer():
        return
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=1))
    os.replace(staging, path)


def _keep_metric_lines(path: Path, before_step: int) -> None:
    """Drop lines of iterations at or after ``before_step`` (written after the checkpoint resumed from)."""
    if not path.exists() or not _is_writer():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] < before_step]
    path.write_text("".join(f"{line}\n" for line in kept))


def run_rlhf(
    policy: CausalLM,
    reward_fn: RewardFn,
    reward_params,
    prompts,
    prompt_mask,
    config: RLHFConfig,
    *,
    num_iterations: int,
    out_dir: str | Path,
    reward_stats: tuple[float, float] = (0.0, 1.0),
    reference: CausalLM | None = None,
    ground_truth_fn: RewardFn | None = None,
    seed: int = 0,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    log_every: int = 10,
    mesh: Mesh | None = None,
    param_sharding: str = "replicated",
    log: Callable[[str], None] | None = print,
) -> tuple[TrainState, list[dict]]:
    """Train ``policy`` for ``num_iterations`` RLHF iterations, writing and resuming ``out_dir``.

    Args:
      policy: the initial policy (also the reference unless ``reference`` is given).
      reward_fn, reward_params: the teacher (see :func:`jaxrm.train.rlhf.reward_model_fn`).
      prompts, prompt_mask: ``[num_prompts, prompt_len]`` left-padded prompts.
      reward_stats: ``(mean, std)`` normalising the teacher's rewards (see
        :func:`jaxrm.train.rlhf.measure_reward_statistics`).
      checkpoint_every: save every this many iterations (0: only at the end).
      mesh: a ``(data, model)`` mesh (:func:`jaxrm.sharding.make_mesh`); prompts are sharded along
        ``data`` and parameters placed by ``param_sharding``. ``None``: the default device.

    Returns the final state and the metrics of every iteration of this call.
    """
    check_prompts(prompts, prompt_mask, policy.config.vocab_size)
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"num_iterations must be a positive int, got {num_iterations!r}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphdef, _ = nnx.split(policy)
    reference = policy if reference is None else reference
    ref_params = nnx.state(reference, nnx.Param)
    record = {
        "config": config.to_dict(),
        "num_iterations": num_iterations,
        "seed": seed,
        "reference_fingerprint": params_fingerprint(ref_params),
        "reward_stats": list(map(float, reward_stats)),
    }
    config_path = out_dir / "config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        changed = sorted(k for k in record if k != "num_iterations" and previous.get(k) != record[k])
        if changed:
            raise ValueError(f"{out_dir} holds a run with different {changed}; use a new out_dir to start another run.")
    _write_json(config_path, record)

    batch_sharding = None
    state = init_state(policy, config, jax.random.key(seed))
    data = TrainData(
        jnp.asarray(prompts),
        jnp.asarray(prompt_mask, bool),
        ref_params,
        reward_params,
        jnp.float32(reward_stats[0]),
        jnp.float32(reward_stats[1]),
    )
    if mesh is not None:
        if config.prompts_per_iteration % mesh.shape["data"]:
            raise ValueError(
                f"prompts_per_iteration={config.prompts_per_iteration} must be a multiple of the mesh's data axis "
                f"({mesh.shape['data']} devices), so that every device samples whole prompts."
            )
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        params = put_global(state.params, param_shardings(state.params, mesh, strategy=param_sharding))
        # Optimizer moments inherit the parameters' shardings; scalars (Adam's count) are replicated.
        opt_state = jax.tree.map(
            lambda x: x if len(x.sharding.device_set) == mesh.size else put_global(x, replicated),
            config.optimizer().init(params),
        )
        state = TrainState(params, opt_state, *put_global((state.step, state.key), replicated))
        data = put_global(data.replace(ref_params=None), replicated).replace(
            ref_params=put_global(ref_params, param_shardings(ref_params, mesh, strategy=param_sharding))
        )

    checkpoints = RunCheckpoints(out_dir / "checkpoints", keep=keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    if restored is not None:
        step, state, saved = restored
        if saved["reference_fingerprint"] != record["reference_fingerprint"]:
            raise ValueError(f"the checkpoint at iteration {step} was trained against another reference policy.")
        if log is not None:
            log(f"resuming {out_dir} from the checkpoint at iteration {step}")
    start = int(state.step)
    _keep_metric_lines(out_dir / "metrics.jsonl", start)

    iteration, _ = make_iteration(
        config, graphdef, reward_fn, ground_truth_fn=ground_truth_fn, batch_sharding=batch_sharding
    )
    programs: dict[int, Callable] = {}

    def program(length):
        if length not in programs:
            began = time.perf_counter()
            scan = jax.jit(lambda s, d: jax.lax.scan(lambda c, _: iteration(c, d), s, None, length=length))
            programs[length] = scan.lower(state, data).compile()
            if log is not None:
                log(f"compiled {length} iteration(s) in one program in {time.perf_counter() - began:.1f} s")
        return programs[length]

    history: list[dict] = []
    chunk = checkpoint_every or log_every or num_iterations
    tokens_per_iteration = config.prompts_per_iteration * config.samples_per_prompt
    step = start
    while step < num_iterations:
        length = min(chunk - step % chunk, num_iterations - step)
        run_chunk = program(length)
        began = time.perf_counter()
        state, stacked = run_chunk(state, data)
        stacked = jax.device_get(stacked)
        seconds = time.perf_counter() - began
        generated = float(np.sum(stacked["response_length"])) * tokens_per_iteration
        lines = [{"iteration": step + i, **{k: float(v[i]) for k, v in stacked.items()}} for i in range(length)]
        for line in lines:
            line["tokens_per_s"] = generated / seconds
        history += lines
        if _is_writer():
            with (out_dir / "metrics.jsonl").open("a") as file:
                file.writelines(json.dumps(line) + "\n" for line in lines)
        step += length
        if checkpoint_every and (step % checkpoint_every == 0 or step == num_iterations):
            checkpoints.save(
                step,
                state,
                {
                    "iteration": step,
                    "data_position": step * config.prompts_per_iteration,
                    "reference_fingerprint": record["reference_fingerprint"],
                },
            )
        if log is not None and (step % (log_every or chunk) == 0 or step == num_iterations):
            last = history[-1]
            truth = f" ground truth {last['ground_truth_reward']:+.4f}" if "ground_truth_reward" in last else ""
            log(
                f"iteration {step}/{num_iterations}: proxy {last['proxy_reward']:+.4f}{truth} "
                f"kl {last['kl']:.4f} ({last['tokens_per_s']:.0f} tokens/s)"
            )
    checkpoints.close()
    summary = {"iterations": int(state.step), "final": history[-1] if history else None}
    _write_json(out_dir / "summary.json", summary)
    return state, history
