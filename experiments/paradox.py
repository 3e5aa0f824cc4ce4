"""The accuracy paradox of Chen et al. (2024) in miniature: do the most accurate reward models teach best?

    python -m experiments.paradox [--preset cpu|ci|paper] [--out DIR] [--set KEY=VALUE ...]

The finding it tests: docs/theory.md#the-accuracy-paradox-of-chen-et-al.

One Bradley-Terry run (half on-policy, half off-policy pairs of the teacher study's task) is
checkpointed at many steps, so its checkpoints span a wide range of held-out accuracy. Each
checkpoint then teaches the SFT policy by RLOO (every checkpoint and seed in one vmapped
program). A run is stopped when its KL to the initial policy first reaches ``kl_budget`` (read
off the recorded curves: the vmapped runs go on, the stopping point is where each would have
stopped); its ground-truth reward there is the outcome. Reported against each checkpoint's
accuracy, training step, and the mean and variance of its rewards under the initial policy.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import teacher as study
from experiments.tasks import TopicTask
from jaxrm import studies
from jaxrm.models import load_model, read_metadata
from jaxrm.train import RewardTrainConfig, train_reward_model


@dataclasses.dataclass(frozen=True)
class ParadoxConfig(study.TeacherConfig):
    """The teacher study's fields (:class:`experiments.teacher.TeacherConfig`) plus those of the paradox.

    Attributes:
      student_sharpness: one student here (the demonstrator sharpness of its SFT data).
      rm_epochs: epochs of the one reward-model training run.
      rm_learning_rate: its Adam learning rate.
      on_policy_fraction: share of its prompts with on-policy pairs, in [0, 1].
      checkpoints: how many checkpoints of that run teach (spread geometrically over its steps; at
        least 3, for the correlations over checkpoints).
      kl_budget: a run is read off where its KL to the initial policy first reaches this.
    """

    student_sharpness: tuple[float, ...] = studies.checked(
        (1.5,), (lambda v: len(v) == 1 and v[0] > 0, "one sharpness > 0")
    )
    rm_epochs: int = studies.checked(2, studies.POSITIVE_INT)
    rm_learning_rate: float = studies.checked(1e-3, studies.POSITIVE)
    on_policy_fraction: float = studies.checked(0.5, studies.FRACTION)
    checkpoints: int = studies.checked(10, studies.int_at_least(3))
    kl_budget: float = studies.checked(1.0, studies.POSITIVE)

    def __post_init__(self):
        super().__post_init__()
        most = self.rm_epochs * (self.rm_prompts // study.RM_BATCH)
        if self.checkpoints > most:
            raise ValueError(
                f"ParadoxConfig.checkpoints={self.checkpoints}: the reward-model run has at most {most} steps "
                f"(rm_epochs x rm_prompts // {study.RM_BATCH}), so at most that many distinct checkpoints."
            )

    @classmethod
    def preset(cls, name: str) -> ParadoxConfig:
        """The teacher study's preset of that name, with one student and one reward-model run."""
        own = {
            "ci": dict(rm_epochs=1, checkpoints=3, kl_budget=0.01),
            "cpu": {},
            "paper": dict(rm_epochs=1),
        }
        if name not in own:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(own)}.")
        base = dataclasses.asdict(study.TeacherConfig.preset(name))
        if name == "cpu":  # the cpu preset keeps this study's own reward-model settings
            base = {}
        return cls(**{**base, "student_sharpness": (1.5,), **own[name]})


def checkpoint_steps(total: int, count: int) -> list[int]:
    """Up to ``count`` distinct steps from 1 to ``total``, denser early (accuracy changes fastest there).

    Step 0 is left out: its zero head scores every response alike and teaches nothing.
    """
    return sorted({*np.round(np.geomspace(1, total, count)).astype(int).tolist(), total})


def _train_checkpoints(config, task, sft, out_dir, log):
    directory = out_dir / "checkpoints" / "reward_run"
    on_pairs, off_pairs = study.preference_sources(config.rm_prompts, task, sft, config.seed + 2)
    data = study.mixed_pairs(on_pairs, off_pairs, config.on_policy_fraction)
    held_on, held_off = study.preference_sources(config.eval_prompts, task, sft, config.seed + 6)
    held_out = study.mixed_pairs(held_on, held_off, config.on_policy_fraction)
    total = (len(data) // study.RM_BATCH) * config.rm_epochs
    steps = checkpoint_steps(total, config.checkpoints)
    paths = [directory / f"step_{s:06d}" for s in steps]
    if not all(p.exists() for p in paths):
        if directory.exists():  # an interrupted run: its checkpoints may be partial, retrain from scratch
            shutil.rmtree(directory)
        rm_config = RewardTrainConfig(
            learning_rate=config.rm_learning_rate,
            batch_size=study.RM_BATCH,
            epochs=config.rm_epochs,
            centering=0.01,
            seed=config.seed,
        )
        train_reward_model(
            study.reward_model_from(sft),
            data,
            rm_config,
            eval_pairs=held_out,
            eval_steps=tuple(steps),
            checkpoint_dir=directory,
            checkpoint_steps=tuple(steps),
            log=log,
        )
    else:
        log(f"reusing {len(paths)} reward-model checkpoints")
    models = [load_model(p) for p in paths]
    accuracy = [read_metadata(p)["accuracy"] for p in paths]
    return steps, models, accuracy


def _stop_at_budget(kl, truth, budget, window):
    """Ground truth (smoothed over ``window`` iterations) where smoothed KL first reaches ``budget``."""
    kernel = np.ones(window) / window

    def smooth(curve):
        return np.convolve(curve, kernel, "valid")

    smoothed_kl = np.apply_along_axis(smooth, -1, kl)
    smoothed_truth = np.apply_along_axis(smooth, -1, truth)
    reached = smoothed_kl >= budget
    stop = np.where(reached.any(-1), reached.argmax(-1), smoothed_kl.shape[-1] - 1)
    return np.take_along_axis(smoothed_truth, stop[..., None], -1)[..., 0], stop + window - 1


def run(out_dir: Path, config: ParadoxConfig, log=None) -> dict:
    log = log or studies.Progress("paradox")
    out_dir = studies.prepare_run_directory(out_dir, config)
    task = TopicTask(seed=config.seed)
    (sft,) = study.train_students(config, task, out_dir, log)
    steps, models, accuracy = _train_checkpoints(config, task, sft, out_dir, log)
    count = len(models)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[nnx.state(m) for m in models])
    params = (stacked, jnp.ones(count), jnp.zeros(count), jnp.zeros(count, bool))
    teacher = study.make_teacher(task, nnx.graphdef(models[0]))
    (stats,) = study.measure_teachers(config, task, [sft], teacher, params)
    (result,) = study.run_students(
        config, task, [sft], teacher, params, [stats], out_dir, log, teacher_names=[f"step {s}" for s in steps]
    )
    window = min(5, config.iterations)
    outcome, stop = _stop_at_budget(result["kl"], result["ground_truth_reward"], config.kl_budget, window)
    final = outcome.mean(-1)
    best = int(np.argmax(final))
    summary = {
        "steps": steps,
        "accuracy": accuracy,
        "reward_mean": stats["mean"].tolist(),
        "reward_std": stats["std"].tolist(),
        "reward_variance": stats["reward variance"].tolist(),
        "on_policy_accuracy": stats["on-policy accuracy"].tolist(),
        "ground_truth_at_stop": final.tolist(),
        "ground_truth_at_stop_spread": outcome.std(-1).tolist(),
        "stop_iteration": stop.mean(-1).tolist(),
        "initial_ground_truth": stats["initial ground truth"],
        "best_checkpoint": {"step": steps[best], "accuracy": accuracy[best]},
        "most_accurate_checkpoint": {"step": steps[int(np.argmax(accuracy))], "accuracy": max(accuracy)},
        "correlations": {
            name: studies.correlations(x, outcome, seed=config.seed)
            for name, x in (
                ("accuracy", accuracy),
                ("reward variance", stats["reward variance"]),
                ("reward std", stats["std"]),
            )
        },
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
    for ax, key, label in (
        (axes[0], "accuracy", "held-out accuracy"),
        (axes[1], "steps", "reward-model training step"),
        (axes[2], "reward_variance", "reward variance under the initial policy"),
    ):
        x = np.asarray(summary[key], float)
        ax.errorbar(x, truth, yerr=spread, fmt="o")
        ax.set(xlabel=label, ylabel="ground truth at the KL stop")
    axes[1].set_xscale("symlog")
    studies.save_figure(fig, path)


def report(config, summary) -> str:
    lines = [
        "# The accuracy paradox in miniature (Chen et al. 2024)",
        "",
        f"One reward-model run, {len(summary['steps'])} checkpoints; each teaches the SFT policy by RLOO until "
        f"its KL reaches {config.kl_budget} (or {config.iterations} iterations); mean ± std over {config.seeds} "
        f"seeds. Initial ground truth {studies.fmt(summary['initial_ground_truth'])}.",
        "",
        "| step | held-out accuracy | reward mean | reward std | variance (normalized) | on-policy accuracy | "
        "ground truth at stop | stop iteration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, step in enumerate(summary["steps"]):
        lines.append(
            f"| {step} | {studies.fmt(summary['accuracy'][i])} | {studies.fmt(summary['reward_mean'][i])} | {studies.fmt(summary['reward_std'][i])} | "
            f"{studies.fmt(summary['reward_variance'][i])} | {studies.fmt(summary['on_policy_accuracy'][i])} | "
            f"{studies.fmt(summary['ground_truth_at_stop'][i])} ± {studies.fmt(summary['ground_truth_at_stop_spread'][i], 2)} | "
            f"{studies.fmt(summary['stop_iteration'][i])} |"
        )
    best, top = summary["best_checkpoint"], summary["most_accurate_checkpoint"]
    lines += [
        "",
        f"Best teacher: step {best['step']} (accuracy {studies.fmt(best['accuracy'])}); most accurate: step "
        f"{top['step']} (accuracy {studies.fmt(top['accuracy'])}).",
        "",
        "Correlation over checkpoints with the ground truth at the stop, Pearson / Spearman with 95% bootstrap "
        "intervals (checkpoints and seeds resampled; one reward-model training run, so the checkpoints are not "
        "independent): "
        + "; ".join(
            f"{k} {studies.fmt_interval(v['pearson'])} / {studies.fmt_interval(v['spearman'])}"
            for k, v in summary["correlations"].items()
        ),
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
            "cpu": "the default, about 4 min on 2 CPU cores",
            "ci": "a smoke run for the tests",
            "paper": "the paper's rates and the official RLOO, from --set policy_checkpoint=DIR (GPU/TPU)",
        },
    )
    run(*studies.parse_study(parser, ParadoxConfig, argv))


if __name__ == "__main__":
    main()
