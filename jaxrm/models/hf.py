"""Hugging Face GPT-NeoX (Pythia) checkpoints: ``load_hf`` and a safetensors reader.

Only ``config.json`` + ``*.safetensors`` are read, with the ``safetensors`` library (which
memory-maps the file and validates its header: offsets, sizes, dtypes) and one tensor at a time:
no network, no ``torch``, and never a pickle (``*.bin``/``*.pt`` files can run arbitrary code
when loaded). A damaged file, a malformed ``config.json`` and non-finite weights are refused with
an error that names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401 -- registers bfloat16 with numpy, so safetensors can return BF16 tensors
import numpy as np
import safetensors
from flax import nnx

from jaxrm.models.config import TransformerConfig
from jaxrm.models.transformer import CausalLM, RewardModel

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers that old GPT-NeoX checkpoints store but that are recomputed here.
_IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
_HEADS = {"lm": (CausalLM, "embed_out"), "reward": (RewardModel, "score")}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as a numpy array; a damaged file raises
    ``ValueError`` naming it."""
    with _SafetensorsFiles([Path(path)]) as files:
        return {name: files.tensor(name) for name in files.names()}


class _SafetensorsFiles:
    """The tensors of several ``.safetensors`` files, by name, read one at a time."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.stack = contextlib.ExitStack()
        self.where: dict[str, tuple[Path, Any]] = {}

    def __enter__(self):
        for path in self.paths:
            try:
                handle = self.stack.enter_context(safetensors.safe_open(path, framework="numpy"))
            except Exception as error:  # noqa: BLE001 -- SafetensorError, OSError, ...: all mean a bad file
                self.stack.close()
                raise ValueError(f"{path} is not a readable safetensors file ({error}).") from None
            for name in handle.keys():
                self.where[name] = (path, handle)
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def names(self) -> list[str]:
        return list(self.where)

    def tensor(self, name: str) -> np.ndarray:
        path, handle = self.where[name]
        try:
            return handle.get_tensor(name)
        except Exception as error:  # noqa: BLE001 -- e.g. a dtype numpy cannot hold
            raise ValueError(f"{path}: tensor {name!r} cannot be read ({error}).") from None


def _read_config(directory: Path, overrides: dict) -> TransformerConfig:
    known = {field.name for field in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:  # the caller's typo, not the file's fault
        raise ValueError(
            f"load_hf got unknown TransformerConfig field(s) {unknown} to override; known: {sorted(known)}."
        )
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a {type(hf).__name__}, not a JSON object of model settings.")
    try:
        return TransformerConfig.from_hf(hf, **overrides)
    except (KeyError, TypeError, ValueError) as error:
        what = f"has no {error}" if isinstance(error, KeyError) else f"is not a usable model config: {error}"
        raise ValueError(f"{path} {what}") from None


def _checkpoint_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (load_hf reads a local model directory).")
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json.")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{directory} holds only pickle checkpoints {pickles}; jaxrm refuses them because unpickling can "
                "execute arbitrary code. Convert them to safetensors first (in transformers: "
                "model.save_pretrained(dir, safe_serialization=True))."
            )
        raise FileNotFoundError(f"{directory} has no *.safetensors files.")
    return files


def read_hf_config(path: str | Path) -> TransformerConfig:
    """The :class:`TransformerConfig` of a local Hugging Face GPT-NeoX directory, once it is known
    to hold a usable ``config.json`` and ``*.safetensors`` files whose headers can be read (as
    :func:`load_hf` needs); no tensor is read, so a caller can check a checkpoint before any work."""
    directory = Path(path)
    with _SafetensorsFiles(_checkpoint_files(directory)):
        pass
    return _read_config(directory, {})


def _hf_name(path: tuple) -> tuple[str, bool]:
    """The Hugging Face tensor name of an nnx parameter path, and whether it is transposed."""
    *module, leaf = (str(p) for p in path)
    if module[0] == "trunk":
        module = ["gpt_neox", *module[1:]]
    leaf_name = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    return ".".join([*module, leaf_name]), leaf == "kernel"


def load_hf(
    path: str | Path, *, head: str = "lm", allow_nonfinite: bool = False, **config_overrides
) -> CausalLM | RewardModel:
    """Load a local Hugging Face GPT-NeoX directory into a :class:`CausalLM` or :class:`RewardModel`.

    Args:
      path: directory with ``config.json`` and one or more ``*.safetensors`` files.
      head: ``"lm"`` for the causal LM (needs ``embed_out.weight``) or ``"reward"`` for the reward
        model (``score.weight`` of ``GPTNeoXForSequenceClassification``; when the checkpoint is a
        causal LM without it, the head starts at zero, as a reward model initialised from an SFT
        model).
      allow_nonfinite: load tensors holding NaN or inf instead of refusing them.
      **config_overrides: fields of :class:`TransformerConfig` to change, e.g. ``param_dtype``.

    Tensors are converted to ``param_dtype`` (float32 by default, whatever the file stores). A
    damaged or non-safetensors file, a malformed ``config.json``, a missing tensor, a shape that
    does not match the config and (unless ``allow_nonfinite``) a NaN/inf weight raise
    ``ValueError`` naming the file or the tensor.
    """
    if head not in _HEADS:
        raise ValueError(f"head={head!r} is not one of {list(_HEADS)}.")
    directory = Path(path)
    files = _checkpoint_files(directory)
    config = _read_config(directory, config_overrides)
    module_type, head_name = _HEADS[head]
    abstract = nnx.eval_shape(lambda: module_type(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    with _SafetensorsFiles(files) as tensors:
        # A bare GPTNeoXModel saves the trunk's tensors without the "gpt_neox." prefix.
        trunk_names = ("embed_in.", "layers.", "final_layer_norm.")
        stored = {f"gpt_neox.{n}" if n.startswith(trunk_names) else n: n for n in tensors.names()}
        used, missing, loaded = set(), [], []
        for param_path, variable in nnx.to_flat_state(abstract_state):
            name, transposed = _hf_name(param_path)
            if name not in stored:
                if param_path[0] == head_name and head == "reward":
                    loaded.append((param_path, variable.replace(jnp.zeros(variable.shape, variable.dtype))))
                    continue
                missing.append(name)
                continue
            value = tensors.tensor(stored[name])
            value = value.T if transposed else value
            if value.shape != variable.shape:
                raise ValueError(
                    f"{directory}: tensor {name} has shape {value.shape}, which does not match the config's "
                    f"{variable.shape}."
                )
            if not allow_nonfinite and not np.isfinite(value).all():
                raise ValueError(
                    f"{directory}: tensor {name} holds {int((~np.isfinite(value)).sum())} NaN/inf value(s); "
                    "pass allow_nonfinite=True to load it anyway."
                )
            used.add(name)
            loaded.append((param_path, variable.replace(jnp.asarray(value, dtype=variable.dtype))))
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}.")
    unused = sorted(n for n in set(stored) - used if not n.endswith(_IGNORED_SUFFIXES))
    if head == "reward":
        unused = [n for n in unused if n != "embed_out.weight"]
    if unused:
        warnings.warn(f"load_hf: {len(unused)} tensor(s) of {directory} were not used: {unused[:8]}", stacklevel=2)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
