"""Runnable studies on exact tabular dynamics: ``python -m theory`` (see ``--help``)."""

from __future__ import annotations

import importlib
from pathlib import Path

# name -> (module, one-line description); run in this order. With two workers, theorem2 and
# theorem3 share one (and its compiled solver) while theorem1 runs, and tightness, the longest
# after theorem1, starts early.
STUDIES = {
    "theorem1": (
        "theory.theorem1",
        "Theorem 1/4, Proposition 3 and Proposition A at scale: t_gamma vs reward variance",
    ),
    "theorem2": ("theory.theorem2", "Theorem 2/5: slow accurate vs fast inaccurate teachers over T and accuracy"),
    "theorem3": ("theory.theorem3", "Theorem 3/6: the 2x2 table of two equally accurate teachers and two students"),
    "tightness": ("theory.tightness", "Tightness atlas: adversarial search for the fastest low-variance teachers"),
    "best_of_n": (
        "theory.best_of_n",
        "Proposition 1: exact Best-of-N against policy gradient for models of varying accuracy",
    ),
    "estimators": (
        "theory.estimators",
        "What each sampled estimator optimizes: exact gradient moments of RLOO, GRPO, KL placements; "
        "Theorem 1 under sampling (RLOO ascent against the flow)",
    ),
    "paradox": (
        "theory.paradox",
        "The accuracy paradox: Bradley-Terry reward models and their checkpoints, Table 2 in exact form",
    ),
}


# Files a study writes besides NAME.json, NAME.md, NAME_violations.json and figures/NAME.png.
_MORE_OUTPUTS = {
    "theorem1": ("theorem1_all_instances.npz",),
    "tightness": ("tightness_minimizers.json",),
    "estimators": ("figures/estimators_passage.png",),
}


def study_outputs(name: str) -> list[str]:
    """Every file study ``name`` may write into the output directory (relative paths), so that
    ``python -m theory`` can check them all before any study runs."""
    own = [f"{name}.json", f"{name}.md", f"{name}_violations.json", f"figures/{name}.png"]
    return own + list(_MORE_OUTPUTS.get(name, ()))


def run_study(name: str, out: Path, quick: bool) -> dict:
    """Run one study (also the entry point of a worker process) and return its summary."""
    import jax

    jax.config.update("jax_enable_x64", True)
    return importlib.import_module(STUDIES[name][0]).run(out, quick=quick)
