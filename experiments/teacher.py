"""The reward-model teacher study of Razin et al. (2025, §4) in miniature, on transformer policies.

    python -m experiments.teacher [--preset cpu|ci|paper] [--out DIR] [--set KEY=VALUE ...]

The setup and the paper's tables: docs/theory.md#experiments-of-razin-et-al.

Stages (each saved in the run directory and skipped when a restarted run finds it done):

1. SFT: a small Pythia-shaped policy imitates the noisy demonstrator of
   :class:`experiments.tasks.TopicTask`; the other students (§4.2) imitate sharper or flatter
   demonstrators of the same task.
2. Reward models: Bradley-Terry (centering 0.01, one epoch) from the SFT model on pairs where
   100/75/50/25/0 % of the prompts carry on-policy pairs (two SFT samples) and the rest
   off-policy pairs, all labelled by the ground truth.
3. Teachers: those five, the perfectly accurate low-variance model (ground truth x 0.001 on half
   of the prompts) and the ground truth itself; each normalised by a mean/std measured once on
   the initial policy. Table 1: reward variance, on-policy and off-policy accuracy.
4. RLOO (k = 2, KL 0.05 in the reward, sequence-level clip) for every teacher and seed in one
   vmapped program through :func:`jaxrm.train.driver.run_rlhf`, checkpointed every chunk; proxy
   and ground-truth gains; Table 2 correlations beside the paper's. Then the same teachers for
   the other students (§4.2).

Writes ``config.json``, ``summary.json``, ``report.md``, ``figures/teacher.png``,
``checkpoints/`` (SFT and reward models) and one ``run_rlhf`` directory per student,
``runs/student_N/`` (its ``metrics.jsonl`` holds every RLOO iteration of every teacher and seed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.tasks import TopicTask
from jaxrm import metrics
from jaxrm.models import CausalLM, RewardModel, load_hf, load_model, preset, sample, save_model
from jaxrm.studies import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Progress,
    check_fields,
    checked,
    correlations,
    each,
    fmt,
    fmt_interval,
    int_at_least,
    parse_study,
    prepare_run_directory,
    pyplot,
    save_figure,
    sign_verdict,
    study_parser,
    write_json,
    write_text,
)
from jaxrm.train import PreferencePairs, RewardTrainConfig, train_reward_model
from jaxrm.train.driver import run_rlhf
from jaxrm.train.rlhf import RLHFConfig
from jaxrm.train.sft import SFTConfig, train_sft

# Preference pairs per reward-model optimizer step (the paper's batch size).
RM_BATCH = 32
ON_POLICY_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)
TEACHERS = ("RM 100%", "RM 75%", "RM 50%", "RM 25%", "RM 0%", "perfect, low variance", "ground truth")
LEARNED = len(ON_POLICY_FRACTIONS)  # the first teachers are the learned reward models
# Razin et al. Table 1 (Pythia-2.8B) and Table 2, for the report.
PAPER_TABLE1 = {
    "reward variance": (0.630, 0.616, 0.555, 0.438, 0.314, 0.111, 0.256),
    "on-policy accuracy": (0.660, 0.656, 0.640, 0.616, 0.587, 1.0, 1.0),
    "off-policy accuracy": (0.630, 0.732, 0.758, 0.754, 0.762, 1.0, 1.0),
}
PAPER_TABLE2 = {
    ("reward variance", "proxy"): (0.982, 1.000),
    ("reward variance", "ground truth"): (0.834, 0.714),
    ("on-policy accuracy", "proxy"): (-0.762, 0.143),
    ("on-policy accuracy", "ground truth"): (-0.283, 0.200),
    ("off-policy accuracy", "proxy"): (-0.933, -0.943),
    ("off-policy accuracy", "ground truth"): (-0.507, -0.543),
}


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Sizes and hyperparameters of the study; :meth:`preset` gives the named ones.

    Attributes:
      policy_checkpoint: a local Hugging Face GPT-NeoX directory (a Pythia model) to start from
        instead of a freshly initialised model; its vocabulary must hold the task's token ids.
      hidden_size: width of the fresh policy (and of the reward models built from it).
      num_layers: its number of transformer layers.
      num_heads: its attention heads.
      sft_examples: demonstrations each student imitates.
      sft_epochs: passes over them.
      sft_learning_rate: Adam learning rate of SFT.
      student_sharpness: demonstrator sharpness of each student's SFT data: the main student
        first, then the §4.2 ones (docs/theory.md#experiments-of-razin-et-al).
      rm_prompts: prompts of the preference data of each reward model (pairs whose two responses
        tie in ground truth are dropped).
      rm_learning_rate: Adam learning rate of reward-model training (one epoch, batch 32,
        centering 0.01).
      eval_prompts: prompts on which the teachers are measured (Table 1) and normalised.
      eval_samples: responses per evaluation prompt.
      pg_prompts: the prompts RLOO cycles through.
      prompts_per_iteration: prompts per RLOO iteration (``k = 2`` responses each).
      iterations: RLOO iterations per (student, teacher, seed).
      chunk: iterations per compiled chunk; a checkpoint is written after each.
      seeds: policy-gradient seeds per teacher.
      learning_rate: Adam learning rate of RLOO.
      kl_coef: KL coefficient of RLOO, folded into the reward.
      rloo: ``plain`` (:class:`~jaxrm.train.rlhf.RLHFConfig` defaults) or ``official``
        (:meth:`~jaxrm.train.rlhf.RLHFConfig.official_rloo`: two minibatches, no gradient
        clipping, ``rsqrt_var`` normalisation); the fields above replace its sizes and rates.
      seed: seed of the task, the data and the models.
    """

    policy_checkpoint: str = ""
    hidden_size: int = checked(64, POSITIVE_INT)
    num_layers: int = checked(2, POSITIVE_INT)
    num_heads: int = checked(4, POSITIVE_INT)
    sft_examples: int = checked(8192, int_at_least(64))
    sft_epochs: int = checked(2, POSITIVE_INT)
    sft_learning_rate: float = checked(3e-3, POSITIVE)
    student_sharpness: tuple[float, ...] = checked((1.5, 0.5, 3.0), each(POSITIVE))
    rm_prompts: int = checked(8192, int_at_least(RM_BATCH))
    rm_learning_rate: float = checked(2e-3, POSITIVE)
    eval_prompts: int = checked(256, int_at_least(2))
    eval_samples: int = checked(10, int_at_least(2))
    pg_prompts: int = checked(1024, POSITIVE_INT)
    prompts_per_iteration: int = checked(64, POSITIVE_INT)
    iterations: int = checked(200, POSITIVE_INT)
    chunk: int = checked(25, POSITIVE_INT)
    seeds: int = checked(3, POSITIVE_INT)
    learning_rate: float = checked(3e-4, POSITIVE)
    kl_coef: float = checked(0.05, NON_NEGATIVE)
    rloo: str = checked("plain", (lambda v: v in ("plain", "official"), "one of 'plain', 'official'"))
    seed: int = checked(0, NON_NEGATIVE)

    @classmethod
    def preset(cls, name: str) -> TeacherConfig:
        presets = {
            "cpu": cls(),
            "ci": cls(
                sft_examples=512,
                sft_epochs=1,
                student_sharpness=(1.5, 3.0),
                rm_prompts=128,
                eval_prompts=32,
                eval_samples=4,
                pg_prompts=32,
                prompts_per_iteration=8,
                iterations=4,
                chunk=2,
                seeds=2,
            ),
        }
        # The paper's hyperparameters (docs/theory.md#experiments-of-razin-et-al) and the official
        # RLOO for a GPU/TPU: pass the checkpoint with --set policy_checkpoint=/path/to/pythia-2.8b.
        # Sizes of the task stay miniature.
        presets["paper"] = cls(
            sft_learning_rate=1e-5,
            sft_epochs=1,
            rm_learning_rate=5e-7,
            eval_prompts=500,
            eval_samples=10,
            pg_prompts=8192,
            prompts_per_iteration=32,
            iterations=512,
            chunk=32,
            learning_rate=1e-7,
            rloo="official",
        )
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(presets)}.")
        return presets[name]

    def __post_init__(self):
        check_fields(self)
        name = type(self).__name__
        if self.policy_checkpoint and not Path(self.policy_checkpoint, "config.json").is_file():
            raise ValueError(
                f"{name}.policy_checkpoint={self.policy_checkpoint!r} is not a Hugging Face model directory "
                "(no config.json there)."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{name}.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}.")
        if self.chunk > self.iterations:
            raise ValueError(f"{name}.chunk={self.chunk} must be <= iterations={self.iterations}.")
        if self.prompts_per_iteration > self.pg_prompts:
            raise ValueError(
                f"{name}.prompts_per_iteration={self.prompts_per_iteration} must be <= pg_prompts={self.pg_prompts}."
            )
        self.rl_config(TopicTask(seed=self.seed))  # RLHFConfig checks its own relations now, not after SFT

    def rl_config(self, task: TopicTask) -> RLHFConfig:
        """The RLOO configuration of the study: k = 2, ``kl_coef`` folded into the reward, the
        study's batch size and learning rate, on top of the plain or the official settings."""
        sizes = dict(
            samples_per_prompt=2,
            prompts_per_iteration=self.prompts_per_iteration,
            max_new_tokens=task.response_len,
            learning_rate=self.learning_rate,
            kl_coef=self.kl_coef,
        )
        return RLHFConfig.official_rloo(**sizes) if self.rloo == "official" else RLHFConfig(**sizes)


def _model_config(config: TeacherConfig, task: TopicTask):
    return preset(
        "tiny",
        vocab_size=task.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
    )


def _stage(path: Path, build, log):
    """Load the model saved at ``path``, or build it and save it there."""
    if path.exists():
        log(f"reusing {path.name}")
        return load_model(path)
    model = build()
    save_model(model, path)
    return model


def train_students(config, task, out_dir, log):
    """The SFT policies, one per ``student_sharpness`` (reused from ``out_dir`` when saved there)."""
    students = []
    for index, sharpness in enumerate(config.student_sharpness):

        def build(sharpness=sharpness):
            if config.policy_checkpoint:
                model = load_hf(config.policy_checkpoint)
                if model.config.vocab_size < task.vocab_size:
                    raise ValueError(
                        f"{config.policy_checkpoint} has a vocabulary smaller than the task's {task.vocab_size}."
                    )
            else:
                model = CausalLM(_model_config(config, task), rngs=nnx.Rngs(config.seed))
            demonstrator = dataclasses.replace(task, demo_sharpness=sharpness)  # same ground truth
            data = demonstrator.sft_data(config.sft_examples, np.random.default_rng(config.seed + 1))
            sft = SFTConfig(learning_rate=config.sft_learning_rate, batch_size=64, epochs=config.sft_epochs)
            train_sft(model, *data, sft, log=log)
            return model

        students.append(_stage(out_dir / "checkpoints" / f"sft_{index}_sharpness{sharpness}", build, log))
    return students


def label_pairs(task, prompts, first, second):
    """Chosen/rejected by the ground truth; rows with equal ground truth are dropped."""
    ones = jnp.ones(first.shape, bool)
    a = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(first), ones))
    b = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(second), ones))
    keep = a != b
    chosen = np.where((a > b)[:, None], first, second)[keep]
    rejected = np.where((a > b)[:, None], second, first)[keep]
    return prompts[keep], chosen, rejected, keep


def _pairs(prompts, chosen, rejected):
    mask = np.ones(chosen.shape, bool)
    return PreferencePairs(prompts, np.ones(prompts.shape, bool), chosen, mask, rejected, mask)


def preference_sources(num_prompts, task, sft, seed):
    """On-policy pairs (two samples of ``sft``) and off-policy pairs for ``num_prompts`` prompts, labelled.

    Each is ``(prompts, chosen, rejected, kept)``, ``kept`` marking the prompts whose two
    responses differ in ground truth (the others have no preference and are dropped).
    """
    rng = np.random.default_rng(seed)
    prompts = task.prompts(num_prompts, rng)
    both = np.repeat(prompts, 2, axis=0)
    drawn = sample(sft, both, np.ones(both.shape, bool), jax.random.key(seed), max_new_tokens=task.response_len)
    drawn = np.asarray(drawn.tokens).reshape(len(prompts), 2, -1)
    off = np.stack([task.off_policy_responses(prompts, rng) for _ in range(2)], axis=1)
    return label_pairs(task, prompts, drawn[:, 0], drawn[:, 1]), label_pairs(task, prompts, off[:, 0], off[:, 1])


def mixed_pairs(on_pairs, off_pairs, fraction) -> PreferencePairs:
    """On-policy pairs for the first ``fraction`` of the prompts, off-policy pairs for the rest."""
    cut = int(round(fraction * len(on_pairs[3])))
    on_rows, off_rows = np.cumsum(on_pairs[3]) - 1, np.cumsum(off_pairs[3]) - 1
    parts = [
        tuple(a[on_rows[:cut][on_pairs[3][:cut]]] for a in on_pairs[:3]),
        tuple(a[off_rows[cut:][off_pairs[3][cut:]]] for a in off_pairs[:3]),
    ]
    return _pairs(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def reward_model_from(sft: CausalLM) -> RewardModel:
    """A reward model with the SFT trunk and a zero head (as the paper initialises them)."""
    model = RewardModel(sft.config, rngs=nnx.Rngs(0))
    nnx.update(model.trunk, nnx.state(sft.trunk))
    return model


def _reward_models(config, task, sft, out_dir, log):
    on_pairs, off_pairs = preference_sources(config.rm_prompts, task, sft, config.seed + 2)
    rm_config = RewardTrainConfig(
        learning_rate=config.rm_learning_rate, batch_size=RM_BATCH, centering=0.01, seed=config.seed
    )
    models = []
    for fraction in ON_POLICY_FRACTIONS:

        def build(fraction=fraction):
            data = mixed_pairs(on_pairs, off_pairs, fraction)
            model = reward_model_from(sft)
            train_reward_model(model, data, rm_config, log=None)
            log(f"reward model {fraction:.0%} on-policy trained on {len(data)} pairs")
            return model

        models.append(_stage(out_dir / "checkpoints" / f"rm_{int(fraction * 100):03d}", build, log))
    return models


def make_teacher(task: TopicTask, reward_graphdef):
    """One teacher function for all seven teachers, so that they run in one vmapped program.

    ``params = (rm_params, w_rm, w_gt, low_variance)``: ``w_rm RM(x, y) + w_gt r_G(x, y) s(x)``
    with ``s(x) = 0.001`` on the even topics when ``low_variance``, else 1.
    """

    def teacher(params, prompt, prompt_mask, response, response_mask):
        rm_params, w_rm, w_gt, low_variance = params
        tokens = jnp.concatenate([prompt, response], axis=1)
        rm = nnx.merge(reward_graphdef, rm_params)(tokens, jnp.concatenate([prompt_mask, response_mask], axis=1))
        truth = task.ground_truth(None, prompt, prompt_mask, response, response_mask)
        scale = jnp.where(low_variance & (task.topics(prompt) % 2 == 0), 1e-3, 1.0)
        return w_rm * rm + w_gt * truth * scale

    return teacher


def _teacher_params(reward_models):
    states = [nnx.state(m) for m in reward_models]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *(states + states[:2]))
    count = len(states)
    w_rm = jnp.array([1.0] * count + [0.0, 0.0])
    w_gt = jnp.array([0.0] * count + [1.0, 1.0])
    low = jnp.array([False] * count + [True, False])
    return stacked, w_rm, w_gt, low


def _measure_on(task, policy, teacher, params, prompts, samples, key, off_pairs, *, ddof):
    """Per teacher: normalisation mean/std (std with ``ddof``), reward variance, on- and
    off-policy accuracy (Table 1)."""
    repeated = np.repeat(prompts, samples, axis=0)
    mask = np.ones(repeated.shape, bool)
    drawn = sample(policy, repeated, mask, key, max_new_tokens=task.response_len)
    score = jax.jit(jax.vmap(teacher, in_axes=(0, None, None, None, None)))
    rewards = score(params, jnp.asarray(repeated), jnp.asarray(mask), drawn.tokens, drawn.mask)
    rewards = np.asarray(rewards).reshape(-1, len(prompts), samples)
    truth = np.asarray(task.ground_truth(None, jnp.asarray(repeated), None, drawn.tokens, drawn.mask))
    truth = truth.reshape(len(prompts), samples)
    mean, std = rewards.mean(axis=(1, 2)), rewards.std(axis=(1, 2), ddof=ddof)
    std = np.where(std > 0, std, 1.0)  # a constant teacher (a zero head) stays constant, not NaN
    normalized = (rewards - mean[:, None, None]) / std[:, None, None]
    off_prompts, chosen, rejected = off_pairs
    ones = jnp.ones(chosen.shape, bool)
    off_chosen = score(params, jnp.asarray(off_prompts), jnp.ones(off_prompts.shape, bool), jnp.asarray(chosen), ones)
    off_rejected = score(
        params, jnp.asarray(off_prompts), jnp.ones(off_prompts.shape, bool), jnp.asarray(rejected), ones
    )
    return {
        "mean": mean,
        "std": std,
        "reward variance": np.asarray(metrics.sample_reward_variance(normalized)).mean(axis=-1),
        "on-policy accuracy": np.asarray(metrics.accuracy(rewards, np.broadcast_to(truth, rewards.shape))).mean(-1),
        "off-policy accuracy": np.asarray(jnp.mean(off_chosen > off_rejected, axis=-1)),
        "initial ground truth": float(truth.mean()),
    }


def run_students(config, task, students, teacher, params, stats, out_dir, log, *, teacher_names=TEACHERS):
    """RLOO for every (student, teacher, seed) through :func:`jaxrm.train.driver.run_rlhf`.

    One run directory per student, ``out_dir/runs/student_N`` (``config.json``,
    ``metrics.jsonl``, ``summary.json``, ``checkpoints/``): its teachers and seeds run in one
    vmapped program. ``params`` stacks the teachers (see :func:`make_teacher`); returns per
    student a dict of metrics shaped ``[teachers, seeds, iterations]``.
    """
    rl = config.rl_config(task)
    prompts = task.prompts(config.pg_prompts, np.random.default_rng(config.seed + 3))
    results = []
    for index, student in enumerate(students):
        log(f"student {index}: RLOO for {len(teacher_names)} teachers x {config.seeds} seeds")
        _, history = run_rlhf(
            student,
            teacher,
            params,
            prompts,
            np.ones(prompts.shape, bool),
            rl,
            num_iterations=config.iterations,
            out_dir=out_dir / "runs" / f"student_{index}",
            reward_stats=(stats[index]["mean"], stats[index]["std"]),
            ground_truth_fn=task.ground_truth,
            seeds=[config.seed * 1000 + s for s in range(config.seeds)],
            teachers=list(teacher_names),
            checkpoint_every=config.chunk,
            keep_checkpoints=2,
            log_every=config.chunk,
            log=log,
        )
        results.append(history)
    return results


def measure_teachers(config, task, students, teacher, params):
    """Table 1 for every student: per teacher, the normalisation mean/std (std with the ddof of the
    study's reward normalisation), reward variance, on- and off-policy accuracy, measured on
    ``eval_prompts`` x ``eval_samples`` responses and off-policy pairs of the same prompts."""
    rng = np.random.default_rng(config.seed + 4)
    eval_prompts = task.prompts(config.eval_prompts, rng)
    off = np.stack([task.off_policy_responses(eval_prompts, rng) for _ in range(2)], axis=1)
    off_pairs = label_pairs(task, eval_prompts, off[:, 0], off[:, 1])[:3]
    key, ddof = jax.random.key(config.seed + 5), config.rl_config(task).reward_ddof
    return [
        _measure_on(task, s, teacher, params, eval_prompts, config.eval_samples, key, off_pairs, ddof=ddof)
        for s in students
    ]


def _gains(curves, window):
    """Mean of the last ``window`` iterations minus the first iteration: ``[..., iterations] -> [...]``."""
    return curves[..., -window:].mean(-1) - curves[..., :1].mean(-1)


def summarize(config, stats, results):
    window = max(1, config.iterations // 10)
    main, main_stats = results[0], stats[0]
    proxy = (main["proxy_reward"] - main_stats["mean"][:, None, None]) / main_stats["std"][:, None, None]
    proxy_gain, truth_gain = _gains(proxy, window), _gains(main["ground_truth_reward"], window)
    table1 = {name: [float(v) for v in main_stats[name]] for name in PAPER_TABLE1}
    models = slice(0, len(TEACHERS) - 1)  # the paper correlates over reward models, not the ground truth
    table2 = {}
    for prop in PAPER_TABLE1:
        for target, gains in (("proxy", proxy_gain), ("ground truth", truth_gain)):
            table2[f"{prop} / {target}"] = correlations(
                np.asarray(main_stats[prop])[models], np.asarray(gains)[models], seed=config.seed
            )
    # Each row of Table 2 against the paper's, from the Spearman interval (ranks: robust to a
    # single outlying reward model).
    verdicts = {
        f"{prop} / {target}": sign_verdict(table2[f"{prop} / {target}"]["spearman"], paper)
        for (prop, target), paper in PAPER_TABLE2.items()
    }
    students = []
    per_seed = [_gains(result["ground_truth_reward"], window) for result in results]  # [teachers, seeds] each
    best = best_under_seed_resampling([g[:LEARNED] for g in per_seed], np.random.default_rng(config.seed + 6))
    for index, gains in enumerate(per_seed):
        share = np.bincount(best[:, index], minlength=LEARNED) / len(best)
        students.append(
            {
                "demonstrator_sharpness": config.student_sharpness[index],
                "ground_truth_gain": gains.mean(-1).tolist(),
                "best_reward_model": TEACHERS[int(np.argmax(gains[:LEARNED].mean(-1)))],
                "best_share": share.tolist(),  # how often each learned model is best over seed resamples
                "variance": [float(v) for v in stats[index]["reward variance"]],
            }
        )
    same = float(np.mean(np.all(best == best[:, :1], axis=1)))
    return {
        "teachers": list(TEACHERS),
        "table1": table1,
        "proxy_gain": proxy_gain.mean(-1).tolist(),
        "proxy_gain_spread": proxy_gain.std(-1).tolist(),
        "ground_truth_gain": truth_gain.mean(-1).tolist(),
        "ground_truth_gain_spread": truth_gain.std(-1).tolist(),
        "table2": table2,
        "table2_verdicts": verdicts,
        "students": students,
        # §4.2: P(every student has the same best learned reward model), over seed resamples
        "same_best_probability": same,
        "best_depends_on_student": _depends_verdict(same, len(results)),
        "initial_ground_truth": [s["initial ground truth"] for s in stats],
    }


def best_under_seed_resampling(gains, rng, num_resamples: int = 2000) -> np.ndarray:
    """``[num_resamples, students]``: the index of the best teacher (highest mean gain) of each
    student when each teacher's seeds are resampled with replacement, independently per student
    and teacher. ``gains`` holds one ``[teachers, seeds]`` array per student."""
    best = []
    for student in gains:
        teachers, seeds = student.shape
        picks = rng.integers(0, seeds, (num_resamples, teachers, seeds))
        means = np.take_along_axis(np.broadcast_to(student, (num_resamples, teachers, seeds)), picks, -1).mean(-1)
        best.append(means.argmax(-1))
    return np.stack(best, axis=1)


def _depends_verdict(same: float, students: int) -> str:
    """Razin et al. §4.2 (the best reward model depends on the student), from the probability
    that all students share one best model under seed resampling."""
    if students < 2:
        return "not measured (one student)"
    if same < 0.05:
        return "holds"
    return "does not hold" if same > 0.95 else "inconclusive"


def plot(config, stats, results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    main, main_stats = results[0], stats[0]
    steps = np.arange(main["kl"].shape[-1])
    width = min(5, len(steps))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(TEACHERS)))
    proxy = (main["proxy_reward"] - main_stats["mean"][:, None, None]) / main_stats["std"][:, None, None]
    for panel, (curves, title) in enumerate(
        (
            (proxy, "proxy reward (normalized)"),
            (main["ground_truth_reward"], "ground-truth reward"),
            (main["kl"], "KL to the initial policy"),
        )
    ):
        ax = axes[panel]
        for t, name in enumerate(TEACHERS):
            smooth = np.apply_along_axis(lambda c: np.convolve(c, np.ones(width) / width, "valid"), -1, curves[t])
            ax.plot(steps[width - 1 :], smooth.mean(0), color=colors[t], label=name)
            ax.fill_between(steps[width - 1 :], smooth.min(0), smooth.max(0), color=colors[t], alpha=0.15)
        ax.set(title=title, xlabel="RLOO iteration")
    axes[0].legend(fontsize=7)
    ax = axes[3]
    width = 0.8 / len(results)  # bar width
    for index, result in enumerate(results):
        gains = _gains(result["ground_truth_reward"], max(1, config.iterations // 10))
        ax.bar(
            np.arange(len(TEACHERS)) + index * width,
            gains.mean(-1),
            width,
            yerr=gains.std(-1),
            label=f"student: demonstrator sharpness {config.student_sharpness[index]}",
        )
    ax.set_xticks(np.arange(len(TEACHERS)) + 0.4 - width / 2, [t.replace(", ", "\n") for t in TEACHERS], fontsize=7)
    ax.set(title="ground-truth gain by teacher and student")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def report(config, summary) -> str:
    lines = ["# The reward-model teacher study in miniature (Razin et al. §4)", ""]
    lines += [
        "## Table 1: teachers measured on the initial policy (paper's Pythia-2.8B values in brackets)",
        "",
        "| teacher | reward variance | on-policy accuracy | off-policy accuracy | proxy gain | ground-truth gain |",
        "|---|---|---|---|---|---|",
    ]
    for t, name in enumerate(TEACHERS):
        cells = [f"{fmt(summary['table1'][p][t])} [{PAPER_TABLE1[p][t]}]" for p in PAPER_TABLE1]
        cells += [
            f"{fmt(summary['proxy_gain'][t])} ± {fmt(summary['proxy_gain_spread'][t], 2)}",
            f"{fmt(summary['ground_truth_gain'][t])} ± {fmt(summary['ground_truth_gain_spread'][t], 2)}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Gains: mean of the last {max(1, config.iterations // 10)} of {config.iterations} iterations minus "
        f"the first, mean ± std over {config.seeds} seeds; proxy in normalized units.",
        "",
        "## Table 2: correlation with the reward increase over the reward models",
        "",
        f"Over the {len(TEACHERS) - 1} reward models (all teachers but the ground truth), with 95% bootstrap "
        f"intervals that resample the reward models and, within each, its {config.seeds} seeds.",
        "",
        "The verdict compares the Spearman interval with the paper: a relation the paper found (both its values "
        "of one sign and at least 0.5) holds when the interval lies on that side of 0, does not hold when it lies "
        "on the other, and is inconclusive when it holds 0; where the paper found no clear relation, an interval "
        "holding 0 is consistent with it.",
        "",
        "| property | target | Pearson here [95%] | Spearman here [95%] | paper (Pearson / Spearman) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for (prop, target), paper in PAPER_TABLE2.items():
        here = summary["table2"][f"{prop} / {target}"]
        lines.append(
            f"| {prop} | {target} | {fmt_interval(here['pearson'])} | {fmt_interval(here['spearman'])} | "
            f"{paper[0]} / {paper[1]} | {summary['table2_verdicts'][f'{prop} / {target}']} |"
        )
    lines += [
        "",
        "## Does the best teacher depend on the student? (§4.2)",
        "",
        f"Verdict: **{summary['best_depends_on_student']}**. Resampling each run's {config.seeds} seeds, every "
        f"student has the same best learned reward model in {100 * summary['same_best_probability']:.0f}% of "
        "resamples (holds below 5%, does not hold above 95%).",
        "",
        "| student | initial ground truth | best reward model (share of seed resamples) | ground-truth gain per teacher |",
        "|---|---|---|---|",
    ]
    for index, student in enumerate(summary["students"]):
        gains = ", ".join(f"{fmt(g)}" for g in student["ground_truth_gain"])
        share = student["best_share"][TEACHERS.index(student["best_reward_model"])]
        lines.append(
            f"| SFT on demonstrator sharpness {student['demonstrator_sharpness']} | "
            f"{fmt(summary['initial_ground_truth'][index])} | "
            f"{student['best_reward_model']} ({100 * share:.0f}%) | {gains} |"
        )
    lines += ["", "![teacher study](figures/teacher.png)", ""]
    return "\n".join(lines)


def run(out_dir: Path, config: TeacherConfig, log=None) -> dict:
    log = log or Progress("teacher")
    out_dir = prepare_run_directory(out_dir, config)
    task = TopicTask(seed=config.seed)
    students = train_students(config, task, out_dir, log)
    reward_models = _reward_models(config, task, students[0], out_dir, log)
    teacher = make_teacher(task, nnx.graphdef(reward_models[0]))
    params = _teacher_params(reward_models)
    stats = measure_teachers(config, task, students, teacher, params)
    log("Table 1 (main student): variance " + " ".join(fmt(v) for v in stats[0]["reward variance"]))
    results = run_students(config, task, students, teacher, params, stats, out_dir, log)
    summary = summarize(config, stats, results)
    write_json(out_dir / "summary.json", summary)
    plot(config, stats, results, out_dir / "figures" / "teacher.png")
    write_text(out_dir / "report.md", report(config, summary))
    log(f"wrote {out_dir / 'report.md'}")
    return summary


def main(argv=None):
    parser = study_parser(
        TeacherConfig,
        prog="python -m experiments.teacher",
        description=__doc__.split("\n\n")[0],
        default_out="results/teacher",
        presets={
            "cpu": "the default, about 7 min on 2 CPU cores",
            "ci": "a smoke run for the tests",
            "paper": "the paper's rates and the official RLOO, from --set policy_checkpoint=DIR (GPU/TPU)",
        },
    )
    run(*parse_study(parser, TeacherConfig, argv))


if __name__ == "__main__":
    main()
