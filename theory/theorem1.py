"""Theorem 1 / 4 of Razin et al. at scale: ``t_gamma = Omega(Var^(-1/3))``, checked exactly.

For every instance (one prompt of one problem) the gradient flow is integrated exactly and
``t_gamma`` located for the ground-truth reward and for the proxy itself; each is compared
with Theorem 4's bound, Proposition 3 (tabular) and this project's sharper Proposition A
(docs/theory.md#proposition-a). Per family, the log-log slope of the ground-truth ``t_gamma`` against the
initial reward variance is fitted with a bootstrap interval; gradient norms are compared with
Proposition 2 and with the Cauchy-Schwarz bound ``sqrt(2) L J sqrt(Var)``.

Families (``gamma`` is the gain timed):

- ``scaled``: tabular, ``r_RM = eps * r_G`` (perfect accuracy), ``lam = 0``, ``eps`` on a grid
  over ``3.5`` decades (7 of variance); ground-truth ``gamma`` fixed. The flow is a time
  rescaling, so the slope must be exactly ``-1/2``.
- ``random``: tabular, 2 prompts per problem, random logits of random sharpness, proxies
  correlated with ``r_G`` at random strength and scaled by ``s`` over 3.5 decades, ``lam = 0``.
- ``kl_0.05``, ``kl_0.5``: as ``random`` (one prompt) with a KL penalty.
- ``kl_0.05_fixed``, ``kl_0.5_fixed``: the same instances with the ground-truth ``gamma`` fixed
  at ``scaled_gamma`` instead of a share of the gain on offer (no time where less is offered).
- ``autoregressive_L2``, ``autoregressive_L3``: autoregressive tabular policies, ``V = 4``.
- ``shared_L3``: the setting of Theorem 4 itself, an autoregressive policy whose next-token
  logits ``Phi[s] theta[x]`` share one parameter vector across positions (``V = 4``, ``d = 3``),
  so ``J = max_s ||Phi[s]||_2 != 1`` and ``L = 3`` both enter the bounds.

Where ``gamma`` is not fixed it is half the gain the teacher makes available in the limit
(``argmax r_RM`` for ``lam = 0``, ``pi* ∝ pi0 exp(r_RM / lam)`` otherwise), so it is reachable;
instances whose teacher makes the ground truth worse in the limit have no ground-truth time.
The shared-parameter class cannot reach ``argmax r_RM`` in general, so there ``gamma`` is that
share of the gain its flow has made by time ``10^4 / max|r_RM|`` (reached by then).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm import bounds, flow, metrics
from jaxrm.studies import (
    POSITIVE,
    POSITIVE_INT,
    SMALL_TOLERANCE,
    Progress,
    StudyConfig,
    checked,
    finish_study,
    fmt,
    int_at_least,
    pyplot,
    save_figure,
    save_violations,
    write_atomically,
)
from jaxrm.tabular import (
    AutoregressiveTabularPolicy,
    SharedAutoregressivePolicy,
    TabularPolicy,
    kl_rewards,
    prompt_gradient,
)
from theory.common import SLOPE_TOLERANCE, censored_slopes, limit_reward, loglog_slope, unreached

NAME = "theorem1"


@dataclasses.dataclass(frozen=True)
class Theorem1Config(StudyConfig):
    """Sizes, grids and solver settings of the Theorem 1 / 4 study (docs/theory.md#theorem-4);
    the families are described in the module docstring. Fields with a range are checked on
    construction.

    Attributes:
      seed: seed of the ``jax.random`` key that draws every family, and of the bootstrap.
      num_outputs: ``|Y|`` of the tabular families (an int >= 2).
      scaled_problems: base problems (one prompt each) of the ``scaled`` family, each run at
        every ``eps`` (an int >= 1).
      scaled_eps: number of ``eps`` values of the ``scaled`` family (an int >= 3), log-spaced
        from ``10^-decades`` to 1.
      scaled_gamma: the ground-truth gain timed in the ``scaled`` and ``kl_<lam>_fixed`` families,
        in ``(0, 0.5)``; instances whose teacher offers no more than this in the limit get no
        ground-truth time.
      random_problems: problems of the ``random`` family (an int >= 1).
      random_prompts: ``|S|``, prompts per problem of the ``random`` family (an int >= 1).
      kl_problems: problems (one prompt each) of every ``kl_<lam>`` family (an int >= 1).
      kl_coefs: one ``kl_<lam>`` family per value of ``lam`` (a non-empty tuple of values > 0).
      autoregressive_problems: problems (one prompt each) of every autoregressive family (an
        int >= 1).
      vocab_size: ``V`` of the autoregressive-tabular families (an int >= 2).
      lengths: one ``autoregressive_L<L>`` family per output length ``L`` (a tuple of ints >= 1,
        possibly empty).
      shared_problems: problems (one prompt each) of the ``shared_L<L>`` family, whose policy
        shares one parameter vector across positions (:class:`~jaxrm.tabular.SharedAutoregressivePolicy`,
        ``V = vocab_size``, features ``N(0, 1/d)``), an int >= 1.
      shared_features: ``d`` of that family (an int >= 1).
      shared_length: ``L`` of that family (an int >= 2).
      decades: the proxies' scale ``eps`` or ``s`` spans ``10^-decades .. 1``, so the variance
        spans twice as many decades (>= 3).
      gain_fraction: where ``gamma`` is not fixed, this share of the gain the teacher makes
        available in the limit (in ``(0, 1)``).
      rtol: relative tolerance of the adaptive ODE solver (> 0).
      atol: absolute tolerance of the adaptive ODE solver (> 0).
      t_max: flow time (> 0) after which a gain counts as not reached.
      violation_tolerance: relative slack in ``[0, 0.1)``: a finite ``t_gamma`` violates a lower
        bound only when it is below ``(1 - violation_tolerance) * bound``.
      bootstrap: bootstrap resamples of every slope's 95% interval (an int >= 100).
    """

    seed: int = 0
    num_outputs: int = checked(16, int_at_least(2))
    scaled_problems: int = checked(64, POSITIVE_INT)
    scaled_eps: int = checked(15, int_at_least(3))
    scaled_gamma: float = checked(0.1, (lambda v: 0 < v < 0.5, "in (0, 0.5)"))
    random_problems: int = checked(5120, POSITIVE_INT)
    random_prompts: int = checked(2, POSITIVE_INT)
    kl_problems: int = checked(1024, POSITIVE_INT)
    kl_coefs: tuple[float, ...] = checked(
        (0.05, 0.5),
        (
            lambda v: len(v) >= 1 and all(c > 0 for c in v) and len({f"{c:g}" for c in v}) == len(v),
            "a non-empty tuple of values > 0, distinct in their family names (kl_<value:g>)",
        ),
    )
    autoregressive_problems: int = checked(1024, POSITIVE_INT)
    vocab_size: int = checked(4, int_at_least(2))
    lengths: tuple[int, ...] = checked(
        (2, 3), (lambda v: all(n >= 1 for n in v) and len(set(v)) == len(v), "distinct ints >= 1 (or none)")
    )
    shared_problems: int = checked(1024, POSITIVE_INT)
    shared_features: int = checked(3, POSITIVE_INT)
    shared_length: int = checked(3, int_at_least(2))
    decades: float = checked(3.5, (lambda v: v >= 3.0, ">= 3 (6 decades of variance)"))
    gain_fraction: float = checked(0.5, (lambda v: 0 < v < 1, "in (0, 1)"))
    rtol: float = checked(1e-8, POSITIVE)
    atol: float = checked(1e-10, POSITIVE)
    t_max: float = checked(1e14, POSITIVE)
    violation_tolerance: float = checked(1e-6, SMALL_TOLERANCE)
    bootstrap: int = checked(1000, int_at_least(100))

    def quick(self) -> "Theorem1Config":
        """A smaller run for smoke tests: fewer instances, one KL family, and of the autoregressive
        families only the shared-parameter one."""
        return dataclasses.replace(
            self,
            scaled_problems=8,
            scaled_eps=8,
            random_problems=32,
            kl_problems=64,
            autoregressive_problems=64,
            shared_problems=64,
            kl_coefs=self.kl_coefs[-1:],
            lengths=(),  # --quick's tightness study runs the autoregressive-tabular class
            bootstrap=200,
        )


class Family(NamedTuple):
    name: str
    policy: Any
    logits: Any  # prompt axis second: [problems, S, ...]
    rm_rewards: Any  # [problems, S, Y]
    gt_rewards: Any  # [problems, S, Y]
    kl_coef: Any  # [problems]
    gt_gamma: Any  # [problems, S]; NaN where the teacher offers no ground-truth gain
    rm_gamma: Any  # [problems, S]
    base_problem: Any = None  # [problems, S] id of the base problem a grid point scales


# --- instances -------------------------------------------------------------------------------


def _gammas(policy, logits, rm, gt, kl_coef, fraction):
    ref = policy.log_probs(logits)

    def gain(r):
        return limit_reward(ref, rm, r, np.asarray(kl_coef)[:, None]) - np.asarray(metrics.expected_reward(ref, r))

    gt_gain, rm_gain = gain(gt), gain(rm)
    return np.where(gt_gain > 0, fraction * gt_gain, np.nan), fraction * rm_gain


def _random_teacher(key, shape, decades):
    """Ground truth ``U(-1, 1)``; proxy ``s * clip(rho r_G + sqrt(1 - rho^2) noise)`` with
    correlation ``rho ~ U(0, 1)`` and scale ``s = 10^U(-decades, 0)`` per problem."""
    k_gt, k_noise, k_rho, k_scale = jax.random.split(key, 4)
    gt = jax.random.uniform(k_gt, shape, minval=-1.0, maxval=1.0)
    batch = (shape[0],) + (1,) * (len(shape) - 1)
    rho = jax.random.uniform(k_rho, batch)
    noise = jax.random.uniform(k_noise, shape, minval=-1.0, maxval=1.0)
    scale = 10.0 ** jax.random.uniform(k_scale, batch, minval=-decades, maxval=0.0)
    return scale * jnp.clip(rho * gt + jnp.sqrt(1 - rho**2) * noise, -1.0, 1.0), gt


def _sharpness(key, batch_ndim, n):
    """Logit scale ``10^U(-1, 0.6)`` (from near-uniform to sharply peaked policies)."""
    return 10.0 ** jax.random.uniform(key, (n,) + (1,) * batch_ndim, minval=-1.0, maxval=0.6)


def make_families(config: Theorem1Config, only=None) -> list[Family]:
    key = jax.random.key(config.seed)
    k_scaled, k_random, k_kl, k_ar = jax.random.split(key, 4)
    tabular = TabularPolicy(config.num_outputs)
    y = config.num_outputs
    families = []

    # scaled: every base problem at every eps.
    k1, k2, k3 = jax.random.split(k_scaled, 3)
    n = config.scaled_problems
    base_logits = _sharpness(k1, 2, n) * jax.random.normal(k2, (n, 1, y))
    base_gt = jax.random.uniform(k3, (n, 1, y), minval=-1.0, maxval=1.0)
    eps = 10.0 ** np.linspace(-config.decades, 0.0, config.scaled_eps)
    logits = jnp.repeat(base_logits, len(eps), axis=0)
    gt = jnp.repeat(base_gt, len(eps), axis=0)
    rm = jnp.tile(eps, n)[:, None, None] * gt
    kl_coef = np.zeros(len(rm))
    _, rm_gamma = _gammas(tabular, logits, rm, gt, kl_coef, config.gain_fraction)
    gt_gain = limit_reward(tabular.log_probs(logits), rm, gt, np.asarray(kl_coef)[:, None]) - np.asarray(
        metrics.expected_reward(tabular.log_probs(logits), gt)
    )
    gt_gamma = np.where(gt_gain > config.scaled_gamma, config.scaled_gamma, np.nan)
    base = np.repeat(np.arange(n), len(eps))[:, None]
    families.append(Family("scaled", tabular, logits, rm, gt, kl_coef, gt_gamma, rm_gamma, base))

    def random_family(name, key, problems, prompts, kl_coef):
        k1, k2, k3 = jax.random.split(key, 3)
        logits = _sharpness(k1, 2, problems) * jax.random.normal(k2, (problems, prompts, y))
        rm, gt = _random_teacher(k3, (problems, prompts, y), config.decades)
        return Family(
            name, tabular, logits, rm, gt, kl_coef, *_gammas(tabular, logits, rm, gt, kl_coef, config.gain_fraction)
        )

    families.append(
        random_family(
            "random", k_random, config.random_problems, config.random_prompts, np.zeros(config.random_problems)
        )
    )
    for lam, k in zip(config.kl_coefs, jax.random.split(k_kl, len(config.kl_coefs))):
        shared = random_family(f"kl_{lam:g}", k, config.kl_problems, 1, np.full(config.kl_problems, lam))
        families.append(shared)
        # The same instances with an absolute ground-truth gain: where the teacher offers less, no time.
        ref = tabular.log_probs(shared.logits)
        offered = limit_reward(
            ref, shared.rm_rewards, shared.gt_rewards, np.asarray(shared.kl_coef)[:, None]
        ) - np.asarray(metrics.expected_reward(ref, shared.gt_rewards))
        fixed = np.where(offered > config.scaled_gamma, config.scaled_gamma, np.nan)
        families.append(shared._replace(name=f"kl_{lam:g}_fixed", gt_gamma=fixed))

    def one_prompt_family(name, policy, logits, key, *, reachable=False):
        """``policy`` from ``logits [problems, 1, ...]`` under a random teacher, ``lam = 0``."""
        n = len(jax.tree.leaves(logits)[0])
        rm, gt = _random_teacher(key, (n, 1, policy.num_outputs), config.decades)
        kl_coef = np.zeros(n)
        if reachable:
            gammas = _reachable_gammas(policy, logits, rm, gt, config.gain_fraction)
        else:
            gammas = _gammas(policy, logits, rm, gt, kl_coef, config.gain_fraction)
        return Family(name, policy, logits, rm, gt, kl_coef, *gammas)

    for length, k in zip(config.lengths, jax.random.split(k_ar, len(config.lengths))):
        policy = AutoregressiveTabularPolicy(config.vocab_size, length)
        k1, k2, k3 = jax.random.split(k, 3)
        n = config.autoregressive_problems
        sharp = _sharpness(k1, 3, n)
        logits = tuple(sharp * theta[:, None] for theta in policy.random_logits(k2, n))  # [problems, S=1, V^l, V]
        families.append(one_prompt_family(f"autoregressive_L{length}", policy, logits, k3))

    k0, k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 5), 4)
    v, d = config.vocab_size, config.shared_features
    features = np.asarray(jax.random.normal(k0, (v + 1, v, d))) / np.sqrt(d)
    policy = SharedAutoregressivePolicy(features, config.shared_length)
    logits = _sharpness(k1, 2, config.shared_problems) * jax.random.normal(k2, (config.shared_problems, 1, d))
    families.append(one_prompt_family(f"shared_L{config.shared_length}", policy, logits, k3, reachable=True))
    return [f for f in families if only is None or f.name in only]


# Flow time, in units of 1 / max|r_RM|, after which a restricted class's gain is read off.
_SETTLING_TIME = 1e4


def _reachable_gammas(policy, logits, rm, gt, fraction):
    """Targets for a class that cannot reach ``argmax r_RM``: ``fraction`` of the gains the flow
    has made at time ``_SETTLING_TIME / max|r_RM|`` (lam = 0). At ``lam = 0`` scaling the reward
    by ``s`` rescales time by ``1/s``, so that is the flow on ``r_RM / max|r_RM|`` at
    ``_SETTLING_TIME``; ``E[r_RM]`` rises monotonically, so its target is reached by then."""
    scale = np.max(np.abs(np.asarray(rm)), axis=-1, keepdims=True)
    start = flow.trajectory(logits, rm / scale, [0.0, _SETTLING_TIME], policy=policy, eval_rewards=gt)
    gt_gain = np.asarray(start.eval_reward[1] - start.eval_reward[0])
    rm_gain = np.asarray(start.rm_reward[1] - start.rm_reward[0]) * scale[..., 0]
    return np.where(gt_gain > 0, fraction * gt_gain, np.nan), fraction * rm_gain


# --- measurements ----------------------------------------------------------------------------


@jax.jit(static_argnames="policy")
def _gradient_check(policy, logits, rm, ref_log_probs, kl_coef):
    """Per-prompt ``||grad phi_x||``, ``Var_pi[r_KL]`` and ``max |r_KL|`` at ``logits``."""
    lam = kl_coef[:, None, None]
    log_probs = policy.log_probs(logits)
    grads = prompt_gradient(policy, logits, rm, ref_log_probs, kl_coef=lam)
    batch_ndim = rm.ndim - 1
    norm = jnp.sqrt(sum(jnp.sum(g**2, axis=tuple(range(batch_ndim, g.ndim))) for g in jax.tree.leaves(grads)))
    r_kl = kl_rewards(log_probs, rm, ref_log_probs, kl_coef=lam)
    return norm, metrics.reward_variance(log_probs, r_kl), jnp.max(jnp.abs(r_kl), -1)


@jax.jit(static_argnames="policy")
def _variance_rate(policy, logits, rm, ref_log_probs, kl_coef):
    """Per problem, ``Var_KL`` (the prompt mean of ``Var_pi[r_KL]``) and its exact rate of change
    along the flow, ``d/dt Var_KL = <grad Var_KL, grad phi>``, as a forward-mode derivative."""
    lam = kl_coef[:, None, None]
    num_prompts = rm.shape[-2]
    velocity = jax.tree.map(lambda g: g / num_prompts, prompt_gradient(policy, logits, rm, ref_log_probs, kl_coef=lam))

    def var_kl(theta):
        log_probs = policy.log_probs(theta)
        r_kl = kl_rewards(log_probs, rm, ref_log_probs, kl_coef=lam)
        return metrics.reward_variance(log_probs, r_kl).mean(-1)

    return jax.jvp(var_kl, (logits,), (velocity,))


def _rate_ratios(policy, points, rm, ref, kl_coef, measured):
    """``d/dt Var_KL`` over Step 4's ``2 L^2 J^2 Var_KL^(3/2)`` and over Proposition 2's
    ``24 L^2 J^2 Var_KL^(4/3)``, each ``[points, problems]``, NaN where a point was not measured."""
    structure = dict(length=policy.length, jacobian_norm=policy.jacobian_norm)
    step4, prop2 = [], []
    for point, valid in zip(points, measured):
        value, rate = (np.asarray(x) for x in _variance_rate(policy, point, rm, ref, kl_coef))
        keep = valid & (value > 0)
        for ratios, bound in ((step4, bounds.variance_rate_bound), (prop2, bounds.proposition2_variance_rate_bound)):
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios.append(np.where(keep, rate / bound(value, **structure), np.nan))
    return np.stack(step4), np.stack(prop2)


def _measure(family: Family, config: Theorem1Config) -> dict:
    policy, rm, gt = family.policy, family.rm_rewards, family.gt_rewards
    has_gt = np.isfinite(family.gt_gamma)
    kl_coef = family.kl_coef if np.any(family.kl_coef) else None  # None leaves out the KL machinery
    options = dict(policy=policy, kl_coef=kl_coef, t_max=config.t_max, rtol=config.rtol, atol=config.atol)
    # Instances without a ground-truth target re-time the proxy, so both solves share one
    # compiled program; their ground-truth entries are discarded below.
    gt_run = flow.first_passage(
        family.logits,
        rm,
        np.where(has_gt, family.gt_gamma, family.rm_gamma),
        eval_rewards=jnp.where(has_gt[..., None], gt, rm),
        **options,
    )
    rm_run = flow.first_passage(family.logits, rm, family.rm_gamma, **options)
    ref = policy.log_probs(family.logits)
    variance = np.asarray(metrics.reward_variance(ref, rm))  # [problems, S]
    mean_variance = np.broadcast_to(variance.mean(-1, keepdims=True), variance.shape)
    kl_coef = np.broadcast_to(np.asarray(family.kl_coef)[:, None], variance.shape)
    num_prompts = variance.shape[-1]

    grad_points = [family.logits, gt_run.logits]
    grad = [_gradient_check(policy, point, rm, ref, jnp.asarray(family.kl_coef)) for point in grad_points]
    norms = np.stack([np.asarray(g[0]) for g in grad])
    kl_var = np.stack([np.asarray(g[1]) for g in grad])
    reward_bound = np.stack([np.asarray(g[2]) for g in grad])
    length, jac = policy.length, policy.jacobian_norm
    with np.errstate(divide="ignore", invalid="ignore"):
        prop2 = norms / bounds.proposition2_gradient_bound(
            kl_var, reward_bound=np.maximum(reward_bound, 1.0 + 1e-12), length=length, jacobian_norm=jac
        )
        sqrt = norms / bounds.score_gradient_bound(kl_var, length=length, jacobian_norm=jac)
    measured = np.stack([np.ones_like(has_gt), has_gt & (np.asarray(gt_run.status) == flow.Status.REACHED)])
    prop2, sqrt = (np.where(measured, ratio, np.nan) for ratio in (prop2, sqrt))  # NaN where not measured
    # Step 4 of Proposition A and Proposition 2's rate, at three points of each trajectory: the
    # start and where the proxy and the ground-truth targets were reached.
    reached_rm = np.asarray(rm_run.status) == flow.Status.REACHED
    step4, prop2_rate = _rate_ratios(
        policy,
        [family.logits, rm_run.logits, gt_run.logits],
        rm,
        ref,
        jnp.asarray(family.kl_coef),
        [np.ones(len(has_gt), bool), reached_rm.all(-1), measured[1].all(-1)],
    )

    def timed(run, gamma, valid):
        t = np.where(valid, np.asarray(run.t_gamma), np.nan)
        out = dict(
            gamma=np.where(valid, gamma, np.nan),
            t_gamma=t,
            theorem4=bounds.theorem4_lower_bound(
                gamma, mean_variance, kl_coef=kl_coef, length=length, jacobian_norm=jac
            ),
            sharpened=bounds.proposition_a_lower_bound(gamma, mean_variance, length=length, jacobian_norm=jac),
            status=np.asarray(run.status),
            t_end=np.asarray(run.t_end),
        )
        if isinstance(policy, TabularPolicy):
            out["prop3"] = bounds.proposition3_lower_bound(gamma, variance, num_prompts=num_prompts)
        return out

    grouping = {} if family.base_problem is None else {"base_problem": np.asarray(family.base_problem)}
    return dict(
        **grouping,
        variance=variance,
        mean_variance=mean_variance,
        kl_coef=kl_coef,
        gt=timed(gt_run, np.where(has_gt, family.gt_gamma, 1.0), has_gt),
        rm=timed(rm_run, family.rm_gamma, np.ones_like(has_gt)),
        max_ratio_prop2=float(np.nanmax(prop2)),
        max_ratio_sqrt=float(np.nanmax(sqrt)),
        gradient_points=int(measured.sum()),
        max_ratio_variance_rate=float(np.nanmax(step4)),
        max_ratio_prop2_rate=float(np.nanmax(prop2_rate)),
        rate_points=int(np.isfinite(step4).sum()),
        # Each inequality's ratio, NaN where not measured: gradient norms [2 points, problems, S]
        # (start, ground-truth target), rates [3 points, problems] (start, proxy and
        # ground-truth targets); one above 1 + tolerance is a violation.
        ratios={
            "gradient_prop2": prop2,
            "gradient_sqrt": sqrt,
            "variance_rate": step4,
            "prop2_rate": prop2_rate,
        },
    )


def _violations(result: dict, tolerance: float) -> dict:
    """Per bound: boolean ``[problems, S]`` of finite times below ``(1 - tol) * bound``."""
    found = {}
    for reward in ("gt", "rm"):
        timing = result[reward]
        for bound in ("theorem4", "prop3", "sharpened"):
            if bound in timing:
                with np.errstate(invalid="ignore"):
                    bad = np.isfinite(timing["t_gamma"]) & (timing["t_gamma"] < (1 - tolerance) * timing[bound])
                found[bound] = found.get(bound, False) | bad
    return found


def _min_ratio(result: dict, bound: str) -> float:
    ratios = [result[r]["t_gamma"] / result[r][bound] for r in ("gt", "rm") if bound in result[r]]
    values = np.concatenate([np.ravel(r) for r in ratios])
    values = values[np.isfinite(values)]
    return float(values.min()) if values.size else math.nan


def _family_summary(family: Family, result: dict, config: Theorem1Config) -> dict:
    gt = result["gt"]
    fit = np.isfinite(gt["t_gamma"]) & (result["variance"] > 0)
    # The scaled family is a grid of eps over base problems: fit within each base problem.
    groups = result["base_problem"][fit] if "base_problem" in result else None
    slope, ci = loglog_slope(
        result["variance"][fit], gt["t_gamma"][fit], groups=groups, num_bootstrap=config.bootstrap, seed=config.seed
    )
    rm_fit = np.isfinite(result["rm"]["t_gamma"]) & (result["variance"] > 0)
    rm_groups = result["base_problem"][rm_fit] if "base_problem" in result else None
    rm_slope, rm_ci = loglog_slope(
        result["variance"][rm_fit],
        result["rm"]["t_gamma"][rm_fit],
        groups=rm_groups,
        num_bootstrap=config.bootstrap,
        seed=config.seed,
    )
    variance = result["variance"][result["variance"] > 0]
    violations = _violations(result, config.violation_tolerance)
    # Censored: a target that exists but was not reached by t_max. A failed solve stopped earlier,
    # at t_end: its time is known only to exceed that, so it is neither censored nor in the fits.
    split = {reward: unreached(r["status"], r["t_end"]) for reward, r in (("gt", gt), ("rm", result["rm"]))}
    targets = {"gt": np.isfinite(gt["gamma"]), "rm": np.isfinite(result["rm"]["gamma"])}
    censored_mask = {reward: targets[reward] & split[reward]["censored"] for reward in split}
    failed_mask = {reward: targets[reward] & split[reward]["failed"] for reward in split}
    timed = np.isfinite(gt["gamma"]) & (result["variance"] > 0) & ~failed_mask["gt"]
    timed_groups = result["base_problem"][timed] if "base_problem" in result else None
    censored_fit = censored_slopes(
        result["variance"][timed],
        gt["t_gamma"][timed],
        config.t_max,
        groups=timed_groups,
        num_bootstrap=config.bootstrap,
        seed=config.seed,
    )
    # The same bootstrap as the reached-only slope's, on the fit with every censored time at t_max.
    censored_fit["at_t_max_ci"] = list(
        loglog_slope(
            result["variance"][timed],
            np.minimum(gt["t_gamma"][timed], config.t_max),
            groups=timed_groups,
            num_bootstrap=config.bootstrap,
            seed=config.seed,
        )[1]
    )
    # An unreached time is known only to exceed t_max (censored) or t_end (failed): a timing is
    # undecided when some bound lies above that.
    inconclusive = 0
    for reward, r in (("gt", gt), ("rm", result["rm"])):
        largest = np.max([r[b] for b in ("theorem4", "prop3", "sharpened") if b in r], axis=0)
        undecided = (censored_mask[reward] & (largest > config.t_max)) | (failed_mask[reward] & (largest > r["t_end"]))
        inconclusive += int(undecided.sum())
    # docs/theory.md#theorem-4: with lam > 0 and separate parameters per prompt (every policy class
    # here), every reached gain is at most 2 / lam, so the lam term of Theorem 4 never binds (it
    # would need gamma > 21 / lam).
    lam_times_gain = np.concatenate(
        [
            np.where(r["status"] == flow.Status.REACHED, r["gamma"] * result["kl_coef"], np.nan).ravel()
            for r in (gt, result["rm"])
        ]
    )
    measured_lam = np.any(result["kl_coef"] > 0) and np.isfinite(lam_times_gain).any()
    return {
        "n": int(fit.sum()),
        "max_lam_times_gain": float(np.nanmax(lam_times_gain)) if measured_lam else math.nan,
        "lam_branch_binds": int(np.sum(lam_times_gain > 21.0)),
        "lam_gain_violations": int(np.sum(lam_times_gain > 2.0 * (1 + config.violation_tolerance))),
        "censored": {reward: int(mask.sum()) for reward, mask in censored_mask.items()},
        "failed": {reward: int(mask.sum()) for reward, mask in failed_mask.items()},
        "inconclusive": inconclusive,
        "censored_fit": censored_fit,
        "instances": int(result["variance"].size),
        "slope": slope,
        "slope_ci": list(ci),
        "proxy_slope": rm_slope,
        "proxy_slope_ci": list(rm_ci),
        "variance_range": [float(variance.min()), float(variance.max())],
        "variance_decades": float(np.log10(variance.max() / variance.min())),
        "no_ground_truth_gain": int((~np.isfinite(gt["gamma"])).sum()),
        "violations": {k: int(v.sum()) for k, v in violations.items()},
        "min_ratio": {b: _min_ratio(result, b) for b in ("theorem4", "prop3", "sharpened") if b in gt},
        "max_ratio_prop2": result["max_ratio_prop2"],
        "max_ratio_sqrt": result["max_ratio_sqrt"],
        "max_ratio_variance_rate": result["max_ratio_variance_rate"],
        "max_ratio_prop2_rate": result["max_ratio_prop2_rate"],
        "kl_coef": float(np.max(result["kl_coef"])),
        "length": family.policy.length,
        "jacobian_norm": family.policy.jacobian_norm,
    }


# Where each ratio inequality is measured, by the index of its first axis.
_RATIO_POINTS = {
    "gradient_prop2": ("start", "ground-truth target"),
    "gradient_sqrt": ("start", "ground-truth target"),
    "variance_rate": ("start", "proxy target", "ground-truth target"),
    "prop2_rate": ("start", "proxy target", "ground-truth target"),
}


def _violating_instances(family: Family, result: dict, tolerance: float) -> list[dict]:
    """Every violated bound's instance: the problem with its inputs, and for a timing its times
    and bounds, for a ratio inequality the point where it was measured and the ratio."""
    saved = []
    for name, ratio in result["ratios"].items():
        for point, problem, *prompt in np.argwhere(ratio > 1 + tolerance):
            pick = lambda x: np.asarray(x[problem]).tolist()  # noqa: E731
            saved.append(
                {
                    "family": family.name,
                    "bound": name,
                    "problem": int(problem),
                    "prompt": int(prompt[0]) if prompt else None,
                    "point": _RATIO_POINTS[name][point],
                    "ratio": float(ratio[(point, problem, *prompt)]),
                    "logits": jax.tree.map(pick, family.logits),
                    "rm_rewards": pick(family.rm_rewards),
                    "gt_rewards": pick(family.gt_rewards),
                    "kl_coef": float(family.kl_coef[problem]),
                }
            )
    for bound, bad in _violations(result, tolerance).items():
        for problem, prompt in zip(*np.nonzero(bad)):
            pick = lambda x: np.asarray(x[problem]).tolist()  # noqa: E731
            saved.append(
                {
                    "family": family.name,
                    "bound": bound,
                    "problem": int(problem),
                    "prompt": int(prompt),
                    "logits": jax.tree.map(pick, family.logits),
                    "rm_rewards": pick(family.rm_rewards),
                    "gt_rewards": pick(family.gt_rewards),
                    "kl_coef": float(family.kl_coef[problem]),
                    "gt": {k: float(v[problem, prompt]) for k, v in result["gt"].items()},
                    "rm": {k: float(v[problem, prompt]) for k, v in result["rm"].items()},
                }
            )
    return saved


# --- report ----------------------------------------------------------------------------------


def _figure(families, results, summary, config, path: Path):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (family, result) in enumerate(zip(families, results)):
        var, t = result["variance"].ravel(), result["gt"]["t_gamma"].ravel()
        ok = np.isfinite(t)
        s = summary["families"][family.name]
        timed = np.isfinite(result["gt"]["gamma"].ravel())
        left_out = f", {int((timed & ~ok).sum())} unreached not shown" if (timed & ~ok).any() else ""
        if family.name == "scaled":
            label = f"{family.name} (slope {s['slope']:.3f}{left_out})"
            left.loglog(var[ok], t[ok], ".", ms=4, color=colors[i], label=label)
        ratio = (t / result["gt"]["theorem4"].ravel())[ok]
        right.loglog(var[ok], ratio, ".", ms=2, alpha=0.5, color=colors[i % len(colors)], label=family.name + left_out)
    scaled = results[[f.name for f in families].index("scaled")] if "scaled" in summary["families"] else None
    if scaled is not None:
        grid = np.logspace(np.log10(scaled["variance"].min()), np.log10(scaled["variance"].max()), 50)
        g = config.scaled_gamma
        left.loglog(grid, bounds.theorem4_lower_bound(g, grid), "k-", label="Theorem 4 bound (slope -1/3)")
        left.loglog(
            grid,
            bounds.proposition3_lower_bound(g, grid, num_prompts=1),
            "k--",
            label="Proposition 3 bound (slope -1/2)",
        )
        left.loglog(grid, bounds.proposition_a_lower_bound(g, grid), "k:", label="Proposition A bound (slope -1/2)")
    left.set(
        xlabel="initial reward variance Var[r_RM]",
        ylabel=f"t_gamma on r_G (gamma = {config.scaled_gamma})",
        title="scaled teacher eps * r_G: t_gamma vs variance",
    )
    left.legend(fontsize=8)
    right.axhline(1.0, color="k", lw=1)
    right.set(
        xlabel="initial reward variance Var[r_RM]",
        ylabel="t_gamma / Theorem 4 bound (the bound holds at >= 1)",
        title="every family: measured time over the bound",
    )
    right.legend(fontsize=8, markerscale=4)
    save_figure(fig, path)


def _verdict(summary: dict) -> str:
    total, ratio = summary["violations"], summary["min_ratio"]
    plain = [f["slope"] for f in summary["families"].values() if f["kl_coef"] == 0 and np.isfinite(f["slope"])]
    slopes = f"; slopes without KL {min(plain):.3f} to {max(plain):.3f} (reached times only)" if plain else ""
    return (
        f"{summary['instances']} instances; violations Theorem 4 {total['theorem4']}, Proposition 3 "
        f"{total['prop3']}, Proposition A {total['sharpened']}, variance-rate inequalities (Prop A Step 4, "
        f"Prop 2) {total['variance_rate']} and {total['prop2_rate']}, gradient norms (Prop 2, Cauchy-Schwarz) "
        f"{total['gradient_prop2']} and {total['gradient_sqrt']}, lam * gain <= 2 {total['lam_gain']}; "
        f"{summary['censored']} timings censored at t_max, {summary['failed']} failed solves, "
        f"{summary['no_ground_truth_gain']} prompts with no ground-truth gain to time; smallest time over bound "
        f"{fmt(ratio['theorem4'])}, {fmt(ratio['prop3'])}, {fmt(ratio['sharpened'])}{slopes}"
    )


def _lam_branch_text(summary: dict) -> str:
    """The check that Theorem 4's lam term cannot bind (docs/theory.md#theorem-4), from the counts."""
    penalized = {k: f for k, f in summary["families"].items() if f["kl_coef"] > 0}
    if not penalized:
        return "No family has a KL penalty, so the `lam` branch of Theorem 4 is not examined."
    timed = [f["max_lam_times_gain"] for f in penalized.values() if np.isfinite(f["max_lam_times_gain"])]
    largest = max(timed, default=math.nan)
    untimed = [k for k, f in penalized.items() if not np.isfinite(f["max_lam_times_gain"])]
    binds = sum(f["lam_branch_binds"] for f in penalized.values())
    return (
        f"The `lam` branch of Theorem 4: over every reached target of the KL families the largest "
        f"`lam * gamma` is {fmt(largest)} ({summary['violations']['lam_gain']} above the bound 2 derived in "
        f"docs/theory.md#theorem-4), and the `lam` term is the smaller one for {binds} targets "
        "(it would need `lam * gamma > 21`)." + (f" No target was reached in {', '.join(untimed)}." if untimed else "")
    )


def _censored_slope_text(fit: dict) -> str:
    if not fit["censored"]:
        return "none censored"
    relation = "at most" if fit["at_t_max_is_upper_bound"] else "with them at t_max:"
    tobit = f"{fit['tobit']:.3f}" if fit["tobit_converged"] else "not converged"
    if np.isfinite(fit["tobit_ci"]).all():
        tobit += f" [{fit['tobit_ci'][0]:.3f}, {fit['tobit_ci'][1]:.3f}]"
        if fit.get("tobit_unconverged"):
            tobit += f" ({fit['tobit_unconverged']} resamples left out: their EM did not converge)"
    return f"{relation} {fit['at_t_max']:.3f}; Tobit {tobit}"


def _markdown(summary: dict) -> str:
    v = summary["violations"]
    lines = [
        "## Theorem 1 / 4: `t_gamma = Omega(Var^(-1/3))`",
        "",
        f"**Verdict:** {summary['instances']} instances (prompts), "
        f"violations: Theorem 4 {v['theorem4']}, Proposition 3 {v['prop3']}, Proposition A (sharpened) {v['sharpened']}. "
        f"Smallest measured time over bound: Theorem 4 {fmt(summary['min_ratio']['theorem4'])}, "
        f"Proposition 3 {fmt(summary['min_ratio']['prop3'])}, Proposition A {fmt(summary['min_ratio']['sharpened'])}. "
        f"{summary['censored']} timings (ground truth and proxy) did not reach their target by `t_max` "
        f"(censored: their time exceeds `t_max`) and {summary['failed']} solves failed before it (their "
        "time exceeds only where they stopped; they are left out of the fits); what is known of those "
        f"times exceeds every bound on "
        f"{'all' if not summary['inconclusive'] else 'all but ' + str(summary['inconclusive'])} of them; "
        f"{summary['no_ground_truth_gain']} prompts offer no ground-truth gain to time.",
        "",
        "| family | lam | L | J | timed (r_G) | censored r_G / proxy | failed r_G / proxy | no r_G gain "
        "| variance decades "
        "| slope of t_gamma(r_G), reached [95% CI] | slope with the censored | proxy slope "
        "| min t/Thm 4 | min t/Prop 3 | min t/Prop A | violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in summary["families"].items():
        lo, hi = f["slope_ci"]
        lines.append(
            f"| {name} | {fmt(f['kl_coef'])} | {f['length']} | {fmt(f['jacobian_norm'])} | "
            f"{f['n'] + f['censored']['gt']} | "
            f"{f['censored']['gt']} / {f['censored']['rm']} | {f['failed']['gt']} / {f['failed']['rm']} | "
            f"{f['no_ground_truth_gain']} | "
            f"{f['variance_decades']:.1f} | {f['slope']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{_censored_slope_text(f['censored_fit'])} | {f['proxy_slope']:.3f} | "
            f"{fmt(f['min_ratio'].get('theorem4'))} | {fmt(f['min_ratio'].get('prop3'))} | "
            f"{fmt(f['min_ratio'].get('sharpened'))} | {sum(f['violations'].values())} |"
        )
    g = summary["grad_bound"]
    lines += [
        "",
        'The reached-only slope leaves out the censored timings. "Slope with the censored" refits with '
        "each censored time at `t_max` (an upper bound on the slope with the true times when every censored "
        'point lies below its group\'s mean log-variance, written "at most") and by censored maximum '
        "likelihood (Tobit, normal errors on `log t`).",
        "",
        f"Gradient norms at {g['points']} points (initial and at `t_gamma`): largest `||grad phi_x||` over "
        f"Proposition 2's `6 M^(1/3) L J Var[r_KL]^(1/3)`: {fmt(g['max_ratio_prop2'])}; over the "
        f"Cauchy-Schwarz `sqrt(2) L J sqrt(Var[r_KL])`: {fmt(g['max_ratio_sqrt'])} (both must be <= 1; "
        f"{v['gradient_prop2']} and {v['gradient_sqrt']} above 1).",
        "",
        f"The variance along the flow, at {g['rate_points']} points (start, proxy target, ground-truth "
        f"target of each problem; exact `d/dt Var_KL` by forward-mode differentiation): largest "
        f"`d/dt Var_KL` over Proposition A's Step 4 `2 L^2 J^2 Var_KL^(3/2)`: {fmt(g['max_ratio_variance_rate'])} "
        f"({v['variance_rate']} above 1); over Proposition 2's `24 L^2 J^2 Var^(4/3)`: "
        f"{fmt(g['max_ratio_prop2_rate'])} ({v['prop2_rate']} above 1).",
        "",
        _lam_branch_text(summary),
        "",
        _interpretation(summary),
        "",
        "![t_gamma against variance](figures/theorem1.png)",
        "",
    ]
    return "\n".join(lines)


def _upper_confidence_bound(family: dict) -> tuple[float, str] | None:
    """The 95% upper bound on a family's slope of ``t_gamma`` against the variance, counting its
    censored timings, and what it rests on: the reached-only interval when none is censored;
    when every censored timing lies below its group's mean log-variance, the interval of the fit
    with them at ``t_max``, whose slope bounds the true one from above, whatever the true times
    ("model-free"); otherwise the Tobit interval, which assumes normal errors on ``log t``
    ("Tobit"; :func:`theory.common.censored_slopes`). None when none of these was measured."""
    fit = family["censored_fit"]
    if not fit["censored"]:
        return family["slope_ci"][1], "reached"
    if fit["at_t_max_is_upper_bound"]:
        return fit["at_t_max_ci"][1], "model-free"
    high = fit.get("tobit_ci", [math.nan] * 2)[1]
    return (high, "Tobit") if np.isfinite(high) else None


def _interpretation(summary: dict) -> str:
    """What the measured slopes say about the -1/3 exponent, worded from the numbers."""
    families = summary["families"]
    plain = {k: f for k, f in families.items() if f["kl_coef"] == 0 and np.isfinite(f["slope"])}
    penalized = {k: f for k, f in families.items() if f["kl_coef"] > 0}
    text = ["**What it means for the -1/3 exponent.**"]
    unmeasured = [k for k, f in families.items() if not np.isfinite(f["slope"])]
    if unmeasured:
        text.append(f"No slope could be measured for {', '.join(unmeasured)} (fewer than 3 reached timings).")
    if plain:
        slopes = [f["slope"] for f in plain.values()]
        half = [
            k
            for k, f in plain.items()
            if f["slope_ci"][0] - SLOPE_TOLERANCE <= -0.5 <= f["slope_ci"][1] + SLOPE_TOLERANCE
        ]
        judged = {k: _upper_confidence_bound(f) for k, f in plain.items()}
        undecided = [k for k, bound in judged.items() if bound is None]
        below_third = [k for k, bound in judged.items() if bound is not None and bound[0] < -1 / 3]
        resting = {
            basis: [k for k, bound in judged.items() if bound is not None and bound[1] == basis]
            for basis in ("model-free", "Tobit")
        }
        text.append(
            f"Without a KL penalty the fitted slopes (reached times) run from {min(slopes):.3f} to "
            f"{max(slopes):.3f}; the reached-only 95% interval comes within {SLOPE_TOLERANCE} of -1/2 for "
            f"{len(half)} of {len(plain)} families"
            + (f" ({', '.join(half)})" if 0 < len(half) < len(plain) else "")
            + f", and the slope's 95% upper bound, counting the censored timings, lies below -1/3 for "
            f"{len(below_third)} of {len(plain)}."
        )
        if resting["model-free"]:
            text.append(
                f"For {', '.join(resting['model-free'])}, whose censored timings all lie below their group's mean "
                "log-variance, that bound is the fit's with them at `t_max`, which bounds the slope with their "
                "true times from above."
            )
        if resting["Tobit"]:
            text.append(
                f"For {', '.join(resting['Tobit'])} some censored timings lie above their group's mean "
                "log-variance, so no model-free fit bounds the slope: that bound is the Tobit fit's, which "
                "assumes normal errors on `log t`."
            )
        if undecided:
            text.append(
                f"For {', '.join(undecided)} no bound counting the censored timings was measured: the -1/3 "
                "question is left undecided there."
            )
        violated = summary["violations"]["theorem4"]
        if violated:
            text.append(
                f"Theorem 4's bound was violated on {violated} instances (saved in `theorem1_violations.json`)."
            )
        elif len(below_third) == len(plain):
            text.append(
                "On these families Theorem 4's `Var^(-1/3)` held on every timed instance and is a loose lower "
                "bound whose slack grows as the variance shrinks."
            )
        else:
            open_ = [k for k in plain if k not in below_third and k not in undecided]
            if open_:
                text.append(f"The data cannot rule out a -1/3 exponent for {', '.join(open_)}.")
        if "scaled" in plain:
            text.append(
                "(The scaled teacher is a pure time rescaling, `t_gamma ∝ 1/eps ∝ Var^(-1/2)` by construction.)"
            )
    moved = {k: f["censored_fit"] for k, f in families.items() if f["censored_fit"]["censored"]}
    if moved:
        text.append(
            "Counting the censored timings moves the slopes: "
            + "; ".join(
                f"{k} {families[k]['slope']:.3f} -> {_censored_slope_text(fit)} ({fit['censored']} censored)"
                for k, fit in moved.items()
            )
            + "."
        )
    v = summary["violations"]
    held = [name for name, key in (("Proposition 3", "prop3"), ("Proposition A", "sharpened")) if v[key] == 0]
    broken = [
        f"{name} on {v[key]}" for name, key in (("Proposition 3", "prop3"), ("Proposition A", "sharpened")) if v[key]
    ]
    if held:
        text.append(
            f"{' and '.join(held)} (`Omega(Var^(-1/2))`) held on every timed instance, with smallest slack "
            + ", ".join(fmt(summary["min_ratio"][k]) for k in ("prop3", "sharpened") if v[k] == 0)
            + "."
        )
    if broken:
        text.append(f"Violated: {', '.join(broken)} instances (saved in `theorem1_violations.json`).")
    share = {k: f for k, f in penalized.items() if not k.endswith("_fixed") and np.isfinite(f["slope"])}
    fixed = {k: f for k, f in penalized.items() if k.endswith("_fixed")}
    if share and plain:
        described = ", ".join(f"{k}: {f['slope']:.3f}" for k, f in share.items())
        flatter = min(f["slope"] for f in share.values()) > max(f["slope"] for f in plain.values())
        text.append(
            f"With a KL penalty and `gamma` a share of the gain the teacher offers ({described}) every slope is "
            + ("flatter than every one without" if flatter else "not uniformly flatter than those without")
            + "; that share shrinks with the reward scale, so these slopes reflect the choice of `gamma` as well "
            "as the variance."
        )
    if fixed:
        described = "; ".join(
            f"{k}: {f['slope']:.3f} [{f['slope_ci'][0]:.3f}, {f['slope_ci'][1]:.3f}] over {f['n']} timed, "
            f"{f['no_ground_truth_gain']} offering less than `gamma`"
            for k, f in fixed.items()
        )
        text.append(
            f"On the same instances with an absolute ground-truth `gamma` ({described}) only the teachers that "
            "offer the gain are timed; the proxy's own `gamma` is unchanged, so its slope is that of the family "
            "without `_fixed`."
        )
    return " ".join(text)


# --- entry point -----------------------------------------------------------------------------


def run(out_dir: Path, *, quick: bool = False, config: Theorem1Config | None = None, only_families=None) -> dict:
    """Run the study, write ``theorem1.json``, ``theorem1.md`` and the figure; return the summary."""
    config = Theorem1Config.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    families = make_families(config, only_families)
    progress(f"{len(families)} families, {sum(int(np.size(f.gt_gamma)) for f in families)} instances")
    results, family_summaries, saved = [], {}, []
    for family in families:
        result = _measure(family, config)
        results.append(result)
        family_summaries[family.name] = s = _family_summary(family, result, config)
        saved += _violating_instances(family, result, config.violation_tolerance)
        progress(
            f"{family.name:18s} {s['instances']:6d} instances  slope {s['slope']:+.3f} "
            f"[{s['slope_ci'][0]:+.3f}, {s['slope_ci'][1]:+.3f}]  min t/Thm4 {fmt(s['min_ratio']['theorem4'])}  "
            f"violations {sum(s['violations'].values())}"
        )
    total = {
        b: sum(f["violations"].get(b, 0) for f in family_summaries.values()) for b in ("theorem4", "prop3", "sharpened")
    }
    for name in _RATIO_POINTS:
        total[name] = sum(int((r["ratios"][name] > 1 + config.violation_tolerance).sum()) for r in results)
    total["lam_gain"] = sum(f["lam_gain_violations"] for f in family_summaries.values())
    min_ratio = {
        b: min((f["min_ratio"][b] for f in family_summaries.values() if b in f["min_ratio"]), default=math.nan)
        for b in ("theorem4", "prop3", "sharpened")
    }
    summary = {
        "instances": int(sum(f["instances"] for f in family_summaries.values())),
        "violations": total,
        "censored": int(sum(sum(f["censored"].values()) for f in family_summaries.values())),
        "failed": int(sum(sum(f["failed"].values()) for f in family_summaries.values())),
        "inconclusive": int(sum(f["inconclusive"] for f in family_summaries.values())),
        "no_ground_truth_gain": int(sum(f["no_ground_truth_gain"] for f in family_summaries.values())),
        "min_ratio": min_ratio,
        "families": family_summaries,
        "grad_bound": {
            "max_ratio_prop2": max(r["max_ratio_prop2"] for r in results),
            "max_ratio_sqrt": max(r["max_ratio_sqrt"] for r in results),
            "points": int(sum(r["gradient_points"] for r in results)),
            "max_ratio_variance_rate": max(r["max_ratio_variance_rate"] for r in results),
            "max_ratio_prop2_rate": max(r["max_ratio_prop2_rate"] for r in results),
            "rate_points": int(sum(r["rate_points"] for r in results)),
        },
        "config": dataclasses.asdict(config),
    }
    save_violations(out_dir, NAME, saved, progress=progress)
    _figure(families, results, summary, config, out_dir / "figures" / "theorem1.png")
    arrays = {f"{f.name}/{k}": v for f, r in zip(families, results) for k, v in _flat_arrays(r).items()}
    for family in families:
        arrays.update({f"{family.name}/input_{k}": v for k, v in _family_inputs(family).items()})
    write_atomically(
        out_dir / "theorem1_all_instances.npz", lambda file: np.savez_compressed(file, **arrays), binary=True
    )
    summary["verdict"] = _verdict(summary)
    progress(f"{summary['instances']} instances, violations {total}")
    return finish_study(out_dir, NAME, summary, _markdown(summary), progress=progress, quick=quick)


def _family_inputs(family: Family) -> dict:
    """What re-solves a family's instances: the policy (its class name and every field, such as
    the shared class's features), its initial logits (one array per leaf, named by its path),
    both rewards, ``kl_coef`` and both targets."""
    policy = {"policy_class": np.asarray(type(family.policy).__name__)} | {
        f"policy_{field.name}": np.asarray(getattr(family.policy, field.name))
        for field in dataclasses.fields(family.policy)
    }
    logits = {
        "logits" + jax.tree_util.keystr(path).replace("'", "").replace('"', ""): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(family.logits)[0]
    }
    fields = ("rm_rewards", "gt_rewards", "kl_coef", "gt_gamma", "rm_gamma")
    return policy | logits | {name: np.asarray(getattr(family, name)) for name in fields}


def _flat_arrays(result: dict) -> dict:
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, np.ndarray):
            out[key] = value
    return out
