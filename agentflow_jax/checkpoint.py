"""Training checkpoints: an Orbax `CheckpointManager` for one run directory.

Each step directory holds three items:

  params/         the model parameters as a pure nested dict of arrays (an `nnx.State` is stored
                  through `nnx.to_pure_dict`, so the layout does not depend on flax Variable
                  internals), written shard by shard by every process (OCDBT + tensorstore);
  opt_state/      the optax state pytree (any `nnx.State` inside it stored the same way);
  train_meta/     JSON: step, metrics, free-form metadata, the RNG key data (uint32 lists) and the
                  data iterator's state (`data.pipeline` iterators hold the global position, the
                  same on every process, so a run resumes on any number of processes).

Saving is asynchronous: `save` returns once device arrays are copied to host memory and the
writes run in a background thread; call `wait_until_finished()` (or `close()`) before exiting.
Every process calls `save`/`restore` alike; Orbax decides which process writes what and
synchronises them, so there are no process-0 branches here.

Retention: the newest `max_to_keep` steps are kept; with `best_metric`, the `keep_best` best
steps by that metric are kept as well, however old (an Orbax `AnyPreservationPolicy` of `LatestN`
and `BestN`). Steps saved without the metric are ranked by recency only.

Restoring takes abstract targets (`jax.ShapeDtypeStruct` with a sharding, or live arrays) for
params and optimizer state; arrays come back with exactly those shardings, so a run saved on one
mesh resumes on another. `with_shardings` builds the parameter target from
`sharding.state_shardings`; `sharding.abstract_opt_state` derives the optimizer target from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from agentflow_jax import sharding as sharding_lib
from agentflow_jax.errors import UserError
from agentflow_jax.train_state import TrainState

PARAMS = "params"
OPT_STATE = "opt_state"
TRAIN_META = "train_meta"
META_FORMAT_VERSION = 1

RngTree = jax.Array | Mapping[str, jax.Array] | None


class CheckpointError(UserError, RuntimeError):
    """Base class of the checkpoint errors below (the run directory's files, not a bug: one line at the CLI)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The run directory has no checkpoint (or not the requested step)."""


class CorruptCheckpointError(CheckpointError):
    """A step directory exists but cannot be read (partial write, deleted or truncated files)."""


class CheckpointStructureError(CheckpointError, ValueError):
    """The saved tree differs from the restore target (other model, optimizer or config)."""


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What `TrainCheckpointer.restore` returns (the data iterator is restored in place)."""

    step: int
    params: Any
    opt_state: Any
    rng: RngTree
    metrics: dict[str, float]
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`, e.g. a restore target on a new mesh.

    `abstract_tree` holds arrays or ShapeDtypeStructs (e.g. `nnx.state(qwen2.abstract_model(c))`);
    `shardings` is a matching tree of shardings (e.g. `sharding.state_shardings(that, mesh)`).
    """
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                        abstract_tree, shardings)


def _abstract_target(tree: Any) -> Any:
    """ShapeDtypeStructs with shardings for every leaf of a (pure) restore target.

    Leaves without a sharding (e.g. optax's step `count` from `jax.eval_shape`) are replicated
    over the mesh of the other leaves, or over all devices when no leaf names a mesh.
    """
    replicated = sharding_lib.replicated_sharding(tree)

    def one(leaf: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(leaf, "sharding", None) or replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _shapes_by_key(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {sharding_lib.dotted_path(path): tuple(leaf.shape) for path, leaf in leaves}


def _check_structure(item: str, target: Any, saved_metadata: Any, step: int, path: str) -> None:
    """Raises CheckpointStructureError naming the first key or shape that differs."""
    saved = _shapes_by_key(getattr(saved_metadata, "tree", saved_metadata))
    wanted = _shapes_by_key(target)
    differing = sorted(set(saved) ^ set(wanted))
    if differing:
        key = differing[0]
        where = "only in the checkpoint" if key in saved else "only in the restore target"
        raise CheckpointStructureError(
            f"{item} of checkpoint step {step} ({path}) does not match the restore target: first "
            f"differing key {key!r} is {where} ({len(differing)} keys differ; checkpoint has "
            f"{len(saved)} arrays, target {len(wanted)}). Restore with the model/optimizer config "
            "the run was saved with, or start a fresh run directory.")
    for key in sorted(saved):
        if saved[key] != wanted[key]:
            raise CheckpointStructureError(
                f"{item} of checkpoint step {step} ({path}): array {key!r} has shape {saved[key]} "
                f"in the checkpoint but {wanted[key]} in the restore target. Restore with the "
                "config the run was saved with, or start a fresh run directory.")


# ----------------------------------------------------------------------------------------------
# JSON parts: RNG, metrics, metadata
# ----------------------------------------------------------------------------------------------


def _encode_key(key: jax.Array) -> dict[str, Any]:
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    if data.dtype != np.uint32:
        raise TypeError(f"an RNG key must be a typed key (jax.random.key) or uint32 key data "
                        f"(jax.random.PRNGKey), got dtype {data.dtype}")
    return {"impl": str(jax.random.key_impl(key)) if typed else None, "shape": list(data.shape),
            "data": data.ravel().tolist()}


def _decode_key(encoded: Mapping[str, Any]) -> jax.Array:
    data = np.asarray(encoded["data"], np.uint32).reshape(encoded["shape"])
    if encoded["impl"] is None:
        return jax.numpy.asarray(data)
    return jax.random.wrap_key_data(data, impl=encoded["impl"])


def encode_rng(rng: RngTree) -> dict[str, Any] | None:
    """JSON form of one RNG key or a dict of named keys (typed keys keep their impl)."""
    if rng is None:
        return None
    if isinstance(rng, Mapping):
        return {"named": {str(name): _encode_key(key) for name, key in rng.items()}}
    return {"key": _encode_key(rng)}


def decode_rng(encoded: Mapping[str, Any] | None) -> RngTree:
    """Inverse of `encode_rng`."""
    if encoded is None:
        return None
    if "named" in encoded:
        return {name: _decode_key(key) for name, key in encoded["named"].items()}
    return _decode_key(encoded["key"])


def _scalar_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    result = {}
    for name, value in (metrics or {}).items():
        if np.size(value) != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got shape {np.shape(value)}")
        result[str(name)] = float(np.asarray(value).reshape(()))
    return result


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable (str/int/float/bool/list/dict): {e}") from e


# ----------------------------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------------------------


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in (PARAMS, OPT_STATE):
        registry.add(item, ocp.args.StandardSave)
        registry.add(item, ocp.args.StandardRestore)
    registry.add(TRAIN_META, ocp.args.JsonSave)
    registry.add(TRAIN_META, ocp.args.JsonRestore)
    return registry


def _metric_ranker(name: str, mode: Literal["max", "min"]):
    """Orbax `best_fn`: the metric, or the worst possible value when a step lacks it."""
    worst = -math.inf if mode == "max" else math.inf
    return lambda metrics: float(metrics.get(name, worst))


def _absolute(directory: str | os.PathLike) -> str:
    """Orbax's writers need absolute local paths; URLs (gs://...) are already absolute."""
    path = os.fspath(directory)
    return path if "://" in path else os.path.abspath(path)


def _preservation_policy(max_to_keep: int | None, best_metric: str | None, best_mode: Literal["max", "min"],
                         keep_best: int) -> ocp.checkpoint_managers.PreservationPolicy:
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if best_metric is not None:
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=_metric_ranker(best_metric, best_mode), reverse=best_mode == "min", n=keep_best,
            keep_checkpoints_without_metrics=False))
    return ocp.checkpoint_managers.AnyPreservationPolicy(policies)


class TrainCheckpointer:
    """Saves and restores a training run (params, optimizer, RNG, data iterator, metrics).

    Example::

        ckpt = TrainCheckpointer(run_dir, max_to_keep=3, best_metric="val_acc")
        resumed = ckpt.restore_latest(params=abstract_params, opt_state=abstract_opt, data_iterator=it)
        ...
        ckpt.save(step, params=params, opt_state=opt_state, rng=rng, data_iterator=it,
                  metrics={"val_acc": 0.31})
        ckpt.close()  # waits for the last asynchronous save
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 best_metric: str | None = None, best_mode: Literal["max", "min"] = "max", keep_best: int = 1,
                 save_interval_steps: int = 1, async_save: bool = True):
        """
        Args:
          directory: the run's checkpoint directory (created when missing; local path or gs://).
          max_to_keep: newest steps to keep; None keeps every step.
          best_metric: when set, the `keep_best` best steps by this metric are kept too.
          best_mode: "max" (accuracy) or "min" (loss) for `best_metric`.
          save_interval_steps: `save` writes only steps divisible by this (and a directory's first
            save, or `force=True`).
          async_save: write in a background thread (False: `save` returns when written).
        """
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None to keep all), got {max_to_keep}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be at least 1, got {keep_best}")
        self.best_metric = best_metric
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=_preservation_policy(max_to_keep, best_metric, best_mode, keep_best),
            # best_fn makes Orbax record per-step metrics (and rank them in best_step()).
            best_fn=_metric_ranker(best_metric, best_mode) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(_absolute(directory), options=options,
                                              handler_registry=_handler_registry())

    # -- bookkeeping ------------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return os.fspath(self._manager.directory)

    def all_steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory has no checkpoint."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by `best_metric` (the latest step when no metric is tracked)."""
        return self._manager.best_step()

    def step_path(self, step: int) -> str:
        """The directory of one step."""
        return os.fspath(ocp.step.build_step_path(self._manager.directory, ocp.step.standard_name_format(), step))

    def wait_until_finished(self) -> None:
        """Blocks until the asynchronous save in flight (if any) is written; raises its error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for outstanding saves and releases Orbax resources."""
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- save -------------------------------------------------------------------------------------

    def save(self, step: int, *, params: Any, opt_state: Any, rng: RngTree = None,
             data_iterator: grain.DatasetIterator | None = None, metrics: Mapping[str, Any] | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Starts saving one training step; returns False when `save_interval_steps` skips it.

        Args:
          step: the training step (the step directory's name); must be new.
          params: model parameters (`nnx.State` or a pytree of arrays), possibly sharded.
          opt_state: optax state for those parameters.
          rng: a key (typed or raw uint32) or a dict of named keys; replicated across processes.
          data_iterator: a grain iterator; its position now is what `restore` puts back.
          metrics: scalar metrics of this step (e.g. validation accuracy); `best_metric` ranks by them.
          metadata: any JSON-serialisable dict (config, git hash, ...).
          force: save even when `save_interval_steps` would skip this step.
        """
        scalar_metrics = _scalar_metrics(metrics)
        meta = {"format": META_FORMAT_VERSION, "step": int(step), "metrics": scalar_metrics,
                "metadata": dict(metadata or {}), "rng": encode_rng(rng),
                "data_iterator": data_iterator.get_state() if data_iterator is not None else None}
        _check_json("metadata", meta["metadata"])
        items = {PARAMS: ocp.args.StandardSave(sharding_lib.to_pure_tree(params)),
                 OPT_STATE: ocp.args.StandardSave(sharding_lib.to_pure_tree(opt_state)),
                 TRAIN_META: ocp.args.JsonSave(meta)}
        ranked = self.best_metric is not None and self.best_metric in scalar_metrics
        return self._manager.save(int(step), args=ocp.args.Composite(**items),
                                  metrics=scalar_metrics if ranked else None, force=force)

    def save_state(self, state: TrainState, *, metrics: Mapping[str, Any] | None = None,
                   metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """`save` of a `TrainState` at its step (params, optimizer, base seed, data iterator)."""
        return self.save(state.step, params=state.params, opt_state=state.opt_state, rng=np.asarray(state.rng),
                         data_iterator=state.data_iterator, metrics=metrics, metadata=metadata, force=force)

    # -- restore ----------------------------------------------------------------------------------

    def restore_latest(self, *, params: Any, opt_state: Any = None,
                       data_iterator: grain.DatasetIterator | None = None) -> RestoredCheckpoint | None:
        """Resumes from the newest step, or returns None when the directory has no checkpoint."""
        if self.latest_step() is None:
            return None
        return self.restore(params=params, opt_state=opt_state, data_iterator=data_iterator)

    def restore(self, step: int | None = None, *, params: Any, opt_state: Any = None,
                data_iterator: grain.DatasetIterator | None = None) -> RestoredCheckpoint:
        """Restores one step (default: the newest) into the given targets.

        Args:
          step: the step to restore; None means the latest.
          params: target for the parameters: ShapeDtypeStructs with shardings (see `with_shardings`)
            or live arrays, as an `nnx.State` or the pytree that was saved. Arrays come back with
            the target's shardings and dtypes.
          opt_state: target for the optimizer state, or None to skip it (evaluation).
          data_iterator: a freshly built iterator with the run's pipeline arguments; its state
            is set in place to where the checkpoint left off.

        Raises:
          CheckpointNotFoundError: no checkpoint at all, or not `step`.
          CorruptCheckpointError: the step directory exists but cannot be read.
          CheckpointStructureError: the saved tree differs from a target.
        """
        step = self._resolve_step(step)
        meta, saved = self._read(step, lambda: (
            self._manager.restore(step, args=ocp.args.Composite(**{TRAIN_META: ocp.args.JsonRestore()}))[TRAIN_META],
            self._manager.item_metadata(step)))
        targets = {PARAMS: sharding_lib.to_pure_tree(params)}
        if opt_state is not None:
            targets[OPT_STATE] = sharding_lib.to_pure_tree(opt_state)
        for item, target in targets.items():
            if saved.get(item) is None:
                raise CorruptCheckpointError(self._corrupt_message(step, f"its {item!r} item is missing"))
            _check_structure(item, target, saved[item], step, self.step_path(step))
        items = {item: ocp.args.StandardRestore(_abstract_target(target)) for item, target in targets.items()}
        if data_iterator is not None:
            if meta.get("data_iterator") is None:
                raise CheckpointStructureError(
                    f"checkpoint step {step} ({self.step_path(step)}) was saved without a data iterator; pass "
                    "data_iterator=None to restore and start the data from the beginning")
            data_iterator.set_state(meta["data_iterator"])
        restored = self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(**items)))
        return RestoredCheckpoint(
            step=step,
            params=sharding_lib.from_pure_tree(params, restored[PARAMS]),
            opt_state=sharding_lib.from_pure_tree(opt_state, restored[OPT_STATE]) if opt_state is not None else None,
            rng=decode_rng(meta.get("rng")),
            metrics=dict(meta.get("metrics", {})),
            metadata=dict(meta.get("metadata", {})),
        )

    def restore_state(self, target: TrainState, step: int | None = None) -> TrainState:
        """`restore` into a `TrainState` whose params and opt_state are the restore targets (arrays come
        back on their shardings) and whose data iterator is set in place; default step: the newest."""
        restored = self.restore(step, params=target.params, opt_state=target.opt_state,
                                data_iterator=target.data_iterator)
        rng = target.rng if restored.rng is None else np.asarray(restored.rng, np.uint32)
        return target.replace(params=restored.params, opt_state=restored.opt_state, step=restored.step, rng=rng)

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.directory}: it holds no step directories. Check the path, or "
                "start a fresh run (restore_latest returns None for an empty directory).")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; saved steps: {steps}")
        return step

    def _corrupt_message(self, step: int, problem: str) -> str:
        others = [s for s in self.all_steps() if s != step]
        other_steps = f", or restore another step (saved: {others})" if others else ""
        return (f"checkpoint step {step} at {self.step_path(step)} cannot be read: {problem.rstrip('.')}. "
                f"It may be a partial or damaged write. Delete that step directory to resume from an "
                f"earlier step{other_steps}.")

    def _read(self, step: int, read: Any) -> Any:
        """Runs an Orbax read, turning its low-level failures into CorruptCheckpointError."""
        try:
            return read()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore/json/OS errors all mean an unreadable step
            raise CorruptCheckpointError(self._corrupt_message(step, _first_line(e))) from e


def _first_line(error: Exception, limit: int = 300) -> str:
    """`Type: first line of the message`, cut at `limit` characters (TensorStore specs are long)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."
