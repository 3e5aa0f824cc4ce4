"""Test setup: 4 host CPU devices and float64, both fixed before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
).strip()

# In-process runs of the command lines keep no compilation cache (a test that wants one asks).
os.environ.setdefault("JAXRM_COMPILATION_CACHE", "none")

import jax  # noqa: E402

# Exact-dynamics tests compare to 1e-10; float32 paths are tested with explicit float32 arrays.
jax.config.update("jax_enable_x64", True)
