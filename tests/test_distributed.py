"""The whole training path on a mesh: 8 fake CPU devices (fsdp=8 and data x fsdp x tensor = 2x2x2) give
the metrics of one device, with the KV cache, the loss inputs and the optimizer state sharded; two
processes of 4 devices each (jax.distributed on 127.0.0.1) give the metrics of one process of 8, and
their checkpoint restores in one process on another mesh."""

import json
import os
import socket
import subprocess
import sys

import flax.nnx as nnx
import jax
import numpy as np
import pytest

from agentflow_jax import sharding, train
from agentflow_jax.checkpoint import TrainCheckpointer
from agentflow_jax.experiment import read_experiment
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import load_tokenizer
from agentflow_jax.optim import make_optimizer
from agentflow_jax.rl.batch import TurnRecord
from agentflow_jax.rl.trainer import FlowGRPOTrainer
from tiny_run import build_tiny_run, parity_config

TESTS = os.path.dirname(os.path.abspath(__file__))
MESHES = {"fsdp8": {"fsdp": 8}, "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}}
VOLATILE = ("rollout_s", "step_s")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] and len(expected) >= 3
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            if key not in VOLATILE:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    """Two Flow-GRPO steps of the parity run on one device and on each 8-device mesh."""
    out = {}
    for name, mesh in {"one": {}, **MESHES}.items():
        workdir = tmp_path_factory.mktemp(name)
        train.run(read_experiment(parity_config(root, workdir, mesh=mesh)))
        out[name] = workdir
    return out


@pytest.mark.parametrize("mesh", list(MESHES))
def test_metrics_on_eight_devices_equal_one_device(runs, mesh):
    one = _metrics(runs["one"])
    assert len({r.get("reward") for r in one if "reward" in r}) >= 1 and any(r.get("advantage_std", 0) > 0 for r in one)
    _assert_same_metrics(_metrics(runs[mesh]), one)


def _spec(array: jax.Array) -> tuple:
    """The array's PartitionSpec as a tuple of one entry per dimension."""
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def _records() -> list[TurnRecord]:
    rng = np.random.default_rng(0)
    return [TurnRecord(q, 3 * q + s, tuple(rng.integers(5, 300, 9).tolist()), tuple(rng.integers(5, 300, 3).tolist()),
                       (-1.0,) * 3, float(s % 2)) for q in range(4) for s in range(3)]


@pytest.mark.parametrize("mesh, batch_axes", [("fsdp8", "fsdp"), ("2x2x2", ("data", "fsdp"))])
def test_kv_cache_loss_inputs_and_optimizer_state_are_sharded(root, mesh, batch_axes):
    experiment = read_experiment(parity_config(root, "/unused", mesh=MESHES[mesh]))
    device_mesh = sharding.make_mesh(experiment.mesh)
    graphdef, params = nnx.split(hf_io.load_pretrained(experiment.model.path, mesh=device_mesh))
    trainer = FlowGRPOTrainer(graphdef, params, tokenizer=load_tokenizer(experiment.model.tokenizer_spec),
                              toolbox_factory=experiment.tools.build, optimizer=make_optimizer(experiment.optim),
                              config=experiment.rl, rollout=experiment.rollout_config(), mesh=device_mesh)
    # The sampler's KV cache: rows over the batch axes, KV heads over tensor (when there is one).
    cache = trainer.policy_sampler.prefill([[5, 6, 7], [8, 9]], n=4, max_new_tokens=4).cache
    kv_heads = "tensor" if "tensor" in MESHES[mesh] else None
    assert _spec(cache.k) == (None, batch_axes, kv_heads, None, None)  # [L, B, K, S, Dh]
    assert _spec(cache.valid) == (batch_axes, None)
    # The policy samples from the sampling layout: weights whole over the batch axes.
    q_kernel = trainer.policy_sampler.params["layers"]["attn"]["q_kernel"][...]
    assert _spec(q_kernel) == (None, None, kv_heads, None)  # [L, D, H, Dh]: no fsdp over D
    # The loss inputs and the old log-probs' inputs: [micro-batches, rows, T], rows over the batch axes.
    minibatch = trainer.prepare_minibatches(_records())[0]  # the parity config has 2 mini-batches
    for array in (minibatch.inputs.input_ids, minibatch.inputs.token_weights, minibatch.inputs.old_logprobs):
        assert _spec(array) == (None, batch_axes, None)
    assert _spec(minibatch.inputs.advantages) == (None, batch_axes)
    # Adam's moments are sharded like the parameters (FSDP over the embedding dimension).
    embed = trainer.params["embed_tokens"][...]
    assert "fsdp" in str(embed.sharding.spec)
    mu = trainer.state.opt_state[1][0].mu["embed_tokens"][...]
    assert mu.sharding == embed.sharding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_and_their_checkpoint_restores_on_another_mesh(root, runs, tmp_path):
    workdir = tmp_path / "two_processes"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    workers = [subprocess.Popen([sys.executable, os.path.join(TESTS, "distributed_worker.py"), str(root),
                                 str(workdir), coordinator, "2", str(i)], cwd=TESTS, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()  # JAX catches SIGTERM; a hung worker must not outlive the test
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    _assert_same_metrics(_metrics(workdir), _metrics(runs["fsdp8"]))

    # The 2-process checkpoint restores in this one process, on the 2x2x2 mesh.
    other = sharding.make_mesh(MESHES["2x2x2"])
    target = nnx.state(hf_io.load_pretrained(root / "model", mesh=other))
    restored = TrainCheckpointer(workdir / "checkpoints").restore(params=target)
    reference = TrainCheckpointer(runs["fsdp8"] / "checkpoints").restore(params=target)
    assert restored.step == reference.step == 2
    # Adam's normalised step turns summation-order differences in near-zero gradients into weight
    # differences of a small fraction of the learning rate (1e-3); a failed restore differs by ~1e-2.
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference.params)):
        assert a.sharding.mesh.shape == other.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
