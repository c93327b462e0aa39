"""The launch scripts' --dry-run prints the command each would run and exits 0."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = "experiments/configs/qwen2_5_7b_flow_grpo.py:h100x8"


def dry_run(script: str, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_single_host_runs_train_or_the_toy_pipeline():
    assert dry_run("single_host.sh", PAPER, "--config.train.steps=2").strip() == \
        f"python -m agentflow_jax.train --config={PAPER} --config.train.steps=2"
    assert dry_run("single_host.sh", "experiments/configs/tiny_cpu.py").startswith("python -m agentflow_jax.toy ")


def test_slurm_runs_one_process_per_node_or_per_gpu_with_the_coordinator_on_the_first_node():
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu-node-1"}
    per_node = dry_run("slurm_gpu.sh", PAPER, env=env)
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in per_node
    assert "AGENTFLOW_NUM_PROCESSES=4" in per_node and "AGENTFLOW_PROCESS_ID=\\$SLURM_PROCID" in per_node
    per_gpu = dry_run("slurm_gpu.sh", "--per-gpu", "--port=23456", PAPER, env=env)
    assert "--ntasks=32 --ntasks-per-node=8" in per_gpu and ":23456" in per_gpu and "CUDA_VISIBLE_DEVICES" in per_gpu


def test_tpu_pod_creates_installs_and_runs_on_every_worker():
    out = dry_run("tpu_pod.sh", "--name=grpo", "--zone=us-east5-a", "--type=v5p-32", PAPER)
    lines = out.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create grpo --zone=us-east5-a --accelerator-type=v5p-32")
    assert any("--worker=all" in line and "pip\\ install" in line for line in lines)
    assert "AGENTFLOW_DISTRIBUTED=auto\\ python\\ -m\\ agentflow_jax.train" in lines[-1]
    missing = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry-run", PAPER], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "give --name, --zone and --type" in missing.stderr
