"""``python -m theory``: run the exact-dynamics studies and write a report.

Each study writes ``NAME.json`` (with ``instances`` and ``violations`` where bounds are
checked, and ``quick``), ``NAME.md`` and ``figures/NAME.png`` into ``--out``, and the instances
that violate a bound into ``NAME_violations.json`` (``theory.study_outputs`` lists every file,
all checked before any study runs); ``report.md``
collects the studies in ``--out`` that ran at the same size as this run (a ``--quick`` report says
so at the top and never lists full results, nor the other way round).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

from jaxrm.studies import add_compilation_cache_option, check_out_directory, use_compilation_cache, write_text
from theory import STUDIES, run_study, study_outputs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m theory",
        description="Exact studies of what makes a reward model a good teacher: the bounds of Razin et al. (2025) "
        "and the project's Proposition A, checked on tabular and other softmax policies, and the accuracy paradox "
        "of Chen et al. (2024) in exact form.",
        epilog="Writes report.md into --out and, per study, NAME.json, NAME.md, figures/NAME.png (a few studies "
        "write more: theory.study_outputs lists every path, all checked before any study runs) and "
        "NAME_violations.json when a bound is violated. "
        "Exit status 1 when any bound is violated (the instances are saved beside the study's JSON), "
        "2 for a usage error, 3 when a study raised an error (named on stderr and in report.md; the others "
        "still run and are reported, and the stderr line also counts their violations). The statements, constants and proofs checked: docs/theory.md.",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=sorted(STUDIES), help="run only these studies (see --list)"
    )
    parser.add_argument("--out", default="results/theory", help="output directory (default: results/theory)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small instance counts: a smoke test of every study, not results; compiled with XLA's backend "
        f"optimizations off ({QUICK_XLA_FLAG}, unless XLA_FLAGS sets that level), since a quick run is mostly compiling",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 4),
        help="studies run side by side in their own processes (default: the CPU count, at most 4; "
        "1 runs them one after the other in this process). Most of a quick run is compiling, "
        "one core per program.",
    )
    add_compilation_cache_option(parser)
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    return parser


QUICK_XLA_FLAG = "--xla_backend_optimization_level=0"


@contextlib.contextmanager
def _quick_compiles(quick: bool):
    """For a quick run, XLA_FLAGS with the backend optimizations off while the studies run (and
    in the processes they run in), then as before. A quick run is mostly compiling, and its small
    programs gain less run time from the optimizations than they cost to compile: about 67 s
    against 49 s for the whole quick run on 2 CPU cores. XLA reads the flags when a process first
    computes, so an interpreter that already has computed keeps its own."""
    previous = os.environ.get("XLA_FLAGS")
    if quick and "xla_backend_optimization_level" not in (previous or ""):
        os.environ["XLA_FLAGS"] = f"{previous} {QUICK_XLA_FLAG}" if previous else QUICK_XLA_FLAG
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = previous


def _report(out: Path, names: list[str], *, quick: bool, failed: dict | None = None) -> str:
    """``report.md``: the studies of ``names`` found in ``out`` that ran with the same ``quick``,
    less those that ``failed`` in this run (name: error), which are named instead."""
    failed = failed or {}
    found = {
        n: json.loads((out / f"{n}.json").read_text())
        for n in names
        if n not in failed and (out / f"{n}.json").exists()
    }
    same = [n for n, summary in found.items() if summary.get("quick", False) == quick]
    other = [n for n in found if n not in same]
    lines = ["# jaxrm theory report", ""]
    if quick:
        lines += ["**Quick run** (`--quick`): small instance counts, a smoke test of the code, not results.", ""]
    if failed:
        listed = "; ".join(f"{n} ({type(e).__name__}: {e})" for n, e in failed.items())
        lines += [f"**Failed in this run**, left out of this report: {listed}.", ""]
    if other:
        lines += [
            f"Left out: {', '.join(other)} (from a {'full' if quick else 'quick'} run in the same directory).",
            "",
        ]
    for name in same:
        lines.append(f"- **{name}** ({found[name]['seconds']} s): {found[name]['verdict']}.")
    lines.append("")
    for name in same:
        lines += [(out / f"{name}.md").read_text(), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, description) in STUDIES.items():
            print(f"{name:12s} {description}")
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}.")
    names = list(dict.fromkeys(args.only or STUDIES))  # a study named twice runs once
    outputs = ["report.md"] + [path for name in names for path in study_outputs(name)]
    try:
        out = check_out_directory(args.out, files=outputs)
    except ValueError as error:
        parser.error(str(error))
    try:
        use_compilation_cache(args.compilation_cache)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    with _quick_compiles(args.quick):
        summaries, failed = _run_studies(names, out, args.quick, jobs=min(args.jobs, len(names)))
    violations = sum(sum(summary["violations"].values()) for summary in summaries.values())
    write_text(out / "report.md", _report(out, list(STUDIES), quick=args.quick, failed=failed))
    print(
        f"wrote {out / 'report.md'} in {time.perf_counter() - start:.0f} s; {violations} bound violation(s)"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        file=sys.stderr,
    )
    return 3 if failed else 1 if violations else 0


def _run_studies(names: list[str], out: Path, quick: bool, *, jobs: int) -> tuple[dict, dict]:
    """The summaries of the studies that finished, and the error of each that raised (its
    traceback printed); one study's error does not stop the others."""
    summaries, failed = {}, {}

    def collect(name, result):
        try:
            summaries[name] = result()
        except Exception as error:  # noqa: BLE001 -- reported, and the run exits with status 3
            traceback.print_exception(error, file=sys.stderr)
            failed[name] = error

    if jobs == 1:
        for name in names:
            collect(name, lambda name=name: run_study(name, out, quick))
    else:
        # Fresh interpreters: a forked process would inherit jax's threads.
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
            futures = {name: pool.submit(run_study, name, out, quick) for name in names}
            for name, future in futures.items():
                collect(name, future.result)
    return summaries, failed


if __name__ == "__main__":
    sys.exit(main())
