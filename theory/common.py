"""Helpers shared by the theory studies: configs, progress, fits, atomic output."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def validate_config(config) -> None:
    """Check a frozen config dataclass against the ``metadata["check"]`` of its fields.

    A check is ``(predicate, "allowed values")``; a failure names the field and what is allowed.
    """
    for field in dataclasses.fields(config):
        check = field.metadata.get("check")
        if check is None:
            continue
        predicate, allowed = check
        value = getattr(config, field.name)
        if not predicate(value):
            raise ValueError(f"{type(config).__name__}.{field.name}={value!r}: must be {allowed}.")


# Field checks shared by the studies' configs: (predicate, "allowed values").
def int_at_least(low: int):
    return (lambda v: isinstance(v, int) and v >= low, f"an int >= {low}")


POSITIVE_INT = int_at_least(1)
POSITIVE = (lambda v: v > 0, "> 0")
SMALL_TOLERANCE = (lambda v: 0 <= v < 0.1, "in [0, 0.1)")


def checked(default, check):
    """A dataclass field with a default and a check for :func:`validate_config`."""
    return dataclasses.field(default=default, metadata={"check": check})


class StudyConfig:
    """Base of the studies' frozen config dataclasses: every field is checked on construction."""

    def __post_init__(self):
        validate_config(self)

    def quick(self):
        """A smaller run for smoke tests; studies override it."""
        return self

    @classmethod
    def resolve(cls, config=None, *, quick=False):
        """The config a study runs with (defaults, then ``--quick``), with float64 switched on:
        the exact studies compare against bounds at 1e-6."""
        import jax

        jax.config.update("jax_enable_x64", True)
        config = cls() if config is None else config
        return config.quick() if quick else config


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (studies run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_from_dict(cls, values: dict):
    """Build a config, rejecting unknown keys by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}.")
    return cls(**values)


class Progress:
    """Timestamped progress lines on stderr: ``[study   12.3s] message``."""

    def __init__(self, study: str, stream=None):
        self.study = study
        self.start = time.perf_counter()
        self.stream = sys.stderr if stream is None else stream

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.study} {self.elapsed:6.1f}s] {message}", file=self.stream, flush=True)


def loglog_slope(x, y, *, groups=None, num_bootstrap=1000, seed=0, level=0.95):
    """Least-squares slope of ``log y`` on ``log x`` with a percentile bootstrap interval.

    With ``groups``, the slope is the within-group one (each group's logs are centred, as in a
    fixed-effects fit) and the bootstrap resamples whole groups. Returns ``(slope, (low,
    high))``; NaNs when fewer than 3 points are given.
    """
    log_x, log_y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if log_x.size < 3:
        return math.nan, (math.nan, math.nan)
    if groups is None:
        clusters = np.arange(log_x.size)
    else:
        clusters = np.unique(np.asarray(groups), return_inverse=True)[1]
        count = np.bincount(clusters)
        log_x = log_x - (np.bincount(clusters, log_x) / count)[clusters]
        log_y = log_y - (np.bincount(clusters, log_y) / count)[clusters]
    # Per-cluster sums make each bootstrap replicate a sum over resampled clusters.
    sums = np.stack(
        [np.bincount(clusters, w) for w in (np.ones_like(log_x), log_x, log_y, log_x * log_y, log_x * log_x)]
    )

    def slope(s):
        n, sx, sy, sxy, sxx = s
        return (sxy - sx * sy / n) / (sxx - sx * sx / n)

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sums.shape[1], (num_bootstrap, sums.shape[1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = slope(sums[:, picks].sum(-1))
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return float(slope(sums.sum(-1))), (float(low), float(high))


def write_text(path: Path, text: str) -> None:
    """Write atomically: a killed run never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def fmt(value, digits=3) -> str:
    """Compact number for tables: 3 significant digits, scientific when large or small."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"
