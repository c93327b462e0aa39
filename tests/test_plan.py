"""`python -m agentflow_jax.plan`: the paper's 7B run fits 8 H100s with its KV cache split 8 ways and a
v5p-8 slice with its rollout sampled in halves, does not fit one v5e (exit status 1, no crash), and
bad arguments are one-line errors."""

import os
import re
import subprocess
import sys

import pytest

from agentflow_jax import plan
from agentflow_jax.models.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "experiments", "configs", "qwen2_5_7b_flow_grpo.py")
CASES = {"fsdp8-h100": [f"--config={PAPER}:h100x8", "--mesh=fsdp:8", "--accelerator=h100-80gb"],
         "fsdp4-v5p": [f"--config={PAPER}:v5p-8", "--mesh=fsdp:4", "--accelerator=v5p"],
         "fsdp1-v5e": [f"--config={PAPER}:one", "--mesh=fsdp:1", "--accelerator=v5e"]}


@pytest.fixture(scope="module")
def reports():
    """Both plans at once, each in a fresh process (the plan sizes its own simulated devices)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    running = {name: subprocess.Popen([sys.executable, "-m", "agentflow_jax.plan", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in CASES.items()}
    return {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for name, p in running.items()}


def _gib(report: str, line: str) -> float:
    return float(re.search(rf"^  {re.escape(line)}\s+([\d.]+)$", report, re.M).group(1))


def test_the_paper_run_fits_eight_h100s_with_its_kv_cache_split_eight_ways(reports):
    status, report, errors = reports["fsdp8-h100"]
    assert status == 0, errors[-2000:]
    assert report.strip().splitlines()[-1].startswith("FITS h100-80gb: ")
    # The whole rollout cache, computed here: 32 queries x 8 samples, 18,432 + 2,048 slots, K and V in bf16.
    c = preset("qwen2.5-7b")
    total = 2 * c.num_layers * (32 * 8) * c.num_kv_heads * 20480 * c.dim_per_head * 2 / 2**30
    assert _gib(report, "KV cache (rollout)") <= total / 8 * 1.01
    assert _gib(report, "peak of a step") <= 79.1
    for line in ("parameters (training layout)", "optimizer state", "gradients", "prefill temporaries",
                 "decode temporaries", "update temporaries"):
        assert _gib(report, line) > 0
    assert re.search(r"FLOPs per step .* total [\d.e+]+", report) and "step time at 40% MFU" in report


def test_the_paper_run_fits_a_v5p_8_slice_sampling_its_rollout_in_halves(reports):
    status, report, errors = reports["fsdp4-v5p"]
    assert status == 0, errors[-2000:]
    assert report.strip().splitlines()[-1].startswith("FITS v5p: ")
    assert "(128 rows per sampler call)" in report
    c = preset("qwen2.5-7b")
    half = 2 * c.num_layers * 128 * c.num_kv_heads * 20480 * c.dim_per_head * 2 / 2**30
    assert _gib(report, "KV cache (rollout)") <= half / 4 * 1.01


def test_the_paper_run_does_not_fit_one_v5e(reports):
    status, report, errors = reports["fsdp1-v5e"]
    assert status == 1, errors[-2000:]
    assert report.strip().splitlines()[-1].startswith("DOES NOT FIT v5e: ")
    assert "Traceback" not in errors


@pytest.mark.parametrize("text", ["fsdp", "fsdp:0", "pipeline:2", "fsdp:2,fsdp:2"])
def test_bad_mesh_is_a_usage_error(text):
    with pytest.raises(plan.app.UsageError, match="--mesh"):
        plan.parse_mesh(text)
    assert plan.parse_mesh("data:2,fsdp:2,tensor:2") == {"data": 2, "fsdp": 2, "tensor": 2}
