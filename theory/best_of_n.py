"""Proposition 1 of Razin et al.: for Best-of-N, a perfectly accurate reward model is optimal.

For random policies over several prompts, reward models on a grid of within-prompt noise
(which lowers accuracy) and per-prompt offsets (which leave accuracy at its value but, after
normalization, move variance from within prompts to between them), plus perfectly accurate
but low-variance models built as the paper builds one (a raw reward times 0.001 on half the
prompts; raw means 0 and 1), are each normalized by one global mean and standard deviation
under the initial policy (docs/theory.md#experiments-of-razin-et-al).
For each:

- the exact expected ground-truth reward of Best-of-N for ``N = 1..64``
  (:func:`jaxrm.metrics.best_of_n_reward`, closed form, no sampling);
- the exact ground-truth gain of policy-gradient flow after a fixed time.

Proposition 1 is checked for every problem and ``N`` (no model beats the perfect one), and the
two rankings are compared: accuracy ranks Best-of-N teachers, variance ranks policy-gradient ones.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm import flow, metrics
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
    pyplot,
    save_figure,
    save_violations,
)

NAME = "best_of_n"


@dataclasses.dataclass(frozen=True)
class BestOfNConfig(StudyConfig):
    """Sizes and grids of the Best-of-N study (docs/theory.md#proposition-1-best-of-n); the
    reward models are described in the module docstring. Fields with a range are checked on
    construction.

    Attributes:
      seed: seed of the random policies, ground truths and reward-model noise.
      problems: independent problems (an int >= 2), each with its own policy and ``r_G``.
      prompts: ``|S|``, prompts per problem (an int >= 2); the first ``prompts // 2`` get the
        ``low_variance_scale`` in the perfectly accurate, low-variance model.
      num_outputs: ``|Y|`` (an int >= 2).
      noise: standard deviations (>= 0) of the Gaussian within-prompt noise added to ``r_G``,
        which lowers accuracy; must contain 0.
      offsets: standard deviations (>= 0) of a Gaussian offset per prompt added to ``r_G``,
        which leaves accuracy unchanged; must contain 0 (noise 0 with offset 0 is the perfect
        model).
      max_n: Best-of-N is evaluated exactly for ``N = 1 .. max_n`` (an int >= 2).
      ranking_n: the ``N`` whose Best-of-N gain ranks the models in the summary
        (``1 <= ranking_n <= max_n``).
      low_variance_scale: factor on ``r_G`` on half the prompts in the perfectly accurate,
        low-variance models (the paper's 0.001).
      low_variance_means: one perfectly accurate, low-variance model per value: the raw reward
        ``r_G + mean`` (``r_G`` itself has mean 0) is scaled on half the prompts, then
        normalized. With a mean of 0 the scaled half keeps almost no variance but the other
        half's doubles, so the mean barely moves; away from 0 the scaling also opens a gap
        between the halves' means that the global standard deviation absorbs, and the mean
        falls (docs/theory.md#experiments-of-razin-et-al).
      pg_time: flow time (> 0) at which the policy-gradient gain is measured.
      tolerance: absolute slack: a model counts as beating the perfect one (a violation of
        Proposition 1) only when its Best-of-N reward exceeds it by more than this.
    """

    seed: int = 0
    problems: int = checked(64, int_at_least(2))
    prompts: int = checked(
        8, (lambda v: isinstance(v, int) and v >= 2, "an int >= 2 (half get the low-variance scale)")
    )
    num_outputs: int = checked(16, int_at_least(2))
    noise: tuple[float, ...] = checked((0.0, 0.3, 1.0), distinct(each(NON_NEGATIVE)))
    offsets: tuple[float, ...] = checked((0.0, 1.0, 3.0), distinct(each(NON_NEGATIVE)))
    max_n: int = checked(64, int_at_least(2))
    ranking_n: int = checked(16, POSITIVE_INT)
    low_variance_scale: float = checked(0.001, (lambda v: 0 < v < 1, "in (0, 1)"))
    low_variance_means: tuple[float, ...] = checked((0.0, 1.0), distinct(each((lambda v: True, "numbers"))))
    pg_time: float = checked(8.0, POSITIVE)
    tolerance: float = checked(1e-12, NON_NEGATIVE)

    def __post_init__(self):
        super().__post_init__()
        if self.ranking_n > self.max_n:
            raise ValueError(f"BestOfNConfig.ranking_n={self.ranking_n}: must be at most max_n={self.max_n}.")

    def quick(self) -> "BestOfNConfig":
        return dataclasses.replace(self, problems=8)


def low_variance_name(mean: float) -> str:
    return f"perfect, low variance (raw mean {mean:g})"


def make_models(config: BestOfNConfig):
    """``[problems, models, S, Y]`` normalized reward models, their names, policies and ``r_G``."""
    rng = np.random.default_rng(config.seed)
    b, s, y = config.problems, config.prompts, config.num_outputs
    logits = rng.uniform(0.5, 2.0, (b, 1, 1)) * rng.normal(size=(b, s, y))
    gt = rng.uniform(-1.0, 1.0, (b, s, y))
    scale = np.where(np.arange(s) < s // 2, config.low_variance_scale, 1.0)[None, :, None]
    models = [scale * (gt + mean) for mean in config.low_variance_means]
    names = [low_variance_name(mean) for mean in config.low_variance_means]
    for sigma in config.noise:
        for offset in config.offsets:
            models.append(gt + sigma * rng.normal(size=gt.shape) + offset * rng.normal(size=(b, s, 1)))
            names.append("perfect" if sigma == offset == 0 else f"noise {sigma:g}, offsets {offset:g}")
    order = sorted(range(len(names)), key=lambda i: names[i] != "perfect")  # the perfect model first
    models, names = [models[i] for i in order], [names[i] for i in order]
    if names[0] != "perfect":
        raise ValueError("the grids must contain noise 0 and offset 0 (the perfect reward model).")
    rm = np.stack(models, axis=1)
    return names, logits, gt, np.asarray(metrics.normalize_rewards(np.broadcast_to(logits[:, None], rm.shape), rm))


def run(out_dir: Path, *, quick: bool = False, config: BestOfNConfig | None = None) -> dict:
    config = BestOfNConfig.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    names, logits, gt, rm = make_models(config)
    b, m = rm.shape[:2]
    lg, g = np.broadcast_to(logits[:, None], rm.shape), np.broadcast_to(gt[:, None], rm.shape)
    ns = np.arange(1, config.max_n + 1)
    # The arrays go in as arguments: closed over, XLA would constant-fold the sort at compile time.
    best_of = jax.jit(jax.vmap(metrics.best_of_n_reward, in_axes=(None, None, None, 0)))
    per_prompt = np.asarray(best_of(lg, rm, g, ns))  # [N, B, M, S]
    bon = per_prompt.mean(-1)  # [N, B, M]
    start = np.asarray(metrics.expected_reward(logits, gt)).mean(-1)  # [B]
    bon_gain = bon - start[None, :, None]
    accuracy = np.asarray(metrics.accuracy(rm, g)).mean(-1)
    on_policy = np.asarray(metrics.accuracy(rm, g, probs=jax.nn.softmax(lg, -1))).mean(-1)
    per_prompt_variance = np.asarray(metrics.reward_variance(lg, rm))  # [B, M, S]
    variance = per_prompt_variance.mean(-1)
    # The low-variance models scale the first half of the prompts (make_models); after the one
    # global normalization, how each half's variance ends up.
    scaled_half = np.arange(rm.shape[2]) < rm.shape[2] // 2
    halves = {
        name: {
            "variance_scaled_half": float(per_prompt_variance[:, i][:, scaled_half].mean()),
            "variance_other_half": float(per_prompt_variance[:, i][:, ~scaled_half].mean()),
        }
        for i, name in enumerate(names)
        if name.startswith("perfect")
    }
    progress(f"Best-of-N for N = 1..{config.max_n}: {b} problems x {m} reward models")
    path = flow.trajectory(
        lg.reshape(b * m, *rm.shape[2:]),
        rm.reshape(b * m, *rm.shape[2:]),
        jnp.asarray([config.pg_time]),
        eval_rewards=g.reshape(b * m, *rm.shape[2:]),
    )
    pg_gain = np.asarray(path.eval_reward[0]).mean(-1).reshape(b, m) - start[:, None]
    progress(f"policy-gradient flow to t = {config.pg_time} for {b * m} problems")

    # Proposition 1 holds prompt by prompt: on every prompt and N, no model beats the perfect one.
    best_other = per_prompt[:, :, 1:].max(2)
    beaten = best_other > per_prompt[:, :, 0] + config.tolerance  # [N, B, S]
    violations = int(beaten.sum())
    violating = [
        {
            "n": int(ns[n]),
            "problem": int(p),
            "prompt": int(s),
            "model": names[1 + int(per_prompt[n, p, 1:, s].argmax())],
            "logits": logits[p, s].tolist(),
            "gt_rewards": gt[p, s].tolist(),
            "rm_rewards": rm[p, :, s].tolist(),
            "best_of_n": per_prompt[n, p, :, s].tolist(),
        }
        for n, p, s in zip(*np.nonzero(beaten))
    ]
    save_violations(out_dir, NAME, violating, progress=progress)
    ranking = config.ranking_n - 1
    pairs = {
        "accuracy_vs_bon": (accuracy, bon_gain[ranking]),
        "variance_vs_bon": (variance, bon_gain[ranking]),
        "accuracy_vs_pg": (accuracy, pg_gain),
        "variance_vs_pg": (variance, pg_gain),
    }
    spearman = {name: _problem_spearman(*pair, seed=config.seed) for name, pair in pairs.items()}
    summary = {
        "instances": int(b * m),
        "violations": {"perfect_not_optimal": violations},
        "censored": 0,  # gains are measured at a fixed N and a fixed flow time: nothing is timed
        "n_checked": int(len(ns)),
        "prompt_checks": int(best_other.size),
        "models": {
            name: {
                "accuracy": float(accuracy[:, i].mean()),
                "on_policy_accuracy": float(on_policy[:, i].mean()),
                "variance": float(variance[:, i].mean()),
                f"bon{config.ranking_n}_gain": float(bon_gain[ranking, :, i].mean()),
                "pg_gain": float(pg_gain[:, i].mean()),
                **halves.get(name, {}),
            }
            for i, name in enumerate(names)
        },
        # per problem, averaged, with the 95% percentile-bootstrap interval of the average over problems
        "spearman": {name: spearman[name][0] for name in pairs},
        "spearman_interval": {name: spearman[name][1] for name in pairs},
        "pg_best_model": _most_common(np.array(names)[pg_gain.argmax(-1)]),
        "config": dataclasses.asdict(config),
    }
    summary["verdict"] = (
        f"{b * m} (problem, reward model) pairs, N = 1..{config.max_n}; the perfect model beaten on {violations} of "
        f"{best_other.size} (N, problem, prompt) checks; "
        f"Spearman [95%] with Best-of-{config.ranking_n} gain: accuracy {_with_interval(summary, 'accuracy_vs_bon')}; "
        f"with policy-gradient gain: variance {_with_interval(summary, 'variance_vs_pg')}, accuracy "
        f"{_with_interval(summary, 'accuracy_vs_pg')}"
    )
    progress(f"violations of Proposition 1: {violations}")
    _figure(names, ns, bon_gain, accuracy, variance, pg_gain, summary["spearman"], out_dir / "figures" / f"{NAME}.png")
    return finish_study(out_dir, NAME, summary, _markdown(summary, config), progress=progress, quick=quick)


def _problem_spearman(x, y, *, seed: int, num_resamples: int = 2000) -> tuple[float, list[float]]:
    """The mean over problems of the per-problem Spearman correlation across reward models
    (``x``, ``y``: ``[problems, models]``), and its 95% percentile-bootstrap interval
    ``[low, high]`` over problems."""
    per_problem = np.asarray(metrics.spearman(x, y))
    picks = np.random.default_rng(seed).integers(0, len(per_problem), (num_resamples, len(per_problem)))
    return float(per_problem.mean()), np.percentile(per_problem[picks].mean(-1), [2.5, 97.5]).tolist()


def _most_common(values) -> dict:
    """The most frequent values (every one of them on a tie), how often each occurs and out of how many."""
    names, counts = np.unique(values, return_counts=True)
    return {"names": [str(n) for n in names[counts == counts.max()]], "count": int(counts.max()), "of": len(values)}


def _most_common_text(best: dict) -> str:
    names = " and ".join(f"`{n}`" for n in best["names"])
    each = ", each" if len(best["names"]) > 1 else ""
    return (
        f"The most frequent best policy-gradient teacher{' (a tie)' if len(best['names']) > 1 else ''} is "
        f"{names}{each} on {best['count']} of {best['of']} problems."
    )


def _figure(names, ns, bon_gain, accuracy, variance, pg_gain, spearman, path: Path):
    """Best-of-N gains against N, and policy-gradient gains against variance; the titles carry
    the measured rank correlations, not a conclusion."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, name in enumerate(names):
        left.semilogx(
            ns,
            bon_gain[:, :, i].mean(1),
            "-" if accuracy[:, i].mean() == 1 else "--",
            label=f"{name} (acc {accuracy[:, i].mean():.2f})",
        )
    left.set(
        xlabel="N",
        ylabel="Best-of-N gain in r_G (mean over problems)",
        title=f"Best-of-N: Spearman of the gain with accuracy {spearman['accuracy_vs_bon']:+.2f}",
    )
    left.legend(fontsize=7)
    for i, name in enumerate(names):
        right.scatter(variance[:, i].mean(), pg_gain[:, i].mean(), s=40)
        right.annotate(
            name, (variance[:, i].mean(), pg_gain[:, i].mean()), fontsize=7, xytext=(4, 2), textcoords="offset points"
        )
    right.set(
        xlabel="within-prompt reward variance under the initial policy (normalized rewards)",
        ylabel="policy-gradient gain in r_G at the fixed time",
        title=f"policy gradient: Spearman with variance {spearman['variance_vs_pg']:+.2f}, "
        f"with accuracy {spearman['accuracy_vs_pg']:+.2f}",
    )
    save_figure(fig, path)


def _low_variance_text(summary: dict, n: int) -> str:
    """How each low-variance perfect model compares with the perfect one, from the table."""
    perfect = summary["models"]["perfect"]
    texts = []
    for mean in summary["config"]["low_variance_means"]:
        low = summary["models"][low_variance_name(mean)]
        ties = math.isclose(perfect[f"bon{n}_gain"], low[f"bon{n}_gain"], rel_tol=1e-9, abs_tol=1e-12)
        lower = low["variance"] < 0.9 * perfect["variance"]
        texts.append(
            f"Built from a raw reward of mean {mean:g}, the low-variance perfect model "
            f"{'ties' if ties else 'does not tie'} the perfect one at Best-of-{n} (gain {fmt(low[f'bon{n}_gain'])} "
            f"against {fmt(perfect[f'bon{n}_gain'])}) and gains {fmt(low['pg_gain'])} against "
            f"{fmt(perfect['pg_gain'])} under policy gradient; its normalized variance is {fmt(low['variance'])} "
            f"against {fmt(perfect['variance'])} ({fmt(low['variance_scaled_half'])} on the scaled half, "
            f"{fmt(low['variance_other_half'])} on the other), "
            + (
                "really lower."
                if lower
                else "not lower by 10%: the global normalization moved the variance between the halves, so "
                "this pair does not isolate the variance."
            )
        )
    return " ".join(texts)


def _with_interval(summary: dict, name: str) -> str:
    """A Spearman correlation of the summary with its 95% bootstrap interval."""
    low, high = summary["spearman_interval"][name]
    return f"{summary['spearman'][name]:+.3f} [{low:+.3f}, {high:+.3f}]"


def _markdown(summary: dict, config: BestOfNConfig) -> str:
    n = config.ranking_n
    rows = "\n".join(
        f"| {name} | {m['accuracy']:.3f} | {m['on_policy_accuracy']:.3f} | {fmt(m['variance'])} | {fmt(m[f'bon{n}_gain'])} | {fmt(m['pg_gain'])} |"
        for name, m in summary["models"].items()
    )
    return f"""## Proposition 1: Best-of-N and policy gradient, against accuracy and variance

**Verdict:** {summary["instances"]} (problem, reward model) pairs, N = 1..{config.max_n}: the perfectly accurate model was beaten on {summary["violations"]["perfect_not_optimal"]} of {summary["prompt_checks"]} (N, problem, prompt) checks, each prompt on its own (Proposition 1 expects 0).

| reward model | accuracy | on-policy accuracy | variance (normalized) | Best-of-{n} gain | policy-gradient gain at t = {config.pg_time:g} |
|---|---|---|---|---|---|
{rows}

Spearman correlation across reward models (per problem, averaged; 95% bootstrap interval over the
{config.problems} problems): accuracy with Best-of-{n} gain {_with_interval(summary, "accuracy_vs_bon")}, variance
with Best-of-{n} gain {_with_interval(summary, "variance_vs_bon")}; accuracy with policy-gradient gain
{_with_interval(summary, "accuracy_vs_pg")}, variance with policy-gradient gain {_with_interval(summary, "variance_vs_pg")}. {_low_variance_text(summary, n)}
{_most_common_text(summary["pg_best_model"])}

![Best-of-N and policy gradient](figures/{NAME}.png)
"""
