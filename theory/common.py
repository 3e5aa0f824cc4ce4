"""Fits used by the theory studies (their plumbing is :mod:`jaxrm.studies`)."""

from __future__ import annotations

import math

import jax
import numpy as np
import scipy.special
import scipy.stats

from jaxrm.studies import fmt

# A slope interval "contains" or "reaches" a value when it comes within this much of it: exact
# scalings such as t_gamma ~ 1/eps give degenerate intervals that miss -1/2 by solver rounding.
SLOPE_TOLERANCE = 0.005


def loglog_slope(x, y, *, groups=None, num_bootstrap=1000, seed=0, level=0.95, interval="bootstrap"):
    """Least-squares slope of ``log y`` on ``log x`` with a percentile bootstrap interval.

    With ``groups``, the slope is the within-group one (each group's logs are centred, as in a
    fixed-effects fit) and the bootstrap resamples whole groups. ``interval="t"`` gives instead
    the classical t-interval from the residuals (``n - 2`` degrees of freedom, no groups), the
    one to use for a handful of points, where a bootstrap has too few distinct resamples.
    ``interval="group-t"`` is the one for a handful of groups: each group's own slope (a group
    with fewer than 2 distinct ``x`` has none and is left out), and the mean of those slopes with
    its t-interval (``groups - 1`` degrees of freedom; NaN with one group). Returns ``(slope,
    (low, high))``; NaNs when fewer than 3 points are given.
    """
    log_x, log_y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if log_x.size < 3:
        return math.nan, (math.nan, math.nan)
    if interval == "group-t":
        if groups is None:
            raise ValueError("interval='group-t' needs groups.")
        groups = np.asarray(groups)
        members = [groups == g for g in np.unique(groups)]
        slopes = np.array(
            [scipy.stats.linregress(log_x[m], log_y[m]).slope for m in members if np.unique(log_x[m]).size >= 2]
        )
        mean = float(slopes.mean()) if slopes.size else math.nan
        if slopes.size < 2:
            return mean, (math.nan, math.nan)
        half = scipy.stats.t.ppf(0.5 + level / 2, slopes.size - 1) * slopes.std(ddof=1) / math.sqrt(slopes.size)
        return mean, (float(mean - half), float(mean + half))
    if interval == "t":
        if groups is not None:
            raise ValueError("interval='t' fits one line: groups are not supported.")
        fit = scipy.stats.linregress(log_x, log_y)
        half = scipy.stats.t.ppf(0.5 + level / 2, log_x.size - 2) * fit.stderr
        return float(fit.slope), (float(fit.slope - half), float(fit.slope + half))
    if interval != "bootstrap":
        raise ValueError(f"interval must be 'bootstrap', 't' or 'group-t', got {interval!r}.")
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


def unreached(status, t_end, lower=None, upper=None) -> dict:
    """How a batch's solves that did not reach the gain split, as boolean masks: ``censored``
    (``t_max`` passed, or the gain was proven out of reach) and ``failed`` (the solver stopped
    early, so the time is known only to exceed ``t_end``); with bounds (NaN where a row has
    none), ``undecided``: the failed solves that stopped below their ``lower`` or ``upper`` bound,
    which they neither meet nor break."""
    from jaxrm import flow

    status, t_end = np.asarray(status), np.asarray(t_end)
    out = {"censored": status == flow.Status.NOT_REACHED, "failed": status == flow.Status.FAILED}
    if lower is not None or upper is not None:
        with np.errstate(invalid="ignore"):
            below = [t_end < bound for bound in (lower, upper) if bound is not None]
            out["undecided"] = out["failed"] & np.logical_or.reduce(below)
    return out


def beyond_upper(t_gamma, t_end, status, upper):
    """Which times are known to exceed their ``upper`` bound: reached after it, not reached by
    ``t_max`` (censored), or failed after passing it. A solve that failed below its upper bound
    is not counted (it is undecided; :func:`unreached` with ``upper`` counts those)."""
    from jaxrm import flow

    status, t_end = np.asarray(status), np.asarray(t_end)
    with np.errstate(invalid="ignore"):
        return np.where(status == flow.Status.FAILED, t_end > upper, ~(np.asarray(t_gamma) <= upper))


def failed_text(failed: int, undecided: int) -> str:
    """The sentence on failed solves, or nothing when none failed."""
    if not failed:
        return ""
    return (
        f" {failed} solves failed before reaching the gain or `t_max` (their time is known only to exceed where "
        f"they stopped); {undecided} of them stopped below their bound, which they neither meet nor break."
    )


def censored_slopes(x, t, t_max, *, groups=None, iterations=2000, tol=1e-10, num_bootstrap=0, seed=0) -> dict:
    """Slopes of ``log t`` on ``log x`` when some times are censored: ``t = inf`` means not reached
    by ``t_max``, so the true time is above ``t_max``.

    Returns a dict with the counts ``reached`` and ``censored`` and three fits:

    - ``reached``: least squares on the reached points alone (what dropping the censored does);
    - ``at_t_max``: least squares with every censored time placed at ``t_max``. Raising a point
      lowers the slope exactly when its ``log x`` lies below the mean (of its group), so when every
      censored point does (``at_t_max_is_upper_bound``), the slope with the true times is at most
      this value;
    - ``tobit``: maximum likelihood of ``log t = a + b log x + sigma N(0, 1)`` right-censored at
      ``log t_max`` (Tobin 1958), by EM from the ``at_t_max`` fit; with ``groups``, one
      intercept per group. NaN when fewer than 3 points, and NaN when the EM has not converged
      within ``iterations`` (``tobit_converged`` False), rather than its last iterate.

    With ``num_bootstrap`` resamples (of points, or of whole groups) and some point censored,
    ``tobit_ci`` is the 95% percentile interval of the Tobit slope (each resample's EM started
    from the full fit; ``tobit_unconverged`` counts the resamples left out because theirs did
    not converge); otherwise ``tobit_ci`` is NaNs.
    """
    log_x = np.log(np.asarray(x, float))
    t = np.asarray(t, float)
    censored = ~np.isfinite(t)
    log_t = np.where(censored, math.log(t_max), np.log(np.where(censored, 1.0, t)))
    group_index = np.zeros(log_x.size, int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    out = {"reached": int((~censored).sum()), "censored": int(censored.sum()), "tobit_ci": [math.nan, math.nan]}
    if log_x.size < 3:
        return (
            {**out, "at_t_max_is_upper_bound": False}
            | dict.fromkeys(("reached_slope", "at_t_max", "tobit"), math.nan)
            | {"tobit_converged": False}
        )
    design = np.concatenate([np.eye(group_index.max() + 1)[group_index], log_x[:, None]], axis=1)
    reached_rows = ~censored
    out["reached_slope"] = (
        float(_least_squares(design[reached_rows], log_t[reached_rows])[-1]) if reached_rows.sum() >= 3 else math.nan
    )
    coef = _least_squares(design, log_t)
    out["at_t_max"] = float(coef[-1])
    group_mean = (np.bincount(group_index, log_x) / np.bincount(group_index))[group_index]
    out["at_t_max_is_upper_bound"] = bool(np.all(log_x[censored] <= group_mean[censored]))
    if not censored.any():
        out["tobit"], out["tobit_converged"] = out["at_t_max"], True
        return out
    limit = math.log(t_max)
    sigma = max(float(np.std(log_t - design @ coef)), 1e-6)
    coef, sigma, converged = _tobit(design, log_t, censored, limit, coef, sigma, iterations, tol)
    out["tobit_converged"] = converged
    out["tobit"] = float(coef[-1]) if converged else math.nan
    if num_bootstrap and converged:
        rng = np.random.default_rng(seed)
        members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)]
        clusters = members if groups is not None else [np.array([i]) for i in range(log_x.size)]
        slopes, unconverged = [], 0
        for _ in range(num_bootstrap):
            rows = np.concatenate([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))])
            # Groups drawn twice keep one intercept: the design's columns are the groups themselves.
            fit, _, ok = _tobit(design[rows], log_t[rows], censored[rows], limit, coef, sigma, iterations, 1e-8)
            if ok:
                slopes.append(fit[-1])
            unconverged += not ok
        out["tobit_ci"] = np.percentile(slopes, [2.5, 97.5]).tolist() if slopes else [math.nan, math.nan]
        out["tobit_unconverged"] = unconverged
    return out


def _least_squares(design, y):
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef


def _tobit(design, log_t, censored, limit, coef, sigma, iterations, tol):
    """EM for right-censored least squares from ``(coef, sigma)``: ``(coef, sigma, converged)``."""
    if not censored.any():  # e.g. a bootstrap resample that drew no censored point
        coef = _least_squares(design, log_t)
        return coef, max(float(np.std(log_t - design @ coef)), 1e-6), True
    converged = False
    for _ in range(iterations):  # censored values replaced by their conditional moments
        mean = design @ coef
        alpha = (limit - mean[censored]) / sigma
        ratio = _inverse_mills(alpha)
        expected = log_t.copy()
        expected[censored] = mean[censored] + sigma * ratio
        second = log_t**2
        second[censored] = sigma**2 * (1 + alpha * ratio - ratio**2) + expected[censored] ** 2
        new = _least_squares(design, expected)
        fitted = design @ new
        sigma_new = math.sqrt(max(np.mean(second - 2 * fitted * expected + fitted**2), 1e-12))
        converged = np.max(np.abs(new - coef)) < tol and abs(sigma_new - sigma) < tol
        coef, sigma = new, sigma_new
        if converged:
            break
    return coef, sigma, bool(converged)


def _inverse_mills(alpha):
    """``phi(a) / (1 - Phi(a))`` elementwise, stable for large ``a`` (where it tends to ``a``)."""
    alpha = np.asarray(alpha, float)
    survival = 0.5 * scipy.special.erfc(alpha / math.sqrt(2.0))
    density = np.exp(-0.5 * alpha**2) / math.sqrt(2.0 * math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = density / survival
    # Past a ~ 8 the ratio is a + 1/a - 2/a^3 to 1e-6 relative, and survival underflows later.
    asymptotic = alpha + 1 / alpha - 2 / alpha**3
    return np.where(alpha > 8, asymptotic, direct)


def general_policy_passage(log_probs, rm, gt, gamma, lam, *, policy, num_prompts, **options):
    """Times of one-prompt rows re-solved as problems of ``num_prompts`` prompts each under an
    autoregressive ``policy`` started at each row's distribution ``log_probs [rows, V**L]``.

    The objective has one ``lam`` per problem, so rows with ``lam = 0`` and with ``lam > 0`` are
    grouped apart, and a group takes the smallest ``lam`` of its rows (below each row's own
    limit, where a theorem's condition asks for one). Groups are filled up with copies of their
    last row, whose results are dropped. Returns ``(t_gamma [rows], lam used [rows], status
    [rows], t_end [rows])`` (:class:`jaxrm.flow.FirstPassage`'s); the flow of each prompt runs at
    speed ``1 / num_prompts`` (docs/theory.md#setting).
    """
    from jaxrm import flow

    rows = len(rm)
    groups = []
    for part in (np.flatnonzero(lam == 0), np.flatnonzero(lam > 0)):
        if len(part):
            padded = np.concatenate([part, np.repeat(part[-1:], -len(part) % num_prompts)])
            groups.append(padded.reshape(-1, num_prompts))
    groups = np.concatenate(groups)
    group_lam = lam[groups].min(-1)
    result = flow.first_passage(
        policy.logits_from_log_probs(log_probs[groups]),
        rm[groups],
        gamma[groups],
        policy=policy,
        eval_rewards=gt[groups],
        kl_coef=group_lam,
        **options,
    )
    t, used, status, t_end = np.full(rows, np.nan), np.full(rows, np.nan), np.zeros(rows, int), np.full(rows, np.nan)
    index = groups.ravel()  # a padded copy rewrites its own row's value
    t[index] = np.asarray(result.t_gamma).ravel()
    used[index] = np.repeat(group_lam, num_prompts)
    status[index] = np.asarray(result.status).ravel()
    t_end[index] = np.asarray(result.t_end).ravel()
    return t, used, status, t_end


def general_policy_arm(rows: dict, *, policy, prompts, slow, fast, slow_lower, fast_upper, tolerance, **options):
    """A theorem's one-prompt rows (``log_probs``, ``rm``, ``gt``, ``gamma``, ``lam`` and any
    fields worth saving) solved on an autoregressive ``policy``, ``prompts`` to a problem
    (:func:`general_policy_passage`; ``options`` go to the solver). Proposition A is a bound
    there, per prompt and times ``|S|`` (docs/theory.md#theorems-2-and-5), so its violations are
    counted; the tabular formulas ``slow_lower`` (for the ``slow`` rows) and ``fast_upper``
    (``fast`` rows) are only measured against. Returns ``(summary, t_gamma, lam used,
    violating rows)``."""
    from jaxrm import bounds, metrics

    time, lam, status, t_end = general_policy_passage(
        rows["log_probs"],
        rows["rm"],
        rows["gt"],
        rows["gamma"],
        rows["lam"],
        policy=policy,
        num_prompts=prompts,
        **options,
    )
    variance = np.asarray(metrics.reward_variance(rows["log_probs"], rows["rm"]))
    prop_a = prompts * bounds.proposition_a_lower_bound(
        rows["gamma"], variance, length=policy.length, jacobian_norm=policy.jacobian_norm
    )
    below_prop_a = time < (1 - tolerance) * prop_a
    split = unreached(status, t_end)
    summary = {
        "policy": f"autoregressive-tabular (V = {policy.vocab_size}, L = {policy.length})",
        "num_outputs": policy.num_outputs,
        "prompts": prompts,
        "instances": int(len(time)),
        "censored": int(split["censored"].sum()),
        "failed": int(split["failed"].sum()),
        "prop_a_violations": int(below_prop_a.sum()),
        "min_ratio_prop_a": float(np.min(time / prop_a)),
        "tabular_slow_lower": {
            "outside": int((slow & (time < (1 - tolerance) * slow_lower)).sum()),
            "min_slack": float(np.min(time[slow] / slow_lower[slow])),
        },
        "tabular_fast_upper": {
            "outside": int((fast & beyond_upper(time, t_end, status, (1 + tolerance) * fast_upper)).sum()),
            "min_slack": float(np.min(fast_upper[fast] / time[fast])),
            "largest_lam": float(lam[fast].max()),
        },
    }
    violating = violating_rows(rows | {"lam": lam, "t_gamma": time}, {"general_prop_a": below_prop_a})
    return summary, time, lam, violating


def violating_rows(rows: dict, masks: dict) -> list[dict]:
    """One JSON record per (bound, row) flagged in ``masks``: the row's every field, for replay."""
    return [
        {"bound": bound, "row": int(i), **{k: np.asarray(v[i]).tolist() for k, v in rows.items()}}
        for bound, mask in masks.items()
        for i in np.flatnonzero(mask)
    ]


def general_text(general: dict, theorem: str) -> str:
    """The general-policy arm's findings, counted (shared by Theorems 2 and 3)."""

    def held(entry, name):
        if entry["outside"] == 0:
            return f"the {name} holds on every instance (smallest slack {fmt(entry['min_slack'])})"
        return f"the {name} fails on {entry['outside']} instances (smallest slack {fmt(entry['min_slack'])})"

    prop_a = (
        f"Proposition A (per prompt, times `|S|`), which is proven there, holds on every flow (smallest ratio "
        f"{fmt(general['min_ratio_prop_a'])})"
        if general["prop_a_violations"] == 0
        else f"Proposition A (per prompt, times `|S|`) is violated on {general['prop_a_violations']} flows"
    )
    return (
        f"**General policy.** The same constructions, on new random problems with {general['num_outputs']} "
        f"outputs, each solved on an {general['policy']} policy started at its initial distribution, "
        f"{general['prompts']} prompts to a problem ({general['instances']} flows, "
        f"{general['censored']} censored at `t_max`, {general['failed']} failed solves): {prop_a}. {theorem}'s formulas, proven for tabular policies only, "
        f"measured here with `|S| = {general['prompts']}`: {held(general['tabular_slow_lower'], 'slow lower bound')}; "
        f"{held(general['tabular_fast_upper'], 'fast upper bound')}."
    )


def limit_reward(logits, rm, gt, lam) -> np.ndarray:
    """``E[r_G]`` under the policy the tabular flow tends to, per row of ``[..., Y]`` arrays (``lam``
    one per row, ``[...]``, or broadcasting to it): with
    ``lam > 0`` the tilted ``pi0 exp(r_RM / lam) / Z``; with ``lam = 0`` all the mass on the
    output of largest ``r_RM``. Among tied best outputs it goes to the one of largest initial
    logit (shared equally by exactly tied logits): outputs of equal reward keep the difference of
    their ``exp(-theta)`` along the flow (docs/theory.md#setting), so only the one whose
    ``exp(-theta)`` starts smallest can reach 0. Given an autoregressive policy's sequence
    log-probabilities as ``logits``, the same rule is only an estimate of that flow's limit (a
    target it puts out of reach is censored and counted by the studies).

    >>> limit_reward(np.zeros((1, 3)), np.array([[1.0, 0.0, 1.0]]), np.array([[0.2, 1.0, 0.6]]), np.zeros(1))
    array([0.4])
    """
    logits, rm, gt, lam = (np.asarray(x, float) for x in (logits, rm, gt, lam))
    tilted = jax.nn.softmax(logits + rm / np.where(lam > 0, lam, 1.0)[..., None], axis=-1)
    best = rm == rm.max(-1, keepdims=True)
    top = best & (logits == np.where(best, logits, -np.inf).max(-1, keepdims=True))
    greedy = np.sum(top * gt, -1) / np.sum(top, -1)
    return np.where(lam > 0, np.sum(np.asarray(tilted) * gt, -1), greedy)
