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
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentflow_jax.errors import UserError

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


class MeshError(UserError, ValueError):
    """A mesh spec that names unknown axes or does not match the devices there are."""


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh such as {"data": 1, "fsdp": -1, "tensor": 2}.

    At most one size may be -1: it takes all remaining devices. Axes are laid out in MESH_AXES
    order (data outermost, tensor innermost so tensor-parallel groups share a host). Works
    multi-host: `devices` defaults to `jax.devices()` (all processes' devices).
    """
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; use names from {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = {name: int(spec.get(name, 1)) for name in MESH_AXES}
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {fill}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh sizes must be positive or -1, got {dict(spec)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise MeshError(f"{len(devices)} devices cannot be split into {dict(spec)}")
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(f"mesh {sizes} needs {total} devices but {len(devices)} are available; use -1 for one "
                        "axis to take the rest (e.g. --config.mesh.fsdp=-1) or pick the config's hardware (e.g. FILE.py:one)")
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


# ----------------------------------------------------------------------------------------------
# Optimizer state and pure pytrees
# ----------------------------------------------------------------------------------------------


def abstract_opt_state(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """`optimizer.init(params)` as ShapeDtypeStructs with shardings, without allocating it (a restore
    target, or the out_shardings of a jitted init).

    `params` holds arrays or ShapeDtypeStructs with shardings. `jax.eval_shape` drops
    shardings, so they are put back: a leaf that mirrors a parameter (Adam's `mu`/`nu`,
    momentum: its key path ends with the parameter's path and the shapes agree) gets that
    parameter's sharding; other leaves (step counts) are replicated on the parameters' mesh.
    """
    abstract = jax.eval_shape(optimizer.init, params)
    param_leaves = {dotted_path(path): leaf
                    for path, leaf in jax.tree_util.tree_flatten_with_path(to_pure_tree(params))[0]}
    replicated = replicated_sharding(params)

    def one(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        dotted = "." + dotted_path(path)
        mirrored = [key for key, p in param_leaves.items()
                    if dotted.endswith("." + key) and tuple(p.shape) == tuple(leaf.shape)]
        source = param_leaves[max(mirrored, key=len)] if mirrored else None
        sharding = getattr(source, "sharding", None) or replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return from_pure_tree(abstract, jax.tree_util.tree_map_with_path(one, to_pure_tree(abstract)))


def _is_state(node: Any) -> bool:
    return isinstance(node, nnx.State)


def to_pure_tree(tree: Any) -> Any:
    """`tree` with every `nnx.State` replaced by its pure nested dict."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)


def from_pure_tree(target: Any, restored: Any) -> Any:
    """`restored` (pure, structured like `to_pure_tree(target)`) put back into `target`'s containers."""

    def one(target_node: Any, restored_node: Any) -> Any:
        if not _is_state(target_node):
            return restored_node
        state = jax.tree.map(lambda x: x, target_node)  # fresh Variables; the caller's target is untouched
        nnx.replace_by_pure_dict(state, restored_node)
        return state

    return jax.tree.map(one, target, restored, is_leaf=_is_state)


def replicated_sharding(tree: Any) -> NamedSharding:
    """Full replication on the mesh of `tree`'s first NamedSharding (on all devices when none)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def dotted_path(path: tuple[Any, ...]) -> str:
    """A key path as "mu.layers.attn.q_kernel" (namedtuple fields and dict keys alike)."""
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return ".".join(parts)
