"""Oracle demonstrations of every model role of the toy world, recorded from real rollouts.

The oracle is a set of scripted engines that answer exactly what an ideal (but deliberately
fallible) model would. `record_demonstrations` runs the real batched rollout loop
(`agent.rollout.rollout_batch`) with those engines and the real toolbox (BM25 search over the
world's corpus, the Python sandbox, the generalist tool), and records every model call as a
(role, chat messages, reply) pair. So every demonstration prompt is byte for byte the prompt the
agent builds at rollout time, and every tool result in a later prompt is what the tool returned.

Roles (`ROLES`), i.e. every call the model serves:

  query_analysis  planner  executor  verifier  generator   (agent modules, agent/prompts.py)
  python_coder    (the LLM inside Python_Code_Generator_Tool)
  generalist      (the LLM inside Generalist_Solution_Generator_Tool)

The planner is corrupted on purpose: at each step it picks the generalist tool instead of the
oracle tool with a probability that depends on the question's phrasing (`Question.tempting`) and
on the step (`Corruption`). Its four-field format stays perfect. The other roles behave as an
ideal *frozen* model would, also after a wrong choice:

* the executor passes the full query to the generalist;
* the generalist answers with a plausible-looking wrong number (`Question.generalist_answer`);
* the verifier is fooled by it (STOP after any generalist answer) -- so a wrong tool choice costs
  the reward; on the oracle path it says STOP exactly when the memory answers the query
  (lookup: after the search; arithmetic: after the program; composition: after the program,
  CONTINUE after each search);
* the generator copies the number from the last step (passage [1] of a search, the program's
  "result:" line, or the generalist's sentence).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

from agentflow_jax.agent import prompts
from agentflow_jax.agent.engines import Generation, GenerationRequest, Message, ScriptedEngine
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams, Trajectory, rollout_batch
from agentflow_jax.data import toy_world
from agentflow_jax.data.toy_world import GENERALIST_TOOL, PYTHON_TOOL, SEARCH_TOOL, Question
from agentflow_jax.tools import build_toolbox
from agentflow_jax.tools.base import Toolbox

ROLES = ("query_analysis", "planner", "executor", "verifier", "generator", "python_coder", "generalist")
AGENT_ROLES = ROLES[:5]
TOOL_ROLES = ROLES[5:]
TOOL_SHORT_NAMES = ("search", "python", "generalist")

_SYSTEM_TO_ROLE = {
    prompts.QUERY_ANALYSIS_SYSTEM: "query_analysis",
    prompts.PLANNER_SYSTEM: "planner",
    prompts.EXECUTOR_SYSTEM: "executor",
    prompts.VERIFIER_SYSTEM: "verifier",
    prompts.GENERATOR_SYSTEM: "generator",
}
_PYTHON_PROMPT_START = "Write a Python 3 program for the task below."


def role_of(messages: Sequence[Message]) -> str:
    """Which role a chat request is for: by the system prompt, else the tool prompt's shape."""
    if messages and messages[0]["role"] == "system":
        role = _SYSTEM_TO_ROLE.get(messages[0]["content"])
        if role is None:
            raise ValueError(f"unknown system prompt {messages[0]['content'][:80]!r}")
        return role
    if len(messages) == 1 and messages[0]["content"].startswith(_PYTHON_PROMPT_START):
        return "python_coder"
    return "generalist"


# ----------------------------------------------------------------------------------------------
# Agent settings shared by demonstrations and rollouts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """How the toy agent is run; demonstrations and RL rollouts must use the same values, since
    they change the prompts (`max_turns` appears in the planner prompt, `memory_budget_chars` and
    `search_topk` shape the memory).

    `max_new_tokens` caps each role's generation (measured longest demonstration + margin).
    """

    max_turns: int = 3
    memory_budget_chars: int = 1500
    compact_tools: bool = True
    search_topk: int = 2
    call_timeout_s: float = 30.0
    python_wall_timeout_s: float = 10.0
    max_new_tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: {
        "query_analysis": 48, "planner": 96, "executor": 80, "verifier": 32, "generator": 32,
        "python_coder": 48, "generalist": 32})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AgentSettings":
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown agent config key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)

    def rollout_config(self, *, planner_temperature: float = 0.7, planner_top_p: float = 1.0,
                       max_time_s: float = 500.0) -> RolloutConfig:
        """The RolloutConfig of the toy agent: frozen modules greedy, the planner sampled."""
        m = self.max_new_tokens
        return RolloutConfig(
            max_turns=self.max_turns, max_time_s=max_time_s,
            planner=SamplingParams(max_new_tokens=m["planner"], temperature=planner_temperature, top_p=planner_top_p),
            analysis=SamplingParams(max_new_tokens=m["query_analysis"]),
            executor=SamplingParams(max_new_tokens=m["executor"]),
            verifier=SamplingParams(max_new_tokens=m["verifier"]),
            generator=SamplingParams(max_new_tokens=m["generator"]),
            memory_budget_chars=self.memory_budget_chars, compact_tools=self.compact_tools)

    def toolbox_config(self, corpus_path: str) -> dict[str, Any]:
        """The `build_toolbox` config of the toy toolbox."""
        m = self.max_new_tokens
        return {"call_timeout_s": self.call_timeout_s,
                "search": {"corpus_path": corpus_path, "topk": self.search_topk},
                "python": {"wall_timeout_s": self.python_wall_timeout_s, "max_new_tokens": m["python_coder"]},
                "generalist": {"max_new_tokens": m["generalist"]}}


def build_toy_toolbox(corpus_path: str, engine: Any, settings: AgentSettings = AgentSettings()) -> Toolbox:
    """Local_Search_Tool (BM25 over the world's corpus), Python_Code_Generator_Tool and
    Generalist_Solution_Generator_Tool; the two LLM tools call `engine` (the frozen model)."""
    return build_toolbox(TOOL_SHORT_NAMES, engine=engine, config=settings.toolbox_config(corpus_path))


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

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Corruption":
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown corruption config key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})


NO_CORRUPTION = Corruption(first_step=(0.0, 0.0), later_steps=(0.0, 0.0))

# ----------------------------------------------------------------------------------------------
# The oracle's replies
# ----------------------------------------------------------------------------------------------

_QUERY_LINE = re.compile(r"\AQuery: (.*)")
_PLAN_STEP = re.compile(r"Plan step (\d+) of at most (\d+)\.")
_STEP_TOOL = re.compile(r"^Step (\d+): Tool: (.*)$", re.MULTILINE)
_NUMBER = re.compile(r"\d+")
_COMPUTE = re.compile(r"Compute (.+)\.\Z")

GENERALIST_JUSTIFICATION = "A general model can answer the query directly."
GENERALIST_SUB_GOAL = "Answer the query directly."


def planner_output(justification: str, context: str, sub_goal: str, tool_name: str) -> str:
    """The planner's four fields, as `agent.modules.render_planner_output` writes them."""
    from agentflow_jax.agent.modules import PlannerStep, render_planner_output

    return render_planner_output(PlannerStep(justification, context, sub_goal, tool_name, tool_name))


def _user(messages: Sequence[Message]) -> str:
    return messages[-1]["content"]


def _query_of(messages: Sequence[Message]) -> str:
    match = _QUERY_LINE.match(_user(messages))
    if match is None:
        raise ValueError(f"no 'Query:' line in {_user(messages)[:80]!r}")
    return match.group(1)


def _steps(text: str) -> list[tuple[str, str]]:
    """[(tool name, result text)] of the memory rendered in a prompt (Step N: Tool: ... Result: ...)."""
    heads = list(_STEP_TOOL.finditer(text))
    steps = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        block = text[head.end():end]
        result = block.partition("\nResult: ")[2]
        steps.append((head.group(2).strip(), result))
    return steps


def _section(text: str, start: str, end: str) -> str:
    return text.partition(start)[2].partition(end)[0]


def answer_from_result(tool_name: str, result: str) -> str | None:
    """The number the generator copies from a step's result, or None when there is none."""
    if tool_name == SEARCH_TOOL:
        first = result.partition("\n\n")[0]
        text = first.partition("\n")[2]
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    if tool_name == PYTHON_TOOL:
        match = re.search(r"result: (-?\d+)", result)
        return match.group(1) if match else None
    numbers = _NUMBER.findall(result)
    return numbers[-1] if numbers else None


class Oracle:
    """Answers every role's requests for a set of questions (looked up by their text).

    Replies depend only on the request (and the question it names), so they are deterministic
    whatever the batch order. A request off the oracle's paths raises ValueError: demonstrations
    must never contain improvised replies.
    """

    def __init__(self, questions: Iterable[Question], corruption: Corruption = Corruption(), pass_index: int = 0):
        self.questions = {q.text: q for q in questions}
        self.corruption = corruption
        self.pass_index = pass_index

    def question(self, messages: Sequence[Message]) -> Question:
        query = _query_of(messages)
        if query not in self.questions:
            raise ValueError(f"the oracle knows no question {query!r}")
        return self.questions[query]

    def reply(self, messages: Sequence[Message]) -> str:
        return getattr(self, f"_{role_of(messages)}")(messages)

    def planner_choice(self, question: Question, step: int) -> str:
        """The tool the (corrupted) planner picks at `step` on the oracle path."""
        if self.corruption.wrong(question, step, self.pass_index):
            return GENERALIST_TOOL
        return question.plan[step - 1].tool_name

    # -- agent modules --------------------------------------------------------------------------

    def _query_analysis(self, messages: Sequence[Message]) -> str:
        q = self.question(messages)
        return toy_world.ANALYSES[(q.kind, q.subtype)]

    def _planner(self, messages: Sequence[Message]) -> str:
        q = self.question(messages)
        user = _user(messages)
        step = int(_PLAN_STEP.search(user).group(1))
        previous = [tool for tool, _ in _steps(_section(user, "Previous steps:\n", "\n\nPlan step"))]
        expected = [s.tool_name for s in q.plan[:step - 1]]
        if previous != expected or step > len(q.plan):
            raise ValueError(f"planner request off the oracle path for {q.id}: steps {previous}, step {step}")
        oracle = q.plan[step - 1]
        if self.planner_choice(q, step) == GENERALIST_TOOL:
            return planner_output(GENERALIST_JUSTIFICATION, oracle.context, GENERALIST_SUB_GOAL, GENERALIST_TOOL)
        return planner_output(oracle.justification, oracle.context, oracle.sub_goal, oracle.tool_name)

    def _executor(self, messages: Sequence[Message]) -> str:
        user = _user(messages)
        tool = re.search(r"^Tool: (\S+)$", user, re.MULTILINE).group(1)
        sub_goal = re.search(r"^Sub-goal: (.*)$", user, re.MULTILINE).group(1)
        if tool == GENERALIST_TOOL:
            query = _query_of(messages)
        elif tool == PYTHON_TOOL:
            query = sub_goal
        elif tool == SEARCH_TOOL:
            match = re.fullmatch(r"Find the (founding year|population) of (.+)\.", sub_goal)
            if match is None:
                raise ValueError(f"executor request off the oracle path: sub-goal {sub_goal!r}")
            query = f"{match.group(2)} {'founded' if match.group(1) == 'founding year' else 'population'}"
        else:
            raise ValueError(f"executor request for an unknown tool {tool!r}")
        return json.dumps({"tool_name": tool, "arguments": {"query": query}}, ensure_ascii=False)

    def _verifier(self, messages: Sequence[Message]) -> str:
        q = self.question(messages)
        steps = [tool for tool, _ in _steps(_section(_user(messages), "Steps so far:\n", "\n\nCheck whether"))]
        stop, reasoning = self.verdict(q, steps)
        return f"{reasoning}\nConclusion: {'STOP' if stop else 'CONTINUE'}"

    @staticmethod
    def verdict(q: Question, steps: Sequence[str]) -> tuple[bool, str]:
        """(stop, reasoning) after `steps` (tool names) on the oracle or generalist path."""
        if steps and steps[-1] == GENERALIST_TOOL:
            return True, "The generalist answered the query."
        expected = [s.tool_name for s in q.plan[:len(steps)]]
        if list(steps) != expected or not steps:
            raise ValueError(f"verifier request off the oracle path for {q.id}: steps {list(steps)}")
        if q.kind == "lookup":
            return True, "The search result answers the query."
        if q.kind == "arithmetic":
            return True, "The program printed the result."
        what = "founding year" if q.subtype == "years_after" else "population"
        plural = "years" if q.subtype == "years_after" else "populations"
        if len(steps) == 1:
            return False, f"The second {what} is still missing."
        if len(steps) == 2:
            return False, f"Both {plural} are known but not yet combined."
        return True, "The program computed the answer."

    def _generator(self, messages: Sequence[Message]) -> str:
        steps = _steps(_section(_user(messages), "Steps taken:\n", "\n\nUsing these results"))
        if not steps:
            raise ValueError("generator request without steps")
        tool, result = steps[-1]
        answer = answer_from_result(tool, result)
        if answer is None:
            raise ValueError(f"no answer in the last step's result {result[:120]!r}")
        return f"The answer comes from step {len(steps)}.\n<answer>{answer}</answer>"

    # -- LLMs inside tools ------------------------------------------------------------------------

    def _python_coder(self, messages: Sequence[Message]) -> str:
        task = _user(messages).rpartition("Task: ")[2]
        match = _COMPUTE.fullmatch(task)
        if match is None:
            raise ValueError(f"python task off the oracle path: {task!r}")
        return f'```python\nprint("result:", {match.group(1)})\n```'

    def _generalist(self, messages: Sequence[Message]) -> str:
        query = _user(messages)
        if query not in self.questions:
            raise ValueError(f"generalist request for an unknown question {query!r}")
        return self.questions[query].generalist_answer


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
    """A ScriptedEngine on the oracle that also keeps every (messages, reply) it produced."""

    def __init__(self, oracle: Oracle):
        self.oracle = oracle
        self.calls: list[tuple[tuple[Message, ...], str]] = []
        self._lock = threading.Lock()
        self._engine = ScriptedEngine(self._respond)

    def _respond(self, request: GenerationRequest) -> str:
        reply = self.oracle.reply(request.messages)
        with self._lock:
            self.calls.append((tuple(request.messages), reply))
        return reply

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return self._engine.generate(requests)


@dataclasses.dataclass(frozen=True)
class Recording:
    """Demonstrations and the trajectories they came from."""

    demos: tuple[Demo, ...]
    trajectories: tuple[Trajectory, ...]
    questions: tuple[Question, ...]


def _demo(oracle: Oracle, messages: tuple[Message, ...], reply: str) -> Demo:
    role = role_of(messages)
    if role == "generalist":
        qid = oracle.questions[_user(messages)].id
    elif role == "python_coder":
        qid = ""  # the python prompt names no question; filled in below
    else:
        qid = oracle.question(messages).id
    if role != "planner":
        return Demo(role=role, messages=messages, target=reply, question_id=qid)
    q = oracle.question(messages)
    step = int(_PLAN_STEP.search(_user(messages)).group(1))
    return Demo(role=role, messages=messages, target=reply, question_id=qid, step=step,
                oracle_tool=q.plan[step - 1].tool_name, chosen_tool=oracle.planner_choice(q, step))


def record_demonstrations(questions: Sequence[Question], corpus_path: str, *,
                          settings: AgentSettings = AgentSettings(), corruption: Corruption = Corruption(),
                          pass_index: int = 0, check_answers: bool = True) -> Recording:
    """Replays the oracle on `questions` through `rollout_batch` and records every model call.

    Args:
      questions: distinct question texts.
      corpus_path: the world's corpus.jsonl (the BM25 index is built beside it, or reused).
      settings: the agent settings the RL rollouts will use.
      corruption: how often the planner picks the generalist.
      pass_index: varies the corruption draws between passes over the same questions.
      check_answers: assert that every oracle-path trajectory ends with the gold answer and every
        generalist-path one with the generalist's number (catches search-ranking failures).
    Returns:
      the demonstrations in call order, and the trajectories.
    """
    if len({q.text for q in questions}) != len(questions):
        raise ValueError("record_demonstrations needs distinct question texts")
    oracle = Oracle(questions, corruption, pass_index)
    planner = _RecordingEngine(oracle)
    frozen = _RecordingEngine(oracle)
    toolbox = build_toy_toolbox(corpus_path, frozen, settings)
    trajectories = rollout_batch([q.text for q in questions], n=1, planner=planner, frozen=frozen,
                                 toolbox=toolbox, config=settings.rollout_config())
    by_text = {q.text: q for q in questions}
    if check_answers:
        for t in trajectories:
            q = by_text[t.memory.query]
            tools = [turn.tool_name for turn in t.memory.turns]
            expected = toy_world.normalize_answer(
                _NUMBER.findall(q.generalist_answer)[-1] if GENERALIST_TOOL in tools else q.answer)
            if t.answer != expected:
                raise AssertionError(f"oracle replay of {q.id} ({q.text!r}) ended with {t.answer!r}, expected "
                                     f"{expected!r}; tools {tools}; last result "
                                     f"{t.memory.turns[-1].result[:200]!r}")
    # Python-coder prompts carry only the task; attribute them to the question whose trajectory ran them.
    task_owner = {}
    for t in trajectories:
        for turn in t.turns:
            if turn.command is not None and turn.command.tool_name == PYTHON_TOOL:
                task_owner[turn.command.arguments["query"]] = by_text[t.memory.query].id
    demos = []
    for messages, reply in planner.calls + frozen.calls:
        demo = _demo(oracle, messages, reply)
        if demo.role == "python_coder":
            demo = dataclasses.replace(demo, question_id=task_owner[_user(messages).rpartition("Task: ")[2]])
        demos.append(demo)
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
