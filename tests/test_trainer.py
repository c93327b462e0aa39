"""The Flow-GRPO trainer and the train entry point on a tiny random model (CPU, seconds)."""

import dataclasses
import json
import os

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import build_tiny_run, make_config

from agentflow_jax import train as train_lib
from agentflow_jax.agent.memory import Memory
from agentflow_jax.config_reader import ConfigError
from agentflow_jax.experiment import read_experiment
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import load_tokenizer
from agentflow_jax.optim import make_optimizer
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import TurnRecord
from agentflow_jax.rl.logprobs import token_logprobs
from agentflow_jax.rl.trainer import FlowGRPOTrainer, minibatch_split


def _record(query_id, trajectory_id, reward=1.0):
    return TurnRecord(query_id, trajectory_id, (1, 2), (3,), (-0.5,), reward)


def test_minibatches_hold_whole_trajectories_or_row_chunks_and_split_alike_over_processes():
    records = [_record(0, 0), _record(0, 0), _record(0, 1), _record(1, 2), _record(1, 2), _record(1, 2),
               _record(1, 3)]
    split = lambda rs, **kw: [g.tolist() for g in minibatch_split(rs, **kw)]  # noqa: E731
    assert split(records, num_minibatches=2) == [[0, 1, 2], [3, 4, 5, 6]]
    assert split(records, num_minibatches=6) == [[0, 1], [2], [3, 4, 5], [6]]  # at most one per trajectory
    assert split(records, num_minibatches=1, minibatch_rows=3) == [[0, 1, 2], [3, 4, 5], [6]]
    # Two processes holding trajectories {0, 1} and {2, 3}: each gets its part of the same chunks.
    first, second = records[:3], records[3:]
    for kw in (dict(num_minibatches=2), dict(num_minibatches=3), dict(num_minibatches=1, minibatch_rows=2)):
        total = 4 if "minibatch_rows" not in kw else 7
        a = split(first, unit_offset=0, total_units=total, **kw)
        b = split(second, unit_offset=2 if total == 4 else 3, total_units=total, **kw)
        assert len(a) == len(b) == len(split(records, **kw))
        assert [x + [i + 3 for i in y] for x, y in zip(a, b)] == split(records, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))


DETERMINISTIC = ("reward", "accuracy", "turns", "planner_calls", "planner_tokens", "loss", "kl", "ratio_mean",
                 "sampler_old_abs_gap", "advantage_std", "grad_norm")


def _train_metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: {k: r[k] for k in DETERMINISTIC if k in r} for r in rows if "reward" in r}


def test_resumed_run_matches_uninterrupted_run(tiny_run, tmp_path):
    full = train_lib.run(read_experiment(make_config(tiny_run, tmp_path / "full", steps=2)))
    assert full.steps == 2
    train_lib.run(read_experiment(make_config(tiny_run, tmp_path / "resumed", steps=1)))
    resumed = train_lib.run(read_experiment(make_config(tiny_run, tmp_path / "resumed", steps=2)))
    assert resumed.steps == 2
    a, b = _train_metrics(tmp_path / "full"), _train_metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (2,):
        assert a[step].keys() == b[step].keys() and "loss" in a[step]
        for key in a[step]:
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, atol=1e-7, err_msg=f"{step} {key}")
    assert os.path.exists(tmp_path / "full" / "curves.png")
    assert os.path.exists(tmp_path / "full" / "trajectories.jsonl")


def test_zero_learning_rate_keeps_parameters(tiny_run, tmp_path):
    config = make_config(tiny_run, tmp_path / "lr0", steps=1, learning_rate=0.0)
    train_lib.run(read_experiment(config))
    from agentflow_jax.checkpoint import TrainCheckpointer

    model = hf_io.load_pretrained(tiny_run / "model")
    before = nnx.state(model)
    restored = TrainCheckpointer(str(tmp_path / "lr0" / "checkpoints")).restore_latest(params=before)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def make_trainer(config, *, params=None, num_minibatches=None, kl_in_reward=None):
    """A FlowGRPOTrainer of the tiny run as `train.run` builds it (optionally other params / settings)."""
    experiment = read_experiment(config)
    rl = experiment.rl
    if num_minibatches is not None:
        rl = dataclasses.replace(rl, num_minibatches=num_minibatches)
    if kl_in_reward is not None:
        rl = dataclasses.replace(rl, loss=dataclasses.replace(rl.loss, kl_in_reward=kl_in_reward, kl_coef=2.0))
    graphdef, loaded = nnx.split(hf_io.load_pretrained(experiment.model.path))
    return FlowGRPOTrainer(graphdef, loaded if params is None else params,
                           tokenizer=load_tokenizer(experiment.model.tokenizer_spec),
                           toolbox_factory=experiment.tools.build, optimizer=make_optimizer(experiment.optim),
                           config=rl, rollout=experiment.rollout_config())


def test_non_finite_loss_skips_update(tiny_run):
    config = make_config(tiny_run, "/unused")
    graphdef, params = nnx.split(hf_io.load_pretrained(tiny_run / "model"))
    params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim == 2 else x, params)
    trainer = make_trainer(config, params=params)
    records = [TurnRecord(q, t, (5, 6, 7), (8, 9), (-1.0, -2.0), float(t % 2)) for q in range(2) for t in (2 * q, 2 * q + 1)]
    opt_before = jax.tree.leaves(trainer.state.opt_state)
    metrics = trainer.update(records)
    assert metrics["skipped_updates"] == 2.0 and metrics["updates"] == 0.0
    for x, y in zip(opt_before, jax.tree.leaves(trainer.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_records(rng):
    """Planner calls of 3 queries x 4 trajectories with 1-3 turns and mixed rewards."""
    records, trajectory = [], 0
    for query in range(3):
        for _ in range(4):
            reward = float(rng.integers(0, 2))
            for _ in range(int(rng.integers(1, 4))):
                prompt = tuple(rng.integers(5, 300, int(rng.integers(3, 12))).tolist())
                response = tuple(rng.integers(5, 300, int(rng.integers(1, 6))).tolist())
                records.append(TurnRecord(query, trajectory, prompt, response, (-1.0,) * len(response), reward))
            trajectory += 1
    return records


def _advantage_per_record(minibatches, records):
    """Each record's advantage as the mini-batches carry it (rows are packed in record order)."""
    out = {}
    indices = iter(range(len(records)))
    for mb in minibatches:
        for row in range(int(mb.batch.row_is_real.sum())):
            out[next(indices)] = float(mb.advantages[row])
    return np.asarray([out[i] for i in range(len(records))])


def test_kl_in_reward_advantages_equal_the_whole_step_advantages_for_any_minibatch_count(tiny_run):
    """With KL in the reward, the advantage of a trajectory does not depend on how the step is cut:
    it equals the advantage computed from the whole step's rewards and per-trajectory KL penalties,
    computed here independently from the reference and policy log-probs of each planner call."""
    config = make_config(tiny_run, "/unused")
    records = _step_records(np.random.default_rng(0))
    one = make_trainer(config, num_minibatches=1, kl_in_reward=True)
    # A policy that differs from the reference, so the KL penalties are not zero.
    one.state = one.state.replace(params=jax.tree.map(lambda x: x * 4.0, one.state.params))
    whole = one.prepare_minibatches(records)
    b = whole[0].batch
    policy, reference = (token_logprobs(one.graphdef, p, b.input_ids, b.attention_mask, b.targets,
                                        temperature=one.config.loss.temperature)[0] for p in (one.params, one.ref_params))
    penalties = loss_lib.kl_reward_penalties(policy, reference, b.loss_mask, one.config.loss)[:len(records)]
    assert np.abs(penalties).max() > 0.05
    by_trajectory = {}
    for record, penalty in zip(records, penalties):
        by_trajectory.setdefault(record.trajectory_id, [record.query_id, record.reward, 0.0])[2] += penalty
    expected = np.zeros(len(records))
    for query in range(3):
        members = [(tid, r - p) for tid, (q, r, p) in by_trajectory.items() if q == query]
        values = np.asarray([v for _, v in members])
        if np.all(values == values[0]):
            continue
        normalised = (values - values.mean()) / (values.std(ddof=1) + 1e-6)
        for (tid, _), a in zip(members, normalised):
            expected[[i for i, r in enumerate(records) if r.trajectory_id == tid]] = a
    np.testing.assert_allclose(_advantage_per_record(whole, records), expected, rtol=1e-4, atol=1e-5)
    for count in (2, 3, 5, 12):
        trainer = make_trainer(config, num_minibatches=count, kl_in_reward=True)
        trainer.state = trainer.state.replace(params=one.state.params)
        minibatches = trainer.prepare_minibatches(records)
        assert len(minibatches) == count
        np.testing.assert_allclose(_advantage_per_record(minibatches, records), expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{count} mini-batches")
        assert all(mb.ref_logprobs is None for mb in minibatches)  # the KL left the loss


def test_planner_calls_without_token_ids_are_refused():
    from agentflow_jax.agent import modules
    from agentflow_jax.agent.rollout import PlannerCall, Trajectory, TurnLog
    from agentflow_jax.rl.trainer import turn_records
    from agentflow_jax.tools.base import ToolResult

    step = modules.PlannerStep("j", "c", "s", None, "x")
    call = PlannerCall(messages=(), text="t", step=step, prompt_ids=None, token_ids=None, logprobs=None,
                       finish_reason="stop")
    turn = TurnLog(planner=call, executor_text=None, command=None, result=ToolResult(False, "", "e"),
                   verifier_text="", stop=True)
    with pytest.raises(ValueError, match="without exact token ids"):
        turn_records([Trajectory(query_id=0, sample_id=0, memory=Memory("q"), turns=(turn,))], np.ones(1))


def test_config_errors_name_the_file_section_and_key(tiny_run, tmp_path):
    def error(change):
        config = make_config(tiny_run, tmp_path)
        change(config)
        with pytest.raises(ConfigError) as info:
            read_experiment(config, source="my_config.py")
        return str(info.value)

    def set_item(section, key, value):
        def change(config):
            config[section] = dict(config[section].to_dict(), **{key: value})
        return change

    assert error(set_item("rollout", "max_turns", "three")) == \
        "my_config.py: config.rollout.max_turns = 'three': expected int"
    assert error(set_item("optim", "learning_rate", True)) == \
        "my_config.py: config.optim.learning_rate = True: expected float"
    assert error(set_item("eval", "num_queries", 0)) == "my_config.py: config.eval.num_queries = 0: must be >= 1"
    assert error(set_item("data", "batch_size", -2)) == "my_config.py: config.data.batch_size = -2: must be >= 1"
    assert error(set_item("rl", "estimator", "ppo")).startswith(
        "my_config.py: config.rl.estimator = 'ppo': must be one of ['grpo'")
    assert "did you mean 'group_size'" in error(set_item("rl", "group_sise", 4))
    assert error(lambda c: c.rl.loss.update(aggregation="per-token-vibes")).startswith(
        "my_config.py: config.rl.loss.aggregation = 'per-token-vibes': must be one of")
    assert error(lambda c: c.rl.loss.update(temperature=0.5)) == \
        "my_config.py: config.rl.loss.temperature is set from config.rollout.planner_temperature; remove it"
    assert error(lambda c: c.__delattr__("train")).startswith("my_config.py: config lacks section 'train'")
    assert error(lambda c: c.data.__delattr__("train_path")) == "my_config.py: config.data lacks key 'train_path'"
    assert error(lambda c: c.__setattr__("wandb", {"project": "x"})).startswith(
        "my_config.py: config has unknown key 'wandb'")


def test_old_logprobs_are_the_policys_own_while_the_sampler_reports_the_penalised_distribution(tiny_run):
    """With a frequency penalty the sampler's log-probs are of the penalised distribution it drew from;
    the trainer's old log-probs (the ratio's denominator) are the unpenalised policy's at the rollout
    temperature. Both are checked against log-softmaxes computed here from the model's logits."""
    from agentflow_jax.engines import GenerationRequest

    trainer = make_trainer(make_config(tiny_run, "/unused"), num_minibatches=1)
    engine = trainer.planner_engine(seed=3)
    penalty, temperature = 1.5, trainer.config.loss.temperature
    requests = [GenerationRequest(messages=({"role": "user", "content": f"Plan step {i}."},), max_new_tokens=40,
                                  temperature=temperature, frequency_penalty=penalty) for i in range(8)]
    generations = engine.generate(requests)
    records = [TurnRecord(i, i, g.prompt_ids, g.token_ids, g.logprobs, float(i % 2)) for i, g in enumerate(generations)]
    minibatch = trainer.prepare_minibatches(records)[0]
    model = nnx.merge(trainer.graphdef, trainer.params)
    repeated = 0
    for row, g in enumerate(generations):
        ids = np.asarray(g.prompt_ids + g.token_ids)[None]
        logits = np.asarray(model(ids), np.float64)[0, len(g.prompt_ids) - 1:-1]  # the steps that chose g.token_ids
        counts = np.zeros(logits.shape[1])
        for step, token in enumerate(g.token_ids):
            policy = logits[step] / temperature
            penalised = (logits[step] - penalty * counts) / temperature
            log_softmax = lambda z: z - z.max() - np.log(np.exp(z - z.max()).sum())  # noqa: E731
            np.testing.assert_allclose(g.logprobs[step], log_softmax(penalised)[token], atol=2e-4)
            position = len(g.prompt_ids) - 1 + step
            np.testing.assert_allclose(minibatch.old_logprobs[row, position], log_softmax(policy)[token], atol=2e-4)
            repeated += counts[token] > 0
            counts[token] += 1
    assert repeated > 0  # some sampled token repeated, so the two distributions differ there
    gaps = np.abs(minibatch.old_logprobs - minibatch.batch.sampler_logprobs)[minibatch.batch.loss_mask > 0]
    assert gaps.max() > 0.1
