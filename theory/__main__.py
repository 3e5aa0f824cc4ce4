"""``python -m theory``: run the exact-dynamics studies and write a report.

Each study writes ``NAME.json`` (with ``instances`` and ``violations`` where bounds are
checked, and ``quick``), ``NAME.md`` and ``figures/NAME.png`` into ``--out``; ``report.md``
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
from pathlib import Path

from jaxrm.studies import add_compilation_cache_option, check_out_directory, use_compilation_cache, write_text
from theory import STUDIES, run_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m theory",
        description="Exact tabular studies of what makes a reward model a good teacher (Razin et al. 2025).",
        epilog="Exit status 1 when any bound is violated (the instances are saved beside the study's JSON). "
        "The statements, constants and proofs checked: docs/theory.md.",
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


def _report(out: Path, names: list[str], *, quick: bool) -> str:
    """``report.md``: the studies of ``names`` found in ``out`` that ran with the same ``quick``."""
    found = {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").exists()}
    same = [n for n, summary in found.items() if summary.get("quick", False) == quick]
    other = [n for n in found if n not in same]
    lines = ["# jaxrm theory report", ""]
    if quick:
        lines += ["**Quick run** (`--quick`): small instance counts, a smoke test of the code, not results.", ""]
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
    try:
        out = check_out_directory(args.out)
    except ValueError as error:
        parser.error(str(error))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}.")
    try:
        use_compilation_cache(args.compilation_cache)
    except ValueError as error:
        parser.error(str(error))
    names = args.only or list(STUDIES)
    start = time.perf_counter()
    jobs = min(args.jobs, len(names))
    with _quick_compiles(args.quick):
        if jobs == 1:
            summaries = [run_study(name, out, args.quick) for name in names]
        else:
            # Fresh interpreters: a forked process would inherit jax's threads.
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
                summaries = list(pool.map(run_study, names, [out] * len(names), [args.quick] * len(names)))
    violations = sum(sum(summary["violations"].values()) for summary in summaries)
    write_text(out / "report.md", _report(out, list(STUDIES), quick=args.quick))
    print(
        f"wrote {out / 'report.md'} in {time.perf_counter() - start:.0f} s; {violations} bound violation(s)",
        file=sys.stderr,
    )
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
