"""TrainCheckpointer: exact round trips, retention, async saves, resharding restores, clear errors."""

import glob
import os

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agentflow_jax import checkpoint, sharding
from agentflow_jax.data import pipeline
from agentflow_jax.models import config as model_config, qwen2

TINY = model_config.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
QUERIES = [{"query": f"question {i}", "answer": str(i)} for i in range(7)]


def abstract_params() -> nnx.State:
    return nnx.state(qwen2.abstract_model(TINY, param_dtype=jnp.bfloat16), nnx.Param)


def random_params(mesh, seed: int = 0) -> nnx.State:
    """The tiny model's parameter State (bfloat16) with random values, placed on `mesh`.

    Values come from numpy so that no per-initialiser XLA programs are compiled.
    """
    generator = np.random.default_rng(seed)
    values = jax.tree.map(lambda s: generator.standard_normal(s.shape).astype(s.dtype), abstract_params())
    return sharding.shard_state(values, mesh)


def param_target(mesh) -> nnx.State:
    abstract = abstract_params()
    return checkpoint.with_shardings(abstract, sharding.state_shardings(abstract, mesh))


def assert_trees_identical(actual, expected):
    """Same structure, dtypes and bits (bfloat16 included)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def small_params(offset: float = 0.0) -> dict:
    return {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + offset, "b": jnp.ones((4,), jnp.bfloat16)}


SGD = optax.sgd(0.1)


def save_small(ckpt: checkpoint.TrainCheckpointer, step: int, **kwargs) -> None:
    params = small_params(step)
    ckpt.save(step, params=params, opt_state=SGD.init(params), **kwargs)


def step_dirs(directory) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@pytest.fixture(scope="module")
def mesh_2x4():
    return sharding.make_mesh({"fsdp": 2, "tensor": 4})


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


def test_round_trip_restores_every_part_exactly_in_a_new_process_view(tmp_path, mesh_2x4):
    params = random_params(mesh_2x4)
    tx = optax.adamw(1e-2, weight_decay=0.01)

    @jax.jit
    def two_updates(params, opt_state):  # non-trivial mu, nu and count; one compilation
        for scale in (0.5, -0.25):
            grads = jax.tree.map(lambda p: (p * scale).astype(p.dtype), params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    params, opt_state = two_updates(params, jax.jit(tx.init)(params))
    rng = {"sample": jax.random.key(7), "legacy": jax.random.PRNGKey(3)}
    data = pipeline.make_query_iterator(QUERIES, batch_size=2, seed=5, shard_index=0, shard_count=1)
    for _ in range(3):
        next(data)
    metrics = {"val_acc": jnp.float32(0.375), "loss": 1.25}
    metadata = {"config": "tiny_cpu", "tokens": [1, 2]}

    saver = checkpoint.TrainCheckpointer(tmp_path, async_save=False)
    assert saver.save(12, params=params, opt_state=opt_state, rng=rng, data_iterator=data, metrics=metrics,
                      metadata=metadata)
    saver.close()
    expected_batches = [next(data) for _ in range(4)]  # crosses the epoch boundary (7 queries)

    # A fresh checkpointer on the directory, as after a restart.
    resumed_data = pipeline.make_query_iterator(QUERIES, batch_size=2, seed=5, shard_index=0, shard_count=1)
    target = param_target(mesh_2x4)
    restored = checkpoint.TrainCheckpointer(tmp_path).restore_latest(
        params=target, opt_state=sharding.abstract_opt_state(tx, target), data_iterator=resumed_data)

    assert restored.step == 12
    assert isinstance(restored.params, nnx.State)
    assert jax.tree.leaves(restored.params)[0].dtype == jnp.bfloat16
    assert_trees_identical(restored.params, params)
    assert_trees_identical(restored.opt_state, opt_state)
    assert int(restored.opt_state[0].count) == 2
    assert jax.dtypes.issubdtype(restored.rng["sample"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(restored.rng["sample"]), jax.random.key_data(rng["sample"]))
    assert restored.rng["legacy"].dtype == jnp.uint32
    assert np.array_equal(restored.rng["legacy"], rng["legacy"])
    assert restored.metrics == {"val_acc": 0.375, "loss": 1.25}
    assert restored.metadata == metadata
    assert [next(resumed_data) for _ in range(4)] == expected_batches


def test_async_save_returns_before_writing_and_restores_after_wait(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(tmp_path, async_save=True)
    params = small_params()
    assert ckpt.save(1, params=params, opt_state=SGD.init(params), rng=jax.random.key(1))
    params = jax.tree.map(lambda x: x * 2, params)  # the training loop carries on meanwhile
    ckpt.save(2, params=params, opt_state=SGD.init(params))  # waits for step 1 internally
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]
    assert os.path.exists(os.path.join(ckpt.step_path(2), "commit_success.txt"))

    first = ckpt.restore(1, params=small_params(), opt_state=None)
    latest = ckpt.restore_latest(params=small_params())
    ckpt.close()
    assert_trees_identical(first.params, small_params())
    assert_trees_identical(latest.params, params)
    assert latest.step == 2 and latest.rng is None and latest.opt_state is None


def test_relative_directory_saves_asynchronously_and_restores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run started with workdir="runs/x" from the repository root
    ckpt = checkpoint.TrainCheckpointer(os.path.join("runs", "ckpt"), async_save=True)
    save_small(ckpt, 3)
    save_small(ckpt, 4)  # the second save surfaces any failure of the first background write
    ckpt.wait_until_finished()
    assert step_dirs(tmp_path / "runs" / "ckpt") == [3, 4]
    assert_trees_identical(ckpt.restore_latest(params=small_params()).params, small_params(4))
    ckpt.close()


def test_params_only_restore_for_evaluation(tmp_path):
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        save_small(ckpt, 3)
    restored = checkpoint.TrainCheckpointer(tmp_path).restore(params=small_params())
    assert_trees_identical(restored.params, small_params(3))
    assert restored.opt_state is None


# ----------------------------------------------------------------------------------------------
# Retention
# ----------------------------------------------------------------------------------------------


def test_keep_n_deletes_the_oldest_steps(tmp_path):
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            save_small(ckpt, step)
    assert step_dirs(tmp_path) == [4, 5]
    assert checkpoint.TrainCheckpointer(tmp_path).all_steps() == [4, 5]


def test_save_interval_skips_steps_after_the_first_unless_forced(tmp_path):
    with checkpoint.TrainCheckpointer(tmp_path, save_interval_steps=2) as ckpt:
        saved = {step: ckpt.save(step, params=small_params(), opt_state=SGD.init(small_params()))
                 for step in range(1, 5)}
        assert ckpt.save(5, params=small_params(), opt_state=SGD.init(small_params()), force=True)
    assert saved == {1: True, 2: True, 3: False, 4: True}  # Orbax always writes a run's first save
    assert step_dirs(tmp_path) == [2, 4, 5]


@pytest.mark.parametrize("mode, values, best", [
    ("max", [0.1, 0.9, 0.2, 0.3, 0.4, 0.5], 2),
    ("min", [3.0, 0.5, 2.0, 1.5, 1.0, 0.9], 2),
])
def test_best_metric_step_is_kept_even_when_old(tmp_path, mode, values, best):
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2, best_metric="score", best_mode=mode) as ckpt:
        for step, value in enumerate(values, start=1):
            save_small(ckpt, step, metrics={"score": value})
        assert ckpt.best_step() == best
    assert step_dirs(tmp_path) == [best, 5, 6]

    # After a restart the ranking is read back from disk and still protects the best step.
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2, best_metric="score", best_mode=mode) as ckpt:
        assert ckpt.best_step() == best
        save_small(ckpt, 7, metrics={"score": values[-1]})
        save_small(ckpt, 8)  # no metric: kept only while among the newest
        save_small(ckpt, 9)
    assert step_dirs(tmp_path) == [best, 8, 9]


# ----------------------------------------------------------------------------------------------
# Another mesh
# ----------------------------------------------------------------------------------------------


def test_restore_into_a_different_mesh(tmp_path, mesh_2x4):
    fsdp8 = sharding.make_mesh({"fsdp": 8})
    params = random_params(fsdp8, seed=1)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(4, params=params, opt_state=opt_state)

    target = param_target(mesh_2x4)
    opt_target = sharding.abstract_opt_state(tx, target)
    restored = checkpoint.TrainCheckpointer(tmp_path).restore(params=target, opt_state=opt_target)

    assert_trees_identical(restored.params, params)
    assert_trees_identical(restored.opt_state, opt_state)
    for got, wanted in zip(jax.tree.leaves(restored.params), jax.tree.leaves(target)):
        assert got.sharding == wanted.sharding
    assert any(s.sharding.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(target))
    mu = restored.opt_state[0].mu
    for got, wanted in zip(jax.tree.leaves(mu), jax.tree.leaves(target)):
        assert got.sharding == wanted.sharding  # Adam moments follow their parameter
    count_sharding = restored.opt_state[0].count.sharding
    assert count_sharding.mesh == mesh_2x4 and count_sharding.is_fully_replicated


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_empty_directory_resumes_nothing_and_required_restore_says_so(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "run")
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(params=small_params()) is None
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"no checkpoint in .*run.*fresh run"):
        ckpt.restore(params=small_params())


def test_missing_step_lists_the_saved_steps(tmp_path):
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        save_small(ckpt, 3)
        with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 7 .*saved steps: \[3\]"):
            ckpt.restore(7, params=small_params())


def _truncate_array_data(step_dir: str) -> None:
    for path in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _delete_array_metadata(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "params", "_METADATA"))


def _delete_train_meta(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "train_meta", "metadata"))


# When one array read fails, Orbax leaves the other reads' coroutines to an event loop it has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate_array_data, _delete_array_metadata, _delete_train_meta])
def test_corrupt_step_names_step_path_and_remedy(tmp_path, damage):
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        save_small(ckpt, 1)
        save_small(ckpt, 2)
    step_dir = os.path.join(tmp_path, "2")
    damage(step_dir)
    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    with pytest.raises(checkpoint.CorruptCheckpointError) as error:
        ckpt.restore_latest(params=small_params(), opt_state=SGD.init(small_params()))
    message = str(error.value)
    assert f"step 2 at {step_dir}" in message
    assert "Delete that step directory" in message and "saved: [1]" in message
    assert_trees_identical(ckpt.restore(1, params=small_params()).params, small_params(1))


def test_structure_mismatch_names_the_first_differing_key(tmp_path):
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, params={"embed": jnp.zeros((4, 2)), "layer": {"k": jnp.zeros(3), "q": jnp.zeros(3)}},
                  opt_state=SGD.init({}))
    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    renamed = {"embed": jnp.zeros((4, 2)), "layer": {"q": jnp.zeros(3), "v": jnp.zeros(3)}}
    with pytest.raises(checkpoint.CheckpointStructureError,
                       match=r"first differing key 'layer\.k' is only in the checkpoint"):
        ckpt.restore(params=renamed)
    reshaped = {"embed": jnp.zeros((4, 3)), "layer": {"k": jnp.zeros(3), "q": jnp.zeros(3)}}
    with pytest.raises(checkpoint.CheckpointStructureError, match=r"'embed' has shape \(4, 2\) .* \(4, 3\)"):
        ckpt.restore(params=reshaped)


def test_restoring_a_data_iterator_that_was_not_saved_is_explained(tmp_path):
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        save_small(ckpt, 1)
    data = pipeline.make_query_iterator(QUERIES, batch_size=2, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(checkpoint.CheckpointStructureError, match="without a data iterator.*data_iterator=None"):
        checkpoint.TrainCheckpointer(tmp_path).restore(params=small_params(), data_iterator=data)
