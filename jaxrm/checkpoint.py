"""Model checkpoints: an nnx model's parameters (orbax) plus its config (JSON), written atomically.

A checkpoint directory holds ``model.json`` (model class, :class:`TransformerConfig`, user
metadata) and ``params/`` (an orbax ``StandardCheckpointer`` tree). It is written under a
temporary name and renamed into place, so a killed run never leaves a half-written checkpoint
under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxrm.models.config import TransformerConfig
from jaxrm.models.transformer import CausalLM, RewardModel

_MODEL_CLASSES = {"CausalLM": CausalLM, "RewardModel": RewardModel}


def save_model(model: CausalLM | RewardModel, directory: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` (which must not exist yet); returns the directory."""
    directory = Path(directory).absolute()
    kind = type(model).__name__
    if kind not in _MODEL_CLASSES:
        raise TypeError(f"save_model stores {list(_MODEL_CLASSES)}, not {kind}.")
    if directory.exists():
        raise FileExistsError(f"checkpoint {directory} already exists; refusing to overwrite it.")
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
    record = {"class": kind, "config": model.config.to_dict(), "metadata": metadata or {}}
    (staging / "model.json").write_text(json.dumps(record, indent=1))
    os.replace(staging, directory)
    return directory


def read_metadata(directory: str | Path) -> dict:
    """The ``metadata`` dict stored with a checkpoint."""
    return json.loads((Path(directory) / "model.json").read_text())["metadata"]


def load_model(directory: str | Path, *, sharding=None) -> CausalLM | RewardModel:
    """Rebuild the model saved by :func:`save_model`.

    ``sharding``: optional pytree of ``jax.sharding.Sharding`` matching the parameters (as from
    :func:`jaxrm.sharding.param_shardings`), to restore straight onto a mesh.
    """
    directory = Path(directory).absolute()
    if not (directory / "model.json").exists():
        raise FileNotFoundError(f"{directory} is not a jaxrm model checkpoint (no model.json).")
    record = json.loads((directory / "model.json").read_text())
    config = TransformerConfig.from_dict(record["config"])
    abstract = nnx.eval_shape(lambda: _MODEL_CLASSES[record["class"]](config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if sharding is not None:
        target = jax.tree.map(
            lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
            target,
            nnx.to_pure_dict(sharding),
        )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


class RunCheckpoints:
    """Checkpoints of a training state every few steps, keeping the last ``keep`` (orbax manager).

    A state is any pytree of arrays (typed PRNG keys are stored as their raw key data); each
    checkpoint also carries a small JSON record. Saves are atomic (orbax writes to a temporary
    directory and renames it when complete), so a run killed while saving leaves the previous
    checkpoints intact; :meth:`restore_latest` falls back to an older checkpoint, with a warning,
    when the newest one cannot be read.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("state", "record")
        )

    def save(self, step: int, state, record: dict) -> None:
        state = jax.tree.map(_storable, state, is_leaf=_is_key)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        self.manager.save(step, args=args)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, template):
        """``(step, state, record)`` of the newest readable checkpoint, or ``None`` if there is none.

        ``template`` is a state of the same structure (arrays or ``jax.ShapeDtypeStruct``, with
        the shardings to restore onto).
        """
        abstract = jax.tree.map(_abstract, template, is_leaf=_is_key)
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()),
                )
            except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint means: try the previous one
                warnings.warn(
                    f"checkpoint at step {step} is unreadable ({type(error).__name__}: {error}); trying an older one."
                )
                continue
            state = jax.tree.map(
                lambda stored, like: (
                    jax.random.wrap_key_data(stored, impl=jax.random.key_impl(like)) if _is_key(like) else stored
                ),
                restored["state"],
                template,
                is_leaf=_is_key,
            )
            return step, state, restored["record"]
        return None

    def close(self) -> None:
        self.manager.close()


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(x):
    return jax.random.key_data(x) if _is_key(x) else x


def _abstract(x):
    x = jax.random.key_data(x) if _is_key(x) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
