"""How often the teacher study's correlation intervals exclude 0 when there is no relation.

The teacher study (``python -m experiments.teacher``) correlates properties of 20 learned reward
models that are 2 saves (after 1 and 4 epochs) of 10 training runs, 2 runs per on-policy share.
Its intervals resample whole runs (:func:`jaxrm.studies.correlations` with ``clusters``). This
script simulates data sets of that design with no relation, in two settings, and counts the 95%
intervals that exclude 0, for the run-resampling intervals and for intervals that resample the
models one by one:

- **trend**: a property against the on-policy share, where longer training raises the property
  by ``--epoch-gain`` and each run has its own offset (normal, sd ``run_sd``) and each save its
  own noise (sd ``save_sd``), for several ``(run_sd, save_sd)``;
- **table 2**: a property against a gain measured on 5 seeds, each with independent run effects
  (sd 1) and save noise (sd 0.3), the seeds' noise sd 0.5.

A calibrated interval excludes 0 in about 5% of the data sets.

Run from the repository root: ``python -m experiments.interval_calibration [--help]``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from jaxrm.studies import correlations

SHARES = np.repeat([1.0, 0.75, 0.5, 0.25, 0.0], 4)  # 5 shares x 2 runs x 2 saves
RUN_OF = np.repeat(np.arange(10), 2)
LONGER = np.tile([0.0, 1.0], 10)  # the save after 4 epochs
TREND_SETTINGS = ((0.03, 0.02), (0.01, 0.03), (0.05, 0.01))  # (run_sd, save_sd)


def trend_data(rng, *, run_sd: float, save_sd: float, epoch_gain: float):
    """A property of the 20 models with no trend over the share: ``(x, outcome)``."""
    runs = rng.normal(0.0, run_sd, 10)[RUN_OF]
    return SHARES, epoch_gain * LONGER + runs + rng.normal(0.0, save_sd, 20)


def table2_data(rng):
    """A property and a gain on 5 seeds, unrelated but each shared within a run: ``(x, outcome)``."""
    x = rng.normal(0.0, 1.0, 10)[RUN_OF] + rng.normal(0.0, 0.3, 20)
    gain = rng.normal(0.0, 1.0, 10)[RUN_OF] + rng.normal(0.0, 0.3, 20)
    return x, gain[:, None] + rng.normal(0.0, 0.5, (20, 5))


def false_positive_rates(make, *, datasets: int, resamples: int, seed: int) -> dict[str, float]:
    """Share of ``datasets`` simulated by ``make(rng)`` whose 95% Spearman interval excludes 0,
    resampling whole runs (``runs``) and resampling the models one by one (``models``)."""
    rng = np.random.default_rng(seed)
    excluded = {"runs": 0, "models": 0}
    for index in range(datasets):
        x, outcome = make(rng)
        for kind, clusters in (("runs", RUN_OF), ("models", None)):
            _, low, high = correlations(x, outcome, seed=index, num_resamples=resamples, clusters=clusters)["spearman"]
            excluded[kind] += bool(low > 0 or high < 0)
    return {kind: count / datasets for kind, count in excluded.items()}


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.interval_calibration",
        description=__doc__.split("\n\n")[0] + " It prints the shares and writes no file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--datasets", type=int, default=300, help="simulated data sets per setting")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per interval")
    parser.add_argument("--epoch-gain", type=float, default=0.1, help="what longer training adds to the property")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the simulated data sets (>= 0); data set i resamples with seed i"
    )
    args = parser.parse_args(argv)
    for name in ("datasets", "resamples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not math.isfinite(args.epoch_gain):
        parser.error(f"--epoch-gain must be a finite number, got {args.epoch_gain}.")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}.")
    options = dict(datasets=args.datasets, resamples=args.resamples, seed=args.seed)
    rates = {}
    for run_sd, save_sd in TREND_SETTINGS:
        name = f"trend, run sd {run_sd:g}, save sd {save_sd:g}"
        rates[name] = false_positive_rates(
            lambda rng, run_sd=run_sd, save_sd=save_sd: trend_data(
                rng, run_sd=run_sd, save_sd=save_sd, epoch_gain=args.epoch_gain
            ),
            **options,
        )
        print(f"{name}: {rates[name]}", flush=True)
    rates["table 2"] = false_positive_rates(table2_data, **options)
    print(f"table 2: {rates['table 2']}", flush=True)
    print(f"(shares of {args.datasets} data sets whose 95% interval excludes 0; calibrated: about 0.05)")
    return rates


if __name__ == "__main__":
    main()
