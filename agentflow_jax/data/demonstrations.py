"""The toy world's frozen model (written out exactly) and oracle demonstrations recorded from real rollouts.

Two scripted actors:

* `IdealFrozenModel` / `IdealFrozenEngine`: the frozen model of the CPU toy world. It serves
  query analysis, executor, verifier, generator and the LLMs inside the Python and generalist
  tools, for *any* planner output, exactly and deterministically (see its docstring). Why not a
  trained tiny model: those roles must copy names and numbers from ~150-token prompts into their
  outputs, and a ~1M-parameter model trained for minutes on 2 CPU cores does not learn to copy
  (measured: BUILD_NOTES.md, "Toy world"). An exact frozen model also makes the toy's rollouts
  cost only the planner's decoding. A trained model can still be used for these roles
  (`sft.roles`), but it is not reliable.
* `OraclePlanner`: the demonstrations' planner. At each step it writes the oracle step, or --
  corrupted on purpose, with a probability that depends on the question's phrasing
  (`Question.tempting`) and the step (`Corruption`) -- the generalist tool, in the same perfect
  four-field format. Its sub-goals refer to the query ("the second city in the query") instead of
  copying from it, so the planner's only real decision is the tool.

`record_demonstrations` runs the real batched rollout loop (`agent.rollout.rollout_batch`) with
these two and the real toolbox (BM25 over the world's corpus, the Python sandbox, the generalist
tool) and records every model call as (role, chat messages, reply): every demonstration prompt is
byte for byte the prompt the agent builds at rollout time, tool results included.

Roles (`ROLES`): query_analysis, planner, executor, verifier, generator (agent/prompts.py),
python_coder (the LLM inside Python_Code_Generator_Tool), generalist (the LLM inside
Generalist_Solution_Generator_Tool).

After a wrong choice the frozen roles behave sensibly: the executor passes the full query to the
generalist, which answers with a plausible wrong number; the verifier is fooled (STOP after any
generalist answer), so a wrong tool choice costs the reward; the generator reports the
generalist's number. On the oracle path the verifier stops exactly when the memory holds what the
query needs, and the generator computes the answer from the memory's facts.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

from agentflow_jax.agent import prompts
from agentflow_jax.engines import Generation, GenerationRequest, Message, ScriptedEngine
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams, Trajectory, rollout_batch
from agentflow_jax.config_sections import dataclass_from_section
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
    `frozen` names the frozen model: "ideal" (`IdealFrozenEngine`, exact) or "model" (the
    warm-started model serves the frozen roles too).
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
    frozen: str = "ideal"

    def __post_init__(self):
        if self.frozen not in ("ideal", "model"):
            raise ValueError(f"agent.frozen must be 'ideal' or 'model', got {self.frozen!r}")
        missing = sorted(set(ROLES) - set(self.max_new_tokens))
        if missing:
            raise ValueError(f"agent.max_new_tokens lacks role(s) {missing}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AgentSettings":
        return dataclass_from_section(cls, values, "agent")

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


def frozen_engine(settings: AgentSettings, world: Any, model_engine: Any) -> Any:
    """The engine of the frozen roles and the tools' LLM: `IdealFrozenEngine` over all the world's
    questions when settings.frozen == "ideal", else `model_engine` (the warm-started model)."""
    if settings.frozen == "ideal":
        return IdealFrozenEngine(tuple(world.train) + tuple(world.heldout))
    return model_engine


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
        return dataclass_from_section(cls, values, "corruption")


NO_CORRUPTION = Corruption(first_step=(0.0, 0.0), later_steps=(0.0, 0.0))

# ----------------------------------------------------------------------------------------------
# The oracle's replies
# ----------------------------------------------------------------------------------------------

_QUERY_LINE = re.compile(r"\AQuery: (.*)")
_PLAN_STEP = re.compile(r"Plan step (\d+) of at most (\d+)\.")
_STEP_TOOL = re.compile(r"^Step (\d+): Tool: (.*)$", re.MULTILINE)
_NUMBER = re.compile(r"\d+")
_COMPUTE = re.compile(r"Compute (\d+ [-+*] \d+)\.\Z")
_RESULT = re.compile(r"^result: (-?\d+)$", re.MULTILINE)
_FACT = {"founded": "\\b{} was founded in (\\d+)\\.", "population": "\\b{} has a population of (\\d+)\\."}

GENERALIST_JUSTIFICATION = "A general model can answer the query directly."
GENERALIST_SUB_GOAL = "Answer the query directly."
NO_ANSWER = "unknown"


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
        steps.append((head.group(2).strip(), block.partition("\nResult: ")[2]))
    return steps


def _section(text: str, start: str, end: str) -> str:
    return text.partition(start)[2].partition(end)[0]


def _attribute(q: Question) -> str:
    return "population" if q.subtype in ("population", "combined_population") else "founded"


class IdealFrozenModel:
    """The frozen model of the toy world, written out: exact replies for every frozen role.

    It plays what the paper's frozen Qwen2.5-7B does, perfectly and deterministically, for any
    planner output (not only the oracle's): it understands the query (it looks the question up in
    the world by its text, never the answer), resolves the planner's references ("the second city
    in the query"), reads facts only from the memory in its prompt, and is fooled by the generalist.

      query_analysis  the analysis of the question's kind
      executor        search: "<city> founded|population" for the city and fact the sub-goal names
                      (second city if it says "second", else the first; the fact named in the
                      sub-goal, else the query's); python: the query's expression ("Compute a op b.")
                      when the query has one, else the sub-goal; generalist: the full query
      python_coder    prints "result: <value>" for "Compute a op b.", else a program printing nothing useful
      generalist      the question's plausible wrong answer; a fixed wrong sentence for other texts
      verifier        STOP after a generalist answer (fooled) or when the memory holds what the
                      query needs (lookup: the fact; arithmetic: a program's result; composition:
                      both facts); CONTINUE otherwise
      generator       the generalist's number after a generalist answer; else the answer computed
                      from the memory's facts; "unknown" when they are missing

    `reply(messages)` raises ValueError only for prompts that are not the toy agent's.
    """

    def __init__(self, questions: Iterable[Question]):
        self.questions = {q.text: q for q in questions}

    def question(self, query: str) -> Question | None:
        return self.questions.get(query)

    def reply(self, messages: Sequence[Message]) -> str:
        return getattr(self, f"_{role_of(messages)}")(messages)

    # -- agent modules ------------------------------------------------------------------------------

    def _query_analysis(self, messages: Sequence[Message]) -> str:
        q = self.question(_query_of(messages))
        if q is None:
            return "The query is not one this agent knows how to analyse."
        return toy_world.ANALYSES[(q.kind, q.subtype)]

    def _executor(self, messages: Sequence[Message]) -> str:
        user = _user(messages)
        query = _query_of(messages)
        tool = re.search(r"^Tool: (\S+)$", user, re.MULTILINE).group(1)
        sub_goal = re.search(r"^Sub-goal: (.*)$", user, re.MULTILINE).group(1)
        q = self.question(query)
        if tool == GENERALIST_TOOL:
            argument = query
        elif tool == PYTHON_TOOL:
            argument = f"Compute {q.expression}." if q is not None and q.kind == "arithmetic" else sub_goal
        elif tool == SEARCH_TOOL and q is not None and q.entities:
            lowered = sub_goal.lower()
            attribute = ("population" if "population" in lowered else
                         "founded" if "found" in lowered else _attribute(q))
            city = q.entities[1] if "second" in lowered and len(q.entities) > 1 else q.entities[0]
            argument = f"{city} {toy_world.KEYWORD[attribute]}"
        else:
            argument = sub_goal
        return json.dumps({"tool_name": tool, "arguments": {"query": argument}}, ensure_ascii=False)

    @staticmethod
    def facts(q: Question, steps: Sequence[tuple[str, str]]) -> list[int | None]:
        """The values the query needs, as found in the memory's results (None where missing).

        lookup / composition: the fact of each city; arithmetic: the last program result.
        """
        if q.kind == "arithmetic":
            results = [m.group(1) for tool, result in steps if tool == PYTHON_TOOL
                       for m in [_RESULT.search(result)] if m]
            return [int(results[-1]) if results else None]
        pattern = _FACT[_attribute(q)]
        values = []
        for city in q.entities:
            found = [re.search(pattern.format(re.escape(city)), result) for tool, result in steps
                     if tool == SEARCH_TOOL]
            found = [m for m in found if m]
            values.append(int(found[-1].group(1)) if found else None)
        return values

    @staticmethod
    def combine(q: Question, values: Sequence[int]) -> int:
        if q.kind == "composition":
            return values[1] - values[0] if q.subtype == "years_after" else values[0] + values[1]
        return values[0]

    def verdict(self, query: str, steps: Sequence[tuple[str, str]]) -> tuple[bool, str]:
        """(stop, reasoning) for the memory `steps` [(tool, result)]."""
        if steps and steps[-1][0] == GENERALIST_TOOL:
            return True, "The generalist answered the query."
        q = self.question(query)
        if q is None:
            return True, "The query cannot be answered with these tools."
        values = self.facts(q, steps)
        missing = sum(v is None for v in values)
        if not missing:
            return True, ("The program printed the result." if q.kind == "arithmetic" else
                          "The search results answer the query." if q.kind == "lookup" else
                          "Both facts are known; the answer follows from them.")
        if q.kind == "arithmetic":
            return False, "The exact result has not been computed yet."
        what = toy_world.WHAT[_attribute(q)]
        if q.kind == "lookup":
            return False, f"The {what} has not been found yet."
        return False, (f"The {what} of the second city is still missing." if values[0] is not None else
                       f"The {what} of the first city is still missing." if values[1] is not None else
                       f"Neither {what} has been found yet.")

    def _verifier(self, messages: Sequence[Message]) -> str:
        steps = _steps(_section(_user(messages), "Steps so far:\n", "\n\nCheck whether"))
        stop, reasoning = self.verdict(_query_of(messages), steps)
        return f"{reasoning}\nConclusion: {'STOP' if stop else 'CONTINUE'}"

    def answer(self, query: str, steps: Sequence[tuple[str, str]]) -> str:
        """The generator's answer for the memory `steps`."""
        if steps and steps[-1][0] == GENERALIST_TOOL:
            numbers = _NUMBER.findall(steps[-1][1])
            return numbers[-1] if numbers else NO_ANSWER
        q = self.question(query)
        values = self.facts(q, steps) if q is not None else [None]
        if any(v is None for v in values):
            return NO_ANSWER
        return str(self.combine(q, values))

    def _generator(self, messages: Sequence[Message]) -> str:
        steps = _steps(_section(_user(messages), "Steps taken:\n", "\n\nUsing these results"))
        answer = self.answer(_query_of(messages), steps)
        if answer == NO_ANSWER:
            reasoning = "The steps do not contain what the query needs."
        elif steps and steps[-1][0] == GENERALIST_TOOL:
            reasoning = f"Step {len(steps)} gives the answer."
        else:
            q = self.question(_query_of(messages))
            reasoning = ("Combining the two facts found." if q.kind == "composition" else
                         f"Step {len(steps)} gives the answer.")
        return f"{reasoning}\n<answer>{answer}</answer>"

    # -- LLMs inside tools ----------------------------------------------------------------------------

    def _python_coder(self, messages: Sequence[Message]) -> str:
        task = _user(messages).rpartition("Task: ")[2]
        match = _COMPUTE.fullmatch(task)
        if match is None:
            return '```python\nprint("The task gives no numbers to compute with.")\n```'
        return f'```python\nprint("result:", {match.group(1)})\n```'

    def _generalist(self, messages: Sequence[Message]) -> str:
        q = self.question(_user(messages))
        return q.generalist_answer if q is not None else "The answer is 42."


class IdealFrozenEngine:
    """An `Engine` serving `IdealFrozenModel`: the toy world's frozen model for rollouts and tools.

    Thread-safe and stateless; replies carry no token ids (only planner calls are trained).
    """

    def __init__(self, questions: Iterable[Question]):
        self.model = IdealFrozenModel(questions)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [Generation(text=self.model.reply(r.messages)) for r in requests]


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
        q = self.questions[_query_of(messages)]
        user = _user(messages)
        step = int(_PLAN_STEP.search(user).group(1))
        previous = [tool for tool, _ in _steps(_section(user, "Previous steps:\n", "\n\nPlan step"))]
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


def record_demonstrations(questions: Sequence[Question], corpus_path: str, *,
                          settings: AgentSettings = AgentSettings(), corruption: Corruption = Corruption(),
                          pass_index: int = 0, check_answers: bool = True) -> Recording:
    """Replays the oracle planner and the ideal frozen model on `questions` through
    `rollout_batch` with the real tools, and records every model call.

    Args:
      questions: distinct question texts.
      corpus_path: the world's corpus.jsonl (the BM25 index is built beside it, or reused).
      settings: the agent settings the RL rollouts will use.
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
    toolbox = build_toy_toolbox(corpus_path, frozen, settings)
    trajectories = rollout_batch([q.text for q in questions], n=1, planner=planner, frozen=frozen,
                                 toolbox=toolbox, config=settings.rollout_config())
    by_text = {q.text: q for q in questions}
    if check_answers:
        for t in trajectories:
            q = by_text[t.memory.query]
            tools = [turn.tool_name for turn in t.memory.turns]
            expected = _NUMBER.findall(q.generalist_answer)[-1] if GENERALIST_TOOL in tools else q.answer
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
            q = by_text[_query_of(messages)]
            step = int(_PLAN_STEP.search(_user(messages)).group(1))
            demos.append(Demo(role=role, messages=messages, target=reply, question_id=q.id, step=step,
                              oracle_tool=q.plan[step - 1].tool_name, chosen_tool=oracle.choice(q, step)))
            continue
        if role == "generalist":
            qid = by_text[_user(messages)].id
        elif role == "python_coder":
            qid = task_owner[_user(messages).rpartition("Task: ")[2]]
        else:
            qid = by_text[_query_of(messages)].id
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
