"""Subprocess worker for the trainer tests: one RLHF run of the tiny task (see rlhf_task.py).

    python tests/rlhf_worker.py --out DIR --iterations N [--checkpoint-every C] [--hang-at STEP]
        [--dump FILE.npz] [--process-id I --num-processes P --port PORT]

``--hang-at`` blocks forever once iteration STEP is logged (after its checkpoint), so a test can
kill the process there. With ``--num-processes`` it joins a ``jax.distributed`` cluster on
127.0.0.1 (CPU collectives over gloo) and trains on the global mesh of every process's devices.
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--iterations", type=int, required=True)
parser.add_argument("--checkpoint-every", type=int, default=0)
parser.add_argument("--hang-at", type=int, default=None)
parser.add_argument("--dump", default=None)
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()

# Compiled as the rest of the suite is (tests/conftest.py): the tests check values, not speed.
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} --xla_backend_optimization_level=0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id
    )

import numpy as np  # noqa: E402
from rlhf_task import run  # noqa: E402

from jaxrm.sharding import make_mesh  # noqa: E402


def log(line: str) -> None:
    print(line, flush=True)
    if args.hang_at is not None and line.startswith(f"iteration {args.hang_at}/"):
        while True:
            time.sleep(60)


state, _ = run(
    args.out,
    args.iterations,
    checkpoint_every=args.checkpoint_every,
    log_every=1,
    mesh=make_mesh(),
    log=log,
)
if args.dump and jax.process_index() == 0:
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
    np.savez(args.dump, *leaves)
print("done", flush=True)
