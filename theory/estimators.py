"""What each sampled estimator optimizes: the exact estimator atlas (docs/theory.md#what-each-estimator-optimizes).

For random one-prompt problems on an autoregressive-tabular policy (a current and a reference
policy, task rewards ``scale * U(-1, 1)`` at several scales), every estimator of
:func:`jaxrm.estimators.grid` at every ``k`` gets its exact gradient mean and covariance
(:func:`jaxrm.estimators.estimate_many_moments`, every multiset of ``k`` outputs), compared with the
gradient of the objective it claims, ``E r - lam KL(pi || pi_ref)``, and with the closed form
it follows (:func:`jaxrm.estimators.followed_gradient`).

Violations: an estimator that should be unbiased for the claimed objective (REINFORCE with or
without a baseline and RLOO, with ``k1`` in the reward) measured biased beyond ``tolerance``;
a mean that misses its closed form by more than ``tolerance``.

Theorem 1 under sampling (docs/theory.md#theorem-1-under-sampling): on one-prompt tabular
problems whose reward variance spans several decades (:func:`make_passage_instances`), the
exact flow's ``t_gamma`` (:func:`jaxrm.flow.t_gamma`), the exact-gradient ascent and RLOO
ascent with ``k`` samples per step and many seeds (:func:`jaxrm.ascent.ascent_first_passage`,
one SGD learning rate per family, so that time is ``lr x updates``) are timed side by side, with
the share of groups whose ``k`` rewards tie and the exact signal-to-noise ratio of one group.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special

from jaxrm import ascent, flow, metrics
from jaxrm import estimators as E
from jaxrm.studies import (
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_INT,
    Progress,
    StudyConfig,
    checked,
    each,
    finish_study,
    fmt,
    int_at_least,
    pyplot,
    save_figure,
    save_violations,
)
from jaxrm.tabular import AutoregressiveTabularPolicy, TabularPolicy
from theory.common import loglog_slope

NAME = "estimators"
MEASURES = ("relative_bias", "cosine", "scale", "direction_bias", "total_variance", "snr")
UNBIASED_ADVANTAGES = ("reinforce", "reinforce_baseline", "rloo")


@dataclasses.dataclass(frozen=True)
class EstimatorsConfig(StudyConfig):
    """Problems and grids of the estimator atlas; fields with a range are checked on construction.

    Attributes:
      seed: seed of the random policies, references and rewards.
      problems: random one-prompt problems (an int >= 1).
      vocab_size: ``V`` of the autoregressive-tabular policy (an int >= 2).
      length: ``L``, tokens per output (an int >= 1); ``|Y| = V^L``.
      ks: group sizes (each an int >= 2; the ``C(|Y| + k - 1, k)`` multisets of ``k`` outputs are
        enumerated, at most 2e6).
      log10_scales: the task rewards are ``10^x * U(-1, 1)``, so the reward variance is
        multiplied by ``10^(2x)``; run from the largest scale down.
      kl_coef: ``lam > 0`` of the claimed objective and of every KL placement.
      ref_distance: the reference policy's logits are the current ones plus this times
        ``N(0, 1)`` (> 0, so the KL terms and their gradients are not zero).
      tolerance: relative error in ``(0, 1e-3)`` beyond which a mean counts as biased, or as
        missing its closed form.
      passage_outputs: ``|Y|`` of the tabular policy of Theorem 1 under sampling (an int >= 2).
      passage_problems: base problems of each family (an int >= 2: slopes are within-problem).
      passage_levels: reward-variance levels per base problem (an int >= 3).
      passage_decades: decades of reward variance the levels span (> 0).
      passage_ks: RLOO group sizes of the sampled ascent (distinct ints >= 2, with at most 2e6
        multisets of ``k`` of ``passage_outputs`` outputs for the exact signal-to-noise ratio).
      passage_seeds: sampled runs per instance and ``k`` (an int >= 2).
      passage_resolution: SGD updates the fastest flow time of a family spans: the family's one
        learning rate is that ``t_gamma`` divided by this (an int >= 1).
      censor_factor: an ascent stops after this times the slowest flow time; seeds not passed
        by then are censored and counted (> 1).
      gain_fraction: the gain timed, as a share of the gain each instance offers, in ``(0, 1)``.
    """

    seed: int = 0
    problems: int = checked(4, POSITIVE_INT)
    vocab_size: int = checked(2, int_at_least(2))
    length: int = checked(2, POSITIVE_INT)
    ks: tuple[int, ...] = checked((2, 4, 8), each((lambda k: k >= 2, "k >= 2")))
    log10_scales: tuple[float, ...] = checked((0.0, -1.0, -2.0, -3.0), (lambda v: len(v) >= 2, "at least 2"))
    kl_coef: float = checked(0.1, POSITIVE)
    ref_distance: float = checked(1.0, POSITIVE)
    tolerance: float = checked(1e-9, (lambda v: 0 < v < 1e-3, "in (0, 1e-3)"))
    passage_outputs: int = checked(4, int_at_least(2))
    passage_problems: int = checked(4, int_at_least(2))
    passage_levels: int = checked(5, int_at_least(3))
    passage_decades: float = checked(2.0, POSITIVE)
    passage_ks: tuple[int, ...] = checked((2, 4, 8, 16), each((lambda k: k >= 2, "k >= 2")))
    passage_seeds: int = checked(64, int_at_least(2))
    passage_resolution: int = checked(20, POSITIVE_INT)
    censor_factor: float = checked(4.0, (lambda v: v > 1, "> 1"))
    gain_fraction: float = checked(0.5, OPEN_FRACTION)

    def __post_init__(self):
        super().__post_init__()
        for name, ks, outputs in (
            ("ks", self.ks, self.vocab_size**self.length),
            ("passage_ks", self.passage_ks, self.passage_outputs),
        ):
            if len(set(ks)) != len(ks):
                raise ValueError(f"EstimatorsConfig.{name}={ks}: the group sizes must be distinct.")
            if math.comb(outputs + max(ks) - 1, max(ks)) > 2_000_000:
                raise ValueError(
                    f"EstimatorsConfig.{name}={ks}: C(|Y| + k - 1, k) multisets for |Y| = {outputs}, k = {max(ks)} "
                    "exceed 2e6; lower k or |Y|."
                )

    def quick(self) -> "EstimatorsConfig":
        return dataclasses.replace(
            self,
            problems=2,
            ks=(2,),
            log10_scales=(0.0, -2.0),
            passage_problems=2,
            passage_levels=3,
            passage_decades=2.0,
            passage_ks=(2,),
            passage_seeds=8,
            passage_resolution=10,
        )


def follows(estimator: E.Estimator) -> str:
    """The direction ``estimator``'s mean follows, in words (docs/theory.md): an objective's
    gradient for ``L = 1``; for ``L > 1`` the held and per-token KL terms keep the prefix
    distribution fixed, so they are directions rather than gradients of an objective."""
    if not E.has_closed_form(estimator):
        return "no closed form (depends on the group)"
    task = "E r / std" if estimator.reward_normalization == "global" else "E r"
    kl = {
        "reward": {"k1": " - lam KL(pi‖ref)", "k2": " - lam E[held k2]", "k3": " - lam E[held k3]"},
        "loss": {"k1": "", "k2": " - lam token KL(pi‖ref)", "k3": " - lam token KL(ref‖pi)"},
        "detached": {"k1": "", "k2": "", "k3": ""},
    }[estimator.kl_placement][estimator.kl_estimator]
    scaled = f"{task}{kl}" if estimator.kl_placement == "reward" else task
    if estimator.advantage == "dr_grpo":
        scaled = f"{(estimator.k - 1) / estimator.k:.3g} x ({scaled})"
    followed = scaled + (kl if estimator.kl_placement != "reward" else "")
    return f"({followed}) / L" if estimator.surrogate == "clipped" else followed


def should_be_unbiased(estimator: E.Estimator) -> bool:
    return (
        estimator.advantage in UNBIASED_ADVANTAGES
        and estimator.kl_estimator == "k1"
        and estimator.kl_placement == "reward"
        and not estimator.filter_zero_variance
        and estimator.reward_normalization == "none"
        and estimator.surrogate == "reinforce"
    )


def make_problems(config: EstimatorsConfig):
    """``(policy, logits [P], refs [P], unit rewards [P, Y])``: one prompt each."""
    policy = AutoregressiveTabularPolicy(config.vocab_size, config.length)
    keys = jax.random.split(jax.random.key(config.seed), 2 * config.problems)
    logits = [policy.random_logits(keys[i], 1) for i in range(config.problems)]
    refs = [
        jax.tree.map(
            lambda a, b: a + config.ref_distance * b, theta, policy.random_logits(keys[config.problems + i], 1)
        )
        for i, theta in enumerate(logits)
    ]
    unit = np.random.default_rng(config.seed).uniform(-1.0, 1.0, (config.problems, policy.num_outputs))
    return policy, logits, refs, unit


def run(out_dir: Path, *, quick: bool = False, config: EstimatorsConfig | None = None) -> dict:
    config = EstimatorsConfig.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    rows, variance = _atlas(config, progress)
    passage = _sampling(config, progress)
    violating = _violating(rows, config.tolerance)
    violations = {bound: sum(v["bound"] == bound for v in violating) for bound in ("unbiased", "followed")}
    save_violations(out_dir, NAME, violating, progress=progress)
    means = int(len(rows) * config.problems * len(config.log10_scales))
    summary = {
        "instances": means + passage["instances"],  # plus the instances of Theorem 1 under sampling
        "means": means,
        "violations": violations,
        "censored": passage["censored_instances"],
        "estimators": rows,
        "variance": np.median(variance, axis=0).tolist(),
        "snr": _snr_ends(rows),
        "passage": passage,
        "config": dataclasses.asdict(config),
    }
    summary["verdict"] = _verdict(summary, config)
    _figure(summary, config, out_dir / "figures" / f"{NAME}.png")
    _passage_figure(passage, out_dir / "figures" / f"{NAME}_passage.png")
    return finish_study(out_dir, NAME, summary, _markdown(summary, config), progress=progress, quick=quick)


def _violating(rows: list[dict], tolerance: float) -> list[dict]:
    """One entry per (row, bound) the atlas broke: an estimator that should be unbiased whose
    mean missed the exact gradient by more than ``tolerance`` (relative) on some instance
    (``unbiased``), or one whose mean missed the gradient it follows in closed form
    (``followed``). A NaN measure counts as broken. Each entry is the row with the bound, the
    tolerance and the worst instance (``problem``, ``scale``), which with the study's config
    rebuilds it."""
    violating = []
    for row in rows:
        if row["should_be_unbiased"] and not row["max_relative_bias"] <= tolerance:
            violating.append(
                row | {"bound": "unbiased", "tolerance": tolerance, "instance": row["max_relative_bias_at"]}
            )
        if row["followed_error"] is not None and not row["followed_error"] <= tolerance:
            violating.append(row | {"bound": "followed", "tolerance": tolerance, "instance": row["followed_error_at"]})
    return violating


def _worst_instance(values: np.ndarray, scales: np.ndarray) -> dict:
    """Where ``values [problems, scales]`` is largest (a NaN counts as largest)."""
    problem, scale = np.unravel_index(np.argmax(np.where(np.isnan(values), np.inf, values)), values.shape)
    return {"problem": int(problem), "scale": float(scales[scale])}


def _atlas(config: EstimatorsConfig, progress: Progress) -> tuple[list[dict], np.ndarray]:
    """Every estimator of the grid at every ``k``, problem and reward scale: one row per
    ``(k, estimator)`` with its measures per scale (medians over problems), and the reward
    variance ``[problems, scales]``."""
    policy, logits, refs, unit = make_problems(config)
    scales = 10.0 ** np.sort(np.asarray(config.log10_scales, float))[::-1]  # largest first: "high" to "low"
    lam = config.kl_coef
    rows = []
    variance = np.zeros((config.problems, len(scales)))
    for k in config.ks:
        grid = tuple(E.grid(ks=(k,)))
        rloo = grid.index(E.Estimator("rloo", k=k))
        measured = np.full((len(grid), len(MEASURES), config.problems, len(scales)), np.nan)
        snr_without_kl = np.full((config.problems, len(scales)), np.nan)
        followed_error = np.full((len(grid), config.problems, len(scales)), np.nan)
        has_closed_form = np.zeros(len(grid), bool)
        for p in range(config.problems):
            for s, scale in enumerate(scales):
                rewards = scale * unit[p]
                variance[p, s] = float(metrics.reward_variance(policy.log_probs(logits[p])[0], rewards))
                options = dict(ref_logits=refs[p])
                means = E.estimate_many_moments(grid, policy, logits[p], rewards, kl_coef=lam, **options)
                without_kl = E.estimate_moments(grid[rloo], policy, logits[p], rewards, **options)
                snr_without_kl[p, s] = E.compare(without_kl, E.objective_gradient(policy, logits[p], rewards)).snr
                gradients = E.kl_gradients(policy, logits[p], rewards, **options)
                target = E.objective_gradient(policy, logits[p], rewards, kl_coef=lam, **options)
                for e, (estimator, moments) in enumerate(zip(grid, means)):
                    measured[e, :, p, s] = E.compare(moments, target)
                    closed = E.followed_gradient(
                        estimator, policy, logits[p], rewards, kl_coef=lam, gradients=gradients, **options
                    )
                    if closed is not None:
                        has_closed_form[e] = True
                        followed_error[e, p, s] = float(
                            np.linalg.norm(np.asarray(moments.mean) - np.asarray(closed))
                            / max(np.linalg.norm(np.asarray(closed)), 1e-300)
                        )
        progress(f"k = {k}: {len(grid)} estimators x {config.problems} problems x {len(scales)} scales, exact")
        for e, estimator in enumerate(grid):
            row = {
                "name": estimator.name,
                "k": k,
                "estimator": dataclasses.asdict(estimator),
                "follows": follows(estimator),
                "should_be_unbiased": should_be_unbiased(estimator),
                # per scale, the median over problems
                **{m: np.nanmedian(measured[e, i], axis=0).tolist() for i, m in enumerate(MEASURES)},
                # A NaN (or a missing closed form on some instance) makes the maximum NaN, which the
                # violation counts take as a failure.
                "max_relative_bias": float(np.max(measured[e, 0])),
                "max_relative_bias_at": _worst_instance(measured[e, 0], scales),
                "followed_error": float(np.max(followed_error[e])) if has_closed_form[e] else None,
                "followed_error_at": _worst_instance(followed_error[e], scales) if has_closed_form[e] else None,
            }
            if e == rloo:
                row["snr_without_kl"] = np.median(snr_without_kl, axis=0).tolist()
            rows.append(row)
    return rows, variance


# Theorem 1 under sampling (docs/theory.md#theorem-1-under-sampling)

FAMILIES = ("scaled", "scaled_kl", "peaked")
UNIT_SGD = optax.sgd(1.0)


class PassageInstances(NamedTuple):
    """One-prompt tabular problems, flattened over family x base problem x variance level."""

    logits: np.ndarray  # [N, Y] initial (and reference) logits
    rm: np.ndarray  # [N, Y] the reward taught
    eval: np.ndarray  # [N, Y] the reward timed
    kl_coef: np.ndarray  # [N]
    gamma: np.ndarray  # [N] gain of the timed reward
    family: np.ndarray  # [N] index into FAMILIES
    problem: np.ndarray  # [N] base problem
    level: np.ndarray  # [N] variance level (0: the largest)
    variance: np.ndarray  # [N] Var_{pi_0}[r_RM]


def _mean_and_variance(logits, rewards) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(metrics.expected_reward(logits, rewards)), np.asarray(metrics.reward_variance(logits, rewards))


def _peak(logits, rewards, mode, target):
    """``logits + c e_mode`` with ``c >= 0`` set by bisection so that the reward variance is
    ``target``, which must be at most the variance at ``c = 0`` (it falls to 0 as ``c`` grows
    once the mode holds most of the mass; the variance at ``c = 60`` is below any target here)."""
    low, high = np.zeros(len(target)), np.full(len(target), 60.0)
    onehot = np.eye(logits.shape[-1])[mode]
    for _ in range(100):
        mid = (low + high) / 2
        above = _mean_and_variance(logits + mid[:, None] * onehot, rewards)[1] > target
        low, high = np.where(above, mid, low), np.where(above, high, mid)
    return logits + high[:, None] * onehot


def make_passage_instances(config: EstimatorsConfig) -> PassageInstances:
    """The three families of docs/theory.md#theorem-1-under-sampling: ``passage_problems`` base
    problems (``N(0, 1)`` logits, ``U(-1, 1)`` rewards ``r``) at ``passage_levels`` variance
    levels, ``Var_{pi_0}[r_RM] = 10^(-j D / (n - 1))`` times its value at level 0
    (``D = passage_decades``):

    - ``scaled``: ``r_RM = eps r`` (``eps^2`` the variance factor), ``lam = 0``; the gain of ``r``
      timed is fixed, so the flow is a time rescaling: ``t_gamma = t_gamma(eps = 1) / eps``;
    - ``scaled_kl``: the same with ``lam = kl_coef``; the gain timed is a share of what the
      KL-regularized limit ``pi* ~ pi_0 exp(eps r / lam)`` offers, which shrinks with ``eps``;
    - ``peaked``: ``r_RM = r``, ``lam = 0``; the initial policy is sharpened on its worst output
      (:func:`_peak`) until the variance is at the level: concentration instead of a small reward.

    The gain timed is ``gain_fraction`` of the gain on offer (``max r - E_{pi_0} r`` for
    ``lam = 0``), so the flow reaches it.
    """
    rng = np.random.default_rng(config.seed + 1)
    P, Y, n = config.passage_problems, config.passage_outputs, config.passage_levels
    base_logits = np.repeat(rng.normal(size=(P, 1, Y)), n, 1).reshape(P * n, Y)
    rewards = np.repeat(rng.uniform(-1.0, 1.0, (P, 1, Y)), n, 1).reshape(P * n, Y)
    drop = np.tile(10.0 ** -np.linspace(0.0, config.passage_decades, n), P)  # variance factors
    eps = np.sqrt(drop)[:, None]
    start, start_variance = _mean_and_variance(base_logits, rewards)
    limit = scipy.special.softmax(base_logits + eps * rewards / config.kl_coef, axis=-1)
    peaked = _peak(base_logits, rewards, rewards.argmin(-1), start_variance * drop)
    top, frac = rewards.max(-1), config.gain_fraction
    families = [  # (logits, taught reward, lam, gain timed), each over P * n rows
        (base_logits, eps * rewards, 0.0, frac * (top - start)),
        (base_logits, eps * rewards, config.kl_coef, frac * ((limit * rewards).sum(-1) - start)),
        (peaked, rewards, 0.0, frac * (top - _mean_and_variance(peaked, rewards)[0])),
    ]
    logits = np.concatenate([f[0] for f in families])
    rm = np.concatenate([f[1] for f in families])
    return PassageInstances(
        logits=logits,
        rm=rm,
        eval=np.tile(rewards, (len(FAMILIES), 1)),
        kl_coef=np.concatenate([np.full(P * n, f[2]) for f in families]),
        gamma=np.concatenate([f[3] for f in families]),
        family=np.repeat(np.arange(len(FAMILIES)), P * n),
        problem=np.tile(np.repeat(np.arange(P), n), len(FAMILIES)),
        level=np.tile(np.arange(n), len(FAMILIES) * P),
        variance=_mean_and_variance(logits, rm)[1],
    )


def _sampling(config: EstimatorsConfig, progress: Progress) -> dict:
    """Theorem 1 under sampling: flow, exact ascent and RLOO ascent on the same instances.

    Each family has one SGD learning rate, its fastest flow time over ``passage_resolution``,
    so that an update is the same stretch of flow time at every variance level. The ascents
    run per (family, level), each stopping once all of its runs have passed or at
    ``censor_factor`` times its slowest flow time (one compiled program per ``k``)."""
    inst = make_passage_instances(config)
    num = len(inst.gamma)
    policy = TabularPolicy(config.passage_outputs)
    one_prompt = lambda x: jnp.asarray(x)[..., None, :]  # noqa: E731
    flow_t = np.asarray(
        flow.t_gamma(
            one_prompt(inst.logits),
            one_prompt(inst.rm),
            jnp.asarray(inst.gamma)[:, None],
            policy=policy,
            kl_coef=jnp.asarray(inst.kl_coef),
            eval_rewards=one_prompt(inst.eval),
        )
    )[:, 0]
    timed = np.isfinite(flow_t)
    lr = np.zeros(num)
    for f in range(len(FAMILIES)):
        rows = (inst.family == f) & timed
        lr[inst.family == f] = np.min(flow_t[rows]) / config.passage_resolution if rows.any() else np.nan
    progress(f"sampling: {num} instances, flow t_gamma {fmt(np.min(flow_t))} .. {fmt(np.max(flow_t))}")
    buckets = [  # (rows, max_steps) per family and level with a timed flow
        (rows, math.ceil(config.censor_factor * float(np.max(flow_t[rows])) / float(lr[rows][0])))
        for f in range(len(FAMILIES))
        for level in range(config.passage_levels)
        if (rows := np.flatnonzero((inst.family == f) & (inst.level == level) & timed)).size
    ]
    max_steps = np.zeros(num, int)
    for rows, steps in buckets:
        max_steps[rows] = steps
    seeds = config.passage_seeds

    def first_passage(k, leading=()):
        """``(steps [*leading, N], reached, tied share)`` of every timed instance, bucket by bucket.

        SGD with learning rate ``lr`` on ``(r_RM, lam)`` is SGD with rate 1 on ``(lr r_RM, lr lam)``:
        the exact gradient and RLOO's estimate are linear in the KL-penalized reward. So one
        optimizer, and one compiled program per ``k``, serves every learning rate."""
        steps, reached, tied = (
            np.zeros((*leading, num)),
            np.zeros((*leading, num), bool),
            np.full((*leading, num), np.nan),
        )
        tile = lambda x: jnp.broadcast_to(jnp.asarray(x), (*leading, *jnp.shape(x)))  # noqa: E731
        for b, (rows, budget) in enumerate(buckets):
            out = ascent.ascent_first_passage(
                tile(one_prompt(inst.logits[rows])),
                tile(one_prompt(lr[rows, None] * inst.rm[rows])),
                tile(jnp.asarray(inst.gamma[rows])[:, None]),
                jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), k or 0), b),
                k=k,
                kl_coef=tile(lr[rows] * inst.kl_coef[rows]),
                eval_rewards=tile(one_prompt(inst.eval[rows])),
                optimizer=UNIT_SGD,
                max_steps=budget,
                policy=policy,
            )
            steps[..., rows] = np.asarray(out.steps)[..., 0]
            reached[..., rows] = np.asarray(out.reached)[..., 0]
            tied[..., rows] = np.asarray(out.tied_share)[..., 0]
        return steps, reached, tied

    steps, reached, _ = first_passage(None)
    exact_t = np.where(reached, lr * steps, np.inf)
    per_k = {}
    for k in config.passage_ks:
        steps, reached, tied = first_passage(k, (seeds,))
        reached &= timed
        times = np.where(reached, lr * steps, np.nan)
        with np.errstate(invalid="ignore"):
            mean, sd = np.nanmean(times, 0), np.nanstd(times, 0, ddof=1)  # over the seeds that passed
        per_k[str(k)] = {
            "censored": np.where(timed, (~reached).sum(0), 0).tolist(),  # seeds not passed in their budget
            "mean": mean.tolist(),
            "sd": sd.tolist(),
            "tied_along": np.nanmean(tied, 0).tolist(),
            "tied_start": np.asarray(
                metrics.tied_group_probability(jnp.asarray(inst.logits), jnp.asarray(inst.rm), k=k)
            ).tolist(),
            "snr": _initial_snr(policy, inst.logits, inst.rm, k),
        }
        progress(
            f"sampling: RLOO k = {k}, {seeds} seeds x {num} instances, {int((~reached & timed).sum())} runs censored"
        )
    passage = {
        "instances": num,
        "families": list(FAMILIES),
        "family": inst.family.tolist(),
        "problem": inst.problem.tolist(),
        "level": inst.level.tolist(),
        "variance": inst.variance.tolist(),
        "kl_coef": inst.kl_coef.tolist(),
        "flow": flow_t.tolist(),
        "exact_ascent": exact_t.tolist(),
        "learning_rate": lr.tolist(),
        "max_steps": max_steps.tolist(),
        "seeds": seeds,
        "k": per_k,
    }
    passage["censored_instances"] = int(np.sum(~_usable(passage)))
    passage["fits"] = _passage_fits(passage, config)
    return passage


def _usable(passage: dict, k: str | None = None) -> np.ndarray:
    """Instances whose times all count: the flow and the exact ascent reached the gain and no
    seed of RLOO was censored (at ``k``, or at every ``k``). The others are left out of the
    fits and counted."""
    ok = np.isfinite(passage["flow"]) & np.isfinite(passage["exact_ascent"])
    for key in passage["k"] if k is None else (k,):
        ok &= np.asarray(passage["k"][key]["censored"]) == 0
    return ok


def _initial_snr(policy, logits, rewards, k) -> list[float]:
    """Exact signal-to-noise ratio ``||E g||^2 / trace Cov g`` of one RLOO group at each
    instance's initial policy, all instances in one call. The reference is the initial policy,
    so the KL and its gradient vanish there and ``lam`` does not enter: instances that differ
    only in ``lam`` are computed once."""
    unique, index = np.unique(np.concatenate([logits, rewards], -1), axis=0, return_inverse=True)
    width = logits.shape[-1]
    moments = E.estimate_moments(
        E.Estimator("rloo", k=k), policy, jnp.asarray(unique[:, :width]), jnp.asarray(unique[:, width:])
    )
    mean, covariance = np.asarray(moments.mean), np.asarray(moments.covariance)
    snr = np.sum(mean**2, -1) / np.trace(covariance, axis1=-2, axis2=-1)
    return snr[index.ravel()].tolist()


def _passage_fits(passage: dict, config: EstimatorsConfig) -> dict:
    """Per family: log-log slopes against the initial variance (the mean of the base problems'
    own slopes, with its t-interval over problems: a bootstrap over 4 problems has too few
    distinct resamples) of the flow's ``t_gamma``, the exact ascent's time and, per ``k``, RLOO's mean
    time and the initial signal-to-noise ratio; time ratios (the exact ascent over the flow:
    whole updates and the Euler step; RLOO over the exact ascent at the same rate: the cost of
    sampling alone), per level and overall; tied-group shares; coefficients of variation. Times
    use only the instances of :func:`_usable`; the others are counted."""
    family = np.asarray(passage["family"])
    problem = np.asarray(passage["problem"])
    variance = np.asarray(passage["variance"])
    flow_t, exact_t = np.asarray(passage["flow"]), np.asarray(passage["exact_ascent"])

    def slope(rows, y):
        ok = rows & np.isfinite(y) & (y > 0)
        value, (low, high) = loglog_slope(variance[ok], y[ok], groups=problem[ok], interval="group-t")
        return {"slope": value, "ci": [low, high], "n": int(ok.sum())}

    def by_level(f, values, rows):
        return _level_medians(passage, f, np.where(rows, values, np.nan))[1].tolist()  # largest variance first

    fits = {}
    for f, name in enumerate(passage["families"]):
        rows = family == f
        timed = rows & np.isfinite(flow_t) & np.isfinite(exact_t)
        entry = {
            "instances": int(rows.sum()),
            "problems": int(np.unique(problem[rows]).size),
            "flow_not_reached": int((rows & ~np.isfinite(flow_t)).sum()),
            "exact_not_reached": int((rows & np.isfinite(flow_t) & ~np.isfinite(exact_t)).sum()),
            "variance_range": [float(variance[rows].min()), float(variance[rows].max())],
            "flow": slope(rows, flow_t),
            "exact_ascent": slope(timed, exact_t),
            "exact_ratio": _ratio_summary(exact_t[timed] / flow_t[timed]),
            "exact_ratio_by_level": by_level(f, exact_t / flow_t, timed),
            "k": {},
        }
        for k, run in passage["k"].items():
            mean, snr = np.asarray(run["mean"], float), np.asarray(run["snr"])
            usable = rows & _usable(passage, k)
            with np.errstate(invalid="ignore", divide="ignore"):
                cv = np.asarray(run["sd"]) / mean
            entry["k"][k] = {
                "sampled": slope(usable, mean),
                "left_out": int((rows & ~usable).sum()),
                "ratio": _ratio_summary(mean[usable] / flow_t[usable]),
                "sampling_ratio": _ratio_summary(mean[usable] / exact_t[usable]),
                "sampling_by_level": by_level(f, mean / exact_t, usable),
                "cv": float(np.median(cv[usable])) if usable.any() else None,
                "tied_start_max": float(np.max(np.asarray(run["tied_start"])[rows])),
                "tied_along": float(np.median(np.asarray(run["tied_along"])[usable])) if usable.any() else None,
                "snr": slope(rows, snr),
                "snr_range": [float(np.min(snr[rows])), float(np.max(snr[rows]))],
            }
        fits[name] = entry
    return fits


def _ratio_summary(ratio) -> dict:
    ratio = np.asarray(ratio, float)
    if ratio.size == 0:
        return {"median": None, "min": None, "max": None}
    return {"median": float(np.median(ratio)), "min": float(np.min(ratio)), "max": float(np.max(ratio))}


def _snr_ends(rows) -> dict:
    """Per k, RLOO's (k1 in the reward) signal-to-noise ratio at the largest and the smallest
    reward variance: a task-dominated and a KL-dominated plateau, not a power law; and the same
    with ``lam = 0``, where rescaling the rewards rescales the mean and the noise alike."""
    return {
        str(row["k"]): {
            "high": row["snr"][0],
            "low": row["snr"][-1],
            "without_kl_high": row["snr_without_kl"][0],
            "without_kl_low": row["snr_without_kl"][-1],
        }
        for row in rows
        if row["name"] == f"rloo(k={row['k']}), k1 in reward"
    }


def _verdict(summary: dict, config: EstimatorsConfig) -> str:
    rows, v = summary["estimators"], summary["violations"]
    claimed = [r for r in rows if r["should_be_unbiased"]]
    closed = [r for r in rows if r["followed_error"] is not None]
    grpo = [r for r in rows if r["name"] == f"grpo(k={r['k']}), k1 in reward"]
    text = (
        f"{summary['means']} exact estimator means; {len(claimed)} that should be unbiased for "
        f"E r - lam KL: {v['unbiased']} biased beyond {config.tolerance:g}; {len(closed)} with a closed form: "
        f"{v['followed']} off it"
    )
    if grpo:
        text += (
            f"; GRPO (k1 in the reward) relative bias {fmt(min(min(r['relative_bias']) for r in grpo))} to "
            f"{fmt(max(max(r['relative_bias']) for r in grpo))} across k and reward scales"
        )
    fits = summary["passage"]["fits"]
    ratios = [run["ratio"] for fit in fits.values() for run in fit["k"].values() if run["ratio"]["median"] is not None]
    gaps = np.array(
        [abs(run["sampled"]["slope"] - fit["flow"]["slope"]) for fit in fits.values() for run in fit["k"].values()]
    )
    measured = np.isfinite(gaps)
    passage = summary["passage"]
    if ratios:
        where = (
            "in every family and k"
            if measured.all()
            else f"in the {measured.sum()} of {gaps.size} (family, k) pairs where both slopes were measured"
        )
        within = f"within {fmt(gaps[measured].max())} of the flow's {where}" if measured.any() else "not measured"
        text += (
            f"; under sampling, RLOO's mean first-passage time is {fmt(min(r['min'] for r in ratios))} to "
            f"{fmt(max(r['max'] for r in ratios))} times the flow's t_gamma, and its slope against the initial "
            f"variance is {within} "
            f"({passage['censored_instances']} of {passage['instances']} instances left out, censored)"
        )
    return text


def _findings(summary: dict, config: EstimatorsConfig) -> str:
    """Sentences computed from the atlas."""
    rows = summary["estimators"]
    k = config.ks[len(config.ks) // 2]
    by_name = {r["name"]: r for r in rows if r["k"] == k}
    text = []
    for name, claim in (
        (f"rloo(k={k}), k1 in loss", "drops the KL gradient"),
        (f"rloo(k={k}), k3 in loss", "follows the per-token forward KL"),
        (f"rloo(k={k}), k2 in loss", "follows the per-token reverse KL"),
    ):
        r = by_name.get(name)
        if r is not None:
            text.append(
                f"`{name}` {claim}: relative bias against `E r - lam KL(pi || pi_ref)` "
                f"{fmt(r['relative_bias'][0])} at the largest reward scale and {fmt(r['relative_bias'][-1])} at the smallest."
            )
    grpo = by_name.get(f"grpo(k={k}), k1 in reward")
    dr = by_name.get(f"dr_grpo(k={k}), k1 in reward")
    if grpo and dr:
        grows = grpo["relative_bias"][-1] > grpo["relative_bias"][0]
        expected_scale = (k - 1) / k
        scales = np.asarray(dr["scale"], float)
        text.append(
            "GRPO divides by the group's std of the KL-shaped rewards"
            + (", which the KL term sets once the task rewards are small" if grows else "")
            + f": relative bias {fmt(grpo['relative_bias'][0])} at the largest scale and "
            f"{fmt(grpo['relative_bias'][-1])} at the smallest, direction bias {fmt(grpo['direction_bias'][0])} and "
            f"{fmt(grpo['direction_bias'][-1])}; Dr. GRPO's direction bias is {fmt(max(dr['direction_bias']))} "
            + (
                f"(scale {fmt(scales[0])} = (k-1)/k at every reward scale)."
                if np.allclose(scales, expected_scale, rtol=1e-3)
                else f"(scale {fmt(scales.min())} to {fmt(scales.max())}, not the (k-1)/k = {fmt(expected_scale)} "
                "of a plain mean)."
            )
        )
    ends = summary["snr"]
    if ends:
        text.append(
            "Signal-to-noise ratio of one RLOO group (k1 in the reward), largest to smallest reward variance: "
            + "; ".join(f"k = {kk}: {fmt(e['high'])} to {fmt(e['low'])}" for kk, e in ends.items())
            + "; with lam = 0: "
            + "; ".join(
                f"k = {kk}: {fmt(e['without_kl_high'])} to {fmt(e['without_kl_low'])}" for kk, e in ends.items()
            )
            + "."
        )
    return " ".join(text)


def _interval(fit: dict) -> str:
    return f"{fmt(fit['slope'])} [{fmt(fit['ci'][0])}, {fmt(fit['ci'][1])}]"


def _trend(fit: dict, rising: str, falling: str, flat: str) -> str:
    """Words for a slope with its 95% interval: ``rising`` if the interval is above 0,
    ``falling`` if below, ``flat`` if it holds 0, and "has no measured trend" without an interval."""
    low, high = fit["ci"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return "has no measured trend"
    return rising if low > 0 else falling if high < 0 else flat


def _sampling_findings(passage: dict) -> str:
    """Sentences computed from Theorem 1 under sampling."""
    fits = passage["fits"]
    ks = list(passage["k"])
    text = []
    for name, fit in fits.items():
        runs = fit["k"]
        measured = [k for k in ks if np.isfinite(runs[k]["sampled"]["slope"])]
        slopes = [runs[k]["sampled"]["slope"] for k in measured]
        overlap = [
            max(runs[k]["sampled"]["ci"][0], fit["flow"]["ci"][0])
            <= min(runs[k]["sampled"]["ci"][1], fit["flow"]["ci"][1])
            for k in measured
        ]
        ratios = [runs[k]["ratio"] for k in ks if runs[k]["ratio"]["median"] is not None]
        ends = [(runs[k]["sampling_by_level"][0], runs[k]["sampling_by_level"][-1]) for k in ks]
        low, high = fit["variance_range"]
        sentence = (
            f"**{name}** (initial variance {fmt(low)} to {fmt(high)}): the flow's slope of t_gamma against the "
            f"variance is {_interval(fit['flow'])}. Exact-gradient ascent at the family's learning rate: slope "
            f"{_interval(fit['exact_ascent'])}, {fmt(fit['exact_ratio']['median'])}x the flow (median; "
            f"{fmt(fit['exact_ratio_by_level'][0])}x at the largest variance, {fmt(fit['exact_ratio_by_level'][-1])}x "
            f"at the smallest: whole updates and the Euler step). "
            + (
                f"RLOO's mean first-passage time has slopes {fmt(min(slopes))} to {fmt(max(slopes))} over "
                f"k = {', '.join(measured)} (intervals overlapping the flow's for {sum(overlap)} of {len(measured)} k; "
                f"largest difference {fmt(max(abs(x - fit['flow']['slope']) for x in slopes))})"
                if slopes
                else "RLOO's mean first-passage time has no measured slope"
            )
            + (
                f" (not measured at k = {', '.join(k for k in ks if k not in measured)})"
                if len(measured) < len(ks)
                else ""
            )
        )
        if ratios:
            sentence += (
                f" and is {fmt(min(r['min'] for r in ratios))} to {fmt(max(r['max'] for r in ratios))} times the "
                "flow's t_gamma"
            )
        sentence += (
            ". RLOO over exact ascent at the same rate, the cost of sampling alone (median over problems at the "
            "largest and the smallest variance): "
            + "; ".join(f"k = {k}: {fmt(hi)} and {fmt(lo)}" for k, (hi, lo) in zip(ks, ends))
            + "."
        )
        for more, less, costlier in (
            ("largest", "smallest", all(hi > lo for hi, lo in ends)),
            ("smallest", "largest", all(hi < lo for hi, lo in ends)),
        ):
            if costlier:
                sentence += (
                    f" For every k, sampling costs more at the {more} variance than at the {less} (medians over "
                    f"{fit['problems']} problems, without an interval)."
                )
        left_out = max(runs[k]["left_out"] for k in ks)
        if left_out:
            sentence += f" Left out of these times: up to {left_out} of {fit['instances']} instances (censored)."
        text.append(sentence)
    if len(ks) > 1:
        first, last = ks[0], ks[-1]
        factors = {
            name: fit["k"][first]["cv"] / fit["k"][last]["cv"]
            for name, fit in fits.items()
            if fit["k"][first]["cv"] and fit["k"][last]["cv"]
        }
        if factors:
            text.append(
                f"From k = {first} to k = {last} the coefficient of variation of the sampled time (over seeds) "
                "changes by a factor " + ", ".join(f"1/{fmt(f)} ({name})" for name, f in factors.items()) + "."
            )
    peaked = fits.get("peaked")
    if peaked:
        runs = peaked["k"]
        text.append(
            f"In the peaked family the share of groups whose {ks[0]} rewards tie is up to "
            f"{fmt(runs[ks[0]]['tied_start_max'])} at the start (median along the run {fmt(runs[ks[0]]['tied_along'])})"
            + (
                f"; with k = {ks[-1]} up to {fmt(runs[ks[-1]]['tied_start_max'])} (median {fmt(runs[ks[-1]]['tied_along'])})"
                if len(ks) > 1
                else ""
            )
            + ". One group's signal-to-noise ratio there "
            + "; ".join(
                f"{_trend(runs[k]['snr'], 'grows', 'falls', 'shows no trend')} with the variance at k = {k} "
                f"(slope {_interval(runs[k]['snr'])})"
                for k in ks
            )
            + "."
        )
    scaled = fits.get("scaled")
    if scaled:
        runs = scaled["k"]
        steepest = max(abs(runs[k]["snr"]["slope"]) for k in ks)
        sentence = (
            "In the scaled family (lam = 0) one group's signal-to-noise ratio "
            + (
                f"does not depend on the variance (|slope| at most {fmt(steepest)})"
                if steepest < 1e-6
                else f"has slopes {', '.join(fmt(runs[k]['snr']['slope']) for k in ks)} against the variance"
            )
            + f"; it is {fmt(runs[ks[0]]['snr_range'][0])}-{fmt(runs[ks[0]]['snr_range'][1])} at k = {ks[0]}"
        )
        if len(ks) > 1:
            sentence += f" and {fmt(runs[ks[-1]]['snr_range'][0])}-{fmt(runs[ks[-1]]['snr_range'][1])} at k = {ks[-1]}"
        text.append(sentence + ".")
    return "\n\n".join(text)


def _sampling_table(passage: dict) -> str:
    rows = []
    for name, fit in passage["fits"].items():
        for k, run in fit["k"].items():
            rows.append(
                f"| {name} | {k} | {_interval(fit['flow'])} | {_interval(fit['exact_ascent'])} | "
                f"{_interval(run['sampled'])} | "
                f"{fmt(run['ratio']['median'])} ({fmt(run['ratio']['min'])}-{fmt(run['ratio']['max'])}) | "
                f"{fmt(run['sampling_ratio']['median'])} ({fmt(run['sampling_ratio']['min'])}-"
                f"{fmt(run['sampling_ratio']['max'])}) | "
                f"{fmt(run['cv'])} | {fmt(run['tied_along'])} | {_interval(run['snr'])} | {run['left_out']} |"
            )
    return "\n".join(rows)


MAPS = (  # (panel title, estimator name at k without its "(k=...)", measure)
    ("GRPO, k1 in reward: relative bias", "grpo, k1 in reward", "relative_bias"),
    ("RLOO, k1 in loss: relative bias", "rloo, k1 in loss", "relative_bias"),
    ("RLOO, k3 in loss: relative bias", "rloo, k3 in loss", "relative_bias"),
    ("RLOO, k2 in reward: relative bias", "rloo, k2 in reward", "relative_bias"),
    ("RLOO, group normalization: relative bias", "rloo, k1 in reward, group normalization", "relative_bias"),
    ("REINFORCE, k1 in reward: SNR", "reinforce, k1 in reward", "snr"),
    ("RLOO, k1 in reward: SNR", "rloo, k1 in reward", "snr"),
    ("RLOO, lam = 0: SNR", "rloo, k1 in reward", "snr_without_kl"),
)


def _map_values(rows, name, measure, ks) -> np.ndarray:
    """``[len(ks), scales]`` of ``measure`` for the estimator called ``name`` (its ``(k=...)`` left out)."""
    adv, rest = name.split(", ", 1)
    by_name = {r["name"]: r for r in rows}
    return np.array([by_name[f"{adv}(k={k}), {rest}"][measure] for k in ks], float)


def _figure(summary: dict, config: EstimatorsConfig, path: Path):
    """Maps over reward variance (columns, largest first) and ``k`` (rows), one per measure."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.4))
    variance = summary["variance"]
    for ax, (title, name, measure) in zip(axes.ravel(), MAPS):
        values = _map_values(summary["estimators"], name, measure, config.ks)
        image = ax.imshow(np.log10(np.maximum(values, 1e-17)), aspect="auto", cmap="viridis")
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, fmt(value, 2), ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(variance)), [fmt(v, 2) for v in variance], fontsize=7)
        ax.set_yticks(range(len(config.ks)), [str(k) for k in config.ks])
        ax.set(xlabel="reward variance (median over problems)", ylabel="k", title=title)
        ax.title.set_fontsize(9)
        fig.colorbar(image, ax=ax, label="log10")
    fig.suptitle(
        f"Exact estimator moments against grad(E r - lam KL), lam = {config.kl_coef:g} (medians over problems)"
    )
    save_figure(fig, path)


def _level_medians(passage: dict, family: int, values) -> tuple[np.ndarray, np.ndarray]:
    """Per variance level of ``family``: the median over base problems of the variance and of
    ``values`` (NaN where any is missing)."""
    family_rows = np.asarray(passage["family"]) == family
    level = np.asarray(passage["level"])[family_rows]
    variance = np.asarray(passage["variance"])[family_rows]
    values = np.asarray(values, float)[family_rows]
    levels = np.unique(level)
    return (
        np.array([np.median(variance[level == j]) for j in levels]),
        np.array([np.median(values[level == j]) for j in levels]),
    )


def _passage_figure(passage: dict, path: Path):
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(passage["k"])))
    flow_t, exact_t = np.asarray(passage["flow"]), np.asarray(passage["exact_ascent"])
    # An instance with a censored run would show the mean of its faster seeds only: left out.
    means = {k: np.where(_usable(passage, k), run["mean"], np.nan) for k, run in passage["k"].items()}
    for f, (ax, name) in enumerate(zip(axes[0], passage["families"])):
        ax.loglog(*_level_medians(passage, f, flow_t), "k-", lw=2, label="exact flow t_gamma")
        ax.loglog(*_level_medians(passage, f, exact_t), "k--", label="exact-gradient ascent")
        for color, (k, mean) in zip(colors, means.items()):
            ax.loglog(*_level_medians(passage, f, mean), "o", color=color, label=f"RLOO k = {k} (mean of seeds)")
        ax.set(xlabel="initial reward variance", ylabel="time to gain gamma", title=f"{name} (medians over problems)")
        ax.legend(fontsize=7)
    ratio_ax, tied_ax, snr_ax = axes[1]
    for f, (name, style) in enumerate(zip(passage["families"], ("s--", "^:", "o-"))):
        for color, (k, run) in zip(colors, passage["k"].items()):
            label = f"{name}, k = {k}"
            ratio_ax.semilogx(*_level_medians(passage, f, means[k] / exact_t), style, color=color, label=label, ms=4)
            tied_ax.loglog(*_level_medians(passage, f, run["tied_along"]), style, color=color, label=label, ms=4)
            if name != "scaled_kl":  # at the start, the reference, its groups are scaled's
                snr_ax.loglog(*_level_medians(passage, f, run["snr"]), style, color=color, label=label, ms=4)
    ratio_ax.axhline(1.0, color="k", lw=0.8)
    ratio_ax.set(
        xlabel="initial reward variance",
        ylabel="mean RLOO time / exact-ascent time",
        title="cost of sampling (same learning rate)",
    )
    tied_ax.set(
        xlabel="initial reward variance",
        ylabel="P(k rewards of a group tie)",
        title="groups with zero sampled variance (mean along the run)",
    )
    snr_ax.set(
        xlabel="initial reward variance", ylabel="||E g||^2 / trace Cov g", title="SNR of one RLOO group at the start"
    )
    for ax in axes[1]:
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def _markdown(summary: dict, config: EstimatorsConfig) -> str:
    k = config.ks[len(config.ks) // 2]
    rows = "\n".join(
        f"| {r['name'].split(', ', 1)[0]} | {r['name'].split(', ', 1)[1] if ', ' in r['name'] else ''} | {r['follows']} | "
        f"{fmt(r['relative_bias'][0])} | {fmt(r['relative_bias'][-1])} | {fmt(r['cosine'][-1])} | "
        f"{fmt(r['direction_bias'][-1])} | {fmt(r['snr'][0])} | {fmt(r['snr'][-1])} |"
        for r in summary["estimators"]
        if r["k"] == k
    )
    v, passage = summary["violations"], summary["passage"]
    high, low = summary["variance"][0], summary["variance"][-1]
    return f"""## What each estimator optimizes: the exact estimator atlas

**Verdict:** {summary["verdict"]}.

{config.problems} random one-prompt problems on an autoregressive-tabular policy (V = {config.vocab_size},
L = {config.length}), a reference policy at distance {config.ref_distance:g}, `lam = {config.kl_coef:g}`, task
rewards scaled so that their variance under the policy runs from {fmt(high)} to {fmt(low)}; every estimator's
gradient mean and covariance is exact (every multiset of k outputs). Violations: should-be-unbiased estimators
biased beyond {config.tolerance:g}: {v["unbiased"]}; means off their closed form: {v["followed"]}.

{_findings(summary, config)}

![bias and signal-to-noise maps](figures/{NAME}.png)

At k = {k} (medians over problems; "high"/"low" are the largest and smallest reward variance):

| estimator | KL and variant | follows (docs/theory.md) | rel. bias, high | rel. bias, low | cosine, low | direction bias, low | SNR, high | SNR, low |
|---|---|---|---|---|---|---|---|---|
{rows}

### Theorem 1 under sampling

{passage["instances"]} one-prompt tabular problems (|Y| = {config.passage_outputs}; {config.passage_problems} base
problems x {config.passage_levels} variance levels over {config.passage_decades:g} decades x 3 families:
`scaled` (r_RM = eps r, lam = 0), `scaled_kl` (the same with lam = {config.kl_coef:g}), `peaked` (lam = 0, the initial
policy concentrated on its worst output); docs/theory.md#theorem-1-under-sampling). Each is timed by the exact flow,
by exact-gradient ascent and by RLOO ascent (k1 in the reward) with k = {", ".join(passage["k"])} and
{passage["seeds"]} seeds; one SGD learning rate per family, its fastest flow time over
{config.passage_resolution}. Runs not passed within {config.censor_factor:g}x their level's slowest flow time are
censored: {passage["censored_instances"]} instances have no flow time, an exact ascent that did not pass or a censored
RLOO run, and are left out of the times below (counted in the last column).

{_sampling_findings(passage)}

| family | k | flow slope [95%] | exact ascent slope [95%] | RLOO slope [95%] | RLOO / flow time, median (range) | RLOO / exact ascent time | CV of RLOO time | tied groups along the run | SNR slope [95%] | instances left out |
|---|---|---|---|---|---|---|---|---|---|---|
{_sampling_table(passage)}

Slopes are the mean of the base problems' own slopes, with its t-interval over the problems ({config.passage_problems}); "tied groups" is the median over instances
of the mean, along a run, of the exact probability that a group's k rewards are all equal (with these distinct
rewards the group repeats one output, and its RLOO advantages are 0); the coefficient of variation is over seeds (ddof = 1). The signal-to-noise ratio is that of one group at the
initial policy, which is also the reference: the KL vanishes there, so `scaled_kl` shares `scaled`'s.

![first-passage times under sampling](figures/{NAME}_passage.png)
"""
