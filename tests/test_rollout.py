"""Batched rollouts with a scripted engine: every path of the loop, and batched == one at a time."""

import dataclasses
import json
import re
import time

import pytest

from agentflow_jax.agent import prompts
from agentflow_jax.engines import GenerationRequest, ScriptedEngine
from agentflow_jax.agent.rollout import RolloutConfig, rollout_batch
from agentflow_jax.tools.base import Tool, ToolArgument, Toolbox, ToolMetadata


class EchoTool(Tool):
    metadata = ToolMetadata(name="Echo_Tool", description="Upper-cases text.",
                            inputs=(ToolArgument("text", "str", "text to echo"),), output_type="str")

    def run(self, text):
        return text.upper()


class FailTool(Tool):
    metadata = ToolMetadata(name="Fail_Tool", description="Always fails.",
                            inputs=(ToolArgument("text", "str", "anything"),), output_type="str")

    def run(self, text):
        raise RuntimeError(f"boom on {text}")


class SlowTool(Tool):
    metadata = ToolMetadata(name="Slow_Tool", description="Sleeps.",
                            inputs=(ToolArgument("text", "str", "anything"),), output_type="str")

    def run(self, text):
        time.sleep(1.0)
        return "late"


def toolbox():
    return Toolbox([EchoTool(), FailTool(), SlowTool()], call_timeout_s=0.3)


def _user(request: GenerationRequest) -> str:
    return request.messages[-1]["content"]


def _scenario(request: GenerationRequest) -> str:
    return re.search(r"Query: (\w+)", _user(request)).group(1)


def planner_reply(request: GenerationRequest) -> str:
    scenario = _scenario(request)
    step = int(re.search(r"Plan step (\d+)", _user(request)).group(1))
    tool = {"exception": "fail tool", "timeout": "SLOW_TOOL"}.get(scenario, "echo_tool")
    if scenario == "json":
        return json.dumps({"justification": "j", "context": "c", "sub_goal": f"json step {step}",
                           "tool_name": "Echo Tool"})
    if scenario == "unknown":
        return "Justification: j\nContext: c\nSub-Goal: fly\nTool Name: Teleport_Tool"
    if scenario == "garbage":
        return "I think we should do something."
    return f"Justification: j\nContext: c\nSub-Goal: {scenario} step {step}\nTool Name: **{tool}**"


def frozen_reply(request: GenerationRequest) -> str:
    system = request.messages[0]["content"]
    scenario = _scenario(request)
    if system == prompts.QUERY_ANALYSIS_SYSTEM:
        return f"analysis of {scenario}"
    if system == prompts.EXECUTOR_SYSTEM:
        tool = re.search(r'"tool_name": "(\w+)"', _user(request)).group(1)
        sub_goal = re.search(r"Sub-goal: (.*)", _user(request)).group(1)
        args = {"txt": "x"} if scenario == "badargs" else {"text": sub_goal}
        return f"```json\n{json.dumps({'tool_name': tool, 'arguments': args})}\n```"
    if system == prompts.VERIFIER_SYSTEM:
        stop = scenario not in ("continue", "timelimit")
        return f"Looks {'done' if stop else 'incomplete'}.\nConclusion: {'STOP' if stop else 'CONTINUE'}"
    if system == prompts.GENERATOR_SYSTEM:
        steps = _user(request).count("Step ")
        return f"Done after {steps} steps.\n<answer>{scenario}-{steps}</answer>"
    raise AssertionError(f"unexpected system prompt {system!r}")


def engines():
    return ScriptedEngine(planner_reply), ScriptedEngine(frozen_reply)


def run(queries, n=1, config=RolloutConfig(), **kw):
    planner, frozen = engines()
    return rollout_batch(queries, n=n, planner=planner, frozen=frozen, toolbox=toolbox(), config=config, **kw)


def test_valid_step_runs_tool_and_stops_on_verifier():
    (traj,) = run(["valid"])
    assert traj.stop_reason == "verifier" and len(traj.turns) == 1
    turn = traj.turns[0]
    assert turn.planner.step.tool_name == "Echo_Tool" and turn.planner.step.sub_goal == "valid step 1"
    assert turn.command.arguments == {"text": "valid step 1"}
    assert turn.result.ok and turn.result.output == "VALID STEP 1"
    assert traj.memory.query_analysis == "analysis of valid"
    assert traj.memory.turns[0].verdict == "STOP"
    assert traj.answer == "valid-1"


def test_json_planner_step():
    (traj,) = run(["json"])
    assert traj.turns[0].planner.step.tool_name == "Echo_Tool"
    assert traj.turns[0].result.output == "JSON STEP 1"


def test_unknown_tool_is_recorded_and_turn_goes_on():
    (traj,) = run(["unknown"])
    turn = traj.turns[0]
    assert turn.executor_text is None and turn.command is None
    assert not turn.result.ok and "unknown tool 'Teleport_Tool'" in turn.result.error
    assert traj.memory.turns[0].tool_name == "Teleport_Tool"
    assert "Error: planner output unusable" in traj.memory.turns[0].result


def test_unparsable_planner_output():
    (traj,) = run(["garbage"])
    assert not traj.turns[0].result.ok and "unparsable planner output" in traj.turns[0].result.error
    assert traj.answer == "garbage-1"


def test_executor_arguments_failing_schema():
    (traj,) = run(["badargs"])
    result = traj.turns[0].result
    assert not result.ok and "unknown argument(s) ['txt']" in result.error


def test_continue_until_turn_limit():
    (traj,) = run(["continue"], config=RolloutConfig(max_turns=3))
    assert traj.stop_reason == "max_turns" and len(traj.turns) == 3
    assert [t.verdict for t in traj.memory.turns] == ["CONTINUE"] * 3
    assert [t.planner.step.sub_goal for t in traj.turns] == [f"continue step {i}" for i in (1, 2, 3)]
    assert traj.answer == "continue-3"


def test_time_limit_stops_loop_and_generator_still_runs():
    ticks = iter(range(0, 10_000, 100))  # each clock read advances 100 s: every engine call lasts 100 s
    (traj,) = run(["timelimit"], config=RolloutConfig(max_turns=10, max_time_s=250), clock=lambda: next(ticks))
    assert traj.stop_reason == "time_limit"
    # analysis 100 s, then per turn planner + executor + verifier 300 s: 400 s >= 250 after turn 1
    assert len(traj.turns) == 1
    assert traj.answer == "timelimit-1"
    assert traj.elapsed_s == pytest.approx(100 + 300 + 100 + traj.turns[0].result.elapsed_s)


class FakeClock:
    """Seconds that pass only when an engine answers: `cost` seconds per request."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedEngine:
    """A scripted engine whose batched call takes `cost` seconds per request on a FakeClock."""

    def __init__(self, reply, clock: FakeClock, cost: float):
        self.engine, self.clock, self.cost = ScriptedEngine(reply), clock, cost

    def generate(self, requests):
        self.clock.now += self.cost * len(requests)
        return self.engine.generate(requests)


class TimedToolbox(Toolbox):
    """The test toolbox, each call reporting `tool_s` seconds of its own."""

    tool_s = 1.5

    def execute_many(self, calls):
        return [dataclasses.replace(r, elapsed_s=self.tool_s) for r in super().execute_many(calls)]


def test_each_query_is_timed_on_its_own_not_by_its_batch():
    clock = FakeClock()
    planner, frozen = TimedEngine(planner_reply, clock, 10.0), TimedEngine(frozen_reply, clock, 10.0)
    tools = TimedToolbox([EchoTool()], call_timeout_s=5)
    config = RolloutConfig(max_turns=10, max_time_s=75.0)
    valid, slow = rollout_batch(["valid", "continue"], n=1, planner=planner, frozen=frozen, toolbox=tools,
                                config=config, clock=clock)
    # Every call costs 10 s per request and is shared equally by its requests: 10 s each. The analysis,
    # each module of turn 1 and the generator serve both queries; turns 2+ serve "continue" alone.
    per_turn = 10 + 10 + 1.5 + 10          # planner + executor + own tool call + verifier
    assert valid.stop_reason == "verifier" and len(valid.turns) == 1
    assert valid.elapsed_s == pytest.approx(10 + per_turn + 10)
    # "continue": 10 + 31.5 = 41.5 s after turn 1, 73 s after turn 2 (< 75), 104.5 s after turn 3: stop.
    assert slow.stop_reason == "time_limit" and len(slow.turns) == 3
    assert slow.elapsed_s == pytest.approx(10 + 3 * per_turn + 10)
    # The batch's own clock read 80 s after turn 1 (analysis 20 + three calls of 20): timing by the batch
    # would have stopped "continue" after turn 1. In all: 2 + 6 (turn 1) + 3 + 3 + 2 requests of 10 s.
    assert clock.now == pytest.approx(10 * (2 + 6 + 3 + 3 + 2))


def test_tool_exception_becomes_result():
    (traj,) = run(["exception"])
    result = traj.turns[0].result
    assert not result.ok and result.error == "RuntimeError: boom on exception step 1"


def test_tool_timeout_becomes_result():
    start = time.monotonic()
    (traj,) = run(["timeout"])
    assert time.monotonic() - start < 0.9
    assert not traj.turns[0].result.ok and "timed out after 0.3 s" in traj.turns[0].result.error


def test_batched_rollout_equals_one_at_a_time():
    scenarios = ["valid", "json", "unknown", "garbage", "badargs", "continue", "exception", "valid"]
    queries = [scenarios[i % len(scenarios)] + f" number {i}" for i in range(32)]
    planner, frozen = (BatchCounter(e) for e in engines())
    batched = rollout_batch(queries, n=4, planner=planner, frozen=frozen, toolbox=toolbox())
    assert len(batched) == 128
    assert [(t.query_id, t.sample_id) for t in batched] == [(q, s) for q in range(32) for s in range(4)]

    def comparable(traj, query_id):
        return dataclasses.replace(traj, query_id=query_id, elapsed_s=0.0,
                                   turns=tuple(dataclasses.replace(
                                       t, result=dataclasses.replace(t.result, elapsed_s=0.0)) for t in traj.turns))

    for q, query in enumerate(queries):
        alone = run([query], n=4)
        for s in range(4):
            assert comparable(batched[q * 4 + s], q) == comparable(alone[s], q)
    # One batched call per module per turn; finished trajectories drop out of later batches.
    active_per_turn = [sum(len(t.turns) > k for t in batched) for k in range(3)]
    assert planner.batch_sizes == active_per_turn == [128, 16, 16]
    assert len(frozen.batch_sizes) == 1 + 2 * 3 + 1  # analysis, (executor + verifier) x 3, generator
    assert frozen.batch_sizes[0] == 32  # analysis once per query, shared by its samples


class BatchCounter:
    """Wraps an engine and records the size of every batched call."""

    def __init__(self, engine):
        self.engine, self.batch_sizes = engine, []

    def generate(self, requests):
        self.batch_sizes.append(len(requests))
        return self.engine.generate(requests)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        run(["valid"], n=0)
    with pytest.raises(ValueError, match="max_turns"):
        RolloutConfig(max_turns=0)


def test_observer_sees_every_step_in_order_with_its_trajectory_and_turn():
    events = []
    trajectories = run(["continue", "valid"], n=2, config=RolloutConfig(max_turns=2), observer=events.append)
    # Query analyses first (one per query, reported for its first trajectory), then turn by turn.
    assert [(e.kind, e.trajectory, e.turn) for e in events[:2]] == [("analysis", 0, 0), ("analysis", 2, 0)]
    assert events[0].data == "analysis of continue"
    turn1 = [(e.kind, e.trajectory) for e in events if e.turn == 1]
    assert turn1 == [("planner", i) for i in range(4)] + [("result", i) for i in range(4)] + \
        [("verdict", i) for i in range(4)]
    # The "valid" trajectories stopped after turn 1: only the "continue" ones step again.
    assert {e.trajectory for e in events if e.turn == 2} == {0, 1}
    verdicts = {(e.trajectory, e.turn): e.data for e in events if e.kind == "verdict"}
    assert verdicts == {(0, 1): False, (1, 1): False, (2, 1): True, (3, 1): True, (0, 2): False, (1, 2): False}
    planner_event = next(e for e in events if e.kind == "planner" and e.trajectory == 2)
    assert planner_event.data.step.sub_goal == "valid step 1"
    command, result = next(e.data for e in events if e.kind == "result" and e.trajectory == 2)
    assert command.arguments == {"text": "valid step 1"} and result.output == "VALID STEP 1"
    answers = [e for e in events if e.kind == "answer"]
    assert [e.trajectory for e in answers] == [0, 1, 2, 3] and answers[-1].data is trajectories[3]


def test_each_frozen_module_can_have_its_own_engine():
    from agentflow_jax.agent.rollout import FrozenEngines

    by_role = {role: ScriptedEngine(frozen_reply) for role in ("analysis", "executor", "verifier", "generator")}
    planner, _ = engines()
    (traj,) = rollout_batch(["valid"], n=1, planner=planner, frozen=FrozenEngines(**by_role), toolbox=toolbox())
    assert traj.answer == "valid-1"
    systems = {role: {r.messages[0]["content"] for r in engine.requests} for role, engine in by_role.items()}
    assert systems == {"analysis": {prompts.QUERY_ANALYSIS_SYSTEM}, "executor": {prompts.EXECUTOR_SYSTEM},
                       "verifier": {prompts.VERIFIER_SYSTEM}, "generator": {prompts.GENERATOR_SYSTEM}}
