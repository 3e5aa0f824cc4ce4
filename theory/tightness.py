"""Tightness atlas: how fast can a teacher of a given reward variance be, adversarially?

Razin et al. prove ``t_gamma = Omega(Var^(-1/3))`` for general autoregressive policies (Theorem 4)
and ``Omega(Var^(-1/2))`` for tabular ones (Proposition 3), without saying whether ``-1/3`` is
attained; this project's Proposition A (docs/theory.md#proposition-a) claims ``-1/2`` for all.

At every variance level ``Var[r_RM] = v`` under the initial policy, *independent* searches look
for the instance with the smallest ``t_gamma`` (gain ``gamma`` of a timed reward in ``[-1, 1]``,
fixed), over the initial policy, the reward model, the timed reward and ``lam``. The variance is
fixed, so that is the smallest ratio to each bound at once (``lam <= max_kl_coef < 21 / gamma``
keeps Theorem 4's ``lam`` branch out; theorem1's ``lam`` family checks it). Searches never
share candidates across levels: the exponent is read off how the minimum moves.

Why independence matters (docs/theory.md#the-tightness-atlas): at ``lam = 0`` scaling ``r_RM`` by
``s`` rescales time by ``1/s``, so a fixed structure scaled to every level gives slope ``-1/2`` by
construction. What can change the exponent is structure that is only *feasible* (``|r_RM| <= 1``)
at small variance: reward on outputs whose probability is of the order of ``v``, policies whose
mode holds all but about ``v`` of the mass. The searches start there as well as at random:

- ``free``: every logit, every output's reward-model and timed reward, a temperature, ``lam``
  and the timed reward's alignment with the reward model are coordinates (classes with at most ``max_free_outputs`` outputs).
- ``free_peaked``: the same, started with the temperature at which the initial policy's mode
  holds all but ``2 v`` of the mass.
- ``by_probability``: random logit direction times a searched temperature; both rewards are
  functions (piecewise linear in ``log10 pi_0(y)``, knots every two decades) of each output's
  initial probability, which scales to ``|Y| = 1000``.
- ``rare_outputs``: ``by_probability`` started with the reward concentrated on outputs of
  probability about ``v``.
- ``peaked``: ``by_probability`` started near-deterministic, like ``free_peaked``.

Each search is a (mu + lambda) evolution strategy (Gaussian mutations of the best candidates so
far, with a decaying step) on ``log(t_gamma / Proposition A bound)``, repeated ``restarts`` times
from fresh draws; every generation of every search, level and restart of a class is one batched
exact solve (:func:`jaxrm.flow.first_passage`), each instance solved once. An instance below a
bound is saved to ``tightness_violations.json`` and fails the run.

Every level also gets a *rescaled reference*: the best ratio of any ``lam = 0`` instance found at
another level whose scaled copy is feasible at this one; the true minimum is never above it, so
``rescaling_gap = own best / reference > 1`` measures what the level's own search missed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import scipy.special

from jaxrm import bounds, flow, metrics
from jaxrm.studies import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Progress,
    StudyConfig,
    checked,
    distinct,
    each,
    finish_study,
    fmt,
    int_at_least,
    one_of,
    pyplot,
    save_figure,
    save_violations,
    write_json,
)
from jaxrm.tabular import AutoregressiveTabularPolicy, LogLinearPolicy, SharedAutoregressivePolicy, TabularPolicy
from theory.common import SLOPE_TOLERANCE, loglog_slope

NAME = "tightness"
CLASS_NAMES = (
    "tabular",
    "tabular_1000",
    "autoregressive_L2",
    "autoregressive_L3",
    "autoregressive_1000",
    "log_linear",
    "shared_L3",
)
START_NAMES = ("free", "free_peaked", "by_probability", "rare_outputs", "peaked")
# Knots of the by-probability rewards, in log10 of an output's initial probability.
KNOTS = np.linspace(-16.0, 0.0, 9)
VIOLATION_TOLERANCE = 1e-6  # relative: the solver's tolerance is 1e-8
MINUS_THIRD_TOLERANCE = 0.02  # an envelope "reaches -1/3" when its interval's top is above -1/3 - this
GAP_TOLERANCE = 1.05  # a level's search "fell short" when a rescaled instance beats it by more than this
UNREACHED_FITNESS = 50.0  # log-ratio of an unreached or infeasible candidate (all reached ones are far below)


@dataclasses.dataclass(frozen=True)
class TightnessConfig(StudyConfig):
    """Search and solver settings of the tightness atlas; the searches are described in the
    module docstring. Fields with a range are checked on construction.

    Attributes:
      seed: seed of the searches' draws and of the log-linear and shared classes' features.
      population: candidates per generation of each search (an int >= 4).
      generations: generations of each search (an int >= 1).
      elite: best candidates kept each generation (an int >= 1, below ``population``); the
        rest of the next generation are mutated copies of them.
      restarts: independent repetitions of every search from fresh draws (an int >= 1).
      step_size: initial standard deviation of the Gaussian mutations, multiplied by 0.85
        after every generation.
      log10_variances: the variance levels ``Var[r_RM] = 10^x`` under the initial policy (at
        least 3, each in ``[-12, 0)``); a candidate whose reward model leaves ``[-1, 1]`` at a
        level is infeasible there.
      gamma: the gain of the timed reward, fixed for every instance, in ``(0, 1)``.
      max_kl_coef: the largest searched KL coefficient, ``lam = clip(z, 0, 1) * max_kl_coef``
        for the candidate's last coordinate ``z`` (0 forces ``lam = 0``); below ``21 / gamma``.
      t_max: flow time after which a gain counts as not reached (censored); far beyond the
        fastest times, which are all the atlas keeps.
      max_steps: ODE steps after which a solve gives up (counted with the censored, and apart
        as ``solver_failures``): the fastest instances take tens of steps, and one stiff
        candidate would otherwise hold the batched solve for minutes.
      rtol: relative tolerance of the adaptive ODE solver.
      atol: absolute tolerance of the adaptive ODE solver.
      classes: the policy classes searched, by name: ``tabular`` (8 outputs),
        ``tabular_1000``, ``autoregressive_L2`` (``V = 3``), ``autoregressive_L3`` (``V = 2``),
        ``autoregressive_1000`` (``V = 10, L = 3``), ``log_linear`` (8 outputs, ``d = 4``,
        ``J = ||Phi||_2``) and ``shared_L3`` (the shared-parameter autoregressive policy of
        Theorem 4, ``V = 2, L = 3, d = 3``).
      starts: the searches run at every level, by name (see the module docstring).
      max_free_outputs: the ``free`` searches run only on classes with at most this many
        outputs (their dimension grows with ``|Y|``).
    """

    seed: int = 0
    population: int = checked(12, int_at_least(4))
    generations: int = checked(10, POSITIVE_INT)
    elite: int = checked(3, POSITIVE_INT)
    restarts: int = checked(2, POSITIVE_INT)
    step_size: float = checked(0.5, POSITIVE)
    log10_variances: tuple[float, ...] = checked(
        (-2, -3, -4, -5, -6, -7, -8),
        distinct((lambda v: len(v) >= 3 and all(-12 <= x < 0 for x in v), "at least 3 levels, each in [-12, 0)")),
    )
    gamma: float = checked(0.1, (lambda v: 0 < v < 1, "in (0, 1)"))
    max_kl_coef: float = checked(0.5, NON_NEGATIVE)
    t_max: float = checked(1e9, POSITIVE)
    max_steps: int = checked(2000, POSITIVE_INT)
    rtol: float = checked(1e-8, POSITIVE)
    atol: float = checked(1e-10, POSITIVE)
    classes: tuple[str, ...] = checked(CLASS_NAMES, distinct(each(one_of(CLASS_NAMES))))
    starts: tuple[str, ...] = checked(START_NAMES, distinct(each(one_of(START_NAMES))))
    max_free_outputs: int = checked(64, POSITIVE_INT)

    def __post_init__(self):
        super().__post_init__()
        if self.elite >= self.population:
            raise ValueError(f"TightnessConfig.elite={self.elite}: must be < population={self.population}.")
        if self.max_kl_coef >= 21.0 / self.gamma:
            raise ValueError(
                f"TightnessConfig.max_kl_coef={self.max_kl_coef}: must be below 21 / gamma = {21 / self.gamma:g}, "
                "where Theorem 4's bound would depend on lam and one search could not serve every bound."
            )

    def quick(self) -> "TightnessConfig":
        return dataclasses.replace(
            self,
            population=6,
            generations=2,
            elite=2,
            restarts=1,
            log10_variances=(-2, -4, -6),
            classes=("autoregressive_L2",),
        )


class PolicyClass(NamedTuple):
    name: str
    policy: Any
    param_shapes: tuple  # shapes of the policy's parameters for one prompt

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.param_shapes)

    def unflatten(self, flat):
        """``[N, num_params]`` -> the policy's parameters for ``N`` one-prompt problems."""
        parts = np.split(flat, np.cumsum([int(np.prod(s)) for s in self.param_shapes])[:-1], axis=-1)
        leaves = [p.reshape(len(flat), 1, *shape) for p, shape in zip(parts, self.param_shapes)]
        return leaves[0] if len(leaves) == 1 else tuple(leaves)

    def log_probs(self, flat):
        """``[N, |Y|]`` initial log-probabilities of the parameters ``flat [N, num_params]``."""
        return np.asarray(self.policy.log_probs(self.unflatten(flat)))[:, 0]


def policy_classes(seed: int, names=CLASS_NAMES) -> list[PolicyClass]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(8, 4)) / 2.0
    shared = rng.normal(size=(3, 2, 3)) / np.sqrt(3)  # V = 2, d = 3: next-token features per state
    classes = [
        PolicyClass("tabular", TabularPolicy(8), ((8,),)),
        PolicyClass("tabular_1000", TabularPolicy(1000), ((1000,),)),
        PolicyClass("autoregressive_L2", AutoregressiveTabularPolicy(3, 2), ((1, 3), (3, 3))),
        PolicyClass("autoregressive_L3", AutoregressiveTabularPolicy(2, 3), ((1, 2), (2, 2), (4, 2))),
        PolicyClass("autoregressive_1000", AutoregressiveTabularPolicy(10, 3), ((1, 10), (10, 10), (100, 10))),
        PolicyClass("log_linear", LogLinearPolicy(features), ((4,),)),
        PolicyClass("shared_L3", SharedAutoregressivePolicy(shared, 3), ((3,),)),
    ]
    return [c for c in classes if c.name in names]


# ---------------------------------------------------------------------------------------------
# Searches: a start names a parametrization of the instance and how its first generation is drawn.


class Instances(NamedTuple):
    """Candidates decoded at one variance level; leading axis ``N``."""

    params: np.ndarray  # [N, num_params] initial policy parameters
    log_probs: np.ndarray  # [N, |Y|] initial log-probabilities
    rm: np.ndarray  # [N, |Y|] reward model, Var = v under the initial policy
    timed: np.ndarray  # [N, |Y|] timed reward in [-1, 1]
    kl_coef: np.ndarray  # [N]
    feasible: np.ndarray  # [N] |r_RM| <= 1


def _by_probability(start: str) -> bool:
    return start in ("by_probability", "rare_outputs", "peaked")


def _dimension(cls: PolicyClass, start: str, num_outputs: int) -> int:
    """Search coordinates: [temperature, (free logits), reward model, timed reward, alignment, lam]."""
    if _by_probability(start):
        return 1 + 2 * len(KNOTS) + 2
    return 1 + cls.num_params + 2 * num_outputs + 2


def _standardized(values, log_probs):
    """``values`` centred and scaled to unit variance under ``pi_0``, and that spread."""
    probs = np.exp(log_probs)
    centred = values - (probs * values).sum(-1, keepdims=True)
    spread = np.sqrt((probs * centred**2).sum(-1, keepdims=True))
    return centred / np.maximum(spread, 1e-300), spread[:, 0]


def _decode(cls: PolicyClass, start: str, z, direction, variance: float, config: TightnessConfig) -> Instances:
    """Search vectors ``z [N, D]`` -> instances at variance level ``v``; ``direction [N, P]`` is
    the logit direction of the by-probability starts (drawn once per restart)."""
    log_temperature = np.clip(z[:, 0], -5.0, 8.0)  # beyond e^8 every class is deterministic in float64
    lam = np.clip(z[:, -1], 0.0, 1.0) * config.max_kl_coef
    if _by_probability(start):
        params = np.exp(log_temperature)[:, None] * direction
        log_probs = cls.log_probs(params)
        position = np.clip(log_probs / np.log(10.0), KNOTS[0], 0.0)
        rm_shape, timed_shape = np.split(z[:, 1:-2], 2, axis=-1)
        interpolate = lambda values: np.stack([np.interp(p, KNOTS, v) for p, v in zip(position, values)])  # noqa: E731
        raw_rm, raw_timed = interpolate(rm_shape), interpolate(timed_shape)
    else:
        params = np.exp(log_temperature)[:, None] * z[:, 1 : 1 + cls.num_params]
        log_probs = cls.log_probs(params)
        raw_rm, raw_timed = np.split(z[:, 1 + cls.num_params : -2], 2, axis=-1)
    unit, spread = _standardized(raw_rm, log_probs)
    rm = np.sqrt(variance) * unit
    feasible = (np.abs(rm).max(-1) <= 1.0) & (spread > 1e-12)
    # The alignment coordinate lets the timed reward follow the reward model's ranking at once.
    timed = np.tanh(raw_timed + z[:, -2:-1] * np.clip(unit, -3.0, 3.0))
    return Instances(params, log_probs, rm, timed, lam, feasible)


def _temperature_for(cls: PolicyClass, direction, statistic, target, *, steps=40):
    """Per row, the log-temperature ``b`` in [-3, 6] at which ``statistic(log pi_0)`` of
    ``exp(b) * direction`` equals ``target`` (both decrease as the policy sharpens; bisection)."""
    low, high = np.full(len(direction), -3.0), np.full(len(direction), 6.0)
    for _ in range(steps):
        middle = (low + high) / 2
        above = statistic(cls.log_probs(np.exp(middle)[:, None] * direction)) > target
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    return (low + high) / 2


def _off_mode_mass(log_probs):
    """``log(1 - max_y pi_0(y))``, accurate when the mode holds nearly everything."""
    others = np.where(np.arange(log_probs.shape[-1]) == log_probs.argmax(-1)[:, None], -np.inf, log_probs)
    return scipy.special.logsumexp(others, axis=-1)


def _smallest_probability(log_probs):
    return log_probs.min(-1)


def _first_generation(cls, start, num_outputs, variance, direction, rng, config):
    """The starting population of one search at one level (``[population, D]``)."""
    z = rng.normal(size=(config.population, _dimension(cls, start, num_outputs)))
    if start == "rare_outputs":
        # Reward-model shape: a bump two decades wide at probability v; the temperature puts
        # the least likely outputs a decade below v.
        bump = 3.0 * np.exp(-0.5 * ((KNOTS - np.log10(variance)) / 1.0) ** 2)
        z[:, 1 : 1 + len(KNOTS)] = bump + 0.3 * z[:, 1 : 1 + len(KNOTS)]
        z[:, 0] = _temperature_for(cls, direction, _smallest_probability, np.log(variance / 10))
    elif start in ("peaked", "free_peaked"):
        logits = direction if start == "peaked" else z[:, 1 : 1 + cls.num_params]
        z[:, 0] = _temperature_for(cls, logits, _off_mode_mass, np.log(2 * variance))
    return z


def _fitness(ratio, instances: Instances):
    """``log(t / bound)``; unreached candidates at ``UNREACHED_FITNESS``, infeasible ones above
    it by how far their reward model leaves ``[-1, 1]`` (a slope back to feasibility)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(np.isfinite(ratio), np.log(ratio), UNREACHED_FITNESS)
    excess = np.log(np.maximum(np.abs(instances.rm).max(-1), 1.0))
    return np.where(instances.feasible, value, UNREACHED_FITNESS + 1.0 + excess)


class Search(NamedTuple):
    """One evolution strategy: a start at one level in one restart."""

    start: str
    level: int
    restart: int


def _solve(cls: PolicyClass, batch: Instances, config: TightnessConfig, *, max_steps: int):
    """``(t_gamma, t_end, steps, failed)`` per instance; infeasible ones are not moved (their
    reward model is zeroed) and count as unreached."""
    result = flow.first_passage(
        cls.unflatten(batch.params),
        np.where(batch.feasible[:, None], batch.rm, 0.0)[:, None],
        config.gamma,
        policy=cls.policy,
        eval_rewards=batch.timed[:, None],
        kl_coef=batch.kl_coef,
        rtol=config.rtol,
        atol=config.atol,
        t_max=config.t_max,
        max_steps=max_steps,
    )
    t = np.where(batch.feasible, np.asarray(result.t_gamma)[:, 0], np.inf)
    failed = batch.feasible & (np.asarray(result.status)[:, 0] == flow.Status.FAILED)
    return t, np.asarray(result.t_end)[:, 0], np.asarray(result.num_steps)[:, 0], failed


def search_class(cls: PolicyClass, config: TightnessConfig, progress=None) -> dict:
    """Every search of one class, generation by generation, all searches in one solve each.

    Each search is a (mu + lambda) evolution strategy: every generation solves ``population``
    new candidates, mutated copies of the ``elite`` best found so far, which are kept without
    being solved again. Returns every solved instance once, flattened over (generation, search,
    candidate), with the search each came from, and per level the best ratio to Proposition A
    after each generation (``trace``). Solves that spent ``max_steps`` and could still hide a
    time below a bound (``t_end`` under it) are solved again with 50 times the steps."""
    rng = np.random.default_rng([config.seed, CLASS_NAMES.index(cls.name)])
    num_outputs = cls.log_probs(np.zeros((1, cls.num_params))).shape[-1]
    levels = 10.0 ** np.asarray(config.log10_variances, float)
    starts = [s for s in config.starts if _by_probability(s) or num_outputs <= config.max_free_outputs]
    searches = [
        Search(start, level, restart)
        for restart in range(config.restarts)
        for start in starts
        for level in range(len(levels))
    ]
    # By-probability starts fix a random logit direction per candidate, inherited by its children.
    directions = [
        rng.normal(size=(config.population, cls.num_params if _by_probability(s.start) else 0)) for s in searches
    ]
    population = [
        _first_generation(cls, s.start, num_outputs, levels[s.level], d, rng, config)
        for s, d in zip(searches, directions)
    ]
    elites = [None] * len(searches)  # (z, direction, fitness) of each search's best so far
    level_of_row = np.repeat([s.level for s in searches], config.population)
    sigma = config.step_size
    seen, trace = [], []
    for generation in range(config.generations):
        decoded = [
            _decode(cls, s.start, z, d, levels[s.level], config) for s, z, d in zip(searches, population, directions)
        ]
        batch = Instances(*(np.concatenate(parts) for parts in zip(*decoded)))
        t, t_end, steps, failed = _solve(cls, batch, config, max_steps=config.max_steps)
        variance = np.asarray(metrics.reward_variance(batch.log_probs, np.where(batch.feasible[:, None], batch.rm, 0)))
        ratio = bound_ratios(cls, t, variance, batch.kl_coef, config.gamma)["sharpened"]
        seen.append(
            dict(
                instances=batch,
                t=t,
                t_end=t_end,
                variance=variance,
                steps=steps,
                failed=failed,
                search=np.repeat(np.arange(len(searches)), config.population),
            )
        )
        finite_ratio = np.where(np.isfinite(ratio), ratio, np.inf)
        generation_best = [finite_ratio[level_of_row == level].min(initial=np.inf) for level in range(len(levels))]
        trace.append(np.minimum(trace[-1], generation_best) if trace else np.asarray(generation_best))
        for i in range(len(searches)):
            rows = slice(i * config.population, (i + 1) * config.population)
            pool = (population[i], directions[i], _fitness(ratio[rows], decoded[i]))
            if elites[i] is not None:
                pool = tuple(np.concatenate(pair) for pair in zip(elites[i], pool))
            order = np.argsort(pool[2])[: config.elite]
            elites[i] = tuple(part[order] for part in pool)
            parents = rng.integers(0, config.elite, config.population)
            population[i] = elites[i][0][parents] + sigma * rng.normal(size=(config.population, pool[0].shape[1]))
            directions[i] = elites[i][1][parents]
        sigma *= 0.85
        if progress:
            best = min(e[2][0] for e in elites)
            progress(
                f"{cls.name:19s} generation {generation + 1}/{config.generations}: {len(t)} instances, "
                f"best log(t / Prop A) {best:.3f}"
            )
    found = {
        key: np.concatenate([s[key] for s in seen]) for key in ("t", "t_end", "variance", "steps", "failed", "search")
    }
    found["instances"] = Instances(*(np.concatenate(parts) for parts in zip(*(s["instances"] for s in seen))))
    found["resolved_failures"] = _resolve_failures(cls, found, config)
    found["searches"] = searches
    found["trace"] = np.stack(trace)  # [generation, level]: best ratio to Proposition A so far
    found["num_outputs"] = num_outputs
    return found


def _resolve_failures(cls: PolicyClass, found: dict, config: TightnessConfig) -> int:
    """Solve again, with 50 times the steps, the failed solves whose time so far lies below a
    bound (one of them could be a violation); updates ``found`` in place, returns how many."""
    instances = found["instances"]
    lower = bound_ratios(cls, found["t_end"], found["variance"], instances.kl_coef, config.gamma)
    undecided = np.flatnonzero(found["failed"] & (np.min(list(lower.values()), axis=0) < 1))
    if len(undecided):
        subset = Instances(*(part[undecided] for part in instances))
        t, t_end, steps, failed = _solve(cls, subset, config, max_steps=50 * config.max_steps)
        for key, value in (("t", t), ("t_end", t_end), ("failed", failed)):
            found[key][undecided] = value
        found["steps"][undecided] += steps
    return len(undecided)


# ---------------------------------------------------------------------------------------------
# The atlas: per class and level, the smallest ratios, the effort, and what the minimizers look like.


def bound_ratios(cls: PolicyClass, t, variance, kl_coef, gamma) -> dict[str, np.ndarray]:
    """``t_gamma / bound`` for every bound that applies to the class (NaN where both are inf)."""
    length, jac = cls.policy.length, cls.policy.jacobian_norm
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = {
            "theorem4": t
            / bounds.theorem4_lower_bound(gamma, variance, kl_coef=kl_coef, length=length, jacobian_norm=jac),
            "sharpened": t / bounds.proposition_a_lower_bound(gamma, variance, length=length, jacobian_norm=jac),
        }
        if isinstance(cls.policy, TabularPolicy):
            ratios["prop3"] = t / bounds.proposition3_lower_bound(gamma, variance, num_prompts=1)
    return ratios


def describe(instances: Instances, row: int) -> dict:
    """What an instance looks like: how peaked its initial policy is and where its reward sits."""
    log_probs, rm = instances.log_probs[row], instances.rm[row]
    probs = np.exp(log_probs)
    rewarded = rm > 0
    return {
        "max_probability": float(probs.max()),
        "rewarded_mass": float(probs[rewarded].sum()),
        "max_abs_rm": float(np.abs(rm).max()),
        "entropy": float(-(probs * log_probs).sum()),
        "kl_coef": float(instances.kl_coef[row]),
    }


def full_instance(cls: PolicyClass, instances: Instances, row: int, **extra) -> dict:
    """Everything needed to re-solve the instance, as JSON."""
    params = jax.tree.map(lambda a: np.asarray(a)[0, 0].tolist(), cls.unflatten(instances.params[row : row + 1]))
    return {
        "class": cls.name,
        "params": params,
        "rm_rewards": instances.rm[row].tolist(),
        "timed_rewards": instances.timed[row].tolist(),
        "kl_coef": float(instances.kl_coef[row]),
        **extra,
    }


def envelope_slope(log10_variances, envelope):
    """Least-squares slope of ``log t`` on ``log Var`` over the levels with a finite envelope,
    with a 95% t-interval from the residuals (few points: wide when the envelope bends)."""
    variances, envelope = 10.0 ** np.asarray(log10_variances, float), np.asarray(envelope, float)
    ok = np.isfinite(envelope)
    slope, interval = loglog_slope(variances[ok], envelope[ok], interval="t")
    return slope, list(interval)


def rescaled_references(ratio, variance, max_abs_rm, lam_zero, level_of_row, levels):
    """Per level ``v``, the best ratio to Proposition A of any instance searched at *another*
    level that, scaled to variance ``v``, stays feasible: ``lam = 0`` and
    ``max |r_RM| sqrt(v / v_row) <= 1`` (always true downwards). Scaling keeps the ratio, so
    the true minimum at ``v`` is never above it (``inf`` when there is none)."""
    candidates = lam_zero & np.isfinite(ratio)
    references = []
    for level, v in enumerate(levels):
        usable = candidates & (level_of_row != level)
        usable[usable] = max_abs_rm[usable] * np.sqrt(v / variance[usable]) <= 1.0
        references.append(float(ratio[usable].min(initial=np.inf)))
    return references


def atlas_class(cls: PolicyClass, found: dict, config: TightnessConfig) -> tuple[dict, dict, list]:
    """The class's row of the atlas, its minimizers per level, and its instances below a bound."""
    instances, t, variance = found["instances"], found["t"], found["variance"]
    searches = found["searches"]
    search_level = np.array([s.level for s in searches])[found["search"]]
    ratios = bound_ratios(cls, t, variance, instances.kl_coef, config.gamma)
    lower = bound_ratios(cls, found["t_end"], variance, instances.kl_coef, config.gamma)["sharpened"]
    reached = np.isfinite(t)
    levels_v = 10.0 ** np.asarray(config.log10_variances, float)
    references = rescaled_references(
        ratios["sharpened"],
        variance,
        np.abs(instances.rm).max(-1),
        instances.kl_coef == 0,
        search_level,
        levels_v,
    )
    prop_a = bounds.proposition_a_lower_bound(
        config.gamma, levels_v, length=cls.policy.length, jacobian_norm=cls.policy.jacobian_norm
    )
    levels, minimizers = [], {}
    for level, log10_v in enumerate(config.log10_variances):
        here = search_level == level
        sharpened = np.where(here & reached, ratios["sharpened"], np.inf)
        row = int(np.argmin(sharpened))
        entry = {
            "log10_variance": log10_v,
            "evaluated": int(here.sum()),
            "feasible": int((here & instances.feasible).sum()),
            "censored": int((here & instances.feasible & ~reached).sum()),
            "solver_failures": int((here & found["failed"]).sum()),
            # A failed solve only bounds its time from below: it could still beat the minimizer.
            "failures_possibly_faster": int((here & found["failed"] & (lower < sharpened[row])).sum()),
            "ode_steps": int(found["steps"][here].sum()),
            "best_by_generation": [float(r) for r in found["trace"][:, level]],
            "rescaled_reference": references[level],
        }
        if np.isfinite(sharpened[row]):
            search = searches[found["search"][row]]
            entry |= {
                "t_gamma": float(t[row]),
                "min_ratio": {k: float(np.min(np.where(here & reached, r, np.inf))) for k, r in ratios.items()},
                "found_by": search.start,
                "restart": search.restart,
                "rescaling_gap": float(sharpened[row] / references[level]) if np.isfinite(references[level]) else None,
                **describe(instances, row),
            }
            minimizers[f"1e{log10_v}"] = full_instance(
                cls, instances, row, variance=float(variance[row]), t_gamma=float(t[row]), found_by=search.start
            )
        levels.append(entry)
    own = [e.get("t_gamma", np.inf) for e in levels]
    best_known = [
        min(e.get("min_ratio", {}).get("sharpened", np.inf), e["rescaled_reference"]) * bound
        for e, bound in zip(levels, prop_a)
    ]
    slope, interval = envelope_slope(config.log10_variances, own)
    known_slope, known_interval = envelope_slope(config.log10_variances, best_known)
    below = {k: reached & (r < 1 - VIOLATION_TOLERANCE) for k, r in ratios.items()}
    violating = np.flatnonzero(np.any(list(below.values()), axis=0))
    saved = [
        full_instance(
            cls,
            instances,
            row,
            variance=float(variance[row]),
            t_gamma=float(t[row]),
            ratios={k: float(r[row]) for k, r in ratios.items()},
        )
        for row in violating
    ]
    summary = {
        "num_outputs": found["num_outputs"],
        "length": cls.policy.length,
        "jacobian_norm": cls.policy.jacobian_norm,
        "starts": sorted({s.start for s in searches}, key=START_NAMES.index),
        "evaluated": int(t.size),
        "feasible": int(instances.feasible.sum()),
        "censored": int((instances.feasible & ~reached).sum()),
        "solver_failures": int(found["failed"].sum()),
        "resolved_failures": found["resolved_failures"],
        "failures_possibly_faster": int(sum(e["failures_possibly_faster"] for e in levels)),
        "ode_steps": int(found["steps"].sum()),
        "below_bound": {k: int(b.sum()) for k, b in below.items()},
        "min_ratio": {k: float(np.min(np.where(reached, r, np.inf))) for k, r in ratios.items()},
        "min_scaled_time": float(
            (t[reached] * np.sqrt(variance[reached])).min(initial=np.inf) / -np.expm1(-config.gamma / 2)
        ),
        "envelope_slope": slope,
        "envelope_slope_ci": interval,
        # The levels each slope is fitted over (those that reached the gain).
        "envelope_levels": int(np.isfinite(own).sum()),
        "best_known_slope": known_slope,
        "best_known_slope_ci": known_interval,
        "best_known_levels": int(np.isfinite(best_known).sum()),
        # None: no slope was measured (fewer than 3 levels reached).
        "reaches_minus_third": None if np.isnan(interval[1]) else bool(interval[1] >= -1 / 3 - MINUS_THIRD_TOLERANCE),
        "levels": levels,
    }
    return summary, minimizers, saved


def run(out_dir: Path, *, quick: bool = False, config: TightnessConfig | None = None) -> dict:
    config = TightnessConfig.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    classes, minimizers, violating = {}, {}, []
    for cls in policy_classes(config.seed, config.classes):
        summary, minimizers[cls.name], saved = atlas_class(cls, search_class(cls, config, progress), config)
        classes[cls.name], violating = summary, violating + saved
        progress(
            f"{cls.name:19s} envelope slope {summary['envelope_slope']:+.3f} "
            f"[{summary['envelope_slope_ci'][0]:+.3f}, {summary['envelope_slope_ci'][1]:+.3f}], "
            f"min t/Prop A {fmt(summary['min_ratio']['sharpened'])}"
        )
    violations = {
        b: int(sum(c["below_bound"].get(b, 0) for c in classes.values())) for b in ("theorem4", "prop3", "sharpened")
    }
    summary = {
        "instances": int(sum(c["evaluated"] for c in classes.values())),
        "violations": violations,
        "censored": int(sum(c["censored"] for c in classes.values())),
        "solver_failures": int(sum(c["solver_failures"] for c in classes.values())),
        "instances_below_a_bound": len(violating),
        "classes": classes,
        "config": dataclasses.asdict(config),
    }
    summary["verdict"] = _verdict(summary)
    write_json(out_dir / "tightness_minimizers.json", minimizers)
    save_violations(out_dir, NAME, violating, progress=progress)
    _figure(classes, config, out_dir / "figures" / f"{NAME}.png")
    return finish_study(out_dir, NAME, summary, _markdown(summary, config), progress=progress, quick=quick)


# ---------------------------------------------------------------------------------------------
# Report: every sentence computed from the atlas.


def reference_scaled_time(gamma: float) -> float:
    """``t sqrt(Var) / (1 - e^(-gamma/2))`` of the two-output tabular instance of
    docs/theory.md#the-tightness-atlas (its ratio to Proposition A).

    >>> round(reference_scaled_time(0.1), 3)
    4.128
    """
    p = (1 + gamma) / 2
    return float((-1 / p + 1 / (1 - p) + 2 * np.log(p / (1 - p))) / 4 / -np.expm1(-gamma / 2))


def _verdict(summary: dict) -> str:
    classes = summary["classes"]
    slopes = [c["envelope_slope"] for c in classes.values() if not np.isnan(c["envelope_slope"])]
    unmeasured = [n for n, c in classes.items() if np.isnan(c["envelope_slope"])]
    third = [n for n, c in classes.items() if c["reaches_minus_third"]]
    measured = f"envelope slopes {min(slopes):.3f} to {max(slopes):.3f}" if slopes else "no envelope slope measured"
    return (
        f"{summary['instances']} searched instances, {len(classes)} classes; instances below a bound: "
        f"{summary['instances_below_a_bound']}; {summary['censored']} feasible instances not reached (censored at t_max or, "
        f"{summary['solver_failures']} of them, solves that spent their step budget); "
        f"{measured}" + (f" (not measured: {', '.join(unmeasured)})" if unmeasured and slopes else "") + "; "
        f"classes whose interval reaches -1/3: {', '.join(third) or 'none'}"
    )


def _differs_from_half(interval):
    """``"flatter"``, ``"steeper"``, ``None`` (it reaches -1/2) or ``"not measured"`` (no
    interval): where a slope interval lies against -1/2."""
    if np.isnan(interval).any():
        return "not measured"
    if interval[0] > -0.5 + SLOPE_TOLERANCE:
        return "flatter"
    if interval[1] < -0.5 - SLOPE_TOLERANCE:
        return "steeper"
    return None


def _conclusion(summary: dict) -> str:
    classes = summary["classes"]
    third = [n for n, c in classes.items() if c["reaches_minus_third"]]
    below = summary["instances_below_a_bound"]
    own = {n: _differs_from_half(c["envelope_slope_ci"]) for n, c in classes.items()}
    known = {n: _differs_from_half(c["best_known_slope_ci"]) for n, c in classes.items()}
    missed = [
        f"{n} at 1e{e['log10_variance']} ({e['rescaling_gap']:.2f}x)"
        for n, c in classes.items()
        for e in c["levels"]
        if e.get("rescaling_gap") is not None and e["rescaling_gap"] > GAP_TOLERANCE
    ]
    finders = sorted({e["found_by"] for c in classes.values() for e in c["levels"] if "found_by" in e})
    text = [
        f"{below} searched instances fall below a bound (saved to `tightness_violations.json`)."
        if below
        else "No searched instance falls below Theorem 4, Proposition 3 or Proposition A."
    ]
    unmeasured = [n for n, d in own.items() if d == "not measured"]
    if unmeasured:
        text.append(
            f"No envelope slope could be measured on {', '.join(unmeasured)} (fewer than 3 levels reached the "
            "gain): the sentences below are about the other classes."
        )
    if third:
        text.append(
            f"On {', '.join(third)} the envelope's interval reaches `Var^(-1/3)`: Theorem 4's exponent may be attained there."
        )
    elif len(unmeasured) < len(classes):
        text.append("No class's own-search envelope is as flat as `Var^(-1/3)` within its interval.")
    differing = {n: d for n, d in own.items() if d and d != "not measured"}
    if differing:
        text.append(
            "The own-search envelope differs from `Var^(-1/2)` on "
            + ", ".join(f"{n} ({d})" for n, d in differing.items())
            + "."
        )
    elif len(unmeasured) < len(classes):
        text.append(f"Every measured class's own-search interval reaches -1/2 (within {SLOPE_TOLERANCE}).")
    text.append(
        "Levels where a rescaled instance from another level beats the level's own search by more than "
        f"{100 * (GAP_TOLERANCE - 1):.0f}%: " + (", ".join(missed) if missed else "none") + "."
    )
    known_differing = {n: d for n, d in known.items() if d and d != "not measured"}
    if known_differing:
        text.append(
            "With those rescaled instances (the best known time at each level), the envelope differs from "
            "`Var^(-1/2)` on "
            + ", ".join(f"{n} ({d})" for n, d in known_differing.items())
            + (
                ": there structure feasible only at small variance is faster per unit `sqrt(Var)`."
                if "flatter" in known_differing.values()
                else "."
            )
        )
    elif any(d != "not measured" for d in known.values()):
        text.append(
            "With those rescaled instances (the best known time at each level), every measured class's interval "
            "reaches -1/2."
        )
    scaled = {n: c["min_scaled_time"] for n, c in classes.items() if np.isfinite(c["min_scaled_time"])}
    unreached = [n for n in classes if n not in scaled]
    allowance = {n: c["length"] ** 2 * c["jacobian_norm"] ** 2 for n, c in classes.items()}
    reference = reference_scaled_time(summary["config"]["gamma"])
    if scaled:
        fastest = min(scaled, key=scaled.get)
        text.append(
            f"Without Proposition A's structure constant `L^2 J^2`, the smallest `t sqrt(Var) / (1 - e^(-gamma/2))` "
            f"lies between {min(scaled.values()):.2f} ({fastest}) and {max(scaled.values()):.2f} across "
            + (f"the {len(scaled)} classes that reached the gain" if unreached else "classes")
            + f", against {reference:.2f} for the tabular reference instance: no "
            + ("such " if unreached else "")
            + "class's teachers were found faster per "
            f"unit `sqrt(Var)` than that instance by more than {max(reference / min(scaled.values()), 1.0):.2f}x, "
            f"while Proposition A allows up to `L^2 J^2` = {max(allowance.values()):.1f}x "
            f"({max(allowance, key=allowance.get)})."
        )
    if unreached:
        text.append(f"No searched instance of {', '.join(unreached)} reached the gain at any level.")
    failures = sum(c["solver_failures"] for c in classes.values())
    if failures:
        text.append(
            f"{failures} solves spent their step budget ({sum(c['resolved_failures'] for c in classes.values())} "
            "solved again with 50 times the steps because their time so far lay below a bound); "
            f"{sum(c['failures_possibly_faster'] for c in classes.values())} of them might still beat their level's "
            "minimizer."
        )
    text.append(f"The minimizers were found by the {', '.join(finders)} searches." if finders else "")
    return " ".join(t for t in text if t)


def _figure(classes, config, path: Path):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    levels = 10.0 ** np.asarray(config.log10_variances, float)
    for name, c in classes.items():
        t = [e.get("t_gamma", np.nan) for e in c["levels"]]
        ratio = [e["min_ratio"]["sharpened"] if "min_ratio" in e else np.nan for e in c["levels"]]
        left.loglog(levels, t, "o-", label=f"{name} (slope {c['envelope_slope']:.3f})")
        right.loglog(levels, ratio, "o-", label=name)
    # Reference slopes through the smallest time found at the lowest level where any class reached.
    found = np.array([[e.get("t_gamma", np.nan) for e in c["levels"]] for c in classes.values()], float)
    reached_levels = np.flatnonzero(np.isfinite(found).any(axis=0))
    if reached_levels.size:
        first = reached_levels[0]
        anchor = np.nanmin(found[:, first])
        for exponent, style in ((-1 / 3, "k:"), (-1 / 2, "k--")):
            left.loglog(levels, anchor * (levels / levels[first]) ** exponent, style, label=f"slope {exponent:.3f}")
    left.set(
        xlabel="reward variance Var[r_RM]",
        ylabel=f"smallest t_gamma found (gamma = {config.gamma})",
        title="lower envelope, independent search per level",
    )
    right.axhline(1.0, color="red", lw=0.8)
    right.set(
        xlabel="reward variance Var[r_RM]",
        ylabel="smallest t_gamma / Proposition A bound",
        title="flat: exponent -1/2; lower at small Var: flatter than -1/2",
    )
    ratios = [e["min_ratio"]["sharpened"] for c in classes.values() for e in c["levels"] if "min_ratio" in e]
    highest = max((r for r in ratios if np.isfinite(r)), default=1.0)
    right.set_ylim(0.5, 30 * highest)  # room for the legend above the curves
    left.legend(fontsize=7)
    right.legend(fontsize=7, ncol=3, loc="upper center")
    save_figure(fig, path)


def _markdown(summary: dict, config: TightnessConfig) -> str:
    def slope(c, key):
        levels = c[key.replace("_slope", "_levels")]
        over = f" over {levels} of {len(c['levels'])} levels" if levels < len(c["levels"]) else ""
        if np.isnan(c[key]):
            return f"not measured ({levels} of {len(c['levels'])} levels reached)"
        return f"{c[key]:+.3f} [{c[key + '_ci'][0]:+.3f}, {c[key + '_ci'][1]:+.3f}]{over}"

    rows = "\n".join(
        f"| {name} | {c['num_outputs']} | {c['length']} | {c['jacobian_norm']:.3f} | {len(c['starts']) * config.restarts} | "
        f"{c['evaluated']} | {c['censored']} ({c['solver_failures']}) | {slope(c, 'envelope_slope')} | "
        f"{slope(c, 'best_known_slope')} | {fmt(c['min_ratio']['theorem4'])} | {fmt(c['min_ratio'].get('prop3'))} | "
        f"{fmt(c['min_ratio']['sharpened'])} |"
        for name, c in summary["classes"].items()
    )
    level_rows = "\n".join(
        f"| {name} | 1e{e['log10_variance']} | "
        + (
            f"{fmt(e['min_ratio']['sharpened'])} | {fmt(e['min_ratio']['theorem4'])} | {e['found_by']} | "
            f"{e['evaluated']} / {e['ode_steps']} | {e['max_probability']:.3g} | {e['rewarded_mass']:.3g} | "
            f"{e['max_abs_rm']:.3g} | {e['kl_coef']:.3g} | {fmt(e['rescaling_gap'])} | "
            if "min_ratio" in e
            else f"none reached | | | {e['evaluated']} / {e['ode_steps']} | | | | | | "
        )
        + f"{e['solver_failures']} ({e['failures_possibly_faster']}) |"
        for name, c in summary["classes"].items()
        for e in c["levels"]
    )
    v = summary["violations"]
    return f"""## Tightness atlas: is the -1/3 exponent attained?

**Verdict:** {summary["instances"]} searched instances over {len(summary["classes"])} policy classes and
{len(config.log10_variances)} variance levels ({summary["censored"]} feasible instances not reached: censored at `t_max`, or {summary["solver_failures"]} solves that spent their step budget); instances below a bound: Theorem 4 {v["theorem4"]},
Proposition 3 {v["prop3"]}, Proposition A {v["sharpened"]}.

At each level, independent searches (the starts {", ".join(config.starts)}, the `free` ones only up
to {config.max_free_outputs} outputs; {config.restarts} restart(s); each solving {config.population} new candidates
per generation for {config.generations} generations and keeping the {config.elite} best) minimize `t_gamma` at that
variance over the initial policy, both rewards and `lam`. The own-search slope is the
least-squares slope of the smallest `t_gamma` found at each level; the best-known slope also
uses instances from other levels scaled to the level (see the rescaling gap below); 95%
t-intervals over the levels. Censored counts include the solves that spent their step budget
(in brackets).

| class | Y | L | J | searches per level | instances | censored (failed) | own-search slope [95% CI] | best-known slope [95% CI] | min t / Thm 4 | min t / Prop 3 | min t / Prop A |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

{_conclusion(summary)}

Per class and level: the smallest ratios, the search that found the minimizer, the effort
(instances / ODE steps at that level), and the minimizer's initial largest probability, the
initial mass of the outputs its reward model rewards (`r_RM > 0`), its largest `|r_RM|` and `lam`.
The rescaling gap divides the ratio by the best ratio of any instance from another level with
`lam = 0` whose scaled copy is feasible here (always, from a larger variance; from a smaller one
when its largest `|r_RM|` allows): that copy has the same ratio, so the true minimum is never
above it, and a gap above 1 is what this level's own search missed. The last column counts the
solves that spent their step budget, and in brackets those whose time so far leaves them able
to beat the minimizer. The minimizers are in `tightness_minimizers.json`.

| class | Var | min t / Prop A | min t / Thm 4 | found by | effort | max pi_0 | rewarded mass | max abs r_RM | lam | rescaling gap | failed (possibly faster) |
|---|---|---|---|---|---|---|---|---|---|---|---|
{level_rows}

![lower envelopes](figures/{NAME}.png)
"""
