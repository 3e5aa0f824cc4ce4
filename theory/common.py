"""Fits used by the theory studies (their plumbing is :mod:`jaxrm.studies`)."""

from __future__ import annotations

import math

import numpy as np


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
