"""Benchmark: batched sampling with jaxrm's KV-cache sampler against Hugging Face ``generate``.

For each model shape, a random ``GPTNeoXForCausalLM`` is built with ``transformers`` (no download),
saved as safetensors and loaded with :func:`jaxrm.models.load_hf`, so both sides run the same
weights. Both draw ``--new-tokens`` tokens for ``--batch`` prompts of ``--prompt-len`` tokens with
plain ancestral sampling (temperature 1, no top-k/top-p, no EOS, so every row generates every
token) on the same CPU, float32. jaxrm runs in both layer layouts (``--layouts``): ``scanned``
(the default ``TransformerConfig(scan_layers=True)``: one compiled block for every layer) and
``unrolled`` (``scan_layers=False``: each layer its own code and its own KV-cache array, which
attention reads without a copy). jaxrm's first call (compile plus one generation) is reported
separately; the figures are the median over ``--repeats`` timed runs of each, alternating, after
one warm-up. As a check that both run the same model, greedy continuations of the prompts are
compared token by token.

Run from the repository root: ``python -m experiments.benchmarks.generate [--help]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from experiments.benchmarks.common import (
    HelpFormatter,
    allocator_line,
    allocator_settings,
    alternating_rounds,
    check_arguments,
    seconds,
    write_record,
)
from jaxrm.models import preset
from jaxrm.models.hf import load_hf
from jaxrm.models.sampling import sample

DEFAULT_SHAPES = ("pythia-10m", "pythia-70m")
LAYOUTS = {"scanned": True, "unrolled": False}  # name: TransformerConfig.scan_layers
HF = "hf_generate"  # the baseline's name among the timed sides (not a layout name)


def hf_config(shape: str, **changes):
    """The ``transformers.GPTNeoXConfig`` of a jaxrm preset (no BOS/EOS: every row generates every token)."""
    config = preset(shape)
    values = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        rotary_pct=config.rotary_pct,
        max_position_embeddings=config.max_position,
        use_parallel_residual=config.parallel_residual,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPTNeoXConfig(**{**values, **changes})


def build_pair(shape: str, directory: Path, seed: int = 0):
    """A random HF model of a preset's shape, and the same weights loaded into jaxrm."""
    torch.manual_seed(seed)
    hf_model = transformers.GPTNeoXForCausalLM(hf_config(shape)).eval()
    hf_model.save_pretrained(directory)
    return hf_model, load_hf(directory)


def hf_generate(hf_model, prompts, new_tokens: int, *, greedy: bool = False):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=not greedy,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def run_shape(
    shape: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, layouts=tuple(LAYOUTS), log=print
) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        hf_model, model = build_pair(shape, Path(directory))
        models = {name: load_hf(directory, scan_layers=LAYOUTS[name]) for name in layouts}
    vocab = model.config.vocab_size
    prompts = np.random.default_rng(0).integers(1, vocab, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)

    def generation(model):
        return lambda: jax.block_until_ready(sample(model, prompts, mask, jax.random.key(0), max_new_tokens=new_tokens))

    ours = {name: generation(model) for name, model in models.items()}
    first_call_s = {name: seconds(run) for name, run in ours.items()}
    hf_generate(hf_model, prompts, 2)  # warm-up
    times = alternating_rounds(
        {
            **{name: lambda run=run: seconds(run) for name, run in ours.items()},
            HF: lambda: seconds(lambda: hf_generate(hf_model, prompts, new_tokens)),
        },
        rounds=repeats,
    )

    greedy_len = min(new_tokens, 16)
    greedy_hf = hf_generate(hf_model, prompts, greedy_len, greedy=True)
    tokens = batch * new_tokens
    hf_s = statistics.median(times[HF])
    result = {
        "shape": shape,
        "params": model.config.num_params(),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "hf_s": hf_s,
        "hf_tokens_per_s": tokens / hf_s,
        "jaxrm": {},
    }
    for name, model in models.items():
        greedy_ours = np.asarray(
            sample(model, prompts, mask, jax.random.key(0), max_new_tokens=greedy_len, temperature=0.0).tokens
        )
        jax_s = statistics.median(times[name])
        ours_result = result["jaxrm"][name] = {
            "s": jax_s,
            "tokens_per_s": tokens / jax_s,
            "first_call_s": first_call_s[name],
            "speedup": hf_s / jax_s,
            "greedy_first_token_agreement": float(np.mean(greedy_ours[:, 0] == greedy_hf[:, 0])),
            "greedy_token_agreement": float(np.mean(greedy_ours == greedy_hf)),
        }
        log(
            f"{shape:>11} ({result['params'] / 1e6:.1f}M params), {name:>8} layers: jaxrm "
            f"{ours_result['tokens_per_s']:8.0f} tok/s (first call {first_call_s[name]:.1f} s), HF generate "
            f"{result['hf_tokens_per_s']:8.0f} tok/s, speed-up {ours_result['speedup']:.2f}x; greedy tokens "
            f"identical {ours_result['greedy_token_agreement']:.1%}"
        )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="jaxrm.models presets to run")
    parser.add_argument("--batch", type=int, default=32, help="sequences per call")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds in which Hugging Face and each jaxrm layout take turns (the median of each is reported)",
    )
    parser.add_argument(
        "--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="jaxrm layer layouts to time"
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/generate.json"), help="JSON record")
    args = parser.parse_args(argv)
    check_arguments(
        parser, args, at_least={"batch": 1, "prompt_len": 1, "new_tokens": 1, "repeats": 1}, shapes=args.shapes
    )
    torch.set_num_threads(os.cpu_count())
    transformers.logging.set_verbosity_error()  # its note that top_k=0 is a no-op flag is expected here
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, jax {jax.__version__} ({jax.devices()[0].platform})"
    )
    print(allocator_line())
    results = [
        run_shape(
            shape,
            batch=args.batch,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            layouts=tuple(dict.fromkeys(args.layouts)),
        )
        for shape in args.shapes
    ]
    write_record(args.out, {"cores": os.cpu_count(), "allocator": allocator_settings(), "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
