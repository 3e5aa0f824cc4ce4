"""The accuracy paradox of Chen et al. (2024) in miniature: do the most accurate reward models teach best?

    python -m experiments.paradox [--preset cpu|ci|paper] [--out DIR] [--set KEY=VALUE ...]

The finding it tests: docs/theory.md#the-accuracy-paradox-of-chen-et-al.

Several Bradley-Terry runs (``on_policy_fraction`` of the prompts with on-policy pairs of the
teacher study's task; one run per reward-model seed and label-noise level, side by side in one
vmapped program) are each saved at ``checkpoints`` steps, so the saves span a wide range of
held-out accuracy. Every save then teaches the SFT policy by RLOO (every save and seed in one
vmapped program). A run is stopped when its KL to the initial policy, averaged over 5
iterations, first reaches ``kl_budget`` (read off the recorded curves: the vmapped runs go on,
the stopping point is where each would have stopped); its ground-truth reward there, averaged
over the same 5 iterations, is the outcome. Reported against each
save's accuracy, training step, and the mean and variance of its rewards under the initial
policy, with a verdict per training run and overall.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import teacher as study
from experiments.tasks import TopicTask
from jaxrm import metrics, studies
from jaxrm.models import load_model

# Iterations over which a run's KL and ground truth are averaged where it is read off: one RLOO
# iteration's KL estimate is noisy, and a run would otherwise stop on a spike.
SMOOTHING = 5


@dataclasses.dataclass(frozen=True)
class ParadoxConfig(study.TeacherConfig):
    """The teacher study's fields (:class:`experiments.teacher.TeacherConfig`) plus those of the paradox.

    Here ``rm_seeds`` x ``label_noise`` are the reward-model training runs, each trained for
    ``rm_epochs[-1]`` epochs.

    Attributes:
      student_sharpness: one student here (the demonstrator sharpness of its SFT data).
      on_policy_fraction: share of the prompts of every run with on-policy pairs, in [0, 1].
      checkpoints: saves per run that teach (spread geometrically over its steps; at least 3,
        for the correlations over saves).
      kl_budget: a run is read off where its KL to the initial policy, a moving average over 5
        iterations (as its ground truth there), first reaches this.
    """

    student_sharpness: tuple[float, ...] = studies.checked(
        (1.5,), (lambda v: len(v) == 1 and v[0] > 0, "one sharpness > 0")
    )
    on_policy_fraction: float = studies.checked(0.5, studies.FRACTION)
    checkpoints: int = studies.checked(10, studies.int_at_least(3))
    kl_budget: float = studies.checked(1.0, studies.POSITIVE)

    RUN_OUTPUTS: ClassVar[tuple[str, ...]] = (
        "summary.json",
        "report.md",
        "figures/paradox.png",
        "checkpoints/",
        "runs/",
    )

    def __post_init__(self):
        super().__post_init__()
        most = self.rm_epochs[-1] * (self.rm_prompts // study.RM_BATCH)
        if self.checkpoints > most:
            raise ValueError(
                f"ParadoxConfig.checkpoints={self.checkpoints}: a reward-model run has at most {most} steps "
                f"(rm_epochs[-1] x rm_prompts // {study.RM_BATCH}), so at most that many distinct checkpoints."
            )

    @classmethod
    def preset(cls, name: str) -> ParadoxConfig:
        """The teacher study's preset of that name, with one student and the paradox's runs."""
        own = {
            "ci": dict(checkpoints=3, kl_budget=0.01),
            "cpu": dict(label_noise=(0.0, 0.1)),
            "paper": {},
        }
        if name not in own:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(own)}.")
        base = dataclasses.asdict(study.TeacherConfig.preset(name))
        return cls(**{**base, "student_sharpness": (1.5,), **own[name]})

    RUNS: ClassVar[str] = "label_noise x rm_seeds"

    def training_runs(self) -> list[tuple[float, float, int]]:
        """``(on_policy_fraction, label_noise, seed_index)`` of every reward-model run."""
        return [(self.on_policy_fraction, noise, r) for noise in self.label_noise for r in range(self.rm_seeds)]


def checkpoint_steps(total: int, count: int) -> list[int]:
    """Up to ``count`` distinct steps from 1 to ``total``, denser early (accuracy changes fastest there).

    Step 0 is left out: its zero head scores every response alike and teaches nothing.
    """
    return sorted({*np.round(np.geomspace(1, total, count)).astype(int).tolist(), total})


def run_name(run) -> str:
    _, noise, seed_index = run
    return f"noise {noise:g} s{seed_index}"


def _train_checkpoints(config, task, sft, out_dir, log):
    """The saves of every run: ``(run index, step)`` per save, and the models."""
    runs = config.training_runs()
    directory = out_dir / "checkpoints" / "reward_runs"

    def save_steps(per_epoch):
        return checkpoint_steps(config.rm_epochs[-1] * per_epoch, config.checkpoints)

    steps = study.reward_model_runs(config, task, sft, runs, directory, save_steps, log)
    saves, models = [], []
    for index, run in enumerate(runs):
        for step in steps:
            saves.append((index, step))
            models.append(load_model(directory / study.run_directory_name(run) / f"step_{step:06d}"))
    return saves, models


def held_out_correct(config, task, sft, teacher, params) -> np.ndarray:
    """``[saves, pairs]``: whether each save ranks each held-out pair as the ground truth does.

    The pairs: ``eval_prompts x eval_samples`` prompts with the runs' on-policy mix, labelled by
    the ground truth without noise, so that the accuracy of a save is known to about +-0.01.
    """
    sources = study.preference_sources(
        config.eval_prompts * config.eval_samples, task, sft, config.stream("held-out pairs")
    )
    pairs = study.mixed_pairs(task, sources, config.on_policy_fraction)
    score = study.teacher_scorer(teacher)
    chosen = score(
        params, *(jnp.asarray(a) for a in (pairs.prompt, pairs.prompt_mask, pairs.chosen, pairs.chosen_mask))
    )
    rejected = score(
        params, *(jnp.asarray(a) for a in (pairs.prompt, pairs.prompt_mask, pairs.rejected, pairs.rejected_mask))
    )
    return np.asarray(chosen > rejected)


def _stop_at_budget(kl, truth, budget, window):
    """Ground truth (smoothed over ``window`` iterations) where smoothed KL first reaches ``budget``."""
    kernel = np.ones(window) / window

    def smooth(curve):
        return np.convolve(curve, kernel, "valid")

    smoothed_kl = np.apply_along_axis(smooth, -1, kl)
    smoothed_truth = np.apply_along_axis(smooth, -1, truth)
    reached = smoothed_kl >= budget
    stop = np.where(reached.any(-1), reached.argmax(-1), smoothed_kl.shape[-1] - 1)
    return np.take_along_axis(smoothed_truth, stop[..., None], -1)[..., 0], stop + window - 1, reached.any(-1)


def run_verdicts(saves, correct, outcome, runs: int) -> list[dict]:
    """Per training run: does a save that is less accurate than the run's most accurate one teach
    better (Chen et al.)? "Less accurate" needs the paired accuracy difference over the held-out
    pairs (``correct [saves, pairs]``) to exclude 0, Bonferroni-corrected over every pair of saves
    (the most accurate one is picked on the same pairs), and "teaches better" a Welch interval of
    the outcome difference over seeds above 0, corrected over the saves; both also over the runs."""
    from scipy import stats

    accuracy = correct.mean(-1)
    verdicts = []
    for index in range(runs):
        members = [i for i, (r, _) in enumerate(saves) if r == index]
        top = max(members, key=lambda i: accuracy[i])
        others = [i for i in members if i != top]
        level = 1 - 0.05 / runs
        test = studies.compare_to_reference(outcome[top], outcome[others], level=level)
        gaps = correct[top].astype(float) - correct[others].astype(float)  # [others, pairs], paired
        # The most accurate save is picked on the same pairs, so correct over every pair of saves.
        z = stats.norm.ppf(1 - (1 - level) / (len(members) * len(others) / 2) / 2)
        below = gaps.mean(-1) - z * gaps.std(-1, ddof=1) / np.sqrt(gaps.shape[-1]) > 0
        best = max(members, key=lambda i: outcome[i].mean())
        verdicts.append(
            {
                "run": index,
                "most_accurate_step": saves[top][1],
                "most_accurate_accuracy": float(accuracy[top]),
                "best_step": saves[best][1],
                "best_accuracy": float(accuracy[best]),
                # rank of the best teacher's accuracy within its run (1 = the most accurate)
                "best_accuracy_rank": 1 + int(sum(accuracy[i] > accuracy[best] for i in members)),
                "less_accurate_steps": [saves[others[i]][1] for i in np.flatnonzero(below)],
                "better_steps": [saves[others[i]][1] for i in test["better"]],
                "beaten_by_steps": [saves[others[i]][1] for i in test["better"] if below[i]],
                "beats_all": len(test["worse"]) == len(others),
            }
        )
    return verdicts


def overall_verdict(verdicts) -> str:
    """Chen et al.'s finding (a less accurate reward model teaches better than the most accurate):
    holds when some run's most accurate save is beaten, does not hold when every run's beats all
    its other saves, inconclusive otherwise."""
    if any(v["beaten_by_steps"] for v in verdicts):
        return "holds"
    return "does not hold" if all(v["beats_all"] for v in verdicts) else "inconclusive"


def run(out_dir: Path, config: ParadoxConfig, log=None) -> dict:
    log = log or studies.Progress("paradox")
    out_dir = studies.prepare_run_directory(out_dir, config)
    task = TopicTask(seed=config.task_seed)
    (sft,) = study.train_students(config, task, out_dir, log)
    saves, models = _train_checkpoints(config, task, sft, out_dir, log)
    runs = config.training_runs()
    count = len(models)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[nnx.state(m) for m in models])
    params = (stacked, jnp.ones(count), jnp.zeros(count), jnp.zeros(count, bool))
    teacher = study.Teacher(task, nnx.graphdef(models[0]))
    (stats,) = study.measure_teachers(config, task, [sft], teacher, params)
    correct = held_out_correct(config, task, sft, teacher, params)
    accuracy = correct.mean(-1).tolist()
    names = [f"{run_name(runs[r])} step {step}" for r, step in saves]
    (result,) = study.run_students(config, task, [sft], teacher, params, [stats], out_dir, log, teacher_names=names)
    window = min(SMOOTHING, config.iterations)
    outcome, stop, reached = _stop_at_budget(result["kl"], result["ground_truth_reward"], config.kl_budget, window)
    verdicts = run_verdicts(saves, correct, outcome, len(runs))
    all_reached = reached.all(-1)
    difference = metrics.bootstrap_correlation_difference(
        np.asarray(stats["reward variance"]),
        np.asarray(accuracy),
        outcome,
        jax.random.key(config.stream("paradox intervals")),
    )
    summary = {
        "runs": [run_name(r) for r in runs],
        "run": [r for r, _ in saves],
        "steps": [step for _, step in saves],
        "accuracy": accuracy,
        "held_out_pairs": int(correct.shape[-1]),
        "reward_mean": stats["mean"].tolist(),
        "reward_std": stats["std"].tolist(),
        "reward_variance": stats["reward variance"].tolist(),
        "on_policy_accuracy": stats["on-policy accuracy"].tolist(),
        "ground_truth_at_stop": outcome.mean(-1).tolist(),
        "ground_truth_at_stop_spread": outcome.std(-1, ddof=1).tolist(),
        "stop_iteration": stop.mean(-1).tolist(),
        "budget_unreached": int((~reached).sum()),  # (save, seed) runs read off at the last iteration
        "budget_unreached_per_save": (~reached).sum(-1).tolist(),
        "initial_ground_truth": stats["initial ground truth"],
        "run_verdicts": verdicts,
        "verdict": overall_verdict(verdicts),
        "correlations": {
            name: studies.correlations(x, outcome, seed=config.stream("paradox intervals"))
            for name, x in (
                ("accuracy", accuracy),
                ("reward variance", stats["reward variance"]),
                ("reward std", stats["std"]),
            )
        },
        "variance_minus_accuracy": [float(difference.estimate), float(difference.low), float(difference.high)],
        # The same correlations over the saves whose every seed reached the budget (None below 3 saves).
        "correlations_budget_reached": {
            name: studies.correlations(
                np.asarray(x)[all_reached], outcome[all_reached], seed=config.stream("paradox intervals")
            )
            for name, x in (("accuracy", accuracy), ("reward variance", stats["reward variance"]))
        }
        if all_reached.sum() >= 3
        else None,
        "saves_budget_reached": int(all_reached.sum()),
    }
    studies.write_json(out_dir / "summary.json", summary)
    plot(summary, out_dir / "figures" / "paradox.png")
    studies.write_text(out_dir / "report.md", report(config, summary))
    log(f"wrote {out_dir / 'report.md'}")
    return summary


def plot(summary, path):
    plt = studies.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    truth, spread = np.asarray(summary["ground_truth_at_stop"]), np.asarray(summary["ground_truth_at_stop_spread"])
    runs = np.asarray(summary["run"])
    for ax, key, label in (
        (axes[0], "accuracy", "held-out accuracy"),
        (axes[1], "steps", "reward-model training step"),
        (axes[2], "reward_variance", "reward variance under the initial policy"),
    ):
        x = np.asarray(summary[key], float)
        for index, name in enumerate(summary["runs"]):
            member = runs == index
            order = np.argsort(x[member])
            ax.errorbar(x[member][order], truth[member][order], yerr=spread[member][order], fmt="o-", ms=4, label=name)
        ax.set(xlabel=label, ylabel="ground truth at the KL stop")
    axes[0].legend(fontsize=7, title="reward-model run", title_fontsize=7)
    axes[1].set_xscale("symlog")
    studies.save_figure(fig, path)


def _difference_text(summary) -> str:
    """The paired difference with its interval, or why it tells nothing (a zero-width interval)."""
    estimate, low, high = summary["variance_minus_accuracy"]
    if low == high:
        return f"{studies.fmt(estimate)}, not resolved (every resample gave the same value)"
    return studies.fmt_interval(summary["variance_minus_accuracy"])


def _reached_text(summary) -> str:
    """The correlations again without the saves that some seed read off short of the KL budget."""
    saves = len(summary["steps"])
    if summary["budget_unreached"] == 0:
        return "Every run reached the KL budget."
    restricted = summary["correlations_budget_reached"]
    if restricted is None:
        return (
            f"Only {summary['saves_budget_reached']} of {saves} saves reached the budget in every seed, too few to "
            "correlate without the others."
        )
    return (
        f"Over the {summary['saves_budget_reached']} of {saves} saves that reached the budget in every seed "
        "(Pearson / Spearman): "
        + "; ".join(
            f"{k} {studies.fmt_interval(v['pearson'])} / {studies.fmt_interval(v['spearman'])}"
            for k, v in restricted.items()
        )
        + "."
    )


def report(config, summary) -> str:
    fmt = studies.fmt
    lines = [
        "# The accuracy paradox in miniature (Chen et al. 2024)",
        "",
        f"Verdict on Chen et al.'s finding (a less accurate reward model teaches better than the most accurate): "
        f"**{summary['verdict']}**.",
        "",
        f"{len(summary['runs'])} reward-model runs x {len(summary['steps']) // len(summary['runs'])} saves; each save "
        f"teaches the SFT policy by RLOO until its KL, averaged over {min(SMOOTHING, config.iterations)} iterations as "
        f"its ground truth is, reaches {config.kl_budget} (or {config.iterations} "
        f"iterations: {summary['budget_unreached']} of {len(summary['steps']) * config.seeds} runs did not reach "
        f"it and are read off at the end); mean ± std (ddof 1) over {config.seeds} seeds. Initial ground truth "
        f"{fmt(summary['initial_ground_truth'])}.",
        "",
        "| run | most accurate save (accuracy) | best teacher by mean (accuracy, its accuracy rank in the run) | "
        "saves that teach better, beyond seed noise | of those, less accurate beyond held-out noise |",
        "|---|---|---|---|---|",
    ]
    for v in summary["run_verdicts"]:
        better = ", ".join(f"step {s}" for s in v["better_steps"]) or (
            "none; it beats every other save" if v["beats_all"] else "none resolved"
        )
        beaten = ", ".join(f"step {s}" for s in v["beaten_by_steps"]) or "none"
        lines.append(
            f"| {summary['runs'][v['run']]} | step {v['most_accurate_step']} ({fmt(v['most_accurate_accuracy'])}) | "
            f"step {v['best_step']} ({fmt(v['best_accuracy'])}, rank {v['best_accuracy_rank']}) | {better} | "
            f"{beaten} |"
        )
    lines += [
        "",
        f"Teaching: Welch intervals over seeds; accuracy: paired intervals over the {summary['held_out_pairs']} "
        "held-out pairs; both Bonferroni-corrected over the saves of a run and over the runs. The finding holds "
        "only where a save is both less accurate and a better teacher beyond noise.",
        "",
        "| run | step | held-out accuracy | reward mean | reward std | variance (normalized) | on-policy accuracy | "
        f"ground truth at stop | stop iteration | seeds short of the budget (of {config.seeds}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, step in enumerate(summary["steps"]):
        lines.append(
            f"| {summary['runs'][summary['run'][i]]} | {step} | {fmt(summary['accuracy'][i])} | "
            f"{fmt(summary['reward_mean'][i])} | {fmt(summary['reward_std'][i])} | "
            f"{fmt(summary['reward_variance'][i])} | {fmt(summary['on_policy_accuracy'][i])} | "
            f"{fmt(summary['ground_truth_at_stop'][i])} ± {fmt(summary['ground_truth_at_stop_spread'][i], 2)} | "
            f"{fmt(summary['stop_iteration'][i])} | {summary['budget_unreached_per_save'][i]} |"
        )
    lines += [
        "",
        "Correlation over all saves with the ground truth at the stop, Pearson / Spearman with 95% bootstrap "
        "intervals (saves and seeds resampled; saves of one run are not independent, the interval treats them "
        "as such): "
        + "; ".join(
            f"{k} {studies.fmt_interval(v['pearson'])} / {studies.fmt_interval(v['spearman'])}"
            for k, v in summary["correlations"].items()
        )
        + f". Spearman of variance minus Spearman of accuracy (paired bootstrap): {_difference_text(summary)}. "
        + _reached_text(summary),
        "",
        "![accuracy paradox](figures/paradox.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = studies.study_parser(
        ParadoxConfig,
        prog="python -m experiments.paradox",
        description=__doc__.split("\n\n")[0],
        default_out="results/paradox",
        presets={
            "cpu": "the default, about 8 min on 2 CPU cores",
            "ci": "a smoke run for the tests",
            "paper": "the paper's rates for a pretrained model; needs --set policy_checkpoint=DIR (GPU/TPU)",
        },
    )
    try:
        run(*studies.parse_study(parser, ParadoxConfig, argv))
    except study.DivergedRuns as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
