"""Will a training config fit a machine? Planned at compile time, before renting it.

    python -m agentflow_jax.plan --config=experiments/configs/qwen2_5_7b_flow_grpo.py \
        --mesh=fsdp:8 --accelerator=h100-80gb

The model is built abstractly (shapes only, no weights in memory; the architecture from the model
directory's config.json, else the preset its name spells, e.g. "Qwen2.5-7B-Instruct", or --preset).
On simulated devices (fake CPU devices shaped like --mesh), the step's programs are lowered and
compiled ahead of time with the run's shardings: the rollout's prefill and decode at the config's
rollout batch (queries x samples per query, at most `model.max_cache_rows` per sampler call) and
cache length, and the update (loss + gradient +
optimizer) at the micro-batch shape. Per device it prints the parameters, the optimizer state, the
gradients, the sampling copies of the weights, the KV cache, the temporaries of each program (XLA's
memory analysis), the peak of a step and the FLOPs per step, then one line:

    FITS h100-80gb: 61.2 GiB of 74.5 GiB           (exit status 0)
    DOES NOT FIT v5e: 143.0 GiB of 15.0 GiB ...     (exit status 1)

A step never holds the rollout's and the update's working sets together: the peak is what stays
(training weights, optimizer state, reference weights, sampling copies) plus the larger of the
rollout (KV cache + decode or prefill temporaries) and the update (gradients + its temporaries).
Weights, optimizer state, gradients and the KV cache are counted exactly from their shapes,
dtypes and shardings; temporaries come from XLA's memory analysis of the partitioned programs,
compiled by XLA:CPU with its memory-minimising scheduler (as accelerator compilers schedule) and
in float32: XLA:CPU computes bfloat16 matmuls on float32 copies of their operands (whole stacked
weights and caches), which accelerators do not, so for a bfloat16 config the float32 programs'
temporaries are scaled by 1/2. The portable kernels are compiled (`models.kernels.PORTABLE`); an
accelerator's (cuDNN attention) need no more scratch. When the weights, optimizer state and
sampling copies alone exceed the device, the plan says so without compiling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Any, Mapping

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding

from agentflow_jax import cli, sharding
from agentflow_jax.errors import UserError
from agentflow_jax.experiment import REFERENCE_ENGINE, read_experiment
from agentflow_jax.models import config as model_config_lib
from agentflow_jax.models import kernels as kernels_lib
from agentflow_jax.models import qwen2
from agentflow_jax.models.qwen2 import KVCache
from agentflow_jax.optim import make_optimizer
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.trainer import FROZEN_ROLES
from agentflow_jax.sampling import buckets, loop, rules
from agentflow_jax.sampling.sampler import prompts_per_call
from agentflow_jax.sharding import MESH_AXES

_CONFIG = cli.config_flag()
_MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. fsdp:8 or data:2,fsdp:2,tensor:2.")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "Accelerator of each device: one of "
                                   "h100-80gb, h200, v5p, v5e, cpu.")
_PRESET = flags.DEFINE_string("preset", None, "Architecture preset (e.g. qwen2.5-7b) when the model directory "
                              "is not on this machine and its name does not spell one.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step-time estimate.")

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One device: its --accelerator name, what it is, usable memory (what frameworks can allocate)
    and dense bf16 peak FLOP/s."""

    key: str
    description: str
    memory_bytes: float
    bf16_flops: float


ACCELERATORS = {accelerator.key: accelerator for accelerator in (
    # Usable memory: the device's memory less the runtime's reservation (CUDA context, TPU runtime);
    # peaks are the vendors' dense bf16 figures.
    Accelerator("h100-80gb", "NVIDIA H100 80GB", 79.1 * GiB, 989e12),
    Accelerator("h200", "NVIDIA H200", 139.3 * GiB, 989e12),
    Accelerator("v5p", "TPU v5p", 95.0 * GiB * 0.98, 459e12),
    Accelerator("v5e", "TPU v5e", 16.0 * GiB * 0.94, 197e12),
    Accelerator("cpu", "CPU (this host's memory shared by the simulated devices)", 0.0, 1e12),
)}


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp:8" or "data:2,fsdp:2,tensor:2" -> {axis: size}."""
    mesh = {}
    for part in text.split(","):
        axis, sep, size = part.strip().partition(":")
        if not sep or axis not in MESH_AXES or not size.isdigit() or int(size) < 1 or axis in mesh:
            raise app.UsageError(f"--mesh={text!r}: expected AXIS:N[,AXIS:N...] with distinct axes among "
                                 f"{MESH_AXES} and sizes >= 1, e.g. fsdp:8")
        mesh[axis] = int(size)
    return mesh


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of each part of a step, FLOPs, and the verdict against an accelerator."""

    accelerator: Accelerator
    mesh: Mapping[str, int]
    model: str
    parts: Mapping[str, float]            # bytes per device, by line of the report
    resident: float                       # kept for the whole run
    rollout_peak: float                   # the rollout's working set on top of it
    update_peak: float                    # the update's working set on top of it
    flops_per_step: Mapping[str, float]   # over all devices
    notes: tuple[str, ...]

    @property
    def total(self) -> float:
        return self.resident + max(self.rollout_peak, self.update_peak)

    @property
    def fits(self) -> bool:
        return self.total <= self.accelerator.memory_bytes


def make_plan(experiment: Any, mesh_sizes: Mapping[str, int], accelerator: Accelerator, *,
              preset: str | None = None) -> Plan:
    """Compiles the step's programs for `experiment` on a mesh of `mesh_sizes` over this process's
    (simulated) devices and measures them (module docstring)."""
    e = experiment
    devices = math.prod(mesh_sizes.values())
    if devices > jax.device_count():
        raise app.UsageError(f"--mesh needs {devices} devices but this process has {jax.device_count()}")
    mesh = sharding.make_mesh(dict(mesh_sizes), jax.devices()[:devices])
    config = model_config(e.model.path, preset)
    compute, storage = jnp.dtype(e.model.dtype), jnp.dtype(e.model.storage_dtype)
    state = nnx.state(qwen2.abstract_model(config, dtype=compute, param_dtype=storage, remat=e.model.remat))

    def placed(tree: Any, rules_name: str, dtype: Any = None) -> Any:
        shardings = sharding.state_shardings(tree, mesh, rules_name)
        return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, dtype or leaf.dtype, sharding=s),
                            tree, shardings)

    params = placed(state, "training")
    sampling_params = placed(state, "sampling", compute)
    # The programs are compiled in float32 (module docstring); their temporaries are scaled back.
    programs_graphdef, programs_state = nnx.split(qwen2.abstract_model(config, dtype=jnp.float32,
                                                                       param_dtype=jnp.float32, remat=e.model.remat))
    program_params = placed(programs_state, "training")
    program_sampling_params = placed(programs_state, "sampling", jnp.float32)
    temp_scale = compute.itemsize / 4
    optimizer = make_optimizer(e.optim, total_steps=e.train.steps)
    opt_state = sharding.abstract_opt_state(optimizer, params)
    parts = {"parameters (training layout)": per_device(params), "optimizer state": per_device(opt_state)}
    if e.rl.loss.kl_coef > 0:
        parts["reference weights (KL)"] = per_device(params)
    parts["policy for sampling"] = per_device(sampling_params)
    notes = []
    if REFERENCE_ENGINE in (e.engines.spec_of(role) for role in FROZEN_ROLES):
        parts["reference for sampling (frozen roles)"] = per_device(sampling_params)
        notes.append("the frozen roles are served by the reference weights in-process (engines.frozen = "
                     "'reference'); an OpenAI-compatible server for them removes that copy")
    resident = sum(parts.values())
    if resident > accelerator.memory_bytes:
        notes.append("the weights, optimizer state and sampling copies alone exceed the device; nothing was compiled")
        return Plan(accelerator=accelerator, mesh=dict(mesh_sizes), model=describe(config), parts=parts,
                    resident=resident, rollout_peak=0.0, update_peak=0.0, flops_per_step={}, notes=tuple(notes))

    def struct(shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...], rules_name: str) -> Any:
        spec = sharding.partition_spec(shape, axes, mesh, rules_name)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    # -- rollout: prefill of the step's prompts, decode of their n samples over the longest cache ------
    batch_shards = math.prod(mesh.shape[a] for a in _batch_axes("sampling") if a in mesh.shape)
    prompts = prompts_per_call(e.data.batch_size // jax.process_count(), e.rl.group_size,
                               e.model.max_cache_rows or None)  # larger calls run in parts (Sampler.max_rows)
    prompts = buckets.batch_bucket(prompts, multiple_of=batch_shards)
    rows = prompts * e.rl.group_size
    capacity = buckets.length_bucket(e.rollout.planner_max_new_tokens)
    prompt_length = e.model.max_cache_length - capacity
    cache_length = prompt_length + capacity
    with sharding.activation_sharding(mesh, "sampling"):
        prefill = jax.jit(functools.partial(loop.prefill, programs_graphdef), static_argnames=(
            "cache_length", "samples_per_prompt", "rows_per_block", "query_chunk")).lower(
            program_sampling_params, struct((prompts, prompt_length), jnp.int32, ("batch", None), "sampling"),
            struct((prompts, prompt_length), jnp.bool_, ("batch", None), "sampling"), cache_length=cache_length,
            samples_per_prompt=e.rl.group_size, rows_per_block=prompts,
            query_chunk=buckets.PREFILL_QUERY_CHUNK).compile()
        c = config
        def kv_cache(dtype: Any) -> KVCache:
            kv = struct((c.num_layers, rows, c.num_kv_heads, cache_length, c.dim_per_head), dtype, loop.CACHE_AXES,
                        "sampling")
            return KVCache(k=kv, v=kv, valid=struct((rows, cache_length), jnp.bool_, ("batch", None), "sampling"),
                           next_position=struct((rows,), jnp.int32, ("batch",), "sampling"),
                           index=jax.ShapeDtypeStruct((), jnp.int32))

        rule = rules.sampling_rule(e.rollout.planner_temperature, e.rollout.planner_top_p, 0,
                                   e.rollout.planner_frequency_penalty)
        decode = jax.jit(functools.partial(loop.decode, programs_graphdef, kernels=kernels_lib.PORTABLE),
                         static_argnames=("capacity", "rows_per_block"), donate_argnames=("cache",)).lower(
            program_sampling_params, kv_cache(jnp.float32),
            struct((rows, c.vocab_size), jnp.float32, ("batch", "vocab"), "sampling"), rule,
            jax.ShapeDtypeStruct((), jnp.uint32), struct((rows,), jnp.int32, ("batch",), "sampling"),
            struct((rows,), jnp.bool_, ("batch",), "sampling"), jax.ShapeDtypeStruct((8,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32), capacity=capacity, rows_per_block=rows).compile()
    parts["KV cache (rollout)"] = per_device(kv_cache(compute))
    parts["prefill temporaries"] = prefill.memory_analysis().temp_size_in_bytes * temp_scale
    parts["decode temporaries"] = decode.memory_analysis().temp_size_in_bytes * temp_scale
    rollout_peak = parts["KV cache (rollout)"] + max(parts["prefill temporaries"], parts["decode temporaries"])

    # -- update: loss + gradient + optimizer on one micro-batch of the longest rows ------------------
    length = -(-e.model.max_cache_length // e.rl.length_bucket) * e.rl.length_bucket
    micro = e.rl.micro_batch_rows

    def inputs_struct(dtype: Any, shape: tuple[int, ...]) -> Any:
        return struct(shape, dtype, ("batch",) + (None,) * (len(shape) - 1), "training")

    inputs = loss_lib.LossInputs(
        input_ids=inputs_struct(jnp.int32, (micro, length)), attention_mask=inputs_struct(jnp.int32, (micro, length)),
        targets=inputs_struct(jnp.int32, (micro, length)), loss_mask=inputs_struct(jnp.float32, (micro, length)),
        token_weights=inputs_struct(jnp.float32, (micro, length)), advantages=inputs_struct(jnp.float32, (micro,)),
        old_logprobs=inputs_struct(jnp.float32, (micro, length)),
        sampler_logprobs=inputs_struct(jnp.float32, (micro, length)),
        ref_logprobs=inputs_struct(jnp.float32, (micro, length)) if e.rl.loss.kl_in_loss else None)

    def update(p: Any, o: Any, batch: Any) -> Any:
        (loss, _), grads = jax.value_and_grad(
            lambda q: loss_lib.policy_loss(programs_graphdef, q, batch, e.rl.loss), has_aux=True)(p)
        updates, o = optimizer.update(grads, o, p)
        return jax.tree.map(lambda a, b: a + b, p, updates), o, loss

    with sharding.activation_sharding(mesh, "training"):
        compiled_update = jax.jit(update, donate_argnums=(0, 1)).lower(
            program_params, sharding.abstract_opt_state(optimizer, program_params), inputs).compile()
    parts["gradients"] = per_device(params)
    # The update's temporaries include its float32 gradients: the rest are activations (scaled).
    update_temp = compiled_update.memory_analysis().temp_size_in_bytes - per_device(program_params)
    parts["update temporaries"] = max(0.0, update_temp) * temp_scale
    update_peak = parts["gradients"] + parts["update temporaries"]

    # -- model FLOPs of a step: upper bounds, every trajectory takes every turn at the longest prompt ---
    calls = e.data.batch_size * e.rl.group_size * e.rollout.max_turns        # planner calls (rows)
    forward = sequence_flops(config, prompt_length, generated=0)
    sampled = sequence_flops(config, prompt_length, generated=capacity) - forward
    passes = (4 if e.model.remat else 3) * e.rl.ppo_epochs + 1 + (e.rl.loss.kl_coef > 0)  # + old, reference
    flops_per_step = {"prefill": calls * forward, "decode": calls * sampled,
                      "update": calls * passes * sequence_flops(config, length, generated=0)}
    micro_batches = -(-calls // micro) * e.rl.ppo_epochs
    notes.append(f"rollout at {e.data.batch_size} queries x {e.rl.group_size} samples ({rows} rows per sampler call), "
                 f"prompt {prompt_length} + {capacity} new tokens = {cache_length} cache slots; update micro-batch "
                 f"{micro} rows x {length} tokens, {micro_batches} per step")
    if devices == 1 and accelerator.description.startswith("NVIDIA"):
        notes.append("on one GPU the unrolled decode also holds a packed copy of the layer weights during "
                     "rollouts (models.kernels); it is not in the figures above")
    return Plan(accelerator=accelerator, mesh=dict(mesh_sizes), model=describe(config), parts=parts,
                resident=resident, rollout_peak=rollout_peak, update_peak=update_peak,
                flops_per_step=flops_per_step, notes=tuple(notes))


def _batch_axes(rules_name: str) -> tuple[str, ...]:
    axes = dict(sharding.rules_from(rules_name))["batch"]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def model_config(path: str, preset: str | None) -> Any:
    """The architecture: `preset`, else the directory's config.json, else the preset its name spells."""
    if preset:
        return model_config_lib.preset(preset)
    if os.path.isfile(os.path.join(path, "config.json")):
        return model_config_lib.from_hf_config(path)
    try:
        return model_config_lib.preset(os.path.basename(os.path.normpath(path)))
    except KeyError:
        raise UserError(f"config.model.path = {path!r} is not on this machine and its name is no preset; pass "
                        f"--preset (one of {sorted(model_config_lib.PRESETS)})") from None


def per_device(tree: Any) -> float:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (None leaves skipped)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return float(total)


def sequence_flops(config: Any, prompt: int, *, generated: int) -> float:
    """Model FLOPs of one forward pass over a `prompt`-token sequence and then `generated` decoded tokens
    (the usual MFU convention: 2 per weight and token in the matmuls, plus causal attention; the LM head
    on the generated tokens and the last prompt position only). A backward pass is twice a forward."""
    c = config
    matmul = 2 * (c.num_params - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2))
    attention_per_key = 4 * c.num_layers * c.num_heads * c.dim_per_head  # q.k and p.v
    tokens = prompt + generated
    attention = attention_per_key * (prompt * (prompt + 1) / 2 + sum(range(prompt + 1, tokens + 1)))
    head = 2 * c.hidden_size * c.vocab_size * (generated + 1)
    return matmul * tokens + attention + head


def describe(config: Any) -> str:
    return (f"Qwen2 {config.num_params / 1e9:.2f}B ({config.num_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_heads} heads / {config.num_kv_heads} KV heads, vocabulary {config.vocab_size})")


def format_plan(plan: Plan, *, mfu: float) -> str:
    """The report (module docstring); the verdict is the last line."""
    mesh = ",".join(f"{axis}:{size}" for axis, size in plan.mesh.items())
    lines = [f"{plan.model} on {plan.accelerator.description} x {math.prod(plan.mesh.values())} (mesh {mesh})", "",
             f"{'per device':40s} {'GiB':>9s}"]
    lines += [f"  {name:38s} {value / GiB:9.2f}" for name, value in plan.parts.items()]
    lines += [f"  {'kept for the run':38s} {plan.resident / GiB:9.2f}",
              f"  {'+ rollout working set':38s} {plan.rollout_peak / GiB:9.2f}",
              f"  {'+ update working set':38s} {plan.update_peak / GiB:9.2f}",
              f"  {'peak of a step':38s} {plan.total / GiB:9.2f}", ""]
    total_flops = sum(plan.flops_per_step.values())
    lines.append("FLOPs per step (all devices): " + ", ".join(
        f"{name} {value:.3g}" for name, value in plan.flops_per_step.items()) + f"; total {total_flops:.3g}")
    peak = plan.accelerator.bf16_flops * math.prod(plan.mesh.values())
    lines.append(f"step time at {mfu:.0%} MFU of {plan.accelerator.bf16_flops / 1e12:.0f} TFLOP/s per device: "
                 f"{total_flops / (peak * mfu):.1f} s")
    lines += [f"note: {note}" for note in plan.notes] + [""]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict} {plan.accelerator.key}: {plan.total / GiB:.1f} GiB of "
                 f"{plan.accelerator.memory_bytes / GiB:.1f} GiB per device")
    return "\n".join(lines)


def accelerator(name: str, devices: int) -> Accelerator:
    """The named accelerator ("cpu": this host's memory shared by the devices)."""
    if name not in ACCELERATORS:
        raise app.UsageError(f"--accelerator={name!r}: expected one of {sorted(ACCELERATORS)}")
    chosen = ACCELERATORS[name]
    if name == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        chosen = dataclasses.replace(chosen, memory_bytes=host / devices)
    return chosen


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _MESH.value or not _ACCELERATOR.value:
        raise app.UsageError("pass --mesh=AXIS:N[,AXIS:N...] and --accelerator=NAME")
    mesh = parse_mesh(_MESH.value)
    devices = math.prod(mesh.values())
    chosen = accelerator(_ACCELERATOR.value, devices)
    # Simulated devices and the memory-minimising scheduler: set before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    config, source = cli.load_config(_CONFIG)
    plan = make_plan(read_experiment(config, source=source), mesh, chosen, preset=_PRESET.value)
    print(format_plan(plan, mfu=_MFU.value), flush=True)
    sys.exit(0 if plan.fits else 1)


if __name__ == "__main__":
    cli.run(main)
