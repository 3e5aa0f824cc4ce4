"""The benchmark's SciPy baselines must compute the same t_gamma as jaxrm (speed lives there)."""

import json

import jax
import numpy as np
import pytest

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


def test_timed_sides_take_turns_and_each_keeps_its_own_rounds():
    from experiments.benchmarks.common import alternating_rounds

    calls = []
    timer = lambda name, value: lambda: calls.append(name) or value  # noqa: E731
    times = alternating_rounds({"ours": timer("ours", 1.0), "baseline": timer("baseline", 2.0)}, rounds=3)
    assert calls == ["ours", "baseline"] * 3
    assert times == {"ours": [1.0] * 3, "baseline": [2.0] * 3}


def test_generate_benchmark_runs_the_same_model_on_both_sides():
    from experiments.benchmarks.generate import run_shape

    result = run_shape("tiny", batch=2, prompt_len=4, new_tokens=4, repeats=1, log=lambda line: None)
    assert set(result["jaxrm"]) == {"scanned", "unrolled"} and result["hf_tokens_per_s"] > 0
    for ours in result["jaxrm"].values():
        assert ours["greedy_token_agreement"] == 1.0
        assert ours["speedup"] == result["hf_s"] / ours["s"] and ours["tokens_per_s"] == 8 / ours["s"]
    # Pythia's layout at tiny (hidden 32, MLP 128, vocabulary 97, 2 layers): per layer two layer
    # norms, the fused QKV, the attention output and the MLP, each with biases; then the
    # embedding, the final layer norm and an untied unembedding.
    hidden, mlp, vocab = 32, 128, 97
    layer = 2 * 2 * hidden + (hidden + 1) * 3 * hidden + (hidden + 1) * hidden + (hidden + 1) * mlp + (mlp + 1) * hidden
    assert result["params"] == 2 * layer + vocab * hidden + 2 * hidden + vocab * hidden == 31680


def test_fsdp_splits_every_parameter_and_optimizer_slot_across_devices():
    from experiments.benchmarks.programs import memory_per_device
    from jaxrm.models import preset
    from jaxrm.sharding import make_mesh

    model = preset("tiny", hidden_size=64, intermediate_size=256, vocab_size=128)
    mesh = make_mesh()  # the 4 host devices of the test setup
    replicated, fsdp = (memory_per_device(model, mesh, s, prompts=4, new_tokens=4) for s in ("replicated", "fsdp"))
    # Ideally 1/4; LayerNorm and bias vectors (embed-sized ones are split too) keep it a little above.
    assert 0.25 <= fsdp["arguments"] / replicated["arguments"] < 0.3
    # Its temporaries hold gathered parameters on top of the same per-device activations (both are
    # data parallel), but a device holds less in all.
    total = {name: m["arguments"] + m["temporaries"] for name, m in (("replicated", replicated), ("fsdp", fsdp))}
    assert total["fsdp"] < total["replicated"]


def test_accelerator_benchmark_reports_throughput_and_mfu_against_the_peak_it_is_given(tmp_path, monkeypatch):
    from experiments.benchmarks import accelerator
    from experiments.benchmarks.accelerator import datasheet_peak_tflops, main
    from experiments.benchmarks.common import generation_flops, model_flops_per_iteration
    from jaxrm.models import preset

    # The second shape fails (as a device's time limit would stop it): the first stays recorded.
    measured = accelerator.run_shape
    calls = []

    def first_only(shape, **options):
        calls.append(shape)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return measured(shape, **options)

    monkeypatch.setattr(accelerator, "run_shape", first_only)
    options = ["--shapes", "tiny", "tiny", "--batch", "4", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1"]
    with pytest.raises(KeyboardInterrupt):
        main([*options, "--peak-tflops", "0.001", "--out", str(tmp_path / "known.json")])
    record = json.loads((tmp_path / "known.json").read_text())
    (result,) = record["results"]
    assert record["versions"]["jax"] == jax.__version__ and record["peak_tflops"] == 0.001
    assert {"flax", "optax", "numpy"} <= set(record["versions"])
    config = preset("tiny")
    sizes = dict(sequences=4, prompt_len=4, new_tokens=4)
    flops = model_flops_per_iteration(config, **sizes)
    assert result["iteration_mfu"] == pytest.approx(flops / result["iteration_s"] / 1e9)
    generated = generation_flops(config, **sizes)
    assert result["generation_mfu"] == pytest.approx(generated * result["generation_tokens_per_s"] / 16 / 1e9)
    # The count is of work done: an iteration is more than its generation, and linear in sequences.
    assert generated < flops == pytest.approx(2 * model_flops_per_iteration(config, **sizes | {"sequences": 2}))
    # A device missing from the datasheet table gets no MFU rather than a guessed one.
    assert datasheet_peak_tflops("NVIDIA H200") == 989.0 and datasheet_peak_tflops("cpu") is None


def test_allocator_settings_name_every_allocator_variable_that_is_set(monkeypatch):
    from experiments.benchmarks.common import allocator_line, allocator_settings

    for name in allocator_settings():
        monkeypatch.delenv(name)
    assert allocator_settings() == {} and "default" in allocator_line()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    monkeypatch.setenv("MALLOCATED", "not an allocator variable")
    assert allocator_settings() == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0", "MALLOC_ARENA_MAX": "1"}
    assert allocator_line() == "host memory: GLIBC_TUNABLES=glibc.malloc.mmap_max=0, MALLOC_ARENA_MAX=1"


def test_rlhf_benchmark_refuses_microbatches_that_do_not_divide_the_batch(tmp_path, capsys):
    from experiments.benchmarks import rlhf_step

    out = tmp_path / "rlhf.json"
    with pytest.raises(SystemExit):
        rlhf_step.main(["--prompts", "4", "--microbatches", "3", "--out", str(out)])
    assert "--microbatches must be >= 1 and divide the 8 responses" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("tabular_flow", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
        ("tabular_flow", ["--ascent-prompts", "3"], "--ascent-prompts 3 must be a multiple of the"),
        ("generate", ["--shapes", "tiny", "nosuch"], "unknown preset 'nosuch'"),
        ("rlhf_step", ["--iterations", "0"], "--iterations must be >= 1, got 0"),
        ("accelerator", ["--batch", "3"], "--batch must be a multiple of k = 2"),
        ("tabular_flow", ["--rtol", "inf"], "--rtol must be a finite number > 0, got inf"),
        ("tabular_flow", ["--seed", "-1"], "--seed must be >= 0, got -1"),
        ("accelerator", ["--peak-tflops", "inf"], "--peak-tflops must be a finite number > 0, got inf"),
        # Where the record cannot be written, before the measurements that it would throw away.
        ("tabular_flow", ["--out", "{tmp}"], "--out {tmp} is a directory; name the JSON file to write"),
        ("generate", ["--out", ""], "--out . is a directory"),
        ("rlhf_step", ["--out", "{tmp}/a_file/record.json"], "its directory {tmp}/a_file is a file"),
        ("accelerator", ["--out", "/proc/jaxrm/record.json"], "no file can be created in /proc"),
        ("programs", ["depth", "--out", "{tmp}"], "--out {tmp} is a directory"),
        ("programs", ["depth", "--layers", "6", "6"], "at least two distinct positive depths"),
        ("programs", ["depth", "--prompts", "0"], "--prompts must be >= 1, got 0"),
        ("programs", ["memory", "--devices", "8"], "--devices 8: only 4 devices here"),
        # --devices is read before argparse starts jax, so no abbreviation may stand for it.
        ("programs", ["memory", "--dev", "2"], "unrecognized arguments: --dev 2"),
    ],
)
def test_benchmarks_refuse_bad_arguments_before_any_work(name, arguments, message, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"experiments.benchmarks.{name}")
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "record.json"
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    with pytest.raises(SystemExit) as exit_:
        module.main([*arguments, "--out", str(out)] if "--out" not in arguments else arguments)
    assert exit_.value.code == 2
    assert f"usage: python -m experiments.benchmarks.{name}" in (err := capsys.readouterr().err)
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_the_ascent_benchmark_shards_a_default_prompt_count_that_every_device_count_divides():
    from experiments.benchmarks.tabular_flow import default_ascent_prompts

    assert [default_ascent_prompts(d) for d in (1, 2, 3, 6, 1024, 1500)] == [1024, 1024, 1023, 1020, 1024, 1500]


def test_every_benchmark_record_carries_the_package_versions(tmp_path):
    from experiments.benchmarks.common import write_record

    write_record(tmp_path / "deep" / "record.json", {"seconds": np.float64(1.5)})
    record = json.loads((tmp_path / "deep" / "record.json").read_text())
    assert record["seconds"] == 1.5
    assert record["versions"]["jax"] == jax.__version__ and {"jaxlib", "numpy", "scipy"} <= set(record["versions"])
