import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm import bounds, flow, metrics
from jaxrm.studies import config_from_dict, share_interval
from jaxrm.tabular import AutoregressiveTabularPolicy
from theory import best_of_n, common, estimators, theorem1, theorem2, theorem3, tightness
from theory.__main__ import QUICK_XLA_FLAG, STUDIES, _quick_compiles, main
from theory.common import general_policy_passage, general_text, loglog_slope, violating_rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The whole main job at smoke-test size, once for every test below."""
    out = tmp_path_factory.mktemp("theory")
    status = main(["--quick", "--out", str(out)])
    return status, out, {name: json.loads((out / f"{name}.json").read_text()) for name in STUDIES}


@pytest.mark.slow
def test_every_study_reports_instances_violations_and_a_verdict(quick_run):
    status, out, summaries = quick_run
    assert status == 0
    report = (out / "report.md").read_text()
    for name, summary in summaries.items():
        assert summary["instances"] > 0 and summary["censored"] >= 0
        assert all(count == 0 for count in summary["violations"].values()), (name, summary["violations"])
        assert summary["verdict"] in report and summary["quick"] is True
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    assert report.splitlines()[2].startswith("**Quick run**")
    for path in out.rglob("*"):  # results are for sharing: readable by others, not 0600
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_theorem1_saves_each_violated_ratio_inequality_with_its_point():
    """A gradient norm or variance rate above its bound is saved like a timing below one, with
    where it was measured; NaN (not measured) and ratios within the tolerance are not."""
    family = theorem1.Family(
        name="f",
        policy=None,
        logits=np.zeros((2, 1, 3)),
        rm_rewards=np.ones((2, 1, 3)),
        gt_rewards=np.ones((2, 1, 3)),
        rm_gamma=np.ones((2, 1)),
        gt_gamma=np.ones((2, 1)),
        kl_coef=np.array([0.0, 0.5]),
    )
    timing = {"t_gamma": np.ones((2, 1)), "theorem4": np.full((2, 1), 0.5)}
    ratios = {
        "gradient_prop2": np.array([[[0.9], [np.nan]], [[1.0 + 1e-9], [1.5]]]),
        "gradient_sqrt": np.full((2, 2, 1), 0.5),
        "variance_rate": np.array([[0.1, 0.2], [2.0, np.nan], [0.3, 0.4]]),
        "prop2_rate": np.zeros((3, 2)),
    }
    saved = theorem1._violating_instances(family, {"gt": timing, "rm": timing, "ratios": ratios}, 1e-6)
    found = {(v["bound"], v["point"], v["problem"], v["prompt"]) for v in saved}
    assert found == {("gradient_prop2", "ground-truth target", 1, 0), ("variance_rate", "proxy target", 0, None)}
    assert [v["kl_coef"] for v in saved] == [0.5, 0.0]


@pytest.mark.slow
def test_theorem1_quick_run_writes_the_promised_outputs(quick_run):
    status, out, summaries = quick_run
    summary = summaries["theorem1"]
    assert summary["instances"] == 8 * 8 + 32 * 2 + 64 + 64 + 64
    assert summary["violations"] == dict.fromkeys(
        (
            "theorem4",
            "prop3",
            "sharpened",
            "gradient_prop2",
            "gradient_sqrt",
            "variance_rate",
            "prop2_rate",
            "lam_gain",
        ),
        0,
    )
    assert set(summary["families"]) == {"scaled", "random", "kl_0.5", "kl_0.5_fixed", "shared_L3"}
    # The same instances, with the ground-truth gain absolute instead of a share of the offer.
    share, fixed = summary["families"]["kl_0.5"], summary["families"]["kl_0.5_fixed"]
    assert fixed["instances"] == share["instances"] and fixed["no_ground_truth_gain"] > share["no_ground_truth_gain"]
    # The shared-parameter class: J is Phi's largest block norm, and its targets are reachable.
    assert summary["families"]["shared_L3"]["length"] == 3 and summary["families"]["shared_L3"]["censored"]["rm"] == 0
    for family in summary["families"].values():
        assert family["n"] > 0 and family["variance_decades"] >= 6
        lo, hi = family["slope_ci"]
        assert lo <= family["slope"] <= hi
    # The scaled teacher is a time rescaling: slope -1/2 exactly, within each base problem.
    assert summary["families"]["scaled"]["slope"] == pytest.approx(-0.5, abs=1e-6)
    assert 0 < summary["grad_bound"]["max_ratio_prop2"] <= 1
    assert 0 < summary["grad_bound"]["max_ratio_sqrt"] <= 1
    assert all(r >= 1 for r in summary["min_ratio"].values())
    # The archive re-solves an instance: the shared-parameter family's, from its policy's stored fields.
    from jaxrm import tabular

    stored = np.load(out / "theorem1_all_instances.npz")
    policy = getattr(tabular, str(stored["shared_L3/input_policy_class"]))(
        features=stored["shared_L3/input_policy_features"], length=int(stored["shared_L3/input_policy_length"])
    )
    timed = int(np.flatnonzero(np.isfinite(stored["shared_L3/rm_t_gamma"][:, 0]))[0])
    again = flow.first_passage(
        stored["shared_L3/input_logits"][timed : timed + 1],
        stored["shared_L3/input_rm_rewards"][timed : timed + 1],
        stored["shared_L3/input_rm_gamma"][timed : timed + 1],
        policy=policy,
        t_max=summary["config"]["t_max"],
        rtol=summary["config"]["rtol"],
        atol=summary["config"]["atol"],
    )
    assert float(again.t_gamma[0, 0]) == pytest.approx(float(stored["shared_L3/rm_t_gamma"][timed, 0]), rel=1e-6)
    for name in ("theorem1.md", "report.md", "figures/theorem1.png", "theorem1_all_instances.npz"):
        assert (out / name).stat().st_size > 0
    assert "Verdict" in (out / "report.md").read_text()


def test_violations_are_counted_and_saved():
    fake = {
        "gt": {
            "t_gamma": np.array([[1.0, np.inf]]),
            "theorem4": np.array([[2.0, 1.0]]),
            "prop3": np.array([[0.5, 0.5]]),
            "sharpened": np.array([[0.5, 0.5]]),
            "gamma": np.array([[0.1, 0.1]]),
            "status": np.array([[1, 2]]),
        },
        "rm": {
            "t_gamma": np.array([[3.0, 3.0]]),
            "theorem4": np.array([[1.0, 1.0]]),
            "prop3": np.array([[4.0, 1.0]]),
            "sharpened": np.array([[1.0, 1.0]]),
            "gamma": np.array([[0.1, 0.1]]),
            "status": np.array([[1, 1]]),
        },
    }
    found = theorem1._violations(fake, 1e-6)
    assert found["theorem4"].tolist() == [[True, False]]
    assert found["prop3"].tolist() == [[True, False]]
    assert not found["sharpened"].any()


def test_a_failed_solve_is_neither_censored_nor_fitted_and_can_leave_a_bound_undecided():
    from types import SimpleNamespace

    reached, censored, failed = flow.Status.REACHED, flow.Status.NOT_REACHED, flow.Status.FAILED
    config = theorem1.Theorem1Config(t_max=1e3)

    def timing(status, t_end):
        return {
            "gamma": np.full((1, 5), 0.1),
            "t_gamma": np.array([[1.0, 2.0, 4.0, np.inf, np.inf]]),
            "status": np.array([status]),
            "t_end": np.array([t_end]),
            **{bound: np.full((1, 5), 0.5) for bound in ("theorem4", "prop3", "sharpened")},
        }

    result = {
        "variance": np.array([[1.0, 0.5, 0.25, 0.1, 0.2]]),
        "kl_coef": np.zeros((1, 5)),
        # The failed solve stopped at 0.1, below its bounds (0.5): it can neither meet nor break them.
        "gt": timing([reached, reached, reached, censored, failed], [1.0, 2.0, 4.0, 1e3, 0.1]),
        "rm": timing([reached, reached, reached, reached, reached], [1.0, 2.0, 4.0, 1.0, 1.0]),
        **dict.fromkeys(("max_ratio_prop2", "max_ratio_sqrt", "max_ratio_variance_rate", "max_ratio_prop2_rate"), 0.5),
    }
    result["rm"]["t_gamma"] = np.array([[1.0, 2.0, 4.0, 1.0, 1.0]])
    family = SimpleNamespace(policy=SimpleNamespace(length=1, jacobian_norm=1.0))
    summary = theorem1._family_summary(family, result, config)
    assert summary["censored"] == {"gt": 1, "rm": 0} and summary["failed"] == {"gt": 1, "rm": 0}
    assert summary["inconclusive"] == 1
    assert summary["censored_fit"]["censored"] == 1 and summary["censored_fit"]["reached"] == 3


def test_unreached_solves_split_into_censored_and_failed_ones():
    from theory.common import unreached

    split = unreached(np.array([1, 2, 3, 3]), np.array([1.0, 5.0, 0.1, 9.0]), np.ones(4))
    assert split["censored"].tolist() == [False, True, False, False]
    assert split["failed"].tolist() == [False, False, True, True]
    assert split["undecided"].tolist() == [False, False, True, False]  # stopped at 0.1, below its bound 1
    from theory.common import beyond_upper

    # Past an upper bound of 2: reached at 5, censored, failed at 3; not: failed at 0.5, reached at 1.
    times, ends = np.array([5.0, np.inf, np.inf, np.inf, 1.0]), np.array([5.0, 1e9, 3.0, 0.5, 1.0])
    assert beyond_upper(times, ends, np.array([1, 2, 3, 3, 1]), 2.0).tolist() == [True, True, True, False, False]


def test_a_study_that_raises_is_named_and_the_others_still_report(tmp_path, monkeypatch, capsys):
    import theory.__main__ as cli

    calls = []

    def fake_study(name, out, quick):
        calls.append(name)
        if name == "theorem2":
            raise RuntimeError("boom")
        summary = {"violations": {}, "verdict": f"{name} ran", "seconds": 0.0, "quick": quick}
        (out / f"{name}.json").write_text(json.dumps(summary))
        (out / f"{name}.md").write_text(f"## {name}")
        return summary

    stale = {"violations": {}, "verdict": "from an earlier run", "seconds": 1.0, "quick": True}
    (tmp_path / "theorem2.json").write_text(json.dumps(stale))
    monkeypatch.setattr(cli, "run_study", fake_study)
    status = cli.main(["--quick", "--jobs", "1", "--out", str(tmp_path), "--only", "theorem1", "theorem1", "theorem2"])
    assert status == 3 and calls == ["theorem1", "theorem2"]  # a study named twice runs once
    report = (tmp_path / "report.md").read_text()
    assert "theorem1 ran" in report and "from an earlier run" not in report
    assert "**Failed in this run**, left out of this report: theorem2 (RuntimeError: boom)." in report
    assert "boom" in capsys.readouterr().err


def test_a_violations_file_belongs_to_the_run_that_wrote_it(tmp_path):
    from jaxrm.studies import Progress, save_violations

    save_violations(tmp_path, "study", [{"problem": 3}], progress=Progress("study"))
    assert json.loads((tmp_path / "study_violations.json").read_text()) == [{"problem": 3}]
    save_violations(tmp_path, "study", [], progress=Progress("study"))
    assert not (tmp_path / "study_violations.json").exists()


def test_cluster_bootstrap_resamples_whole_clusters():
    from jaxrm.studies import cluster_bootstrap

    # 40 clusters of 10 equal units: as wide as a bootstrap of the 40 cluster values alone, about
    # sqrt(10) times wider than one that took the 400 units as independent.
    values = np.repeat(np.random.default_rng(0).normal(size=40), 10)
    estimate, low, high = cluster_bootstrap(lambda index: values[index].mean(), np.repeat(np.arange(40), 10), seed=0)
    assert estimate == pytest.approx(values.mean())
    expected = 2 * 1.96 * values[::10].std() / np.sqrt(40)
    assert 0.8 * expected < high - low < 1.2 * expected
    with pytest.raises(ValueError, match="at least 2 clusters"):
        cluster_bootstrap(lambda index: 0.0, np.zeros(5), seed=0)


def test_correlations_over_clusters_resample_whole_clusters_then_seeds():
    from jaxrm.studies import correlations

    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    outcome = x[:, None] + rng.normal(size=(30, 4))
    width = lambda interval: interval[2] - interval[1]  # noqa: E731
    independent = correlations(x, outcome, seed=0)["spearman"]
    singletons = correlations(x, outcome, seed=0, clusters=np.arange(30))["spearman"]
    assert singletons[0] == pytest.approx(independent[0])
    assert abs(width(singletons) - width(independent)) < 0.15 * width(independent)
    # Every model saved twice: the pair is one unit of evidence, so the interval stays as wide as
    # the 30 models' rather than narrowing as if there were 60.
    copies = np.repeat(x, 2), np.repeat(outcome, 2, axis=0)
    paired = correlations(*copies, seed=0, clusters=np.repeat(np.arange(30), 2))["spearman"]
    assert abs(width(paired) - width(singletons)) < 0.2 * width(singletons)
    assert width(correlations(*copies, seed=0)["spearman"]) < 0.85 * width(paired)
    # The seeds' spread counts: seed means in the order of x, but seeds far apart.
    noisy = np.arange(10.0)[:, None] + 20 * np.array([1.0, -1.0, 0.5, -0.5])
    ordered = correlations(np.arange(10.0), noisy, seed=0, clusters=np.arange(10) // 2)["spearman"]
    assert ordered[0] == pytest.approx(1.0) and ordered[1] < 0.5
    # A constant property has no correlation (0.1 is not exact in binary: its mean is not 0.1).
    assert all(np.isnan(correlations(np.full(6, 0.1), np.arange(6.0), seed=0, clusters=np.arange(6) // 2)["pearson"]))
    with pytest.raises(ValueError, match="finite"):
        correlations(np.arange(6.0), np.array([0, 1, 2, np.nan, 4, 5]), seed=0, clusters=np.arange(6) // 2)


def test_config_is_validated_by_name():
    with pytest.raises(ValueError, match="scaled_gamma"):
        theorem1.Theorem1Config(scaled_gamma=2.0)
    with pytest.raises(ValueError, match="unknown Theorem1Config key"):
        config_from_dict(theorem1.Theorem1Config, {"seeds": 3})


def test_loglog_slope_recovers_power_laws():
    rng = np.random.default_rng(0)
    x = 10 ** rng.uniform(-6, 0, 400)
    slope, (lo, hi) = loglog_slope(x, 2 * x**-0.4 * np.exp(rng.normal(0, 0.1, 400)))
    assert lo < -0.4 < hi and hi - lo < 0.02
    t_slope, (t_lo, t_hi) = loglog_slope(x, 2 * x**-0.4 * np.exp(rng.normal(0, 0.1, 400)), interval="t")
    assert t_lo < -0.4 < t_hi and t_hi - t_lo < 0.02
    groups = np.repeat(np.arange(40), 10)
    y = np.exp(rng.normal(0, 3, 40))[groups] * x**-0.5
    assert loglog_slope(x, y, groups=groups)[0] == pytest.approx(-0.5)
    # Few groups: the mean of their own slopes with a t-interval; a group without two distinct x
    # has no slope and is left out rather than making everything NaN.
    noisy = y * np.exp(rng.normal(0, 0.05, 400))
    slope, (lo, hi) = loglog_slope(x[:40], noisy[:40], groups=groups[:40], interval="group-t")
    assert lo < slope < hi and abs(slope + 0.5) < 0.01 and hi - lo < 0.05
    lone = np.concatenate([groups[:40], [99]])
    with_lone = loglog_slope(np.append(x[:40], 0.5), np.append(noisy[:40], 3.0), groups=lone, interval="group-t")
    assert with_lone == (slope, (lo, hi))


def test_share_interval_is_wilsons_and_refuses_impossible_counts():
    import scipy.stats

    for successes, trials in ((0, 10), (3, 10), (126, 128), (128, 128), (44, 120)):
        expected = scipy.stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
        assert share_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert share_interval(3, 10, level=0.5)[1] < share_interval(3, 10)[1]
    for successes, trials in ((5, 4), (-1, 4), (0, 0), (1.5, 4)):
        with pytest.raises(ValueError, match="successes <= trials"):
            share_interval(successes, trials)


def test_teacher_comparisons_are_counted_per_problem_with_intervals():
    # Per problem: the unshuffled fast and slow teachers without KL count; a shuffled or
    # KL-penalized teacher does not, and an unreached slow teacher loses.
    rows = []  # (kind, T, fraction, lam, t_gamma)
    for fast_time, slow_times in ((5.0, (1.0, np.inf)), (5.0, (9.0, 9.0))):
        rows += [("fast", np.nan, 0, 0.0, fast_time)]
        rows += [("slow", h, 0, 0.0, s) for h, s in zip((1, 10), slow_times)]
        rows += [("fast", np.nan, 0.5, 0.0, 0.1), ("slow", 1, 0.5, 0.0, 99.0)]  # shuffled: would win at T = 1
        rows += [("fast", np.nan, 0, 0.1, 0.1), ("slow", 1, 0, 0.1, 99.0), ("slow", 10, 0, 0.1, 99.0)]  # with KL
    kind, horizon, fraction, lam, time = (np.array(column) for column in zip(*rows))
    t = {"kind": kind, "horizon": horizon.astype(float), "fraction": fraction, "lam": lam.astype(float)}
    counts = theorem2._fast_beats_accurate_slow(t, time.astype(float), (1, 10))["fast_beats_accurate_slow_counts"]
    assert counts == {"1": [1, 2], "10": [2, 2]}

    counts = {"1": [70, 128], "10": [126, 128], "100": [128, 128]}
    text = theorem2._wins_text(counts)
    assert text.startswith("from `T = 10` on") and "at least 126 of 128 problems (98.4%, 95% CI 94.4-99.6%)" in text
    # The fewest wins are looked for at every T from there on, not only at the first.
    assert "at least 122 of 128" in theorem2._wins_text({"1": [70, 128], "10": [128, 128], "100": [122, 128]})
    counts["10"] = [100, 128]  # a dip: the claim starts after it
    assert theorem2._wins_text(counts).startswith("from `T = 100` on")
    counts["100"] = [120, 128]
    assert "short of 95%" in theorem2._wins_text(counts) and "120 of 128" in theorem2._wins_text(counts)

    # Median growth: t = c_problem T^2 exactly, so every resample has slope 2; then noise widens it.
    horizons = (1, 10, 100)
    problem = np.repeat(np.arange(20), 3)
    grid = {"problem": problem, "horizon": np.tile(horizons, 20)}
    scale = np.random.default_rng(0).uniform(1, 5, 20)[problem]
    growth = theorem2._median_growth(grid, scale * grid["horizon"] ** 2.0, np.ones(60, bool), horizons, seed=0)
    assert growth["slope"] == pytest.approx(2) and growth["ci"] == pytest.approx([2, 2])
    noisy = scale * grid["horizon"] ** 2.0 * np.random.default_rng(1).lognormal(0, 1, 60)
    growth = theorem2._median_growth(grid, noisy, np.ones(60, bool), horizons, seed=0)
    assert growth["ci"][0] < growth["slope"] < growth["ci"][1] and growth["ci"][1] - growth["ci"][0] > 0.05
    # A second, identical row per problem changes no median of a resample of whole problems.
    twice = {"problem": np.repeat(problem, 2), "horizon": np.repeat(grid["horizon"], 2)}
    assert theorem2._median_growth(twice, np.repeat(noisy, 2), np.ones(120, bool), horizons, seed=0) == growth

    # Theorem 3: problem 0 wins both its cases, problem 1 loses one of its two.
    cells = {
        "problem": np.repeat([0, 1], 4),
        "horizon": np.tile([10, 10, 100, 100], 2),
        "family": np.array(["Pi"] * 8),
        "lam": np.zeros(8),
        "fast": np.tile([True, False], 4),
    }
    decided = theorem3._student_decides(cells, np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 2.0]))
    assert decided["student_decides_counts"] == {"cases": [3, 4], "problems": [1, 2]}
    text = theorem3._decides_text({"student_decides_counts": {"cases": [95, 96], "problems": [7, 8]}}, "draws")
    assert "95 of 96 (problem, T, student, lam) cases (99%)" in text and "7 of 8 draws (87.5%, 95% CI" in text


@pytest.mark.slow
def test_small_atlas_searches_every_level_on_its_own(quick_run):
    """Each level has its own searches: they improve on their first generation, every start
    runs, the minimizers respect the bounds, and the envelope is fitted with an interval."""
    atlas = quick_run[2]["tightness"]["classes"]
    assert set(atlas) == {"autoregressive_L2"}
    c = atlas["autoregressive_L2"]
    assert c["starts"] == list(tightness.START_NAMES)
    assert all(ratio >= 1 for ratio in c["min_ratio"].values()), c["min_ratio"]
    assert c["min_ratio"]["theorem4"] > c["min_ratio"]["sharpened"]
    lo, hi = c["envelope_slope_ci"]
    assert lo <= c["envelope_slope"] <= hi
    traces = [level["best_by_generation"] for level in c["levels"]]
    assert any(trace[-1] < trace[0] for trace in traces), traces  # the second generation improved somewhere
    # Every instance is solved once: the elites are kept, not solved again.
    assert all(level["evaluated"] == 5 * 6 * 2 and "found_by" in level for level in c["levels"])
    assert c["evaluated"] == 5 * 6 * 2 * 3


def test_atlas_reference_instance_has_the_closed_form_time():
    """docs/theory.md#the-tightness-atlas: two outputs at 1/2, r_RM = (a, -a), r = (1, -1)."""
    a, gamma = 1e-3, 0.1
    p = (1 + gamma) / 2
    closed = (-1 / p + 1 / (1 - p) + 2 * np.log(p / (1 - p))) / (4 * a)
    t = flow.first_passage(np.zeros((1, 2)), np.array([[a, -a]]), gamma, eval_rewards=np.array([[1.0, -1.0]]))
    assert float(t.t_gamma[0]) == pytest.approx(closed, rel=1e-6)
    ratio = closed / bounds.proposition_a_lower_bound(gamma, a**2)
    assert ratio == pytest.approx(tightness.reference_scaled_time(gamma), rel=1e-12)


def test_atlas_decodes_instances_at_their_variance_level():
    config = tightness.TightnessConfig()
    cls = tightness.policy_classes(0, ("autoregressive_L2",))[0]
    rng = np.random.default_rng(1)
    for start in tightness.START_NAMES:
        for variance in (1e-2, 1e-6):
            direction = rng.normal(size=(config.population, cls.num_params))
            z = tightness._first_generation(cls, start, 9, variance, direction, rng, config)
            found = tightness._decode(cls, start, z, direction, variance, config)
            ok = found.feasible
            assert ok.any(), (start, variance)
            np.testing.assert_allclose(metrics.reward_variance(found.log_probs[ok], found.rm[ok]), variance, rtol=1e-9)
            assert np.all(np.abs(found.timed) <= 1) and np.all(np.abs(found.rm[ok]) <= 1)
            # The starts' temperatures hit their targets, unless the direction cannot (a near
            # tie at the mode) within the bracket of the bisection, whose top is then returned.
            reachable = z[:, 0] < 6.0 - 1e-6
            if start in ("peaked", "free_peaked"):  # the mode holds all but 2 v
                off_mode = np.exp(tightness._off_mode_mass(found.log_probs))
                np.testing.assert_allclose(off_mode[reachable], 2 * variance, rtol=1e-6)
                assert reachable.mean() > 0.5 and np.all(off_mode[~reachable] > 2 * variance)
            if start == "rare_outputs":  # the least likely output has probability v / 10
                smallest = np.exp(found.log_probs.min(-1))
                np.testing.assert_allclose(smallest[reachable], variance / 10, rtol=1e-6)
                assert reachable.mean() > 0.5


def test_rescaled_references_use_lam_zero_instances_that_stay_feasible():
    levels = np.array([1e-2, 1e-4, 1e-6])
    ratio = np.array([4.0, 2.0, 3.0, 1.0, np.inf])
    variance = np.array([1e-2, 1e-4, 1e-6, 1e-6, 1e-4])
    max_abs_rm = np.array([0.5, 0.005, 0.02, 0.0005, 0.1])
    lam_zero = np.array([True, True, True, False, True])
    level_of_row = np.array([0, 1, 2, 2, 1])
    # Level 0 (v = 1e-2): the 1e-4 instance scales up by 10 to max |r| 0.05 (feasible, ratio 2);
    # the 1e-6 one by 100 to 2 (infeasible); the lam > 0 and the unreached ones never count.
    # Level 1: the 1e-2 instance (4) scales down; the 1e-6 one up by 10 to 0.2 (3). Level 2: 2.
    references = tightness.rescaled_references(ratio, variance, max_abs_rm, lam_zero, level_of_row, levels)
    assert references == [2.0, 3.0, 2.0]


def _fake_search(t_value):
    """A tabular atlas search result: one instance per level with ``t sqrt(Var) = t_value``."""
    config = tightness.TightnessConfig(classes=("tabular",), log10_variances=(-2, -4, -6), starts=("free",))
    levels = 10.0 ** np.asarray(config.log10_variances)
    log_probs = np.full((3, 8), -np.log(8.0))
    rm = np.sqrt(levels)[:, None] * np.array([1.0, -1.0] * 4)
    instances = tightness.Instances(np.zeros((3, 8)), log_probs, rm, np.sign(rm), np.zeros(3), np.ones(3, bool))
    t = t_value / np.sqrt(levels)
    searches = [tightness.Search("free", level, 0) for level in range(3)]
    found = dict(
        instances=instances,
        t=t,
        t_end=t,
        variance=levels,
        steps=np.full(3, 10),
        failed=np.zeros(3, bool),
        resolved_failures=0,
        search=np.arange(3),
        searches=searches,
        num_outputs=8,
        trace=(t * np.sqrt(levels) / bounds.proposition_a_lower_bound(0.1, 1.0))[None],
    )
    return config, found


def test_an_atlas_instance_below_a_bound_is_saved_and_fails_the_run(tmp_path, monkeypatch):
    config, found = _fake_search(0.01)  # far faster than Proposition A allows
    monkeypatch.setattr(tightness, "search_class", lambda cls, config, progress=None: found)
    summary = tightness.run(tmp_path, config=config)
    assert summary["violations"]["sharpened"] == 3 and summary["violations"]["prop3"] == 3
    saved = json.loads((tmp_path / "tightness_violations.json").read_text())
    assert len(saved) == 3 and saved[0]["ratios"]["sharpened"] < 1 and len(saved[0]["rm_rewards"]) == 8
    assert "3 searched instances fall below a bound" in (tmp_path / "tightness.md").read_text()


def test_an_atlas_where_nothing_reached_the_gain_reports_it(tmp_path, monkeypatch):
    config, found = _fake_search(np.inf)
    monkeypatch.setattr(tightness, "search_class", lambda cls, config, progress=None: found)
    summary = tightness.run(tmp_path, config=config)  # the figure has no finite time to draw
    assert summary["censored"] == 3 and (tmp_path / "figures" / "tightness.png").stat().st_size > 0
    text = tightness._conclusion(summary)
    assert "No searched instance of tabular reached the gain at any level." in text and "inf" not in text
    assert "not measured (0 of 3 levels reached)" in (tmp_path / "tightness.md").read_text()


def test_atlas_conclusion_follows_the_measurements(tmp_path, monkeypatch):
    config, found = _fake_search(0.5)
    monkeypatch.setattr(tightness, "search_class", lambda cls, config, progress=None: found)
    summary = tightness.run(tmp_path, config=config)
    assert not (tmp_path / "tightness_violations.json").exists()
    text = tightness._conclusion(summary)
    assert (
        "No searched instance falls below" in text and "Every measured class's own-search interval reaches -1/2" in text
    )
    assert "every measured class's interval reaches -1/2" in text and "step budget" not in text
    assert "could be measured" not in text
    # A class with no slope (too few levels reached) is named, not counted as reaching anything.
    unmeasured = json.loads(json.dumps(summary))
    first = next(iter(unmeasured["classes"]))
    unmeasured["classes"][first] |= {"envelope_slope": float("nan"), "envelope_slope_ci": [float("nan")] * 2}
    unmeasured["classes"][first]["reaches_minus_third"] = None
    assert f"No envelope slope could be measured on {first}" in tightness._conclusion(unmeasured)
    unmeasured["classes"][first] |= {"best_known_slope": float("nan"), "best_known_slope_ci": [float("nan")] * 2}
    assert "reaches -1/2" not in tightness._conclusion(unmeasured)  # nothing measured, nothing claimed
    assert "no envelope slope measured" in tightness._verdict(unmeasured)  # the fake search has one class
    flatter = json.loads(json.dumps(summary))
    flatter["classes"]["tabular"] |= {"envelope_slope": -0.34, "envelope_slope_ci": [-0.36, -0.32]}
    flatter["classes"]["tabular"]["reaches_minus_third"] = True
    changed = tightness._conclusion(flatter)
    assert "reaches `Var^(-1/3)`" in changed and "differs from `Var^(-1/2)` on tabular (flatter)" in changed
    flatter["classes"]["tabular"] |= {"best_known_slope": -0.34, "best_known_slope_ci": [-0.36, -0.32]}
    assert "structure feasible only at small variance" in tightness._conclusion(flatter)
    missed = json.loads(json.dumps(summary))
    missed["classes"]["tabular"]["levels"][2]["rescaling_gap"] = 1.5
    missed["classes"]["tabular"] |= {"solver_failures": 4, "failures_possibly_faster": 1}
    altered = tightness._conclusion(missed)
    assert "tabular at 1e-6 (1.50x)" in altered and "4 solves spent their step budget" in altered


@pytest.mark.slow
def test_best_of_n_and_theorem_studies_tell_their_story(quick_run):
    summaries = quick_run[2]
    bon = summaries["best_of_n"]
    assert bon["spearman"]["accuracy_vs_bon"] > 0.8
    assert bon["spearman"]["variance_vs_pg"] > bon["spearman"]["accuracy_vs_pg"]
    for name, (low, high) in bon["spearman_interval"].items():
        assert low <= bon["spearman"][name] <= high, name
    # The paper's low-variance construction lowers the mean variance only from a raw mean away from 0.
    models, perfect = bon["models"], bon["models"]["perfect"]
    centred, offset = models[best_of_n.low_variance_name(0.0)], models[best_of_n.low_variance_name(1.0)]
    assert abs(centred["variance"] - perfect["variance"]) < 0.05 * perfect["variance"]
    assert offset["variance"] < 0.6 * perfect["variance"] and offset["pg_gain"] < perfect["pg_gain"]
    text = best_of_n._low_variance_text(bon, 16)
    assert text.count("really lower") == 1
    altered = json.loads(json.dumps(bon))
    altered["models"][best_of_n.low_variance_name(0.0)]["variance"] = 0.1
    assert best_of_n._low_variance_text(altered, 16).count("really lower") == 2
    assert summaries["theorem3"]["student_decides"] == 1.0
    cells = len(summaries["theorem3"]["config"]["horizons"]) * 2
    assert f"in every one of the {cells} (T, family) cells" in theorem3._conclusion(summaries["theorem3"])
    swapped = json.loads(json.dumps(summaries["theorem3"]))
    first = next(iter(swapped["table"].values()))
    first["median_variance"] = -1.0  # the faster or slower teacher of that cell now has the other order
    assert f"in {cells - 1} of {cells} (T, family) cells" in theorem3._conclusion(swapped)
    swapped["student_decides"] = 0.8  # the variance's record is reported, not assumed, in every branch
    assert f"in {cells - 1} of {cells} (T, family) cells" in theorem3._conclusion(swapped)
    assert "most cases but not in all" in theorem3._conclusion(swapped)
    swapped["student_decides"] = 0.4
    assert f"in {cells - 1} of {cells} (T, family) cells" in theorem3._conclusion(swapped)
    # Which of the two teachers is the less accurate is read from the summary, not assumed.
    accuracy = summaries["theorem3"]["accuracy"]
    less = "*less* accurate" if accuracy[theorem3.TEACHERS[1]] < accuracy[theorem3.TEACHERS[0]] else "no less accurate"
    other = "no less accurate" if less == "*less* accurate" else "*less* accurate"
    assert f"the {less} `r'_RM`" in theorem3._conclusion(summaries["theorem3"])
    flipped = json.loads(json.dumps(summaries["theorem3"]))
    flipped["accuracy"] = dict(zip(theorem3.TEACHERS, reversed([accuracy[name] for name in theorem3.TEACHERS])))
    assert accuracy[theorem3.TEACHERS[0]] != accuracy[theorem3.TEACHERS[1]]
    assert f"the {other} `r'_RM`" in theorem3._conclusion(flipped)
    # "Steeper than -1/2" only when the whole interval is.
    fit = {"n": 12, "slope": -0.6, "ci": [-0.8, -0.4]}
    assert "not universal" not in theorem3._slow_slope_text({"slow_slope": fit})
    assert "not universal" in theorem3._slow_slope_text({"slow_slope": fit | {"ci": [-0.7, -0.55]}})
    general = summaries["theorem3"]["general_policy"]["student_decides_counts"]["problems"]
    assert f"every case of {general[0]} of {general[1]} one-prompt draws" in summaries["theorem3"]["verdict"]
    assert f"{summaries['theorem2']['unattainable']} that cannot reach the gain" in summaries["theorem2"]["verdict"]
    best = best_of_n._most_common(["b", "a", "b", "a", "c"])
    assert best == {"names": ["a", "b"], "count": 2, "of": 5}
    assert "(a tie) is `a` and `b`, each on 2 of 5 problems" in best_of_n._most_common_text(best)
    assert "teacher is `perfect` on " in (quick_run[1] / "best_of_n.md").read_text()
    assert summaries["theorem2"]["fast_beats_accurate_slow"]["10000"] == 1.0
    for name, per_problem in (("theorem2", 12), ("theorem3", 24)):  # the general-policy arm ran and was checked
        general = summaries[name]["general_policy"]
        assert general["instances"] == per_problem * (8 if name == "theorem2" else 4) and general["prompts"] == 4
        assert general["prop_a_violations"] == summaries[name]["violations"]["general_prop_a"] == 0
        assert general["min_ratio_prop_a"] >= 1
    paradox = summaries["paradox"]
    assert set(paradox["table2"]) == {"variance", "on_policy_accuracy", "off_policy_accuracy"}
    assert paradox["instances"] >= 100
    # The moderate-accuracy sentence follows the two gaps' intervals.
    from theory import paradox as paradox_study

    config = paradox_study.ParadoxConfig(**paradox["config"])
    altered = json.loads(json.dumps(paradox))
    altered["moderate_accuracy"] |= {"accuracy_gap": [0.05, 0.03, 0.07], "relative_gain_gap": [0.2, 0.1, 0.3]}
    assert "sit at moderate accuracy here, as Chen et al. found" in paradox_study._markdown(altered, config)
    altered["moderate_accuracy"]["relative_gain_gap"] = [0.02, 0.005, 0.03]  # straddles the rule's 0.01
    assert "is undecided" in paradox_study._markdown(altered, config)
    altered["moderate_accuracy"]["relative_gain_gap"] = [0.005, 0.002, 0.008]
    assert "does not appear in this exact model" in paradox_study._markdown(altered, config)


def test_theorem2_limit_reward_is_the_ground_truth_where_the_flow_ends():
    """The policy the flow tends to, checked against the flow itself at a late time: without a KL
    term it puts the mass on the trained reward's best output (of tied ones, the one of largest
    initial logit), whatever the ground truth prefers; with one, on the tilted reference."""
    logits = np.array([[0.0, 0.5, -0.5], [0.3, 0.0, -1.0], [0.2, -0.3, 0.1]])
    rm = np.array([[1.0, 0.0, 0.5], [1.0, 0.2, 1.0], [1.0, 0.0, 0.5]])
    gt = np.array([[0.0, 1.0, 0.5], [-0.5, 1.0, 0.8], [0.0, 1.0, 0.5]])
    lam = np.array([0.0, 0.0, 0.5])
    limits = common.limit_reward(logits, rm, gt, lam)
    np.testing.assert_array_equal(limits[:2], [0.0, -0.5])
    for row, late in ((0, 1e6), (1, 1e6), (2, 200.0)):
        kl_coef = None if lam[row] == 0 else lam[row]
        path = flow.trajectory(
            logits[row : row + 1], rm[row : row + 1], [late], kl_coef=kl_coef, eval_rewards=gt[row : row + 1]
        )
        np.testing.assert_allclose(float(path.eval_reward[0, 0]), limits[row], atol=1e-3)  # a slow approach


def test_theorem2_teachers_have_the_accuracy_and_variance_the_theorem_says():
    config = theorem2.Theorem2Config(problems=3, horizons=(1, 100), shuffled=(0.0, 1.0))
    t = theorem2.make_teachers(config)
    exact = t["fraction"] == 0
    accuracy = np.asarray(metrics.accuracy(t["rm"], t["gt"]))
    variance = np.asarray(metrics.reward_variance(t["logits"], t["rm"]))
    slow, fast = exact & (t["kind"] == "slow"), exact & (t["kind"] == "fast")
    np.testing.assert_allclose(accuracy[slow], 1.0)
    np.testing.assert_allclose(accuracy[fast], 2 / config.num_outputs)
    assert np.all((t["rm"][slow] > 0) & (t["rm"][slow] < 1 / t["horizon"][slow][:, None]))
    assert np.all(variance[slow] <= 1 / t["horizon"][slow] ** 2)
    good = t["gt"].argmax(-1)
    rows = np.arange(len(good))
    assert np.all(t["rm"][rows, good][fast] == 1.0)
    others = np.where(np.arange(config.num_outputs) == good[:, None], -np.inf, t["rm"])
    assert np.all(others[fast].max(-1) < t["good_prob"][fast])
    assert np.all((0 < t["rho"]) & (t["rho"] < 1))


def test_theorem3_policies_belong_to_their_families():
    config = theorem3.Theorem3Config(problems=2, horizons=(10, 100))
    cells = theorem3.make_cells(config)
    probs = np.exp(cells["logits"])
    np.testing.assert_allclose(probs.sum(-1), 1.0)
    first, second = (np.argsort(cells["gt"], -1)[:, ::-1][:, k] for k in (0, 1))
    rows = np.arange(len(first))
    family_pi = cells["family"] == "Pi"
    np.testing.assert_allclose(probs[rows, first][family_pi], config.good_mass)
    np.testing.assert_allclose(probs[rows, second][family_pi], cells["horizon"][family_pi] ** -2.0)
    np.testing.assert_allclose(probs[rows, second][~family_pi], config.good_mass)
    variance = np.asarray(metrics.reward_variance(cells["logits"], cells["rm"]))
    assert np.all(variance[~cells["fast"]] <= 8 / cells["horizon"][~cells["fast"]] ** 2)
    start = (probs * cells["gt"]).sum(-1)
    assert np.all(cells["gt"][rows, second] > start + cells["gamma"])


def test_censored_slopes_recover_a_slope_that_dropping_the_censored_biases():
    from theory.common import censored_slopes

    rng = np.random.default_rng(0)
    variance = 10 ** rng.uniform(-8, 0, 4000)
    log_t = 2 - 0.5 * np.log(variance) + 0.3 * rng.normal(size=variance.size)
    t_max = float(np.exp(np.quantile(log_t, 0.9)))  # the slowest tenth never arrives
    fit = censored_slopes(variance, np.where(np.exp(log_t) > t_max, np.inf, np.exp(log_t)), t_max)
    assert fit["censored"] == 400 and fit["reached"] == 3600
    assert fit["tobit"] == pytest.approx(-0.5, abs=0.01)
    assert fit["reached_slope"] > -0.497  # dropping the slowest flattens the slope
    assert fit["at_t_max_is_upper_bound"] and fit["at_t_max"] >= fit["tobit"]
    uncensored = censored_slopes(variance, np.exp(log_t), t_max)
    assert uncensored["censored"] == 0 and uncensored["tobit"] == uncensored["at_t_max"] == uncensored["reached_slope"]
    # An EM stopped before it converged gives no Tobit slope, and the report says so.
    stopped = censored_slopes(variance, np.where(np.exp(log_t) > t_max, np.inf, np.exp(log_t)), t_max, iterations=2)
    assert not stopped["tobit_converged"] and np.isnan(stopped["tobit"])
    # The bootstrap interval of the Tobit slope holds the true slope; without censoring there is none.
    interval = censored_slopes(
        variance, np.where(np.exp(log_t) > t_max, np.inf, np.exp(log_t)), t_max, num_bootstrap=200
    )["tobit_ci"]
    assert interval[0] < -0.5 < interval[1] and interval[1] - interval[0] < 0.05
    assert np.isnan(censored_slopes(variance, np.exp(log_t), t_max, num_bootstrap=200)["tobit_ci"]).all()
    assert theorem1._censored_slope_text(stopped).endswith("Tobit not converged")


def test_theorem1_prose_follows_the_measurements(quick_run):
    import copy

    summary = quick_run[2]["theorem1"]
    text, verdict = theorem1._interpretation(summary), theorem1._verdict(summary)
    assert "Violated" not in text and f"{summary['censored']} timings censored" in verdict
    altered = copy.deepcopy(summary)
    altered["violations"]["prop3"] = 3
    altered["censored"] = 12345
    altered["families"]["random"] |= {"slope": -0.65, "slope_ci": [-0.70, -0.60]}
    # With censored timings the -1/3 question is judged on the fit with them at t_max, and only
    # when that fit bounds the slope from above; the reached-only interval does not decide it.
    censored_fit = dict(censored=7, at_t_max=-0.61, tobit=-0.66, at_t_max_is_upper_bound=True)
    nan = [float("nan")] * 2
    altered["families"]["random"]["censored_fit"].update(censored_fit, at_t_max_ci=[-0.9, -0.2], tobit_ci=nan)
    altered_text = theorem1._interpretation(altered)
    assert "Violated: Proposition 3 on 3 instances" in altered_text
    assert "cannot rule out a -1/3 exponent for random" in altered_text
    assert "random -0.650 -> at most -0.610; Tobit -0.660 (7 censored)" in altered_text
    random_fit = altered["families"]["random"]["censored_fit"]
    random_fit["at_t_max_ci"] = [-0.9, -0.4]
    assert "For random, whose censored timings all lie below" in theorem1._interpretation(altered)
    assert "rule out" not in theorem1._interpretation(altered)
    # Censored timings on both sides of the mean: only the Tobit interval (a model) can bound it.
    random_fit["at_t_max_is_upper_bound"] = False
    assert "For random no bound counting the censored timings was measured" in theorem1._interpretation(altered)
    random_fit["tobit_ci"] = [-0.7, -0.6]
    assert "For random some censored timings lie above" in theorem1._interpretation(altered)
    assert "rule out" not in theorem1._interpretation(altered) and "Tobit -0.660 [-0.700, -0.600]" in (
        theorem1._interpretation(altered)
    )
    random_fit["tobit_unconverged"] = 3
    assert "(3 resamples left out: their EM did not converge)" in theorem1._interpretation(altered)
    random_fit["tobit_ci"] = [-0.7, -0.3]
    assert "cannot rule out a -1/3 exponent for random" in theorem1._interpretation(altered)
    assert "12345 timings censored" in theorem1._verdict(altered)
    altered["failed"] = 4
    assert "4 failed solves" in theorem1._verdict(altered)
    # An exact -1/2 scaling whose degenerate interval misses -1/2 by solver rounding still counts.
    plain = [name for name, f in altered["families"].items() if f["kl_coef"] == 0]
    for name in plain:
        altered["families"][name]["slope_ci"] = [-0.45, -0.40]
    altered["families"]["scaled"]["slope_ci"] = [-0.49999999987, -0.49999999983]
    assert f"within 0.005 of -1/2 for 1 of {len(plain)} families (scaled)" in theorem1._interpretation(altered)
    assert "Theorem 4's bound was violated" not in theorem1._interpretation(altered)
    altered["violations"]["theorem4"] = 2
    assert "Theorem 4's bound was violated on 2 instances" in theorem1._interpretation(altered)
    altered["families"]["random"]["slope"] = float("nan")  # e.g. fewer than 3 reached timings
    assert "No slope could be measured for random" in theorem1._interpretation(altered)
    assert "nan" not in theorem1._verdict(altered)
    # The lam branch: the measured largest lam * gamma is at most 2 (docs/theory.md#theorem-4).
    kl = summary["families"]["kl_0.5"]
    assert 0 < kl["max_lam_times_gain"] <= 2 and kl["lam_branch_binds"] == 0
    altered["violations"]["lam_gain"] = 2
    altered["families"]["kl_0.5"].update(max_lam_times_gain=30.0, lam_branch_binds=4)
    lam_text = theorem1._lam_branch_text(altered)
    assert "largest `lam * gamma` is 30 (2 above the bound 2" in lam_text and "smaller one for 4 targets" in lam_text
    # A KL family with no reached target is named; the largest value does not depend on the order.
    first_kl = next(k for k, f in altered["families"].items() if f["kl_coef"] > 0 and k != "kl_0.5")
    altered["families"][first_kl]["max_lam_times_gain"] = float("nan")
    lam_text = theorem1._lam_branch_text(altered)
    assert "largest `lam * gamma` is 30 " in lam_text and f"No target was reached in {first_kl}." in lam_text


def test_theorem2_prose_counts_who_did_not_reach_the_gain_and_why(quick_run):
    import copy

    summary = copy.deepcopy(quick_run[2]["theorem2"])
    summary["not_reached"]["slow"] = {
        "censored": 5,
        "unattainable": 6,
        "unattainable_unshuffled": 4,
        "unattainable_with_kl": 1,
    }
    text = theorem2._unreached_text(summary)
    assert "11 slow teachers did not reach the gain: 6 cannot" in text
    assert "4 of them have unshuffled orders and 1 a KL penalty), 5 could but were censored" in text
    assert "failed" not in text
    summary |= {"failed": 2, "undecided": 1}
    assert "2 solves failed before reaching the gain or `t_max`" in theorem2._unreached_text(summary)
    assert "1 of them stopped below their bound" in theorem2._unreached_text(summary)
    summary["slow_growth"] = {"slope": 0.5, "ci": [0.4, 0.6]}
    assert "`T^0.500` [95% CI 0.400, 0.600]" in theorem2._growth_text(summary)
    summary["slow_growth"] = {"slope": float("nan"), "ci": [float("nan")] * 2}
    assert theorem2._growth_text(summary).startswith("Too few slow teachers reached the gain")


def test_the_variance_rate_is_the_derivative_along_the_flow():
    """``_variance_rate`` (a JVP in the direction of grad phi, with its 1/|S|) against finite
    differences of the variance along the integrated flow, two prompts, no KL."""
    import jax
    import jax.numpy as jnp

    from jaxrm import flow
    from jaxrm.tabular import TabularPolicy

    policy = TabularPolicy(5)
    logits = jax.random.normal(jax.random.key(0), (3, 2, 5))
    rm = jax.random.uniform(jax.random.key(1), (3, 2, 5), minval=-1.0, maxval=1.0)
    value, rate = theorem1._variance_rate(policy, logits, rm, policy.log_probs(logits), jnp.zeros(3))
    h = 1e-4
    path = flow.trajectory(logits, rm, jnp.array([0.0, h, 2 * h]), policy=policy, rtol=1e-12, atol=1e-14)
    variance = np.asarray(path.rm_variance).mean(-1)  # [times, problems]: the prompt mean
    np.testing.assert_allclose(value, variance[0], rtol=1e-10)
    np.testing.assert_allclose(rate, (-3 * variance[0] + 4 * variance[1] - variance[2]) / (2 * h), rtol=1e-5)


def test_general_policy_rows_run_at_the_speed_of_their_problem_size():
    """Rows grouped into problems of |S| prompts take |S| times their one-prompt time, and a
    group shares the smallest lam of its rows."""
    policy = AutoregressiveTabularPolicy(2, 2)
    rng = np.random.default_rng(0)
    log_probs = np.log(rng.dirichlet(np.ones(4), 3))
    gt = rng.uniform(-1, 1, (3, 4))
    rm = 0.5 * gt  # ordered like the ground truth: every gain below the best is reached
    gamma = 0.3 * (gt.max(-1) - (np.exp(log_probs) * gt).sum(-1))
    lam = np.array([0.05, 0.02, 0.0])
    two, used, _, _ = general_policy_passage(log_probs, rm, gt, gamma, lam, policy=policy, num_prompts=2)
    np.testing.assert_array_equal(used, [0.02, 0.02, 0.0])  # rows 0 and 1 share a problem and its smaller lam
    one, *_ = general_policy_passage(log_probs, rm, gt, gamma, used, policy=policy, num_prompts=1)
    assert np.isfinite(one).all()
    np.testing.assert_allclose(two, 2 * one, rtol=1e-6)


def test_general_policy_text_counts_what_fell_outside_the_tabular_formulas():
    general = {
        "policy": "autoregressive-tabular (V = 3, L = 2)",
        "num_outputs": 9,
        "prompts": 4,
        "instances": 96,
        "censored": 0,
        "failed": 0,
        "prop_a_violations": 0,
        "min_ratio_prop_a": 30.0,
        "tabular_slow_lower": {"outside": 0, "min_slack": 12.0},
        "tabular_fast_upper": {"outside": 0, "min_slack": 80.0},
    }
    text = general_text(general, "Theorem 2")
    assert "slow lower bound holds on every instance" in text and "holds on every flow" in text
    assert "(96 flows, 0 censored at `t_max`, 0 failed solves)" in text
    general["tabular_fast_upper"] = {"outside": 5, "min_slack": 0.5}
    general["prop_a_violations"] = 2
    changed = general_text(general, "Theorem 2")
    assert "fast upper bound fails on 5 instances" in changed and "violated on 2 flows" in changed


def test_violating_rows_record_every_field_of_each_flagged_row():
    rows = {
        "rm": np.array([[1.0, 0.0], [0.5, 0.5]]),
        "kind": np.array(["slow", "fast"]),
        "t_gamma": np.array([1.0, 2.0]),
    }
    saved = violating_rows(rows, {"slow_lower": np.array([True, False]), "fast_upper": np.array([False, False])})
    assert saved == [{"bound": "slow_lower", "row": 0, "rm": [1.0, 0.0], "kind": "slow", "t_gamma": 1.0}]


def test_best_of_n_saves_the_checks_where_the_perfect_model_is_beaten(tmp_path, monkeypatch):
    """Proposition 1 cannot fail on exact numbers, so a fake Best-of-N ranks the models by
    their index: every other model beats the perfect one (index 0) on every check."""

    def by_index(log_probs, rewards, gt, n):
        index = jnp.arange(rewards.shape[-3], dtype=rewards.dtype)[:, None]
        return jnp.broadcast_to(index, rewards.shape[:-1]) + 0 * n

    monkeypatch.setattr(metrics, "best_of_n_reward", by_index)
    config = best_of_n.BestOfNConfig(
        problems=2, prompts=2, num_outputs=3, max_n=2, ranking_n=2, noise=(0.0,), offsets=(0.0,)
    )
    summary = best_of_n.run(tmp_path, config=config)
    saved = json.loads((tmp_path / "best_of_n_violations.json").read_text())
    assert summary["violations"]["perfect_not_optimal"] == len(saved) == 2 * 2 * 2
    assert saved[0]["model"] == best_of_n.low_variance_name(1.0) and len(saved[0]["rm_rewards"]) == 3


@pytest.mark.slow
def test_estimator_atlas_measures_every_estimator_and_says_what_it_found(quick_run):
    summary = quick_run[2]["estimators"]
    rows = summary["estimators"]
    passage = summary["passage"]
    assert summary["means"] == len(rows) * 2 * 2 and summary["instances"] == summary["means"] + passage["instances"]
    assert summary["violations"] == {"unbiased": 0, "followed": 0}
    by_name = {r["name"]: r for r in rows}
    assert max(by_name["rloo(k=2), k1 in reward"]["relative_bias"]) < 1e-9  # unbiased, as derived
    assert min(by_name["rloo(k=2), k1 in loss"]["relative_bias"]) > 1e-3  # the KL gradient is dropped
    assert by_name["dr_grpo(k=2), k1 in reward"]["scale"][0] == pytest.approx(0.5, rel=1e-9)
    assert sum(r["followed_error"] is not None for r in rows) == 38 and all(
        r["followed_error"] is None or r["followed_error"] < 1e-9 for r in rows
    )
    config = estimators.EstimatorsConfig().quick()
    text = estimators._findings(summary, config)
    assert "drops the KL gradient" in text and "Dr. GRPO's direction bias is" in text
    altered = json.loads(json.dumps(summary))
    for r in altered["estimators"]:
        if r["name"] == "rloo(k=2), k1 in loss":
            r["relative_bias"] = [0.5, 0.25]
    assert "0.5 at the largest reward scale and 0.25 at the smallest" in estimators._findings(altered, config)
    assert "= (k-1)/k at every reward scale" in text
    for r in altered["estimators"]:
        if r["name"] == "dr_grpo(k=2), k1 in reward":
            r["scale"] = [0.9] * len(r["scale"])
    assert "not the (k-1)/k = 0.5 of a plain mean" in estimators._findings(altered, config)
    # No file of violations for this run; a tolerance below rounding breaks every checked row,
    # and each broken bound names the instance (problem, reward scale) that broke it worst.
    assert not (quick_run[1] / "estimators_violations.json").exists()
    broken = estimators._violating(rows, 1e-300)
    assert sum(v["bound"] == "unbiased" for v in broken) == sum(r["should_be_unbiased"] for r in rows)
    assert sum(v["bound"] == "followed" for v in broken) == 38
    worst = next(v for v in broken if v["name"] == "rloo(k=2), k1 in reward")
    assert worst["instance"]["problem"] in (0, 1) and worst["instance"]["scale"] in (
        1.0,
        10.0 ** config.log10_scales[-1],
    )


@pytest.mark.slow
def test_theorem1_under_sampling_times_flow_and_ascents_on_the_same_instances(quick_run):
    passage = quick_run[2]["estimators"]["passage"]
    config = estimators.EstimatorsConfig().quick()
    assert passage["instances"] == 3 * config.passage_problems * config.passage_levels
    assert set(passage["fits"]) == set(estimators.FAMILIES) and list(passage["k"]) == ["2"]
    flow_t, run = np.asarray(passage["flow"]), passage["k"]["2"]
    assert np.all(np.isfinite(flow_t)) and passage["censored_instances"] == 0
    # Exact ascent and the mean of RLOO's seeds are close to the flow at this resolution.
    np.testing.assert_allclose(passage["exact_ascent"], flow_t, rtol=0.15)
    np.testing.assert_allclose(run["mean"], flow_t, rtol=0.5)
    scaled = passage["fits"]["scaled"]
    assert scaled["flow"]["slope"] == pytest.approx(-0.5, abs=1e-6)  # a time rescaling
    assert scaled["k"]["2"]["snr"]["slope"] == pytest.approx(0.0, abs=1e-9)  # lam = 0: scale-free SNR
    peaked = passage["fits"]["peaked"]["k"]["2"]
    assert peaked["snr"]["slope"] > 0.5 and peaked["tied_start_max"] > 0.9  # concentrated: most groups tie
    text = estimators._sampling_findings(passage)
    assert "**peaked**" in text and "k = 2" in text
    altered = json.loads(json.dumps(passage))
    altered["fits"]["peaked"]["k"]["2"]["sampling_by_level"] = [1.5, 2.5, 3.5]
    altered["fits"]["peaked"]["k"]["2"]["snr"]["ci"] = [-2.0, -1.0]
    altered_text = estimators._sampling_findings(altered)
    assert "k = 2: 1.5 and 3.5" in altered_text
    assert "sampling costs more at the smallest variance than at the largest" in altered_text
    assert "falls with the variance at k = 2" in altered_text and "falls with" not in text
    altered["fits"]["peaked"]["k"]["2"]["sampling_by_level"] = [1.5, 3.5, 1.5]  # the ends tie: no claim
    altered["fits"]["peaked"]["k"]["2"]["snr"]["ci"] = [float("nan")] * 2
    altered_text = estimators._sampling_findings(altered)
    assert "costs more" not in altered_text.split("**peaked**")[1]
    assert "has no measured trend with the variance at k = 2" in altered_text
    assert (quick_run[1] / "figures" / "estimators_passage.png").stat().st_size > 0


def test_quick_runs_compile_without_backend_optimizations_and_restore_the_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    with _quick_compiles(True):
        assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {QUICK_XLA_FLAG}"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")  # the user's level wins
    with _quick_compiles(True):
        assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=2"
    monkeypatch.delenv("XLA_FLAGS")
    with _quick_compiles(False):
        assert "XLA_FLAGS" not in os.environ
    with _quick_compiles(True):
        assert os.environ["XLA_FLAGS"] == QUICK_XLA_FLAG
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.slow
def test_the_command_line_keeps_compiled_programs_for_the_next_run(tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "theory", "--quick", "--only", "best_of_n", "--jobs", "1"]  # the quickest study
    argv += ["--out", str(tmp_path / "out"), "--compilation-cache", str(cache)]
    env = {**os.environ, "JAXRM_COMPILATION_CACHE": "none"}  # the option wins over the variable
    subprocess.run(argv, check=True, env=env, capture_output=True)
    entries = {p.name for p in cache.iterdir()}
    assert entries, "no compiled program was kept"
    # A second run finds every program it needs: nothing new is written.
    subprocess.run(argv, check=True, env=env, capture_output=True)
    assert {p.name for p in cache.iterdir()} == entries
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--compilation-cache", str(tmp_path / "out" / "report.md" / "sub")])


def test_every_file_a_study_writes_is_checked_before_it_runs(quick_run):
    """The quick run's output directory holds nothing that python -m theory did not check first."""
    from theory import STUDIES, study_outputs

    status, out, _ = quick_run
    checked = {"report.md"} | {path for name in STUDIES for path in study_outputs(name)}
    written = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}
    assert written <= checked, written - checked
