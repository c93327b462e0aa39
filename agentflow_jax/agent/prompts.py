"""Prompt builders of the agent's five model calls (query analysis, planner, executor, verifier,
generator).

Each builder is a pure, deterministic function returning chat messages (system + user). The texts
are our own and deliberately compact (the CPU toy world trains a tiny model on them), and each spells
out its output format in the words an off-the-shelf Qwen2.5-7B-Instruct follows: labels as written,
no numbering or markdown, one JSON object, the decision in capitals, nothing after </answer>. The
matching parsers (which also accept the variations such models still write; tests/test_model_outputs.py)
and ideal-output renderers live in `agent.modules`. The toy world's scripted frozen model reads
these prompts by their section markers ("Query: ", "Sub-goal: ", "Steps so far:", "Plan step N of at
most M."): keep them when changing the texts, or change `toy/frozen.py` with them.

Tools are rendered sorted by name so a prompt does not depend on the order a toolbox was built in;
`compact_tools=True` lists one line per tool for small context budgets.
"""

from __future__ import annotations

from typing import Iterable

from agentflow_jax.engines import Message
from agentflow_jax.agent.memory import Memory
from agentflow_jax.tools.base import ToolArgument, ToolMetadata, Toolbox, normalize_tool_name

DEFAULT_MEMORY_BUDGET_CHARS = 8000

QUERY_ANALYSIS_SYSTEM = "You analyse questions for a tool-using agent."
PLANNER_SYSTEM = "You are the planner of a tool-using agent. Each turn you pick one tool and one sub-goal."
EXECUTOR_SYSTEM = "You are the executor of a tool-using agent. You write one call of the given tool."
VERIFIER_SYSTEM = "You are the verifier of a tool-using agent. You judge whether the query is answered."
GENERATOR_SYSTEM = "You write the final answer of a tool-using agent."

_NO_STEPS = "None yet."

Tools = Toolbox | Iterable[ToolMetadata]


def tool_metadata(tools: Tools) -> tuple[ToolMetadata, ...]:
    """The metadata of `tools` (a Toolbox or ToolMetadata items), sorted by normalised name."""
    metadata = [t.metadata for t in tools.tools] if isinstance(tools, Toolbox) else list(tools)
    return tuple(sorted(metadata, key=lambda m: normalize_tool_name(m.name)))


def _argument_line(arg: ToolArgument) -> str:
    need = "required" if arg.required else "optional"
    return f"{arg.name} ({arg.type}, {need}): {arg.description}"


def render_tool(meta: ToolMetadata) -> str:
    """Full description of one tool: name, description, inputs, output, examples, limits, advice."""
    lines = [f"Tool: {meta.name}", f"Description: {meta.description}",
             "Inputs: " + "; ".join(_argument_line(a) for a in meta.inputs),
             f"Output: {meta.output_type}"]
    if meta.demo_commands:
        lines.append("Examples:")
        lines.extend(f"- {command} -> {purpose}" for command, purpose in meta.demo_commands)
    if meta.limitations:
        lines.append(f"Limitations: {meta.limitations}")
    if meta.best_practices:
        lines.append(f"Best practices: {meta.best_practices}")
    return "\n".join(lines)


def render_tool_compact(meta: ToolMetadata) -> str:
    """One line: `- Name(arg: type, opt?: type): description`."""
    args = ", ".join(f"{a.name}{'' if a.required else '?'}: {a.type}" for a in meta.inputs)
    return f"- {meta.name}({args}): {meta.description}"


def render_toolbox(tools: Tools, *, compact: bool = False) -> str:
    """All tools, sorted by name; full blocks separated by blank lines, or one line each."""
    metadata = tool_metadata(tools)
    if compact:
        return "\n".join(render_tool_compact(m) for m in metadata)
    return "\n\n".join(render_tool(m) for m in metadata)


def _chat(system: str, user: str) -> tuple[Message, ...]:
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def _steps_section(memory: Memory, budget_chars: int) -> str:
    return memory.render(budget_chars) if memory.turns else _NO_STEPS


def build_query_analysis_prompt(query: str, tools: Tools, *, compact_tools: bool = False) -> tuple[Message, ...]:
    """Asks for a short analysis: objectives, needed skills, relevant tools, details to watch."""
    user = (f"Query: {query}\n\n"
            f"Tools:\n{render_toolbox(tools, compact=compact_tools)}\n\n"
            "Briefly state what the query asks for, the skills it needs, which tools are relevant "
            "and why, and any detail the answer must respect.")
    return _chat(QUERY_ANALYSIS_SYSTEM, user)


def build_planner_prompt(memory: Memory, tools: Tools, *, step: int, max_steps: int,
                         memory_budget_chars: int = DEFAULT_MEMORY_BUDGET_CHARS,
                         compact_tools: bool = False) -> tuple[Message, ...]:
    """Asks for the next step (1-based `step` of `max_steps`) in the four-field planner format.

    Query and analysis come from `memory`; previous steps are rendered within `memory_budget_chars`.
    """
    if not 1 <= step <= max_steps:
        raise ValueError(f"planner step must be in 1..max_steps={max_steps}, got {step}")
    user = (f"Query: {memory.query}\n\n"
            f"Query analysis: {memory.query_analysis}\n\n"
            f"Tools:\n{render_toolbox(tools, compact=compact_tools)}\n\n"
            f"Previous steps:\n{_steps_section(memory, memory_budget_chars)}\n\n"
            f"Plan step {step} of at most {max_steps}. Pick the one tool that best advances what is "
            "still missing; do not repeat a step that already succeeded.\n"
            "Reply with exactly these four lines, labels as written here (no numbers, no markdown), "
            "and nothing after the tool name:\n"
            "Justification: <why this tool now>\n"
            "Context: <facts from the query and previous steps that the tool needs>\n"
            "Sub-Goal: <one specific task for the tool>\n"
            "Tool Name: <one tool name copied exactly from the list above>")
    return _chat(PLANNER_SYSTEM, user)


def _call_template(meta: ToolMetadata) -> str:
    args = ", ".join(f'"{a.name}": "<{a.type}>"' for a in meta.inputs)
    return f'{{"tool_name": "{meta.name}", "arguments": {{{args}}}}}'


def build_executor_prompt(query: str, sub_goal: str, tool: ToolMetadata, context: str) -> tuple[Message, ...]:
    """Asks for one JSON object `{"tool_name": ..., "arguments": {...}}` calling `tool`."""
    user = (f"Query: {query}\n"
            f"Context: {context}\n"
            f"Sub-goal: {sub_goal}\n\n"
            f"{render_tool(tool)}\n\n"
            "Write the call that achieves the sub-goal as one JSON object in exactly this form, with no code "
            "and no explanation:\n"
            f"{_call_template(tool)}\n"
            "Give every required input and only the inputs listed; the string values must hold the whole "
            "request, with every name and number it needs.")
    return _chat(EXECUTOR_SYSTEM, user)


def build_verifier_prompt(memory: Memory, tools: Tools, *,
                          memory_budget_chars: int = DEFAULT_MEMORY_BUDGET_CHARS,
                          compact_tools: bool = False) -> tuple[Message, ...]:
    """Asks whether the steps so far answer every part of the query; ends with the Conclusion rule."""
    user = (f"Query: {memory.query}\n\n"
            f"Query analysis: {memory.query_analysis}\n\n"
            f"Tools:\n{render_toolbox(tools, compact=compact_tools)}\n\n"
            f"Steps so far:\n{_steps_section(memory, memory_budget_chars)}\n\n"
            "Check whether these results fully and consistently answer every part of the query. "
            "Reason briefly, then end with exactly one line: 'Conclusion: STOP' if the query is "
            "answered, or 'Conclusion: CONTINUE' if more steps are needed (STOP or CONTINUE in capitals, "
            "nothing after it).")
    return _chat(VERIFIER_SYSTEM, user)


def build_generator_prompt(memory: Memory, *,
                           memory_budget_chars: int = DEFAULT_MEMORY_BUDGET_CHARS) -> tuple[Message, ...]:
    """Asks for brief reasoning over the steps, then the final answer inside <answer>…</answer>."""
    user = (f"Query: {memory.query}\n\n"
            f"Steps taken:\n{_steps_section(memory, memory_budget_chars)}\n\n"
            "Using these results, reason briefly, then give the final answer inside "
            "<answer></answer> and write nothing after </answer>. Keep the answer short: a number, name "
            "or phrase (for a multiple-choice question, the option's letter).")
    return _chat(GENERATOR_SYSTEM, user)
