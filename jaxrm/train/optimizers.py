"""An optimizer run on the layers' parameters stacked by role, so its program does not grow with depth.

A transformer stores one array per parameter and layer (the Hugging Face layout that checkpoints
and :func:`jaxrm.models.load_hf` use), so an optimizer applied leaf by leaf compiles a few
operations per array: most of what an RLOO iteration's compile time grew from 6 to 24 layers
was Adam updating 292 arrays one by one (docs/design.md#principles). :func:`stack_layers` runs the
optimizer instead on one array per *role* (``layers/*/mlp/dense_h_to_4h/kernel`` for every
layer), the same stacking the scanned blocks use, so the update is a few operations whatever
the depth. The model's own layout does not change.

The updates are the same whenever the inner optimizer treats arrays elementwise or through a
global norm (Adam, AdamW, SGD, ``clip_by_global_norm``); an optimizer with per-array statistics
(Adafactor's factored moments, LAMB's per-array trust ratio) would see one array per role and
compute something else.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import DictKey, SequenceKey


class StackedLayersState(NamedTuple):
    """The inner optimizer's state over the stacked parameters (a dict keyed by role, see
    :func:`layer_roles`)."""

    inner: Any


def _role_name(path) -> str:
    """The leaf's path with every layer index replaced by ``*``, joined by ``/``."""

    def generic(key):
        index = key.key if isinstance(key, DictKey) else key.idx if isinstance(key, SequenceKey) else None
        return DictKey("*") if isinstance(index, int) else key

    return jax.tree_util.keystr(tuple(generic(key) for key in path), simple=True, separator="/")


def layer_roles(params) -> dict[str, list[int]]:
    """``{role: leaf indices}``: the leaves of ``params`` (in ``jax.tree.leaves`` order) grouped by
    their path with layer indices replaced by ``*``, and by shape and dtype (a role whose layers
    differ in shape or dtype is split, each part's name suffixed with both).

    >>> params = {"layers": [{"w": jnp.ones((2, 3))}, {"w": jnp.ones((2, 3))}], "head": jnp.ones(3)}
    >>> layer_roles(params)
    {'head': [0], 'layers/*/w': [1, 2]}
    >>> layer_roles({"layers": [{"w": jnp.ones(2, jnp.float32)}, {"w": jnp.ones(3, jnp.float32)}]})
    {'layers/*/w[2 float32]': [0], 'layers/*/w[3 float32]': [1]}
    """
    by_role: dict[tuple, list[int]] = {}
    for index, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        by_role.setdefault((_role_name(path), jnp.shape(leaf), jnp.result_type(leaf)), []).append(index)
    names = [name for name, _, _ in by_role]
    return {
        name if names.count(name) == 1 else f"{name}[{'x'.join(map(str, shape))} {dtype}]": indices
        for (name, shape, dtype), indices in by_role.items()
    }


def _stack(tree, roles: dict[str, list[int]]) -> dict:
    """One array per role: its layers' arrays stacked on a new leading axis (a role of one array
    keeps that array)."""
    leaves = jax.tree.leaves(tree)
    return {
        name: leaves[indices[0]] if len(indices) == 1 else jnp.stack([leaves[i] for i in indices])
        for name, indices in roles.items()
    }


def _unstack(stacked: dict, roles: dict[str, list[int]], like):
    """The inverse of :func:`_stack`, into the structure of ``like``."""
    leaves = [None] * len(jax.tree.leaves(like))
    for name, indices in roles.items():
        for position, index in enumerate(indices):
            leaves[index] = stacked[name] if len(indices) == 1 else stacked[name][position]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def stack_layers(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to the parameters stacked by role (:func:`layer_roles`).

    ``init(params)`` and ``update(updates, state, params)`` take and return trees shaped like
    the parameters; the state holds ``inner``'s state over ``{role: stacked array}``.

    >>> params = {"layers": [{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}]}
    >>> optimizer = stack_layers(optax.sgd(0.5))
    >>> updates, _ = optimizer.update({"layers": [{"w": jnp.ones(2)}, {"w": 2 * jnp.ones(2)}]}, optimizer.init(params))
    >>> [u["w"].tolist() for u in updates["layers"]]
    [[-0.5, -0.5], [-1.0, -1.0]]
    """

    def init(params):
        return StackedLayersState(inner.init(_stack(params, layer_roles(params))))

    def update(updates, state, params=None):
        roles = layer_roles(updates)
        stacked_params = None if params is None else _stack(params, roles)
        stacked_updates, inner_state = inner.update(_stack(updates, roles), state.inner, stacked_params)
        return _unstack(stacked_updates, roles, updates), StackedLayersState(inner_state)

    return optax.GradientTransformation(init, update)


def stacked_state_shardings(
    opt_state: StackedLayersState, params, param_shardings, *, other: NamedSharding, batch_axes: int = 0
) -> StackedLayersState:
    """Where each leaf of a :func:`stack_layers` state lives: every role-keyed dict of the inner
    state (Adam's moments) as the role's parameters, with the stacking axis unsharded, and every
    other leaf (step counts) on ``other``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``) and ``param_shardings`` (``NamedSharding``
    leaves) have the same structure, and ``batch_axes`` leading axes of runs side by side (the
    state was initialized on one run's parameters, so the roles are those of the parameters
    without these axes), which the stacking axis follows. A role whose layers are placed
    differently cannot be stacked: ``ValueError``.
    """
    roles = layer_roles(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[batch_axes:], x.dtype), params))
    shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_role = {}
    for name, indices in roles.items():
        placed = {shardings[i] for i in indices}
        if len(placed) > 1:
            raise ValueError(f"the layers of {name} are placed differently ({placed}); they cannot be stacked.")
        sharding = placed.pop()
        if len(indices) > 1:
            spec = (*sharding.spec, *([None] * (batch_axes - len(sharding.spec))))
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[:batch_axes], None, *spec[batch_axes:]))
        by_role[name] = sharding

    def is_by_role(subtree):
        return isinstance(subtree, dict) and subtree.keys() == roles.keys()

    return jax.tree.map(lambda x: dict(by_role) if is_by_role(x) else other, opt_state, is_leaf=is_by_role)
