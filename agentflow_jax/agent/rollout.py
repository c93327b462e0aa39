"""Batched AgentFlow rollouts: many queries x n samples stepping together.

Per turn, all active trajectories make one batched planner call (policy engine), one batched
executor call and one batched verifier call (frozen engine); their tool calls run concurrently in
the toolbox's pool. Finished trajectories drop out. After the loop one batched generator call
writes every final answer.

    analysis (once per query, frozen, shared by its n samples: it is greedy and identical)
    for turn in 1..max_turns:                       (active trajectories only)
        planner  -> PlannerStep     (exact prompt ids / sampled ids / log-probs recorded)
        executor -> ToolCall        (only for steps naming a known tool)
        tools    -> ToolResult      (concurrent, time-limited, errors become results)
        verifier -> STOP | CONTINUE
        stop on STOP, at the turn limit, or past the per-query time limit
    generator -> <answer>

Time limit per query, not per batch: each trajectory is charged its own time, `Trajectory.elapsed_s`,
and stops after the turn in which that time reaches `max_time_s` (the generator still runs). A
batched engine call of d seconds serving k requests charges each of them d / k (the query analysis,
shared by a query's n samples, charges each of them its request's share); a tool call charges its
own trajectory the call's own duration (`ToolResult.elapsed_s`). So a query is not stopped early
because slower queries share its batch, and its seconds are comparable across batch sizes.

Everything a trajectory learns is threaded through immutable values (`Memory`, `TurnLog`,
`Trajectory`); each turn produces new ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

from agentflow_jax.agent import modules, prompts
from agentflow_jax.engines import Engine, Generation, GenerationRequest
from agentflow_jax.agent.memory import Memory
from agentflow_jax.tools.base import ToolCall, Toolbox, ToolResult


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one module samples: max_new_tokens, temperature (0 = greedy), top_p, top_k, frequency_penalty
    (see `GenerationRequest`)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0

    def request(self, messages: Sequence[Any], sample_id: int | None = None) -> GenerationRequest:
        return GenerationRequest(messages=tuple(messages), max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                 frequency_penalty=self.frequency_penalty, sample_id=sample_id)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Loop limits and sampling (SPEC.md: training 3 turns / 500 s; evaluation 10 turns / 300 s).

    The planner samples (the paper's rollouts: temperature 0.7, top-p 0.99); the frozen modules
    decode greedily.
    """

    max_turns: int = 3
    max_time_s: float = 500.0
    planner: SamplingParams = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.99)
    analysis: SamplingParams = SamplingParams(max_new_tokens=256)
    executor: SamplingParams = SamplingParams(max_new_tokens=256)
    verifier: SamplingParams = SamplingParams(max_new_tokens=256)
    generator: SamplingParams = SamplingParams(max_new_tokens=512)
    memory_budget_chars: int = prompts.DEFAULT_MEMORY_BUDGET_CHARS
    compact_tools: bool = False

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_time_s <= 0:
            raise ValueError(f"max_time_s must be positive, got {self.max_time_s}")


@dataclasses.dataclass(frozen=True)
class FrozenEngines:
    """The engine of each frozen module (one engine may serve several, or all: `FrozenEngines.shared`)."""

    analysis: Engine
    executor: Engine
    verifier: Engine
    generator: Engine

    @classmethod
    def shared(cls, engine: Engine) -> "FrozenEngines":
        return cls(analysis=engine, executor=engine, verifier=engine, generator=engine)


@dataclasses.dataclass(frozen=True)
class RolloutEvent:
    """Something that just happened in a rollout, for observers that show it live (e.g. `solve`).

    Attributes:
      kind: "analysis" (data: the analysis text), "planner" (data: the `PlannerCall`), "result" (data:
        (the `ToolCall` or None, the `ToolResult`)), "verdict" (data: True for STOP), "answer" (data:
        the `Trajectory`, finished).
      trajectory: index of the trajectory in the returned list (for "analysis": of the query's first).
      turn: 1-based turn (0 for "analysis" and "answer").
    """

    kind: str
    trajectory: int
    turn: int
    data: Any


Observer = Callable[[RolloutEvent], None]


@dataclasses.dataclass(frozen=True)
class PlannerCall:
    """One planner call exactly as sampled: what training consumes (never re-tokenised)."""

    messages: tuple[Any, ...]
    text: str
    step: modules.PlannerStep
    prompt_ids: tuple[int, ...] | None
    token_ids: tuple[int, ...] | None
    logprobs: tuple[float, ...] | None
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class TurnLog:
    """Everything that happened in one turn of one trajectory."""

    planner: PlannerCall
    executor_text: str | None  # None when the planner named no usable tool
    command: ToolCall | None
    result: ToolResult
    verifier_text: str
    stop: bool


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One rollout of one query.

    Attributes:
      query_id: index of the query in the batch.
      sample_id: 0..n-1 within the query's group.
      memory: the final memory (query, analysis, turns with verdicts).
      turns: per-turn logs, oldest first.
      stop_reason: "verifier" (STOP), "max_turns" or "time_limit"; "" while running.
      generator_text, answer: the final output and its extracted <answer> (None if absent).
      elapsed_s: the seconds charged to this trajectory (module docstring: its shares of batched
        engine calls plus its own tool calls).
    """

    query_id: int
    sample_id: int
    memory: Memory
    turns: tuple[TurnLog, ...] = ()
    stop_reason: str = ""
    generator_text: str = ""
    answer: str | None = None
    elapsed_s: float = 0.0

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def to_json(self) -> str:
        """The whole trajectory as JSON (for --json output and sampled-trajectory logs)."""
        return json.dumps(_jsonable(dataclasses.asdict(self)), ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "items"):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------


def _texts(engine: Engine, requests: list[GenerationRequest], clock: Callable[[], float]) -> tuple[
        list[Generation], float]:
    """The engine's generations for `requests` (one batched call) and each request's share of its seconds."""
    if not requests:
        return [], 0.0
    start = clock()
    generations = engine.generate(requests)
    if len(generations) != len(requests):
        raise RuntimeError(f"engine returned {len(generations)} generations for {len(requests)} requests")
    return generations, (clock() - start) / len(requests)


def rollout_batch(queries: Sequence[str], *, n: int, planner: Engine, frozen: Engine | FrozenEngines,
                  toolbox: Toolbox, config: RolloutConfig = RolloutConfig(), observer: Observer | None = None,
                  first_sample_id: int = 0, clock: Callable[[], float] = time.monotonic) -> list[Trajectory]:
    """Runs `n` trajectories for every query, all stepping together.

    Args:
      queries: the questions.
      n: samples per query (the GRPO group size).
      planner: engine of the trainable planner (the in-process policy sampler during training).
      frozen: engine of query analysis, executor, verifier and generator, or one engine per module.
      toolbox: the tools; their failures become turn results.
      config: limits and sampling parameters.
      observer: called with each `RolloutEvent` as it happens (from this thread).
      first_sample_id: the requests of trajectory i (planner, executor, verifier, generator) carry
        sample id first_sample_id + i, from which an in-process engine draws its randomness
        (`GenerationRequest.sample_id`): a process that rolls out its share of a global batch passes
        the index of its first trajectory there, so each trajectory samples the same tokens however
        the batch is split.
      clock: seconds, monotonic, timing the engine calls (injectable for tests; tool calls time themselves).
    Returns:
      len(queries) * n trajectories, grouped by query (query 0's n samples first).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    engines = frozen if isinstance(frozen, FrozenEngines) else FrozenEngines.shared(frozen)
    notify = observer or (lambda event: None)
    analyses, analysis_s = _texts(engines.analysis, [config.analysis.request(
        prompts.build_query_analysis_prompt(q, toolbox, compact_tools=config.compact_tools)) for q in queries], clock)
    for qi, analysis in enumerate(analyses):
        notify(RolloutEvent("analysis", qi * n, 0, analysis.text))
    trajectories = [
        Trajectory(query_id=qi, sample_id=s,
                   memory=Memory(query=q).with_analysis(modules.parse_query_analysis(analyses[qi].text)),
                   elapsed_s=analysis_s)
        for qi, q in enumerate(queries) for s in range(n)
    ]
    for turn in range(1, config.max_turns + 1):
        active = [i for i, t in enumerate(trajectories) if not t.done]
        if not active:
            break
        stepped = _run_turn([trajectories[i] for i in active], turn, planner=planner, engines=engines,
                            toolbox=toolbox, config=config, sample_ids=[first_sample_id + i for i in active],
                            clock=clock, notify=lambda kind, j, data: notify(RolloutEvent(kind, active[j], turn, data)))
        for i, traj in zip(active, stepped):
            if not traj.done and traj.elapsed_s >= config.max_time_s:
                traj = dataclasses.replace(traj, stop_reason="time_limit")
            elif not traj.done and turn == config.max_turns:
                traj = dataclasses.replace(traj, stop_reason="max_turns")
            trajectories[i] = traj
    finals, generator_s = _texts(engines.generator, [config.generator.request(
        prompts.build_generator_prompt(t.memory, memory_budget_chars=config.memory_budget_chars), first_sample_id + i)
        for i, t in enumerate(trajectories)], clock)
    finished = [dataclasses.replace(t, generator_text=g.text, answer=modules.parse_generator_output(g.text).answer,
                                    elapsed_s=t.elapsed_s + generator_s) for t, g in zip(trajectories, finals)]
    for i, trajectory in enumerate(finished):
        notify(RolloutEvent("answer", i, 0, trajectory))
    return finished


def _run_turn(trajectories: list[Trajectory], turn: int, *, planner: Engine, engines: FrozenEngines,
              toolbox: Toolbox, config: RolloutConfig, sample_ids: Sequence[int], clock: Callable[[], float],
              notify: Callable[[str, int, Any], None]) -> list[Trajectory]:
    """One turn for every given (active) trajectory: plan, execute, run tools, verify, each trajectory
    charged its share of the turn's engine calls and its own tool call; `notify(kind, j, data)`
    reports each step of trajectory j as it completes."""
    planner_messages = [prompts.build_planner_prompt(
        t.memory, toolbox, step=turn, max_steps=config.max_turns, memory_budget_chars=config.memory_budget_chars,
        compact_tools=config.compact_tools) for t in trajectories]
    planned, planner_s = _texts(planner, [config.planner.request(m, sample_id)
                                          for m, sample_id in zip(planner_messages, sample_ids)], clock)
    seconds = [planner_s] * len(trajectories)
    calls = [PlannerCall(messages=m, text=g.text, step=modules.parse_planner_output(g.text, toolbox),
                         prompt_ids=g.prompt_ids, token_ids=g.token_ids, logprobs=g.logprobs,
                         finish_reason=g.finish_reason) for m, g in zip(planner_messages, planned)]
    for j, call in enumerate(calls):
        notify("planner", j, call)

    # Executor: only for steps that name a known tool.
    runnable = [i for i, c in enumerate(calls) if c.step.tool_name is not None]
    executor_texts: list[str | None] = [None] * len(calls)
    commands: list[ToolCall | None] = [None] * len(calls)
    results: list[ToolResult | None] = [None] * len(calls)
    exec_out, executor_s = _texts(engines.executor, [config.executor.request(prompts.build_executor_prompt(
        trajectories[i].memory.query, calls[i].step.sub_goal, toolbox.find(calls[i].step.tool_name).metadata,
        calls[i].step.context), sample_ids[i]) for i in runnable], clock)
    for i, g in zip(runnable, exec_out):
        seconds[i] += executor_s
        executor_texts[i] = g.text
        parsed = modules.parse_executor_output(g.text, expected_tool=calls[i].step.tool_name)
        if parsed.tool_call is None:
            results[i] = ToolResult(False, "", f"executor output unusable: {parsed.error}")
        commands[i] = parsed.tool_call
    for i, c in enumerate(calls):
        if c.step.tool_name is None:
            problem = c.step.parse_error or f"unknown tool {c.step.raw_tool_name!r}; available: {list(toolbox.names)}"
            results[i] = ToolResult(False, "", f"planner output unusable: {problem}")

    # Tools: all valid calls of the batch run concurrently.
    to_run = [i for i in range(len(calls)) if results[i] is None]
    for i, r in zip(to_run, toolbox.execute_many([commands[i] for i in to_run])):
        results[i] = r
        seconds[i] += r.elapsed_s
    for j, (command, result) in enumerate(zip(commands, results)):
        notify("result", j, (command, result))

    memories = [t.memory.add_turn(tool_name=c.step.tool_name or c.step.raw_tool_name, sub_goal=c.step.sub_goal,
                                  command=cmd if cmd is not None else "", result=r.as_text(), ok=r.ok)
                for t, c, cmd, r in zip(trajectories, calls, commands, results)]
    verdicts, verifier_s = _texts(engines.verifier, [config.verifier.request(prompts.build_verifier_prompt(
        m, toolbox, memory_budget_chars=config.memory_budget_chars, compact_tools=config.compact_tools), sample_id)
        for m, sample_id in zip(memories, sample_ids)], clock)
    out = []
    for t, m, c, et, cmd, r, v, spent in zip(trajectories, memories, calls, executor_texts, commands, results,
                                             verdicts, seconds):
        stop = modules.parse_verifier_output(v.text).stop
        notify("verdict", len(out), stop)
        log = TurnLog(planner=c, executor_text=et, command=cmd, result=r, verifier_text=v.text, stop=stop)
        out.append(dataclasses.replace(t, memory=m.with_verdict(stop), turns=t.turns + (log,),
                                       stop_reason="verifier" if stop else "",
                                       elapsed_s=t.elapsed_s + spent + verifier_s))
    return out
