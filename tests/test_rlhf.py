"""jaxrm.train: RLHF iterations that learn, the same result on 1, 4 devices and 2 processes, exact resume."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlhf_task
from flax import nnx
from rlhf_task import CONFIG, ground_truth, policy, prompts

from jaxrm import pg
from jaxrm.models import CausalLM, RewardModel, preset
from jaxrm.models.sampling import sample
from jaxrm.sharding import make_mesh, param_shardings
from jaxrm.train import RewardTrainConfig, driver
from jaxrm.train.optimizers import layer_roles, stack_layers, stacked_state_shardings
from jaxrm.train.rlhf import (
    RLHFConfig,
    TrainData,
    by_microbatches,
    init_state,
    make_iteration,
    make_phases,
    make_train,
    measure_reward_statistics,
    policy_log_probs,
    reward_model_fn,
)

WORKER = Path(__file__).with_name("rlhf_worker.py")


def _run(tmp_path, name, iterations, **options):
    options.setdefault("log", None)
    return rlhf_task.run(tmp_path / name, iterations, **options)


def _leaves(params):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_rloo_raises_the_ground_truth_reward_and_writes_the_run_directory(tmp_path):
    lines = []
    state, history = _run(tmp_path, "run", 24, log_every=8, log=lines.append)
    truth = history["ground_truth_reward"]
    first, last = truth[:4].mean(), truth[-4:].mean()
    assert last > first + 0.15, (first, last)
    assert history["kl"][-1] > 0 and (history["clip_fraction"] == 0.0).all()  # one minibatch: ratio 1
    assert history["iteration"].tolist() == list(range(24)) and history["iteration"].dtype == np.int64
    assert lines[0].startswith("compiling") and any(line.startswith("iteration 24/24") for line in lines)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(24))
    expected = {
        "proxy_reward",
        "ground_truth_reward",
        "reward_variance",
        "on_policy_accuracy",
        "kl",
        "entropy",
        "clip_fraction",
        "tokens_per_s",
        "loss",
        "response_length",
    }
    assert expected <= set(lines[0])
    for name in ("proxy_reward", "ground_truth_reward", "reward_variance", "kl", "entropy", "loss"):
        np.testing.assert_allclose([line[name] for line in lines], history[name], rtol=1e-6, err_msg=name)
    assert json.loads((run / "config.json").read_text())["config"]["samples_per_prompt"] == 2
    assert json.loads((run / "summary.json").read_text())["iterations"] == 24 == int(state.step)
    assert json.loads((run / "config.json").read_text())["seeds"] == 0
    assert json.loads((run / "config.json").read_text())["optimizer_layout"] == "stacked_layers"
    assert (run / "checkpoints" / "24").is_dir()  # checkpoint_every=0: saved at the end


def _flops_per_device_of_the_last_program() -> float:
    analysis = driver._COMPILED[next(reversed(driver._COMPILED))][0].cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_one_iteration_on_1_and_4_devices_gives_the_same_parameters(tmp_path):
    one, _ = _run(tmp_path, "one", 1, mesh=make_mesh(devices=jax.devices()[:1]))
    one_device = _flops_per_device_of_the_last_program()
    four, _ = _run(tmp_path, "four", 1, mesh=make_mesh())
    # Data parallel: each device samples and updates on its own rows (the update was once
    # repeated on every device, over a gathered batch: 0.72 of one device's work).
    assert _flops_per_device_of_the_last_program() < 0.4 * one_device
    fsdp, _ = _run(tmp_path, "fsdp", 1, mesh=make_mesh(), param_sharding="fsdp")
    kernel = four.params["trunk"]["layers"][0]["mlp"]["dense_h_to_4h"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 4
    moved = max(np.abs(a - b).max() for a, b in zip(_leaves(one.params), _leaves(policy_params())))
    assert moved > 1e-4  # the iteration really changed the parameters
    for other in (four, fsdp):
        for a, b in zip(_leaves(one.params), _leaves(other.params)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # A second chunk takes the state as the first one left it (the chunk's program fixes its
    # output shardings; XLA had laid the small fsdp parameters out otherwise, and it failed).
    _, history = _run(tmp_path, "fsdp_chunks", 2, mesh=make_mesh(), param_sharding="fsdp", checkpoint_every=1)
    assert history["iteration"].tolist() == [0, 1]


def policy_params():
    return nnx.state(policy(), nnx.Param)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(*args, **popen):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, **popen)


def _two_processes(out, dump, *options):
    """Two worker processes of one ``jax.distributed`` cluster (2 devices each); their outputs."""
    port = _free_port()
    common = ("--out", out, "--devices", 2, "--num-processes", 2, "--port", port, "--dump", dump, *options)
    workers = [
        _worker(*common, "--process-id", rank, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)
    ]
    outputs = [w.communicate(timeout=240)[0].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    return outputs


def test_two_processes_with_jax_distributed_match_one_process_and_resume_past_a_damaged_checkpoint(tmp_path):
    reference, _ = _run(tmp_path, "single", 2, mesh=make_mesh(), log_every=1)
    options = ("--iterations", 2, "--checkpoint-every", 1)
    outputs = _two_processes(tmp_path / "multi", tmp_path / "multi.npz", *options)
    assert all("connected to 3 peer ranks" in out for out in outputs)  # one gloo group over 4 devices
    multi = np.load(tmp_path / "multi.npz")
    for i, leaf in enumerate(_leaves(reference.params)):
        np.testing.assert_allclose(multi[f"arr_{i}"], leaf, atol=1e-5)
    # Damage the last checkpoint. Process 0 moves it aside, to 2.damaged.1 since an earlier
    # 2.damaged is in the way, and tells process 1 that name before either reloads the steps;
    # both fall back to step 1 and train iteration 2 again.
    checkpoints = tmp_path / "multi" / "checkpoints"
    data = max((f for f in (checkpoints / "2").rglob("*") if f.is_file()), key=_size)
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    (checkpoints / "2.damaged").mkdir()
    outputs = _two_processes(tmp_path / "multi", tmp_path / "resumed.npz", *options)
    assert all("step 2 is damaged (checksum mismatch); moved to 2.damaged.1," in out for out in outputs), outputs
    assert "from the checkpoint at iteration 1" in outputs[0]  # process 0 logs for the run
    assert (checkpoints / "2.damaged.1").is_dir() and (checkpoints / "2").is_dir()
    resumed = np.load(tmp_path / "resumed.npz")
    for name in multi.files:
        np.testing.assert_array_equal(resumed[name], multi[name])


def test_a_run_killed_after_a_checkpoint_resumes_to_bitwise_the_same_parameters(tmp_path):
    common = ("--iterations", 6, "--checkpoint-every", 2)
    straight = _worker("--out", tmp_path / "straight", *common, "--dump", tmp_path / "straight.npz")
    killed = _worker("--out", tmp_path / "killed", *common, "--hang-at", 4, stdout=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "4"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "the worker never reached its checkpoint at iteration 4"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = _worker("--out", tmp_path / "killed", *common, "--dump", tmp_path / "resumed.npz", stdout=subprocess.PIPE)
    log = resumed.communicate(timeout=240)[0].decode()
    assert straight.wait(timeout=240) == 0 and resumed.returncode == 0
    assert "resuming" in log and "iteration 4" in log
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert a.files == b.files
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(6))


def _size(path):
    return path.stat().st_size


def test_only_damaged_files_set_a_checkpoint_aside(tmp_path, monkeypatch):
    from jaxrm.train.checkpoints import RunCheckpoints

    state = {"values": jnp.arange(100_000.0), "key": jax.random.key(0)}  # its data file is the largest
    checkpoints = RunCheckpoints(tmp_path)
    for step in (1, 2):
        checkpoints.save(step, state, {"step": step})
    # A missing array file (orbax raises a bare Exception, caused by TensorStore's ValueError).
    max((f for f in (tmp_path / "2").rglob("*") if f.is_file()), key=_size).unlink()
    with pytest.warns(UserWarning, match="step 2 is unreadable"):
        step, restored, record = checkpoints.restore_latest(state)
    assert step == 1 and record["step"] == 1 and (tmp_path / "2.damaged").is_dir()
    np.testing.assert_array_equal(restored["values"], state["values"])

    # A template of another state is the caller's mismatch, not damage: every checkpoint stays.
    for other, difference in (
        ({**state, "values": jnp.arange(10.0)}, r"\['values'\]: stored \[\[100000\], 'float64'\], template \[\[10\]"),
        ({**state, "values": state["values"].astype(jnp.bfloat16)}, r"template \[\[100000\], 'bfloat16'\]"),
        ({**state, "more": jnp.zeros(2)}, r"the stored leaf \['values'\] where the template has \['more'\]"),
    ):
        with pytest.raises(ValueError, match=rf"step 1 .* laid out otherwise than the template \(.*{difference}"):
            checkpoints.restore_latest(other)
    assert checkpoints.steps() == [1]

    # Running out of memory, or a file system unavailable for now, says nothing about the files:
    # raised, and the checkpoint stays where the next attempt will find it.
    def fails(error):
        def restore(*args, **kwargs):
            raise error

        return restore

    for error in (RuntimeError("RESOURCE_EXHAUSTED: Out of memory"), Exception("read failed")):
        monkeypatch.setattr(checkpoints.manager, "restore", fails(error))
        with pytest.raises(RuntimeError, match="checkpoint at step 1 .* was left in place"):
            checkpoints.restore_latest(state)
    try:
        raise ValueError("UNAVAILABLE: the bucket did not answer")
    except ValueError as cause:
        transient = Exception("Encountered error while reading array index")
        transient.__cause__ = cause
    monkeypatch.setattr(checkpoints.manager, "restore", fails(transient))
    with pytest.raises(RuntimeError, match="left in place"):
        checkpoints.restore_latest(state)
    assert checkpoints.steps() == [1]
    checkpoints.close()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    logged = []
    straight, _ = _run(tmp_path, "straight", 6, checkpoint_every=2, log_every=3, log=logged.append)
    # Chunks end at the checkpoints (2, 4, 6): a line after each chunk that reaches a multiple of 3.
    assert [line.split(":")[0] for line in logged if line.startswith("iteration")] == ["iteration 4/6", "iteration 6/6"]
    _run(tmp_path, "broken", 4, checkpoint_every=2)
    # Flipped bits in the data (orbax itself reads such a file without complaint): the checksum
    # recorded at save catches them.
    data = max((f for f in (tmp_path / "broken" / "checkpoints" / "4").rglob("*") if f.is_file()), key=_size)
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    lines = []
    with pytest.warns(UserWarning, match="step 4 is damaged"):
        resumed, history = _run(tmp_path, "broken", 6, checkpoint_every=2, log=lines.append)
    assert "resuming" in lines[0] and lines[0].endswith("iteration 2")
    assert history["iteration"].tolist() == list(range(6))
    for a, b in zip(_leaves(straight.params), _leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    # The damaged step was moved aside and saved again, so the next resume starts from the newest.
    checkpoints = tmp_path / "broken" / "checkpoints"
    assert (checkpoints / "4.damaged").is_dir() and (checkpoints / "4").is_dir() and (checkpoints / "6").is_dir()
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tmp_path, "broken", 6, checkpoint_every=2, log=lines.append)
    assert lines[0].endswith("iteration 6")
    # A resume asking for fewer iterations than the directory holds is refused, its record untouched.
    with pytest.raises(ValueError, match=r"checkpoint at iteration 6, past num_iterations=4"):
        _run(tmp_path, "broken", 4, checkpoint_every=2)
    assert json.loads((tmp_path / "broken" / "config.json").read_text())["num_iterations"] == 6
    # Without its config.json, the directory's checkpoint still knows its run: another config is refused.
    (tmp_path / "broken" / "config.json").unlink()
    tuned = dataclasses.replace(CONFIG, learning_rate=2 * CONFIG.learning_rate)
    with pytest.raises(ValueError, match=r"checkpoint at iteration 6 .* different \['config.learning_rate'\]"):
        rlhf_task.run_rlhf(
            policy(),
            ground_truth,
            None,
            *prompts(),
            tuned,
            num_iterations=6,
            out_dir=tmp_path / "broken",
            ground_truth_fn=ground_truth,
            log=None,
        )
    assert not (tmp_path / "broken" / "config.json").exists()
    # A resume that would drop the measured ground truth (or change the teacher) is refused
    # before any training.
    with pytest.raises(ValueError, match=r"holds a run with different \['ground_truth', 'ground_truth_function'\]"):
        rlhf_task.run_rlhf(
            policy(), ground_truth, None, *prompts(), CONFIG, num_iterations=8, out_dir=tmp_path / "straight"
        )

    # So is one that would score with another teacher function, or sample other prompts.
    def negated(params, *rows):
        return -ground_truth(params, *rows)

    tokens, mask = prompts()
    for teacher, rows, changed in (
        (negated, (tokens, mask), "teacher_function"),
        (ground_truth, (tokens[::-1], mask[::-1]), "prompts_fingerprint"),
    ):
        with pytest.raises(ValueError, match=rf"holds a run with different \['{changed}'\]"):
            rlhf_task.run_rlhf(
                policy(),
                teacher,
                None,
                *rows,
                CONFIG,
                num_iterations=8,
                out_dir=tmp_path / "straight",
                ground_truth_fn=ground_truth,
            )


def test_seeds_run_in_one_vmapped_program():
    model = policy()
    graphdef, params = nnx.split(model)
    tokens, mask = prompts()
    data = TrainData(jnp.asarray(tokens), jnp.asarray(mask), params, None, jnp.float32(0.0), jnp.float32(1.0))
    train = jax.jit(make_train(CONFIG, graphdef, ground_truth, 2))
    states = [init_state(model, CONFIG, jax.random.key(seed)) for seed in (0, 1)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    batched, metrics = jax.jit(jax.vmap(make_train(CONFIG, graphdef, ground_truth, 2), in_axes=(0, None)))(
        stacked, data
    )
    assert metrics["kl"].shape == (2, 2)
    for seed, state in enumerate(states):
        alone, _ = train(state, data)
        for a, b in zip(_leaves(alone.params), _leaves(jax.tree.map(lambda x: x[seed], batched.params))):
            # float32 sums in another order in the batched program, through two updates.
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    assert not np.allclose(_leaves(batched.params)[0][0], _leaves(batched.params)[0][1], rtol=1e-3, atol=1e-5)


def test_a_reward_model_teacher_and_bad_configs():
    reward_model = RewardModel(preset("tiny"), rngs=nnx.Rngs(1))
    graphdef, reward_params = nnx.split(reward_model)
    score = reward_model_fn(graphdef)
    tokens, mask = prompts(4)
    response = jnp.asarray(tokens[:, :3])
    rewards = score(reward_params, jnp.asarray(tokens), jnp.asarray(mask), response, jnp.ones_like(response, bool))
    np.testing.assert_array_equal(rewards, np.zeros(4))  # a fresh head scores 0
    # With a trained-looking head: a left-padded prompt and a right-padded response score as the
    # unpadded sequence does, at its last real token.
    reward_model.score.kernel[...] = jax.random.normal(jax.random.key(2), reward_model.score.kernel.shape, jnp.float32)
    graphdef, reward_params = nnx.split(reward_model)
    padded = reward_model_fn(graphdef)(
        reward_params,
        jnp.array([[0, 5, 6]]),
        jnp.array([[False, True, True]]),
        jnp.array([[7, 8, 0]]),
        jnp.array([[True, True, False]]),
    )
    unpadded = reward_model(jnp.array([[5, 6, 7, 8]]), jnp.ones((1, 4), bool))
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5)
    assert abs(float(unpadded[0])) > 1e-3
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLHFConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="advantage_estimator"):
        RLHFConfig(advantage_estimator="dpo")
    with pytest.raises(ValueError, match="reward_normalization"):
        RLHFConfig(reward_normalization="whiten")
    with pytest.raises(ValueError, match="minibatches"):
        RLHFConfig(prompts_per_iteration=3, samples_per_prompt=2, minibatches=4)
    with pytest.raises(ValueError, match="temperature"):
        RLHFConfig(temperature=0.0)
    for bad, name in (
        (dict(top_p=2.0), "top_p"),
        (dict(reward_clip=-1.0), "reward_clip"),
        (dict(eos_id=-1), "eos_id"),
        (dict(clip_eps=0.0), "clip_eps"),  # the clipped surrogate needs a range > 0
    ):
        with pytest.raises(ValueError, match=name):
            RLHFConfig(**bad)


def test_bad_prompts_fail_before_the_run_directory_is_written(tmp_path):
    tokens, mask = prompts()
    right_padded = np.zeros_like(tokens), np.zeros_like(mask)
    for row, (t, m) in enumerate(zip(tokens, mask)):
        right_padded[0][row, : m.sum()], right_padded[1][row, : m.sum()] = t[m], True
    with pytest.raises(ValueError, match="left-padded"):
        rlhf_task.run_rlhf(
            policy(), ground_truth, None, *right_padded, CONFIG, num_iterations=1, out_dir=tmp_path / "x"
        )
    with pytest.raises(ValueError, match="num_iterations"):
        rlhf_task.run_rlhf(policy(), ground_truth, None, tokens, mask, CONFIG, num_iterations=0, out_dir=tmp_path / "x")
    # A teacher that was constant when measured: any later difference would be scaled by 1/eps.
    with pytest.raises(ValueError, match=r"std > 0, got mean 0.5 and std 0.0\. A std of 0"):
        rlhf_task.run(tmp_path / "x", 1, reward_stats=(0.5, 0.0))
    assert not (tmp_path / "x").exists()


def test_grpo_with_kl_in_the_loss_minibatches_and_epochs():
    config = dataclasses.replace(
        CONFIG,
        advantage_estimator="grpo",
        kl_placement="loss",
        kl_estimator="k3",
        ratio_level="token",
        aggregation="sequence-mean",
        epochs=2,
        minibatches=2,
        clip_eps=0.01,
        entropy_coef=0.01,
        samples_per_prompt=4,
    )
    model = policy()
    graphdef, params = nnx.split(model)
    tokens, mask = prompts()
    data = TrainData(jnp.asarray(tokens), jnp.asarray(mask), params, None, jnp.float32(0.0), jnp.float32(1.0))
    iteration = make_iteration(config, graphdef, ground_truth, ground_truth_fn=ground_truth)
    iteration = jax.jit(iteration)
    state = init_state(model, config, jax.random.key(0))
    history = []
    for _ in range(3):
        state, metrics = iteration(state, data)
        history.append({k: float(v) for k, v in metrics.items()})
    # The second epoch and second minibatch see a moved policy: some token ratios leave [0.99, 1.01].
    assert history[0]["clip_fraction"] > 0
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["kl"]) for h in history)
    assert history[-1]["kl"] > 0  # logged as k1 whatever the loss uses: may dip below 0 early, not after 3 updates


def test_reward_statistics_are_measured_once_on_the_initial_policy():
    model = policy()
    tokens, mask = prompts(8)
    config = dataclasses.replace(CONFIG, max_new_tokens=4)
    mean, std = measure_reward_statistics(
        model, ground_truth, None, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(7), config=config, samples=3
    )
    drawn = [sample(model, tokens, mask, jax.random.fold_in(jax.random.key(7), i), max_new_tokens=4) for i in range(3)]
    scores = np.concatenate([np.asarray(ground_truth(None, tokens, mask, d.tokens, d.mask)) for d in drawn])
    np.testing.assert_allclose([float(mean), float(std)], [scores.mean(), scores.std()], rtol=1e-6)
    assert 0 < float(mean) < 1 and float(std) > 0
    # The official normalisation measures the standard deviation as torch does (ddof 1).
    official = dataclasses.replace(config, reward_normalization="rsqrt_var")
    _, std = measure_reward_statistics(
        model, ground_truth, None, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(7), config=official, samples=3
    )
    np.testing.assert_allclose(float(std), scores.std(ddof=1), rtol=1e-6)


def test_official_rloo_reproduces_the_official_settings_and_normalization():
    official = RLHFConfig.official_rloo(max_new_tokens=6)
    assert (official.minibatches, official.learning_rate, official.max_grad_norm) == (2, 1e-7, None)
    assert (official.kl_coef, official.kl_estimator, official.kl_placement, official.ratio_level) == (
        0.05,
        "k1",
        "reward",
        "sequence",
    )
    assert official.reward_ddof == 1 and RLHFConfig().reward_ddof == 0
    # With two minibatches the second update sees ratios != 1 (the clip can act); one never does.
    model = policy()
    graphdef, params = nnx.split(model)
    tokens, mask = prompts()
    data = TrainData(jnp.asarray(tokens), jnp.asarray(mask), params, None, jnp.float32(0.5), jnp.float32(0.2))
    config = dataclasses.replace(official, learning_rate=3e-2, prompts_per_iteration=8, clip_eps=1e-3)
    _, out = jax.jit(make_iteration(config, graphdef, ground_truth))(init_state(model, config, jax.random.key(0)), data)
    assert float(out["clip_fraction"]) > 0
    # The two normalisations: (r - m) / (s + 1e-8) against (r - m) * rsqrt(s^2 + 1e-8).
    rewards = jnp.array([[0.0, 1.0]])
    plain = pg.normalize_sampled_rewards(rewards, 0.5, 1e-4, normalization="std")
    official_scaled = pg.normalize_sampled_rewards(rewards, 0.5, 1e-4, normalization="rsqrt_var")
    np.testing.assert_allclose(plain, [[-0.5 / (1e-4 + 1e-8), 0.5 / (1e-4 + 1e-8)]], rtol=1e-9)
    np.testing.assert_allclose(official_scaled, [[-0.5 / np.sqrt(1e-8 + 1e-8), 0.5 / np.sqrt(2e-8)]], rtol=1e-9)


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0, "seed": 0, "kl": 0.1}\n{"iteration": 1, "seed": 0, "kl": 0.2}\n{"iterat')
    assert [line["iteration"] for line in driver._read_lines(path, 5)] == [0, 1]
    assert [line["iteration"] for line in driver._read_lines(path, 1)] == [0]


@pytest.fixture(scope="module")
def sampled():
    """``(graphdef, params, prompt, prompt_mask, samples)``: 8 prompts x 2 responses of the task's policy."""
    graphdef, params = nnx.split(policy())
    tokens, mask = (jnp.asarray(a[:8]) for a in prompts())
    prompt, prompt_mask = jnp.repeat(tokens, 2, axis=0), jnp.repeat(mask, 2, axis=0)
    samples = jax.jit(make_phases(CONFIG, graphdef).sample)(params, prompt, prompt_mask, jax.random.key(0))
    return graphdef, params, prompt, prompt_mask, samples


def test_the_entropy_bonus_moves_the_policy_only_when_its_coefficient_is_not_zero(sampled):
    # Zero advantages and the KL in the reward: the only gradient left is the entropy bonus's.
    graphdef, params, prompt, prompt_mask, samples = sampled
    rollout = (prompt, prompt_mask, samples.tokens, samples.mask, samples.log_probs, samples.log_probs)
    updated = {}
    for entropy_coef in (0.0, 0.5):
        phases = make_phases(dataclasses.replace(CONFIG, entropy_coef=entropy_coef, kl_placement="reward"), graphdef)
        opt_state = CONFIG.optimizer().init(params)
        (new_params, _), stats = jax.jit(phases.optimize)(
            params, opt_state, (*rollout, jnp.zeros(prompt.shape[0])), jax.random.key(1)
        )
        updated[entropy_coef] = _leaves(new_params)
        assert np.isfinite(np.asarray(stats["entropy"])).all()
    assert all(np.array_equal(a, b) for a, b in zip(updated[0.0], _leaves(params)))
    assert not all(np.array_equal(a, b) for a, b in zip(updated[0.5], _leaves(params)))


def test_each_epoch_deals_the_rollout_into_minibatches_afresh(sampled):
    # A learning rate too small to move the loss: epochs differ only by how their rows are dealt.
    graphdef, params, prompt, prompt_mask, samples = sampled
    advantages = jax.random.normal(jax.random.key(2), (prompt.shape[0],))
    rollout = (prompt, prompt_mask, samples.tokens, samples.mask, samples.log_probs, samples.log_probs, advantages)
    config = dataclasses.replace(CONFIG, epochs=2, minibatches=2, learning_rate=1e-12)
    _, stats = jax.jit(make_phases(config, graphdef).optimize)(
        params, config.optimizer().init(params), rollout, jax.random.key(1)
    )
    losses = np.asarray(stats["loss"])  # [epochs, minibatches]
    assert losses.shape == (2, 2)
    np.testing.assert_allclose(losses[0].sum(), losses[1].sum(), rtol=1e-5)  # the same rows in all
    assert np.abs(losses[0] - losses[1]).max() > 1e-3 * np.abs(losses).max()


def test_microbatches_accumulate_the_minibatch_gradient_exactly(sampled):
    graphdef, params, prompt, prompt_mask, samples = sampled
    # Ragged responses, some empty, so that microbatches hold different numbers of tokens and of
    # non-empty sequences, and old log-probs away from the current ones, so that some ratios are clipped.
    lengths = jax.random.randint(jax.random.key(3), (prompt.shape[0], 1), 0, CONFIG.max_new_tokens + 1)
    response_mask = jnp.arange(CONFIG.max_new_tokens) < lengths
    old_logp = jnp.where(
        response_mask, samples.log_probs + 0.3 * jax.random.normal(jax.random.key(4), lengths.shape), 0
    )
    advantages = jax.random.normal(jax.random.key(2), (prompt.shape[0],))
    rollout = (prompt, prompt_mask, samples.tokens, response_mask, old_logp, samples.log_probs, advantages)
    whole_pass_log_probs = policy_log_probs(graphdef, params, *rollout[:4], temperature=CONFIG.temperature)[0]
    assert 0 < int(jnp.sum(lengths == 0)) < prompt.shape[0] // 2
    # Every share of microbatch_shares enters: tokens (token-mean surrogate and KL, entropy) and
    # non-empty sequences (sequence-level ratios, sequence-mean KL).
    every_term = dict(minibatches=2, kl_placement="loss", entropy_coef=0.1, clip_eps=0.05)
    cases = (dict(ratio_level="token", **every_term), dict(aggregation="sequence-mean", **every_term))
    for changes in cases:
        # A large Adam epsilon makes the step about proportional to the gradient, so that a
        # gradient off by rounding moves it by rounding (not by +-lr where a component is ~0).
        changes = dict(adam_eps=0.1, **changes)
        results = {}
        for microbatches in (1, 4):
            config = dataclasses.replace(CONFIG, microbatches=microbatches, **changes)
            phases = make_phases(config, graphdef)
            (new_params, _), stats = jax.jit(phases.optimize)(
                params, config.optimizer().init(params), rollout, jax.random.key(1)
            )
            # The forward passes over the rollout run in minibatches x microbatches parts.
            np.testing.assert_allclose(
                jax.jit(phases.log_probs)(params, *rollout[:4]), whole_pass_log_probs, rtol=1e-5, atol=1e-6
            )
            results[microbatches] = _leaves(new_params), {k: np.asarray(v) for k, v in stats.items()}
        (whole, whole_stats), (accumulated, accumulated_stats) = results[1], results[4]
        assert whole_stats["clip_fraction"].max() > 0, changes
        for name in whole_stats:
            np.testing.assert_allclose(accumulated_stats[name], whole_stats[name], rtol=1e-5, err_msg=name)
        for ours, theirs, start in zip(accumulated, whole, _leaves(params)):
            np.testing.assert_allclose(ours - start, theirs - start, rtol=1e-4, atol=1e-8, err_msg=str(changes))
    with pytest.raises(ValueError, match="microbatches=3 must divide the minibatch of 8"):
        RLHFConfig(prompts_per_iteration=8, minibatches=2, microbatches=3)
    with pytest.raises(ValueError, match="parts=3 must divide the 16 rows"):
        by_microbatches(ground_truth, 3)(None, *rollout[:4])
    with pytest.raises(ValueError, match="parts must be an int >= 1, got 0"):
        by_microbatches(ground_truth, 0)


def test_adam_on_stacked_layers_takes_the_per_array_steps_and_follows_the_fsdp_placement():
    model = policy()
    params = nnx.state(model, nnx.Param)
    num_layers = model.config.num_layers
    assert num_layers >= 2
    clip = optax.clip_by_global_norm(CONFIG.max_grad_norm)
    reward_config = RewardTrainConfig(weight_decay=0.1)
    # (stacked, per array, models side by side): RLHF's Adam on one model, and the reward
    # trainer's AdamW, whose weight decay reads the parameters, vmapped over two models.
    cases = {
        "adam": (CONFIG.optimizer(), optax.chain(clip, optax.adam(CONFIG.learning_rate, eps=CONFIG.adam_eps)), None),
        "adamw": (
            reward_config.optimizer(),
            optax.chain(clip, optax.adamw(reward_config.learning_rate, weight_decay=reward_config.weight_decay)),
            2,
        ),
    }
    for name, (stacked, per_array, models) in cases.items():
        start = params if models is None else jax.tree.map(lambda x: jnp.stack([x, -x]), params)
        vmapped = (lambda f: f) if models is None else jax.vmap
        states = {"stacked": vmapped(stacked.init)(start), "per_array": vmapped(per_array.init)(start)}
        moved = {"stacked": start, "per_array": start}
        for step in range(3):
            # A different gradient for every array, every step, far above the clipping norm: a
            # layer's update put in another layer's place, or moments mixed up, would show.
            leaves, treedef = jax.tree.flatten(start)
            grads = treedef.unflatten(
                [
                    10 * jax.random.normal(jax.random.fold_in(jax.random.key(step), i), x.shape, x.dtype)
                    for i, x in enumerate(leaves)
                ]
            )
            for kind, optimizer in (("stacked", stacked), ("per_array", per_array)):
                updates, states[kind] = jax.jit(vmapped(optimizer.update))(grads, states[kind], moved[kind])
                moved[kind] = optax.apply_updates(moved[kind], updates)
        for a, b in zip(_leaves(moved["stacked"]), _leaves(moved["per_array"])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=name)
        assert not np.allclose(_leaves(moved["stacked"])[0], _leaves(start)[0])
    states = {"stacked": CONFIG.optimizer().init(params)}
    # One array per role: Adam's moments no longer grow with depth.
    roles = layer_roles(params)
    assert max(len(indices) for indices in roles.values()) == num_layers
    mu = states["stacked"].inner[1][0].mu
    assert mu.keys() == roles.keys() and len(mu) < len(jax.tree.leaves(params))
    kernel = mu["trunk/layers/*/mlp/dense_h_to_4h/kernel/value"]
    assert kernel.shape == (num_layers, *params["trunk"]["layers"][0]["mlp"]["dense_h_to_4h"]["kernel"].shape)

    # Under FSDP, two runs side by side: each role's moments are sharded as its layers are, after
    # the runs' axis and the stacking axis.
    mesh = make_mesh()
    shardings = param_shardings(params, mesh, strategy="fsdp")
    state = jax.eval_shape(
        lambda: jax.tree.map(lambda x: jnp.stack([x, x]), init_state(model, CONFIG, jax.random.key(0)))
    )
    placed = driver.train_state_shardings(state, shardings, num_batch_axes=1)
    assert jax.tree.structure(placed.opt_state) == jax.tree.structure(state.opt_state)
    layer_spec = shardings["trunk"]["layers"][0]["mlp"]["dense_h_to_4h"]["kernel"].spec
    assert any(layer_spec), "fsdp shards the kernel"
    placed_mu = placed.opt_state.inner[1][0].mu
    assert placed_mu["trunk/layers/*/mlp/dense_h_to_4h/kernel/value"].spec == jax.sharding.PartitionSpec(
        None, None, *layer_spec
    )
    assert placed.opt_state.inner[1][0].count.is_fully_replicated
    stored = jax.device_put(jax.tree.map(jnp.zeros_like, state.opt_state), placed.opt_state)
    assert len(stored.inner[1][0].mu["trunk/layers/*/mlp/dense_h_to_4h/kernel/value"].sharding.device_set) == 4
    # Layers of one role placed differently cannot be stacked.
    uneven = jax.tree.map(lambda s: s, shardings)  # a copy
    uneven["trunk"]["layers"][1]["mlp"]["dense_h_to_4h"]["kernel"] = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()
    )
    with pytest.raises(ValueError, match="dense_h_to_4h/kernel/value are placed differently"):
        stacked_state_shardings(
            states["stacked"], params, uneven, other=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )


def test_stacked_shardings_put_the_stacking_axis_after_the_runs_and_name_split_roles_without_them():
    mesh = make_mesh()
    spec = jax.sharding.PartitionSpec
    # Two runs side by side (leading axis); the third layer's role is split off by its shape.
    params = {"layers": [{"w": jnp.zeros((2, *shape), jnp.float32)} for shape in ((4, 8), (4, 8), (8, 8))]}
    optimizer = stack_layers(optax.adam(1.0))
    state = jax.vmap(optimizer.init)(params)  # initialized per run, as the driver's states are
    runs_sharded = jax.sharding.NamedSharding(mesh, spec("model", None, "data"))
    placed = stacked_state_shardings(
        state,
        params,
        jax.tree.map(lambda _: runs_sharded, params),
        other=jax.sharding.NamedSharding(mesh, spec()),
        batch_axes=1,
    )
    assert (
        placed.inner[0].mu.keys() == {"layers/*/w[4x8 float32]", "layers/*/w[8x8 float32]"} == state.inner[0].mu.keys()
    )
    assert placed.inner[0].mu["layers/*/w[4x8 float32]"].spec == spec("model", None, None, "data")
    assert placed.inner[0].mu["layers/*/w[8x8 float32]"].spec == spec("model", None, "data")
    assert placed.inner[0].count.spec == spec()


def test_a_run_directory_written_before_the_stacked_optimizer_is_refused(tmp_path):
    # Its checkpoints hold Adam's moments per layer, which the stacked optimizer cannot read. (The
    # record of a new run holds "optimizer_layout": tested above.)
    record = {"config": CONFIG.to_dict(), "seeds": 0, "optimizer_layout": "stacked_layers"}
    written_before = {"config": {**CONFIG.to_dict(), "flat_optimizer": False}, "seeds": 0}
    assert driver._changed_fields(written_before, record) == ["config.flat_optimizer", "optimizer_layout"]
    assert driver._changed_fields(json.loads(json.dumps(record)), record) == []
    # A changed config is named field by field.
    tuned = {**record, "config": {**CONFIG.to_dict(), "learning_rate": CONFIG.learning_rate * 2, "kl_coef": 0.5}}
    assert driver._changed_fields(tuned, record) == ["config.kl_coef", "config.learning_rate"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(written_before))
    (old / "metrics.jsonl").write_text('{"iteration": 0, "seed": 0}\n')
    with pytest.raises(ValueError, match="optimizer_layout.*written before Adam ran on the layers stacked by role"):
        rlhf_task.run_rlhf(policy(), ground_truth, None, *prompts(), CONFIG, num_iterations=1, out_dir=old, log=None)
    assert json.loads((old / "config.json").read_text()) == written_before
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "metrics.jsonl"]
    (old / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json cannot be read as a run's config"):
        rlhf_task.run_rlhf(policy(), ground_truth, None, *prompts(), CONFIG, num_iterations=1, out_dir=old, log=None)
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "metrics.jsonl"]
    # A directory with no iteration of its run (stopped while compiling) may start another.
    (old / "checkpoints").mkdir()
    assert driver._holds_progress(old)
    (old / "metrics.jsonl").write_text("")
    assert not driver._holds_progress(old)
    (old / "checkpoints" / "2").mkdir()
    assert driver._holds_progress(old)


def _record_rollouts(monkeypatch) -> list:
    """A list that receives, as NumPy arrays, every rollout the update phase of an iteration built
    after this call is given (``prompt, prompt_mask, response, response_mask, old_logp, ref_logp,
    advantages``)."""
    from jaxrm.train import rlhf

    rollouts = []
    real = rlhf.make_phases

    def spying(*args, **kwargs):
        phases = real(*args, **kwargs)

        def optimize(params, opt_state, rollout, key):
            jax.debug.callback(lambda *arrays: rollouts.append([np.asarray(a) for a in arrays]), *rollout)
            return phases.optimize(params, opt_state, rollout, key)

        return phases._replace(optimize=optimize)

    monkeypatch.setattr(rlhf, "make_phases", spying)
    return rollouts


def _task_against_another_reference(*, mean: float, std: float):
    """``(reference, (tokens, mask), data)``: the task's prompts and ``TrainData`` whose KL
    reference is a model other than the policy (so that the KL is not 0), with no teacher
    parameters and the given reward statistics."""
    reference = CausalLM(preset("tiny"), rngs=nnx.Rngs(5))
    tokens, mask = prompts()
    data = TrainData(
        jnp.asarray(tokens), jnp.asarray(mask), nnx.state(reference), None, jnp.float32(mean), jnp.float32(std)
    )
    return reference, (tokens, mask), data


def test_a_kl_term_in_the_loss_and_the_official_normalisation_by_hand(monkeypatch):
    """One minibatch, one epoch, token ratios: every ratio is 1, so the loss is the token mean of
    ``-A`` plus ``kl_coef`` times the token mean of k3 between the rollout's log-probs and the
    reference's; the advantages are RLOO's over ``(r - mean) * rsqrt(std^2 + 1e-8)``, which at
    ``std = 1e-4`` differs from ``(r - mean) / (std + 1e-8)`` by sqrt 2."""
    rollouts = _record_rollouts(monkeypatch)
    config = dataclasses.replace(
        CONFIG,
        kl_placement="loss",
        kl_estimator="k3",
        ratio_level="token",
        kl_coef=0.5,
        reward_normalization="rsqrt_var",
    )
    model = policy()
    graphdef, _ = nnx.split(model)
    _, _, data = _task_against_another_reference(mean=0.5, std=1e-4)
    _, out = jax.jit(make_iteration(config, graphdef, ground_truth))(init_state(model, config, jax.random.key(0)), data)
    jax.effects_barrier()
    (prompt, prompt_mask, response, response_mask, old_logp, ref_logp, advantages) = rollouts[0]
    k = config.samples_per_prompt
    raw = np.asarray(ground_truth(None, prompt, prompt_mask, response, response_mask), np.float64).reshape(-1, k)
    normalized = (raw - 0.5) / np.sqrt(1e-8 + 1e-8)
    rloo = k / (k - 1) * (normalized - normalized.mean(-1, keepdims=True))
    assert np.abs(rloo).max() > 100
    np.testing.assert_allclose(advantages, rloo.reshape(-1), rtol=1e-4, atol=1e-2)
    tokens_total = response_mask.sum()
    log_ratio = np.where(response_mask, ref_logp - old_logp, 0.0)
    kl = np.sum(np.where(response_mask, np.expm1(log_ratio) - log_ratio, 0.0)) / tokens_total
    surrogate = -np.sum(advantages[:, None].astype(np.float64) * response_mask) / tokens_total
    assert kl > 1e-2
    np.testing.assert_allclose(float(out["loss"]), surrogate + 0.5 * kl, rtol=0, atol=1e-3)


def test_the_rollout_the_update_receives_matches_a_computation_by_hand(monkeypatch):
    """A spy on the update phase records the rollout of two iterations, which is then rebuilt
    with independent code: the window of prompts (each repeated k times, its samples adjacent),
    the old and reference log-probs (a plain forward pass at the sampling temperature, unfiltered),
    and the advantages (GRPO over the normalised, clipped teacher rewards less the k3 KL)."""
    from jaxrm.models.sampling import Samples, sequence_log_probs

    rollouts = _record_rollouts(monkeypatch)

    def teacher(params, prompt, prompt_mask, response, response_mask):  # depends on the prompt too
        return ground_truth(params, prompt, prompt_mask, response, response_mask) + 0.01 * prompt[:, -1]

    config = dataclasses.replace(
        CONFIG,
        advantage_estimator="grpo",
        kl_estimator="k3",
        reward_normalization="rsqrt_var",
        reward_clip=1.5,
        temperature=0.7,
        top_k=20,
    )
    model = policy()
    graphdef, params = nnx.split(model)
    mean, std = 0.5, 0.2
    reference, (tokens, mask), data = _task_against_another_reference(mean=mean, std=std)
    iteration = jax.jit(make_iteration(config, graphdef, teacher))
    state = init_state(model, config, jax.random.key(0))
    policies = []  # the policy each rollout was sampled from
    for _ in range(2):
        policies.append(nnx.merge(graphdef, state.params))
        state, out = iteration(state, data)
        assert float(out["clip_fraction"]) == 0.0  # one minibatch, one epoch: every ratio is 1
    jax.effects_barrier()
    assert len(rollouts) == 2
    k, num_prompts = config.samples_per_prompt, config.prompts_per_iteration
    for step, (prompt, prompt_mask, response, response_mask, old_logp, ref_logp, advantages) in enumerate(rollouts):
        window = np.arange(step * num_prompts, (step + 1) * num_prompts)
        np.testing.assert_array_equal(prompt, np.repeat(tokens[window], k, axis=0))
        np.testing.assert_array_equal(prompt_mask, np.repeat(mask[window], k, axis=0))
        samples = Samples(
            tokens=jnp.asarray(response), log_probs=jnp.zeros(response.shape), mask=jnp.asarray(response_mask)
        )
        for logp, model_there in ((old_logp, policies[step]), (ref_logp, reference)):
            expected = sequence_log_probs(
                model_there, jnp.asarray(prompt), jnp.asarray(prompt_mask), samples, temperature=0.7
            )
            np.testing.assert_allclose(logp, expected, atol=2e-5)
        raw = np.asarray(teacher(None, prompt, prompt_mask, response, response_mask), np.float64).reshape(
            num_prompts, k
        )
        normalized = (raw - mean) / np.sqrt(std**2 + 1e-8)
        assert np.any(np.abs(normalized) > 1.5) and np.any(np.abs(normalized) < 1.5)  # the clip acts on some
        log_ratio = np.where(response_mask, ref_logp - old_logp, 0.0)
        kl = np.sum(np.expm1(log_ratio) - log_ratio, axis=-1).reshape(num_prompts, k)
        rewards = np.clip(normalized, -1.5, 1.5) - config.kl_coef * kl
        centered = rewards - rewards.mean(-1, keepdims=True)
        by_hand = centered / (rewards.std(-1, ddof=1, keepdims=True) + 1e-4)
        np.testing.assert_allclose(advantages, by_hand.reshape(-1), rtol=1e-4, atol=1e-4)
