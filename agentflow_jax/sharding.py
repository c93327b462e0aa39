"""Device meshes and logical-axis sharding.

Every model parameter carries `logical_axes` metadata (e.g. `("layers", "embed", "heads", "head_dim")`).
A rules table maps each logical name to zero or more mesh axes (`data`, `fsdp`, `tensor`); the
same model therefore runs unchanged on one device, an 8-device host, or a multi-host pod, and the
trainer and the sampler can use different rules (moving weights between them is one `reshard`).

A mesh axis is used at most once per array, and an axis that does not divide the dimension is
dropped (the dimension is then replicated over it) -- e.g. 2 KV heads on `tensor=4`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.nnx as nnx
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]
MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over the embedding dimension + tensor parallelism over heads / mlp / vocab; batch over
# data and fsdp. The paper-scale 7B trainer uses this.
TRAINING_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("cache_length", None),
)

# Sampling: weights tensor-parallel only (replicated over data/fsdp), batch over data and fsdp,
# so decode steps need no weight all-gathers.
SAMPLING_RULES: Rules = tuple((name, None if name == "embed" else axes) for name, axes in TRAINING_RULES)

RULE_PRESETS: dict[str, Rules] = {"training": TRAINING_RULES, "sampling": SAMPLING_RULES}


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh such as {"data": 1, "fsdp": -1, "tensor": 2}.

    At most one size may be -1: it takes all remaining devices. Axes are laid out in MESH_AXES
    order (data outermost, tensor innermost so tensor-parallel groups share a host). Works
    multi-host: `devices` defaults to `jax.devices()` (all processes' devices).
    """
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; use names from {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = {name: int(spec.get(name, 1)) for name in MESH_AXES}
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(spec)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into {dict(spec)}")
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices but {len(devices)} are available; "
                         "use -1 for one axis to take the rest")
    shape = tuple(sizes[n] for n in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - topology-aware layout is best effort (e.g. fake CPU devices)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_from(rules: Rules | str | None) -> Rules:
    """A rules table from a preset name ("training", "sampling"), a table, or None (training)."""
    if rules is None:
        return TRAINING_RULES
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise KeyError(f"unknown sharding rules {rules!r}; presets: {sorted(RULE_PRESETS)}")
        return RULE_PRESETS[rules]
    return tuple(rules)


def partition_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   rules: Rules | str | None = None) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have `logical_axes` names.

    Names missing from the rules are replicated. Mesh axes of size 1, axes already used by an
    earlier dimension, and axes whose size does not divide the dimension are left out.
    """
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    table = dict(rules_from(rules))
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical_axes):
        wanted = table.get(name) if name is not None else None
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        chosen: list[str] = []
        for axis in wanted:
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | str | None = None) -> nnx.State:
    """A pytree like `state` (of nnx Variables) holding the NamedSharding of each variable."""

    def one(var: nnx.Variable) -> nnx.Variable:
        value = var.get_value()
        axes = getattr(var, "logical_axes", None) or (None,) * len(value.shape)
        return var.replace(NamedSharding(mesh, partition_spec(value.shape, axes, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules | str | None = None) -> nnx.State:
    """Places (or reshards) every array of `state` according to its logical axes and `rules`."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | str | None = None) -> nnx.Module:
    """Reshards a model's parameters in place (e.g. from training rules to sampling rules)."""
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


# ----------------------------------------------------------------------------------------------
# Activation constraints
# ----------------------------------------------------------------------------------------------

_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "agentflow_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules | str | None = None) -> Iterator[None]:
    """While active, `constrain` pins activations to the mesh. Wrap the *tracing* of a jitted
    function (its first call) in this context; the constraint is baked into the compiled code."""
    token = _ACTIVATION_CONTEXT.set((mesh, rules_from(rules)))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names when an activation_sharding context is active."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(x.shape, logical_axes, mesh, rules)))
