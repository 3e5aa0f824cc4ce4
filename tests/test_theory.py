import json

import numpy as np
import pytest

from theory import theorem1
from theory.__main__ import main
from theory.common import config_from_dict, loglog_slope


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    status = main(["--only", "theorem1", "--quick", "--out", str(out)])
    return status, out, json.loads((out / "theorem1.json").read_text())


@pytest.mark.slow
def test_theorem1_quick_run_writes_the_promised_outputs(quick_run):
    status, out, summary = quick_run
    assert status == 0
    assert summary["instances"] == 8 * 8 + 256 * 2 + 2 * 64 + 2 * 64
    assert summary["violations"] == {"theorem4": 0, "prop3": 0, "sharpened": 0}
    assert set(summary["families"]) == {"scaled", "random", "kl_0.05", "kl_0.5", "autoregressive_L2", "autoregressive_L3"}
    for family in summary["families"].values():
        assert family["n"] > 0 and family["variance_decades"] >= 6
        lo, hi = family["slope_ci"]
        assert lo <= family["slope"] <= hi
    # The scaled teacher is a time rescaling: slope -1/2 exactly, within each base problem.
    assert summary["families"]["scaled"]["slope"] == pytest.approx(-0.5, abs=1e-6)
    assert 0 < summary["grad_bound"]["max_ratio_prop2"] <= 1
    assert 0 < summary["grad_bound"]["max_ratio_sqrt"] <= 1
    assert all(r >= 1 for r in summary["min_ratio"].values())
    for name in ("theorem1.md", "report.md", "figures/theorem1.png", "theorem1_instances.npz"):
        assert (out / name).stat().st_size > 0
    assert "Verdict" in (out / "report.md").read_text()


def test_violations_are_counted_and_saved():
    fake = {
        "gt": {"t_gamma": np.array([[1.0, np.inf]]), "theorem4": np.array([[2.0, 1.0]]), "prop3": np.array([[0.5, 0.5]]),
               "sharpened": np.array([[0.5, 0.5]]), "gamma": np.array([[0.1, 0.1]]), "status": np.array([[1, 2]])},
        "rm": {"t_gamma": np.array([[3.0, 3.0]]), "theorem4": np.array([[1.0, 1.0]]), "prop3": np.array([[4.0, 1.0]]),
               "sharpened": np.array([[1.0, 1.0]]), "gamma": np.array([[0.1, 0.1]]), "status": np.array([[1, 1]])},
    }
    found = theorem1._violations(fake, 1e-6)
    assert found["theorem4"].tolist() == [[True, False]]
    assert found["prop3"].tolist() == [[True, False]]
    assert not found["sharpened"].any()


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
    groups = np.repeat(np.arange(40), 10)
    y = np.exp(rng.normal(0, 3, 40))[groups] * x**-0.5
    assert loglog_slope(x, y, groups=groups)[0] == pytest.approx(-0.5)
