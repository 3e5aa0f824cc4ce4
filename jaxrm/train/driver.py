"""The one driver of RLHF runs: a batch of teachers x seeds in compiled chunks, a run directory, resume.

:func:`run_rlhf` runs :func:`jaxrm.train.rlhf.make_train` (vmapped over seeds and, when several
are given, over teachers) in chunks of iterations, and writes a run directory:

- ``config.json``: the :class:`~jaxrm.train.rlhf.RLHFConfig`, the seeds, the teachers' names,
  the reward statistics and a fingerprint of the reference policy;
- ``metrics.jsonl``: one line per (iteration, teacher, seed) with every metric;
- ``summary.json``: the last iteration's metrics;
- ``checkpoints/``: orbax checkpoints of the whole batched state.

A run started again on the same directory continues from its newest readable checkpoint and ends
with the same parameters, bit for bit, as a run that was never interrupted: iteration ``t`` draws
its randomness from ``fold_in(key, t)`` and the prompts it visits from ``t``, and chunks always end
on checkpoint steps, so the same compiled programs run on the same inputs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm._checks import check_choice, check_instance, check_int
from jaxrm.models.checkpoint import tree_checksum
from jaxrm.models.sampling import check_prompts
from jaxrm.models.transformer import CausalLM
from jaxrm.sharding import STRATEGIES, param_shardings, put_global
from jaxrm.studies import check_out_directory, write_text
from jaxrm.train.checkpoints import RunCheckpoints
from jaxrm.train.optimizers import stacked_state_shardings
from jaxrm.train.rlhf import RewardFn, RLHFConfig, TrainData, TrainState, init_state, make_train

__all__ = ["RLHFRun", "params_fingerprint", "run_rlhf"]

# In-chunk progress lines are printed at most this often (seconds).
_PROGRESS_INTERVAL = 10.0
# Compiled chunks kept for later runs of the same program and shapes (the students of one study):
# each costs seconds to compile on CPU. Each entry holds its progress callback, retargeted per run.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEEP = 4


class RLHFRun(NamedTuple):
    """What :func:`run_rlhf` returns.

    Attributes:
      state: the final :class:`~jaxrm.train.rlhf.TrainState`, with leading ``[teachers]`` (when
        ``teachers`` was given) and ``[seeds]`` (when ``seeds`` was a sequence) axes.
      history: every metric of every iteration of the run (resumed ones included), each an array
        ``[teachers?, seeds?, iterations]``; ``iteration`` holds the iteration numbers.
    """

    state: TrainState
    history: dict[str, np.ndarray]


def params_fingerprint(params) -> str:
    """A short hash of parameter values: checks that a resumed run uses the same reference."""
    return hashlib.sha256(json.dumps(tree_checksum(params)).encode()).hexdigest()[:16]


def _function_name(fn) -> str:
    """``module.qualified_name`` of a teacher function (a resumed run must score with the same
    one; two lambdas of one scope share a name, a ``functools.partial`` is named by its function)."""
    fn = getattr(fn, "func", fn)
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _is_writer() -> bool:
    # With several processes (jax.distributed), process 0 alone writes the run's files.
    return jax.process_index() == 0


def _write_text(path: Path, text: str) -> None:
    """Write atomically, from process 0 only (the directory is shared under jax.distributed)."""
    if _is_writer():
        write_text(path, text)


def _read_lines(path: Path, before_step: int) -> list[dict]:
    """The lines of ``metrics.jsonl`` for iterations before ``before_step``. A line torn by a kill
    while it was being appended (always after the checkpoint resumed from) is dropped."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return [line for line in lines if line["iteration"] < before_step]


def _history(lines: list[dict], teachers, seeds) -> dict[str, np.ndarray]:
    seed_list = [seeds] if isinstance(seeds, int) else list(seeds)
    teacher_list = [None] if teachers is None else list(teachers)
    iterations = sorted({line["iteration"] for line in lines})
    if not iterations:
        return {}
    position = {it: i for i, it in enumerate(iterations)}
    # Every name any line holds (a line without one leaves NaN there).
    names = list(dict.fromkeys(k for line in lines for k in line if k not in ("teacher", "seed")))
    out = {name: np.full((len(teacher_list), len(seed_list), len(iterations)), np.nan) for name in names}
    for line in lines:
        t = teacher_list.index(line.get("teacher"))
        s = seed_list.index(line["seed"])
        for name in names:
            out[name][t, s, position[line["iteration"]]] = line.get(name, np.nan)
    shape = ((len(teacher_list),) if teachers is not None else ()) + (
        (len(seed_list),) if not isinstance(seeds, int) else ()
    )
    if np.isfinite(out["iteration"]).all():  # iteration numbers as ints, unless a line is missing
        out["iteration"] = out["iteration"].astype(np.int64)
    return {name: values.reshape(*shape, len(iterations)) for name, values in out.items()}


def _check_run_arguments(num_iterations, seeds, teachers, reward_params, reward_stats, checkpoint_every, log_every):
    check_int("num_iterations", num_iterations, low=1)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seed_list = [seeds]
    elif isinstance(seeds, (Sequence, np.ndarray)) and not isinstance(seeds, (str, bytes)):
        seed_list = list(seeds)
    else:
        seed_list = []  # refused below
    if (
        not seed_list
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seed_list)
        or len(set(seed_list)) < len(seed_list)
    ):
        raise ValueError(f"seeds must be an int or a non-empty sequence of distinct ints, got {seeds!r}.")
    seed_list = [int(s) for s in seed_list]
    check_int("checkpoint_every", checkpoint_every, low=0)
    check_int("log_every", log_every, low=0)
    if teachers is not None:
        if (
            isinstance(teachers, str)
            or not isinstance(teachers, Sequence)
            or not teachers
            or len(set(teachers)) < len(teachers)
            or not all(isinstance(t, str) for t in teachers)
        ):
            raise ValueError(f"teachers must be a non-empty sequence of distinct names, got {teachers!r}.")
        for leaf in jax.tree.leaves(reward_params):
            if np.shape(leaf)[:1] != (len(teachers),):
                raise ValueError(
                    f"with {len(teachers)} teachers, every leaf of reward_params needs a leading axis of "
                    f"{len(teachers)}; one has shape {np.shape(leaf)}."
                )
    means, stds = _reward_stats(reward_stats, teachers)
    if not (np.isfinite(means).all() and np.isfinite(stds).all() and (stds > 0).all()):
        raise ValueError(
            f"reward_stats must be finite with std > 0, got mean {means} and std {stds}. A std of 0 (a teacher "
            "that gave every measured response the same reward) would scale any later difference of rewards by "
            "1e8 (1e4 under rsqrt_var); measure on more samples, or pass std 1 to only center the rewards."
        )
    return seed_list, means, stds


def _reward_stats(reward_stats, teachers) -> tuple[np.ndarray, np.ndarray]:
    """``(means, stds)`` from ``reward_stats``: one teacher's ``(mean, std)``, or with ``teachers``
    a mapping of each name to its own (arrays of one entry per teacher, in ``teachers``' order).
    Two teachers' pairs in a list would read the same as the means and the stds of both, so
    only a mapping is taken for several."""
    if teachers is None:
        pairs = [reward_stats]
    elif isinstance(reward_stats, Mapping) and set(reward_stats) == set(teachers):
        pairs = [reward_stats[name] for name in teachers]
    else:
        raise ValueError(
            f"with teachers, reward_stats must map each teacher's name to its (mean, std), as "
            f"measure_reward_statistics returns them: {{{teachers[0]!r}: (mean, std), ...}}; got {reward_stats!r}."
        )
    try:
        values = np.asarray(pairs, np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (len(pairs), 2):
        raise ValueError(
            f"reward_stats: each teacher's statistics must be two numbers (mean, std); got {reward_stats!r}."
        )
    if teachers is None:
        return values[0, 0], values[0, 1]
    return values[:, 0], values[:, 1]


def _abstract_params(tree):
    """Each leaf's ``(path, shape, dtype)``, for comparing two models' parameters."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), np.shape(leaf), jnp.result_type(leaf)) for path, leaf in leaves]


def _check_reference(policy: CausalLM, reference: CausalLM | None) -> None:
    """The KL reference must be the policy's architecture: its log-probs are computed by the
    policy's program with the reference's parameters."""
    if reference is None:
        return
    ours, theirs = _abstract_params(nnx.state(policy, nnx.Param)), _abstract_params(nnx.state(reference, nnx.Param))
    if ours != theirs:
        differ = next(
            (f"{a[0]}: {a[1]} {a[2]} against {b[1]} {b[2]}" for a, b in zip(ours, theirs) if a != b),
            f"{len(ours)} parameter arrays against {len(theirs)}",
        )
        raise ValueError(
            f"reference must have the policy's architecture and parameter shapes; first difference: {differ}."
        )


def _check_teacher(name: str, fn, params, *, teachers, vocab_size: int, prompt_len: int) -> None:
    """Trace ``fn`` (one teacher's parameters) on an abstract batch of two prompt-response pairs:
    it must give one reward per pair. A jaxrm reward model must also cover the policy's
    vocabulary: an id beyond its embedding table gives NaN rewards, and then NaN parameters."""
    # Shapes only: one teacher's parameters are never sliced out of the stacked arrays.
    drop = 0 if teachers is None else 1
    single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[drop:], jnp.result_type(x)), params)
    try:
        rows = jax.tree.leaves(single["trunk"]["embed_in"]["embedding"])[0].shape[0]
    except (KeyError, TypeError, IndexError):
        rows = None  # not a jaxrm reward model: only its output is checked
    if rows is not None and rows < vocab_size:
        raise ValueError(
            f"the {name} reward model's vocabulary ({rows} tokens) is smaller than the policy's ({vocab_size}): "
            "every token the policy can sample must be an id the reward model can score."
        )
    tokens = jax.ShapeDtypeStruct((2, prompt_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, prompt_len), jnp.bool_)
    response, response_mask = jax.ShapeDtypeStruct((2, 3), jnp.int32), jax.ShapeDtypeStruct((2, 3), jnp.bool_)
    try:
        out = jax.eval_shape(fn, single, tokens, mask, response, response_mask)
    except Exception as error:  # noqa: BLE001 - any failure of the user's function, reported by name
        raise ValueError(
            f"{name} fails on a batch of 2 prompts and responses: {type(error).__name__}: {error}"
        ) from error
    if np.shape(out) != (2,):
        raise ValueError(f"{name} must return one reward per response, shape [2] for 2 responses; got {np.shape(out)}.")


def train_state_shardings(state: TrainState, policy_shardings, *, num_batch_axes: int = 0) -> TrainState:
    """Where each part of a :class:`TrainState` lives: the parameters and every optimizer slot
    that mirrors them (Adam's moments) as ``policy_shardings`` (one policy's, from
    :func:`jaxrm.sharding.param_shardings`) with ``num_batch_axes`` leading unsharded axes (runs
    side by side; the moments are stacked by layer role, :mod:`jaxrm.train.optimizers`), and the
    rest (step, key, counters) replicated on the same mesh. ``state`` may be abstract
    (``jax.eval_shape``)."""
    mesh = jax.tree.leaves(policy_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(
        lambda s: NamedSharding(s.mesh, PartitionSpec(*([None] * num_batch_axes), *s.spec)),
        policy_shardings,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    opt_state = stacked_state_shardings(
        state.opt_state, state.params, params, other=replicated, batch_axes=num_batch_axes
    )
    return TrainState(params, opt_state, replicated, replicated)


def _holds_progress(out_dir: Path) -> bool:
    """Whether a run directory holds any iteration of its run: a checkpoint or a line of metrics
    (a run stopped while compiling its first chunk leaves only its ``config.json``)."""
    checkpoints, metrics = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (metrics.is_file() and metrics.stat().st_size > 0)


def _changed_fields(previous: dict, record: dict) -> list[str]:
    """The entries of a run's ``record`` (but ``num_iterations``) that differ from those its
    directory already holds; an RLHFConfig field added since that run was written counts at its
    default, which is what the run used, and a record entry added since (the teacher's
    fingerprint and function, the ground truth's, the prompts') is not known for it and is not compared."""
    added_since = (
        "teacher_fingerprint",
        "teacher_function",
        "ground_truth",
        "ground_truth_function",
        "prompts_fingerprint",
    )
    previous = {k: record[k] for k in added_since if k in record} | dict(previous)
    changed = sorted(k for k in record if k not in ("num_iterations", "config") and previous.get(k) != record[k])
    if not isinstance(previous.get("config"), dict):
        return sorted([*changed, "config"])
    old_config = {**RLHFConfig().to_dict(), **previous["config"]}
    new_config = record["config"]
    fields = sorted(f"config.{k}" for k in set(old_config) | set(new_config) if old_config.get(k) != new_config.get(k))
    return sorted(changed + fields)


class _InChunkProgress:
    """Host callback of the compiled chunk: a line to ``log`` at most every ``_PROGRESS_INTERVAL``
    seconds; silent with ``log=None`` (a process other than 0, which runs the same program)."""

    def __init__(self, log, total):
        self.log, self.total = log, total
        self.began = self.last_print = time.perf_counter()
        self.newest = -1

    def restart(self):
        self.began = self.last_print = time.perf_counter()

    def retarget(self, log, total):
        """Report to ``log`` against ``total`` iterations (a cached program serving another run)."""
        self.log, self.total, self.newest = log, total, -1

    def __call__(self, step):
        step = int(np.max(step))
        now = time.perf_counter()
        if self.log is not None and step > self.newest and now - self.last_print >= _PROGRESS_INTERVAL:
            self.last_print = now
            self.log(f"  ... at iteration {step}/{self.total} ({now - self.began:.0f} s into this chunk)")
        self.newest = max(self.newest, step)


def run_rlhf(
    policy: CausalLM,
    reward_fn: RewardFn,
    reward_params: Any,
    prompts,
    prompt_mask,
    config: RLHFConfig,
    *,
    num_iterations: int,
    out_dir: str | Path,
    reward_stats=(0.0, 1.0),
    reference: CausalLM | None = None,
    ground_truth_fn: RewardFn | None = None,
    seeds: int | Sequence[int] = 0,
    teachers: Sequence[str] | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    log_every: int = 10,
    mesh: Mesh | None = None,
    param_sharding: str = "replicated",
    log: Callable[[str], None] | None = print,
) -> RLHFRun:
    """Train ``policy`` by RLHF for ``num_iterations``, for every teacher and seed, writing and resuming ``out_dir``.

    Everyday arguments:
      policy: the initial policy (also the reference unless ``reference`` is given).
      reward_fn, reward_params: the teacher (see :func:`jaxrm.train.rlhf.reward_model_fn`); with
        ``teachers``, every leaf of ``reward_params`` has a leading axis, one entry per teacher.
      prompts, prompt_mask: ``[num_prompts, prompt_len]`` left-padded prompts.
      config: the :class:`~jaxrm.train.rlhf.RLHFConfig`.
      num_iterations: iterations of the whole run (a resumed run continues up to it).
      out_dir: the run directory.
      reward_stats: ``(mean, std)`` normalising the teacher's rewards (see
        :func:`jaxrm.train.rlhf.measure_reward_statistics`); with ``teachers``, a mapping of each
        teacher's name to its ``(mean, std)``.
      ground_truth_fn: a reward that is only measured (ground-truth reward, on-policy accuracy).
      seeds: one seed (an int), or a sequence of seeds run side by side in one program.
      teachers: names of several teachers run side by side (None: one teacher).

    Expert arguments:
      reference: the KL reference (default: ``policy``).
      checkpoint_every: save every this many iterations, and always at the end (0: only at the
        end); chunks end there.
      keep_checkpoints: how many checkpoints to keep.
      log_every: iterations per progress line, and per chunk when ``checkpoint_every`` is 0.
        A line comes after each chunk that reaches a multiple of it (chunks end at the
        checkpoints) and after the last one, and reports that chunk's last iteration; 0: a line
        after every chunk (with both 0, the whole run is one chunk).
      mesh: a ``(data, model)`` mesh (:func:`jaxrm.sharding.make_mesh`); prompts are sharded along
        ``data`` and parameters placed by ``param_sharding``. None: the default device.
      param_sharding: a strategy of :mod:`jaxrm.sharding`.
      log: where progress lines go (None: silent).

    Every argument is checked before the run directory is written.
    """
    check_instance("policy", policy, CausalLM)
    check_instance("config", config, RLHFConfig)
    check_prompts(prompts, prompt_mask, policy.config.vocab_size)
    config.sampling.check_vocabulary(policy.config.vocab_size)
    seed_list, means, stds = _check_run_arguments(
        num_iterations, seeds, teachers, reward_params, reward_stats, checkpoint_every, log_every
    )
    seeds = int(seeds) if isinstance(seeds, (int, np.integer)) else seed_list
    check_choice("param_sharding", param_sharding, STRATEGIES)
    # With several processes (jax.distributed) only process 0 reports, but every process compiles
    # the progress callback when the caller asked for progress: the processes run one SPMD program,
    # and without the callback XLA may choose other collectives (they then mismatch and abort).
    in_chunk_progress = log is not None
    log = log if _is_writer() else None
    check_int("keep_checkpoints", keep_checkpoints, low=1)
    if mesh is not None and "data" not in mesh.shape:
        raise ValueError(f"mesh must have a 'data' axis (jaxrm.sharding.make_mesh), got axes {tuple(mesh.shape)}.")
    if mesh is not None and any(kind != jax.sharding.AxisType.Auto for kind in mesh.axis_types):
        raise ValueError(
            f"mesh must have Auto axes (jaxrm.sharding.make_mesh builds them; jax.make_mesh defaults to Explicit), "
            f"got {dict(zip(mesh.axis_names, (kind.name for kind in mesh.axis_types)))}."
        )
    if mesh is not None and config.prompts_per_iteration % mesh.shape["data"]:
        raise ValueError(
            f"prompts_per_iteration={config.prompts_per_iteration} must be a multiple of the mesh's data axis "
            f"({mesh.shape['data']} devices), so that every device samples whole prompts."
        )
    _check_reference(policy, reference)
    teacher_options = dict(teachers=teachers, vocab_size=policy.config.vocab_size, prompt_len=np.shape(prompts)[1])
    _check_teacher("reward_fn", reward_fn, reward_params, **teacher_options)
    if ground_truth_fn is not None:  # called with no parameters
        _check_teacher("ground_truth_fn", ground_truth_fn, None, **teacher_options | {"teachers": None})
    out_dir = check_out_directory(out_dir, option="out_dir", files=("config.json", "metrics.jsonl", "checkpoints/"))
    graphdef = nnx.graphdef(policy)
    ref_params = nnx.state(policy if reference is None else reference, nnx.Param)
    record = {
        "config": config.to_dict(),
        "num_iterations": num_iterations,
        "seeds": seeds if isinstance(seeds, int) else seed_list,
        "teachers": None if teachers is None else list(teachers),
        "reference_fingerprint": params_fingerprint(ref_params),
        "teacher_fingerprint": params_fingerprint(reward_params),
        "teacher_function": _function_name(reward_fn),
        "ground_truth": ground_truth_fn is not None,
        "ground_truth_function": None if ground_truth_fn is None else _function_name(ground_truth_fn),
        "prompts_fingerprint": params_fingerprint((np.asarray(prompts), np.asarray(prompt_mask, bool))),
        "reward_stats": [means.tolist(), stds.tolist()],
        # Checkpoints of runs written before the optimizer ran on stacked layers cannot be read.
        "optimizer_layout": "stacked_layers",
    }
    config_path = out_dir / "config.json"
    if config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_path} cannot be read as a run's config ({error}); use a new out_dir.") from None
        if not isinstance(previous, dict):
            raise ValueError(f"{config_path} is not a run's config (a JSON object); use a new out_dir.")
        changed = _changed_fields(previous, record)
        if changed and not _holds_progress(out_dir):
            if log is not None:
                log(f"{out_dir} holds no iteration of its earlier run (different {changed}): starting afresh")
            changed = []
        if changed:
            why = (
                " (it was written before Adam ran on the layers stacked by role, so its checkpoints cannot be read)"
                if "optimizer_layout" in changed
                else ""
            )
            raise ValueError(
                f"{out_dir} holds a run with different {changed}{why}; use a new out_dir to start another run."
            )
    out_dir.mkdir(parents=True, exist_ok=True)

    batch_axes = (() if teachers is None else (len(teachers),)) + (() if isinstance(seeds, int) else (len(seed_list),))
    single = [init_state(policy, config, jax.random.key(int(s))) for s in seed_list]
    state = single[0] if isinstance(seeds, int) else jax.tree.map(lambda *x: jnp.stack(x), *single)
    if teachers is not None:
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(teachers), *x.shape)), state)
    data = TrainData(
        jnp.asarray(prompts),
        jnp.asarray(prompt_mask, bool),
        ref_params,
        reward_params,
        jnp.asarray(means, jnp.float32),
        jnp.asarray(stds, jnp.float32),
    )
    batch_sharding = None
    if mesh is not None:
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        unbatched = param_shardings(ref_params, mesh, strategy=param_sharding)
        state = put_global(state, train_state_shardings(state, unbatched, num_batch_axes=len(batch_axes)))
        data = put_global(data.replace(ref_params=None), replicated).replace(
            ref_params=put_global(ref_params, unbatched)
        )

    checkpoints = RunCheckpoints(out_dir / "checkpoints", keep=keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    if restored is not None:
        step, state, saved = restored
        if saved["reference_fingerprint"] != record["reference_fingerprint"]:
            raise ValueError(f"the checkpoint at iteration {step} was trained against another reference policy.")
        changed = _changed_fields(saved["run"], record) if "run" in saved else []
        if changed:  # e.g. config.json deleted by hand: the checkpoint still knows its run
            raise ValueError(
                f"the checkpoint at iteration {step} in {out_dir} was written by a run with different {changed}; "
                "use a new out_dir to start another run."
            )
        if log is not None:
            log(f"resuming {out_dir} from the checkpoint at iteration {step}")
    start = int(np.max(jax.device_get(state.step)))
    if start > num_iterations:
        raise ValueError(
            f"{out_dir} holds a checkpoint at iteration {start}, past num_iterations={num_iterations}; "
            "ask for at least as many iterations, or use a new out_dir."
        )
    # Written once the resume is known to be possible, so a refused one leaves the record as it was.
    _write_text(config_path, json.dumps(record, indent=1))
    lines = _read_lines(out_dir / "metrics.jsonl", start)
    _write_text(out_dir / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in lines))

    shapes = jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), (state, data))
    identity = (config, graphdef, reward_fn, ground_truth_fn, batch_sharding, teachers is None, isinstance(seeds, int))
    identity += (jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes)), in_chunk_progress)
    try:
        hash(identity)
    except TypeError:  # an unhashable teacher: its programs serve this run only
        identity = (object(),)
    progress = None

    def program(length):
        nonlocal progress
        key = (*identity, length)
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            compiled, progress = _COMPILED[key]
            if progress is not None:
                progress.retarget(log, num_iterations)
            return compiled
        progress = _InChunkProgress(log, num_iterations) if in_chunk_progress else None
        train = make_train(
            config,
            graphdef,
            reward_fn,
            length,
            ground_truth_fn=ground_truth_fn,
            batch_sharding=batch_sharding,
            on_iteration=progress,
        )
        if not isinstance(seeds, int):
            train = jax.vmap(train, in_axes=(0, None))
        if teachers is not None:
            train = jax.vmap(train, in_axes=(0, TrainData(None, None, None, 0, 0, 0)))
        began = time.perf_counter()
        if log is not None:
            log(f"compiling {length} iteration(s) for a batch of {list(batch_axes) or 'one run'} ...")
        # The state leaves a chunk as it entered, so that the next chunk (compiled for these input
        # shardings) can take it; left to itself XLA may lay out small parameters otherwise.
        if mesh is not None:
            train = jax.jit(train, out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
        _COMPILED[key] = (jax.jit(train).lower(state, data).compile(), progress)
        if len(_COMPILED) > _COMPILED_KEEP:
            _COMPILED.popitem(last=False)
        if log is not None:
            log(f"compiled in {time.perf_counter() - began:.1f} s")
        return _COMPILED[key][0]

    teacher_names = [None] if teachers is None else list(teachers)
    chunk = checkpoint_every or log_every or num_iterations
    responses_per_iteration = config.prompts_per_iteration * config.samples_per_prompt
    step = start
    while step < num_iterations:
        length = min(chunk - step % chunk, num_iterations - step)
        run_chunk = program(length)
        if progress is not None:
            progress.restart()
        began = time.perf_counter()
        state, stacked = run_chunk(state, data)
        stacked = {
            k: np.asarray(v).reshape(len(teacher_names), len(seed_list), length)
            for k, v in jax.device_get(stacked).items()
        }
        seconds = time.perf_counter() - began
        generated = float(np.sum(stacked["response_length"])) * responses_per_iteration
        new = []
        for i in range(length):
            for t, teacher in enumerate(teacher_names):
                for s, seed in enumerate(seed_list):
                    line = {
                        "iteration": step + i,
                        **({} if teacher is None else {"teacher": teacher}),
                        "seed": int(seed),
                    }
                    line.update({k: float(v[t, s, i]) for k, v in stacked.items()})
                    line["tokens_per_s"] = generated / seconds
                    new.append(line)
        lines += new
        if _is_writer():
            with (out_dir / "metrics.jsonl").open("a") as file:
                file.writelines(json.dumps(line) + "\n" for line in new)
        step += length
        if step == num_iterations or (checkpoint_every and step % checkpoint_every == 0):
            checkpoints.save(
                step,
                state,
                {"iteration": step, "reference_fingerprint": record["reference_fingerprint"], "run": record},
            )
        every = log_every or chunk
        if log is not None and (step // every > (step - length) // every or step == num_iterations):
            last = {k: float(np.mean(v[..., -1])) for k, v in stacked.items()}
            truth = f" ground truth {last['ground_truth_reward']:+.4f}" if "ground_truth_reward" in last else ""
            log(
                f"iteration {step}/{num_iterations}: proxy {last['proxy_reward']:+.4f}{truth} "
                f"kl {last['kl']:.4f} ({generated / seconds:.0f} tokens/s)"
            )
    checkpoints.close()
    history = _history(lines, teachers, seeds)
    final = {k: v[..., -1].tolist() for k, v in history.items() if k != "iteration"}
    _write_text(out_dir / "summary.json", json.dumps({"iterations": num_iterations, "final": final}, indent=1))
    return RLHFRun(state, history)
