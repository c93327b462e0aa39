"""Every shipped training config, on every machine it names, reads cleanly and lays out on that
machine's mesh (8 fake CPU devices stand in for it): the mesh is built, every weight of the planner's
architecture gets a sharding that divides it, and a gradient micro-batch splits evenly over the batch
axes. Whether it also fits the device's memory is `python -m agentflow_jax.plan` (tests/test_plan.py)."""

import importlib.util
import math
import os

import flax.nnx as nnx
import jax
import pytest

from agentflow_jax import sharding
from agentflow_jax.experiment import read_experiment
from agentflow_jax.models import qwen2
from agentflow_jax.models.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def _module(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HARDWARE = sorted(_module("base.py").HARDWARE)
SHIPPED = ([("qwen2_5_7b_flow_grpo.py", hw, "qwen2.5-7b") for hw in HARDWARE]
           + [("qwen2_5_small_flow_grpo.py", f"{size},{hw}", f"qwen2.5-{size}")
              for size in ("1.5b", "0.5b") for hw in HARDWARE])


@pytest.mark.parametrize("name,argument,architecture", SHIPPED)
def test_shipped_config_reads_and_lays_out_on_its_mesh(name, argument, architecture):
    experiment = read_experiment(_module(name).get_config(argument), source=f"{name}:{argument}")
    hardware = argument.rpartition(",")[2]
    assert dict(experiment.mesh) == _module("base.py").HARDWARE[hardware][0]
    devices = math.prod(experiment.mesh.values()) if experiment.mesh else 1
    mesh = sharding.make_mesh(experiment.mesh or {"fsdp": 1}, jax.devices()[:devices])

    # Paper recipe (SPEC section 3) on every machine: the loss's temperature is the rollout's.
    assert experiment.rl.group_size == 8 and experiment.optim.learning_rate == 1e-6
    assert experiment.rl.loss.temperature == experiment.rollout.planner_temperature == 0.7
    assert experiment.model.max_cache_length > experiment.rollout.planner_max_new_tokens

    batch_axes = dict(sharding.rules_from("training"))["batch"]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    assert experiment.rl.micro_batch_rows % math.prod(mesh.shape[a] for a in batch_axes) == 0

    # FSDP really splits the weights: a device holds 1/devices of them, give or take the norms.
    state = nnx.state(qwen2.abstract_model(preset(architecture)))
    shardings = sharding.state_shardings(state, mesh, "training")
    total = held = 0
    for leaf, placed in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        total += math.prod(leaf.shape)
        held += math.prod(placed.shard_shape(leaf.shape))
    assert held <= total / devices * 1.01


@pytest.mark.parametrize("name", ["qwen2_5_7b_flow_grpo.py", "qwen2_5_small_flow_grpo.py"])
def test_unknown_hardware_is_a_one_line_error_naming_the_choices(name):
    with pytest.raises(ValueError, match=r"unknown hardware 'tpu9': use FILE.py:HARDWARE with HARDWARE in \["):
        _module(name).get_config("tpu9" if name.startswith("qwen2_5_7b") else "1.5b,tpu9")
