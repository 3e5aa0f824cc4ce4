"""``python -m theory``: run the exact-dynamics studies and write a report.

Each study writes ``NAME.json`` (with ``instances`` and ``violations`` where bounds are
checked, and ``quick``), ``NAME.md`` and ``figures/NAME.png`` into ``--out``; ``report.md``
collects the studies in ``--out`` that ran at the same size as this run (a ``--quick`` report says
so at the top and never lists full results, nor the other way round).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import jax

from jaxrm.studies import check_out_directory, write_text

# name -> (module, one-line description); run in this order.
STUDIES = {
    "theorem1": (
        "theory.theorem1",
        "Theorem 1/4, Proposition 3 and Proposition A at scale: t_gamma vs reward variance",
    ),
    "theorem2": ("theory.theorem2", "Theorem 2/5: slow accurate vs fast inaccurate teachers over T and accuracy"),
    "theorem3": ("theory.theorem3", "Theorem 3/6: the 2x2 table of two equally accurate teachers and two students"),
    "best_of_n": (
        "theory.best_of_n",
        "Proposition 1: exact Best-of-N against policy gradient for models of varying accuracy",
    ),
    "tightness": ("theory.tightness", "Tightness atlas: adversarial search for the fastest low-variance teachers"),
    "paradox": (
        "theory.paradox",
        "The accuracy paradox: Bradley-Terry reward models and their checkpoints, Table 2 in exact form",
    ),
}


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
        "--quick", action="store_true", help="small instance counts: a smoke test of every study, not results"
    )
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    return parser


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
    jax.config.update("jax_enable_x64", True)
    names = args.only or list(STUDIES)
    start = time.perf_counter()
    violations = 0
    for name in names:
        module = importlib.import_module(STUDIES[name][0])
        summary = module.run(out, quick=args.quick)
        violations += sum(summary["violations"].values())
    write_text(out / "report.md", _report(out, list(STUDIES), quick=args.quick))
    print(
        f"wrote {out / 'report.md'} in {time.perf_counter() - start:.0f} s; {violations} bound violation(s)",
        file=sys.stderr,
    )
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
