"""Parsers and ideal-output renderers of the agent's five model calls.

Each call is a pair of pure functions: a prompt builder in `agent.prompts` and a parser here that
turns the model's text into a decision. Parsers never raise on model output; malformed text gives a
well-defined fallback decision that records the problem:

  call            builder (agent.prompts)          parser                   decision
  query analysis  build_query_analysis_prompt      parse_query_analysis     str
  planner         build_planner_prompt             parse_planner_output     PlannerStep
  executor        build_executor_prompt            parse_executor_output    ExecutorCommand
  verifier        build_verifier_prompt            parse_verifier_output    VerifierDecision
  generator       build_generator_prompt           parse_generator_output   GeneratorOutput

The `render_*_output` functions write the ideal model output for a decision (used to render SFT
demonstrations); parsing a rendered output gives the decision back.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from typing import Any, Mapping

from agentflow_jax.agent.memory import format_command
from agentflow_jax.agent.prompts import Tools, tool_metadata
from agentflow_jax.tools.base import ToolCall, normalize_tool_name


# ----------------------------------------------------------------------------- decisions

@dataclasses.dataclass(frozen=True)
class PlannerStep:
    """The planner's next step.

    Attributes:
      justification: why this tool now.
      context: facts the tool needs.
      sub_goal: the task for the tool.
      tool_name: the canonical name of the chosen tool, or None if it is unknown or unparsable.
      raw_tool_name: the tool name exactly as written (stripped), "" if none was found.
      parse_error: None when the output had the expected format, else what was wrong.
    """

    justification: str
    context: str
    sub_goal: str
    tool_name: str | None
    raw_tool_name: str
    parse_error: str | None = None


@dataclasses.dataclass(frozen=True)
class ExecutorCommand:
    """The executor's call, or why none could be read (`tool_call` is None exactly when `error` is set)."""

    tool_call: ToolCall | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class VerifierDecision:
    """Whether to stop; `parse_error` is set (and `stop` False) when no conclusion was found."""

    stop: bool
    reasoning: str
    parse_error: str | None = None


@dataclasses.dataclass(frozen=True)
class GeneratorOutput:
    """The final answer (None when the output has no <answer> tag) and the reasoning before it."""

    answer: str | None
    reasoning: str


# ----------------------------------------------------------------------------- shared helpers

def _json_objects(text: str) -> list[dict[str, Any]]:
    r"""Every top-level JSON object embedded in `text` (prose and code fences around them ignored).

    Backslashes inside string values are read as models mean them (`literal_backslashes`): the
    LaTeX that 7B models write with single backslashes (`"\frac{1}{2}"` for `"\\frac{1}{2}"`)
    keeps its text instead of turning `\f` into a form feed or making `\lim` a decoding error.
    """
    decoder = json.JSONDecoder()
    objects = []
    start = text.find("{")
    while start != -1:
        repaired, inserted = literal_backslashes(text[start:])
        try:
            value, end = decoder.raw_decode(repaired)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            objects.append(value)
        start = text.find("{", start + end - bisect.bisect_left(inserted, end))
    return objects


# LaTeX commands that begin with a letter JSON gives a meaning to after a backslash (\n, \r, \t): only
# these words are read as LaTeX ("\neq", "\times"); "\nprint" stays a newline then "print".
_LATEX_AFTER_ESCAPE = frozenset("""
    nabla ne neq neg ni not notin nu nmid nexists newline nleq ngeq nsubseteq natural nearrow
    rangle rceil rfloor rho right rightarrow rightleftharpoons rm re rbrace rvert
    tan tanh tau text textbf textit textrm texttt textstyle tfrac tbinom theta therefore tilde times to top
    triangle triangleq tt
    """.split())
_LETTERS = re.compile(r"[A-Za-z]+")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")


def literal_backslashes(text: str) -> tuple[str, list[int]]:
    r"""`text` with the backslashes inside JSON strings that a model meant literally doubled.

    Inside a string (quotes tracked from the start of `text`, which should be a JSON object's
    opening brace): `\\`, `\"`, `\/` and `\uXXXX` stay escapes; `\n`, `\r`, `\t` stay escapes
    unless the letters after the backslash spell a LaTeX command (`\neq`, `\right`, `\times`);
    every other backslash (`\frac`, `\beta`, `\lim`, `\sqrt`, `\(`, `\,`) is a literal backslash.
    Returns the repaired text and the (sorted) positions in it of the backslashes added.
    """
    out: list[str] = []
    inserted: list[int] = []
    in_string, i, length = False, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            in_string = not in_string
        elif ch == "\\" and in_string:
            following = text[i + 1:i + 2]
            word = _LETTERS.match(text, i + 1)
            escape = (following in ('"', "\\", "/")
                      or (following == "u" and _HEX4.match(text, i + 2) is not None)
                      or (following in ("n", "r", "t") and word[0].lower() not in _LATEX_AFTER_ESCAPE))
            if escape:
                out.append(text[i:i + 2])
                i, length = i + 2, length + 2
                continue
            inserted.append(length)
            out.append("\\")
            length += 1
        out.append(ch)
        i, length = i + 1, length + 1
    return "".join(out), inserted


def _key(name: str) -> str:
    """Key spelling variants alike: "Sub-Goal", "sub goal", "sub_goal" -> "subgoal"."""
    return re.sub(r"[^a-z]", "", name.lower())


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _clean(text: str) -> str:
    return text.strip(" \t\r\n*")


# ----------------------------------------------------------------------------- query analysis

def parse_query_analysis(text: str) -> str:
    """The analysis text, stripped ("" if the model wrote nothing)."""
    return text.strip()


def render_query_analysis_output(analysis: str) -> str:
    """Ideal query-analysis output."""
    return analysis.strip()


# ----------------------------------------------------------------------------- planner

_PLANNER_FIELDS = {"justification": "justification", "context": "context", "subgoal": "sub_goal",
                   "toolname": "tool_name"}
_JUSTIFICATION_LABEL = re.compile(r"justification\s*:", re.IGNORECASE)
_CONTEXT_LABEL = re.compile(r"context\s*:", re.IGNORECASE)
_SUB_GOAL_LABEL = re.compile(r"sub[\s_-]*goal\s*:", re.IGNORECASE)
_TOOL_NAME_LABEL = re.compile(r"tool[\s_-]*name\s*:", re.IGNORECASE)


def _resolve_tool(raw_name: str, tools: Tools) -> str | None:
    """The canonical name of the tool `raw_name` refers to (case, spaces, underscores ignored), or None."""
    by_key = {normalize_tool_name(m.name): m.name for m in tool_metadata(tools)}
    return by_key.get(normalize_tool_name(raw_name)) if raw_name else None


def _planner_step_from_fields(fields: Mapping[str, str], tools: Tools) -> PlannerStep:
    raw = fields["tool_name"]
    error = None if raw else "the Tool Name field is empty"
    return PlannerStep(justification=fields.get("justification", ""), context=fields.get("context", ""),
                       sub_goal=fields["sub_goal"], tool_name=_resolve_tool(raw, tools), raw_tool_name=raw,
                       parse_error=error)


def _planner_fields_from_json(text: str) -> dict[str, str] | None:
    """Fields of the last JSON object having both a sub-goal and a tool-name key (any spelling)."""
    for obj in reversed(_json_objects(text)):
        fields = {_PLANNER_FIELDS[_key(k)]: _as_text(v) for k, v in obj.items() if _key(k) in _PLANNER_FIELDS}
        if "sub_goal" in fields and "tool_name" in fields:
            fields["tool_name"] = fields["tool_name"].strip("*`'\". ")
            return fields
    return None


def _last_label_before(label: re.Pattern[str], text: str, end: int) -> re.Match[str] | None:
    matches = [m for m in label.finditer(text, 0, end)]
    return matches[-1] if matches else None


def _planner_fields_from_labels(text: str) -> dict[str, str] | str:
    """Fields of the last `Context: … Sub-Goal: … Tool Name: …` block, or what is missing."""
    text = text.replace("**", "")
    tool = _last_label_before(_TOOL_NAME_LABEL, text, len(text))
    if tool is None:
        return "no 'Tool Name:' field"
    sub_goal = _last_label_before(_SUB_GOAL_LABEL, text, tool.start())
    if sub_goal is None:
        return "no 'Sub-Goal:' field before 'Tool Name:'"
    context = _last_label_before(_CONTEXT_LABEL, text, sub_goal.start())
    if context is None:
        return "no 'Context:' field before 'Sub-Goal:'"
    justification = _last_label_before(_JUSTIFICATION_LABEL, text, context.start())
    tool_lines = [line for line in text[tool.end():].splitlines() if line.strip()]
    return {
        "justification": _clean(text[justification.end():context.start()]) if justification else "",
        "context": _clean(text[context.end():sub_goal.start()]),
        "sub_goal": _clean(text[sub_goal.end():tool.start()]),
        "tool_name": tool_lines[0].strip(" \t*`'\".") if tool_lines else "",
    }


def parse_planner_output(text: str, tools: Tools) -> PlannerStep:
    """Reads the planner's step: a JSON object first, else the last labelled four-field block.

    The tool name is matched against `tools` ignoring case, spaces and underscores; an unknown
    name gives `tool_name=None` with `raw_tool_name` kept and no parse error. Text with neither
    form gives an empty step with `parse_error` set.
    """
    fields = _planner_fields_from_json(text)
    if fields is None:
        fields = _planner_fields_from_labels(text)
    if isinstance(fields, str):
        error = (f"unparsable planner output ({fields}); expected 'Justification: … Context: … "
                 "Sub-Goal: … Tool Name: …' or a JSON object with sub_goal and tool_name")
        return PlannerStep("", "", "", None, "", parse_error=error)
    return _planner_step_from_fields(fields, tools)


def render_planner_output(step: PlannerStep) -> str:
    """Ideal planner output: the four labelled fields in order, nothing after the tool name."""
    tool = step.tool_name if step.tool_name is not None else step.raw_tool_name
    return (f"Justification: {step.justification}\n"
            f"Context: {step.context}\n"
            f"Sub-Goal: {step.sub_goal}\n"
            f"Tool Name: {tool}")


# ----------------------------------------------------------------------------- executor

_CALL_SHAPE = '{"tool_name": ..., "arguments": {...}}'


def _executor_error(problem: str) -> ExecutorCommand:
    return ExecutorCommand(None, f"{problem}; expected one JSON object {_CALL_SHAPE}")


def parse_executor_output(text: str, *, expected_tool: str | None = None) -> ExecutorCommand:
    """Reads the executor's call from the last JSON object that looks like one.

    Tolerates code fences and prose around the object. With `expected_tool` (the planner's choice),
    a missing "tool_name" defaults to it, a different tool is an error, and the call carries the
    expected (canonical) name. Arguments are checked against the schema later, by Toolbox.execute.
    """
    objects = _json_objects(text)
    if not objects:
        return _executor_error("no JSON object found")
    call_keys = {"toolname", "arguments"}
    obj = next((o for o in reversed(objects) if call_keys & {_key(k) for k in o}), objects[-1])
    fields = {_key(k): v for k, v in obj.items()}
    if "arguments" not in fields:
        return _executor_error("the JSON object has no 'arguments'")
    arguments = fields["arguments"]
    if not isinstance(arguments, dict):
        return _executor_error(f"'arguments' must be a JSON object, got {type(arguments).__name__}")
    tool_name = fields.get("toolname", expected_tool)
    if not isinstance(tool_name, str) or not tool_name.strip():
        return _executor_error("'tool_name' is missing or not a non-empty string")
    if expected_tool is not None:
        if normalize_tool_name(tool_name) != normalize_tool_name(expected_tool):
            return ExecutorCommand(
                None, f"the call names tool {tool_name!r} but the planner chose {expected_tool!r}")
        tool_name = expected_tool
    return ExecutorCommand(ToolCall(tool_name=tool_name.strip(), arguments=arguments))


def render_executor_output(call: ToolCall) -> str:
    """Ideal executor output: the call as one JSON object (same text as memory's Command lines)."""
    return format_command(call)


# ----------------------------------------------------------------------------- verifier

_CONCLUSION_LABEL = re.compile(r"conclusion\s*(?::|：|\n)", re.IGNORECASE)
_LEADING_DECISION = re.compile(r"[\s\"'`*\[(]*(stop|continue)\b", re.IGNORECASE)
_STATED_DECISION = re.compile(r"\b(STOP|CONTINUE)\b")
_NO_CONCLUSION = "no 'Conclusion: STOP' or 'Conclusion: CONTINUE' found; continuing"


def parse_verifier_output(text: str) -> VerifierDecision:
    """Reads the decision after the last "Conclusion:" label; none -> CONTINUE with `parse_error` set.

    The decision is the first word after the label (any case, `**`/quotes tolerated: "Conclusion:
    **stop**"), else the last upper-case STOP or CONTINUE in that line ("Conclusion: The query is
    fully answered, STOP."). A label alone on its line ("**Conclusion:**" or a "### Conclusion"
    heading) reads the next non-empty line.
    """
    text = text.replace("**", "")
    labels = list(_CONCLUSION_LABEL.finditer(text))
    if labels:
        last = labels[-1]
        rest = text[last.end():]
        line = next((line for line in rest.splitlines() if line.strip()), "")
        leading = _LEADING_DECISION.match(line)
        stated = _STATED_DECISION.findall(line)
        decision = leading[1] if leading else (stated[-1] if stated else None)
        if decision is not None:
            return VerifierDecision(stop=decision.upper() == "STOP", reasoning=text[:last.start()].strip())
    return VerifierDecision(stop=False, reasoning=text.strip(), parse_error=_NO_CONCLUSION)


def render_verifier_output(reasoning: str, stop: bool) -> str:
    """Ideal verifier output: the reasoning, then the conclusion line."""
    conclusion = f"Conclusion: {'STOP' if stop else 'CONTINUE'}"
    return f"{reasoning.strip()}\n{conclusion}" if reasoning.strip() else conclusion


# ----------------------------------------------------------------------------- generator

_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The text inside the last <answer>…</answer> (to the end if unclosed), stripped; None if absent."""
    return parse_generator_output(text).answer


def parse_generator_output(text: str) -> GeneratorOutput:
    """Splits the generator's output into the reasoning and the last <answer> (None if absent)."""
    opens = list(_ANSWER_OPEN.finditer(text))
    if not opens:
        return GeneratorOutput(answer=None, reasoning=text.strip())
    last = opens[-1]
    rest = text[last.end():]
    close = _ANSWER_CLOSE.search(rest)
    answer = rest[:close.start()] if close else rest
    return GeneratorOutput(answer=answer.strip(), reasoning=text[:last.start()].strip())


def render_generator_output(reasoning: str, answer: str) -> str:
    """Ideal generator output: brief reasoning, then `<answer>…</answer>`."""
    tagged = f"<answer>{answer.strip()}</answer>"
    return f"{reasoning.strip()}\n{tagged}" if reasoning.strip() else tagged
