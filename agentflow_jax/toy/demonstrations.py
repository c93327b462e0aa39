"""Oracle demonstrations of the toy world, recorded from real rollouts.

`OraclePlanner` is the demonstrations' planner. At each step it writes the oracle step, or --
corrupted on purpose, with a probability that depends on the question's phrasing
(`Question.tempting`) and the step (`Corruption`) -- the generalist tool, in the same perfect
four-field format. Its sub-goals refer to the query ("the second city in the query") instead of
copying from it, so the planner's only real decision is the tool.

`record_demonstrations` runs the real batched rollout loop (`agent.rollout.rollout_batch`) with the
oracle planner, the ideal frozen model (`toy.frozen`) and the run's real toolbox (BM25 over the
world's corpus, the Python sandbox, the generalist tool) and records every model call as (role,
chat messages, reply): every demonstration prompt is byte for byte the prompt the agent builds at
rollout time, tool results included.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from typing import Any, Callable, Iterable, Sequence

from agentflow_jax.agent.modules import PlannerStep, render_planner_output
from agentflow_jax.agent.rollout import RolloutConfig, Trajectory, rollout_batch
from agentflow_jax.engines import Generation, GenerationRequest, Message, ScriptedEngine
from agentflow_jax.tools.base import Toolbox
from agentflow_jax.toy.frozen import (
    NUMBER,
    PLAN_STEP,
    ROLES,
    IdealFrozenModel,
    memory_steps,
    query_of,
    role_of,
    text_between,
    user_text,
)
from agentflow_jax.toy.world import GENERALIST_TOOL, PYTHON_TOOL, Question

# ----------------------------------------------------------------------------------------------
# Corruption of the planner
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corruption:
    """Probability that a planner demonstration picks the generalist instead of the oracle tool.

    `first_step` applies to step 1, `later_steps` to steps 2+ (composition questions), each as
    (plain phrasing, tempting phrasing). With the defaults about 45% of planner demonstrations
    are wrong, and the greedy warm-start planner is wrong on the tempting phrasings.
    """

    first_step: tuple[float, float] = (0.15, 0.8)
    later_steps: tuple[float, float] = (0.1, 0.5)
    seed: int = 0

    def wrong(self, question: Question, step: int, pass_index: int = 0) -> bool:
        plain, tempting = self.first_step if step == 1 else self.later_steps
        p = tempting if question.tempting else plain
        return random.Random(f"{self.seed}:{pass_index}:{question.id}:{step}").random() < p


NO_CORRUPTION = Corruption(first_step=(0.0, 0.0), later_steps=(0.0, 0.0))

GENERALIST_JUSTIFICATION = "A general model can answer the query directly."
GENERALIST_SUB_GOAL = "Answer the query directly."


def planner_output(justification: str, context: str, sub_goal: str, tool_name: str) -> str:
    """The planner's four fields, as `agent.modules.render_planner_output` writes them."""
    return render_planner_output(PlannerStep(justification, context, sub_goal, tool_name, tool_name))


class OraclePlanner:
    """The demonstrations' planner: the oracle step, or (corrupted) the generalist, at every step.

    Only answers planner prompts on the oracle path (earlier steps followed the oracle).
    """

    def __init__(self, questions: Iterable[Question], corruption: Corruption = Corruption(), pass_index: int = 0):
        self.questions = {q.text: q for q in questions}
        self.corruption = corruption
        self.pass_index = pass_index

    def choice(self, question: Question, step: int) -> str:
        """The tool the (corrupted) planner picks at `step` on the oracle path."""
        if self.corruption.wrong(question, step, self.pass_index):
            return GENERALIST_TOOL
        return question.plan[step - 1].tool_name

    def reply(self, messages: Sequence[Message]) -> str:
        if role_of(messages) != "planner":
            raise ValueError("OraclePlanner answers planner prompts only")
        q = self.questions[query_of(messages)]
        user = user_text(messages)
        step = int(PLAN_STEP.search(user).group(1))
        previous = [tool for tool, _ in memory_steps(text_between(user, "Previous steps:\n", "\n\nPlan step"))]
        if previous != [s.tool_name for s in q.plan[:step - 1]] or step > len(q.plan):
            raise ValueError(f"planner request off the oracle path for {q.id}: steps {previous}, step {step}")
        oracle = q.plan[step - 1]
        if self.choice(q, step) == GENERALIST_TOOL:
            return planner_output(GENERALIST_JUSTIFICATION, oracle.context, GENERALIST_SUB_GOAL, GENERALIST_TOOL)
        return planner_output(oracle.justification, oracle.context, oracle.sub_goal, oracle.tool_name)


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Demo:
    """One model call to imitate.

    Attributes:
      role: one of ROLES.
      messages: the exact chat the agent sent.
      target: the ideal reply (the model is trained on it followed by <|im_end|>).
      question_id: the question the call belongs to.
      step: the planner turn (1-based) of planner calls, else 0.
      oracle_tool: planner calls only: the right tool at this step ("" otherwise).
      chosen_tool: planner calls only: the tool the demonstration picks ("" otherwise).
    """

    role: str
    messages: tuple[Message, ...]
    target: str
    question_id: str
    step: int = 0
    oracle_tool: str = ""
    chosen_tool: str = ""

    @property
    def corrupted(self) -> bool:
        return self.role == "planner" and self.chosen_tool != self.oracle_tool

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "messages": [dict(m) for m in self.messages]},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "Demo":
        data = json.loads(line)
        data["messages"] = tuple(data["messages"])
        return cls(**data)


class _RecordingEngine:
    """Answers with `reply(messages)` and keeps every (messages, reply) it produced."""

    def __init__(self, reply: Callable[[Sequence[Message]], str]):
        self.calls: list[tuple[tuple[Message, ...], str]] = []
        self._lock = threading.Lock()
        self._engine = ScriptedEngine(lambda request: self._respond(reply, request))

    def _respond(self, reply: Callable[[Sequence[Message]], str], request: GenerationRequest) -> str:
        text = reply(request.messages)
        with self._lock:
            self.calls.append((tuple(request.messages), text))
        return text

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return self._engine.generate(requests)


@dataclasses.dataclass(frozen=True)
class Recording:
    """Demonstrations and the trajectories they came from."""

    demos: tuple[Demo, ...]
    trajectories: tuple[Trajectory, ...]
    questions: tuple[Question, ...]


def record_demonstrations(questions: Sequence[Question], *, toolbox_factory: Callable[[Any], Toolbox],
                          rollout: RolloutConfig, corruption: Corruption = Corruption(), pass_index: int = 0,
                          check_answers: bool = True) -> Recording:
    """Replays the oracle planner and the ideal frozen model on `questions` through
    `rollout_batch` with the real tools, and records every model call.

    Args:
      questions: distinct question texts.
      toolbox_factory: `engine -> Toolbox`, the run's toolbox around the given frozen engine (BM25
        over the world's corpus, the Python sandbox, the generalist).
      rollout: the RL rollouts' loop limits and prompt shape (max turns, memory budget, compact
        tool list): the demonstrations' prompts are the prompts RL will build.
      corruption: how often the planner picks the generalist.
      pass_index: varies the corruption draws between passes over the same questions.
      check_answers: assert that every oracle-path trajectory ends with the gold answer and every
        generalist-path one with the generalist's number (catches search-ranking failures).
    Returns:
      the demonstrations (sorted by question, role, step), and the trajectories.
    """
    if len({q.text for q in questions}) != len(questions):
        raise ValueError("record_demonstrations needs distinct question texts")
    oracle = OraclePlanner(questions, corruption, pass_index)
    ideal = IdealFrozenModel(questions)
    planner = _RecordingEngine(oracle.reply)
    frozen = _RecordingEngine(ideal.reply)
    trajectories = rollout_batch([q.text for q in questions], n=1, planner=planner, frozen=frozen,
                                 toolbox=toolbox_factory(frozen), config=rollout)
    by_text = {q.text: q for q in questions}
    if check_answers:
        for t in trajectories:
            q = by_text[t.memory.query]
            tools = [turn.tool_name for turn in t.memory.turns]
            expected = NUMBER.findall(q.generalist_answer)[-1] if GENERALIST_TOOL in tools else q.answer
            if t.answer != expected:
                raise AssertionError(f"oracle replay of {q.id} ({q.text!r}) ended with {t.answer!r}, expected "
                                     f"{expected!r}; tools {tools}; last result "
                                     f"{t.memory.turns[-1].result[:200]!r}")
    task_owner = {}  # Python-coder prompts carry only the task: attribute them to their trajectory's question
    for t in trajectories:
        for turn in t.turns:
            if turn.command is not None and turn.command.tool_name == PYTHON_TOOL:
                task_owner[turn.command.arguments["query"]] = by_text[t.memory.query].id
    demos = []
    for messages, reply in planner.calls + frozen.calls:
        role = role_of(messages)
        if role == "planner":
            q = by_text[query_of(messages)]
            step = int(PLAN_STEP.search(user_text(messages)).group(1))
            demos.append(Demo(role=role, messages=messages, target=reply, question_id=q.id, step=step,
                              oracle_tool=q.plan[step - 1].tool_name, chosen_tool=oracle.choice(q, step)))
            continue
        if role == "generalist":
            qid = by_text[user_text(messages)].id
        elif role == "python_coder":
            qid = task_owner[user_text(messages).rpartition("Task: ")[2]]
        else:
            qid = by_text[query_of(messages)].id
        demos.append(Demo(role=role, messages=messages, target=reply, question_id=qid))
    demos.sort(key=lambda d: (d.question_id, ROLES.index(d.role), d.step))
    return Recording(demos=tuple(demos), trajectories=tuple(trajectories), questions=tuple(questions))


def save_demos(path: str, demos: Iterable[Demo]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for demo in demos:
            f.write(demo.to_json() + "\n")
            count += 1
    return count


def load_demos(path: str) -> list[Demo]:
    with open(path, encoding="utf-8") as f:
        return [Demo.from_json(line) for line in f if line.strip()]


def corruption_rate(demos: Iterable[Demo]) -> float:
    """Share of planner demonstrations whose tool is not the oracle's."""
    planner = [d for d in demos if d.role == "planner"]
    return sum(d.corrupted for d in planner) / max(1, len(planner))


def summarize(demos: Sequence[Demo]) -> dict[str, Any]:
    """Counts per role, planner corruption overall and by step / phrasing."""
    counts = {role: sum(d.role == role for d in demos) for role in ROLES}
    planner = [d for d in demos if d.role == "planner"]
    by_step = {}
    for step in sorted({d.step for d in planner}):
        rows = [d for d in planner if d.step == step]
        by_step[step] = round(sum(d.corrupted for d in rows) / len(rows), 3)
    return {"counts": counts, "planner_corruption": round(corruption_rate(demos), 3),
            "planner_corruption_by_step": by_step}
