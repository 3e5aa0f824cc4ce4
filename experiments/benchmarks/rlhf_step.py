"""Benchmark: full RLOO iterations with jaxrm against TRL's ``RLOOTrainer`` on the same CPU.

One iteration = generation (``--prompts`` prompts x k = 2 responses of exactly ``--new-tokens``
tokens, temperature 1), scoring by a reward model, reference log-probs, and one optimizer update
on the sequence-level clipped surrogate (RLOO, KL 0.05 in the reward). Both sides use a
Pythia-shaped policy and reward model of the same shape (default ``pythia-10m``, ~9M parameters
each), float32, 16-token prompts, with the same random weights (built with ``transformers``,
loaded into jaxrm with ``load_hf``). jaxrm runs in each layer layout of ``--layouts``: ``scanned``
(the default ``TransformerConfig(scan_layers=True)``, whose compile time grows little with
depth) and ``unrolled`` (``scan_layers=False``: no per-layer slices of stacked parameters and
caches to copy, a longer compile).

Reported: the seconds of each phase of jaxrm's iteration (sampling, the reference's log-probs,
the reward model, the updates), each compiled and timed on its own; generated tokens per second
(median over timed iterations after a warm-up) and model
FLOP utilisation, MFU = model FLOPs per iteration / time / matmul peak, where the peak is a large
float32 matrix product timed in the same run. Model FLOPs per iteration
(``common.model_flops_per_iteration``) count the work jaxrm's algorithm does: each forward pass
(generation, the reference's log-probs, the reward model, the policy in the update) at ``2 x``
the blocks' parameters per position, the unembedding only on the positions whose logits are
used, causal attention, and the update's backward pass at twice its forward; recomputation is
not counted. TRL runs with ``gradient_checkpointing=False`` (its default is True, which costs
one more forward pass), but it still does one pass more than jaxrm: it recomputes the rollout's
log-probs with the policy, where jaxrm takes the sampler's (about 17% of jaxrm's work at
``pythia-10m``). Its MFU is computed on jaxrm's count, so it understates TRL's own utilisation.
``--microbatches m`` accumulates each update's gradient over ``m`` microbatches on both sides
(jaxrm's ``RLHFConfig.microbatches``; TRL's ``gradient_accumulation_steps`` and
``steps_per_generation``, with a per-device batch ``1/m`` of the responses): one generation and one
optimizer step per iteration either way.

Run from the repository root: ``python -m experiments.benchmarks.rlhf_step [--help]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from experiments.benchmarks.common import (
    HelpFormatter,
    K,
    allocator_line,
    allocator_settings,
    check_arguments,
    compiled_timings,
    matmul_peak_flops,
    model_flops_per_iteration,
    write_record,
)
from experiments.benchmarks.generate import LAYOUTS, build_pair, hf_config
from jaxrm.models import preset
from jaxrm.models.hf import load_hf
from jaxrm.train.rlhf import (
    RLHFConfig,
    TrainData,
    by_microbatches,
    init_state,
    make_iteration,
    make_phases,
    reward_model_fn,
)

PROMPT_LEN = 16


def jaxrm_iterations(
    directory: Path, *, prompts, new_tokens, iterations, scan_layers: bool, microbatches: int
) -> tuple[list[float], float, dict]:
    config = RLHFConfig(
        prompts_per_iteration=prompts,
        samples_per_prompt=K,
        max_new_tokens=new_tokens,
        learning_rate=1e-6,
        microbatches=microbatches,
    )
    policy = load_hf(directory / "policy", scan_layers=scan_layers)
    reward_model = load_hf(directory / "reward", head="reward", scan_layers=scan_layers)
    graphdef, params = nnx.split(policy)
    reward_graphdef, reward_params = nnx.split(reward_model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, policy.config.vocab_size, (prompts, PROMPT_LEN)), jnp.int32)
    data = TrainData(tokens, jnp.ones(tokens.shape, bool), params, reward_params, jnp.float32(0), jnp.float32(1))
    iteration = make_iteration(config, graphdef, reward_model_fn(reward_graphdef))
    state = init_state(policy, config, jax.random.key(0))
    began = time.perf_counter()
    step = jax.jit(iteration).lower(state, data).compile()
    compile_s = time.perf_counter() - began
    state = jax.block_until_ready(step(state, data)[0])  # warm-up, finished before the timer starts
    times = []
    for _ in range(iterations):
        began = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - began)
        assert float(metrics["response_length"]) == new_tokens
    return times, compile_s, phase_seconds(config, graphdef, reward_model_fn(reward_graphdef), state, data, iterations)


def phase_seconds(config, graphdef, reward_fn, state, data, repeats: int) -> dict[str, float]:
    """Median seconds of each phase of an iteration (:func:`jaxrm.train.rlhf.make_phases`), each
    compiled and run on its own on the inputs one iteration would give it."""
    phases = make_phases(config, graphdef)
    prompt = jnp.repeat(data.prompts, K, axis=0)
    prompt_mask = jnp.repeat(data.prompt_mask, K, axis=0)
    sample_args = (state.params, prompt, prompt_mask, jax.random.key(1))
    sample_times, _, samples = compiled_timings(phases.sample, *sample_args, repeats=repeats)
    sequences = (prompt, prompt_mask, samples.tokens, samples.mask)
    advantages = jax.random.normal(jax.random.key(2), (prompt.shape[0],))
    rollout = (*sequences, samples.log_probs, samples.log_probs, advantages)
    calls = {
        "reference": (phases.log_probs, (data.ref_params, *sequences)),
        "reward": (by_microbatches(reward_fn, config.microbatches_per_rollout), (data.reward_params, *sequences)),
        "update": (phases.optimize, (state.params, state.opt_state, rollout, jax.random.key(3))),
    }
    seconds = {"sampling": statistics.median(sample_times)}
    for name, (fn, args) in calls.items():
        seconds[name] = statistics.median(compiled_timings(fn, *args, repeats=repeats)[0])
    return seconds


def _word_tokenizer(vocab_size: int):
    """A whitespace tokenizer over the words t0 .. t{V-1} (t0 = padding, t1 = end of sequence)."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1")


def trl_iterations(shape, directory: Path, *, prompts, new_tokens, iterations, microbatches: int) -> list[float]:
    import datasets
    from trl import RLOOConfig, RLOOTrainer

    vocab = preset(shape).vocab_size
    tokenizer = _word_tokenizer(vocab)
    rng = np.random.default_rng(0)
    texts = [" ".join(f"t{i}" for i in rng.integers(3, vocab, PROMPT_LEN)) for _ in range(prompts)]
    dataset = datasets.Dataset.from_dict({"prompt": texts * (iterations + 2)})
    policy = transformers.GPTNeoXForCausalLM.from_pretrained(directory / "policy")
    reward = transformers.GPTNeoXForSequenceClassification.from_pretrained(directory / "reward", num_labels=1)

    class StepTimes(transformers.TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.began)

    args = RLOOConfig(
        output_dir=str(directory / "trl"),
        # One generation of prompts x K responses, then one optimizer step over `microbatches`
        # accumulated micro-steps (TRL's micro-steps each take a slice of the generation).
        per_device_train_batch_size=prompts * K // microbatches,
        num_generations=K,
        steps_per_generation=microbatches,
        gradient_accumulation_steps=microbatches,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.05,
        epsilon=0.2,
        learning_rate=1e-6,
        max_steps=iterations + 1,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimes()
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times[1:]  # the first step warms up


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.rlhf_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--shape", default="pythia-10m", help="jaxrm.models preset of the policy and reward model")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per iteration (k = 2 samples each)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per response")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per side")
    parser.add_argument(
        "--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="jaxrm layer layouts to time"
    )
    parser.add_argument(
        "--microbatches",
        type=int,
        default=1,
        help="gradient accumulation on both sides: jaxrm's RLHFConfig.microbatches, TRL's gradient_accumulation_steps",
    )
    parser.add_argument("--skip-trl", action="store_true", help="only time jaxrm (e.g. on a GPU machine)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/rlhf_step.json"), help="JSON record")
    args = parser.parse_args(argv)
    check_arguments(parser, args, at_least={"prompts": 1, "new_tokens": 1, "iterations": 1}, shapes=[args.shape])
    if args.microbatches < 1 or (args.prompts * K) % args.microbatches:
        parser.error(f"--microbatches must be >= 1 and divide the {args.prompts * K} responses of an iteration")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(allocator_line())
    peak = matmul_peak_flops()
    flops = model_flops_per_iteration(
        preset(args.shape), sequences=args.prompts * K, prompt_len=PROMPT_LEN, new_tokens=args.new_tokens
    )
    tokens = args.prompts * K * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_pair(args.shape, directory / "policy", seed=0)
        torch.manual_seed(1)
        transformers.GPTNeoXForSequenceClassification(hf_config(args.shape, num_labels=1)).save_pretrained(
            directory / "reward"
        )
        result = {
            "shape": args.shape,
            "prompts": args.prompts,
            "k": K,
            "new_tokens": args.new_tokens,
            "microbatches": args.microbatches,
            "matmul_peak_gflops": peak / 1e9,
            "model_gflops_per_iteration": flops / 1e9,
            "allocator": allocator_settings(),
            "jaxrm": {},
        }
        for layout in dict.fromkeys(args.layouts):
            ours, compile_s, phases = jaxrm_iterations(
                directory,
                prompts=args.prompts,
                new_tokens=args.new_tokens,
                iterations=args.iterations,
                scan_layers=LAYOUTS[layout],
                microbatches=args.microbatches,
            )
            iteration_s = statistics.median(ours)
            jaxrm = result["jaxrm"][layout] = {
                "iteration_s": iteration_s,
                "compile_s": compile_s,
                "phase_s": phases,
                "tokens_per_s": tokens / iteration_s,
                "mfu": flops / iteration_s / peak,
            }
            print(
                f"jaxrm, {layout} layers: {iteration_s:.2f} s/iteration, {jaxrm['tokens_per_s']:.0f} tokens/s, MFU "
                f"{jaxrm['mfu']:.1%} of a {peak / 1e9:.0f} GFLOP/s matmul peak (compile {compile_s:.1f} s)"
            )
            print(
                "  phases, each compiled alone: "
                + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
                + f" (sum {sum(phases.values()):.2f} s)"
            )
        if not args.skip_trl:
            theirs = trl_iterations(
                args.shape,
                directory,
                prompts=args.prompts,
                new_tokens=args.new_tokens,
                iterations=args.iterations,
                microbatches=args.microbatches,
            )
            result["trl_iteration_s"] = statistics.median(theirs)
            result["trl_tokens_per_s"] = tokens / result["trl_iteration_s"]
            result["trl_mfu"] = flops / result["trl_iteration_s"] / peak
            for jaxrm in result["jaxrm"].values():
                jaxrm["speedup"] = result["trl_iteration_s"] / jaxrm["iteration_s"]
            print(
                f"TRL RLOOTrainer: {result['trl_iteration_s']:.2f} s/iteration, {result['trl_tokens_per_s']:.0f} "
                f"tokens/s, MFU {result['trl_mfu']:.1%}; jaxrm speed-up "
                + ", ".join(f"{layout} {jaxrm['speedup']:.2f}x" for layout, jaxrm in result["jaxrm"].items())
            )
    write_record(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
