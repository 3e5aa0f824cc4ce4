"""Study plumbing shared by ``python -m theory`` and ``python -m experiments.*``.

Configs (frozen dataclasses whose fields carry their checks, built from dicts and ``--set
KEY=VALUE`` overrides that name unknown keys), run directories (a rerun on a directory that holds
another config is refused, naming the keys that differ), timestamped progress lines, and atomic
JSON / Markdown / figure output (a killed run never leaves a half-written file).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxrm._checks import (  # noqa: F401 -- the field checks of study configs, re-exported
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_INT,
    SMALL_TOLERANCE,
    check_fields,
    check_int,
    checked,
    distinct,
    each,
    increasing,
    int_at_least,
    one_of,
)


class StudyConfig:
    """Base of the studies' frozen config dataclasses: every field is checked on construction
    (its type from the annotation, its range from :func:`checked`), before any work is done."""

    def __post_init__(self):
        check_fields(self)

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


COMPILATION_CACHE_ENV = "JAXRM_COMPILATION_CACHE"
DEFAULT_COMPILATION_CACHE = "~/.cache/jaxrm/xla"


def default_compilation_cache() -> str:
    """The compilation-cache directory of the command lines: ``$JAXRM_COMPILATION_CACHE``, else
    ``~/.cache/jaxrm/xla``."""
    return os.environ.get(COMPILATION_CACHE_ENV, DEFAULT_COMPILATION_CACHE)


def add_compilation_cache_option(parser: argparse.ArgumentParser) -> None:
    """The ``--compilation-cache DIR`` option of every command line (see :func:`use_compilation_cache`)."""
    parser.add_argument(
        "--compilation-cache",
        default=default_compilation_cache(),
        metavar="DIR",
        help="keep compiled programs here, so that a second run compiles nothing (default: "
        f"${COMPILATION_CACHE_ENV}, else {DEFAULT_COMPILATION_CACHE}; 'none' turns it off). JAX does not cache "
        "programs with host callbacks (such as in-program progress reports); those compile anew each run.",
    )


def use_compilation_cache(directory: str) -> Path | None:
    """Keep every compiled XLA program in ``directory`` (JAX's persistent compilation cache), so
    that a second run of the same programs compiles nothing; ``"none"`` or ``""`` turns it off.

    Applies to this process and, through the environment, to the processes it starts (the
    studies' worker processes). Programs are cached however fast they compiled: most of a study's
    programs compile in well under the 1 s below which JAX would skip them. Returns the
    directory, or None when off; a file, or a directory that cannot be created, is a ``ValueError``
    naming it (:func:`check_out_directory`).
    """
    if directory in ("", "none"):
        return None
    import jax

    path = Path(directory).expanduser()
    option = "--compilation-cache"
    if os.environ.get(COMPILATION_CACHE_ENV) == directory:  # the default came from the environment
        option += f" (from ${COMPILATION_CACHE_ENV})"
    if not path.is_dir():  # an existing directory serves even read-only: JAX then only reads it
        check_out_directory(path, option=option)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{option} {path}: cannot create it ({error.strerror}).") from None
    settings = {
        "jax_compilation_cache_dir": str(path),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (studies run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` atomically (its format from the suffix of ``path``) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    write_atomically(path, lambda file: fig.savefig(file, dpi=120, format=path.suffix.lstrip(".")), binary=True)
    plt.close(fig)


def config_from_dict(cls, values: dict):
    """Build a config, rejecting unknown keys by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}.")
    return cls(**values)


def config_with_overrides(config, items):
    """``config`` with ``KEY=VALUE`` items replaced (values read as JSON, else as a string; JSON
    lists become tuples); unknown keys are named, and so is a key given twice."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE items, got {item!r}.")
        if key in overrides:
            raise ValueError(f"--set gives {key} twice; give each key once.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:  # a bare string, e.g. a path
            overrides[key] = value
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return config_from_dict(type(config), {**dataclasses.asdict(config), **overrides})


def check_out_directory(out_dir, *, option: str = "--out", files: Iterable[str] = ()) -> Path:
    """``out_dir`` as a ``Path``, refused (``ValueError`` naming ``option`` and the path) before
    anything is computed or written when it is empty, a file, or to be created where no file can
    be created (the probe is a temporary file in its nearest existing directory); also when one of
    ``files`` (paths relative to ``out_dir`` that the run will write; a trailing ``/`` marks a
    directory it will create) is a directory where a file is to be written, or a file stands where
    a directory must be."""
    if str(out_dir) == "":
        raise ValueError(f"{option} is empty; name a directory (it is created if missing).")
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise ValueError(f"{option} {out_dir} is a link to {os.readlink(out_dir)}, which does not exist.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{option} {out_dir} is a file, not a directory.")
    existing = out_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {out_dir}: {existing} is a file, so the directory cannot be created.")
    try:  # os.access says yes to root everywhere; a probe file tells the truth and is gone at once
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"{option} {out_dir}: no file can be created in {existing}, its nearest existing directory "
            f"(creating one there failed: {error.strerror})."
        ) from None
    for name in files:
        path = out_dir / name
        directories = reversed(path.relative_to(out_dir).parents[:-1])
        for directory in [*directories, path.relative_to(out_dir)] if name.endswith("/") else directories:
            if (out_dir / directory).exists() and not (out_dir / directory).is_dir():
                raise ValueError(f"{option} {out_dir}: {out_dir / directory} is a file, where {path} is to be written.")
        if not name.endswith("/") and path.is_dir():
            raise ValueError(f"{option} {out_dir}: {path} is a directory, where a file is to be written.")
    return out_dir


def check_run_directory(out_dir, config) -> Path:
    """``out_dir`` as a ``Path``, refused (``ValueError``) unless a run of ``config`` can start or
    resume there: a bad directory, or one where a path the run writes is taken by the wrong kind
    of entry (:func:`check_out_directory`, with the paths that ``config`` lists in its class's
    ``RUN_OUTPUTS``, if any), or one that holds a run of another config (the keys that differ are
    named). Writes nothing."""
    out_dir = check_out_directory(out_dir, files=("config.json", *getattr(type(config), "RUN_OUTPUTS", ())))
    _config_record(out_dir, config)
    return out_dir


def prepare_run_directory(out_dir, config) -> Path:
    """Create ``out_dir`` and write ``config.json``, or check that it holds a run of the same
    config; refused as :func:`check_run_directory` says, before anything is written."""
    out_dir = check_run_directory(out_dir, config)
    write_json(out_dir / "config.json", _config_record(out_dir, config))
    return out_dir


def _config_record(out_dir: Path, config) -> dict:
    """``config`` as ``config.json`` holds it, checked against the one already in ``out_dir``."""
    record = json.loads(json.dumps(dataclasses.asdict(config), default=_jsonable))
    path = out_dir / "config.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} cannot be read as a run's config ({error}); use a new --out.") from None
        differ = sorted(k for k in set(record) | set(previous) if record.get(k) != previous.get(k))
        if differ:
            raise ValueError(
                f"{out_dir} holds a run with another config (keys that differ: {differ}); use a new --out."
            )
    return record


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


def write_text(path: Path, text: str) -> None:
    """Write atomically: a killed run never leaves a half-written file behind."""
    write_atomically(path, lambda file: file.write(text))


def write_atomically(path: Path, write, *, binary: bool = False) -> None:
    """Call ``write(file)`` on a new file beside ``path``, then rename it to ``path``: a killed or
    failed write leaves the previous file (or none), never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as file:
            write(file)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def save_violations(out_dir: Path, name: str, instances: list, *, progress: Progress) -> None:
    """Write the instances that violate a bound to ``NAME_violations.json``, with a loud progress
    line; with none, remove a file left by an earlier run, so the file always belongs to this run."""
    path = Path(out_dir) / f"{name}_violations.json"
    if not instances:
        path.unlink(missing_ok=True)
        return
    write_json(path, instances)
    progress(f"!!! {len(instances)} BOUND VIOLATION(S): instances saved to {path}")


def finish_study(out_dir: Path, name: str, summary: dict, markdown: str, *, progress: Progress, quick: bool) -> dict:
    """Stamp a study's ``summary`` with its run time and ``quick``, write ``NAME.json`` and
    ``NAME.md`` into ``out_dir`` (atomically), say so on the progress line, and return it."""
    summary["seconds"] = round(progress.elapsed, 1)
    summary["quick"] = quick
    write_json(Path(out_dir) / f"{name}.json", summary)
    write_text(Path(out_dir) / f"{name}.md", markdown)
    progress(f"done, wrote {out_dir}/{name}.*")
    return summary


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
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"


def correlations(x, outcome, *, seed: int, num_resamples: int = 2000, clusters=None) -> dict[str, list[float]]:
    """Pearson and Spearman correlations over models of a property ``x [M]`` with an outcome
    ``[M]`` or ``[M, S]`` (``S`` seeds), each as ``[estimate, low, high]`` with the 95%
    two-stage bootstrap interval of :func:`jaxrm.metrics.bootstrap_correlation` (models and
    seeds resampled).

    With ``clusters`` (``[M]`` ids): models that are not independent, such as the checkpoints of
    one training run, and the first stage resamples whole clusters (:func:`cluster_bootstrap`);
    the second still resamples each drawn model's seeds."""
    import jax

    from jaxrm import metrics

    if clusters is not None:
        x, outcome = np.asarray(x, float), np.asarray(outcome, float)
        outcome = outcome if outcome.ndim == 2 else outcome[:, None]
        if x.ndim != 1 or x.size < 3 or outcome.shape[0] != x.size or np.shape(clusters) != x.shape:
            raise ValueError(
                f"with clusters, x {x.shape}, the outcome's models {outcome.shape[:1]} and clusters "
                f"{np.shape(clusters)} must be one [M] with M >= 3 models."
            )
        if not (np.isfinite(x).all() and np.isfinite(outcome).all()):
            raise ValueError("x and the outcome must be finite.")
        # NumPy, not jaxrm.metrics' kernels: resamples of whole clusters differ in size, so they
        # cannot be stacked into one compiled program. They are stacked here, padded to the
        # longest, with a mask.
        rng = np.random.default_rng(seed)
        draws = _cluster_draws(clusters, rng, num_resamples)
        index = np.zeros((num_resamples, max(map(len, draws))), int)
        valid = np.zeros(index.shape, bool)
        seeds = np.zeros(index.shape + outcome.shape[1:], int)
        for row, draw in enumerate(draws):
            index[row, : len(draw)], valid[row, : len(draw)] = draw, True
            if outcome.shape[1] > 1:  # each drawn model's seeds, drawn resample by resample
                seeds[row, : len(draw)] = rng.integers(0, outcome.shape[1], (len(draw), outcome.shape[1]))
        drawn = np.take_along_axis(outcome[index], seeds, axis=-1).mean(-1)
        full = np.ones((1, x.size), bool)
        fits = {
            "pearson": _masked_pearson,
            "spearman": lambda a, b, mask: _masked_pearson(_masked_ranks(a, mask), _masked_ranks(b, mask), mask),
        }
        return {
            kind: _percentile_interval(fit(x[None], outcome.mean(1)[None], full)[0], fit(x[index], drawn, valid), 0.95)
            for kind, fit in fits.items()
        }
    out = {}
    for kind in ("pearson", "spearman"):
        fit = metrics.bootstrap_correlation(
            np.asarray(x, float),
            np.asarray(outcome, float),
            jax.random.key(seed),
            kind=kind,
            num_resamples=num_resamples,
        )
        out[kind] = [float(fit.estimate), float(fit.low), float(fit.high)]
    return out


def _masked_ranks(values, mask) -> np.ndarray:
    """Each row's ranks from 1 among its entries where ``mask`` holds, ties sharing their average
    (``scipy.stats.rankdata``'s default): the entries below plus half of the equal ones, itself
    included, plus one half. Rows ``[R, n]``, pairwise (``O(R n^2)``: n is a count of models)."""
    below = ((values[:, None, :] < values[:, :, None]) & mask[:, None, :]).sum(-1)
    equal = ((values[:, None, :] == values[:, :, None]) & mask[:, None, :]).sum(-1)
    return below + (equal + 1) / 2


def _masked_pearson(a, b, mask) -> np.ndarray:
    """Each row's Pearson correlation over its entries where ``mask`` holds; NaN (without a
    warning) for a row where either input is constant."""
    count = mask.sum(-1, keepdims=True)
    a, b = (np.where(mask, v - np.where(mask, v, 0).sum(-1, keepdims=True) / count, 0.0) for v in (a, b))
    constant = [np.ptp(np.where(mask, v, v[..., :1]), axis=-1) == 0 for v in (a, b)]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.where(constant[0] | constant[1], np.nan, value)


def cluster_bootstrap(statistic, clusters, *, seed: int, num_resamples: int = 2000, level: float = 0.95) -> list[float]:
    """``[estimate, low, high]``: ``statistic(index)`` over every unit, and its percentile-bootstrap
    interval when whole clusters are resampled (``clusters [M]``: an id per unit, e.g. the
    training run each checkpoint belongs to). Units of one cluster are not independent, and
    resampling them one by one would make the interval too narrow. Resamples where the statistic
    is NaN are left out; the interval is NaN when all are."""
    rng = np.random.default_rng(seed)
    values = [statistic(index) for index in _cluster_draws(clusters, rng, num_resamples)]
    return _percentile_interval(statistic(np.arange(np.size(clusters))), values, level)


def _cluster_draws(clusters, rng, num_resamples: int):
    """``num_resamples`` resamples of the units' indices, each drawing as many clusters as there
    are, with replacement, and taking all of their units (drawn up front, so that a caller's
    later draws from ``rng`` do not change them)."""
    check_int("num_resamples", num_resamples, low=1)
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    if ids.size < 2:
        raise ValueError(f"a bootstrap over clusters needs at least 2 clusters, got {ids.size}.")
    members = [np.flatnonzero(inverse == i) for i in range(ids.size)]
    draws = rng.integers(0, len(members), (num_resamples, len(members)))
    return [np.concatenate([members[j] for j in draw]) for draw in draws]


def _percentile_interval(estimate, resampled, level: float) -> list[float]:
    """``[estimate, low, high]`` with the percentile interval of the finite resampled values."""
    values = np.asarray(resampled, float)
    finite = values[np.isfinite(values)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (math.nan, math.nan)
    return [float(estimate), float(low), float(high)]


def compare_to_reference(reference, others, *, level: float = 0.95) -> dict:
    """Which models beat a reference model, and which lose to it, beyond seed noise.

    ``reference [S]`` and ``others [M, S']`` are outcomes of independent runs (one per seed,
    ``S, S' >= 2``). For each other model the difference of seed means
    ``mean(others[m]) - mean(reference)`` gets Welch's t interval (sample variances with
    ``ddof=1``, Welch-Satterthwaite degrees of freedom), at the Bonferroni level
    ``1 - (1 - level) / M`` so that all ``M`` intervals hold together at ``level``. With few
    seeds the t quantile is large and the intervals wide, as they should be (a bootstrap over
    two seeds would be far too narrow). Returns ``difference``, ``low``, ``high`` (each
    ``[M]``), ``better`` and ``worse`` (indices whose interval lies above / below 0) and
    ``level`` (the per-comparison level). A comparison whose two groups both have zero variance
    (e.g. a policy that collapsed to one output on every seed) has no measured noise: its
    interval is NaN and it is neither better nor worse.

    >>> out = compare_to_reference([0.0, 0.1, -0.1], [[1.0, 1.1, 0.9], [0.0, 0.2, -0.2]])
    >>> out["better"], out["worse"]
    ([0], [])
    """
    from scipy import stats

    reference = np.asarray(reference, float)
    others = np.atleast_2d(np.asarray(others, float))
    if reference.ndim != 1 or others.ndim != 2 or len(reference) < 2 or others.shape[1] < 2:
        raise ValueError(
            f"reference must be [S] and others [M, S] with S >= 2 seeds, got {reference.shape} and {others.shape}."
        )
    per_level = 1 - (1 - level) / len(others)
    ref_term = reference.var(ddof=1) / len(reference)
    other_terms = others.var(axis=1, ddof=1) / others.shape[1]
    spread = np.sqrt(ref_term + other_terms)
    dof = spread**4 / (ref_term**2 / (len(reference) - 1) + other_terms**2 / (others.shape[1] - 1) + 1e-300)
    half = np.where(spread > 0, stats.t.ppf((1 + per_level) / 2, np.maximum(dof, 1.0)) * spread, np.nan)
    difference = others.mean(-1) - reference.mean()
    low, high = difference - half, difference + half
    return {
        "difference": difference.tolist(),
        "low": low.tolist(),
        "high": high.tolist(),
        "better": [int(i) for i in np.flatnonzero(low > 0)],
        "worse": [int(i) for i in np.flatnonzero(high < 0)],
        "level": per_level,
    }


def sign_verdict(entry, paper: tuple[float, ...], *, clear: float = 0.5) -> str:
    """Whether a measured correlation ``[estimate, low, high]`` agrees with a paper's values.

    The paper finds a relation when all its values share a sign and are at least ``clear`` in
    size; then the finding ``holds`` when the interval lies on that side of 0, ``does not hold``
    when it lies on the other side, and is ``inconclusive`` when it holds 0. When the paper finds
    no clear relation, the interval is ``consistent`` with that when it holds 0, and otherwise
    shows a relation of its own sign that the paper did not find.

    >>> sign_verdict([0.7, 0.2, 0.9], (0.83, 0.71)), sign_verdict([0.1, -0.4, 0.6], (0.83, 0.71))
    ('holds', 'inconclusive')
    >>> sign_verdict([0.5, 0.1, 0.8], (-0.28, 0.20))
    'a positive relation the paper did not find'

    An interval that could not be measured (NaN, e.g. a property equal for every model) is
    ``not measured``.
    """
    _, low, high = entry
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not measured"
    signs = {np.sign(v) for v in paper}
    if len(signs) == 1 and min(abs(v) for v in paper) >= clear:
        (sign,) = signs
        if (low > 0 and sign > 0) or (high < 0 and sign < 0):
            return "holds"
        return "does not hold" if (low > 0 or high < 0) else "inconclusive"
    if low <= 0 <= high:
        return "consistent"
    return f"a {'positive' if low > 0 else 'negative'} relation the paper did not find"


def fmt_interval(entry) -> str:
    """``[estimate, low, high]`` as ``estimate [low, high]``."""
    estimate, low, high = entry
    return f"{fmt(estimate)} [{fmt(low)}, {fmt(high)}]"


def share_interval(successes: int, trials: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for the share of ``successes`` in ``trials`` independent trials
    (Wilson 1927; Agresti & Coull 1998): with ``p = successes / trials``, ``n = trials`` and ``z``
    the normal quantile of ``(1 + level) / 2``,
    ``(p + z^2/2n +- z sqrt(p (1 - p) / n + z^2/4n^2)) / (1 + z^2/n)``. Unlike ``p +- z sqrt(p (1 - p) / n)``
    it stays in ``[0, 1]`` and does not shrink to a point at 0 or ``n`` successes.

    >>> [round(x, 3) for x in share_interval(128, 128)]
    [0.971, 1.0]
    """
    counts = all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in (successes, trials))
    if not (counts and trials >= 1 and 0 <= successes <= trials):
        raise ValueError(f"need integer counts, 0 <= successes <= trials and trials >= 1; got {successes} of {trials}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    p, n = successes / trials, trials
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else (centre - half) / (1 + z * z / n)
    high = 1.0 if successes == trials else (centre + half) / (1 + z * z / n)
    return low, high


def fmt_share(successes: int, trials: int, noun: str) -> str:
    """``successes of trials <noun> (share, 95% CI low-high)``, the interval from :func:`share_interval`.

    >>> fmt_share(126, 128, "problems")
    '126 of 128 problems (98.4%, 95% CI 94.4-99.6%)'
    >>> fmt_share(999, 1000, "runs")
    '999 of 1000 runs (99.9%, 95% CI 99.4-99.99%)'
    >>> fmt_share(1, 2001, "runs")
    '1 of 2001 runs (<0.1%, 95% CI 0.008-0.3%)'
    """
    low, high = share_interval(successes, trials)
    share = _percent(successes / trials, round, decimals=1)
    if share in ("0", "100") and 0 < successes < trials:
        share = "<0.1" if share == "0" else ">99.9"
    return (
        f"{successes} of {trials} {noun} ({share}%, 95% CI "
        f"{_percent(low, math.floor, exact=low == 0)}-{_percent(high, math.ceil, exact=high == 1)}%)"
    )


def _percent(x: float, rounding, *, decimals: int | None = None, exact: bool = False) -> str:
    """``100 x`` with one decimal, rounded by ``rounding`` (outwards, for an interval's end), or
    with as many more decimals (up to 4) as keep an end that is not exactly 0 or 1 from showing
    as 0% or 100%."""
    for places in (decimals,) if decimals is not None else range(1, 5):
        scale = 10 ** (places + 2)
        text = f"{rounding(scale * x) / 10**places:.{places}f}".rstrip("0").removesuffix(".")
        if exact or decimals is not None or text not in ("0", "100"):
            return text
    return text


def field_docs(cls) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` sections of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if "__doc__" in vars(klass) else None
        if not doc or "Attributes:" not in doc:
            continue
        section = doc.split("Attributes:", 1)[1]
        for name, text in re.findall(r"^  (\w+): (.*?)(?=^  \w+: |\Z|^\S)", section, re.M | re.S):
            docs[name] = " ".join(text.split())
    return docs


def study_parser(config_cls, *, prog: str, description: str, default_out: str, presets: dict[str, str]):
    """The command line of a study: ``--preset``, ``--out``, ``--set KEY=VALUE``; the help lists
    every config key with its default (of the first preset) and meaning."""
    default = config_cls.preset(next(iter(presets)))
    docs = field_docs(config_cls)
    keys = "\n".join(
        textwrap.fill(
            f"{f.name} (default {getattr(default, f.name)!r}): {docs.get(f.name, '')}",
            width=100,
            subsequent_indent="    ",
        )
        for f in dataclasses.fields(config_cls)
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"config keys for --set (defaults of the {next(iter(presets))!r} preset):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=next(iter(presets)),
        choices=list(presets),
        help="; ".join(f"{name}: {what}" for name, what in presets.items()),
    )
    outputs = ", ".join(("config.json", *getattr(config_cls, "RUN_OUTPUTS", ())))
    parser.add_argument(
        "--out",
        default=default_out,
        help=f"run directory, resumed if it holds a run of the same config; the run writes {outputs} there "
        f"(default: {default_out})",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys (JSON values); may be given more than once",
    )
    add_compilation_cache_option(parser)
    return parser


def parse_study(parser: argparse.ArgumentParser, config_cls, argv=None):
    """``(out_dir, config)`` from a :func:`study_parser` command line, with its compilation cache
    turned on; a bad ``--out``, ``--set`` or ``--compilation-cache`` ends the program with a usage
    error (status 2) before any work or file."""
    args = parser.parse_args(argv)
    try:
        config = config_with_overrides(config_cls.preset(args.preset), args.set)
        if hasattr(config, "check_preset"):  # settings that one preset needs
            config.check_preset(args.preset)
        out_dir = check_run_directory(args.out, config)
        use_compilation_cache(args.compilation_cache)
        return out_dir, config
    except ValueError as error:
        parser.error(str(error))
