"""Test session set-up: 8 fake CPU devices with patient collectives (must happen before JAX starts),
float32 matmuls, and a session-wide persistent compilation cache (runs rebuilt from scratch by several
tests share compiles)."""

import os
import tempfile

# Eight fake devices share two cores: under load, one device's thread can reach a collective long after
# the others, and XLA ends the process once a rendezvous has waited 40 s (its default). Wait 15 minutes.
# The tests compile hundreds of small programs and run each a few times: LLVM's cheaper pipeline takes
# the suite from ~12 to ~10 minutes here (BUILD_NOTES, full test suite).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One cache for the session's worker processes too (pytest-xdist workers inherit the variable).
if "AGENTFLOW_TEST_JAX_CACHE" not in os.environ:
    os.environ["AGENTFLOW_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="agentflow_test_jax_cache_")
jax.config.update("jax_compilation_cache_dir", os.environ["AGENTFLOW_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Modules that take a minute or more, started first so that parallel workers (README: `-n`) finish
# together instead of one of them starting a long module last.
LONG_MODULES = ("test_distributed", "test_toy_warm_start", "test_trainer", "test_notebook", "test_plan", "test_cli",
                "test_jax_engine", "test_sft")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rpartition(".")[2] if item.module else ""
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)
    items.sort(key=rank)  # stable: the order inside each module is kept
