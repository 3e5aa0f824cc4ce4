"""The reward-model teacher study of Razin et al. (2025, §4) in miniature, on transformer policies.

    python -m experiments.teacher [--preset cpu|ci|paper] [--out DIR] [--set KEY=VALUE ...]

The setup and the paper's tables: docs/theory.md#experiments-of-razin-et-al.

Stages (each saved in the run directory and skipped when a restarted run finds it done):

1. SFT: a small Pythia-shaped policy imitates the noisy demonstrator of
   :class:`experiments.tasks.TopicTask`; the other students (§4.2) imitate sharper or flatter
   demonstrators of the same task.
2. Reward models: Bradley-Terry (centering 0.01, batch 32) from the SFT model, one run per
   on-policy share (100/75/50/25/0 % of the prompts carry on-policy pairs, two SFT samples; the
   rest off-policy pairs), label-noise level and reward-model seed, all side by side in one
   vmapped program (:func:`jaxrm.train.train_reward_models`); each run is saved after each of
   ``rm_epochs`` epochs, and every save is a teacher.
3. Teachers: those, the perfectly accurate low-variance model (ground truth x 0.001 on half of
   the prompts, the even topics) and the ground truth itself; each normalised by a mean/std
   measured once on the initial policy. Table 1: reward variance, on-policy and off-policy
   accuracy.
4. RLOO (the semantics of ``RLHFConfig.official_rloo()`` at the miniature's sizes by default)
   for every teacher and seed in one vmapped program through
   :func:`jaxrm.train.driver.run_rlhf`, checkpointed every chunk; proxy and ground-truth gains;
   Table 2 correlations with bootstrap intervals; the same for the other students (§4.2); a map
   of both correlations over students and reward-model groups; a verdict per finding.

Writes ``config.json``, ``summary.json``, ``report.md``, ``figures/teacher.png``,
``checkpoints/`` (SFT and reward models) and one ``run_rlhf`` directory per student,
``runs/student_N/`` (its ``metrics.jsonl`` holds every RLOO iteration of every teacher and seed).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import shutil
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.tasks import TopicTask
from jaxrm import metrics
from jaxrm.models import CausalLM, RewardModel, load_hf, load_model, preset, read_hf_config, sample, save_model
from jaxrm.studies import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Progress,
    check_fields,
    checked,
    compare_to_reference,
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
from jaxrm.train import PreferencePairs, RewardTrainConfig, train_reward_models
from jaxrm.train.driver import run_rlhf
from jaxrm.train.rlhf import RLHFConfig
from jaxrm.train.sft import SFTConfig, train_sft

# Preference pairs per reward-model optimizer step (the paper's batch size).
RM_BATCH = 32
ON_POLICY_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)
PERFECT, TRUTH = "perfect, low variance", "ground truth"
PROPERTIES = ("reward variance", "on-policy accuracy", "off-policy accuracy")
# The RLHF metrics the summaries read: a run with a non-finite value in one of them diverged.
OUTCOMES = ("proxy_reward", "ground_truth_reward", "kl")


class DivergedRuns(RuntimeError):
    """Some RLHF runs of a study ended with non-finite metrics. No statistic over teachers is
    computed then: leaving those teachers out would select them by how they train, which is
    what the study measures. ``report.md`` and ``summary.json`` list the runs."""


# Razin et al. Table 1 (Pythia-2.8B; the five reward models by on-policy share, then the perfect
# low-variance model and the ground truth) and Table 2 (Pearson, Spearman), for the report.
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
# Random streams of a run (see TeacherConfig.seed): stream ``name`` number ``i`` uses
# seed * STREAMS + STREAM[name] + i. The indexed blocks are bounded by checks in TeacherConfig, so
# no two streams of a run coincide.
STREAMS = 1000
STREAM = {
    "sft init": 0,
    "sft data": 1,
    "pg prompts": 3,
    "eval prompts": 4,
    "eval samples": 5,
    "held-out pairs": 6,
    "rm data": 10,  # + reward-model seed, < 10 of them
    "rm labels": 20,  # + reward-model seed
    "rm cut": 30,
    "rm order": 40,  # + reward-model run, < 60 of them
    "policy": 100,  # + policy-gradient seed, < 800 of them
    "initial rewards": 900,
    "trend intervals": 901,
    "table 2 intervals": 902,
    "best resampling": 903,
    "map intervals": 904,
    "paradox intervals": 905,
}


@dataclasses.dataclass(frozen=True)
class RewardModelSpec:
    """One learned teacher: a Bradley-Terry run (on-policy share, label noise, seed) saved after
    ``epochs`` epochs."""

    fraction: float
    noise: float
    seed_index: int
    epochs: int

    @property
    def name(self) -> str:
        noise = f" noise {self.noise:g}" if self.noise else ""
        return f"RM {self.fraction:.0%}{noise} s{self.seed_index} e{self.epochs}"

    @property
    def run(self) -> tuple[float, float, int]:
        """The training run this model is a save of."""
        return self.fraction, self.noise, self.seed_index


def _increasing(values) -> bool:
    return len(values) > 0 and values[0] >= 1 and all(b > a for a, b in zip(values, values[1:]))


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Sizes and hyperparameters of the study; :meth:`preset` gives the named ones.

    Attributes:
      policy_checkpoint: a local Hugging Face GPT-NeoX directory (a Pythia model) to start from
        instead of a freshly initialised model; its vocabulary must hold the task's token ids.
      hidden_size: width of the fresh policy (and of the reward models built from it); with
        ``policy_checkpoint`` the checkpoint's shape is used, and this and the next two fields must
        keep their defaults.
      num_layers: its number of transformer layers.
      num_heads: its attention heads (``hidden_size / num_heads`` must leave an even rotary dimension).
      sft_examples: demonstrations each student imitates.
      sft_epochs: passes over them.
      sft_learning_rate: Adam learning rate of SFT.
      student_sharpness: demonstrator sharpness of each student's SFT data: the main student
        first, then the §4.2 ones (docs/theory.md#experiments-of-razin-et-al).
      rm_prompts: prompts of the preference data of each reward-model run (pairs whose two
        responses tie in ground truth are dropped, then every run is cut to the smallest count,
        so that all runs share one compiled program).
      rm_learning_rate: AdamW learning rate of reward-model training (batch 32, centering 0.01).
      rm_seeds: reward-model runs per on-policy share and label-noise level, each with its own
        preference data (prompts and samples) and order.
      rm_epochs: increasing training lengths, in epochs: each run is saved after each, and every
        save is a teacher (the paradox study trains each run for the last and saves
        ``checkpoints`` steps spread over it).
      label_noise: label-noise levels ``tau >= 0``: a pair's first response is preferred with
        probability ``sigmoid((r_G(first) - r_G(second)) / tau)`` (Bradley-Terry labels); 0 labels
        by the larger ground truth. Each level trains its own runs on the same responses.
      eval_prompts: prompts on which the teachers are measured (Table 1) and normalised.
      eval_samples: responses per evaluation prompt.
      pg_prompts: the prompts RLOO cycles through.
      prompts_per_iteration: prompts per RLOO iteration (``k = 2`` responses each).
      iterations: RLOO iterations per (student, teacher, seed).
      chunk: iterations per compiled chunk; a checkpoint is written after each.
      seeds: policy-gradient seeds per teacher.
      learning_rate: Adam learning rate of RLOO.
      kl_coef: KL coefficient of RLOO, folded into the reward.
      rloo: ``official`` (:meth:`~jaxrm.train.rlhf.RLHFConfig.official_rloo`: two minibatches,
        no gradient clipping, ``rsqrt_var`` normalisation) or ``plain``
        (:class:`~jaxrm.train.rlhf.RLHFConfig` defaults); the fields above replace its sizes and
        rates.
      task_seed: seed of the task's tables (its ground truth, demonstrator and off-policy source).
      seed: base of every other random stream (SFT data and initialisation, preference data,
        reward-model orders, prompts, evaluation samples, policy-gradient seeds, bootstrap
        resamples): each named stream uses ``seed * 1000`` plus its own offset (:data:`STREAM`),
        so two different seeds share no stream.
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
    rm_learning_rate: float = checked(1e-3, POSITIVE)
    rm_seeds: int = checked(2, POSITIVE_INT)
    rm_epochs: tuple[int, ...] = checked((1, 4), (_increasing, "increasing epoch counts >= 1"))
    label_noise: tuple[float, ...] = checked((0.0,), each(NON_NEGATIVE))
    eval_prompts: int = checked(256, int_at_least(2))
    eval_samples: int = checked(10, int_at_least(2))
    pg_prompts: int = checked(1024, POSITIVE_INT)
    prompts_per_iteration: int = checked(32, POSITIVE_INT)
    iterations: int = checked(100, POSITIVE_INT)
    chunk: int = checked(25, POSITIVE_INT)
    seeds: int = checked(5, int_at_least(2))
    learning_rate: float = checked(3e-4, POSITIVE)
    kl_coef: float = checked(0.05, NON_NEGATIVE)
    rloo: str = checked("official", (lambda v: v in ("plain", "official"), "one of 'plain', 'official'"))
    task_seed: int = checked(0, NON_NEGATIVE)
    seed: int = checked(
        0,
        (
            # jax.random.key keeps a seed's low 32 bits: every stream must fit in them.
            lambda v: 0 <= v < 2**32 // STREAMS - 1,
            f"in [0, {2**32 // STREAMS - 1}) (its streams, seed * {STREAMS} + offset, are 32-bit keys)",
        ),
    )

    def check_preset(self, name: str) -> None:
        """Refuse a config that its preset cannot run with (called on the command line's config)."""
        if name == "paper" and not self.policy_checkpoint:
            raise ValueError(
                "--preset paper needs --set policy_checkpoint=DIR (a local Pythia checkpoint): its learning "
                "rates are the paper's, for a pretrained model, not for a fresh miniature one."
            )

    @classmethod
    def preset(cls, name: str) -> TeacherConfig:
        presets = {
            "cpu": cls(),
            "ci": cls(
                sft_examples=512,
                sft_epochs=1,
                student_sharpness=(1.5, 3.0),
                rm_prompts=128,
                rm_seeds=1,
                rm_epochs=(1, 2),
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
            rm_epochs=(1,),
            eval_prompts=500,
            eval_samples=10,
            pg_prompts=8192,
            prompts_per_iteration=32,
            iterations=512,
            chunk=32,
            learning_rate=1e-7,
        )
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(presets)}.")
        return presets[name]

    def __post_init__(self):
        check_fields(self)
        name = type(self).__name__
        if self.policy_checkpoint:
            try:
                vocab_size = read_hf_config(self.policy_checkpoint).vocab_size
            except (OSError, ValueError) as error:
                raise ValueError(f"{name}.policy_checkpoint={self.policy_checkpoint!r}: {error}") from None
            needed = TopicTask(seed=self.task_seed).vocab_size
            if vocab_size < needed:
                raise ValueError(
                    f"{name}.policy_checkpoint={self.policy_checkpoint!r} has a vocabulary of {vocab_size} tokens, "
                    f"smaller than the task's {needed}."
                )
        shape = ("hidden_size", "num_layers", "num_heads")
        if self.policy_checkpoint:
            defaults = {field.name: field.default for field in dataclasses.fields(self)}
            changed = [f"{field}={getattr(self, field)}" for field in shape if getattr(self, field) != defaults[field]]
            if changed:
                raise ValueError(
                    f"{name}: {', '.join(changed)} would be ignored: with policy_checkpoint the models take the "
                    "checkpoint's shape."
                )
        else:
            try:
                _model_config(self, TopicTask(seed=self.task_seed))
            except ValueError as error:
                fields = ", ".join(f"{field}={getattr(self, field)}" for field in shape)
                raise ValueError(f"{name}: {fields} make no valid model: {error}") from None
        if self.chunk > self.iterations:
            raise ValueError(f"{name}.chunk={self.chunk} must be <= iterations={self.iterations}.")
        if self.prompts_per_iteration > self.pg_prompts:
            raise ValueError(
                f"{name}.prompts_per_iteration={self.prompts_per_iteration} must be <= pg_prompts={self.pg_prompts}."
            )
        if len(set(self.label_noise)) < len(self.label_noise):
            raise ValueError(f"{name}.label_noise={self.label_noise} repeats a level.")
        for field, value, most in (("rm_seeds", self.rm_seeds, 10), ("seeds", self.seeds, 800)):
            if value > most:
                raise ValueError(f"{name}.{field}={value}: at most {most} (its block of random streams).")
        if len(self.training_runs()) > 60:
            raise ValueError(
                f"{name}: {len(self.training_runs())} reward-model training runs ({self.RUNS}); at most 60 "
                "(the block of random streams of their orders)."
            )
        if (
            self.pg_prompts % self.prompts_per_iteration
            or self.iterations < self.pg_prompts // self.prompts_per_iteration
        ):
            raise ValueError(
                f"{name}: the gains compare one full pass through the prompts, so pg_prompts={self.pg_prompts} must "
                f"be a multiple of prompts_per_iteration={self.prompts_per_iteration} and iterations="
                f"{self.iterations} at least pg_prompts / prompts_per_iteration."
            )
        if len(self.reward_models()) < 3:
            raise ValueError(
                f"{name}: {len(self.reward_models())} learned reward models (5 shares x label_noise x rm_seeds x "
                "rm_epochs); the correlations need at least 3."
            )
        self.rl_config(TopicTask(seed=self.task_seed))  # RLHFConfig checks its own relations now, not after SFT

    def stream(self, name: str, index: int = 0) -> int:
        """Seed of the random stream ``name`` (a key of :data:`STREAM`), number ``index``."""
        return self.seed * STREAMS + STREAM[name] + index

    RUNS: ClassVar[str] = "5 shares x label_noise x rm_seeds"  # what training_runs() counts, in words
    # What a run writes in its directory (checked before any work; a trailing / marks a directory).
    RUN_OUTPUTS: ClassVar[tuple[str, ...]] = (
        "summary.json",
        "report.md",
        "figures/teacher.png",
        "checkpoints/",
        "runs/",
    )

    def training_runs(self) -> list[tuple[float, float, int]]:
        """``(on_policy_fraction, label_noise, seed_index)`` of every reward-model training run."""
        return list(dict.fromkeys(spec.run for spec in self.reward_models()))

    def reward_models(self) -> list[RewardModelSpec]:
        """The learned teachers, by on-policy share, label noise, seed and training length."""
        return [
            RewardModelSpec(fraction, noise, seed_index, epochs)
            for fraction, noise, seed_index, epochs in itertools.product(
                ON_POLICY_FRACTIONS, self.label_noise, range(self.rm_seeds), self.rm_epochs
            )
        ]

    def teacher_names(self) -> list[str]:
        return [spec.name for spec in self.reward_models()] + [PERFECT, TRUTH]

    def rl_config(self, task: TopicTask) -> RLHFConfig:
        """The RLOO configuration of the study: k = 2, ``kl_coef`` folded into the reward, the
        study's batch size and learning rate, on top of the official or the plain settings."""
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
            if config.policy_checkpoint:  # its vocabulary was checked with the config
                model = load_hf(config.policy_checkpoint)
            else:
                model = CausalLM(_model_config(config, task), rngs=nnx.Rngs(config.stream("sft init")))
            demonstrator = dataclasses.replace(task, demo_sharpness=sharpness)  # same ground truth
            data = demonstrator.sft_data(config.sft_examples, np.random.default_rng(config.stream("sft data")))
            sft = SFTConfig(learning_rate=config.sft_learning_rate, batch_size=64, epochs=config.sft_epochs)
            train_sft(model, *data, sft, log=log)
            return model

        students.append(_stage(out_dir / "checkpoints" / f"sft_{index}_sharpness{sharpness}", build, log))
    return students


def label_pairs(task, prompts, first, second, *, noise: float = 0.0, rng=None):
    """``(prompts, chosen, rejected, kept)``: each pair labelled by the ground truth, exactly
    (``noise = 0``) or by a Bradley-Terry draw with temperature ``noise`` (``rng`` draws it);
    pairs whose two responses tie in ground truth are dropped (``kept`` marks the others)."""
    ones = jnp.ones(first.shape, bool)
    a = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(first), ones), np.float64)
    b = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(second), ones), np.float64)
    keep = a != b
    if noise:
        first_wins = rng.random(len(a)) < 1 / (1 + np.exp(-(a - b) / noise))
    else:
        first_wins = a > b
    chosen = np.where(first_wins[:, None], first, second)[keep]
    rejected = np.where(first_wins[:, None], second, first)[keep]
    return prompts[keep], chosen, rejected, keep


def _pairs(prompts, chosen, rejected):
    mask = np.ones(chosen.shape, bool)
    return PreferencePairs(prompts, np.ones(prompts.shape, bool), chosen, mask, rejected, mask)


def preference_sources(num_prompts, task, sft, seed):
    """``(prompts, on_policy, off_policy)`` for ``num_prompts`` prompts: two SFT samples and two
    off-policy responses per prompt, each ``[num_prompts, 2, response_len]``, unlabelled."""
    rng = np.random.default_rng(seed)
    prompts = task.prompts(num_prompts, rng)
    both = np.repeat(prompts, 2, axis=0)
    drawn = sample(sft, both, np.ones(both.shape, bool), jax.random.key(seed), max_new_tokens=task.response_len)
    on = np.asarray(drawn.tokens).reshape(len(prompts), 2, -1)
    off = np.stack([task.off_policy_responses(prompts, rng) for _ in range(2)], axis=1)
    return prompts, on, off


def mixed_pairs(task, sources, fraction, *, noise: float = 0.0, rng=None) -> PreferencePairs:
    """Labelled pairs: on-policy for the first ``fraction`` of the prompts, off-policy for the rest."""
    prompts, on, off = sources
    cut = int(round(fraction * len(prompts)))
    responses = np.concatenate([on[:cut], off[cut:]])
    return _pairs(*label_pairs(task, prompts, responses[:, 0], responses[:, 1], noise=noise, rng=rng)[:3])


def reward_model_from(sft: CausalLM) -> RewardModel:
    """A reward model with the SFT trunk and a zero head (as the paper initialises them)."""
    model = RewardModel(sft.config, rngs=nnx.Rngs(0))
    nnx.update(model.trunk, nnx.state(sft.trunk))
    return model


def run_directory_name(run) -> str:
    fraction, noise, seed_index = run
    return f"rm_{int(round(fraction * 100)):03d}_noise{noise:g}_s{seed_index}"


def reward_model_runs(config, task, sft, runs, directory, save_steps, log):
    """Train the Bradley-Terry runs ``runs`` (``(fraction, noise, seed_index)`` each) side by side
    for ``rm_epochs[-1]`` epochs and save each at ``save_steps`` (a function of the steps per
    epoch) under ``directory``; returns the steps. Reuses a complete earlier set; an incomplete one is trained again."""
    sources = [
        preference_sources(config.rm_prompts, task, sft, config.stream("rm data", r)) for r in range(config.rm_seeds)
    ]
    datasets = [
        mixed_pairs(task, sources[r], fraction, noise=noise, rng=np.random.default_rng(config.stream("rm labels", r)))
        for fraction, noise, r in runs
    ]
    # Ties are dropped, so runs hold slightly different counts: cut each (in a random order) to
    # the smallest, so that every run has the same shapes and they share one program.
    common = min(len(d) for d in datasets)
    rng = np.random.default_rng(config.stream("rm cut"))
    datasets = [jax.tree.map(lambda a, keep=rng.permutation(len(d))[:common]: a[keep], d) for d in datasets]
    steps = save_steps(common // RM_BATCH)
    dirs = [directory / run_directory_name(run) for run in runs]
    if all((d / f"step_{s:06d}").exists() for d in dirs for s in steps):
        log(f"reusing {len(runs)} reward-model runs x {len(steps)} saves")
        return steps
    if directory.exists():  # an interrupted run: its saves may be partial, train again from scratch
        shutil.rmtree(directory)
    total_epochs = config.rm_epochs[-1]
    rm_config = RewardTrainConfig(
        learning_rate=config.rm_learning_rate, batch_size=RM_BATCH, epochs=total_epochs, centering=0.01
    )
    models = f"{len(runs)} reward models side by side" if len(runs) > 1 else "1 reward model"
    log(f"training {models} on {common} pairs each, {total_epochs} epoch(s)")
    train_reward_models(
        reward_model_from(sft),
        datasets,
        rm_config,
        seeds=[config.stream("rm order", i) for i in range(len(runs))],
        checkpoint_dirs=dirs,
        checkpoint_steps=tuple(steps),
        log=log,
    )
    return steps


def _reward_models(config, task, sft, out_dir, log):
    specs = config.reward_models()
    directory = out_dir / "checkpoints" / "reward_models"
    steps = reward_model_runs(
        config,
        task,
        sft,
        config.training_runs(),
        directory,
        lambda per_epoch: [e * per_epoch for e in config.rm_epochs],
        log,
    )
    models = []
    for spec in specs:
        step = steps[config.rm_epochs.index(spec.epochs)]
        models.append(load_model(directory / run_directory_name(spec.run) / f"step_{step:06d}"))
    return models


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One teacher function for every teacher (learned, perfect, ground truth), so that they run in one vmapped program.

    ``params = (rm_params, w_rm, w_gt, low_variance)``: ``w_rm RM(x, y) + w_gt r_G(x, y) s(x)``
    with ``s(x) = 0.001`` on the even topics when ``low_variance``, else 1. A value, not a
    closure: two teachers of the same task and reward-model layout are equal, so they share the
    programs that :func:`teacher_scorer` and :func:`jaxrm.train.driver.run_rlhf` compile for
    them (keyed on the teacher).

    Attributes:
      task: the task whose ground truth ``r_G`` and topics the teacher reads.
      reward_graphdef: the reward models' ``nnx`` graph definition (their layout, without weights).
    """

    task: TopicTask
    reward_graphdef: nnx.GraphDef

    def __call__(self, params, prompt, prompt_mask, response, response_mask):
        rm_params, w_rm, w_gt, low_variance = params
        tokens = jnp.concatenate([prompt, response], axis=1)
        mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
        rm = nnx.merge(self.reward_graphdef, rm_params)(tokens, mask)
        truth = self.task.ground_truth(None, prompt, prompt_mask, response, response_mask)
        scale = jnp.where(low_variance & (self.task.topics(prompt) % 2 == 0), 1e-3, 1.0)
        return w_rm * rm + w_gt * truth * scale


def _teacher_params(reward_models):
    states = [nnx.state(m) for m in reward_models]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *(states + states[:2]))
    count = len(states)
    w_rm = jnp.array([1.0] * count + [0.0, 0.0])
    w_gt = jnp.array([0.0] * count + [1.0, 1.0])
    low = jnp.array([False] * count + [True, False])
    return stacked, w_rm, w_gt, low


@functools.lru_cache(maxsize=8)
def teacher_scorer(teacher):
    """``teacher`` compiled and vmapped over its stacked parameters: one program per teacher
    function and shapes, shared by every student and measurement."""
    return jax.jit(jax.vmap(teacher, in_axes=(0, None, None, None, None)))


def _measure_on(task, policy, teacher, params, prompts, samples, key, off_pairs, *, ddof):
    """Per teacher: normalisation mean/std (std with ``ddof``), reward variance (per prompt, and
    its mean), on- and off-policy accuracy (Table 1)."""
    repeated = np.repeat(prompts, samples, axis=0)
    mask = np.ones(repeated.shape, bool)
    drawn = sample(policy, repeated, mask, key, max_new_tokens=task.response_len)
    score = teacher_scorer(teacher)
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
    per_prompt = np.asarray(metrics.sample_reward_variance(normalized))
    return {
        "mean": mean,
        "std": std,
        "reward variance": per_prompt.mean(axis=-1),
        "reward variance per prompt": per_prompt,
        "on-policy accuracy": np.asarray(metrics.accuracy(rewards, np.broadcast_to(truth, rewards.shape))).mean(-1),
        "off-policy accuracy": np.asarray(jnp.mean(off_chosen > off_rejected, axis=-1)),
        "initial ground truth": float(truth.mean()),
    }


def run_students(config, task, students, teacher, params, stats, out_dir, log, *, teacher_names):
    """RLOO for every (student, teacher, seed) through :func:`jaxrm.train.driver.run_rlhf`.

    One run directory per student, ``out_dir/runs/student_N`` (``config.json``,
    ``metrics.jsonl``, ``summary.json``, ``checkpoints/``): its teachers and seeds run in one
    vmapped program. ``params`` stacks the teachers (see :class:`Teacher`); returns per
    student a dict of metrics shaped ``[teachers, seeds, iterations]``.
    """
    rl = config.rl_config(task)
    prompts = policy_gradient_prompts(config, task)
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
            reward_stats={
                name: (mean, std) for name, mean, std in zip(teacher_names, stats[index]["mean"], stats[index]["std"])
            },
            ground_truth_fn=task.ground_truth,
            seeds=[config.stream("policy", s) for s in range(config.seeds)],
            teachers=list(teacher_names),
            checkpoint_every=config.chunk,
            keep_checkpoints=2,
            log_every=config.chunk,
            log=log,
        )
        results.append(history)
    diverged = diverged_runs(results, teacher_names)
    if diverged:
        total = len(results) * len(teacher_names) * config.seeds
        write_json(out_dir / "summary.json", {"verdict": "not measured", "diverged_runs": diverged})
        write_text(out_dir / "report.md", _diverged_report(diverged, total))
        raise DivergedRuns(
            f"{len(diverged)} of {total} RLHF runs diverged (non-finite {', '.join(OUTCOMES)}), so no statistic over "
            f"teachers was computed; {out_dir / 'report.md'} lists them (their metrics are under {out_dir / 'runs'})."
        )
    return results


def diverged_runs(results, teacher_names) -> list[dict]:
    """The (student, teacher, seed) RLHF runs whose :data:`OUTCOMES` hold a non-finite value
    (``results``: per student, metrics ``[teachers, seeds, iterations]``), with the first such
    iteration."""
    found = []
    for student, history in enumerate(results):
        bad = np.any([~np.isfinite(history[name]) for name in OUTCOMES], axis=0)  # [teachers, seeds, iterations]
        for teacher, seed in zip(*np.nonzero(bad.any(-1))):
            first = int(history["iteration"][teacher, seed, bad[teacher, seed].argmax()])
            found.append({"student": student, "teacher": teacher_names[teacher], "seed": int(seed), "iteration": first})
    return found


def _diverged_report(diverged, total) -> str:
    rows = "\n".join(f"| {d['student']} | {d['teacher']} | {d['seed']} | {d['iteration']} |" for d in diverged)
    return f"""# Not measured: {len(diverged)} of {total} RLHF runs diverged

These runs' proxy reward, ground truth or KL became non-finite. No statistic over teachers was
computed: leaving those teachers out would select them by how they train, which is what the study
measures. A smaller learning rate (`--set learning_rate=...`) or a larger KL coefficient may keep
RLOO finite.

| student | teacher | seed (index) | first non-finite iteration |
|---|---|---|---|
{rows}
"""


def policy_gradient_prompts(config, task) -> np.ndarray:
    """The ``pg_prompts`` prompts that RLOO cycles through."""
    return task.prompts(config.pg_prompts, np.random.default_rng(config.stream("pg prompts")))


def _initial_rewards(task, policy, teacher, params, prompts, key):
    """Per teacher its mean raw reward, and the mean ground truth, of the initial policy on
    ``prompts`` (two samples each, as RLOO draws them): the baselines of the gains."""
    repeated = np.repeat(prompts, 2, axis=0)
    mask = np.ones(repeated.shape, bool)
    drawn = sample(policy, repeated, mask, key, max_new_tokens=task.response_len)
    score = teacher_scorer(teacher)
    rewards = np.asarray(score(params, jnp.asarray(repeated), jnp.asarray(mask), drawn.tokens, drawn.mask))
    truth = np.asarray(task.ground_truth(None, jnp.asarray(repeated), None, drawn.tokens, drawn.mask))
    return {"initial reward": rewards.mean(-1), "initial ground truth": float(truth.mean())}


def measure_teachers(config, task, students, teacher, params):
    """Table 1 for every student: per teacher, the normalisation mean/std (std with the ddof of the
    study's reward normalisation), reward variance, on- and off-policy accuracy, measured on
    ``eval_prompts`` x ``eval_samples`` responses and off-policy pairs of the same prompts; and
    the initial policy's mean rewards on the policy-gradient prompts (``initial reward`` per
    teacher, ``initial ground truth``)."""
    rng = np.random.default_rng(config.stream("eval prompts"))
    eval_prompts = task.prompts(config.eval_prompts, rng)
    off = np.stack([task.off_policy_responses(eval_prompts, rng) for _ in range(2)], axis=1)
    off_pairs = label_pairs(task, eval_prompts, off[:, 0], off[:, 1])[:3]
    key, ddof = jax.random.key(config.stream("eval samples")), config.rl_config(task).reward_ddof
    pg_prompts, initial_key = policy_gradient_prompts(config, task), jax.random.key(config.stream("initial rewards"))
    return [
        {
            **_measure_on(task, s, teacher, params, eval_prompts, config.eval_samples, key, off_pairs, ddof=ddof),
            **_initial_rewards(task, s, teacher, params, pg_prompts, initial_key),
        }
        for s in students
    ]


def prompt_cycle(config) -> int:
    """Iterations of one pass through the policy-gradient prompts (at most the whole run)."""
    return min(config.iterations, -(-config.pg_prompts // config.prompts_per_iteration))


def teacher_gains(config, stats, result):
    """Proxy (normalised) and ground-truth gains, each ``[teachers, seeds]``: the mean over the last
    pass through the prompts minus the initial policy's mean on the same prompts. Comparing one
    iteration's prompts with another's would add each teacher's own prompt-to-prompt spread (the
    topics differ in attainable reward) to its gain."""
    window = prompt_cycle(config)
    mean, std = stats["mean"][:, None], stats["std"][:, None]
    proxy = (result["proxy_reward"][..., -window:].mean(-1) - mean) / std
    initial_proxy = (stats["initial reward"][:, None] - mean) / std
    truth = result["ground_truth_reward"][..., -window:].mean(-1) - stats["initial ground truth"]
    return proxy - initial_proxy, truth


def _paper_trend(values) -> tuple[float, float]:
    """(Pearson, Spearman) of the paper's Table 1 column against the on-policy share."""
    shares, values = np.asarray(ON_POLICY_FRACTIONS), np.asarray(values[: len(ON_POLICY_FRACTIONS)])
    return float(metrics.pearson(shares, values)), float(metrics.spearman(shares, values))


def summarize(config, stats, results):
    specs = config.reward_models()
    learned = len(specs)
    names = config.teacher_names()
    main_stats = stats[0]
    proxy_gain, truth_gain = teacher_gains(config, main_stats, results[0])
    table1 = {name: [float(v) for v in main_stats[name]] for name in PROPERTIES}
    shares = np.array([spec.fraction for spec in specs])
    # The saves of one training run (after 1 and 4 epochs, say) are not independent: every
    # interval over models resamples whole runs, the perfect teacher being a run of its own.
    runs = [spec.run for spec in specs]
    run_of = np.array([runs.index(run) for run in runs])
    verdicts = {}

    # Table 1's trends over the on-policy share, each against the paper's five reward models.
    trends = {}
    for prop in PROPERTIES:
        trends[prop] = correlations(
            shares, np.asarray(table1[prop][:learned]), seed=config.stream("trend intervals"), clusters=run_of
        )
        verdicts[f"Table 1: {prop} against the on-policy share"] = sign_verdict(
            trends[prop]["spearman"], _paper_trend(PAPER_TABLE1[prop])
        )
    # Do variance and accuracy move together over the learned models? (They separate in the paper.)
    coupling = correlations(
        np.asarray(table1["reward variance"][:learned]),
        np.asarray(table1["on-policy accuracy"][:learned]),
        seed=config.stream("trend intervals"),
        clusters=run_of,
    )
    # The perfect low-variance teacher's variance against the ground truth's, over the prompts (Welch).
    per_prompt = main_stats["reward variance per prompt"]
    low_variance = compare_to_reference(per_prompt[-1], per_prompt[None, -2])
    verdicts["Table 1: the perfect low-variance model has lower reward variance than the ground truth"] = (
        "holds" if low_variance["worse"] else ("does not hold" if low_variance["better"] else "inconclusive")
    )

    # Table 2 over the reward models (learned and the perfect one, not the ground truth).
    models = slice(0, learned + 1)
    table2 = {}
    for prop in PROPERTIES:
        for target, gain in (("proxy", proxy_gain), ("ground truth", truth_gain)):
            table2[f"{prop} / {target}"] = correlations(
                np.asarray(main_stats[prop])[models],
                np.asarray(gain)[models],
                seed=config.stream("table 2 intervals"),
                clusters=np.append(run_of, len(runs)),
            )
    for (prop, target), paper in PAPER_TABLE2.items():
        verdicts[f"Table 2: {prop} / {target} gain"] = sign_verdict(table2[f"{prop} / {target}"]["spearman"], paper)

    # A perfectly accurate teacher can teach the ground truth slower than less accurate ones.
    perfect = compare_to_reference(truth_gain[learned], truth_gain[:learned])
    verdicts["a perfectly accurate reward model teaches the ground truth slower than a less accurate one"] = (
        "holds" if perfect["better"] else ("does not hold" if len(perfect["worse"]) == learned else "inconclusive")
    )

    per_student = [teacher_gains(config, *pair)[1] for pair in zip(stats, results)]  # [teachers, seeds] each
    students, crossings = _section_4_2(config, stats, results, per_student)
    verdicts["§4.2: which reward model teaches better depends on the student (a crossing)"] = crossings["verdict"]
    return {
        "teachers": names,
        "table1": table1,
        "table1_trends": trends,
        "variance_accuracy": coupling,
        "low_variance_against_truth": low_variance,
        "proxy_gain": proxy_gain.mean(-1).tolist(),
        "proxy_gain_spread": proxy_gain.std(-1, ddof=1).tolist(),
        "ground_truth_gain": truth_gain.mean(-1).tolist(),
        "ground_truth_gain_spread": truth_gain.std(-1, ddof=1).tolist(),
        "table2": table2,
        "perfect_against_learned": perfect,
        "students": students,
        "section_4_2": crossings,
        "map": correlation_map(config, stats, results, per_student),
        "verdicts": verdicts,
        "initial_ground_truth": [s["initial ground truth"] for s in stats],
    }


def _section_4_2(config, stats, results, per_student):
    """Per student its best learned model (and how often it is best over seed resamples), and the
    §4.2 verdict from crossings: models X and Y such that X teaches one student significantly
    better than Y and Y teaches another significantly better than X. Every (model pair, student)
    difference gets a Welch interval, Bonferroni-corrected over all of them, so no selection of
    "best" models enters the test."""
    learned = len(config.reward_models())
    names = config.teacher_names()
    best = best_under_seed_resampling(
        [g[:learned] for g in per_student], np.random.default_rng(config.stream("best resampling"))
    )
    students = []
    for index, gain in enumerate(per_student):
        share = np.bincount(best[:, index], minlength=learned) / len(best)
        students.append(
            {
                "demonstrator_sharpness": config.student_sharpness[index],
                "initial_entropy": float(np.mean(results[index]["entropy"][..., 0])),
                "ground_truth_gain": gain.mean(-1).tolist(),
                "best_reward_model": names[int(np.argmax(gain[:learned].mean(-1)))],
                "best_share": share.tolist(),  # how often each learned model is best over seed resamples
                "variance": [float(v) for v in stats[index]["reward variance"]],
            }
        )
    crossings = []
    if len(per_student) < 2:  # nothing to compare: no share of resamples either
        return students, {
            "crossings": crossings,
            "verdict": "not measured (one student)",
            "same_best_probability": None,
        }
    tests = learned * (learned - 1) // 2 * len(per_student)
    # beats[s][y]: the models that teach student s significantly better than model y.
    beats = []
    for gain in per_student:
        row = []
        for y in range(learned):
            others = [m for m in range(learned) if m != y]
            test = compare_to_reference(gain[y], gain[others], level=1 - 0.05 * len(others) / tests)
            row.append({others[i] for i in test["better"]})
        beats.append(row)
    for a, b in itertools.combinations(range(len(per_student)), 2):
        for x, y in itertools.permutations(range(learned), 2):
            if x in beats[a][y] and y in beats[b][x]:
                crossings.append({"model": names[x], "other": names[y], "better_for": a, "worse_for": b})
    tops = {int(np.argmax(g[:learned].mean(-1))) for g in per_student}
    top = min(tops)
    clear = len(tops) == 1 and all(top in row[y] for row in beats for y in range(learned) if y != top)
    verdict = "holds" if crossings else ("does not hold" if clear else "inconclusive")
    same = float(np.mean(np.all(best == best[:, :1], axis=1)))
    return students, {"crossings": crossings, "verdict": verdict, "same_best_probability": same}


def correlation_map(config, stats, results, per_student):
    """Where variance predicts teaching better than accuracy: for every student (rows, by its
    initial entropy) and group of learned models of one label noise and training length
    (columns), Spearman correlations of reward variance and of on-policy accuracy with the
    ground-truth gain, each with a 95% bootstrap interval over the group's models and seeds, and
    their difference, whose interval (and so each cell's reading) is Bonferroni-corrected over the
    cells."""
    specs = config.reward_models()
    groups = list(dict.fromkeys((spec.noise, spec.epochs) for spec in specs))
    group_members = {
        group: np.array([i for i, spec in enumerate(specs) if (spec.noise, spec.epochs) == group]) for group in groups
    }
    read = [group for group in groups if len(group_members[group]) >= 3]
    level = 1 - 0.05 / max(1, len(read) * len(per_student))
    cells = []
    for index, gain in enumerate(per_student):
        for noise, epochs in read:
            members = group_members[(noise, epochs)]
            variance = np.asarray(stats[index]["reward variance"])[members]
            accuracy = np.asarray(stats[index]["on-policy accuracy"])[members]
            key = jax.random.key(config.stream("map intervals"))
            difference = metrics.bootstrap_correlation_difference(variance, accuracy, gain[members], key, level=level)
            cells.append(
                {
                    "student": index,
                    "initial_entropy": float(np.mean(results[index]["entropy"][..., 0])),
                    "label_noise": noise,
                    "epochs": epochs,
                    "models": len(members),
                    "variance": correlations(variance, gain[members], seed=config.stream("map intervals"))["spearman"],
                    "accuracy": correlations(accuracy, gain[members], seed=config.stream("map intervals"))["spearman"],
                    "difference": [float(difference.estimate), float(difference.low), float(difference.high)],
                }
            )
    for cell in cells:
        _, low, high = cell["difference"]
        cell["verdict"] = (
            "variance predicts better" if low > 0 else "accuracy predicts better" if high < 0 else "no clear difference"
        )
    return cells


def _paper_range(prop: str) -> str:
    """The range of ``prop`` over the paper's learned reward models (the first five columns of its Table 1)."""
    values = PAPER_TABLE1[prop][:5]
    return f"{min(values):.3f}-{max(values):.3f}"


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


def plot(config, stats, results, summary, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    specs = config.reward_models()
    learned = len(specs)
    truth_gain = teacher_gains(config, stats[0], results[0])[1]
    colors = plt.cm.viridis(np.array([spec.fraction for spec in specs]) * 0.9)
    for ax, prop in zip(axes[:2], ("reward variance", "on-policy accuracy")):
        x = np.asarray(stats[0][prop])
        for m in range(learned):
            ax.errorbar(x[m], truth_gain[m].mean(), yerr=truth_gain[m].std(ddof=1), fmt="o", color=colors[m], ms=4)
        ax.errorbar(x[learned], truth_gain[learned].mean(), yerr=truth_gain[learned].std(ddof=1), fmt="s", color="red")
        ax.set(xlabel=f"{prop} (initial policy)", ylabel="ground-truth gain", title=f"{prop} vs ground-truth gain")
    axes[0].plot([], [], "o", color=colors[0], label="RM, 100% on-policy")
    axes[0].plot([], [], "o", color=colors[-1], label="RM, 0% on-policy")
    axes[0].plot([], [], "s", color="red", label="perfect, low variance")
    axes[0].legend(fontsize=7)
    ax = axes[2]
    cells = summary["map"]
    labels = [
        f"student {c['student']} (H {c['initial_entropy']:.2f})\nnoise {c['label_noise']:g}, e{c['epochs']}"
        for c in cells
    ]
    y = np.arange(len(cells))
    for offset, key, color in ((-0.15, "variance", "tab:blue"), (0.15, "accuracy", "tab:orange")):
        estimate, low, high = (np.array([c[key][i] for c in cells]) for i in range(3))
        ax.errorbar(estimate, y + offset, xerr=[estimate - low, high - estimate], fmt="o", color=color, label=key)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(y, labels, fontsize=6)
    ax.set(xlabel="Spearman with the ground-truth gain (95% interval)", title="map: which property predicts teaching")
    ax.legend(fontsize=7)
    ax = axes[3]
    # Smoothed over one pass through the prompts: topics differ in attainable reward, so the raw
    # curves saw-tooth with the prompt cycle.
    width = min(config.iterations, max(1, config.pg_prompts // config.prompts_per_iteration))

    def smooth(curve):
        return np.convolve(curve, np.ones(width) / width, "valid")

    truth = results[0]["ground_truth_reward"]
    steps = np.arange(truth.shape[-1])[width - 1 :]
    for fraction in ON_POLICY_FRACTIONS:
        members = [i for i, spec in enumerate(specs) if spec.fraction == fraction]
        curve = smooth(truth[members].mean(axis=(0, 1)))
        ax.plot(steps, curve, color=plt.cm.viridis(fraction * 0.9), label=f"RMs {fraction:.0%} on-policy")
    for t, (name, style) in enumerate(((PERFECT, "r--"), (TRUTH, "k-"))):
        ax.plot(steps, smooth(truth[learned + t].mean(0)), style, label=name)
    ax.set(
        xlabel="RLOO iteration",
        ylabel=f"ground-truth reward (mean of {width} iterations)",
        title="main student, mean over seeds",
    )
    ax.legend(fontsize=7)
    save_figure(fig, path)


def report(config, summary) -> str:
    names = summary["teachers"]
    learned = len(config.reward_models())
    lines = ["# The reward-model teacher study in miniature (Razin et al. §4)", ""]
    lines += ["## Verdicts", "", "| finding | verdict |", "|---|---|"]
    lines += [f"| {finding} | {verdict} |" for finding, verdict in summary["verdicts"].items()]
    lines += [
        "",
        "Each verdict is computed from 95% intervals (docs/theory.md#verdicts): a correlation the paper "
        "found holds when its Spearman interval lies on the paper's side of 0, does not hold on the other, "
        "and is inconclusive when it holds 0; where the paper found no clear relation, an interval holding 0 "
        "is consistent with it. Comparisons of teachers use Welch intervals of gain differences over seeds, "
        "Bonferroni-corrected over the models compared.",
        "",
        "## Table 1 by on-policy share (main student; mean and range over the share's reward models)",
        "",
        "| teachers | models | reward variance [paper] | on-policy accuracy [paper] | off-policy accuracy [paper] |",
        "|---|---|---|---|---|",
    ]
    specs = config.reward_models()
    for position, fraction in enumerate(ON_POLICY_FRACTIONS):
        members = [i for i, spec in enumerate(specs) if spec.fraction == fraction]
        cells = []
        for prop in PROPERTIES:
            values = np.asarray(summary["table1"][prop])[members]
            cells.append(
                f"{fmt(values.mean())} ({fmt(values.min())}-{fmt(values.max())}) [{PAPER_TABLE1[prop][position]}]"
            )
        lines.append(f"| RM {fraction:.0%} on-policy | {len(members)} | " + " | ".join(cells) + " |")
    for offset, name in enumerate((PERFECT, TRUTH)):
        cells = [f"{fmt(summary['table1'][p][learned + offset])} [{PAPER_TABLE1[p][5 + offset]}]" for p in PROPERTIES]
        lines.append(f"| {name} | 1 | " + " | ".join(cells) + " |")
    ranges = {p: np.asarray(summary["table1"][p][:learned]) for p in PROPERTIES}
    lines += [
        "",
        f"Ranges reached by the {learned} learned models: on-policy accuracy "
        f"{fmt(ranges['on-policy accuracy'].min())}-{fmt(ranges['on-policy accuracy'].max())} (paper "
        f"{_paper_range('on-policy accuracy')}), off-policy accuracy {fmt(ranges['off-policy accuracy'].min())}-"
        f"{fmt(ranges['off-policy accuracy'].max())} (paper {_paper_range('off-policy accuracy')}).",
        "",
        "Trends over the on-policy share (Spearman over the learned models [95%], resampling whole runs): "
        + "; ".join(f"{p} {fmt_interval(summary['table1_trends'][p]['spearman'])}" for p in PROPERTIES)
        + f". Reward variance against on-policy accuracy over the same models: Spearman "
        f"{fmt_interval(summary['variance_accuracy']['spearman'])}.",
        "",
        "## Every teacher (main student)",
        "",
        "| teacher | reward variance | on-policy accuracy | off-policy accuracy | proxy gain | ground-truth gain |",
        "|---|---|---|---|---|---|",
    ]
    for t, name in enumerate(names):
        cells = [fmt(summary["table1"][p][t]) for p in PROPERTIES]
        cells += [
            f"{fmt(summary['proxy_gain'][t])} ± {fmt(summary['proxy_gain_spread'][t], 2)}",
            f"{fmt(summary['ground_truth_gain'][t])} ± {fmt(summary['ground_truth_gain_spread'][t], 2)}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    perfect = summary["perfect_against_learned"]
    lines += [
        "",
        f"Gains: mean over the last pass through the prompts (the last {prompt_cycle(config)} of "
        f"{config.iterations} iterations) minus the initial policy's mean on the same prompts, mean ± std (ddof 1) over "
        f"{config.seeds} seeds; proxy in normalized units. "
        f"{len(perfect['better'])} of {learned} learned models teach the ground truth faster than the perfect "
        f"low-variance model and {len(perfect['worse'])} slower, beyond seed noise.",
        "",
        "## Table 2: correlation with the reward increase over the reward models",
        "",
        f"Over the {learned + 1} reward models (all teachers but the ground truth), with 95% bootstrap "
        f"intervals that resample whole reward-model runs (the saves of a run are not independent; the perfect "
        f"model counts as a run of its own) and, within each drawn model, its {config.seeds} seeds.",
        "",
        "| property | target | Pearson here [95%] | Spearman here [95%] | paper (Pearson / Spearman) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for (prop, target), paper in PAPER_TABLE2.items():
        here = summary["table2"][f"{prop} / {target}"]
        lines.append(
            f"| {prop} | {target} | {fmt_interval(here['pearson'])} | {fmt_interval(here['spearman'])} | "
            f"{paper[0]} / {paper[1]} | {summary['verdicts'][f'Table 2: {prop} / {target} gain']} |"
        )
    section = summary["section_4_2"]
    lines += [
        "",
        "## Does the ranking of teachers depend on the student? (§4.2)",
        "",
        f"Verdict: **{section['verdict']}**. The finding holds with a crossing: a model that teaches one student "
        "better than another model, which in turn teaches a second student better than the first, both beyond seed "
        "noise (Welch intervals, Bonferroni-corrected over every model pair and student). It does not hold when "
        "one model beats every other for every student. "
        + (
            "Resampling seeds, every student has the same best model "
            f"by mean in {100 * section['same_best_probability']:.0f}% of resamples (each model's {config.seeds} "
            "seeds resampled: with so few seeds these shares understate the uncertainty, and the verdict rests on "
            f"the Welch tests); {len(section['crossings'])} crossing(s) found."
            if section["same_best_probability"] is not None
            else "With one student there is nothing to compare."
        ),
        "",
        "| student | initial entropy | initial ground truth | best reward model by mean (share of seed resamples) |",
        "|---|---|---|---|",
    ]
    for index, student in enumerate(summary["students"]):
        share = student["best_share"][names.index(student["best_reward_model"])]
        lines.append(
            f"| SFT on demonstrator sharpness {student['demonstrator_sharpness']} | "
            f"{fmt(student['initial_entropy'])} | {fmt(summary['initial_ground_truth'][index])} | "
            f"{student['best_reward_model']} ({100 * share:.0f}%) |"
        )
    if section["crossings"]:
        lines += [
            "",
            "| model X | model Y | X teaches better than Y for student | Y teaches better than X for student |",
            "|---|---|---|---|",
        ]
        for c in section["crossings"]:
            lines.append(f"| {c['model']} | {c['other']} | {c['better_for']} | {c['worse_for']} |")
    lines += [
        "",
        "## Map: where does variance predict teaching better than accuracy?",
        "",
        "Per student (its initial per-token entropy) and group of learned models (label noise, training "
        "length): Spearman correlations with the ground-truth gain [95%], and variance's minus accuracy's "
        f"(paired bootstrap, at {100 * (1 - 0.05 / max(1, len(summary['map']))):.3g}%: Bonferroni over the "
        f"{len(summary['map'])} cells, which the reading uses).",
        "",
        "| student (entropy) | label noise | epochs | models | variance | on-policy accuracy | difference | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["map"]:
        lines.append(
            f"| {c['student']} ({fmt(c['initial_entropy'])}) | {c['label_noise']:g} | {c['epochs']} | {c['models']} | "
            f"{fmt_interval(c['variance'])} | {fmt_interval(c['accuracy'])} | {fmt_interval(c['difference'])} | "
            f"{c['verdict']} |"
        )
    lines += ["", "![teacher study](figures/teacher.png)", ""]
    return "\n".join(lines)


def run(out_dir: Path, config: TeacherConfig, log=None) -> dict:
    log = log or Progress("teacher")
    out_dir = prepare_run_directory(out_dir, config)
    task = TopicTask(seed=config.task_seed)
    students = train_students(config, task, out_dir, log)
    reward_models = _reward_models(config, task, students[0], out_dir, log)
    teacher = Teacher(task, nnx.graphdef(reward_models[0]))
    params = _teacher_params(reward_models)
    stats = measure_teachers(config, task, students, teacher, params)
    log("Table 1 (main student): variance " + " ".join(fmt(v) for v in stats[0]["reward variance"]))
    results = run_students(
        config, task, students, teacher, params, stats, out_dir, log, teacher_names=config.teacher_names()
    )
    summary = summarize(config, stats, results)
    write_json(out_dir / "summary.json", summary)
    plot(config, stats, results, summary, out_dir / "figures" / "teacher.png")
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
            "cpu": "the default, about 14 min on 2 CPU cores",
            "ci": "a smoke run for the tests",
            "paper": "the paper's rates for a pretrained model; needs --set policy_checkpoint=DIR (GPU/TPU)",
        },
    )
    try:
        run(*parse_study(parser, TeacherConfig, argv))
    except DivergedRuns as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
