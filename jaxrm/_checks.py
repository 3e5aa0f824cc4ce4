"""Input validation at the Python boundary.

Value checks (finite, sums to one) run only on concrete arrays: under ``jit``/``vmap`` the
values are tracers and cannot be inspected, so those checks are skipped there while shape
checks still apply.
"""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


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
