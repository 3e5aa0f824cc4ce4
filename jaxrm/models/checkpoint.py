"""Model checkpoints: an nnx model's parameters (orbax) plus its config (JSON), written atomically.

A checkpoint directory holds ``model.json`` (model class, :class:`TransformerConfig`, user
metadata, a checksum of every parameter) and ``params/`` (an orbax ``StandardCheckpointer``
tree). It is written under a temporary name and renamed into place, so a killed run never leaves
a half-written checkpoint under the final name; a checkpoint damaged afterwards fails its checksum
at load instead of loading garbage values.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxrm.models.config import TransformerConfig
from jaxrm.models.transformer import CausalLM, RewardModel
from jaxrm.studies import check_out_directory

_MODEL_CLASSES = {"CausalLM": CausalLM, "RewardModel": RewardModel}


def tree_checksum(tree) -> list[int]:
    """One 32-bit checksum per leaf of a pytree of arrays: ``sum_i w_i (2 i + 1) mod 2^32`` over
    the leaf's bits read as 32-bit words ``w_i`` (narrower dtypes widened, wider ones split).

    Any change of a single word changes it (odd multipliers are invertible mod ``2^32``). It runs
    where the arrays live, sharded or not, so no array is gathered to the host.
    """
    return [int(v) for v in _per_leaf(_word_checksum, tree)]


def is_prng_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _per_leaf(reduce, tree) -> list:
    """``reduce`` (a scalar per array) of every leaf, in one compiled program on the arrays'
    devices; read from this process's copy, so it also works when the arrays span several hosts."""
    leaves = [jax.random.key_data(x) if is_prng_key(x) else x for x in jax.tree.leaves(tree)]
    return np.asarray(_stack_per_leaf(reduce, leaves).addressable_data(0)).tolist() if leaves else []


@functools.partial(jax.jit, static_argnums=0)
def _stack_per_leaf(reduce, leaves):
    return jnp.stack([reduce(x) for x in leaves])


def _word_checksum(x):
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    words = words.ravel()
    return jnp.sum(words * (2 * jnp.arange(words.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)


def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _check_parameters_fit_config(model) -> None:
    """``ValueError`` unless the model's parameters have the shapes and dtypes its config gives
    (``load_model`` rebuilds the model from the config: parameters stacked over seeds, say, would
    be written and then fail to load)."""
    expected = nnx.state(nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(0))), nnx.Param)
    have = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    want = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(expected))[0]
    for (path, leaf), (_, target) in zip(have, want):
        if (np.shape(leaf), jnp.result_type(leaf)) != (target.shape, target.dtype):
            raise ValueError(
                f"the model's parameter {jax.tree_util.keystr(path)} is {np.shape(leaf)} {jnp.result_type(leaf)}, "
                f"where its config gives {target.shape} {target.dtype} (parameters of several runs stacked? save "
                "one run's)."
            )
    if len(have) != len(want):
        raise ValueError(f"the model holds {len(have)} parameters where its config gives {len(want)}.")


def save_model(model: CausalLM | RewardModel, directory: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` (which must not exist yet); returns the directory.

    One process only: under ``jax.distributed`` it refuses (a run's state is checkpointed across
    processes by :func:`jaxrm.train.driver.run_rlhf`)."""
    directory = Path(directory).absolute()
    if jax.process_count() > 1:
        raise RuntimeError(
            f"save_model writes from one process, and this is one of {jax.process_count()} (jax.distributed); "
            "run_rlhf checkpoints a run's state across processes."
        )
    kind = type(model).__name__
    if kind not in _MODEL_CLASSES:
        raise TypeError(f"save_model stores {list(_MODEL_CLASSES)}, not {kind}.")
    if directory.exists():
        raise FileExistsError(f"checkpoint {directory} already exists; refusing to overwrite it.")
    check_out_directory(directory, option="checkpoint")
    _check_parameters_fit_config(model)
    try:
        metadata_text = json.dumps(metadata or {}, allow_nan=False)  # NaN is not JSON
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON (plain numbers, strings, lists, dicts): {error}.") from None
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    record = {
        "class": kind,
        "config": model.config.to_dict(),
        "metadata": json.loads(metadata_text),
        "checksum": tree_checksum(params),
    }
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "params", params)
            checkpointer.wait_until_finished()
        (staging / "model.json").write_text(json.dumps(record, indent=1))
        os.replace(staging, directory)
    finally:  # an interrupted or failed write leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _read_record(directory: Path) -> dict:
    path = directory / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a jaxrm model checkpoint (no model.json).")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    missing = [
        k for k in ("class", "config", "metadata", "checksum") if not isinstance(record, dict) or k not in record
    ]
    if missing:
        raise ValueError(f"{path} is not a jaxrm model record (missing {missing}).")
    if record["class"] not in _MODEL_CLASSES:
        raise ValueError(f"{path}: class {record['class']!r} is not one of {list(_MODEL_CLASSES)}.")
    return record


def read_metadata(directory: str | Path) -> dict:
    """The ``metadata`` dict stored with a checkpoint."""
    return _read_record(Path(directory))["metadata"]


def load_model(directory: str | Path, *, sharding=None, allow_nonfinite: bool = False) -> CausalLM | RewardModel:
    """Rebuild the model saved by :func:`save_model`.

    ``sharding``: optional pytree of ``jax.sharding.Sharding`` matching the parameters (as from
    :func:`jaxrm.sharding.param_shardings`), to restore straight onto a mesh. Without it the
    parameters go to the default device, whatever devices they were saved from, uncommitted as a
    freshly built model's are (so functions compiled for one serve the other); under
    ``jax.distributed`` it is required.
    ``allow_nonfinite``: load parameters holding NaN or inf instead of refusing them.

    A damaged checkpoint (unreadable files, or parameters whose checksum differs from the one
    recorded at save) raises ``ValueError`` naming the directory.
    """
    directory = Path(directory).absolute()
    record = _read_record(directory)
    try:
        config = TransformerConfig.from_dict(record["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / 'model.json'}: bad model config ({error}).") from None
    abstract = nnx.eval_shape(lambda: _MODEL_CLASSES[record["class"]](config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    default_device = sharding is None
    if sharding is None:
        if jax.process_count() > 1:
            raise ValueError("under jax.distributed, load_model needs sharding= (one for every process's devices).")
        sharding = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    else:
        sharding = nnx.to_pure_dict(sharding) if isinstance(sharding, nnx.State) else sharding
        if jax.tree.structure(sharding) != jax.tree.structure(target):
            raise ValueError(
                f"sharding= is laid out for another model than the checkpoint {directory} "
                f"({record['class']}, {config.num_layers} layers): pass the shardings of this model's parameters."
            )
    target = jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), target, sharding
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / "params", target)
    except Exception as error:  # noqa: BLE001 -- tensorstore and orbax raise many types for damaged files
        raise ValueError(f"{directory}: the parameters cannot be read ({type(error).__name__}: {error}).") from None
    if tree_checksum(restored) != record["checksum"]:
        raise ValueError(f"{directory}: the parameters differ from those saved (checksum mismatch): damaged.")
    if not allow_nonfinite:
        paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(restored)]
        bad = [
            "/".join(str(getattr(key, "key", key)) for key in path)
            for path, finite in zip(paths, _per_leaf(_all_finite, restored))
            if not finite
        ]
        if bad:
            raise ValueError(
                f"{directory}: parameters {bad[:4]} hold NaN/inf values; pass allow_nonfinite=True to load them anyway."
            )
    if default_device:
        # Placed as a model built in this process is: uncommitted, so that jitted functions
        # compiled for fresh models are not compiled again for loaded ones (commitment is part of
        # a program's cache key).
        restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
