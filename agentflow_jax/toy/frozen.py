"""The toy world's frozen model, written out exactly: `IdealFrozenModel` answers every frozen role
(query analysis, executor, verifier, generator, and the LLMs inside the Python and generalist tools)
for *any* planner output, deterministically; `IdealFrozenEngine` serves it as an engine.

Why not a trained tiny model: those roles must copy names and numbers from ~150-token prompts into
their outputs, and a ~1M-parameter model trained for minutes on 2 CPU cores does not learn to copy
(measured: BUILD_NOTES.md, "Toy world"). An exact frozen model also makes the toy's rollouts cost
only the planner's decoding.

Training runs name it in their config as an engine spec, resolved through the engine registry
(the "toy" kind is an entry point of this package, so the training path never imports it):

    config.engines.frozen = "toy:ideal,runs/tiny_cpu/warm_start/world"   # toy:ideal,WORLD_DIR

After a wrong tool choice it behaves as the paper's frozen model would: the executor passes the full
query to the generalist, which answers with a plausible wrong number; the verifier is fooled (STOP
after any generalist answer), so a wrong tool choice costs the reward; the generator reports the
generalist's number. On the oracle path the verifier stops exactly when the memory holds what the
query needs, and the generator computes the answer from the memory's facts.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, Sequence

from agentflow_jax.agent import prompts
from agentflow_jax.engines import Generation, GenerationRequest, Message
from agentflow_jax.toy import world as toy_world
from agentflow_jax.toy.world import GENERALIST_TOOL, PYTHON_TOOL, SEARCH_TOOL, Question, World

ROLES = ("query_analysis", "planner", "executor", "verifier", "generator", "python_coder", "generalist")
"""Every model call of the toy agent: the five modules, then the LLMs inside the Python and generalist tools."""

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


_QUERY_LINE = re.compile(r"\AQuery: (.*)")
PLAN_STEP = re.compile(r"Plan step (\d+) of at most (\d+)\.")
_STEP_TOOL = re.compile(r"^Step (\d+): Tool: (.*)$", re.MULTILINE)
NUMBER = re.compile(r"\d+")
_COMPUTE = re.compile(r"Compute (\d+ [-+*] \d+)\.\Z")
_RESULT = re.compile(r"^result: (-?\d+)$", re.MULTILINE)
_FACT = {"founded": "\\b{} was founded in (\\d+)\\.", "population": "\\b{} has a population of (\\d+)\\."}

NO_ANSWER = "unknown"


def user_text(messages: Sequence[Message]) -> str:
    """The last message of a chat (the prompt a role answers)."""
    return messages[-1]["content"]


def query_of(messages: Sequence[Message]) -> str:
    """The query of an agent-module prompt (its first line, "Query: ...")."""
    match = _QUERY_LINE.match(user_text(messages))
    if match is None:
        raise ValueError(f"no 'Query:' line in {user_text(messages)[:80]!r}")
    return match.group(1)


def memory_steps(text: str) -> list[tuple[str, str]]:
    """[(tool name, result text)] of the memory rendered in a prompt (Step N: Tool: ... Result: ...)."""
    heads = list(_STEP_TOOL.finditer(text))
    steps = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        block = text[head.end():end]
        steps.append((head.group(2).strip(), block.partition("\nResult: ")[2]))
    return steps


def text_between(text: str, start: str, end: str) -> str:
    """The part of `text` after the first `start` and before the next `end`."""
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
        q = self.question(query_of(messages))
        if q is None:
            return "The query is not one this agent knows how to analyse."
        return toy_world.ANALYSES[(q.kind, q.subtype)]

    def _executor(self, messages: Sequence[Message]) -> str:
        user = user_text(messages)
        query = query_of(messages)
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
        steps = memory_steps(text_between(user_text(messages), "Steps so far:\n", "\n\nCheck whether"))
        stop, reasoning = self.verdict(query_of(messages), steps)
        return f"{reasoning}\nConclusion: {'STOP' if stop else 'CONTINUE'}"

    def answer(self, query: str, steps: Sequence[tuple[str, str]]) -> str:
        """The generator's answer for the memory `steps`."""
        if steps and steps[-1][0] == GENERALIST_TOOL:
            numbers = NUMBER.findall(steps[-1][1])
            return numbers[-1] if numbers else NO_ANSWER
        q = self.question(query)
        values = self.facts(q, steps) if q is not None else [None]
        if any(v is None for v in values):
            return NO_ANSWER
        return str(self.combine(q, values))

    def _generator(self, messages: Sequence[Message]) -> str:
        steps = memory_steps(text_between(user_text(messages), "Steps taken:\n", "\n\nUsing these results"))
        answer = self.answer(query_of(messages), steps)
        if answer == NO_ANSWER:
            reasoning = "The steps do not contain what the query needs."
        elif steps and steps[-1][0] == GENERALIST_TOOL:
            reasoning = f"Step {len(steps)} gives the answer."
        else:
            q = self.question(query_of(messages))
            reasoning = ("Combining the two facts found." if q.kind == "composition" else
                         f"Step {len(steps)} gives the answer.")
        return f"{reasoning}\n<answer>{answer}</answer>"

    # -- LLMs inside tools ----------------------------------------------------------------------------

    def _python_coder(self, messages: Sequence[Message]) -> str:
        task = user_text(messages).rpartition("Task: ")[2]
        match = _COMPUTE.fullmatch(task)
        if match is None:
            return '```python\nprint("The task gives no numbers to compute with.")\n```'
        return f'```python\nprint("result:", {match.group(1)})\n```'

    def _generalist(self, messages: Sequence[Message]) -> str:
        q = self.question(user_text(messages))
        return q.generalist_answer if q is not None else "The answer is 42."


class IdealFrozenEngine:
    """An `Engine` serving `IdealFrozenModel`: the toy world's frozen model for rollouts and tools.

    Thread-safe and stateless; replies carry no token ids (only planner calls are trained).
    """

    def __init__(self, questions: Iterable[Question]):
        self.model = IdealFrozenModel(questions)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [Generation(text=self.model.reply(r.messages)) for r in requests]


def engine_from_spec(args: str, options: Mapping[str, Any]) -> IdealFrozenEngine:
    """The engine registry's factory for "toy:ideal,WORLD_DIR" (the world written by the warm start)."""
    model, sep, directory = args.partition(",")
    if model.strip() != "ideal" or not sep or not directory.strip():
        raise ValueError(f"toy engine spec needs 'toy:ideal,WORLD_DIR', got 'toy:{args}'")
    if options:
        raise ValueError(f"the toy engine takes no options, got {sorted(options)}")
    world = World.load(directory.strip())
    return IdealFrozenEngine(tuple(world.train) + tuple(world.heldout))
