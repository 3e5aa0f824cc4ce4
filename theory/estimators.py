"""What each sampled estimator optimizes: the exact estimator atlas (docs/theory.md#what-each-estimator-optimizes).

For random one-prompt problems on an autoregressive-tabular policy (a current and a reference
policy, task rewards ``scale * U(-1, 1)`` at several scales), every estimator of
:func:`jaxrm.estimators.grid` at every ``k`` gets its exact gradient mean and covariance
(:func:`jaxrm.estimators.estimate_many_moments`, all ``|Y|^k`` groups), compared with the
gradient of the objective it claims, ``E r - lam KL(pi || pi_ref)``, and with the closed form
it follows (:func:`jaxrm.estimators.followed_gradient`).

Violations: an estimator that should be unbiased for the claimed objective (REINFORCE with or
without a baseline and RLOO, with ``k1`` in the reward) measured biased beyond ``tolerance``;
a mean that misses its closed form by more than ``tolerance``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxrm import estimators as E
from jaxrm import metrics
from jaxrm.studies import (
    POSITIVE,
    POSITIVE_INT,
    Progress,
    StudyConfig,
    checked,
    each,
    fmt,
    int_at_least,
    pyplot,
    save_figure,
    write_json,
    write_text,
)
from jaxrm.tabular import AutoregressiveTabularPolicy

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
      ks: group sizes (each an int >= 2; ``|Y|^k`` groups are enumerated, at most 2e6).
      log10_scales: the task rewards are ``10^x * U(-1, 1)``, so the reward variance is
        multiplied by ``10^(2x)``; run from the largest scale down.
      kl_coef: ``lam > 0`` of the claimed objective and of every KL placement.
      ref_distance: the reference policy's logits are the current ones plus this times
        ``N(0, 1)`` (> 0, so the KL terms and their gradients are not zero).
      tolerance: relative error in ``(0, 1e-3)`` beyond which a mean counts as biased, or as
        missing its closed form.
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

    def __post_init__(self):
        super().__post_init__()
        outputs = self.vocab_size**self.length
        if outputs ** max(self.ks) > 2_000_000:
            raise ValueError(
                f"EstimatorsConfig.ks={self.ks}: |Y|^k = {outputs}^{max(self.ks)} groups exceeds 2e6; lower k or V^L."
            )

    def quick(self) -> "EstimatorsConfig":
        return dataclasses.replace(self, problems=2, ks=(2,), log10_scales=(0.0, -2.0))


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
    policy, logits, refs, unit = make_problems(config)
    scales = 10.0 ** np.sort(np.asarray(config.log10_scales, float))[::-1]  # largest first: "high" to "low"
    lam = config.kl_coef
    rows = []  # one per (k, estimator)
    variance = np.zeros((config.problems, len(scales)))
    for k in config.ks:
        grid = tuple(E.grid(ks=(k,)))
        measured = np.full((len(grid), len(MEASURES), config.problems, len(scales)), np.nan)
        followed_error = np.full((len(grid), config.problems, len(scales)), np.nan)
        for p in range(config.problems):
            for s, scale in enumerate(scales):
                rewards = scale * unit[p]
                variance[p, s] = float(metrics.reward_variance(policy.log_probs(logits[p])[0], rewards))
                means = E.estimate_many_moments(grid, policy, logits[p], rewards, kl_coef=lam, ref_logits=refs[p])
                gradients = E.kl_gradients(policy, logits[p], rewards, ref_logits=refs[p])
                target = E.objective_gradient(policy, logits[p], rewards, kl_coef=lam, ref_logits=refs[p])
                for e, (estimator, moments) in enumerate(zip(grid, means)):
                    measured[e, :, p, s] = E.compare(moments, target)
                    closed = E.followed_gradient(
                        estimator, policy, logits[p], rewards, kl_coef=lam, ref_logits=refs[p], gradients=gradients
                    )
                    if closed is not None:
                        followed_error[e, p, s] = float(
                            np.linalg.norm(np.asarray(moments.mean) - np.asarray(closed))
                            / max(np.linalg.norm(np.asarray(closed)), 1e-300)
                        )
        progress(f"k = {k}: {len(grid)} estimators x {config.problems} problems x {len(scales)} scales, exact")
        for e, estimator in enumerate(grid):
            rows.append(
                {
                    "name": estimator.name,
                    "k": k,
                    "estimator": dataclasses.asdict(estimator),
                    "follows": follows(estimator),
                    "should_be_unbiased": should_be_unbiased(estimator),
                    # per scale, the median over problems
                    **{m: np.nanmedian(measured[e, i], axis=0).tolist() for i, m in enumerate(MEASURES)},
                    "max_relative_bias": float(np.max(measured[e, 0])),
                    "followed_error": float(np.nanmax(followed_error[e]))
                    if np.isfinite(followed_error[e]).any()
                    else None,
                }
            )
    tol = config.tolerance
    violations = {
        "unbiased": sum(r["should_be_unbiased"] and r["max_relative_bias"] > tol for r in rows),
        "followed": sum(r["followed_error"] is not None and r["followed_error"] > tol for r in rows),
    }
    summary = {
        "instances": int(len(rows) * config.problems * len(scales)),
        "violations": violations,
        "censored": 0,  # nothing is timed
        "estimators": rows,
        "variance": np.median(variance, axis=0).tolist(),
        "snr": _snr_ends(rows),
        "config": dataclasses.asdict(config),
    }
    summary["verdict"] = _verdict(summary, config)
    _figure(summary, config, out_dir / "figures" / f"{NAME}.png")
    summary["seconds"] = round(progress.elapsed, 1)
    summary["quick"] = quick
    write_json(out_dir / f"{NAME}.json", summary)
    write_text(out_dir / f"{NAME}.md", _markdown(summary, config))
    progress(f"done, wrote {out_dir}/{NAME}.*")
    return summary


def _snr_ends(rows) -> dict:
    """Per k, RLOO's (k1 in the reward) signal-to-noise ratio at the largest and the smallest
    reward variance: a task-dominated and a KL-dominated plateau, not a power law."""
    return {
        str(row["k"]): {"high": row["snr"][0], "low": row["snr"][-1]}
        for row in rows
        if row["name"] == f"rloo(k={row['k']}), k1 in reward"
    }


def _verdict(summary: dict, config: EstimatorsConfig) -> str:
    rows, v = summary["estimators"], summary["violations"]
    claimed = [r for r in rows if r["should_be_unbiased"]]
    closed = [r for r in rows if r["followed_error"] is not None]
    grpo = [r for r in rows if r["name"] == f"grpo(k={r['k']}), k1 in reward"]
    text = (
        f"{summary['instances']} exact estimator means; {len(claimed)} that should be unbiased for "
        f"E r - lam KL: {v['unbiased']} biased beyond {config.tolerance:g}; {len(closed)} with a closed form: "
        f"{v['followed']} off it"
    )
    if grpo:
        text += (
            f"; GRPO (k1 in the reward) relative bias {fmt(min(min(r['relative_bias']) for r in grpo))} to "
            f"{fmt(max(max(r['relative_bias']) for r in grpo))} across k and reward scales"
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
        text.append(
            f"GRPO divides by the group's std of the KL-shaped rewards, which the KL term sets once the task rewards "
            f"are small: relative bias {fmt(grpo['relative_bias'][0])} at the largest scale and "
            f"{fmt(grpo['relative_bias'][-1])} at the smallest, direction bias {fmt(grpo['direction_bias'][0])} and "
            f"{fmt(grpo['direction_bias'][-1])}; Dr. GRPO's direction bias is {fmt(max(dr['direction_bias']))} "
            f"(scale {fmt(dr['scale'][0])} = (k-1)/k)."
        )
    ends = summary["snr"]
    if ends:
        text.append(
            "Signal-to-noise ratio of one RLOO group (k1 in the reward), largest to smallest reward variance: "
            + "; ".join(f"k = {kk}: {fmt(e['high'])} to {fmt(e['low'])}" for kk, e in ends.items())
            + "."
        )
    return " ".join(text)


def _figure(summary: dict, config: EstimatorsConfig, path: Path):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    variance = np.asarray(summary["variance"])
    k = config.ks[len(config.ks) // 2]
    for name in (
        f"grpo(k={k}), k1 in reward",
        f"dr_grpo(k={k}), k1 in reward",
        f"rloo(k={k}), k1 in loss",
        f"rloo(k={k}), k3 in loss",
        f"rloo(k={k}), k2 in reward",
        f"rloo(k={k}), k1 in reward, group normalization",
    ):
        row = next((r for r in summary["estimators"] if r["name"] == name), None)
        if row is not None:
            left.loglog(variance, np.maximum(row["relative_bias"], 1e-17), "o-", label=name)
    left.set(
        xlabel="reward variance under the policy",
        ylabel="relative bias against grad(E r - lam KL)",
        title=f"exact bias, k = {k} (median over problems)",
    )
    left.legend(fontsize=7)
    for row in summary["estimators"]:
        if row["name"] == f"rloo(k={row['k']}), k1 in reward":
            right.loglog(variance, row["snr"], "o-", label=f"RLOO k = {row['k']}")
    right.set(
        xlabel="reward variance under the policy",
        ylabel="||E g||^2 / trace Cov g (one group)",
        title="signal-to-noise ratio, RLOO with k1 in the reward",
    )
    right.legend(fontsize=7)
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
    v = summary["violations"]
    high, low = summary["variance"][0], summary["variance"][-1]
    return f"""## What each estimator optimizes: the exact estimator atlas

**Verdict:** {summary["verdict"]}.

{config.problems} random one-prompt problems on an autoregressive-tabular policy (V = {config.vocab_size},
L = {config.length}), a reference policy at distance {config.ref_distance:g}, `lam = {config.kl_coef:g}`, task
rewards scaled so that their variance under the policy runs from {fmt(high)} to {fmt(low)}; every estimator's
gradient mean and covariance is exact (all `|Y|^k` groups). Violations: should-be-unbiased estimators
biased beyond {config.tolerance:g}: {v["unbiased"]}; means off their closed form: {v["followed"]}.

{_findings(summary, config)}

At k = {k} (medians over problems; "high"/"low" are the largest and smallest reward variance):

| estimator | KL and variant | follows (docs/theory.md) | rel. bias, high | rel. bias, low | cosine, low | direction bias, low | SNR, high | SNR, low |
|---|---|---|---|---|---|---|---|---|
{rows}

![bias and signal-to-noise](figures/{NAME}.png)
"""
