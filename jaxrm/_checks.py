"""Input validation at the Python boundary.

Value checks (finite, sums to one) run only on concrete arrays: under ``jit``/``vmap`` the
values are tracers and cannot be inspected, so those checks are skipped there while shape
checks still apply.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import jax
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_key(name: str, key) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``key`` is a ``jax.random.key`` (a typed key
    array) or a legacy ``uint32 [..., 2]`` one: an int seed would fail deep inside ``jax.random``."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, jax.Array) and key.dtype == np.uint32 and key.shape[-1:] == (2,)
    if not (typed or legacy):
        raise ValueError(f"{name} must be a jax.random.key (e.g. jax.random.key(0)), got {key!r}.")


def check_finite(name: str, x) -> None:
    """Raise ``ValueError`` if a concrete ``x`` holds NaN or inf."""
    if x is None or not is_concrete(x):
        return
    values = np.asarray(x)
    if not np.issubdtype(values.dtype, np.inexact):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be finite, but holds {int(bad.sum())} NaN/inf value(s) "
            f"(first at index {where}: {values[where]})."
        )


def check_int(name: str, value, *, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= low`` (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def check_instance(name: str, value, cls: type) -> None:
    """Raise ``ValueError`` unless ``value`` is a ``cls`` (e.g. a reward model where a policy was
    passed: both are flax modules, and the mistake would otherwise surface deep in a trace)."""
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__}, got {type(value).__name__}.")


def check_int_sequence(name: str, values, *, low: int) -> list[int]:
    """``values`` as a list of ints ``>= low``, or ``ValueError`` naming ``name`` (a lone int,
    a string or a bool is not a sequence of ints here)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, np.ndarray, range)):
        raise ValueError(f"{name} must be a sequence of ints >= {low}, got {values!r}.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a sequence of ints >= {low}, got {values!r}.")
    return [int(value) for value in values]


def check_same_shape(**arrays) -> None:
    """Raise ``ValueError`` unless all given (non-None) arrays share one shape."""
    shapes = {name: np.shape(a) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed} must all have the same shape.")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {sorted(allowed)}.")


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
    """Raise ``ValueError`` if a concrete integer array holds ids outside ``[0, vocab_size)``."""
    dtype = tokens.dtype if hasattr(tokens, "dtype") else np.asarray(tokens).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {dtype}.")
    if not is_concrete(tokens):
        return
    values = np.asarray(tokens)
    bad = (values < 0) | (values >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} holds {int(bad.sum())} token id(s) outside the vocabulary [0, {vocab_size}) "
            f"(first at index {where}: {values[where]})."
        )


# Config dataclasses: every field is checked against its annotation (an int field refuses 2.5 and
# True, a float field takes an int too and refuses NaN/inf, a tuple field takes a list) and then
# against the ``(predicate, "what is allowed")`` in its ``metadata["check"]``.


def checked(default, check):
    """A dataclass field with a default and a ``(predicate, "allowed values")`` check."""
    return dataclasses.field(default=default, metadata={"check": check})


def int_at_least(low: int):
    return (lambda v: v >= low, f">= {low}")


def each(check):
    """The check ``check`` applied to every element of a non-empty tuple."""
    predicate, allowed = check
    return (lambda v: len(v) >= 1 and all(predicate(x) for x in v), f"a non-empty tuple of values {allowed}")


def distinct(check):
    """``check`` on a tuple whose values are also pairwise distinct (a study names or groups its
    runs by them)."""
    predicate, allowed = check
    return (lambda v: predicate(v) and len(set(v)) == len(v), f"{allowed}, all distinct")


def increasing(check):
    """``check`` on a tuple whose values also strictly increase."""
    predicate, allowed = check
    return (lambda v: predicate(v) and all(a < b for a, b in zip(v, v[1:])), f"{allowed}, strictly increasing")


def one_of(allowed):
    return (lambda v: v in allowed, f"one of {sorted(allowed)}")


POSITIVE_INT = int_at_least(1)
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_FRACTION = (lambda v: 0 < v < 1, "in (0, 1)")
SMALL_TOLERANCE = (lambda v: 0 <= v < 0.1, "in [0, 0.1)")


def check_fields(config) -> None:
    """Check (and normalise) every field of a frozen config dataclass; raise ``ValueError`` naming
    the field, the value and what is allowed.

    Lists become tuples (JSON has no tuples); other annotations (paths, callables) are left to
    the config itself.
    """
    cls = type(config)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        label = f"{cls.__name__}.{field.name}={value!r}"
        value = _coerce(label, hints.get(field.name), value)
        object.__setattr__(config, field.name, value)
        check = field.metadata.get("check")
        if check is not None and value is not None:
            predicate, allowed = check
            if not predicate(value):
                raise ValueError(f"{label}: must be {allowed}.")


def _coerce(label: str, annotation, value):
    """``value`` as ``annotation`` asks (see :func:`check_fields`), or ``ValueError``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(label, options[0], value)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{label}: must be true or false.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{label}: must be an int.")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{label}: must be a number.")
        if not math.isfinite(value):
            raise ValueError(f"{label}: must be finite.")
        # NumPy scalars become Python numbers (a run's JSON record cannot hold them); an int
        # stays an int, as it was given.
        return (
            float(value) if isinstance(value, np.floating) else int(value) if isinstance(value, np.integer) else value
        )
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{label}: must be a string.")
        return value
    if annotation is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{label}: must be a list of values.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(label, args[0], v) for v in value)
        return tuple(value)
    return value
