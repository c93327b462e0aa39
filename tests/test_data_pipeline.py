"""Training-query pipeline: normalisation, shuffling, sharding, exact resumption."""

import itertools
import json
import logging

import pytest

from agentflow_jax.data import pipeline


def records(n: int) -> list[dict]:
    return [{"pid": f"p{i}", "query": f"question {i}", "answer": str(i)} for i in range(n)]


def stream_pids(iterator, n_records: int) -> list[str]:
    """The pids of the first `n_records` records the iterator yields (batches flattened)."""
    flat = itertools.chain.from_iterable(iterator)
    return [record["pid"] for record in itertools.islice(flat, n_records)]


def single_process(source, **kwargs):
    kwargs = {"batch_size": 3, "seed": 0, "shard_index": 0, "shard_count": 1, **kwargs}
    return pipeline.make_query_iterator(source, **kwargs)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_rows_are_normalised_and_rows_without_answer_are_skipped_and_counted(caplog):
    rows = [
        {"question": "capital of France?", "answer": ["Paris", " paris "], "kind": "exact"},
        {"pid": 17, "query": "2+2", "answer": 4, "kind": "math"},
        {"query": "no answer key"},
        {"query": "empty answer", "answer": ""},
        {"query": "null answer", "answer": None},
        {"query": "empty list", "answer": []},
        {"query": "blank parts", "answer": ["", "  "]},
        {"query": "   ", "answer": "orphan answer"},
        {"id": "x9", "query": "default kind", "answer": "yes"},
        {"query": "kept fields", "answer": "7", "qtype": "lookup", "tools": ["Local_Search_Tool"],
         "choices": ["7", "8"]},
    ]
    with caplog.at_level(logging.WARNING, logger="agentflow_jax.data.pipeline"):
        dataset = pipeline.load_queries(rows, pid_prefix="nq-")
    assert dataset.records == (
        {"pid": "nq-0", "query": "capital of France?", "answer": "Paris; paris", "kind": "exact"},
        {"pid": "nq-17", "query": "2+2", "answer": "4", "kind": "math"},
        {"pid": "nq-x9", "query": "default kind", "answer": "yes", "kind": "exact"},
        {"pid": "nq-9", "query": "kept fields", "answer": "7", "kind": "exact", "qtype": "lookup",
         "tools": ["Local_Search_Tool"], "choices": ["7", "8"]},
    )
    assert dataset.skipped_without_answer == 5
    assert dataset.skipped_without_query == 1
    assert "skipped 5 without an answer and 1 without a query" in caplog.text


def test_jsonl_file_source_and_bad_line_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"query": "a", "answer": "1"}\n\n{"query": "b", "answer": ["2", "3"], "kind": "math"}\n')
    dataset = pipeline.load_queries(path, default_kind="search")
    assert [(r["pid"], r["answer"], r["kind"]) for r in dataset.records] == [("0", "1", "search"),
                                                                             ("1", "2; 3", "math")]
    path.write_text('{"query": "a", "answer": "1"}\n{"query": "b", \n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2 is not valid JSON"):
        pipeline.load_queries(path)


def test_concatenated_sources_are_shuffled_together_and_pids_must_be_unique():
    search = pipeline.load_queries(records(6), pid_prefix="nq-")
    math = pipeline.load_queries([{"query": f"m{i}", "answer": "1"} for i in range(4)] + [{"query": "m"}],
                                 default_kind="math", pid_prefix="math-")
    mixed = pipeline.concatenate_queries([search, math])
    assert len(mixed) == 10 and mixed.skipped_without_answer == 1
    first_epoch = stream_pids(single_process(mixed, seed=3), 10)
    assert sorted(first_epoch) == sorted(r["pid"] for r in mixed.records)
    kinds = [pid.split("-")[0] for pid in first_epoch]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # interleaved, not blocks
    with pytest.raises(ValueError, match="pid_prefix"):
        pipeline.concatenate_queries([search, search])


# ----------------------------------------------------------------------------------------------
# Order
# ----------------------------------------------------------------------------------------------


def test_each_epoch_is_a_fresh_permutation_of_every_valid_record():
    source = records(10) + [{"query": "unanswered"}]
    pids = stream_pids(single_process(source, seed=4), 30)
    epochs = [pids[0:10], pids[10:20], pids[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == sorted(f"p{i}" for i in range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [f"p{i}" for i in range(10)]


def test_shuffle_is_deterministic_per_seed():
    assert stream_pids(single_process(records(10), seed=1), 20) == stream_pids(single_process(records(10), seed=1), 20)
    assert stream_pids(single_process(records(10), seed=1), 20) != stream_pids(single_process(records(10), seed=2), 20)


def test_unshuffled_finite_epochs_keep_source_order_and_end():
    batches = list(single_process(records(5), shuffle=False, num_epochs=2, batch_size=4))
    assert [[r["pid"] for r in batch] for batch in batches] == [
        ["p0", "p1", "p2", "p3"], ["p4", "p0", "p1", "p2"], ["p3", "p4"]]
    assert len(list(single_process(records(5), num_epochs=2, batch_size=4, drop_remainder=True))) == 2


def test_batches_are_lists_of_record_copies():
    source = pipeline.load_queries(records(4))
    batch = next(single_process(source, batch_size=2))
    assert isinstance(batch, list) and len(batch) == 2
    batch[0]["answer"] = "changed"
    assert all(r["answer"] != "changed" for r in source.records)


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_records", [10, 11])
def test_process_shares_are_disjoint_and_together_are_the_single_process_batches(n_records):
    """Each of 2 processes gets its half of every global batch; side by side they are exactly the
    batches one process reads, so a run's data does not depend on its number of processes."""
    whole = pipeline.make_query_iterator(records(n_records), batch_size=4, seed=9, shard_index=0, shard_count=1)
    shares = [pipeline.make_query_iterator(records(n_records), batch_size=4, seed=9, shard_index=i, shard_count=2)
              for i in range(2)]
    for _ in range(6):  # across epoch boundaries
        first, second, together = next(shares[0]), next(shares[1]), next(whole)
        assert len(first) == len(second) == 2
        assert not {r["pid"] for r in first} & {r["pid"] for r in second}
        assert first + second == together
    assert shares[0].get_state() == shares[1].get_state() == whole.get_state()


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.make_query_iterator(records(4), batch_size=2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        pipeline.make_query_iterator(records(3), batch_size=2, seed=0, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.make_query_iterator(records(3), batch_size=0, seed=0)


# ----------------------------------------------------------------------------------------------
# Resumption
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])  # 10 records, batches of 3: epochs end inside batch 4, 7
def test_restored_state_continues_with_exactly_the_same_batches(consumed):
    original = single_process(records(10), seed=11)
    for _ in range(consumed):
        next(original)
    state = json.loads(json.dumps(original.get_state()))  # what a checkpoint stores
    expected = [next(original) for _ in range(6)]

    resumed = single_process(records(10), seed=11)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(6)] == expected
