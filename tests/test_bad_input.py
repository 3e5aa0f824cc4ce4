"""A catalogue of bad input, as a user would stumble on it: each case names the exception it must
raise and a pattern that the message must contain (the offending argument, field or file). The
command-line cases also check that the run never started and that nothing was written."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import experiments.paradox
import experiments.teacher
import theory.__main__
from jaxrm import ascent, bounds, estimators, flow, metrics, pg, studies, tabular
from jaxrm.estimators import Estimator
from jaxrm.models import (
    CausalLM,
    RewardModel,
    load_hf,
    load_model,
    preset,
    read_hf_config,
    read_metadata,
    sample,
    save_model,
)
from jaxrm.models.config import TransformerConfig
from jaxrm.models.sampling import SamplingOptions
from jaxrm.sharding import make_mesh
from jaxrm.train import RewardTrainConfig
from jaxrm.train.checkpoints import RunCheckpoints
from jaxrm.train.rlhf import RLHFConfig
from jaxrm.train.sft import SFTConfig
from theory.best_of_n import BestOfNConfig
from theory.estimators import EstimatorsConfig
from theory.paradox import ParadoxConfig
from theory.theorem1 import Theorem1Config
from theory.theorem2 import Theorem2Config
from theory.theorem3 import Theorem3Config
from theory.tightness import TightnessConfig

# ---------------------------------------------------------------------------------------------
# Study command lines: refused with a usage error (status 2) before the run starts or writes.

STUDY_CASES = [
    # (module, --set items, what the message names)
    (experiments.teacher, ["iterations=1.5"], r"iterations=1\.5: must be an int"),
    (experiments.teacher, ["iterations=-1"], r"iterations=-1: must be >= 1"),
    (experiments.teacher, ["iterations=0"], r"iterations=0"),
    (experiments.teacher, ["seeds=0"], r"seeds=0: must be >= 2"),
    (experiments.teacher, ["chunk=500"], r"chunk=500 must be <= iterations"),
    (experiments.teacher, ["learning_rate=NaN"], r"learning_rate=nan: must be finite"),
    (experiments.teacher, ["learning_rate=0"], r"learning_rate=0"),
    (experiments.teacher, ["kl_coef=-0.1"], r"kl_coef=-0\.1: must be >= 0"),
    (experiments.teacher, ['rloo="fast"'], r"rloo='fast'"),
    (experiments.teacher, ["rloo=fast"], r"rloo='fast'"),
    (experiments.teacher, ["student_sharpness=[]"], r"student_sharpness=\(\)"),
    (experiments.teacher, ["student_sharpness=[1, -2]"], r"student_sharpness"),
    (experiments.teacher, ["hidden_size=true"], r"hidden_size=True: must be an int"),
    (experiments.teacher, ["hidden_size=30"], r"hidden_size=30, num_layers=2, num_heads=4 make no valid model: .*30"),
    (experiments.teacher, ["hidden_size=24"], r"hidden_size=24, .* make no valid model: .*odd rotary dimension"),
    (experiments.teacher, ["prompts_per_iteration=4096"], r"prompts_per_iteration=4096 must be <= pg_prompts"),
    (experiments.teacher, ["eval_samples=1"], r"eval_samples=1"),
    (experiments.teacher, ["rm_prompts=8"], r"rm_prompts=8"),
    (experiments.teacher, ["sft_examples=2.5"], r"sft_examples=2\.5: must be an int"),
    (experiments.teacher, ["policy_checkpoint=/no/such/model"], r"policy_checkpoint='/no/such/model'"),
    (experiments.teacher, ["bogus=1"], r"unknown TeacherConfig key\(s\) \['bogus'\]"),
    (experiments.teacher, ["seed=4294967"], r"seed=4294967: must be in \[0, 4294966\)"),
    (experiments.teacher, ["seeds"], r"KEY=VALUE.*'seeds'"),
    (experiments.paradox, ["kl_budget=-1"], r"kl_budget=-1: must be > 0"),
    (experiments.paradox, ["on_policy_fraction=2"], r"on_policy_fraction=2: must be in \[0, 1\]"),
    (experiments.paradox, ["checkpoints=0"], r"checkpoints=0: must be >= 3"),
    (experiments.paradox, ["checkpoints=5000"], r"checkpoints=5000: a reward-model run has at most"),
    (experiments.paradox, ["rm_epochs=[3, 1]"], r"rm_epochs=\(3, 1\): must be increasing epoch counts >= 1"),
    (experiments.teacher, ["rm_epochs=[0, 1]"], r"rm_epochs=\(0, 1\): must be increasing"),
    (experiments.teacher, ["label_noise=[0.1, 0.1]"], r"label_noise=\(0\.1, 0\.1\) repeats a level"),
    (experiments.teacher, ["label_noise=[-1]"], r"label_noise=\(-1,\)"),
    (experiments.teacher, ["seeds=1"], r"seeds=1: must be >= 2"),
    (experiments.teacher, ["rm_seeds=11"], r"rm_seeds=11: at most 10"),
    (experiments.teacher, ["rm_seeds=7", "label_noise=[0, 1]"], r"70 reward-model training runs \(5 shares x"),
    # The paradox trains label_noise x rm_seeds runs, with one on-policy share.
    (
        experiments.paradox,
        ["rm_seeds=10", "label_noise=[0, 1, 2, 3, 4, 5, 6]"],
        r"70 reward-model training runs \(label",
    ),
    (
        experiments.teacher,
        ["prompts_per_iteration=12"],
        r"pg_prompts=32 must be a multiple of prompts_per_iteration=12",
    ),
    (experiments.teacher, ["iterations=3", "chunk=1"], r"iterations=3 at least pg_prompts / prompts_per_iteration"),
    (experiments.paradox, ["student_sharpness=[1, 2]"], r"student_sharpness=\(1, 2\): must be one sharpness"),
]


@pytest.fixture
def no_study_run(monkeypatch):
    """Fails the test if a study's ``run`` (SFT, reward models, RLOO) is ever entered."""

    def refuse(*args, **kwargs):
        raise AssertionError("the study started although its input was bad")

    monkeypatch.setattr(experiments.teacher, "run", refuse)
    monkeypatch.setattr(experiments.paradox, "run", refuse)


@pytest.mark.parametrize(("module", "items", "message"), STUDY_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_a_study_refuses_a_bad_setting_before_anything(module, items, message, tmp_path, capsys, no_study_run):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        module.main(["--preset", "ci", "--out", str(out), "--set", *items])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: python -m {module.__name__}" in err
    assert __import__("re").search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("module", [experiments.teacher, experiments.paradox], ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "out",
    ["", "a_file", "/proc/jaxrm_cannot_write_here", "dangling"],
    ids=["empty", "file", "unwritable", "dangling-link"],
)
def test_a_study_refuses_a_bad_out_directory(module, out, tmp_path, capsys, no_study_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--preset", "ci", "--out", out])
    assert exit_.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dangling"]


@pytest.mark.parametrize("module", [experiments.teacher, experiments.paradox], ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    ("blocker", "message"),
    [
        ("figures", "figures is a file, where"),
        ("runs", "runs is a file, where"),
        ("summary.json/", "summary.json is a directory, where a file"),
        ("config.json/", "config.json is a directory, where a file"),
    ],
)
def test_a_study_refuses_a_run_directory_whose_outputs_it_could_not_write(
    module, blocker, message, tmp_path, capsys, no_study_run
):
    out = tmp_path / "run"
    out.mkdir()
    if blocker.endswith("/"):
        (out / blocker).mkdir()
    else:
        (out / blocker).write_text("")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--preset", "ci", "--out", str(out)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [blocker.rstrip("/")]


@pytest.mark.parametrize("module", [experiments.teacher, experiments.paradox], ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    ("cache", "message"),
    [("/proc/no_cache_here", ": no file can be created in /proc,"), ("a_file", " is a file, not a directory")],
    ids=["unwritable", "file"],
)
def test_a_study_refuses_a_compilation_cache_it_cannot_use(module, cache, message, tmp_path, capsys, no_study_run):
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / cache  # an absolute `cache` stays as it is
    with pytest.raises(SystemExit) as exit_:
        module.main(["--preset", "ci", "--out", str(tmp_path / "run"), "--compilation-cache", str(cache)])
    assert exit_.value.code == 2
    assert f"--compilation-cache {cache}{message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_rerun_with_another_config_names_the_keys_that_differ(tmp_path, monkeypatch, capsys, no_study_run):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiments.teacher, "train_students", no_training)
    out = tmp_path / "run"
    out.mkdir()
    first = dataclasses.replace(experiments.teacher.TeacherConfig.preset("ci"), seeds=3, kl_coef=0.1)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(first)))
    before = (out / "config.json").read_text()
    # On the command line a usage error, before the study starts; from Python, before anything is written.
    with pytest.raises(SystemExit) as exit_:
        experiments.teacher.main(["--preset", "ci", "--out", str(out)])
    assert exit_.value.code == 2
    assert "keys that differ: ['kl_coef', 'seeds']); use a new --out" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(experiments.teacher, "train_students", no_training)
    with pytest.raises(ValueError, match=r"keys that differ: \['kl_coef', 'seeds'\]"):
        experiments.teacher.run(out, experiments.teacher.TeacherConfig.preset("ci"))
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", ""], "--out is empty"),
        (["--out", "a_file"], "--out a_file is a file"),
        (["--out", "/proc/jaxrm_cannot_write_here"], "no file can be created in /proc"),
        (["--out", "a_file/results"], "a_file is a file"),
        (["--only", "theorem9"], "invalid choice: 'theorem9'"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
    ids=["empty", "file", "unwritable", "inside-a-file", "unknown-study", "no-jobs"],
)
def test_python_m_theory_refuses_a_bad_command_line_before_computing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(theory.__main__, "run_study", lambda name, *args: pytest.fail(f"{name} was run"))
    with pytest.raises(SystemExit) as exit_:
        theory.__main__.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    ("blocker", "message"),
    [
        ("figures", "figures is a file, where"),
        ("report.md/", "report.md is a directory, where a file"),
        ("best_of_n_violations.json/", "best_of_n_violations.json is a directory, where a file"),
    ],
)
def test_python_m_theory_refuses_an_out_directory_whose_outputs_cannot_be_written(
    blocker, message, tmp_path, capsys, monkeypatch
):
    blocked = tmp_path / blocker
    blocked.mkdir() if blocker.endswith("/") else blocked.write_text("x")
    monkeypatch.setattr(theory.__main__, "run_study", lambda name, *args: pytest.fail(f"{name} was run"))
    with pytest.raises(SystemExit) as exit_:
        theory.__main__.main(["--only", "best_of_n", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [blocked.name]


def test_theory_reports_never_mix_quick_and_full_results(tmp_path):
    for name, quick in (("theorem2", False), ("theorem3", True)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"seconds": 1, "verdict": f"{name} verdict", "quick": quick}))
        (tmp_path / f"{name}.md").write_text(f"## {name}\n")
    quick = theory.__main__._report(tmp_path, list(theory.__main__.STUDIES), quick=True)
    full = theory.__main__._report(tmp_path, list(theory.__main__.STUDIES), quick=False)
    assert "**Quick run**" in quick and "theorem3 verdict" in quick and "theorem2 verdict" not in quick
    assert "Left out: theorem2 (from a full run" in quick
    assert "Quick run" not in full and "theorem2 verdict" in full and "theorem3 verdict" not in full
    assert "Left out: theorem3 (from a quick run" in full


# ---------------------------------------------------------------------------------------------
# Configs: types and ranges checked on construction.

CONFIG_CASES = [
    (lambda: RewardTrainConfig(epochs=2.5), r"RewardTrainConfig\.epochs=2\.5: must be an int"),
    (lambda: RewardTrainConfig(batch_size=True), r"RewardTrainConfig\.batch_size=True: must be an int"),
    (lambda: RewardTrainConfig(learning_rate=-1.0), r"RewardTrainConfig\.learning_rate=-1\.0: must be > 0"),
    (lambda: RewardTrainConfig(learning_rate="1e-3"), r"RewardTrainConfig\.learning_rate='1e-3': must be a number"),
    (lambda: RewardTrainConfig(centering=math.inf), r"RewardTrainConfig\.centering=inf: must be finite"),
    (lambda: SFTConfig(batch_size=0), r"SFTConfig\.batch_size=0: must be >= 1"),
    (lambda: SFTConfig(epochs=1.0), r"SFTConfig\.epochs=1\.0: must be an int"),
    (lambda: SFTConfig(seed=-1), r"SFTConfig\.seed=-1: must be >= 0"),
    (lambda: RewardTrainConfig(seed=-1), r"RewardTrainConfig\.seed=-1: must be >= 0"),
    (lambda: RLHFConfig(top_p=2.0), r"RLHFConfig\.top_p=2\.0: must be in \(0, 1\]"),
    (lambda: RLHFConfig(temperature=0.0), r"RLHFConfig\.temperature=0\.0: must be >= 1e-05"),
    (lambda: RLHFConfig(minibatches=3), r"minibatches=3 must divide"),
    (lambda: RLHFConfig(kl_estimator="k4"), r"RLHFConfig\.kl_estimator='k4': must be one of"),
    (lambda: RLHFConfig(eos_id=-1), r"RLHFConfig\.eos_id=-1: must be >= 0"),
    (lambda: RLHFConfig(samples_per_prompt=1), r"samples_per_prompt >= 2"),
    (lambda: RLHFConfig(learning_rate=math.nan), r"RLHFConfig\.learning_rate=nan: must be finite"),
    (lambda: RLHFConfig(max_new_tokens=2.5), r"RLHFConfig\.max_new_tokens=2\.5: must be an int"),
    (lambda: SamplingOptions(max_new_tokens=4, top_k=1.5), r"SamplingOptions\.top_k=1\.5: must be an int"),
    (lambda: SamplingOptions(max_new_tokens=0), r"SamplingOptions\.max_new_tokens=0: must be >= 1"),
    (lambda: TransformerConfig(97, 30, 1, 4, 64), r"hidden_size=30 must be divisible by num_heads=4"),
    (lambda: TransformerConfig(97.0, 32, 1, 4, 64), r"TransformerConfig\.vocab_size=97\.0: must be an int"),
    (lambda: Theorem1Config(num_outputs=1), r"Theorem1Config\.num_outputs=1: must be >= 2"),
    (lambda: Theorem1Config(lengths=(2, 0.5)), r"Theorem1Config\.lengths=\(2, 0\.5\): must be an int"),
    (lambda: TightnessConfig(classes=("tabular", "mlp")), r"TightnessConfig\.classes=\('tabular', 'mlp'\)"),
    (lambda: EstimatorsConfig(vocab_size=4, length=3, ks=(2, 8)), r"EstimatorsConfig\.ks=\(2, 8\).*exceed 2e6"),
    (lambda: EstimatorsConfig(censor_factor=1.0), r"EstimatorsConfig\.censor_factor=1\.0: must be > 1"),
    (
        lambda: EstimatorsConfig(passage_ks=(2, 2)),
        r"EstimatorsConfig\.passage_ks=\(2, 2\): the group sizes must be distinct",
    ),
    (
        lambda: EstimatorsConfig(passage_outputs=30, passage_ks=(16,)),
        r"EstimatorsConfig\.passage_ks=\(16,\).*exceed 2e6",
    ),
    (lambda: EstimatorsConfig(passage_problems=1), r"EstimatorsConfig\.passage_problems=1: must be >= 2"),
    (lambda: Estimator("grpo", k=1), r"Estimator\.k=1"),
    # Values a study names or groups its results by must be distinct; grids must be usable.
    (lambda: Theorem1Config(kl_coefs=(0.05, 0.050000001)), r"distinct in their family names"),
    (lambda: Theorem2Config(shuffled=(0.5,)), r"Theorem2Config\.shuffled=\(0\.5,\): must be .*0 among them"),
    (lambda: Theorem2Config(horizons=(100, 10)), r"Theorem2Config\.horizons=\(100, 10\): .*strictly increasing"),
    (lambda: Theorem3Config(horizons=(1.05,), good_mass=0.5), r"T = 1\.05 leaves no mass"),
    (lambda: TightnessConfig(log10_variances=(-2, -2, -3)), r"TightnessConfig\.log10_variances=.*all distinct"),
    (lambda: BestOfNConfig(ranking_n=0), r"BestOfNConfig\.ranking_n=0: must be >= 1"),
    (lambda: BestOfNConfig(ranking_n=100), r"ranking_n=100: must be at most max_n=64"),
    (lambda: ParadoxConfig(checkpoints=()), r"ParadoxConfig\.checkpoints=\(\): must be a non-empty tuple"),
    (lambda: ParadoxConfig(checkpoints=(0, 4, 4)), r"strictly increasing"),
    (lambda: ParadoxConfig(learning_rate=-1.0), r"ParadoxConfig\.learning_rate=-1\.0: must be > 0"),
    (lambda: Estimator(kl_estimator="k4"), r"kl_estimator"),
]


@pytest.mark.parametrize(("build", "message"), CONFIG_CASES)
def test_a_config_refuses_a_bad_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_config_fields_take_ints_for_floats_and_lists_for_tuples():
    assert RewardTrainConfig(learning_rate=1).learning_rate == 1
    # A NumPy float becomes a float, which a run's JSON record can hold.
    assert type(RLHFConfig(learning_rate=np.float32(0.5)).learning_rate) is float
    json.dumps(RLHFConfig(learning_rate=np.float32(0.5)).to_dict())
    assert Theorem1Config(lengths=[2]).lengths == (2,)


# ---------------------------------------------------------------------------------------------
# Kernels and bounds: a ValueError naming the argument, or a documented defined value.

KERNEL_CASES = [
    (lambda: bounds.theorem4_lower_bound(-0.1, 1e-3), r"gamma"),
    (lambda: bounds.theorem4_lower_bound(math.nan, 1e-3), r"gamma"),
    (lambda: bounds.theorem4_lower_bound(0.1, -1e-3), r"variance"),
    (lambda: bounds.theorem4_lower_bound(0.1, 1e-3, kl_coef=-1.0), r"kl_coef"),
    (lambda: bounds.proposition3_lower_bound(0.1, 1e-3, num_prompts=0), r"num_prompts"),
    (lambda: bounds.variance_rate_bound(-1e-3), r"kl_variance"),
    (lambda: bounds.proposition2_variance_rate_bound(0.1, length=0), r"length"),
    (lambda: metrics.accuracy(jnp.ones((3, 1)), jnp.ones((3, 1))), r"accuracy needs at least 2 outputs"),
    (
        lambda: metrics.best_of_n_reward(jnp.zeros(4), jnp.arange(4.0), jnp.arange(4.0), 2.5),
        r"n must hold whole numbers >= 1.*2\.5",
    ),
    (lambda: metrics.reward_variance(jnp.zeros((2, 0)), jnp.zeros((2, 0))), r"non-empty last axis of outputs"),
    (lambda: metrics.kl_estimate(jnp.zeros(3), jnp.zeros(3), kl_estimator="k9"), r"kl_estimator='k9'"),
    (lambda: flow.t_gamma(jnp.zeros((1, 4)), jnp.eye(4)[:1], math.nan), r"gamma"),
    (lambda: flow.t_gamma(jnp.zeros((1, 4)), jnp.eye(4)[:1], -0.1), r"gamma"),
    (lambda: flow.t_gamma(jnp.zeros((1, 4)), jnp.eye(4)[:1], 0.1, t_max=-1.0), r"t_max"),
    (
        lambda: pg.kl_penalized_rewards(
            jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), kl_coef=-1
        ),
        r"kl_coef",
    ),
    (lambda: tabular.TabularPolicy(4).random_logits(jax.random.key(0), -1), r"num_prompts"),
    (lambda: pg.rloo_advantages(jnp.zeros((3, 1))), r"k >= 2 samples per prompt, got shape \(3, 1\)"),
    (lambda: metrics.normalize_rewards(jnp.zeros(4), jnp.arange(4.0)), r"prompt axis.*shape \[1, Y\]"),
    # Shapes that would broadcast by accident: one value per sequence, or per token.
    (lambda: pg.aggregate(jnp.ones((2, 2)), jnp.ones(2, bool)), r"per_token\[2, 2\], mask\[2\]"),
    (lambda: pg.reinforce_loss(jnp.ones((2, 2, 3)), jnp.ones(2), jnp.ones((2, 2, 3), bool)), r"advantages.*\[2, 2\]"),
    (
        lambda: pg.clipped_surrogate_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones(3), jnp.ones((2, 3), bool)),
        r"advantages.*\[2\]",
    ),
    (
        lambda: pg.kl_penalized_rewards(
            jnp.zeros(2), jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)), jnp.ones((2, 2, 3)), kl_coef=0.1
        ),
        r"rewards.*\[2, 2\]",
    ),
    (lambda: pg.entropy_per_token(jnp.zeros((2, 3, 4)), jnp.ones((2, 4), bool)), r"logits \[2, 3, 4\].*mask"),
    # One value per prompt, [P], against [P, k] rewards would broadcast along k (silently if P == k).
    (
        lambda: pg.reinforce_advantages(jnp.ones((2, 2)), baseline=jnp.ones(2)),
        r"baseline .* \[2, 1\] for one per prompt",
    ),
    (
        lambda: pg.kl_penalized_rewards(
            jnp.zeros((2, 2)), jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)), jnp.ones((2, 2, 3)), kl_coef=jnp.ones(2)
        ),
        r"kl_coef must be a scalar or have the rank",
    ),
    # A per-prompt argument of the right rank that does not broadcast, or that holds NaN; eps and clip.
    (
        lambda: pg.reinforce_advantages(jnp.ones((2, 2)), baseline=jnp.ones((3, 1))),
        r"baseline must be a scalar or have the rank of the rewards \[2, 2\] and broadcast to them",
    ),
    (lambda: pg.reinforce_advantages(jnp.ones((2, 2)), baseline=jnp.nan), r"baseline must be finite"),
    (lambda: pg.normalize_sampled_rewards(jnp.ones(3), jnp.nan, 1.0), r"mean must be finite"),
    (lambda: pg.normalize_sampled_rewards(jnp.ones(3), 0.0, 1.0, clip=-1.0), r"clip must be > 0"),
    (lambda: pg.normalize_sampled_rewards(jnp.ones(3), 0.0, 1.0, eps=-1.0), r"eps must be a number >= 0"),
    (lambda: pg.grpo_advantages(jnp.ones((1, 2)), eps=-0.7071), r"eps must be a number >= 0"),
    (
        lambda: pg.kl_penalized_rewards(
            jnp.array([jnp.nan]), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2), bool), kl_coef=0.1
        ),
        r"rewards must be finite",
    ),
    (
        lambda: pg.reinforce_loss(jnp.ones((2, 3)), jnp.ones(2), jnp.ones((2, 3), bool), aggregation="token-meen"),
        r"aggregation='token-meen'",
    ),
    (
        lambda: pg.clipped_surrogate_loss(
            jnp.ones((2, 3)),
            jnp.ones((2, 3)),
            jnp.ones(2),
            jnp.ones((2, 3), bool),
            ratio_level="sequence",
            aggregation="x",
        ),
        r"aggregation='x'",
    ),
    (
        lambda: pg.clipped_surrogate_loss(
            jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones(2), jnp.ones((2, 3), bool), clip_eps=-0.5
        ),
        r"clip_eps must be > 0",
    ),
    (lambda: pg.grpo_advantages(jnp.ones((1, 2)), ddof=2), r"k >= 3"),
    (lambda: pg.scale_per_group(jnp.ones((1, 2)), ddof=0.5), r"ddof"),
    (lambda: pg.reward_statistics(jnp.ones(2), ddof=2), r"ddof=2"),
    (lambda: metrics.sample_reward_variance(jnp.ones((1, 3)), ddof=-1), r"ddof"),
    (lambda: pg.normalize_sampled_rewards(jnp.ones((2, 2)), 0.0, jnp.array([[1.0], [-1.0]])), r"std"),
    # NaN where a number is needed, and a support with nothing in it.
    (lambda: metrics.spearman(jnp.array([1.0, math.nan, 3.0]), jnp.arange(3.0)), r"\bx\b"),
    (lambda: metrics.pearson(jnp.arange(3.0), jnp.array([1.0, math.nan, 3.0])), r"\by\b"),
    (lambda: metrics.best_of_n_reward(jnp.array([0.0, math.nan]), jnp.ones(2), jnp.ones(2), 2), r"logits"),
    (
        lambda: metrics.reward_variance(
            jnp.zeros((2, 2)),
            jnp.ones((2, 2)),
            where=jnp.array([[True, True], [False, False]]),
        ),
        r"where leaves 1 row",
    ),
    (
        lambda: metrics.kl(jnp.zeros((2, 2)), jnp.ones((2, 2)), where=jnp.array([[True, True], [False, False]])),
        r"where leaves 1 row",
    ),
    (
        lambda: metrics.bootstrap_correlation_difference(
            jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.ones(5), jax.random.key(0)
        ),
        r"x_a and x_b",
    ),
    (
        lambda: metrics.accuracy(
            jnp.arange(3.0),
            jnp.arange(3.0),
            probs=jnp.array([2 / 3, 1 / 3, 0.25]),
            where=jnp.array([True, True, False]),
        ),
        r"probs must sum to 1",
    ),
    # Bounds outside the theorems' range: rho in (0, 1) and the mass on y_g below it.
    (lambda: bounds.theorem2_fast_upper_bound(1.5, 0.2, num_prompts=1), r"rho must lie in \(0, 1\)"),
    (lambda: bounds.theorem2_fast_upper_bound(0.1, 0.2, num_prompts=1), r"good_prob must be below rho"),
    (lambda: bounds.theorem3_fast_upper_bound(2.0, 0.2, num_prompts=1), r"rho"),
    (lambda: bounds.theorem2_kl_limit(0.2, 0.5, 2.0), r"min_prob"),
    (lambda: bounds.theorem2_kl_limit(0.1, 0.5, 0.3), r"min_prob, the smallest initial probability, cannot exceed"),
    (lambda: bounds.theorem2_slow_lower_bound(0.2, 0.01, num_prompts=1), r"horizon T must be >= 1"),
    (lambda: bounds.theorem3_slow_lower_bound(0.2, 0.5, num_prompts=1), r"horizon T must be >= 1"),
    (lambda: bounds.theorem3_kl_limit(0.6, 0.5, 0.1), r"good_prob_floor must be below rho"),
    # The exact flow and ascent: arguments checked by name before anything is compiled.
    (lambda: flow.t_gamma(jnp.zeros((3, 4)), jnp.eye(4)[:3], jnp.full(4, 0.1)), r"gamma \[4\] must broadcast"),
    (lambda: flow.t_gamma(jnp.zeros((3, 4)), jnp.eye(4)[:3], 0.1, kl_coef=jnp.ones(5)), r"kl_coef \[5\] fits neither"),
    (lambda: flow.t_gamma(jnp.zeros((3, 4)), jnp.eye(4)[:3], 0.1, kl_coef=math.inf), r"kl_coef must be finite"),
    (lambda: flow.t_gamma(jnp.zeros((3, 4)), jnp.eye(4)[:3], 0.1, rtol=-1.0), r"rtol must be a finite number > 0"),
    (
        lambda: flow.t_gamma(jnp.zeros((3, 4), jnp.float32), jnp.eye(4, dtype=jnp.float32)[:3], 0.1, rtol=1e-8),
        r"rtol=1e-08 is below what float32 resolves",
    ),
    (lambda: flow.t_gamma(jnp.zeros((3, 4)), jnp.eye(4)[:3], 0.1, max_steps=True), r"max_steps must be an int >= 1"),
    (lambda: flow.t_gamma(jnp.zeros((3, 4)), jnp.eye(4)[:3], 0.1, devices=jax.devices()[0]), r"devices must be"),
    (lambda: flow.trajectory(jnp.zeros((3, 4)), jnp.eye(4)[:3], []), r"ts must be a non-empty"),
    (lambda: flow.trajectory(jnp.zeros((3, 4)), jnp.eye(4)[:3], [0.0, math.inf]), r"ts must be finite"),
    (
        lambda: ascent.exact_gradient_ascent(jnp.zeros((3, 4)), jnp.eye(4)[:3], optimizer=0.1, num_steps=2),
        r"optimizer must be an optax GradientTransformation",
    ),
    (
        lambda: ascent.exact_gradient_ascent(
            jnp.zeros((3, 4)), jnp.eye(4)[:3], optimizer=optax.sgd(0.1), num_steps=2, track="no"
        ),
        r"track must be True or False",
    ),
    (
        lambda: ascent.sampled_gradient_ascent(
            jnp.zeros((3, 4)), jnp.eye(4)[:3], 0, k=2, optimizer=optax.sgd(0.1), num_steps=2
        ),
        r"key must be a jax.random.key",
    ),
    (lambda: metrics.bootstrap_correlation(jnp.arange(4.0), jnp.arange(4.0), 0), r"key must be a jax.random.key"),
    (lambda: ascent.SampledGradient(True, "reinforce"), r"k=True"),
    (lambda: studies.share_interval(1, True), r"integer counts"),
    (lambda: make_mesh(model=3), r"model=3 does not divide the 4 devices"),
    (lambda: RunCheckpoints("/tmp/jaxrm_never_created", keep=True), r"keep must be an int >= 1"),
    (lambda: studies.config_with_overrides(Theorem1Config(), ["seed=1", "seed=2"]), r"--set gives seed twice"),
    # The one-prompt estimators refuse a second prompt rather than read only the first.
    (
        lambda: estimators.objective_gradient(tabular.TabularPolicy(3), jnp.zeros((2, 3)), jnp.ones((2, 3))),
        r"logits hold 2 prompts",
    ),
    (
        lambda: estimators.objective_gradient(tabular.TabularPolicy(3), jnp.zeros((1, 3)), jnp.ones((2, 3))),
        r"rewards must be shaped \[3\]",
    ),
    (
        lambda: estimators.sampled_gradient(
            Estimator("rloo", k=2), tabular.TabularPolicy(3), jnp.zeros((1, 3)), jnp.ones(3), jnp.array([0, 7])
        ),
        r"samples holds 1 token id\(s\) outside",
    ),
    (
        lambda: estimators.compare(estimators.Moments(jnp.zeros((2, 3)), jnp.zeros((2, 3, 3)), 6), jnp.zeros(3)),
        r"one prompt's moments",
    ),
    (
        lambda: jax.jit(
            lambda c: (
                estimators.estimate_moments(
                    Estimator("rloo", k=2), tabular.TabularPolicy(3), jnp.zeros((1, 3)), jnp.ones(3), kl_coef=c
                ).mean
            )
        )(0.1),
        r"concrete kl_coef",
    ),
]


@pytest.mark.parametrize(("call", "message"), KERNEL_CASES)
def test_a_kernel_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_defined_values_instead_of_nan():
    # Constant rewards normalise to 0 (docs: a constant reward teaches nothing), not 0/0.
    np.testing.assert_array_equal(metrics.normalize_rewards(jnp.zeros((2, 4)), jnp.full((2, 4), 0.3)), np.zeros((2, 4)))
    # Integer inputs to the exact flow are cast, not refused with a diffrax message.
    t = flow.t_gamma(jnp.zeros((1, 4), int), jnp.eye(4, dtype=int)[:1], 0.1)
    assert np.isfinite(t).all()


# ---------------------------------------------------------------------------------------------
# Loaders and checkpoints.


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from tests.tiny_checkpoint import save_tiny_gpt_neox

    return save_tiny_gpt_neox(tmp_path_factory.mktemp("hf") / "tiny", vocab_size=64)


def test_a_study_checks_its_policy_checkpoint_and_preset_before_anything(hf_checkpoint, tmp_path, capsys, no_study_run):
    import shutil

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_checkpoint / "config.json", no_weights)
    small = tmp_path / "small"  # 30 tokens: the task needs 40
    from tests.tiny_checkpoint import save_tiny_gpt_neox

    save_tiny_gpt_neox(small, vocab_size=30)
    cases = [
        (["--preset", "ci", "--set", f"policy_checkpoint={no_weights}"], r"has no \*\.safetensors files"),
        (
            ["--preset", "ci", "--set", f"policy_checkpoint={small}"],
            r"vocabulary of 30 tokens, smaller than the task's 40",
        ),
        (["--preset", "paper"], r"--preset paper needs --set policy_checkpoint=DIR"),
        (
            ["--preset", "ci", "--set", f"policy_checkpoint={hf_checkpoint}", "num_layers=3"],
            r"num_layers=3 would be ignored: with policy_checkpoint the models take the checkpoint's shape",
        ),
    ]
    for module in (experiments.teacher, experiments.paradox):
        for arguments, message in cases:
            out = tmp_path / "run"
            with pytest.raises(SystemExit) as exit_:
                module.main([*arguments, "--out", str(out)])
            assert exit_.value.code == 2
            assert __import__("re").search(message, capsys.readouterr().err)
            assert not out.exists()


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "copy")


def _damage_safetensors(directory, how):
    (file,) = directory.glob("*.safetensors")
    data = file.read_bytes()
    file.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello, not safetensors" * 4}[how])
    return file.name


@pytest.mark.parametrize("how", ["empty", "truncated", "text"])
def test_load_hf_names_a_damaged_safetensors_file(hf_checkpoint, tmp_path, how):
    directory = _copy(hf_checkpoint, tmp_path)
    name = _damage_safetensors(directory, how)
    with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file"):
        load_hf(directory)


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("{not json", r"config\.json is not valid JSON"),
        ("[1, 2]", r"config\.json holds a list"),
        ('{"model_type": "gpt_neox"}', r"config\.json has no 'vocab_size'"),
        ('{"model_type": "llama"}', r"config\.json is not a usable model config.*model_type='llama'"),
    ],
    ids=["not-json", "not-an-object", "missing-key", "other-model"],
)
def test_load_hf_names_a_malformed_config(hf_checkpoint, tmp_path, config_text, message):
    directory = _copy(hf_checkpoint, tmp_path)
    (directory / "config.json").write_text(config_text)
    with pytest.raises(ValueError, match=message):
        load_hf(directory)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("use_parallel_residual", "false", r"parallel_residual='false': must be true or false"),
        ("attention_bias", None, r"attention_bias=None: must be true or false"),
        ("layer_norm_eps", "1e-5", r"layer_norm_eps='1e-5': must be a number"),
    ],
)
def test_load_hf_refuses_a_config_value_of_the_wrong_type(hf_checkpoint, tmp_path, key, value, message):
    """A string "false" once read as True, and null as False (bool() of the raw value)."""
    directory = _copy(hf_checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=rf"config\.json is not a usable model config: .*{message}"):
        load_hf(directory)


def test_read_hf_config_reads_the_safetensors_headers(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    name = _damage_safetensors(directory, "empty")
    with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file"):
        read_hf_config(directory)


def test_load_hf_refuses_non_finite_weights_unless_allowed(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _copy(hf_checkpoint, tmp_path)
    (file,) = directory.glob("*.safetensors")
    tensors = load_file(file)
    tensors["gpt_neox.final_layer_norm.weight"][3] = np.nan
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"gpt_neox\.final_layer_norm\.weight holds 1 NaN/inf.*allow_nonfinite"):
        load_hf(directory)
    model = load_hf(directory, allow_nonfinite=True)
    assert np.isnan(np.asarray(model.trunk.final_layer_norm.scale[...])).sum() == 1


def test_load_hf_names_a_missing_directory_and_refuses_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_hf(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="refuses them because unpickling"):
        load_hf(tmp_path)


@pytest.fixture(scope="module")
def tiny_model():
    return CausalLM(preset("tiny"), rngs=nnx.Rngs(0))


def test_load_model_detects_a_damaged_checkpoint(tiny_model, tmp_path):
    # Parameters that decode but are not the saved ones (another model's, same layout): only the
    # checksum can tell.
    directory = save_model(tiny_model, tmp_path / "model")
    other = save_model(CausalLM(tiny_model.config, rngs=nnx.Rngs(1)), tmp_path / "other")
    shutil.rmtree(directory / "params")
    shutil.copytree(other / "params", directory / "params")
    with pytest.raises(ValueError, match=r"model: the parameters differ from those saved \(checksum mismatch\)"):
        load_model(directory)
    # The arrays gone: named as unreadable. (Orbax spreads them over a varying number of data
    # files, some of whose bytes are never read, so a flipped byte can rightly go unnoticed; a
    # restore that fails midway leaves orbax's threads writing to a closed event loop.)
    missing = save_model(tiny_model, tmp_path / "missing")
    shutil.rmtree(missing / "params")
    with pytest.raises(ValueError, match=rf"{missing}: the parameters cannot be read"):
        load_model(missing)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("{oops", r"model\.json is not valid JSON"),
        ('{"class": "CausalLM"}', r"model\.json is not a jaxrm model record"),
    ],
    ids=["not-json", "missing-fields"],
)
def test_load_model_names_a_malformed_record(tiny_model, tmp_path, record, message):
    directory = save_model(tiny_model, tmp_path / "model")
    (directory / "model.json").write_text(record)
    with pytest.raises(ValueError, match=message):
        load_model(directory)
    with pytest.raises(ValueError, match=message):
        read_metadata(directory)


def test_load_model_refuses_non_finite_parameters_unless_allowed(tmp_path):
    model = CausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    model.trunk.final_layer_norm.scale[...] = model.trunk.final_layer_norm.scale[...].at[0].set(jnp.inf)
    directory = save_model(model, tmp_path / "model")
    with pytest.raises(ValueError, match=r"final_layer_norm/scale.*NaN/inf.*allow_nonfinite"):
        load_model(directory)
    assert np.isinf(np.asarray(load_model(directory, allow_nonfinite=True).trunk.final_layer_norm.scale[...])).any()


def test_load_model_names_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a jaxrm model checkpoint"):
        load_model(tmp_path)


@pytest.mark.parametrize("option", ["eos_id", "pad_id"])
def test_sampling_refuses_token_ids_outside_the_vocabulary(tiny_model, option):
    tokens = jnp.ones((2, 3), jnp.int32)
    vocab = tiny_model.config.vocab_size
    with pytest.raises(ValueError, match=rf"{option}={vocab} is outside the model's vocabulary \[0, {vocab}\)"):
        sample(tiny_model, tokens, jnp.ones((2, 3), bool), jax.random.key(0), max_new_tokens=2, **{option: vocab})


def test_run_rlhf_refuses_an_eos_outside_the_vocabulary_before_writing(tiny_model, tmp_path):
    from jaxrm.train.driver import run_rlhf
    from tests.rlhf_task import CONFIG, ground_truth, prompts

    tokens, mask = prompts(8)
    config = dataclasses.replace(CONFIG, eos_id=tiny_model.config.vocab_size + 5)
    with pytest.raises(ValueError, match=r"eos_id=\d+ is outside the model's vocabulary"):
        run_rlhf(tiny_model, ground_truth, None, tokens, mask, config, num_iterations=1, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _small_vocabulary_teacher(policy):
    from jaxrm.train.rlhf import reward_model_fn

    teacher = RewardModel(policy.config.replace(vocab_size=8), rngs=nnx.Rngs(1))
    return reward_model_fn(nnx.graphdef(teacher)), nnx.state(teacher, nnx.Param), {}


def _other_reference(policy):
    from tests.rlhf_task import ground_truth

    return ground_truth, None, {"reference": CausalLM(policy.config.replace(hidden_size=64), rngs=nnx.Rngs(1))}


def _one_reward_per_batch(policy):
    return (lambda params, prompt, prompt_mask, response, response_mask: jnp.zeros(())), None, {}


def _explicit_mesh(policy):
    from tests.rlhf_task import ground_truth

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Explicit,))
    return ground_truth, None, {"mesh": mesh}


def _mesh_without_data(policy):
    from tests.rlhf_task import ground_truth

    return ground_truth, None, {"mesh": jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))}


def _keep_no_checkpoint(policy):
    from tests.rlhf_task import ground_truth

    return ground_truth, None, {"keep_checkpoints": True}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_keep_no_checkpoint, r"keep_checkpoints must be an int >= 1, got True"),
        (_small_vocabulary_teacher, r"reward model's vocabulary \(8 tokens\) is smaller than the policy's \(97\)"),
        (_other_reference, r"reference must have the policy's architecture.*\(32, 97\) float32 against \(64, 97\)"),
        (_one_reward_per_batch, r"reward_fn must return one reward per response.*got \(\)"),
        (_mesh_without_data, r"mesh must have a 'data' axis"),
        (_explicit_mesh, r"mesh must have Auto axes .*'data': 'Explicit'"),
    ],
    ids=["keep-checkpoints", "teacher-vocabulary", "reference", "reward-shape", "mesh", "explicit-mesh"],
)
def test_run_rlhf_refuses_a_mismatched_teacher_reference_or_mesh_before_writing(tiny_model, tmp_path, make, message):
    from jaxrm.train.driver import run_rlhf
    from tests.rlhf_task import CONFIG, prompts

    tokens, mask = prompts(8)
    reward_fn, reward_params, options = make(tiny_model)
    with pytest.raises(ValueError, match=message):
        run_rlhf(
            tiny_model,
            reward_fn,
            reward_params,
            tokens,
            mask,
            CONFIG,
            num_iterations=1,
            out_dir=tmp_path / "run",
            **options,
        )
    assert not (tmp_path / "run").exists()


def test_model_calls_outside_a_trace_check_token_ids_and_the_cache(tiny_model):
    from jaxrm.models import KVCache

    vocab = tiny_model.config.vocab_size
    with pytest.raises(ValueError, match=rf"tokens holds 1 token id\(s\) outside the vocabulary \[0, {vocab}\)"):
        tiny_model(jnp.array([[3, vocab]]))
    cache = KVCache.empty(tiny_model.config, 1, 3)
    hidden, cache = tiny_model.trunk(jnp.array([[1, 2]]), positions=jnp.array([[0, 1]]), cache=cache)
    with pytest.raises(ValueError, match=r"KV cache holds 3 slots, 2 filled: no room for 2 more"):
        tiny_model.trunk(jnp.array([[3, 4]]), positions=jnp.array([[2, 3]]), cache=cache)
    with pytest.raises(ValueError, match=r"key must be a jax.random.key \(e.g. jax.random.key\(0\)\), got 0"):
        sample(tiny_model, jnp.array([[1, 2]]), jnp.ones((1, 2), bool), 0, max_new_tokens=2)
    # A reward model reads the last real token: a row without one is refused, not scored at position 0.
    reward_model = RewardModel(tiny_model.config, rngs=nnx.Rngs(0))
    tokens, mask = jnp.array([[0, 5, 6], [9, 9, 9]]), jnp.array([[False, True, True], [False, False, False]])
    with pytest.raises(ValueError, match=r"mask rows \[1\] have no real token to score"):
        reward_model(tokens, mask)
    assert reward_model(tokens[:1], mask[:1]).shape == (1,)


def test_save_model_refuses_metadata_that_is_not_json_and_leaves_nothing(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="metadata must be JSON"):
        save_model(tiny_model, tmp_path / "model", metadata={"accuracy": np.float32(0.5)})
    with pytest.raises(ValueError, match="metadata must be JSON"):  # json.dumps would write a bare NaN
        save_model(tiny_model, tmp_path / "model", metadata={"accuracy": float("nan")})
    # Parameters stacked over two runs would be written, then fail to load against the config.
    stacked = CausalLM(tiny_model.config, rngs=nnx.Rngs(0))
    nnx.update(stacked, jax.tree.map(lambda x: jnp.stack([x, x]), nnx.state(stacked, nnx.Param)))
    with pytest.raises(
        ValueError, match=r"parameter \['embed_out'\]\['kernel'\] is \(2, 32, 97\) float32, where its config"
    ):
        save_model(stacked, tmp_path / "model")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"a_file is a file, so the directory cannot be created"):
        save_model(tiny_model, tmp_path / "a_file" / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    # float16 compute has no matrix products on XLA's CPU backend: refused when the model is built.
    with pytest.raises(ValueError, match=r"dtype='float16': XLA's CPU backend has no float16 matrix products"):
        CausalLM(tiny_model.config.replace(dtype="float16"), rngs=nnx.Rngs(0))


def test_load_model_names_shardings_laid_out_for_another_model(tiny_model, tmp_path):
    from jaxrm.sharding import param_shardings

    directory = save_model(tiny_model, tmp_path / "model")
    deeper = CausalLM(
        dataclasses.replace(tiny_model.config, num_layers=tiny_model.config.num_layers + 1), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=r"sharding= is laid out for another model than the checkpoint"):
        load_model(directory, sharding=param_shardings(nnx.state(deeper, nnx.Param), make_mesh()))
    with pytest.raises(ValueError, match=r"sharding= is laid out for another model than the checkpoint"):
        load_model(directory, sharding={"a": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sequences=[[1.5, 2]]), r"sequence 0 must hold integer token ids"),
        (dict(sequences=[[1, -2]]), r"sequence 0 holds a negative token id"),
        (dict(sequences=[[1, 2]], pad_id=-1), r"pad_id must be an int >= 0"),
        (dict(sequences=[[1, 2]], length=-1), r"length must be an int >= 0"),
    ],
    ids=["float", "negative", "pad_id", "length"],
)
def test_pad_sequences_refuses_what_is_not_a_token_id(kwargs, message):
    from jaxrm.models import pad_sequences

    sequences = kwargs.pop("sequences")
    with pytest.raises(ValueError, match=message):
        pad_sequences(sequences, **kwargs)


def test_load_hf_names_an_unknown_override_as_the_callers(hf_checkpoint):
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['vocab_sz'\]"):
        load_hf(hf_checkpoint, vocab_sz=3)


def test_training_entry_points_check_their_arguments_before_any_work(tiny_model, tmp_path):
    from jaxrm.models import RewardModel
    from jaxrm.train import PreferencePairs
    from jaxrm.train.reward import evaluate_reward_model, train_reward_models
    from jaxrm.train.rlhf import measure_reward_statistics
    from jaxrm.train.sft import sequence_nll, train_sft
    from tests.rlhf_task import CONFIG, ground_truth

    tokens, mask = np.array([[1, 2, 3]]), np.ones((1, 3), bool)
    with pytest.raises(
        ValueError, match=r"at least one response token to learn after its first real token; 1 have none"
    ):
        train_sft(tiny_model, tokens, mask, np.array([[True, False, False]]), log=None)
    with pytest.raises(ValueError, match=r"after its first real token; 1 have none"):  # left padding
        train_sft(tiny_model, tokens, np.array([[False, True, True]]), np.array([[False, True, False]]), log=None)
    with pytest.raises(ValueError, match=r"loss_mask must be a bool array"):
        train_sft(tiny_model, tokens, mask, np.ones((1, 3)), log=None)
    # Padding between a prompt and its response: the response's first token would not be learned.
    gapped = np.array([[True, True, False, True, True]])
    with pytest.raises(ValueError, match=r"mask has padding between real tokens in 1 row\(s\) \(first: row 0\)"):
        train_sft(
            tiny_model, np.array([[5, 6, 0, 7, 8]]), gapped, np.array([[False, False, False, True, True]]), log=None
        )
    # A loss mask that also covers padding learns only real tokens.
    padded, real = jnp.array([[1, 2, 3, 0]]), jnp.array([[True, True, True, False]])
    np.testing.assert_allclose(
        sequence_nll(tiny_model, padded, real, jnp.ones((1, 4), bool)), sequence_nll(tiny_model, padded, real, real)
    )
    # Left padding: a row's first real token is not a target (it has no prefix), as without padding.
    left, unpadded = jnp.array([[0, 5, 7]]), jnp.array([[5, 7]])
    np.testing.assert_allclose(
        sequence_nll(tiny_model, left, jnp.array([[False, True, True]]), jnp.ones((1, 3), bool)),
        sequence_nll(tiny_model, unpadded, jnp.ones((1, 2), bool), jnp.ones((1, 2), bool)),
        rtol=1e-6,
    )
    # By hand: the mean over every learned token of -log pi(token | its prefix), rows of 3 and 1.
    rows = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    log_probs = np.asarray(jax.nn.log_softmax(tiny_model(rows, rows > 0), axis=-1))
    by_hand = -np.mean([log_probs[r, i, int(rows[r, i + 1])] for r, i in ((0, 0), (0, 1), (0, 2), (1, 0))])
    np.testing.assert_allclose(sequence_nll(tiny_model, rows, rows > 0, jnp.ones((2, 4), bool)), by_hand, rtol=1e-6)

    reward_model = RewardModel(tiny_model.config, rngs=nnx.Rngs(0))
    pairs = PreferencePairs.from_lists([[1, 2]] * 4, [[3]] * 4, [[4]] * 4)
    directory = tmp_path / "rm"
    with pytest.raises(ValueError, match=r"checkpoint_dirs must be distinct"):
        train_reward_models(reward_model, [pairs, pairs], checkpoint_dirs=[directory, directory], checkpoint_steps=(0,))
    for options, message in (
        (dict(eval_pairs=pairs, eval_steps=(1.0,)), r"eval_steps must be a sequence of ints >= 0, got \(1.0,\)"),
        (dict(checkpoint_steps=4), r"checkpoint_steps must be a sequence of ints >= 0, got 4"),
        (dict(seeds=[-1]), r"seeds must be a sequence of ints >= 0, got \[-1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            train_reward_models(reward_model, [pairs], **options)
    # A policy where a reward model belongs, and the reverse, are named before any tracing.
    with pytest.raises(ValueError, match=r"model must be a RewardModel, got CausalLM"):
        train_reward_models(tiny_model, [pairs])
    with pytest.raises(ValueError, match=r"model must be a CausalLM, got RewardModel"):
        train_sft(reward_model, tokens, mask, mask, log=None)
    assert not directory.exists()
    # A checkpoint directory that cannot be written is refused before training, not at the first save.
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint_dir .*a_file is a file, not a directory"):
        train_reward_models(
            reward_model,
            [pairs],
            RewardTrainConfig(batch_size=4),
            checkpoint_dirs=[tmp_path / "a_file"],
            checkpoint_steps=(1,),
        )
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        evaluate_reward_model(reward_model, pairs, batch_size=0)

    right_padded = np.array([[5, 6, 0]]), np.array([[True, True, False]])
    with pytest.raises(ValueError, match=r"left-padded"):
        measure_reward_statistics(tiny_model, ground_truth, None, *right_padded, jax.random.key(0), config=CONFIG)

    from jaxrm.train.driver import run_rlhf
    from jaxrm.train.rlhf import init_state
    from tests.rlhf_task import prompts

    def run(config=CONFIG, out_dir=tmp_path / "run", **options):
        return run_rlhf(
            tiny_model, ground_truth, None, *prompts(8), config, num_iterations=1, out_dir=out_dir, **options
        )

    for options, message in (
        (dict(teachers="ab"), r"teachers must be a non-empty sequence of distinct names, got 'ab'"),
        # Two teachers' (mean, std) in a list read like (means, stds): only a mapping is taken.
        (dict(teachers=["a", "b"], reward_stats=[(0.0, 1.0), (0.5, 2.0)]), r"with teachers, reward_stats must map"),
        (dict(reward_stats=1.0), r"reward_stats: each teacher's statistics must be two numbers"),
        (dict(seeds=0.0), r"seeds must be an int or a non-empty sequence of distinct ints, got 0.0"),
        (dict(config=CONFIG.to_dict()), r"config must be a RLHFConfig, got dict"),
        (dict(out_dir=tmp_path / "a_file" / "run"), r"out_dir .*a_file is a file, so the directory cannot be created"),
    ):
        with pytest.raises(ValueError, match=message):
            run(**options)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"key must be a jax.random.key"):
        init_state(tiny_model, CONFIG, 0)
