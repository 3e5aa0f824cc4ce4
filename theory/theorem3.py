"""Theorem 3 / 6 of Razin et al.: which reward model teaches best depends on the student.

Two good outputs ``y_g``, ``y_g'`` (the two best under a random ``r_G``) and two reward models
of the same accuracy: ``r_RM = +1`` on ``y_g`` and ``-1`` elsewhere, ``r'_RM`` the same on
``y_g'``. Initial policies come from two families: ``Pi`` puts mass ``c`` on ``y_g`` and
``T^-2`` on ``y_g'``; ``Pi'`` swaps them. Theorem 3 says that for ``pi0`` in ``Pi``, ``r_RM``
teaches in ``O(1)`` time (``t_gamma <= 2 |S| / (1 - rho)^3 (1/c - 1/rho)``, for ``lam`` below an
explicit limit) while ``r'_RM`` needs ``t_gamma >= (|S| / sqrt 2)(1 - e^(-gamma/2)) T``; and the
other way round for ``Pi'``. Each cell of the 2x2 table is measured by exact flow, at several
``T`` and with ``lam = 0`` and at the limit.

The general-policy arm (:func:`general_arm`) runs the same cells on an
autoregressive-tabular policy with several prompts per problem: Proposition A is a bound there,
and the tabular formulas are measured, since [R] proves them for tabular policies only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrm import bounds, flow, metrics
from jaxrm.studies import (
    POSITIVE_INT,
    SMALL_TOLERANCE,
    Progress,
    StudyConfig,
    checked,
    distinct,
    each,
    finish_study,
    fmt,
    fmt_share,
    int_at_least,
    pyplot,
    save_figure,
    save_violations,
)
from jaxrm.tabular import AutoregressiveTabularPolicy
from theory.common import (
    beyond_upper,
    failed_text,
    general_policy_arm,
    general_text,
    loglog_slope,
    unreached,
    violating_rows,
)

NAME = "theorem3"
FAMILIES = ("Pi", "Pi'")
TEACHERS = ("r_RM", "r'_RM")


@dataclasses.dataclass(frozen=True)
class Theorem3Config(StudyConfig):
    """Sizes, grids and solver settings of the Theorem 3 / 6 study
    (docs/theory.md#theorems-3-and-6); the families ``Pi``, ``Pi'`` and the two teachers are
    described in the module docstring. Fields with a range are checked on construction.

    Attributes:
      seed: seed of the random ground truths, initial policies and gains.
      problems: random one-prompt problems (an int >= 1), each measured in every cell.
      num_outputs: ``|Y|`` (an int >= 3).
      horizons: the values of ``T`` (a non-empty tuple of values > 1); the neglected good output
        gets initial mass ``T^-2``.
      good_mass: ``c``, the initial mass of the favoured good output, in ``(0, 0.9)``.
      rtol: relative tolerance of the adaptive ODE solver.
      atol: absolute tolerance of the adaptive ODE solver.
      t_max: flow time after which a gain counts as not reached (``t_gamma = inf``).
      tolerance: relative slack in ``[0, 0.1)``: the fast teacher violates its upper bound
        unless ``t_gamma <= (1 + tolerance) * bound`` (an infinite time violates it), the slow
        one its lower bound when ``t_gamma < (1 - tolerance) * bound``.
      general_problems: one-prompt problems of the general-policy arm (an int >= 1): the same
        cells on an autoregressive-tabular policy, started at the same distributions, solved
        ``general_prompts`` prompts to a problem.
      general_prompts: ``|S|``, prompts per problem of the general-policy arm (an int >= 1).
      general_vocab: ``V`` of the general-policy arm's policy (an int >= 2).
      general_length: ``L`` of the general-policy arm's policy (an int >= 2); ``|Y| = V^L``.
    """

    seed: int = 0
    problems: int = checked(64, POSITIVE_INT)
    num_outputs: int = checked(12, int_at_least(3))
    horizons: tuple[float, ...] = checked((10, 100, 1000), distinct(each((lambda t: t > 1, "T > 1"))))
    good_mass: float = checked(0.3, (lambda v: 0 < v < 0.9, "in (0, 0.9)"))
    rtol: float = 1e-8
    atol: float = 1e-10
    t_max: float = 1e14
    tolerance: float = checked(1e-6, SMALL_TOLERANCE)
    general_problems: int = checked(32, POSITIVE_INT)
    general_prompts: int = checked(4, POSITIVE_INT)
    general_vocab: int = checked(3, int_at_least(2))
    general_length: int = checked(2, int_at_least(2))

    def __post_init__(self):
        super().__post_init__()
        # The initial policy puts good_mass and T^-2 on the two good outputs, the rest elsewhere.
        short = [horizon for horizon in self.horizons if self.good_mass + horizon**-2.0 >= 1.0]
        if short:
            raise ValueError(
                f"Theorem3Config.horizons={self.horizons}: with good_mass={self.good_mass}, T = {short[0]} leaves "
                "no mass for the other outputs (good_mass + T^-2 must be below 1)."
            )

    def quick(self) -> "Theorem3Config":
        return dataclasses.replace(self, problems=8, general_problems=4)


def make_cells(config: Theorem3Config):
    """Every (problem, T, family, teacher, lam) as one row of stacked arrays."""
    rng = np.random.default_rng(config.seed)
    y, c = config.num_outputs, config.good_mass
    rows = []
    for problem in range(config.problems):
        # Two good outputs well above the rest, so both beat E_pi0[r_G] + gamma in either family.
        gt = rng.uniform(-1.0, 0.3, y)
        first, second = rng.choice(y, 2, replace=False)
        gt[[first, second]] = np.sort(rng.uniform(0.5, 1.0, 2))[::-1]
        weights = rng.uniform(0.2, 1.0, y)
        for horizon in config.horizons:
            for family, (favoured, neglected) in zip(FAMILIES, ((first, second), (second, first))):
                probs = weights.copy()
                probs[[favoured, neglected]] = 0.0
                probs *= (1.0 - c - horizon**-2.0) / probs.sum()
                probs[favoured], probs[neglected] = c, horizon**-2.0
                start = float(probs @ gt)
                gamma = rng.uniform(0.2, 0.8) * (min(gt[first], gt[second]) - start)
                rho = bounds.theorem2_rho(start, gamma, gt[favoured])
                lam_limit = float(bounds.theorem3_kl_limit(c, rho, probs.min()))
                for teacher, target in zip(TEACHERS, (first, second)):
                    rm = -np.ones(y)
                    rm[target] = 1.0
                    for lam in (0.0, lam_limit):
                        rows.append(
                            dict(
                                problem=problem,
                                horizon=horizon,
                                family=family,
                                teacher=teacher,
                                fast=target == favoured,
                                logits=np.log(probs),
                                gt=gt,
                                rm=rm,
                                gamma=gamma,
                                rho=rho,
                                lam=lam,
                            )
                        )
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def general_arm(config: Theorem3Config) -> tuple[dict, list]:
    """Theorem 3's cells on an autoregressive-tabular policy with several prompts
    (docs/theory.md#theorems-3-and-6). Proposition A's consequence is proven there and counted as
    a bound; Theorem 3's tabular formulas (with ``|S|``) are measured against, not assumed.
    Returns the arm's summary and its rows that violate Proposition A."""
    policy = AutoregressiveTabularPolicy(config.general_vocab, config.general_length)
    arm = dataclasses.replace(
        config, problems=config.general_problems, num_outputs=policy.num_outputs, seed=config.seed + 1
    )
    cells = make_cells(arm)
    summary, time, lam, violating = general_policy_arm(
        cells | {"log_probs": cells["logits"]},
        policy=policy,
        prompts=config.general_prompts,
        slow=~cells["fast"],
        fast=cells["fast"],
        slow_lower=bounds.theorem3_slow_lower_bound(
            cells["gamma"], cells["horizon"], num_prompts=config.general_prompts
        ),
        fast_upper=bounds.theorem3_fast_upper_bound(cells["rho"], config.good_mass, num_prompts=config.general_prompts),
        tolerance=config.tolerance,
        rtol=config.rtol,
        atol=config.atol,
        t_max=config.t_max,
    )
    summary.update(_student_decides(cells | {"lam": lam}, time))
    return summary, violating


def run(out_dir: Path, *, quick: bool = False, config: Theorem3Config | None = None) -> dict:
    config = Theorem3Config.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    cells = make_cells(config)
    progress(
        f"{len(cells['gamma'])} flows: {config.problems} problems x {len(config.horizons)} T x 2 families x 2 teachers x 2 lam"
    )
    result = flow.first_passage(
        cells["logits"][:, None],
        cells["rm"][:, None],
        cells["gamma"][:, None],
        eval_rewards=cells["gt"][:, None],
        kl_coef=cells["lam"],
        rtol=config.rtol,
        atol=config.atol,
        t_max=config.t_max,
    )
    time = np.asarray(result.t_gamma)[:, 0]
    fast = cells["fast"]
    upper = bounds.theorem3_fast_upper_bound(cells["rho"], config.good_mass, num_prompts=1)
    lower = bounds.theorem3_slow_lower_bound(cells["gamma"], cells["horizon"], num_prompts=1)
    with np.errstate(invalid="ignore"):
        status, t_end = np.asarray(result.status)[:, 0], np.asarray(result.t_end)[:, 0]
        fast_bad = fast & beyond_upper(time, t_end, status, (1 + config.tolerance) * upper)
        slow_bad = ~fast & (time < (1 - config.tolerance) * lower)
    accuracy = np.asarray(metrics.accuracy(cells["rm"], cells["gt"]))
    variance = np.asarray(metrics.reward_variance(cells["logits"], cells["rm"]))
    split = unreached(status, t_end, lower=np.where(fast, np.nan, lower), upper=np.where(fast, upper, np.nan))
    general, general_violating = general_arm(config)
    progress(
        f"general-policy arm: {general['instances']} flows ({general['policy']}, |S| = {general['prompts']}), "
        f"Proposition A violations {general['prop_a_violations']}"
    )

    table = {}
    for horizon in config.horizons:
        for family in FAMILIES:
            for teacher in TEACHERS:
                chosen = (cells["horizon"] == horizon) & (cells["family"] == family) & (cells["teacher"] == teacher)
                table[f"T={horizon} {family} {teacher}"] = {
                    "median_t": float(np.median(time[chosen])),
                    "max_t": float(np.max(time[chosen])),
                    "median_variance": float(np.median(variance[chosen])),
                    "fast": bool(fast[chosen][0]),
                }
    summary = {
        "instances": int(len(time)),
        "violations": {
            "fast_upper": int(fast_bad.sum()),
            "slow_lower": int(slow_bad.sum()),
            "general_prop_a": general["prop_a_violations"],
        },
        # Unreached by t_max; a slow cell's time is then only known to exceed t_max, which
        # satisfies its lower bound, and a fast cell's counts against its upper bound above.
        # A failed solve is known only to exceed where it stopped: counted apart.
        "censored": int(split["censored"].sum()),
        "failed": int(split["failed"].sum()),
        "undecided": int(split["undecided"].sum()),
        "min_slack": {
            "fast_upper": float(np.min(upper[fast] / time[fast])),
            "slow_lower": float(np.min(time[~fast] / lower[~fast])),
        },
        "accuracy": {teacher: float(np.mean(accuracy[cells["teacher"] == teacher])) for teacher in TEACHERS},
        **_student_decides(cells, time),
        "slow_slope": _slow_slope(time, variance, fast, config),
        "table": table,
        "general_policy": general,
        "config": dataclasses.asdict(config),
    }
    summary["verdict"] = (
        f"{summary['instances']} flows; violations fast bound {summary['violations']['fast_upper']}, slow bound "
        f"{summary['violations']['slow_lower']}; smallest slack {fmt(summary['min_slack']['fast_upper'])} and "
        f"{fmt(summary['min_slack']['slow_lower'])}; {summary['censored']} censored at t_max, {summary['failed']} failed solves; the student decides "
        f"the better teacher {_decides_text(summary)} (general-policy arm: "
        f"{_decides_text(general, 'one-prompt draws')}; Proposition A violations {general['prop_a_violations']})"
    )
    progress(f"violations {summary['violations']}")
    _figure(cells, time, config, out_dir / "figures" / f"{NAME}.png")
    violating = violating_rows(cells | {"t_gamma": time}, {"fast_upper": fast_bad, "slow_lower": slow_bad})
    save_violations(out_dir, NAME, violating + general_violating, progress=progress)
    return finish_study(out_dir, NAME, summary, _markdown(summary, config), progress=progress, quick=quick)


def _student_decides(cells, time) -> dict:
    """Per (problem, T, family, lam) case: does the teacher of the favoured output win? Returns
    ``student_decides``, the share of cases, and ``student_decides_counts``: ``cases`` and
    ``problems`` (the independent draws; one counts when it wins every one of its cases), each
    ``[wins, total]``."""
    keys = np.stack([cells["problem"], cells["horizon"], cells["family"] == FAMILIES[0], cells["lam"] > 0], -1)
    cases = np.unique(keys, axis=0)
    wins = np.array(
        [
            time[chosen & cells["fast"]].max() < time[chosen & ~cells["fast"]].min()
            for chosen in ((keys == case).all(-1) for case in cases)
        ]
    )
    problems = np.unique(cases[:, 0])
    every_case = [bool(wins[cases[:, 0] == problem].all()) for problem in problems]
    return {
        "student_decides": float(np.mean(wins)),
        "student_decides_counts": {
            "cases": [int(wins.sum()), len(wins)],
            "problems": [int(sum(every_case)), len(problems)],
        },
    }


def _figure(cells, time, config, path: Path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    horizons = np.array(config.horizons, float)
    # An unreached time (censored, or a failed solve) is drawn at t_max: percentiles that involve it
    # are then lower bounds for a censored one, and finite.
    bounded = np.minimum(time, config.t_max)
    for ax, family in zip(axes, FAMILIES):
        for teacher, color in zip(TEACHERS, ("C0", "C3")):
            chosen = (cells["family"] == family) & (cells["teacher"] == teacher)
            at = [bounded[chosen & (cells["horizon"] == h)] for h in horizons]
            lo, med, hi = np.array([np.percentile(t, [10, 50, 90]) for t in at]).T
            unreached = int(np.sum(~np.isfinite(time[chosen])))
            ax.fill_between(horizons, lo, hi, color=color, alpha=0.25)
            label = f"teacher {teacher}" + (f" ({unreached} unreached, drawn at t_max)" if unreached else "")
            ax.loglog(horizons, med, "o-", color=color, label=label)
        ax.set(xlabel="T (the neglected output has initial mass T^-2)", title=f"student from {family}")
        ax.legend()
    axes[0].set_ylabel("t_gamma on r_G (median, 10-90%)")
    fig.suptitle("two reward models of almost equal accuracy: the better teacher depends on the initial policy")
    save_figure(fig, path)


def _slow_slope(time, variance, fast, config) -> dict:
    """Log-log slope of the slow cells' ``t_gamma`` against their reward variance, with a bootstrap
    interval over instances: unlike a rescaled teacher (-1/2), their variance and their time
    both come from ``T``."""
    slow = ~fast & np.isfinite(time) & (variance > 0)
    slope, (low, high) = loglog_slope(variance[slow], time[slow], num_bootstrap=500, seed=config.seed)
    return {"slope": slope, "ci": [low, high], "n": int(slow.sum())}


def _decides_text(summary: dict, draws: str = "problems") -> str:
    """How often the favoured output's teacher wins, by case and by independent draw (``draws``
    names them), counted."""
    counts = summary["student_decides_counts"]
    wins, cases = counts["cases"]
    return (
        f"in {wins} of {cases} (problem, T, student, lam) cases ({100 * wins / cases:.3g}%), and every case of "
        f"{fmt_share(*counts['problems'], draws)}, the independent draws"
    )


def _variance_text(summary: dict) -> str:
    """Whether the reward variance under the student orders the teachers as their times do,
    counted over the (T, family) cells of the table (medians over problems and both lam)."""
    cells = summary["table"]
    pairs = [
        (cells[f"T={horizon} {family} {TEACHERS[0]}"], cells[f"T={horizon} {family} {TEACHERS[1]}"])
        for horizon in summary["config"]["horizons"]
        for family in FAMILIES
    ]
    agree = sum((a["median_variance"] > b["median_variance"]) == (a["median_t"] < b["median_t"]) for a, b in pairs)
    if agree == len(pairs):
        return (
            "The reward variance under the student does: in every one of the "
            f"{len(pairs)} (T, family) cells the faster teacher has the larger median variance."
        )
    return (
        f"The reward variance under the student orders the teachers as their median times do in {agree} of "
        f"{len(pairs)} (T, family) cells."
    )


def _conclusion(summary: dict) -> str:
    """Whether the student decides the better teacher, worded from the measured share."""
    share = summary["student_decides"]
    first, second = (summary["accuracy"][name] for name in TEACHERS)
    text = f"The reward model that rewards the output the student already favours wins {_decides_text(summary)}."
    if share >= 0.95:
        less = "*less* accurate" if second < first else "no less accurate"
        text += (
            f" Swap the student and the other model wins, so for students from `Pi'` the {less} `r'_RM` is "
            "the better teacher. Accuracy, a property of the reward model alone, cannot say this. "
            + _variance_text(summary)
        )
    elif share > 0.5:
        text += " The student tips the choice in most cases but not in all. " + _variance_text(summary)
    else:
        text += " The student does not decide the better teacher in these cases. " + _variance_text(summary)
    return text


def _slow_slope_text(summary: dict) -> str:
    fit = summary["slow_slope"]
    low, high = fit["ci"]
    return (
        f"Across the slow cells ({fit['n']} flows) `t_gamma` grows like `Var^({fit['slope']:.2f})` "
        f"[95% CI {low:.2f}, {high:.2f}] as the variance shrinks with `T`"
        + (
            ", steeper than the `-1/2` of a rescaled teacher: the `-1/2` of Theorem 1's families is not universal."
            if high < -0.5
            else "."
        )
    )


def _markdown(summary: dict, config: Theorem3Config) -> str:
    v, s = summary["violations"], summary["min_slack"]
    header = "| T | student | t_gamma with r_RM (+1 on y_g) | t_gamma with r'_RM (+1 on y_g') |\n|---|---|---|---|"
    rows = []
    for horizon in config.horizons:
        for family in FAMILIES:
            cell = lambda teacher: summary["table"][f"T={horizon} {family} {teacher}"]["median_t"]  # noqa: E731
            rows.append(f"| {horizon} | {family} | {fmt(cell(TEACHERS[0]))} | {fmt(cell(TEACHERS[1]))} |")
    return f"""## Theorem 3 / 6: the best teacher depends on the student

**Verdict:** {summary["instances"]} exact flows ({summary["censored"]} not reached by `t_max`, censored), violations: fast upper bound {v["fast_upper"]}, slow lower bound {v["slow_lower"]}. Smallest slack: fast {fmt(s["fast_upper"])} (bound over time), slow {fmt(s["slow_lower"])} (time over bound). Mean accuracy over all pairs: `r_RM` {summary["accuracy"][TEACHERS[0]]:.3f}, `r'_RM` {summary["accuracy"][TEACHERS[1]]:.3f} (`y_g` is the best output, `y_g'` the second best).{failed_text(summary["failed"], summary["undecided"])}

Median `t_gamma` on the ground truth (`c = {config.good_mass}`; `lam` 0 and at the limit pooled):

{header}
{chr(10).join(rows)}

{_conclusion(summary)}

{general_text(summary["general_policy"], "Theorem 3")} There the student decides the better teacher
{_decides_text(summary["general_policy"], "one-prompt draws")}.

{_slow_slope_text(summary)}

![2x2 table over T](figures/{NAME}.png)
"""
