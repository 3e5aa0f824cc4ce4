"""Device meshes and parameter placement for nnx models.

Parameters carry logical axis names in their nnx ``out_sharding`` metadata (``vocab``, ``embed``,
``heads``, ``mlp``, ``norm``). A *strategy* maps those names onto mesh axes:

- ``"replicated"``: every device holds every parameter (data parallelism only);
- ``"fsdp"``: the ``embed`` dimension of every matrix is split along the ``data`` axis (ZeRO-3 /
  FSDP style: parameters are gathered per layer by XLA inside the compiled step);
- ``"tensor"``: ``heads``, ``mlp`` and ``vocab`` dimensions are split along the ``model`` axis
  (Megatron-style tensor parallelism);
- ``"fsdp+tensor"``: both.

A dimension that the mesh axis does not divide stays replicated, so any strategy runs on any mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxrm._checks import check_choice, check_int

STRATEGIES = {
    "replicated": {},
    "fsdp": {"embed": "data"},
    "tensor": {"heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp+tensor": {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
}


def make_mesh(*, data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh with Auto axes (XLA chooses the collectives).

    ``data`` defaults to all devices not used by ``model`` (``model`` must then divide the
    device count: no device is left out silently); an explicit ``data`` may use fewer devices.
    Across hosts, ``jax.devices()`` lists the devices of every process, so the same call builds
    the global mesh.
    """
    devices = jax.devices() if devices is None else list(devices)
    for name, value in (("data", data), ("model", model)):
        if value is not None:
            check_int(name, value, low=1)
    if data is None and model >= 1 and len(devices) % model:
        raise ValueError(
            f"model={model} does not divide the {len(devices)} devices; pass data= to use {len(devices) // model * model} "
            "of them."
        )
    data = len(devices) // model if data is None else data
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"a mesh of data={data} x model={model} needs more than the {len(devices)} devices here.")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def _mesh_spec(logical: PartitionSpec, shape, mesh: Mesh, rules: dict) -> PartitionSpec:
    axes = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axis = rules.get(name)
        axes.append(axis if axis in mesh.shape and size % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*axes)


def param_shardings(state: nnx.State, mesh: Mesh, *, strategy: str = "replicated") -> nnx.State:
    """``NamedSharding`` for every variable of an nnx state under a strategy (see module doc)."""
    check_choice("strategy", strategy, STRATEGIES)
    rules = STRATEGIES[strategy]
    logical = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda spec, value: NamedSharding(mesh, _mesh_spec(spec, np.shape(value), mesh, rules)),
        logical,
        state,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_model(model: nnx.Module, mesh: Mesh, *, strategy: str = "replicated") -> nnx.Module:
    """Place a model's variables on ``mesh`` in place (and return it)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, strategy=strategy)))
    return model


def shard_batch(array, mesh: Mesh, *, axis: str = "data"):
    """Place an array on ``mesh`` with its leading (batch) dimension split along ``axis``."""
    spec = PartitionSpec(axis, *([None] * (np.ndim(array) - 1)))
    return jax.device_put(array, NamedSharding(mesh, spec))


def put_global(tree, shardings):
    """Place a pytree of host-identical values onto (possibly multi-process) shardings.

    Unlike ``jax.device_put``, this works when a sharding spans devices of other processes
    (``jax.distributed``): every process builds its own shards from its copy of the values, which
    must be the same on every process. ``shardings`` is one sharding or a matching pytree.
    """

    def put(value, sharding):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(value), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
        host = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda v: put(v, shardings), tree)
    return jax.tree.map(put, tree, shardings)
