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
