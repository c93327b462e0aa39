"""The agent's memory: an immutable, append-only record of the turns taken for one query.

`Memory` is a frozen dataclass of text (no arrays): every update returns a new `Memory`; the
original is never changed.

`Memory.render(budget_chars)` writes the turns as clean text for prompts::

    Step 1: Tool: Wikipedia_RAG_Search_Tool
    Sub-goal: Find the founding year of Velmora.
    Command: {"tool_name": "Wikipedia_RAG_Search_Tool", "arguments": {"query": "Velmora founded"}}
    Result: Velmora was founded in 1642.

and never exceeds the budget: the oldest tool results are shortened first (with a visible
"…[truncated N chars]" marker), then newer ones; if even the step headers do not fit, the oldest
steps are dropped and a note says so.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from agentflow_jax.tools.base import ToolCall

VERDICT_STOP = "STOP"
VERDICT_CONTINUE = "CONTINUE"
_VERDICTS = (None, VERDICT_STOP, VERDICT_CONTINUE)

_STEP_SEPARATOR = "\n\n"


def format_command(call: ToolCall) -> str:
    """The canonical one-line text of a tool call: `{"tool_name": ..., "arguments": {...}}`.

    Used for the memory's "Command:" lines and as the executor's ideal output, so the model sees
    the same form it is asked to write.
    """
    return json.dumps({"tool_name": call.tool_name, "arguments": dict(call.arguments)}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One executed step.

    Attributes:
      tool_name: the tool the planner chose (as shown to the planner, or the raw text if unknown).
      sub_goal: the planner's sub-goal for this step.
      command: the executed call as text (see `format_command`); "" when nothing was executed.
      result: the tool's output, or the error text when the call failed.
      ok: False when the call failed (schema error, exception, timeout, unknown tool).
      verdict: the verifier's judgement after this step: "STOP", "CONTINUE", or None until judged.
    """

    tool_name: str
    sub_goal: str
    command: str
    result: str
    ok: bool
    verdict: str | None = None

    def __post_init__(self):
        if self.verdict not in _VERDICTS:
            raise ValueError(f"Turn.verdict must be one of {_VERDICTS}, got {self.verdict!r}")


@dataclasses.dataclass(frozen=True)
class _StepText:
    """A rendered step split into its fixed header and its shortenable result."""

    index: int
    header: str
    result: str


@dataclasses.dataclass(frozen=True)
class Memory:
    """What the agent knows about one query: the query, its analysis and the turns so far.

    Attributes:
      query: the user's question.
      query_analysis: the analysis written before turn 1 ("" until set).
      turns: the executed steps, oldest first.
    """

    query: str
    query_analysis: str = ""
    turns: tuple[Turn, ...] = ()

    def with_analysis(self, analysis: str) -> Memory:
        """A copy with `query_analysis` set."""
        return dataclasses.replace(self, query_analysis=analysis)

    def add_turn(self, *, tool_name: str, sub_goal: str, command: ToolCall | str, result: str,
                 ok: bool) -> Memory:
        """A copy with one more (not yet judged) turn; a `ToolCall` command is stored as `format_command` text."""
        command_text = format_command(command) if isinstance(command, ToolCall) else command
        turn = Turn(tool_name=tool_name, sub_goal=sub_goal, command=command_text, result=result, ok=ok)
        return dataclasses.replace(self, turns=self.turns + (turn,))

    def with_verdict(self, stop: bool) -> Memory:
        """A copy whose last turn carries the verifier's verdict (STOP if `stop` else CONTINUE)."""
        if not self.turns:
            raise ValueError("with_verdict needs at least one turn: add_turn before recording a verdict")
        verdict = VERDICT_STOP if stop else VERDICT_CONTINUE
        last = dataclasses.replace(self.turns[-1], verdict=verdict)
        return dataclasses.replace(self, turns=self.turns[:-1] + (last,))

    def render(self, budget_chars: int) -> str:
        """The turns as readable text of at most `budget_chars` characters ("" when there are none).

        Shortens the oldest tool results first, then newer ones; if the step headers alone do not
        fit, drops the oldest steps and starts with a note naming them. Deterministic.
        """
        if budget_chars < 0:
            raise ValueError(f"budget_chars must be >= 0, got {budget_chars}")
        steps = [_step_text(i, turn) for i, turn in enumerate(self.turns, start=1)]
        for dropped in range(len(steps) + 1):
            note = _omitted_note(dropped) if dropped else None
            text = _fit_results(steps[dropped:], note, budget_chars)
            if text is not None:
                return text
        return ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (see `from_dict`)."""
        return {"query": self.query, "query_analysis": self.query_analysis,
                "turns": [dataclasses.asdict(turn) for turn in self.turns]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Memory:
        """Inverse of `to_dict`; raises ValueError naming what is missing or malformed."""
        try:
            turns = tuple(Turn(**turn) for turn in data.get("turns", ()))
            return cls(query=data["query"], query_analysis=data.get("query_analysis", ""), turns=turns)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a serialised Memory ({e}); expected keys query, query_analysis, "
                             f"turns[{{tool_name, sub_goal, command, result, ok, verdict}}]") from e

    def to_json(self) -> str:
        """The memory as one JSON object (for trajectory files)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Memory:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))



def _step_text(index: int, turn: Turn) -> _StepText:
    header = (f"Step {index}: Tool: {turn.tool_name}\n"
              f"Sub-goal: {turn.sub_goal}\n"
              f"Command: {turn.command or '(none)'}\n"
              f"Result: ")
    return _StepText(index, header, turn.result)


def _omitted_note(dropped: int) -> str:
    steps = "Step 1" if dropped == 1 else f"Steps 1-{dropped}"
    return f"[{steps} omitted]"


def _truncation_marker(removed: int) -> str:
    return f"…[truncated {removed} chars]"


def _shorten_by(text: str, excess: int) -> str:
    """`text` with a tail cut and a marker appended, at least `excess` chars shorter if possible.

    Cuts no more than needed; when even cutting everything cannot save `excess` chars, cuts
    everything (or returns `text` unchanged when the marker would be longer than the text).
    """
    removed = excess + len(_truncation_marker(excess))
    while removed - len(_truncation_marker(removed)) < excess:
        removed += 1
    removed = min(removed, len(text))
    shortened = text[:len(text) - removed] + _truncation_marker(removed)
    return shortened if len(shortened) < len(text) else text


def _fit_results(steps: list[_StepText], note: str | None, budget: int) -> str | None:
    """Joins the steps within `budget`, shortening results oldest first; None if headers do not fit."""
    blocks = ([note] if note else []) + [s.header + s.result for s in steps]
    total = sum(map(len, blocks)) + len(_STEP_SEPARATOR) * max(0, len(blocks) - 1)
    results = [s.result for s in steps]
    for i, result in enumerate(results):
        if total <= budget:
            break
        results[i] = _shorten_by(result, total - budget)
        total += len(results[i]) - len(result)
    if total > budget:
        return None
    blocks = ([note] if note else []) + [s.header + r for s, r in zip(steps, results)]
    return _STEP_SEPARATOR.join(blocks)
