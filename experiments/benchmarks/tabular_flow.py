"""Benchmark: exact tabular dynamics.

1. ``t_gamma`` for a batch of tabular problems (default 4096 problems, |Y| = 64, float64,
   rtol 1e-8, atol 1e-10) with :func:`jaxrm.flow.first_passage`, on one CPU device and on one
   device per core (a work queue on each), against SciPy's
   ``solve_ivp(method="DOP853")`` at the same tolerances, two ways:
   - per problem, with a terminal event (SciPy's own event location);
   - as one stacked system (shared steps), stepping DOP853 by hand and locating every
     problem's crossing on that step's dense output by vectorized bisection.
   jaxrm and per-problem SciPy take turns for ``--repeats`` rounds: a round of jaxrm is the mean of
   as many back-to-back calls as fill about a second, one of SciPy a single pass (1-8 s); each
   side's figure is its best round, as ``timeit`` reports (the round least disturbed by the rest
   of the machine), and the speed-up's range over the paired rounds is printed too. The stacked system runs once, on ``--stacked-problems`` scaled up. Reports both
   speed-ups (JAX compile time separately) and the largest relative difference.
2. Discrete exact-gradient steps (S = 1024, |Y| = 4096, float32, SGD, KL penalty), prompts
   sharded over all devices: the rate of a step expressed as the memory traffic of a step that
   streams its arrays (read logits and the KL-folded rewards ``r + lam log pi_ref``, which the
   ascent forms once before its loop; write logits), against two bandwidths measured in the same
   run: a one-thread NumPy ``memcpy``, and an XLA program that does only that traffic on the same
   sharded arrays and devices (the stricter: it uses every device, and its arrays partly fit in
   the caches). On several CPU devices the ascent runs each device's rows in blocks through all
   the steps, reading a block from cache rather than streaming it (jaxrm.ascent), so its figure
   is a rate, not traffic it moves. The three take turns for ``--repeats`` rounds (best rounds).

Run from the repository root: ``python -m experiments.benchmarks.tabular_flow [--help]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from pathlib import Path

# One XLA CPU device per core, so first_passage can run a work queue on each (set before jax).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={os.cpu_count()}".strip()
    )

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments.benchmarks.common import HelpFormatter, alternating_rounds, check_arguments, write_record  # noqa: E402
from experiments.benchmarks.common import seconds as measure_seconds  # noqa: E402
from jaxrm import ascent, flow  # noqa: E402


def make_problems(num_problems, num_outputs, seed=0):
    """Random logits N(0, 1), rewards U(-1, 1), gamma = half of the largest possible gain."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_problems, num_outputs))
    rewards = rng.uniform(-1, 1, size=(num_problems, num_outputs))
    probs = _softmax(logits)
    start = (probs * rewards).sum(-1)
    gamma = 0.5 * (rewards.max(-1) - start)
    return logits, rewards, start, gamma


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _field(logits, rewards):
    """Tabular gradient flow of one prompt (lam = 0): pi * (r - E_pi r), rows independent."""
    p = _softmax(logits)
    return p * (rewards - (p * rewards).sum(-1, keepdims=True))


def scipy_per_problem(logits, rewards, start, gamma, rtol, atol, t_max):
    from scipy.integrate import solve_ivp

    out = np.full(len(logits), np.inf)
    for i in range(len(logits)):

        def event(t, y, i=i):
            return (_softmax(y) * rewards[i]).sum() - start[i] - gamma[i]

        event.terminal, event.direction = True, 1
        sol = solve_ivp(
            lambda t, y, i=i: _field(y, rewards[i]),
            (0.0, t_max),
            logits[i],
            method="DOP853",
            rtol=rtol,
            atol=atol,
            events=event,
        )
        if len(sol.t_events[0]):
            out[i] = sol.t_events[0][0]
    return out


def scipy_stacked(logits, rewards, start, gamma, rtol, atol, t_max, bisections=60):
    from scipy.integrate import DOP853

    n, y = logits.shape
    solver = DOP853(
        lambda t, v: _field(v.reshape(n, y), rewards).ravel(), 0.0, logits.ravel(), t_max, rtol=rtol, atol=atol
    )
    out = np.full(n, np.inf)
    open_ = np.ones(n, bool)
    steps = 0
    while open_.any() and solver.status == "running":
        solver.step()
        steps += 1
        state = solver.y.reshape(n, y)
        crossed = open_ & ((_softmax(state) * rewards).sum(-1) - start - gamma >= 0)
        if crossed.any():
            dense = solver.dense_output()
            idx = np.nonzero(crossed)[0]
            coeffs = dense.F.reshape(len(dense.F), n, y)[:, idx]
            y_old = dense.y_old.reshape(n, y)[idx]
            lo, hi = np.zeros(len(idx)), np.ones(len(idx))
            for _ in range(bisections):  # all crossing problems at once, on the step's interpolant
                mid = 0.5 * (lo + hi)
                value = _dop853_eval(coeffs, y_old, mid)
                above = (_softmax(value) * rewards[idx]).sum(-1) - start[idx] - gamma[idx] >= 0
                hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
            out[idx] = dense.t_old + hi * dense.h
            open_[idx] = False
    return out, steps


def _dop853_eval(coeffs, y_old, x):
    """SciPy's DOP853 dense-output polynomial, with one position ``x`` per problem."""
    x = x[:, None]
    value = np.zeros_like(y_old)
    for i, f in enumerate(coeffs[::-1]):
        value += f
        value *= x if i % 2 == 0 else 1 - x
    return value + y_old


def bench_t_gamma(args):
    logits, rewards, start, gamma = make_problems(args.problems, args.outputs, args.seed)
    report = {"problems": args.problems, "outputs": args.outputs, "rtol": args.rtol, "atol": args.atol}
    k = min(args.scipy_problems, args.problems)
    timers = {}
    for name, devices in (("one_device", jax.devices()[:1]), ("all_devices", jax.devices())):
        run = functools.partial(
            flow.first_passage,
            logits[:, None],
            rewards[:, None],
            gamma[:, None],
            rtol=args.rtol,
            atol=args.atol,
            t_max=args.t_max,
            devices=devices,
        )
        first = measure_seconds(lambda: jax.block_until_ready(run()))
        once = measure_seconds(lambda: jax.block_until_ready(run()))
        # As timeit does: a round is the mean of enough back-to-back calls to last about a second
        # (a single 10 ms call is at the mercy of the scheduler; single calls varied 12-17 ms at
        # 512 problems on two devices).
        calls = max(1, round(1.0 / once))
        timers[name] = lambda run=run, calls=calls: (
            measure_seconds(lambda: [jax.block_until_ready(run()) for _ in range(calls)]) / calls
        )
        report[name] = {"devices": len(devices), "calls_per_round": calls, "compile_seconds": first - once}
    result = run()  # on every device: the t_gamma compared with SciPy's
    scipy_times = []

    def scipy_round():
        began = time.perf_counter()
        scipy_times.append(
            scipy_per_problem(logits[:k], rewards[:k], start[:k], gamma[:k], args.rtol, args.atol, args.t_max)
        )
        return (time.perf_counter() - began) * args.problems / k

    times = alternating_rounds(timers | {"scipy_per_problem": scipy_round}, rounds=args.repeats)
    per_problem = min(times["scipy_per_problem"])
    t_scipy = scipy_times[-1]
    for name in timers:
        seconds = min(times[name])
        report[name].update(seconds=seconds, round_seconds=times[name])
        print(
            f"jaxrm first_passage on {report[name]['devices']} device(s): {seconds:.3f} s for {args.problems} "
            f"problems (compile {report[name]['compile_seconds']:.1f} s; best of {args.repeats} rounds, "
            f"each the mean of {report[name]['calls_per_round']} calls)"
        )
    t_jax = np.asarray(result.t_gamma)[:, 0]
    report.update(
        jax_steps_mean=float(np.mean(result.num_steps)),
        jax_steps_max=int(np.max(result.num_steps)),
        reached=int(np.isfinite(t_jax).sum()),
    )
    print(
        f"ODE steps per problem: mean {report['jax_steps_mean']:.1f}, max {report['jax_steps_max']}; "
        f"{report['reached']} reached"
    )

    m = min(args.stacked_problems, args.problems)
    t0 = time.perf_counter()
    t_stacked, stacked_steps = scipy_stacked(
        logits[:m], rewards[:m], start[:m], gamma[:m], args.rtol, args.atol, args.t_max
    )
    stacked = (time.perf_counter() - t0) * args.problems / m
    best = min(per_problem, stacked)

    def diff(a, b):
        """Largest relative difference where both are finite; inf if they disagree on finiteness."""
        if (np.isfinite(a) != np.isfinite(b)).any():
            return float("inf")
        both = np.isfinite(a)
        return float(np.max(np.abs(a[both] - b[both]) / np.abs(b[both]), initial=0.0))

    report.update(
        scipy_per_problem_seconds=per_problem,
        scipy_per_problem_round_seconds=times["scipy_per_problem"],
        scipy_per_problem_timed=k,
        scipy_stacked_seconds=stacked,
        scipy_stacked_steps=stacked_steps,
        scipy_stacked_timed=m,
        max_rel_diff_per_problem=diff(t_jax[:k], t_scipy),
        max_rel_diff_stacked=diff(t_jax[:m], t_stacked),
    )
    print(
        f"SciPy DOP853 per problem: {per_problem:.2f} s (best of {args.repeats} rounds, taking turns with jaxrm's)"
        + (f" (timed on {k}, scaled)" if k < args.problems else "")
        + f"; max rel diff to jaxrm {report['max_rel_diff_per_problem']:.1e}"
    )
    print(
        f"SciPy DOP853 stacked:     {stacked:.2f} s ({stacked_steps} shared steps"
        + (f"; timed on {m}, scaled linearly, which favours SciPy" if m < args.problems else "")
        + f"); max rel diff to jaxrm {report['max_rel_diff_stacked']:.1e}"
    )
    for name in timers:
        entry = report[name]
        paired = np.divide(times["scipy_per_problem"], times[name])
        entry.update(
            speedup_vs_per_problem=per_problem / entry["seconds"],
            speedup_vs_per_problem_range=[float(paired.min()), float(paired.max())],
            speedup_vs_stacked=stacked / entry["seconds"],
            speedup_vs_best=best / entry["seconds"],
        )
        goal = 50 if entry["devices"] == 1 else 100
        print(
            f"jaxrm on {entry['devices']} device(s) is {entry['speedup_vs_best']:.1f}x faster than the better "
            f"SciPy way ({entry['speedup_vs_per_problem']:.1f}x per problem, {paired.min():.1f}-{paired.max():.1f}x "
            f"round by round; {entry['speedup_vs_stacked']:.1f}x stacked; goal >= {goal}x)"
        )
    return report


def copy_timer(num_bytes, copies=10):
    """A timer of a one-thread NumPy ``memcpy`` of ``num_bytes`` (half read, half written): the
    best of ``copies`` back-to-back copies, in seconds."""
    src = np.ones(num_bytes // 16)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return lambda: min(measure_seconds(lambda: np.copyto(dst, src)) for _ in range(copies))


def streaming_timer(logits, rewards, steps):
    """A timer of an XLA program that does only the ascent's minimal traffic, on the same sharded
    arrays and devices: ``steps`` times read two arrays and write one (seconds)."""

    @jax.jit
    def stream(x, r):
        # The step index inside the arithmetic keeps XLA from hoisting `1e-3 * r` out of the loop.
        return jax.lax.fori_loop(0, steps, lambda i, x: 0.999 * x + 1e-3 * (r - i), x)

    jax.block_until_ready(stream(logits, rewards))
    return lambda: measure_seconds(lambda: jax.block_until_ready(stream(logits, rewards)))


def bench_ascent(args):
    s, y, steps = args.ascent_prompts, args.ascent_outputs, args.ascent_steps
    dtype = jnp.float32
    keys = jax.random.split(jax.random.key(args.seed), 2)
    # Prompts sharded over a `data` mesh axis of all devices; jit propagates the sharding.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    prompts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    logits = jax.device_put(jax.random.normal(keys[0], (s, y), dtype), prompts)
    rewards = jax.device_put(jax.random.uniform(keys[1], (s, y), dtype, -1.0, 1.0), prompts)
    optimizer = optax.sgd(0.1)  # one object: the optimizer is static, a new one recompiles
    run = lambda: ascent.exact_gradient_ascent(  # noqa: E731
        logits, rewards, optimizer=optimizer, num_steps=steps, kl_coef=jnp.asarray(0.05, dtype), track=False
    )
    jax.block_until_ready(run())
    array_bytes = s * y * jnp.dtype(dtype).itemsize
    # Bytes moved per step: read logits and the folded rewards, write logits.
    step_bytes = 3 * array_bytes
    times = alternating_rounds(
        {
            "ascent": lambda: measure_seconds(lambda: jax.block_until_ready(run())),
            "memcpy": copy_timer(2 * step_bytes),
            "streaming": streaming_timer(logits, rewards, steps),
        },
        rounds=args.repeats,
    )
    seconds = min(times["ascent"])
    blocked = ascent._row_blocked_layout(logits, optimizer) is not None
    traffic = step_bytes * steps / seconds
    memcpy = 2 * step_bytes / min(times["memcpy"])
    streaming = step_bytes * steps / min(times["streaming"])
    paired = step_bytes * steps / np.asarray(times["ascent"]) / (2 * step_bytes / np.asarray(times["memcpy"]))
    report = {
        "prompts": s,
        "outputs": y,
        "dtype": "float32",
        "steps": steps,
        "devices": jax.device_count(),
        "rounds": args.repeats,
        "seconds_per_step": seconds / steps,
        "traffic_bytes_per_s": traffic,
        "copy_bandwidth_bytes_per_s": memcpy,
        "fraction_of_copy_bandwidth": traffic / memcpy,
        "fraction_of_copy_bandwidth_range": [float(paired.min()), float(paired.max())],
        "streaming_bandwidth_bytes_per_s": streaming,
        "fraction_of_streaming_bandwidth": traffic / streaming,
        "round_seconds": times,
        "rows_blocked": blocked,
    }
    print(
        f"exact-gradient ascent S={s} |Y|={y} float32 on {jax.device_count()} device(s)"
        f"{', rows blocked in cache' if blocked else ''}, best of "
        f"{args.repeats} rounds taking turns with the copies: {1e3 * seconds / steps:.2f} ms/step, "
        f"the rate of {traffic / 1e9:.2f} GB/s of a streaming step's traffic = {100 * traffic / memcpy:.0f}% of a "
        f"one-thread memcpy's {memcpy / 1e9:.2f} GB/s ({100 * paired.min():.0f}-{100 * paired.max():.0f}% round by round; goal >= 50%), "
        f"{100 * traffic / streaming:.0f}% of the {streaming / 1e9:.2f} GB/s of an XLA program doing only "
        "that traffic on the same devices"
    )
    return report


def default_ascent_prompts(devices: int) -> int:
    """The ascent's prompt count: 1024 rounded down to a multiple of ``devices`` (its shards)."""
    return max(devices, 1024 - 1024 % devices)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.tabular_flow",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--problems", type=int, default=4096, help="tabular problems solved by jaxrm")
    parser.add_argument("--outputs", type=int, default=64, help="outputs |Y| of each problem")
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance of both solvers")
    parser.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance of both solvers")
    parser.add_argument("--t-max", type=float, default=1e9, help="flow time after which a gain is not reached")
    parser.add_argument(
        "--scipy-problems", type=int, default=4096, help="problems timed one by one in SciPy (scaled up)"
    )
    parser.add_argument(
        "--stacked-problems",
        type=int,
        default=512,
        help="problems in SciPy's stacked system (time scaled up linearly, which favours SciPy: its shared steps "
        "grow with the batch; 4096 took 710 s on 2 cores)",
    )
    parser.add_argument(
        "--ascent-prompts",
        type=int,
        default=None,
        help="prompts S of the ascent's policy, sharded over the devices, so a multiple of their number "
        "(default: 1024 rounded down to one)",
    )
    parser.add_argument("--ascent-outputs", type=int, default=4096, help="outputs |Y| per prompt of the ascent")
    parser.add_argument("--ascent-steps", type=int, default=50, help="ascent steps per timed call")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds in which the timed sides take turns (each side's best round is reported)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/tabular_flow.json"), help="JSON record")
    args = parser.parse_args(argv)
    devices = jax.device_count()
    if args.ascent_prompts is None:
        args.ascent_prompts = default_ascent_prompts(devices)
    counts = ("problems", "scipy_problems", "stacked_problems", "ascent_prompts", "ascent_steps", "repeats")
    check_arguments(
        parser,
        args,
        at_least=dict.fromkeys(counts, 1) | {"outputs": 2, "ascent_outputs": 2, "seed": 0},
        positive=("rtol", "atol", "t_max"),
    )
    if args.seed >= 2**63:
        parser.error(f"--seed must be < 2**63 (a 64-bit key), got {args.seed}.")
    if args.ascent_prompts % devices:
        parser.error(
            f"--ascent-prompts {args.ascent_prompts} must be a multiple of the {devices} devices that the ascent "
            "shards its prompts over."
        )
    machine = f"{platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"machine: {machine}; jax {jax.__version__}")
    report = {"machine": machine, "t_gamma": bench_t_gamma(args)}
    write_record(args.out, report)  # kept if the ascent part fails
    report["ascent"] = bench_ascent(args)
    write_record(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
