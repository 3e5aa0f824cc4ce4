"""The benchmark's SciPy baselines must compute the same t_gamma as jaxrm (speed lives there)."""

import numpy as np

from experiments.benchmarks.tabular_flow import make_problems, scipy_per_problem, scipy_stacked
from jaxrm import flow


def test_scipy_baselines_agree_with_each_other_and_with_jaxrm():
    logits, rewards, start, gamma = make_problems(6, 8, seed=1)
    options = dict(rtol=1e-10, atol=1e-12, t_max=1e9)
    one_by_one = scipy_per_problem(logits, rewards, start, gamma, **options)
    stacked, steps = scipy_stacked(logits, rewards, start, gamma, **options)
    assert np.isfinite(one_by_one).all() and steps > 0
    np.testing.assert_allclose(stacked, one_by_one, rtol=1e-7)
    ours = flow.t_gamma(logits[:, None], rewards[:, None], gamma[:, None], **options)
    np.testing.assert_allclose(np.asarray(ours)[:, 0], one_by_one, rtol=1e-7)


def test_generate_benchmark_runs_the_same_model_on_both_sides():
    from experiments.benchmarks.generate import run_shape

    result = run_shape("tiny", batch=2, prompt_len=4, new_tokens=4, repeats=1, log=lambda line: None)
    assert result["greedy_token_agreement"] == 1.0
    assert result["jaxrm_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0
    assert result["params"] == 31680
