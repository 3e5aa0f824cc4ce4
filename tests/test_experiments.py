"""experiments/: the controlled task and a smoke run of the teacher study (preset ci)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_checkpoint import save_tiny_gpt_neox

from experiments import paradox, teacher
from experiments.tasks import TopicTask
from jaxrm.studies import config_with_overrides, correlations, sign_verdict


def test_the_task_ground_truth_is_graded_exact_and_prompt_dependent():
    task = TopicTask()
    rng = np.random.default_rng(0)
    prompts = task.prompts(64, rng)
    responses = task.demonstrations(prompts, rng)
    ones = jnp.ones(responses.shape, bool)
    rewards = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(responses), ones))
    topics = prompts[:, 0] - 1
    expected = task.scores[topics[:, None], responses].mean(-1)
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    assert np.all(np.abs(rewards) <= 1) and len(np.unique(np.round(rewards, 4))) > 20
    # Off-policy responses come from another distribution: clearly lower ground truth here.
    off = task.off_policy_responses(prompts, rng)
    assert task.scores[topics[:, None], off].mean() < expected.mean() - 0.1
    # A token outside the response range scores -1 whatever the topic.
    assert (
        float(
            task.ground_truth(None, jnp.asarray(prompts[:1]), None, jnp.zeros((1, 3), int), jnp.ones((1, 3), bool))[0]
        )
        == -1.0
    )
    # So does an id past the task's vocabulary, which a policy with a larger one can draw.
    past = jnp.full((1, 3), task.vocab_size + 7)
    assert float(task.ground_truth(None, jnp.asarray(prompts[:1]), None, past, jnp.ones((1, 3), bool))[0]) == -1.0
    with pytest.raises(ValueError, match="topic_spread"):
        TopicTask(topic_spread=1.0)


def _assert_outputs_were_checked(out, config):
    """Everything a run wrote in ``out`` is one of the outputs its config lists (``RUN_OUTPUTS``,
    checked before any work) or lies under one of its directories."""
    listed = {"config.json", *type(config).RUN_OUTPUTS}
    for path in out.rglob("*"):
        name = str(path.relative_to(out))
        if path.is_file():
            assert name in listed or any(name.startswith(entry) for entry in listed if entry.endswith("/")), name
    assert {p.name for p in out.iterdir()} == {entry.split("/")[0] for entry in listed}


def test_teacher_study_smoke_run_writes_its_report_and_resumes(tmp_path):
    lines = []
    config = teacher.TeacherConfig.preset("ci")
    summary = teacher.run(tmp_path, config, log=lines.append)
    learned = len(config.reward_models())
    assert summary["teachers"] == config.teacher_names() and len(summary["teachers"]) == learned + 2 == 12
    assert len(summary["students"]) == len(config.student_sharpness)
    assert any("training 5 reward models side by side" in line for line in lines)
    # The second student's RLOO run reuses the first one's compiled chunk program (same shapes).
    second = next(i for i, line in enumerate(lines) if line.startswith("student 1:"))
    assert not any(line.startswith("compiling") for line in lines[second:])
    table1 = summary["table1"]
    assert table1["on-policy accuracy"][-1] == 1.0 and table1["off-policy accuracy"][-2] == 1.0
    assert all(0 <= a <= 1 for a in table1["on-policy accuracy"] + table1["off-policy accuracy"])
    # Scaling half of the prompts by 0.001 lowers the ground truth's reward variance.
    assert table1["reward variance"][-2] < table1["reward variance"][-1]
    # Table 2 over the reward models carries its bootstrap interval (models and seeds resampled).
    for entry in summary["table2"].values():
        for estimate, low, high in entry.values():
            assert -1 <= low <= high <= 1 and -1 <= estimate <= 1
    report = (tmp_path / "report.md").read_text()
    here = summary["table2"]["reward variance / ground truth"]
    assert (
        f"| reward variance | ground truth | {teacher.fmt_interval(here['pearson'])} | "
        f"{teacher.fmt_interval(here['spearman'])} |" in report
    )
    assert report.startswith("# The reward-model teacher study")
    assert f"Verdict: **{summary['section_4_2']['verdict']}**" in report
    assert summary["section_4_2"]["verdict"] in {"holds", "does not hold", "inconclusive"}
    for student in summary["students"]:
        assert sum(student["best_share"]) == pytest.approx(1.0) and len(student["best_share"]) == learned
    allowed = {"holds", "does not hold", "inconclusive", "consistent"}
    for finding, verdict in summary["verdicts"].items():
        assert verdict in allowed or verdict.endswith("relation the paper did not find"), (finding, verdict)
        assert f"| {finding} | {verdict} |" in report
    # One map cell per student and training length, each with its two correlations and their difference.
    assert [(c["student"], c["epochs"]) for c in summary["map"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(c["models"] == 5 and -2 <= c["difference"][1] <= c["difference"][2] <= 2 for c in summary["map"])
    assert (tmp_path / "figures" / "teacher.png").stat().st_size > 10_000
    _assert_outputs_were_checked(tmp_path, config)
    for student in range(len(config.student_sharpness)):
        lines = (tmp_path / "runs" / f"student_{student}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == (learned + 2) * config.seeds * config.iterations
        assert {"teacher", "seed", "iteration", "ground_truth_reward", "kl"} <= set(json.loads(lines[0]))
    # A second run on the same directory reuses every stage and reproduces the summary.
    again = []
    assert teacher.run(tmp_path, config, log=again.append) == json.loads((tmp_path / "summary.json").read_text())
    assert sum("reusing" in line for line in again) == len(config.student_sharpness) + 1
    assert not any("SFT:" in line or "training" in line for line in again)


def _fake_measurements(config, truth_gain, *, perfect_gain):
    """Stats and RLOO histories for ``config`` whose ground-truth gains are ``truth_gain`` per
    learned model (plus seed noise), so that the verdicts can be checked on known data."""
    rng = np.random.default_rng(0)
    learned, teachers, iterations = len(config.reward_models()), len(config.teacher_names()), config.iterations
    variance = np.linspace(0.2, 0.8, learned)
    stats, results = [], []
    for _ in config.student_sharpness:
        per_prompt = rng.uniform(0, 1, (teachers, 16))
        per_prompt[-2] *= 0.2  # the perfect low-variance teacher, clearly below the ground truth
        stats.append(
            {
                "mean": np.zeros(teachers),
                "std": np.ones(teachers),
                "reward variance": np.append(variance, [0.1, 0.3]),
                "reward variance per prompt": per_prompt,
                "on-policy accuracy": np.append(rng.uniform(0.5, 0.7, learned), [1.0, 1.0]),
                "off-policy accuracy": np.append(rng.uniform(0.5, 0.7, learned), [1.0, 1.0]),
                "initial reward": np.zeros(teachers),
                "initial ground truth": 0.0,
            }
        )
        final = np.append(truth_gain(variance), [perfect_gain, 1.0])[:, None] + 0.002 * rng.normal(
            size=(teachers, config.seeds)
        )
        curve = np.repeat(final[..., None], iterations, axis=-1)
        results.append(
            {
                "ground_truth_reward": curve,
                "proxy_reward": curve,
                "kl": curve,
                "entropy": np.ones_like(curve),
            }
        )
    return stats, results


def test_teacher_verdicts_are_computed_from_the_measurements():
    config = dataclasses.replace(teacher.TeacherConfig.preset("ci"), iterations=4, chunk=1, seeds=4, rm_seeds=2)
    grows = teacher.summarize(config, *_fake_measurements(config, lambda v: v, perfect_gain=0.0))
    verdicts = grows["verdicts"]
    assert verdicts["Table 2: reward variance / ground truth gain"] == "holds"
    assert verdicts["a perfectly accurate reward model teaches the ground truth slower than a less accurate one"] == (
        "holds"
    )
    assert verdicts["Table 1: the perfect low-variance model has lower reward variance than the ground truth"] == (
        "holds"
    )
    # Every student has the same clearly best model: the §4.2 finding does not hold.
    assert verdicts["§4.2: which reward model teaches better depends on the student (a crossing)"] == "does not hold"
    # Accuracy is random here and variance orders the gains: the map reads "variance predicts better".
    assert [c["verdict"] for c in grows["map"]] == ["variance predicts better"] * len(grows["map"])
    assert f"Bonferroni over the {len(grows['map'])} cells" in teacher.report(config, grows)
    falls = teacher.summarize(config, *_fake_measurements(config, lambda v: -v, perfect_gain=5.0))
    assert falls["verdicts"]["Table 2: reward variance / ground truth gain"] == "does not hold"
    assert falls["verdicts"][
        "a perfectly accurate reward model teaches the ground truth slower than a less accurate one"
    ] == ("does not hold")
    report = teacher.report(config, falls)
    assert "| Table 2: reward variance / ground truth gain | does not hold |" in report
    assert [c["verdict"] for c in falls["map"]] == ["accuracy predicts better"] * len(falls["map"])
    # Table 1's trend against the paper's: the variance falls with the on-policy share here (the
    # shares run from 1 down to 0 over the learned models); reversed, it rises as the paper's does.
    # In the same data the low-variance perfect model has 5x the ground truth's variance.
    trend = "Table 1: reward variance against the on-policy share"
    low = "Table 1: the perfect low-variance model has lower reward variance than the ground truth"
    assert verdicts[trend] == "does not hold"
    learned = len(config.reward_models())
    stats, results = _fake_measurements(config, lambda v: v, perfect_gain=0.0)
    for stat in stats:
        stat["reward variance"][:learned] = stat["reward variance"][:learned][::-1].copy()
        stat["reward variance per prompt"][-2] *= 25.0
    reversed_verdicts = teacher.summarize(config, stats, results)["verdicts"]
    assert reversed_verdicts[trend] == "holds" and reversed_verdicts[low] == "does not hold"
    # The perfect model tied (within the seed noise) with the best learned one, ahead of the rest;
    # the low-variance model's variance equal to the ground truth's.
    perfect = "a perfectly accurate reward model teaches the ground truth slower than a less accurate one"
    stats, results = _fake_measurements(config, lambda v: v, perfect_gain=0.8)
    for stat in stats:
        stat["reward variance per prompt"][-2] = stat["reward variance per prompt"][-1]
    tied = teacher.summarize(config, stats, results)["verdicts"]
    assert tied[perfect] == "inconclusive" and tied[low] == "inconclusive"


def test_teacher_intervals_resample_whole_reward_model_runs():
    # The two saves of every run carry the same measurements: as evidence they are one model, so
    # each interval over models is about as wide as over the distinct runs, not 1/sqrt(2) as wide.
    config = dataclasses.replace(teacher.TeacherConfig.preset("ci"), iterations=4, chunk=1, seeds=4, rm_seeds=2)
    stats, results = _fake_measurements(config, lambda v: v + np.sin(9 * v), perfect_gain=0.0)
    specs = config.reward_models()
    runs = [spec.run for spec in specs]
    first = np.array([runs.index(run) for run in runs])  # each save's run, by its first save
    for stat, result in zip(stats, results):
        for name in ("reward variance", "on-policy accuracy", "off-policy accuracy"):
            stat[name][: len(first)] = stat[name][first]
        for name in ("ground_truth_reward", "proxy_reward"):
            result[name][: len(first)] = result[name][first]
    summary = teacher.summarize(config, stats, results)
    distinct = np.unique(first)
    variance = np.asarray(stats[0]["reward variance"])
    gain = teacher.teacher_gains(config, stats[0], results[0])[1]
    shares = np.array([spec.fraction for spec in specs])
    accuracy = np.asarray(stats[0]["on-policy accuracy"])
    with_perfect = np.append(distinct, len(specs))
    pairs = [
        (summary["table2"]["reward variance / ground truth"], variance[with_perfect], gain[with_perfect]),
        (summary["table1_trends"]["on-policy accuracy"], shares[distinct], accuracy[distinct]),
        (summary["variance_accuracy"], variance[distinct], accuracy[distinct]),
    ]
    for study, x, y in pairs:
        alone = correlations(x, y, seed=0)["spearman"]
        assert study["spearman"][2] - study["spearman"][1] > 0.85 * (alone[2] - alone[1])


def test_interval_calibration_counts_the_intervals_that_exclude_zero(monkeypatch):
    from experiments import interval_calibration as calibration

    strong = lambda rng: (calibration.SHARES, calibration.SHARES + 0.01 * rng.normal(size=20))  # noqa: E731
    assert calibration.false_positive_rates(strong, datasets=3, resamples=50, seed=0) == {"runs": 1.0, "models": 1.0}
    # "runs" resamples the runs, "models" the models one by one: a fake that excludes 0 only when
    # given the runs tells the two counts apart.
    monkeypatch.setattr(
        calibration,
        "correlations",
        lambda x, y, clusters=None, **_: {"spearman": [0.0, 0.1, 0.2] if clusters is not None else [0.0, -0.1, 0.1]},
    )
    assert calibration.false_positive_rates(strong, datasets=2, resamples=5, seed=0) == {"runs": 1.0, "models": 0.0}
    for arguments in (["--datasets", "0"], ["--epoch-gain", "nan"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            calibration.main(arguments)
        assert exit_.value.code == 2


def test_the_map_corrects_each_cells_difference_for_the_number_of_cells(monkeypatch):
    config = dataclasses.replace(teacher.TeacherConfig.preset("ci"), iterations=4, chunk=1, seeds=4, rm_seeds=2)
    stats, results = _fake_measurements(config, lambda v: v, perfect_gain=0.0)
    levels = []
    real = teacher.metrics.bootstrap_correlation_difference

    def recording(*args, level=0.95, **kwargs):
        levels.append(level)
        return real(*args, level=level, **kwargs)

    monkeypatch.setattr(teacher.metrics, "bootstrap_correlation_difference", recording)
    per_student = [teacher.teacher_gains(config, *pair)[1] for pair in zip(stats, results)]
    cells = teacher.correlation_map(config, stats, results, per_student)
    assert len(cells) == 4 and levels == [1 - 0.05 / 4] * 4


def test_a_crossing_of_two_models_between_students_makes_section_4_2_hold():
    config = dataclasses.replace(teacher.TeacherConfig.preset("ci"), iterations=4, chunk=1, seeds=4, rm_seeds=2)
    learned = len(config.reward_models())
    stats, results = _fake_measurements(config, lambda v: v, perfect_gain=0.0)
    gain = lambda result: result["ground_truth_reward"][..., -1]  # noqa: E731
    # Student 1: the two best models of student 0 swap places, far beyond the seed noise.
    swapped = results[1]["ground_truth_reward"].copy()
    swapped[[learned - 1, learned - 2]] = swapped[[learned - 2, learned - 1]]
    swapped[learned - 2] += 0.5
    results[1] = {**results[1], "ground_truth_reward": swapped}
    assert np.argmax(gain(results[0])[:learned].mean(-1)) != np.argmax(gain(results[1])[:learned].mean(-1))
    section = teacher.summarize(config, stats, results)["section_4_2"]
    assert section["verdict"] == "holds"
    names = config.teacher_names()
    assert {"model": names[learned - 1], "other": names[learned - 2], "better_for": 0, "worse_for": 1} in section[
        "crossings"
    ]
    # Two models tied within the noise for one student are no crossing: the verdict cannot hold.
    tied = results[1]["ground_truth_reward"].copy()
    tied[learned - 2] = results[0]["ground_truth_reward"][learned - 1] + 0.02 * np.arange(config.seeds)[:, None]
    results[1] = {**results[1], "ground_truth_reward": tied}
    assert teacher.summarize(config, stats, results)["section_4_2"]["verdict"] == "inconclusive"


def test_noisy_labels_follow_the_bradley_terry_probability():
    task = TopicTask()
    rng = np.random.default_rng(3)
    prompts = task.prompts(4000, rng)
    first, second = task.off_policy_responses(prompts, rng), task.off_policy_responses(prompts, rng)
    exact = teacher.label_pairs(task, prompts, first, second)
    noisy = teacher.label_pairs(task, prompts, first, second, noise=0.1, rng=np.random.default_rng(4))
    assert np.array_equal(exact[3], noisy[3])  # the same ties are dropped
    ones = jnp.ones(first.shape, bool)
    a = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(first), ones))[exact[3]]
    b = np.asarray(task.ground_truth(None, jnp.asarray(prompts), None, jnp.asarray(second), ones))[exact[3]]
    agrees = np.all(noisy[1] == exact[1], axis=1)
    expected = 1 / (1 + np.exp(-np.abs(a - b) / 0.1))  # P(the label follows the ground truth)
    assert abs(agrees.mean() - expected.mean()) < 3 * np.sqrt(expected.mean() * (1 - expected.mean()) / len(a))
    assert 0.6 < agrees.mean() < 0.95


def test_gains_compare_the_last_pass_with_the_initial_policy():
    config = dataclasses.replace(teacher.TeacherConfig.preset("ci"), iterations=8, chunk=2)  # cycle of 4
    stats = {"mean": np.array([1.0]), "std": np.array([2.0]), "initial reward": np.array([3.0])}
    stats["initial ground truth"] = 0.25
    curve = np.arange(8.0)[None, None, :]  # [teachers, seeds, iterations]
    proxy, truth = teacher.teacher_gains(config, stats, {"proxy_reward": curve, "ground_truth_reward": curve})
    # The last 4 iterations average 5.5: normalised (5.5 - 1) / 2 minus (3 - 1) / 2.
    assert proxy.shape == (1, 1) and float(proxy[0, 0]) == pytest.approx(1.25)
    assert float(truth[0, 0]) == pytest.approx(5.25)


def test_compare_to_reference_is_welch_with_bonferroni():
    from scipy import stats

    from jaxrm.studies import compare_to_reference

    rng = np.random.default_rng(5)
    reference, others = rng.normal(0, 1, 6), rng.normal([[3.0], [0.0], [-3.0]], 1, (3, 5))
    out = compare_to_reference(reference, others, level=0.9)
    assert out["better"] == [0] and out["worse"] == [2] and out["level"] == pytest.approx(1 - 0.1 / 3)
    # The middle interval is scipy's Welch interval at the corrected level.
    welch = stats.ttest_ind(others[1], reference, equal_var=False).confidence_interval(1 - 0.1 / 3)
    assert out["low"][1] == pytest.approx(welch.low) and out["high"][1] == pytest.approx(welch.high)
    # Two groups without spread (a policy collapsed to one output on every seed) measure no noise.
    flat = compare_to_reference([1.0, 1.0], [[1.001, 1.001], [1.0, 3.0]])
    assert np.isnan(flat["low"][0]) and flat["better"] == [] and flat["worse"] == []


def test_a_diverged_rlhf_run_stops_the_study_with_a_report_that_names_it(tmp_path, monkeypatch):
    config = dataclasses.replace(teacher.TeacherConfig.preset("ci"), iterations=4, chunk=1, seeds=2)
    names = ["a", "b"]

    def fake_rlhf(*args, **kwargs):
        curve = np.zeros((2, 2, 4))
        curve[1, 0, 2:] = np.nan  # teacher b, seed 0, from iteration 2 on
        iteration = np.broadcast_to(np.arange(1, 5), curve.shape)
        return None, {"proxy_reward": curve, "ground_truth_reward": curve, "kl": curve, "iteration": iteration}

    monkeypatch.setattr(teacher, "run_rlhf", fake_rlhf)
    with pytest.raises(teacher.DivergedRuns, match="1 of 4 RLHF runs diverged"):
        teacher.run_students(
            config,
            TopicTask(),
            [None],
            None,
            None,
            [{"mean": np.zeros(2), "std": np.ones(2)}],
            tmp_path,
            print,
            teacher_names=names,
        )
    assert json.loads((tmp_path / "summary.json").read_text())["diverged_runs"] == [
        {"student": 0, "teacher": "b", "seed": 0, "iteration": 3}
    ]
    assert "| 0 | b | 0 | 3 |" in (tmp_path / "report.md").read_text()


def test_one_student_reports_no_resampling_share():
    config = dataclasses.replace(
        teacher.TeacherConfig.preset("ci"), iterations=4, chunk=1, seeds=4, rm_seeds=2, student_sharpness=(1.5,)
    )
    stats, results = _fake_measurements(config, lambda v: v, perfect_gain=0.0)
    summary = teacher.summarize(config, stats, results)
    assert summary["section_4_2"]["same_best_probability"] is None
    report = teacher.report(config, summary)
    assert "With one student there is nothing to compare." in report and "% of resamples" not in report
    assert "mean ± std (ddof 1) over 4 seeds" in report
    truth = teacher.teacher_gains(config, stats[0], results[0])[1]
    np.testing.assert_allclose(summary["ground_truth_gain_spread"], truth.std(-1, ddof=1))


def test_paradox_smoke_run_reports_every_checkpoint(tmp_path):
    config = paradox.ParadoxConfig.preset("ci")
    summary = paradox.run(tmp_path, config, log=lambda line: None)
    steps, runs = summary["steps"], summary["run"]
    assert len(summary["runs"]) == len(config.training_runs()) == 1
    assert steps == sorted(steps) and steps[0] >= 1 and len(steps) == len(summary["ground_truth_at_stop"]) >= 3
    assert runs == [0] * len(steps)
    assert all(0 <= a <= 1 for a in summary["accuracy"])
    (verdict,) = summary["run_verdicts"]
    assert verdict["most_accurate_accuracy"] == max(summary["accuracy"])
    assert (
        0.9 * config.eval_prompts * config.eval_samples
        <= summary["held_out_pairs"]
        <= config.eval_prompts * config.eval_samples
    )
    assert all(1 <= s <= config.iterations for s in summary["stop_iteration"])
    report = (tmp_path / "report.md").read_text()
    assert f"**{summary['verdict']}**" in report and (tmp_path / "figures" / "paradox.png").exists()
    _assert_outputs_were_checked(tmp_path, config)
    low, high = summary["correlations"]["accuracy"]["spearman"][1:]
    assert -1 <= low <= high <= 1 and "accuracy " in report
    assert sum(summary["budget_unreached_per_save"]) == summary["budget_unreached"]
    assert paradox._reached_text(summary) in report and paradox._difference_text(summary) in report
    # The texts follow the data: a zero-width difference is not an interval, and the saves whose
    # every seed reached the budget are counted and correlated on their own.
    altered = {**summary, "variance_minus_accuracy": [0.0, 0.0, 0.0]}
    assert "not resolved" in paradox._difference_text(altered)
    altered = {**summary, "budget_unreached": 2, "saves_budget_reached": 1, "correlations_budget_reached": None}
    assert paradox._reached_text(altered).startswith(f"Only 1 of {len(steps)} saves reached the budget")
    altered["saves_budget_reached"], altered["correlations_budget_reached"] = 3, summary["correlations"]
    assert paradox._reached_text(altered).startswith(f"Over the 3 of {len(steps)} saves that reached the budget")
    assert paradox._reached_text({**summary, "budget_unreached": 0}) == "Every run reached the KL budget."


def _nested_correct(accuracies, pairs=400):
    """``[saves, pairs]`` correctness with the given accuracies, each save's correct pairs a subset
    of the next more accurate save's (so that their paired differences are clear)."""
    return np.arange(pairs)[None, :] < np.round(np.asarray(accuracies) * pairs)[:, None]


def test_paradox_verdicts_follow_the_outcomes():
    saves = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    correct = _nested_correct([0.5, 0.6, 0.7, 0.5, 0.6, 0.7])
    monotone = np.array([[0.0, 0.01], [1.0, 1.01], [2.0, 2.01]] * 2)
    verdicts = paradox.run_verdicts(saves, correct, monotone, runs=2)
    assert all(v["beats_all"] and not v["beaten_by_steps"] for v in verdicts)
    assert paradox.overall_verdict(verdicts) == "does not hold"
    moderate = monotone[[0, 2, 1, 0, 1, 2]]  # run 0: the middle save teaches best
    verdicts = paradox.run_verdicts(saves, correct, moderate, runs=2)
    assert verdicts[0]["beaten_by_steps"] == [2] and verdicts[0]["best_accuracy_rank"] == 2
    assert verdicts[0]["less_accurate_steps"] == [1, 2]
    assert paradox.overall_verdict(verdicts) == "holds"
    # A better teacher whose accuracy is within the held-out noise of the most accurate one is no
    # case of the paradox.
    close = _nested_correct([0.5, 0.695, 0.7, 0.5, 0.6, 0.7])
    verdicts = paradox.run_verdicts(saves, close, moderate, runs=2)
    assert verdicts[0]["better_steps"] == [2] and verdicts[0]["beaten_by_steps"] == []
    assert paradox.overall_verdict(verdicts) == "inconclusive"
    noisy = monotone + np.array([[0.0, 5.0]] * 6)
    assert paradox.overall_verdict(paradox.run_verdicts(saves, correct, noisy, runs=2)) == "inconclusive"
    # 6 of 400 pairs apart (t = 2.47): below 0 at the 95% level of one comparison, not once
    # corrected over the runs and every pair of a run's saves (z = 2.64).
    corrected = _nested_correct([0.5, 0.685, 0.7, 0.5, 0.6, 0.7])
    verdicts = paradox.run_verdicts(saves, corrected, moderate, runs=2)
    assert verdicts[0]["less_accurate_steps"] == [1] and verdicts[0]["beaten_by_steps"] == []


def test_the_stop_at_a_kl_budget_reads_the_smoothed_curves():
    kl, truth = np.arange(5.0), 10 * np.arange(5.0)
    # (smoothed ground truth at the stop, the stop's last iteration index, whether it was reached)
    assert paradox._stop_at_budget(kl, truth, 2.0, 1) == (20.0, 2, True)
    assert paradox._stop_at_budget(kl, truth, 2.0, 2) == (25.0, 3, True)  # windows end at 1.5, 2.5
    assert paradox._stop_at_budget(kl, truth, 10.0, 2) == (35.0, 4, False)  # unreached: the last window


def test_checkpoint_steps_are_spread_and_end_at_the_total():
    assert paradox.checkpoint_steps(100, 5) == [1, 3, 10, 32, 100]
    assert paradox.checkpoint_steps(3, 10) == [1, 2, 3]


def test_a_local_pythia_style_checkpoint_is_the_starting_policy(tmp_path):
    checkpoint = save_tiny_gpt_neox(tmp_path / "pythia-like", vocab_size=64)
    config = config_with_overrides(teacher.TeacherConfig.preset("ci"), [f"policy_checkpoint={checkpoint}"])
    (student, _) = teacher.train_students(config, TopicTask(), tmp_path / "run", log=lambda line: None)
    assert student.config.vocab_size == 64 and student.config.hidden_size == 32
    assert (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match="has no config.json"):
        config_with_overrides(teacher.TeacherConfig.preset("ci"), [f"policy_checkpoint={tmp_path}"])
    with pytest.raises(ValueError, match="unknown preset"):
        teacher.TeacherConfig.preset("gpu")


@pytest.mark.parametrize("study", [teacher, paradox])
def test_help_names_the_command_and_every_config_key(study, capsys):
    with pytest.raises(SystemExit):
        study.main(["--help"])
    out = capsys.readouterr().out
    assert f"python -m experiments.{study.__name__.split('.')[-1]}" in out
    config_cls = teacher.TeacherConfig if study is teacher else paradox.ParadoxConfig
    for field in dataclasses.fields(config_cls):
        assert f"\n{field.name} (default " in out


def test_sign_verdicts_follow_the_interval_and_the_paper():
    strong_positive, no_relation, strong_negative = (0.83, 0.71), (-0.28, 0.2), (-0.93, -0.94)
    assert sign_verdict([0.6, 0.1, 0.9], strong_positive) == "holds"
    assert sign_verdict([-0.6, -0.9, -0.1], strong_positive) == "does not hold"
    assert sign_verdict([0.3, -0.2, 0.8], strong_positive) == "inconclusive"
    assert sign_verdict([-0.7, -0.9, -0.2], strong_negative) == "holds"
    assert sign_verdict([0.1, -0.5, 0.6], no_relation) == "consistent"
    assert sign_verdict([-0.6, -0.9, -0.3], no_relation) == "a negative relation the paper did not find"
    assert sign_verdict([0.6, 0.1, 0.9], (0.45, 0.9)) == "a positive relation the paper did not find"


def test_the_best_teacher_under_seed_resampling():
    rng = np.random.default_rng(0)
    clear = np.array([[1.0, 1.1, 0.9], [0.0, 0.1, -0.1], [0.2, 0.3, 0.1]])  # teacher 0 always best
    flipped = clear[[1, 0, 2]]  # teacher 1 always best
    best = teacher.best_under_seed_resampling([clear, flipped], rng, num_resamples=200)
    assert best.shape == (200, 2) and np.all(best[:, 0] == 0) and np.all(best[:, 1] == 1)
    tied = np.array([[0.0, 1.0, 0.5], [0.5, 0.0, 1.0], [-1.0, -1.0, -1.0]])  # two teachers with equal means
    share = np.bincount(teacher.best_under_seed_resampling([tied], rng)[:, 0], minlength=3) / 2000
    assert 0.35 < share[0] < 0.65 and share[2] == 0
