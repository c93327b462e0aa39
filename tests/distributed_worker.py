"""One process of a multi-process training run for tests/test_distributed.py:

    python distributed_worker.py ROOT WORKDIR COORDINATOR NUM_PROCESSES PROCESS_ID

Joins the run (4 fake CPU devices per process, gloo between processes) and trains the tiny parity
config for 2 steps on a mesh over every process's devices.
"""

import os
import pathlib
import sys

# A loaded machine can keep one device's thread from a collective for more than XLA's default 40 s.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_collective_call_terminate_timeout_seconds=900"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from agentflow_jax import distributed, train  # noqa: E402
from agentflow_jax.experiment import read_experiment  # noqa: E402
from tiny_run import parity_config  # noqa: E402


def main(root: str, workdir: str, coordinator: str, num_processes: str, process_id: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    distributed.initialize(coordinator, int(num_processes), int(process_id))
    assert jax.process_count() == int(num_processes) and jax.device_count() == 4 * int(num_processes)
    train.run(read_experiment(parity_config(pathlib.Path(root), workdir, mesh={"fsdp": -1})))


if __name__ == "__main__":
    main(*sys.argv[1:])
