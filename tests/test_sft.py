"""Supervised fine-tuning of real checkpoints (python -m agentflow_jax.sft): chats through the Qwen2.5
chat template with the loss on assistant tokens only, trajectories written by our own rollouts as
planner data, the run end to end on a tiny random Qwen2 (loss falls, checkpoints resume exactly, the
HF export gives transformers the trained logits), and the step on 8 devices equal to 1 device."""

import importlib.util
import json
import os

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers

from agentflow_jax import checkpoint as checkpoint_lib
from agentflow_jax import sft, sharding, supervised
from agentflow_jax.agent import prompts
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams, rollout_batch
from agentflow_jax.config_reader import ConfigError
from agentflow_jax.data.chats import read_chat_file, read_trajectory_file
from agentflow_jax.data.pipeline import DataFileError
from agentflow_jax.engines import Generation
from agentflow_jax.engines.scripted import ScriptedEngine
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import QwenTokenizer
from agentflow_jax.observability import RunLogger
from agentflow_jax.tools import build_toolbox
from hf_reference import hf_logits, make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_CONFIG = os.path.join(ROOT, "experiments", "configs", "qwen2_5_sft.py")
QWEN_VOCAB = 151_936  # Qwen2.5's embedding rows (the tokenizer has 151,665 ids)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)
CITIES = [a + b for a in ("Vel", "Quil", "Bras", "Or", "Tes", "Mar") for b in ("mora", "lon", "ka", "rin", "den")]


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen2 with Qwen2.5's vocabulary, written by transformers."""
    path = tmp_path_factory.mktemp("tiny_qwen")
    make_hf_model(seed=1, vocab_size=QWEN_VOCAB, **TINY).save_pretrained(path)
    return str(path)


def chat(i: int, turns: int = 1) -> dict:
    """A generated conversation; its assistant replies follow from the user's words alone."""
    messages = [{"role": "system", "content": "You answer in one sentence."}] if i % 3 == 0 else []
    for t in range(turns):
        city = CITIES[(i + t) % len(CITIES)]
        messages += [{"role": "user", "content": f"Where is {city}?"},
                     {"role": "assistant", "content": f"{city} lies north of {CITIES[(i + t + 7) % len(CITIES)]}."}]
    return {"messages": messages}


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Chats -> examples: the loss covers the assistant tokens only
# ------------------------------------------------------------------------------------------------


def assistant_span(ids: list[int], tokenizer) -> tuple[int, int]:
    """[start, end] token positions of the content and <|im_end|> of the row's last assistant turn,
    found by searching the ids for `<|im_start|>assistant\\n` (independent of how rows were built)."""
    header = [tokenizer.token_to_id("<|im_start|>"), *tokenizer.encode("assistant\n")]
    starts = [i + len(header) for i in range(len(ids) - len(header) + 1) if ids[i:i + len(header)] == header]
    end = ids.index(tokenizer.token_to_id("<|im_end|>"), starts[-1])
    return starts[-1], end


def test_every_weighted_assistant_message_and_nothing_else_carries_loss(tokenizer, tmp_path):
    rows = [chat(0, turns=3), chat(1), chat(2, turns=2)]
    rows[2]["messages"][1]["weight"] = 0  # its first reply is context only
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    chats = read_chat_file(path)
    examples = [e for c in chats for e in supervised.chat_examples(tokenizer, c.messages, c.trained)]
    sources = [(c, index) for c in chats for index in c.trained]
    batch = supervised.pack_examples(examples, length=256, rows=len(examples), pad_id=tokenizer.pad_token_id)

    expected_replies = [m["content"] for r in rows for m in r["messages"]
                        if m["role"] == "assistant" and m.get("weight", 1) == 1]
    replies = []
    for row, example in enumerate(examples):
        ids = batch.input_ids[row, :example.length].tolist()
        start, end = assistant_span(ids, tokenizer)
        expected = np.zeros(batch.loss_mask.shape[1])
        expected[start - 1:end] = 1.0  # position p predicts token p + 1
        np.testing.assert_array_equal(batch.loss_mask[row], expected)
        replies.append(tokenizer.decode(ids[start:end]))
        # The prompt is the chat before the reply, rendered for generation as the agent renders it.
        conversation, index = sources[row]
        assert tokenizer.decode(ids[:start]) == tokenizer.apply_chat_template(conversation.messages[:index])
    assert replies == expected_replies
    assert sum(len(c.trained) for c in chats) == 5 == len(examples)
    last = read_chat_file(path, assistant_turns="last")
    assert [c.trained for c in last] == [(6,), (1,), (3,)]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"chats.jsonl:2 is not valid JSON"),
    ('{"messages": [{"role": "user"}]}', r"chats.jsonl:2: message 0 needs a string \"role\" and a string \"content\""),
    ('{"messages": [{"role": "tool", "content": "x"}]}', r"chats.jsonl:2: message 0 has role 'tool'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"chats.jsonl:2: no assistant message to train on"),
    ('{"text": "hi"}', r"chats.jsonl:2: expected \{\"messages\""),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}',
     r"chats.jsonl:2: message 1 has weight 2"),
])
def test_a_bad_chat_line_names_the_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "chats.jsonl", [chat(0), line])
    with pytest.raises(DataFileError, match=message):
        read_chat_file(path)


def reply_for(request):
    system = request.messages[0]["content"]
    if system == prompts.PLANNER_SYSTEM:
        return ("Justification: the generalist knows.\nContext: none\nSub-Goal: answer the question\n"
                "Tool Name: Generalist_Solution_Generator_Tool")
    if system == prompts.EXECUTOR_SYSTEM:
        return '{"tool_name": "Generalist_Solution_Generator_Tool", "arguments": {"query": "q"}}'
    if system == prompts.VERIFIER_SYSTEM:
        return "Conclusion: STOP"
    if system == prompts.GENERATOR_SYSTEM:
        question = request.messages[-1]["content"]
        return "<answer>4</answer>" if "2+2" in question else "<answer>7</answer>"
    return "Some analysis."


def test_trajectories_written_by_a_run_become_planner_chats(tmp_path, tokenizer):
    """Rollouts logged by the run logger (what train.py writes): every planner call of a correctly
    answered trajectory becomes (planner prompt messages -> planner text); wrong answers, other splits
    and calls cut off by the token limit are left out."""
    engine = ScriptedEngine(lambda request: Generation(text=reply_for(request), finish_reason="stop"))
    toolbox = build_toolbox(["generalist"], engine=engine)
    config = RolloutConfig(max_turns=1, planner=SamplingParams())
    queries = ["What is 2+2?", "What is 3+3?"]
    trajectories = rollout_batch(queries, n=1, planner=engine, frozen=engine, toolbox=toolbox, config=config)
    logger = RunLogger(str(tmp_path), total_steps=1, progress=False)
    logger.log_trajectories(1, "train", [t.to_json() for t in trajectories])
    logger.log_trajectories(1, "eval", [trajectories[0].to_json()])
    logger.close()
    gold = [{"pid": "a", "query": queries[0], "answer": "4", "kind": "math"},
            {"pid": "b", "query": queries[1], "answer": "6", "kind": "math"}]
    path = str(tmp_path / "trajectories.jsonl")

    read = read_trajectory_file(path, splits=("train",), queries=gold)
    assert read.counts == {"trajectories": 2, "incorrect": 1, "planner_calls": 1}
    (only,) = read.chats
    call = trajectories[0].turns[0].planner
    assert list(only.messages[:-1]) == [dict(m) for m in call.messages]
    assert only.messages[-1] == {"role": "assistant", "content": call.text} and only.trained == (len(call.messages),)
    assert len(read_trajectory_file(path, splits=("train", "eval")).chats) == 3  # without gold: all

    truncated = json.loads(open(path).readline())
    truncated["trajectory"]["turns"][0]["planner"]["finish_reason"] = "length"
    cut = write_jsonl(tmp_path / "cut.jsonl", [truncated, json.loads(open(path).readlines()[1])])
    assert read_trajectory_file(cut).counts == {"trajectories": 2, "truncated_calls": 1, "planner_calls": 1}
    with pytest.raises(DataFileError, match=r"not in the query file"):
        read_trajectory_file(path, queries=gold[1:])
    with pytest.raises(DataFileError, match=r"bad.jsonl:1: expected a logged trajectory"):
        read_trajectory_file(write_jsonl(tmp_path / "bad.jsonl", [chat(0)]))


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def sft_config(size: str = "0.5b") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("qwen2_5_sft", SFT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)


@pytest.mark.parametrize("size,path", [("0.5b", "/models/Qwen2.5-0.5B-Instruct"), ("1.5b", "/models/Qwen2.5-1.5B-Instruct"),
                                       ("7B", "/models/Qwen2.5-7B-Instruct")])
def test_shipped_sft_configs_are_valid_planner_warm_starts(size, path):
    run = sft.read_sft(sft_config(size), source=SFT_CONFIG)
    assert run.model.path == path and run.model.tokenizer == ""
    assert run.data.format == "trajectories" and run.data.correct_only and run.data.queries_path
    assert run.mesh == {"data": 1, "fsdp": -1, "tensor": 1} and run.model.dtype == "bfloat16"
    assert run.batch.tokens_per_batch >= run.batch.length_buckets[-1]


def test_sft_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown model size '3b'"):
        sft_config("3b")
    config = sft_config()
    config.data.formt = "chat"
    with pytest.raises(ConfigError, match=r"config.data has unknown key 'formt' \(did you mean 'format'\?\)"):
        sft.read_sft(config, source=SFT_CONFIG)
    config = sft_config()
    config.data.queries_path = ""
    with pytest.raises(ConfigError, match="correct_only needs format 'trajectories' and queries_path"):
        sft.read_sft(config, source=SFT_CONFIG)
    config = sft_config()
    config.batch.length_buckets = (256, 128)
    with pytest.raises(ConfigError, match="increasing"):
        sft.read_sft(config, source=SFT_CONFIG)


# ------------------------------------------------------------------------------------------------
# The run end to end
# ------------------------------------------------------------------------------------------------


def tiny_run_config(qwen_dir: str, workdir, train_path: str, eval_path: str, steps: int) -> ml_collections.ConfigDict:
    config = sft_config("0.5b")
    config.workdir = str(workdir)
    config.mesh = {}
    config.model.path = qwen_dir
    config.model.tokenizer = "qwen2.5"
    config.model.dtype = config.model.param_dtype = "float32"
    config.model.remat = False
    config.data.format = "chat"
    config.data.correct_only = False
    config.data.train_path = train_path
    config.data.eval_path = eval_path
    config.batch.length_buckets = (96,)
    config.batch.tokens_per_batch = 768
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 2
    config.optim.weight_decay = 0.0
    config.train.steps = steps
    config.train.save_every = 4
    config.train.progress_bar = False
    config.train.export_dtype = "float32"
    config.eval.every = 8
    return config


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chats")
    train = write_jsonl(directory / "train.jsonl", [chat(i, turns=1 + i % 2) for i in range(24)])
    heldout = write_jsonl(directory / "heldout.jsonl", [chat(i, turns=1) for i in range(24, 30)])
    return train, heldout


def test_sft_run_lowers_the_loss_and_exports_a_model_transformers_reads(qwen_dir, chat_files, tmp_path):
    train_path, eval_path = chat_files
    workdir = tmp_path / "run"
    summary = sft.run(sft.read_sft(tiny_run_config(qwen_dir, workdir, train_path, eval_path, steps=16)))

    assert summary.steps == 16 and summary.data["chats"] == 24 and summary.data["examples"] == 36
    assert summary.final_eval_nll < 0.7 * summary.initial_eval_nll
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    nll = [r["nll"] for r in rows if "nll" in r]
    assert len(nll) == 16 and np.mean(nll[-4:]) < 0.7 * np.mean(nll[:4])
    assert [r["step"] for r in rows if "eval_nll" in r] == [0, 8, 16]
    assert {"curves.png", "summary.json", "run_metadata.json", "model_hf"} <= set(os.listdir(workdir))

    # The newest checkpoint holds the trained parameters; transformers gives the export the same logits.
    target = nnx.state(hf_io.load_pretrained(qwen_dir))
    restored = checkpoint_lib.TrainCheckpointer(workdir / "checkpoints").restore(params=target)
    assert restored.step == 16
    trained = nnx.merge(nnx.split(hf_io.load_pretrained(qwen_dir))[0], restored.params)
    reference = transformers.Qwen2ForCausalLM.from_pretrained(workdir / "model_hf", dtype=torch.float32).eval()
    ids = np.asarray([QwenTokenizer().encode("Where is Velmora? Velmora lies north of Marrow.")], np.int64)
    mask = np.ones_like(ids)
    ours = np.asarray(trained(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(reference, ids, mask), atol=2e-4, rtol=1e-4)
    initial = np.asarray(hf_io.load_pretrained(qwen_dir)(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - initial).max() > 0.1  # it did train


def test_a_resumed_sft_run_ends_where_an_uninterrupted_one_does(qwen_dir, chat_files, tmp_path):
    """A run stopped after 4 of 6 steps (a constant learning rate after warm-up, so that the 4-step run
    is the 6-step run cut short) and resumed gives the uninterrupted run's weights and losses."""
    train_path, _ = chat_files

    def run(workdir, steps):
        config = tiny_run_config(qwen_dir, workdir, train_path, "", steps=steps)
        config.optim.schedule = "constant"
        return sft.run(sft.read_sft(config))

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 4)
    resumed = run(tmp_path / "b", 6)
    assert resumed.steps == 6
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    a = hf_io.load_pretrained(tmp_path / "a" / "model_hf")
    b = hf_io.load_pretrained(tmp_path / "b" / "model_hf")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert straight.last_nll == pytest.approx(resumed.last_nll, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# 8 devices
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_qwen")
    make_hf_model(seed=2, vocab_size=256, **{**TINY, "tie_word_embeddings": False}).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mesh_spec,batch_axes", [({"fsdp": 8}, "fsdp"), ({"data": 2, "fsdp": 2, "tensor": 2},
                                                                           ("data", "fsdp"))])
def test_sft_steps_on_a_mesh_equal_one_device(small_dir, mesh_spec, batch_axes):
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    examples = [supervised.Example(tuple(rng.integers(0, 256, int(n)).tolist()), tuple(rng.integers(0, 256, 6).tolist()))
                for n in rng.integers(10, 40, 5)]
    # make_optimizer's transformation with a large Adam eps: the update is then nearly linear in the
    # gradient, so summation-order noise in tiny gradients is not blown up to the learning rate.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=0.01))
    mesh = sharding.make_mesh(mesh_spec)
    one = supervised.SFTTrainer(hf_io.load_pretrained(small_dir), optimizer, chunk_size=16, loss_positions_only=True)
    many = supervised.SFTTrainer(hf_io.load_pretrained(small_dir, mesh=mesh), optimizer, chunk_size=16, mesh=mesh,
                                 loss_positions_only=True)
    assert one.rows_for(64, 320) == 5 and many.rows_for(64, 320) == 8  # padded to the batch shards
    for _ in range(3):
        results = [trainer.step(supervised.pack_examples(examples, length=64, rows=trainer.rows_for(64, 320),
                                                         pad_id=0)) for trainer in (one, many)]
        (nll_one, norm_one), (nll_many, norm_many) = results
        np.testing.assert_allclose(float(nll_many), float(nll_one), rtol=1e-5)
        np.testing.assert_allclose(float(norm_many), float(norm_one), rtol=1e-4)
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    # Parameters and Adam moments keep the parameters' shardings; one compile for the three steps.
    kernel = many.params["layers"]["mlp"]["up_kernel"]
    expected = sharding.partition_spec(kernel.shape, kernel.logical_axes, mesh)
    assert kernel.get_value().sharding.spec == expected
    mu = many.state.opt_state[1][0].mu["layers"]["mlp"]["up_kernel"]
    assert mu.get_value().sharding.spec == expected
    assert dict(many.trace_counts) == {64: 1}
    batch_spec = many._place(supervised.pack_examples(examples, length=64, rows=8, pad_id=0))[0].sharding.spec
    assert batch_spec == jax.sharding.PartitionSpec(batch_axes, None)
