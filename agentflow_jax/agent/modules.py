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

import ast
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


_TRAILING_ENUMERATOR = re.compile(r"\n[ \t]*(?:\d+[.)]|[-*•#]+)[ \t]*$")


_BOLD = re.compile(r"\*\*(\S(?:[^\n]*?\S)?)\*\*")


def _unbold(text: str) -> str:
    """`text` without markdown bold markers ("**Context:**" -> "Context:"); a power "12 ** 7" stays."""
    return _BOLD.sub(r"\1", text)


def _clean(text: str) -> str:
    """A field's text without surrounding blanks and `*`, and without the "2." / "-" / "###" that
    numbered or bulleted replies put before the next label."""
    return _TRAILING_ENUMERATOR.sub("", text.strip(" \t\r\n*")).strip(" \t\r\n*")


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


def _label(word: str) -> re.Pattern[str]:
    """A field label: `Word:` anywhere, or a markdown heading `### Word` on a line of its own."""
    return re.compile(rf"{word}\s*:|^[ \t]*#{{1,6}}[ \t]*{word}[ \t]*$", re.IGNORECASE | re.MULTILINE)


_JUSTIFICATION_LABEL = _label("justification")
_CONTEXT_LABEL = _label("context")
_SUB_GOAL_LABEL = _label(r"sub[\s_-]*goal")
_TOOL_NAME_LABEL = _label(r"tool[\s_-]*name")


def _resolve_tool(raw_name: str, tools: Tools) -> str | None:
    """The canonical name of the tool `raw_name` refers to, or None: equal names ignoring case, spaces,
    hyphens and underscores; else the one tool name that the text contains ("`Wikipedia_RAG_Search_Tool`
    (for the birth year)"), the earliest when several do."""
    if not raw_name:
        return None
    by_key = {normalize_tool_name(m.name): m.name for m in tool_metadata(tools)}
    key = normalize_tool_name(raw_name)
    if key in by_key:
        return by_key[key]
    padded = f"_{re.sub(r'[^a-z0-9]+', '_', raw_name.lower())}_"
    found = [(padded.find(f"_{k}_"), name) for k, name in by_key.items() if f"_{k}_" in padded]
    return min(found)[1] if found else None


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
    text = _unbold(text)
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

    Tolerates code fences and prose around the object, single-backslash LaTeX in its strings
    (`literal_backslashes`), and the other shapes 7B models write: a Python dict literal (single
    quotes, True / None), a call `tool.execute(query="...")` or `Tool_Name(query="...")`, the
    arguments beside "tool_name" instead of under "arguments", "arguments" as a JSON string, and
    (with `expected_tool`) the arguments object alone. With `expected_tool` (the planner's choice),
    a missing "tool_name" defaults to it, a different tool is an error, and the call carries the
    expected (canonical) name. Arguments are checked against the schema later, by Toolbox.execute.
    """
    objects = _json_objects(text) or _python_dicts(text) or _call_expressions(text)
    if not objects:
        return _executor_error("no JSON object found")
    call_keys = {"toolname", "arguments"}
    obj = next((o for o in reversed(objects) if call_keys & {_key(k) for k in o}), objects[-1])
    fields = {_key(k): v for k, v in obj.items()}
    if "arguments" in fields:
        arguments = fields["arguments"]
        if isinstance(arguments, str) and arguments.strip().startswith("{"):
            arguments = next(iter(_json_objects(arguments)), arguments)
    elif "toolname" in fields and len(fields) > 1:
        arguments = {k: v for k, v in obj.items() if _key(k) != "toolname"}
    elif "toolname" not in fields and expected_tool is not None:
        arguments = dict(obj)
    else:
        return _executor_error("the JSON object has no 'arguments'")
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


def _balanced_end(text: str, start: int) -> int | None:
    """The index after the bracket closing the one at `start` ("{" or "("), quotes respected; None if unclosed."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack, quote, i = [], None, start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return None


def _python_dicts(text: str) -> list[dict[str, Any]]:
    """Python dict literals in `text` ({'tool_name': 'X', 'arguments': {'query': 'q'}}), outermost only."""
    found, start = [], text.find("{")
    while start != -1:
        end = _balanced_end(text, start)
        value = _literal(text[start:end]) if end else None
        if isinstance(value, dict):
            found.append(value)
            start = text.find("{", end)
        else:
            start = text.find("{", start + 1)
    return found


_CALL = re.compile(r"(?:\b\w+\s*\.\s*)?\b(execute|[A-Za-z]\w*_Tool)\s*\(")


def _call_expressions(text: str) -> list[dict[str, Any]]:
    """Calls written as code: `tool.execute(query="...")` (tool unnamed) or `Some_Tool(query="...")`, with
    literal keyword arguments, as {"tool_name"?: ..., "arguments": {...}}."""
    found = []
    for match in _CALL.finditer(text):
        end = _balanced_end(text, match.end() - 1)
        try:
            call = ast.parse("f" + text[match.end() - 1:end], mode="eval").body if end else None
        except SyntaxError:
            continue
        if not isinstance(call, ast.Call) or call.args or not call.keywords:
            continue
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
        except ValueError:
            continue
        name = match.group(1)
        found.append({"arguments": arguments} if name == "execute" else {"tool_name": name, "arguments": arguments})
    return found


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def render_executor_output(call: ToolCall) -> str:
    """Ideal executor output: the call as one JSON object (same text as memory's Command lines)."""
    return format_command(call)


# ----------------------------------------------------------------------------- verifier

_CONCLUSION_LABEL = re.compile(r"conclusion\s*(?::|：|\n)", re.IGNORECASE)
_LEADING_DECISION = re.compile(r"[\s\"'`*\[(]*(stop|continue)\b", re.IGNORECASE)
_STATED_DECISION = re.compile(r"\b(STOP|CONTINUE)\b")
_DECISION_LINE = re.compile(r"[\s#>\"'`*\[(]*(stop|continue)[\s\"'`*.!)\]]*", re.IGNORECASE)
_NO_CONCLUSION = "no 'Conclusion: STOP' or 'Conclusion: CONTINUE' found; continuing"


def parse_verifier_output(text: str) -> VerifierDecision:
    """Reads the decision after the last "Conclusion:" label; none -> CONTINUE with `parse_error` set.

    The decision is the first word after the label (any case, `**`/quotes tolerated: "Conclusion:
    **stop**"), else the last upper-case STOP or CONTINUE in that line ("Conclusion: The query is
    fully answered, STOP."). A label alone on its line ("**Conclusion:**" or a "### Conclusion"
    heading) reads the next non-empty line. Without a label, a last line holding only the decision
    ("**STOP**") counts.
    """
    text = _unbold(text)
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
    lines = [line for line in text.splitlines() if line.strip()]
    alone = _DECISION_LINE.fullmatch(lines[-1]) if lines and not labels else None
    if alone:
        return VerifierDecision(stop=alone[1].upper() == "STOP", reasoning="\n".join(lines[:-1]).strip())
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
