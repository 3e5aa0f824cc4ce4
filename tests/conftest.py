"""Test setup: 4 host CPU devices and float64, both fixed before jax is imported anywhere.

Most of the suite's time is compiling, so its programs are compiled with XLA's LLVM backend
optimizations off (as `python -m theory --quick` does): the suite checks values, not speed
(the benchmarks in experiments/benchmarks/ measure speed), and took 8 min 57 s against about
10.5 min with them on, on the same 2-core machine (2026-12-01).
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4", "--xla_backend_optimization_level=0"]
).strip()

# In-process runs of the command lines keep no compilation cache (a test that wants one asks).
os.environ.setdefault("JAXRM_COMPILATION_CACHE", "none")

import jax  # noqa: E402

# Exact-dynamics tests compare to 1e-10; float32 paths are tested with explicit float32 arrays.
jax.config.update("jax_enable_x64", True)
