"""Hugging Face GPT-NeoX (Pythia) checkpoints: a safetensors reader and ``load_hf``.

Only ``config.json`` + ``*.safetensors`` are read, straight into numpy memory maps: no network,
no ``torch``, and never a pickle (``*.bin``/``*.pt`` files can run arbitrary code when loaded).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxrm.models.config import TransformerConfig
from jaxrm.models.transformer import CausalLM, RewardModel

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers that old GPT-NeoX checkpoints store but that are recomputed here.
_IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
_HEADS = {"lm": (CausalLM, "embed_out"), "reward": (RewardModel, "score")}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of one ``.safetensors`` file (read-only numpy arrays)."""
    path = Path(path)
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data_start = 8 + header_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {count * dtype.itemsize}.")
        array = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,))
        tensors[name] = array.reshape(info["shape"])
    return tensors


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


def _hf_name(path: tuple) -> tuple[str, bool]:
    """The Hugging Face tensor name of an nnx parameter path, and whether it is transposed."""
    *module, leaf = (str(p) for p in path)
    if module[0] == "trunk":
        module = ["gpt_neox", *module[1:]]
    leaf_name = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    return ".".join([*module, leaf_name]), leaf == "kernel"


def load_hf(path: str | Path, *, head: str = "lm", **config_overrides) -> CausalLM | RewardModel:
    """Load a local Hugging Face GPT-NeoX directory into a :class:`CausalLM` or :class:`RewardModel`.

    Args:
      path: directory with ``config.json`` and one or more ``*.safetensors`` files.
      head: ``"lm"`` for the causal LM (needs ``embed_out.weight``) or ``"reward"`` for the reward
        model (``score.weight`` of ``GPTNeoXForSequenceClassification``; when the checkpoint is a
        causal LM without it, the head starts at zero, as a reward model initialised from an SFT
        model).
      **config_overrides: fields of :class:`TransformerConfig` to change, e.g. ``param_dtype``.

    Tensors are converted to ``param_dtype`` (float32 by default, whatever the file stores).
    """
    if head not in _HEADS:
        raise ValueError(f"head={head!r} is not one of {list(_HEADS)}.")
    directory = Path(path)
    files = _checkpoint_files(directory)
    config = TransformerConfig.from_hf(json.loads((directory / "config.json").read_text()), **config_overrides)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    # A bare GPTNeoXModel saves the trunk's tensors without the "gpt_neox." prefix.
    trunk_names = ("embed_in.", "layers.", "final_layer_norm.")
    tensors = {f"gpt_neox.{n}" if n.startswith(trunk_names) else n: value for n, value in tensors.items()}

    module_type, head_name = _HEADS[head]
    abstract = nnx.eval_shape(lambda: module_type(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    used, missing, loaded = set(), [], []
    for param_path, variable in nnx.to_flat_state(abstract_state):
        name, transposed = _hf_name(param_path)
        if name not in tensors:
            if param_path[0] == head_name and head == "reward":
                loaded.append((param_path, variable.replace(jnp.zeros(variable.shape, variable.dtype))))
                continue
            missing.append(name)
            continue
        value = tensors[name].T if transposed else tensors[name]
        if value.shape != variable.shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} does not match the config's {variable.shape}.")
        used.add(name)
        loaded.append((param_path, variable.replace(jnp.asarray(np.asarray(value), dtype=variable.dtype))))
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}.")
    unused = sorted(n for n in set(tensors) - used if not n.endswith(_IGNORED_SUFFIXES))
    if head == "reward":
        unused = [n for n in unused if n != "embed_out.weight"]
    if unused:
        warnings.warn(f"load_hf: {len(unused)} tensor(s) of {directory} were not used: {unused[:8]}", stacklevel=2)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
