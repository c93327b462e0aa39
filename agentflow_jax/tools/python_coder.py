"""Python_Code_Generator_Tool: the LLM writes a Python snippet, the sandbox runs it.

The engine is asked for one fenced ```python block that prints its results. The last fenced block
of the reply is taken (or the whole reply when it has no fence), wrapped so that the snippet's
top-level variables are reported after it ends, and run by `tools.sandbox` under hard limits.
The tool's text shows the printed output, the variables, any error, and the code itself.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from typing import Any

from agentflow_jax.engines import Engine, GenerationRequest
from agentflow_jax.tools import sandbox
from agentflow_jax.tools.base import Tool, ToolArgument, ToolMetadata

PYTHON_CODER_METADATA = ToolMetadata(
    name="Python_Code_Generator_Tool",
    description=("Writes a short Python program for a computational question and runs it in an "
                 "isolated sandbox, returning what the program printed."),
    inputs=(ToolArgument("query", "str", "A precise description of the computation, including every "
                                         "number and formula it needs."),),
    output_type="str - the printed output, the final top-level variables, any error, and the code run.",
    demo_commands=(
        ('{"query": "Compute 4817 * 36 and print the result."}', "Exact arithmetic on large numbers."),
        ('{"query": "Find all integer solutions of x**2 - 5*x + 6 = 0 for x in range(-100, 100) and '
         'print them."}', "A small search over candidates."),
    ),
    limitations=("No network, no files but its own empty working directory, no input(); runs "
                 "are limited in time, memory, disk and processes; only the standard library and the "
                 "numerical packages installed with the interpreter are available. The code is "
                 "written by a language model and can contain mistakes."),
    best_practices=("Give every value the program needs in the query; ask for one focused "
                    "computation per call; ask for the results to be printed with labels."),
)

_PROMPT = """Write a Python 3 program for the task below.

Rules:
- Reply with exactly one ```python code block and nothing else.
- The program must print every result it computes, each with a short label.
- Use only the standard library (numpy is usually available too).
- Do not read input, use the network, or write files outside the current directory.

Task: {query}"""

_FENCED = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Runs the snippet with its own file name in tracebacks, then prints its simple top-level variables
# after a per-call random marker line, so the caller can tell them apart from the snippet's output.
_WRAPPER = '''import linecache as _lc, sys as _sys, traceback as _tb, types as _types
_SRC = {source!r}
_lc.cache["snippet.py"] = (len(_SRC), None, _SRC.splitlines(True), "snippet.py")
_NS = {{"__name__": "__main__", "__builtins__": __builtins__}}
_status = 0
try:
    exec(compile(_SRC, "snippet.py", "exec"), _NS)
except SystemExit as _e:
    _status = _e.code if isinstance(_e.code, int) else (0 if _e.code is None else 1)
except BaseException as _e:
    _tb.print_exception(type(_e), _e, _e.__traceback__.tb_next)
    _status = 1
_skip = (_types.ModuleType, _types.FunctionType, _types.BuiltinFunctionType, type)
_vars = [(k, v) for k, v in _NS.items() if not k.startswith("_") and not isinstance(v, _skip)]
print("\\n{marker}", flush=True)
for _k, _v in _vars[:{max_vars}]:
    try:
        _r = repr(_v)
    except Exception:
        _r = "<unprintable>"
    print(f"{{_k}} = {{_r[:{max_repr}]}}")
_sys.exit(_status)
'''


def extract_code(text: str) -> str:
    """The last fenced code block of `text` (an unclosed final fence counts), else all of it."""
    blocks = _FENCED.findall(text)
    return (blocks[-1] if blocks else text).strip()


@dataclasses.dataclass(frozen=True)
class CodeRun:
    """The parts of one snippet run that the tool reports."""

    code: str
    printed: str
    variables: str
    result: sandbox.SandboxResult

    def as_text(self) -> str:
        r = self.result
        parts = [f"Printed output:\n{self.printed.rstrip() or '(nothing was printed)'}"]
        if self.variables.strip():
            parts.append(f"Variables after the run:\n{self.variables.rstrip()}")
        if r.killed_reason:
            parts.append(f"The program was stopped: {r.killed_reason}.")
        if r.stderr.strip():
            code_note = f" (exit code {r.exit_code})" if r.exit_code else ""
            parts.append(f"Errors and warnings{code_note}:\n{r.stderr.rstrip()}")
        elif r.exit_code not in (0, None):
            parts.append(f"The program exited with code {r.exit_code}.")
        parts.append(f"Code:\n```python\n{self.code}\n```")
        if notes := sandbox.format_notes(r.isolation_notes):
            parts.append(notes)
        return "\n\n".join(parts)


def run_snippet(code: str, limits: sandbox.SandboxLimits, *, max_variables: int = 20,
                max_repr_chars: int = 200, **sandbox_options: Any) -> CodeRun:
    """Runs `code` in the sandbox and splits its output into printed text and final variables."""
    marker = f"=== variables {secrets.token_hex(8)} ==="
    program = _WRAPPER.format(source=code, marker=marker, max_vars=max_variables, max_repr=max_repr_chars)
    result = sandbox.run_python_with_limits(program, limits, **sandbox_options)
    printed, _, variables = result.stdout.partition(f"\n{marker}\n")
    return CodeRun(code, printed, variables, result)


class PythonCoderTool(Tool):
    """Asks the engine for a snippet that answers `query`, runs it in the sandbox, reports the run.

    `require` ("full", "best_effort" or "none") is the isolation the sandbox must have; at
    construction the host is probed once per process, the isolation in force is logged once
    (WARNING when a layer is missing) and kept in `self.isolation` (`sandbox.isolation_report`),
    and with "full" a host lacking a layer raises SandboxError saying which and what to install.
    `use_namespaces` / `switch_user` turn layers off (see `sandbox.run_python`).
    """

    metadata = PYTHON_CODER_METADATA

    def __init__(self, engine: Engine, *, limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
                 max_new_tokens: int = 1024, temperature: float = 0.0, require: str = "full",
                 use_namespaces: bool = True, switch_user: bool = True):
        self.engine = engine
        self.limits = limits
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.sandbox_options = {"require": require, "use_namespaces": use_namespaces, "switch_user": switch_user}
        self.isolation = sandbox.check_isolation(require, use_namespaces=use_namespaces, switch_user=switch_user)

    def run_metadata(self) -> dict[str, Any]:
        """The sandbox isolation in force (`sandbox.isolation_report`)."""
        return {"isolation": self.isolation}

    def run(self, query: str) -> str:
        request = GenerationRequest(messages=({"role": "user", "content": _PROMPT.format(query=query)},),
                                    max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        (generation,) = self.engine.generate([request])
        code = extract_code(generation.text)
        if not code:
            raise ValueError("the model returned no code; rephrase the query as a concrete computation")
        return run_snippet(code, self.limits, **self.sandbox_options).as_text()
