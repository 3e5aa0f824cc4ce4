"""Theorem 2 / 5 of Razin et al.: a more accurate reward model is not necessarily a better teacher.

For random initial policies and ground truths (tabular, one prompt), with ``y_g`` the best
output and ``gamma`` a random share of the gain it offers, two kinds of teacher are built:

- **slow**: values in ``(0, 1/T)`` ordered like ``r_G`` (accuracy 1), so ``Var <= 1/T^2``;
  Theorem 2 says ``t_gamma(r_G) >= 2 |S| (1 - e^(-gamma/2)) T``.
- **fast**: ``1`` on ``y_g`` and values below ``pi0(y_g)`` elsewhere, ordered *against* ``r_G``
  (accuracy ``2/|Y|``); Theorem 2 says ``t_gamma(r_G) <= 4 |S| / (1 - rho)^4 (1/pi0(y_g) - 1/rho)``
  for ``lam`` up to an explicit limit.

Theorem 5's form: the same bounds hold at any accuracy, so each teacher is also built with a
share of its order shuffled (intermediate accuracies). Every teacher is run with ``lam = 0`` and
with ``lam`` at the limit of the fast bound; ``t_gamma`` on ``r_G`` comes from the exact flow.

The general-policy arm (:func:`general_arm`) runs the unshuffled teachers on an
autoregressive-tabular policy with several prompts per problem: Proposition A is a bound there,
and the tabular formulas are measured, since [R] proves them for tabular policies only.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from jaxrm import bounds, flow, metrics
from jaxrm.studies import (
    POSITIVE_INT,
    SMALL_TOLERANCE,
    Progress,
    StudyConfig,
    checked,
    cluster_bootstrap,
    distinct,
    finish_study,
    fmt,
    fmt_share,
    increasing,
    int_at_least,
    pyplot,
    save_figure,
    save_violations,
    share_interval,
)
from jaxrm.tabular import AutoregressiveTabularPolicy
from theory.common import (
    beyond_upper,
    failed_text,
    general_policy_arm,
    general_text,
    limit_reward,
    unreached,
    violating_rows,
)

NAME = "theorem2"


@dataclasses.dataclass(frozen=True)
class Theorem2Config(StudyConfig):
    """Sizes, grids and solver settings of the Theorem 2 / 5 study
    (docs/theory.md#theorems-2-and-5); the teachers are described in the module docstring.
    Fields with a range are checked on construction.

    Attributes:
      seed: seed of the random policies, ground truths, gains and order shuffles.
      problems: random one-prompt problems (initial policy and ground truth), an int >= 1.
      num_outputs: ``|Y|`` (an int >= 3).
      horizons: the values of ``T`` of the slow teachers, whose values lie in ``(0, 1/T)`` (a
        tuple of at least two values >= 1).
      shuffled: fractions in ``[0, 1]`` of each teacher's order that is randomly permuted
        (Theorem 5's intermediate accuracies); 0 gives Theorem 2's own teachers (accuracy 1 and
        ``2/|Y|``), which the summary tables read, so it belongs in the tuple.
      rtol: relative tolerance of the adaptive ODE solver.
      atol: absolute tolerance of the adaptive ODE solver.
      t_max: flow time after which a gain counts as not reached (``t_gamma = inf``).
      tolerance: relative slack in ``[0, 0.1)``: a slow teacher violates its lower bound when
        ``t_gamma < (1 - tolerance) * bound``, a fast one its upper bound unless
        ``t_gamma <= (1 + tolerance) * bound`` (an infinite time violates it).
      general_problems: one-prompt problems of the general-policy arm (an int >= 1): the same
        teachers (unshuffled) on an autoregressive-tabular policy, started at the same
        distribution, solved ``general_prompts`` prompts to a problem.
      general_prompts: ``|S|``, prompts per problem of the general-policy arm (an int >= 1).
      general_vocab: ``V`` of the general-policy arm's policy (an int >= 2).
      general_length: ``L`` of the general-policy arm's policy (an int >= 2); ``|Y| = V^L``.
    """

    seed: int = 0
    problems: int = checked(128, POSITIVE_INT)
    num_outputs: int = checked(12, int_at_least(3))
    horizons: tuple[float, ...] = checked(
        (1, 10, 100, 1000, 10000),
        increasing((lambda v: len(v) >= 2 and all(t >= 1 for t in v), "a tuple of at least two T >= 1")),
    )
    shuffled: tuple[float, ...] = checked(
        (0.0, 0.35, 0.7, 1.0),
        distinct((lambda v: 0.0 in v and all(0 <= f <= 1 for f in v), "fractions in [0, 1], 0 among them")),
    )
    rtol: float = 1e-8
    atol: float = 1e-10
    t_max: float = 1e14
    tolerance: float = checked(1e-6, SMALL_TOLERANCE)
    general_problems: int = checked(64, POSITIVE_INT)
    general_prompts: int = checked(4, POSITIVE_INT)
    general_vocab: int = checked(3, int_at_least(2))
    general_length: int = checked(2, int_at_least(2))

    def quick(self) -> "Theorem2Config":
        # 4 x 48 rows = 192 flows, the count of theorem3's quick run: in one worker process the
        # second study reuses the first one's compiled solver.
        return dataclasses.replace(self, problems=4, general_problems=8)


def _partial_shuffle(scores, fraction, rng):
    """Ranks of ``scores`` with the ranks of a random ``fraction`` of the entries permuted."""
    ranks = np.argsort(np.argsort(scores))
    chosen = rng.choice(len(scores), size=int(round(fraction * len(scores))), replace=False)
    ranks[chosen] = rng.permutation(ranks[chosen])
    return ranks


def make_teachers(config: Theorem2Config):
    """Initial policies, ground truths and every teacher, stacked as independent problems."""
    rng = np.random.default_rng(config.seed)
    n, y = config.problems, config.num_outputs
    logits = rng.uniform(0.3, 1.5, (n, 1)) * rng.normal(size=(n, y))
    gt = rng.uniform(-1.0, 1.0, (n, y))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    good = gt.argmax(-1)
    start = (probs * gt).sum(-1)
    gamma = rng.uniform(0.2, 0.8, n) * (gt.max(-1) - start)
    good_prob = probs[np.arange(n), good]
    rho = bounds.theorem2_rho(start, gamma, gt.max(-1))
    kl_limit = bounds.theorem2_kl_limit(good_prob, rho, probs.min(-1))

    rows = []  # one row per (problem, teacher, lam)
    for i in range(n):
        others = np.flatnonzero(np.arange(y) != good[i])
        for fraction in config.shuffled:
            ranks = _partial_shuffle(gt[i], fraction, rng)
            for horizon in config.horizons:
                slow = (ranks + 1.0) / (y + 1.0) / horizon  # in (0, 1/T), ordered like r_G before shuffling
                rows += [
                    dict(problem=i, kind="slow", horizon=horizon, fraction=fraction, rm=slow, lam=lam)
                    for lam in (0.0, kl_limit[i])
                ]
            # Fast: c_y < pi0(y_g), ordered against r_G among the other outputs before shuffling.
            against = _partial_shuffle(-gt[i, others], fraction, rng)
            fast = np.ones(y)
            fast[others] = good_prob[i] * (against + 1.0) / (len(others) + 1.0)
            rows += [
                dict(problem=i, kind="fast", horizon=math.nan, fraction=fraction, rm=fast, lam=lam)
                for lam in (0.0, kl_limit[i])
            ]
    problem = np.array([r["problem"] for r in rows])
    return dict(
        logits=logits[problem],
        gt=gt[problem],
        rm=np.stack([r["rm"] for r in rows]),
        lam=np.array([r["lam"] for r in rows]),
        gamma=gamma[problem],
        rho=rho[problem],
        good_prob=good_prob[problem],
        kind=np.array([r["kind"] for r in rows]),
        horizon=np.array([r["horizon"] for r in rows]),
        fraction=np.array([r["fraction"] for r in rows]),
        problem=problem,
    )


def general_arm(config: Theorem2Config) -> tuple[dict, list]:
    """Theorem 2's unshuffled teachers on an autoregressive-tabular policy with several prompts
    (docs/theory.md#theorems-2-and-5). Proposition A's consequence is proven there and counted as
    a bound; Theorem 2's tabular formulas (with ``|S|``) are measured against, not assumed.
    Returns the arm's summary and its rows that violate Proposition A."""
    policy = AutoregressiveTabularPolicy(config.general_vocab, config.general_length)
    arm = dataclasses.replace(
        config, problems=config.general_problems, num_outputs=policy.num_outputs, shuffled=(0.0,), seed=config.seed + 1
    )
    t = make_teachers(arm)
    slow, fast = t["kind"] == "slow", t["kind"] == "fast"
    rows = {k: t[k] for k in ("rm", "gt", "gamma", "lam", "rho", "kind", "horizon")}
    summary, time, _, violating = general_policy_arm(
        rows | {"log_probs": np.asarray(jax.nn.log_softmax(t["logits"], axis=-1))},
        policy=policy,
        prompts=config.general_prompts,
        slow=slow,
        fast=fast,
        slow_lower=bounds.theorem2_slow_lower_bound(
            t["gamma"], np.where(slow, t["horizon"], 1.0), num_prompts=config.general_prompts
        ),
        fast_upper=bounds.theorem2_fast_upper_bound(t["rho"], t["good_prob"], num_prompts=config.general_prompts),
        tolerance=config.tolerance,
        rtol=config.rtol,
        atol=config.atol,
        t_max=config.t_max,
    )
    summary.update(_fast_beats_accurate_slow(t, time, config.horizons))
    return summary, violating


def _fast_beats_accurate_slow(t: dict, time: np.ndarray, horizons) -> dict:
    """Per ``T``, over the problems (one pair each: the unshuffled teachers, without KL), on how
    many the fast teacher reaches the gain before the accurate slow one (a slow teacher that never
    reaches it loses): ``fast_beats_accurate_slow_counts`` ``[wins, problems]`` and
    ``fast_beats_accurate_slow`` the share."""
    exact = (t["fraction"] == 0) & (t["lam"] == 0)
    fast = time[exact & (t["kind"] == "fast")]
    counts = {
        str(h): [int(np.sum(fast < time[exact & (t["kind"] == "slow") & (t["horizon"] == h)])), len(fast)]
        for h in horizons
    }
    return {
        "fast_beats_accurate_slow": {h: wins / problems for h, (wins, problems) in counts.items()},
        "fast_beats_accurate_slow_counts": counts,
    }


def run(out_dir: Path, *, quick: bool = False, config: Theorem2Config | None = None) -> dict:
    config = Theorem2Config.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    t = make_teachers(config)
    progress(f"{config.problems} problems x {len(t['kind']) // config.problems} teachers")
    result = flow.first_passage(
        t["logits"][:, None],
        t["rm"][:, None],
        t["gamma"][:, None],
        eval_rewards=t["gt"][:, None],
        kl_coef=t["lam"],
        rtol=config.rtol,
        atol=config.atol,
        t_max=config.t_max,
    )
    time = np.asarray(result.t_gamma)[:, 0]
    accuracy = np.asarray(metrics.accuracy(t["rm"], t["gt"]))
    variance = np.asarray(metrics.reward_variance(t["logits"], t["rm"]))
    slow, fast = t["kind"] == "slow", t["kind"] == "fast"
    # Each bound applies to its own kind of teacher; the other rows carry NaN placeholders.
    lower, upper = np.full(len(time), np.nan), np.full(len(time), np.nan)
    lower[slow] = bounds.theorem2_slow_lower_bound(t["gamma"][slow], t["horizon"][slow], num_prompts=1)
    upper[fast] = bounds.theorem2_fast_upper_bound(t["rho"][fast], t["good_prob"][fast], num_prompts=1)
    with np.errstate(invalid="ignore"):
        slow_bad = slow & (time < (1 - config.tolerance) * lower)
        status, t_end = np.asarray(result.status)[:, 0], np.asarray(result.t_end)[:, 0]
        fast_bad = fast & beyond_upper(time, t_end, status, (1 + config.tolerance) * upper)
    progress(f"solved {len(time)} flows; violations: slow {int(slow_bad.sum())}, fast {int(fast_bad.sum())}")

    # A target not reached by t_max is censored if the flow's limit policy offers the gain, and
    # unattainable otherwise.
    start = np.asarray(metrics.expected_reward(t["logits"], t["gt"]))
    attainable = limit_reward(t["logits"], t["rm"], t["gt"], t["lam"]) - start >= t["gamma"]
    split = unreached(status, t_end, lower=lower, upper=upper)  # each NaN where its kind is not
    stopped = split["censored"]  # failed solves are counted apart

    def unreached_counts(kind):
        return {
            "censored": int((kind & stopped & attainable).sum()),
            "unattainable": int((kind & stopped & ~attainable).sum()),
            "unattainable_unshuffled": int((kind & stopped & ~attainable & (t["fraction"] == 0)).sum()),
            "unattainable_with_kl": int((kind & stopped & ~attainable & (t["lam"] > 0)).sum()),
            "failed": int((kind & split["failed"]).sum()),
        }

    exact_order = t["fraction"] == 0  # Theorem 2's own teachers: accuracy 1 and 2/|Y|
    by_horizon = {}
    for horizon in config.horizons:
        chosen = slow & exact_order & (t["horizon"] == horizon)
        by_horizon[str(horizon)] = {
            "slow_median_t": float(np.median(time[chosen])),
            "slow_median_bound": float(np.median(lower[chosen])),
            "max_variance": float(variance[chosen].max()),
        }
    general, general_violating = general_arm(config)
    progress(
        f"general-policy arm: {general['instances']} flows ({general['policy']}, |S| = {general['prompts']}), "
        f"Proposition A violations {general['prop_a_violations']}"
    )
    faster = _fast_beats_accurate_slow(t, time, config.horizons)
    last = str(config.horizons[-1])
    summary = {
        "instances": int(len(time)),
        "violations": {
            "slow_lower": int(slow_bad.sum()),
            "fast_upper": int(fast_bad.sum()),
            "general_prop_a": general["prop_a_violations"],
        },
        "min_slack": {
            "slow_lower": float(np.min(time[slow] / lower[slow])),
            "fast_upper": float(np.min(upper[fast] / time[fast])),
        },
        "accuracy": {
            "slow": [float(accuracy[slow].min()), float(accuracy[slow].max())],
            "fast": [float(accuracy[fast].min()), float(accuracy[fast].max())],
        },
        "fast_median_t": float(np.median(time[fast & exact_order])),
        "fast_median_bound": float(np.median(upper[fast & exact_order])),
        "censored": int((stopped & attainable).sum()),
        "unattainable": int((stopped & ~attainable).sum()),
        "failed": int(split["failed"].sum()),
        "undecided": int(split["undecided"].sum()),
        "not_reached": {"slow": unreached_counts(slow), "fast": unreached_counts(fast)},
        "by_horizon": by_horizon,
        "slow_growth": _median_growth(t, time, slow & exact_order, config.horizons, seed=config.seed),
        **faster,
        "general_policy": general,
        "config": dataclasses.asdict(config),
    }
    _figure(t, time, lower, upper, accuracy, config, out_dir / "figures" / f"{NAME}.png")
    summary["verdict"] = (
        f"{summary['instances']} flows; violations slow bound {summary['violations']['slow_lower']}, fast bound "
        f"{summary['violations']['fast_upper']}; smallest slack {fmt(summary['min_slack']['slow_lower'])} and "
        f"{fmt(summary['min_slack']['fast_upper'])}; {summary['censored']} censored at t_max, {summary['failed']} failed solves, "
        f"{summary['unattainable']} that cannot reach the gain (their limit offers less); the inaccurate teacher wins on "
        f"{fmt_share(*faster['fast_beats_accurate_slow_counts'][last], 'problems')} at T = {last}; general-policy arm "
        f"({general['policy']}, |S| = {general['prompts']}): Proposition A violations {general['prop_a_violations']}"
    )
    rows = {k: t[k] for k in ("logits", "rm", "gt", "gamma", "rho", "kind", "horizon", "fraction", "lam")}
    violating = violating_rows(rows | {"t_gamma": time}, {"slow_lower": slow_bad, "fast_upper": fast_bad})
    save_violations(out_dir, NAME, violating + general_violating, progress=progress)
    return finish_study(out_dir, NAME, summary, _markdown(summary, config), progress=progress, quick=quick)


def _figure(t, time, lower, upper, accuracy, config, path: Path):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    exact_order = t["fraction"] == 0
    slow, fast = (t["kind"] == "slow") & exact_order, (t["kind"] == "fast") & exact_order
    horizons = np.array(config.horizons, float)
    # An unreached time is drawn at t_max: percentiles that involve it are lower bounds, and finite.
    bounded = np.minimum(time, config.t_max)

    def unreached(mask):
        count = int((mask & ~np.isfinite(time)).sum())
        return f" ({count} unreached, drawn at t_max)" if count else ""

    bands = np.array([np.percentile(bounded[slow & (t["horizon"] == h)], [10, 50, 90]) for h in horizons])
    left.fill_between(horizons, bands[:, 0], bands[:, 2], alpha=0.3, color="C0")
    left.loglog(
        horizons,
        bands[:, 1],
        "o-",
        color="C0",
        label="slow accurate teacher (values < 1/T), median and 10-90%" + unreached(slow),
    )
    low = np.array([np.median(lower[slow & (t["horizon"] == h)]) for h in horizons])
    left.loglog(horizons, low, "C0--", label="Theorem 2 lower bound (median)")
    fast_band = np.percentile(bounded[fast], [10, 50, 90])
    left.fill_between(horizons, fast_band[0], fast_band[2], alpha=0.3, color="C3")
    left.loglog(
        horizons,
        np.full_like(horizons, fast_band[1]),
        "s-",
        color="C3",
        label="fast inaccurate teacher (no T), median and 10-90%" + unreached(fast),
    )
    left.loglog(
        horizons, np.full_like(horizons, np.median(upper[fast])), "C3--", label="Theorem 2 upper bound (median)"
    )
    left.set(xlabel="T", ylabel="t_gamma on r_G", title="accuracy 1 (slow) against accuracy 2/|Y| (fast)")
    left.legend(fontsize=7)
    slow, fast = t["kind"] == "slow", t["kind"] == "fast"
    shown = config.horizons[len(config.horizons) // 2]
    for kind, color, mask in ((f"slow, T = {shown}", "C0", slow & (t["horizon"] == shown)), ("fast", "C3", fast)):
        reached = mask & np.isfinite(time)
        unreached = int((mask & ~reached).sum())
        label = kind + (f" ({unreached} unreached, not shown)" if unreached else "")
        right.semilogy(accuracy[reached], time[reached], ".", color=color, alpha=0.5, label=label)
    right.set(
        xlabel="reward-model accuracy (all pairs)",
        ylabel="t_gamma on r_G (reached)",
        title="every accuracy, orders partly shuffled (Theorem 5)",
    )
    right.legend()
    save_figure(fig, path)


def _median_growth(t: dict, time, accurate_slow, horizons, *, seed: int, num_resamples: int = 1000) -> dict:
    """Log-log slope of the ``accurate_slow`` teachers' median ``t_gamma`` against ``T`` (the
    table's medians; an unreached teacher counts as slower than any other), with a 95%
    percentile-bootstrap interval that resamples whole problems. NaN where fewer than two
    medians are finite."""
    table = np.stack([time[accurate_slow & (t["horizon"] == h)] for h in horizons])  # [T, rows in problem order]
    problem = t["problem"][accurate_slow & (t["horizon"] == horizons[0])]
    log_horizons = np.log(np.asarray(horizons, float))

    def slope(rows):
        log_medians = np.log(np.median(table[:, rows], axis=1))
        finite = np.isfinite(log_medians)
        return np.polyfit(log_horizons[finite], log_medians[finite], 1)[0] if finite.sum() >= 2 else np.nan

    estimate, low, high = cluster_bootstrap(slope, problem, seed=seed, num_resamples=num_resamples)
    return {"slope": estimate, "ci": [low, high]}


def _growth_text(summary: dict) -> str:
    """How the accurate slow teacher's median time grows with ``T`` (:func:`_median_growth`)."""
    growth = summary["slow_growth"]
    if not np.isfinite(growth["slope"]):
        return "Too few slow teachers reached the gain to tell how their time grows with `T`."
    low, high = growth["ci"]
    return (
        f"The accurate teacher's median time grows like `T^{growth['slope']:.3f}` [95% CI {low:.3f}, {high:.3f}] "
        "over these `T` (log-log slope of the medians, resampling problems; its variance is at most `1/T^2`)."
    )


def _unreached_text(summary: dict) -> str:
    """Who did not reach the gain and why, counted."""
    parts = []
    for kind in ("slow", "fast"):
        c = summary["not_reached"][kind]
        if c["censored"] + c["unattainable"] == 0:
            parts.append(f"Every {kind} teacher reached the gain.")
            continue
        parts.append(
            f"{c['censored'] + c['unattainable']} {kind} teachers did not reach the gain: {c['unattainable']} cannot "
            f"(the flow's limit offers less than `gamma`; {c['unattainable_unshuffled']} of them have unshuffled "
            f"orders and {c['unattainable_with_kl']} a KL penalty), {c['censored']} could but were censored at "
            "`t_max`."
        )
    return " ".join(parts) + failed_text(summary["failed"], summary["undecided"])


def _wins_text(counts: dict) -> str:
    """From which ``T`` on the least accurate teacher wins on at least 95% of the problems at
    every larger ``T`` too, and its fewest wins there with their interval; ``counts`` as in
    :func:`_fast_beats_accurate_slow`."""
    horizons = list(counts)
    share = lambda h: counts[h][0] / counts[h][1]  # noqa: E731
    first = next((i for i in range(len(horizons)) if all(share(h) >= 0.95 for h in horizons[i:])), None)
    if first is None:
        return (
            f"at `T = {horizons[-1]}` the least accurate model is the better teacher on "
            f"{fmt_share(*counts[horizons[-1]], 'problems')}, short of 95%"
        )
    fewest = min(horizons[first:], key=share)
    return (
        f"from `T = {horizons[first]}` on, the least accurate model is the better teacher on at least "
        f"{fmt_share(*counts[fewest], 'problems')} at every `T` (that `T` and the fewest wins are picked from "
        "these shares, so the interval is one `T`'s, not a joint one)"
    )


def _markdown(summary: dict, config: Theorem2Config) -> str:
    v, s = summary["violations"], summary["min_slack"]
    acc = summary["accuracy"]
    counts = summary["fast_beats_accurate_slow_counts"]
    rows = "\n".join(
        f"| {h} | {fmt(d['slow_median_t'])} | {fmt(d['slow_median_bound'])} | {fmt(summary['fast_median_t'])} | "
        f"{fmt(counts[h][0] / counts[h][1])} [{', '.join(fmt(x) for x in share_interval(*counts[h]))}] |"
        for h, d in summary["by_horizon"].items()
    )
    return f"""## Theorem 2 / 5: more accurate is not necessarily a better teacher

**Verdict:** {summary["instances"]} exact flows ({config.problems} policies), violations: slow lower bound {v["slow_lower"]}, fast upper bound {v["fast_upper"]}. Smallest slack: slow {fmt(s["slow_lower"])} (time over bound), fast {fmt(s["fast_upper"])} (bound over time).

Slow teachers have accuracy {acc["slow"][0]:.2f} to {acc["slow"][1]:.2f}, fast teachers {acc["fast"][0]:.2f} to {acc["fast"][1]:.2f}; `lam` is 0 or the fast bound's limit.

| T | median t_gamma, slow teacher (accuracy 1) | median slow bound | median t_gamma, fast teacher (accuracy 2/Y) | share of problems where the fast teacher wins [95% CI] |
|---|---|---|---|---|
{rows}

{_growth_text(summary)} The inaccurate teacher that puts its reward on the best output has no `T`
(its median time is the same number in every row): {_wins_text(counts)}. {_unreached_text(summary)}

{general_text(summary["general_policy"], "Theorem 2")} The inaccurate teacher is the faster one on
{fmt_share(*summary["general_policy"]["fast_beats_accurate_slow_counts"][str(config.horizons[-1])], "one-prompt draws")} at `T = {config.horizons[-1]}`.

![t_gamma against T and accuracy](figures/{NAME}.png)
"""
