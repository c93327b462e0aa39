"""What every tool shares: metadata shown to the planner, an argument schema, safe execution.

A tool is an object with `metadata` and `run(**arguments) -> str`. The executor produces a
`ToolCall` (tool name + JSON arguments); `Toolbox.execute` validates the arguments against the
tool's schema, runs it with a time limit and always returns a `ToolResult` -- a failing, hanging or
misused tool becomes an error result, never an exception in the rollout.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import re
import time
from typing import Any, Iterable, Mapping

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
}


@dataclasses.dataclass(frozen=True)
class ToolArgument:
    """One named input of a tool. `type` is one of "str", "int", "float", "bool", "list"."""

    name: str
    type: str
    description: str
    required: bool = True

    def __post_init__(self):
        if self.type not in _JSON_TYPES:
            raise ValueError(f"ToolArgument {self.name!r}: type {self.type!r} is not one of {sorted(_JSON_TYPES)}")


@dataclasses.dataclass(frozen=True)
class ToolMetadata:
    """Everything the planner and executor are shown about a tool (SPEC.md section 2)."""

    name: str
    description: str
    inputs: tuple[ToolArgument, ...]
    output_type: str
    demo_commands: tuple[tuple[str, str], ...] = ()  # (command as JSON text, what it does)
    limitations: str = ""
    best_practices: str = ""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A concrete call: the tool's display name and its arguments (JSON-compatible values)."""

    tool_name: str
    arguments: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """Outcome of a call. `ok` is False for schema errors, exceptions and timeouts (see `error`)."""

    ok: bool
    output: str
    error: str | None = None
    elapsed_s: float = 0.0

    def as_text(self) -> str:
        return self.output if self.ok else f"Error: {self.error}"


class ToolArgumentError(ValueError):
    """The arguments of a tool call do not fit the tool's schema."""


class Tool(abc.ABC):
    """Base class of tools. Subclasses set `metadata` and implement `run`."""

    metadata: ToolMetadata

    @abc.abstractmethod
    def run(self, **arguments: Any) -> str:
        """Run the tool on validated arguments and return its textual output."""

    def run_metadata(self) -> dict[str, Any]:
        """What a training run records about this tool (JSON-able), e.g. the sandbox isolation in force."""
        return {}

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Checks `arguments` against the schema; returns them as a dict or raises ToolArgumentError."""
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(f"{self.metadata.name}: arguments must be a JSON object, "
                                    f"got {type(arguments).__name__}")
        known = {a.name: a for a in self.metadata.inputs}
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            raise ToolArgumentError(f"{self.metadata.name}: unknown argument(s) {unknown}; expected {sorted(known)}")
        for arg in self.metadata.inputs:
            if arg.name not in arguments:
                if arg.required:
                    raise ToolArgumentError(f"{self.metadata.name}: missing required argument "
                                            f"{arg.name!r} ({arg.type})")
                continue
            value = arguments[arg.name]
            is_bool = isinstance(value, bool)
            if not isinstance(value, _JSON_TYPES[arg.type]) or (is_bool and arg.type != "bool"):
                raise ToolArgumentError(
                    f"{self.metadata.name}: argument {arg.name!r} must be {arg.type}, got {type(value).__name__}")
        return dict(arguments)


def normalize_tool_name(name: str) -> str:
    """Case-insensitive, spaces/underscores/hyphens alike: "Python Code_Generator" -> "python_code_generator"."""
    return re.sub(r"[\s_\-]+", "_", name.strip().strip("*`'\"")).lower()


class Toolbox:
    """An ordered set of tools with name matching and safe, time-limited execution.

    Tools run in a shared thread pool so a batch of calls proceeds concurrently; a call that
    exceeds its time limit is reported as a timeout (tools that run untrusted code enforce their
    own hard limits in a separate process, see `tools.sandbox`).
    """

    def __init__(self, tools: Iterable[Tool], *, call_timeout_s: float = 120.0, max_workers: int = 16):
        self.tools: tuple[Tool, ...] = tuple(tools)
        self._by_key: dict[str, Tool] = {}
        for tool in self.tools:
            key = normalize_tool_name(tool.metadata.name)
            if key in self._by_key:
                raise ValueError(f"two tools share the name {tool.metadata.name!r}")
            self._by_key[key] = tool
        self.call_timeout_s = call_timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.metadata.name for t in self.tools)

    def run_metadata(self) -> dict[str, dict[str, Any]]:
        """Each tool's `run_metadata`, by tool name."""
        return {t.metadata.name: t.run_metadata() for t in self.tools}

    def find(self, name: str) -> Tool | None:
        """The tool whose normalised name equals normalize_tool_name(name), or None."""
        return self._by_key.get(normalize_tool_name(name))

    def execute(self, call: ToolCall) -> ToolResult:
        """Validates and runs one call; never raises."""
        return self.execute_many([call])[0]

    def execute_many(self, calls: Iterable[ToolCall]) -> list[ToolResult]:
        """Runs calls concurrently, each under `call_timeout_s`; results in call order, never raises."""
        starts, futures = [], []
        for call in calls:
            starts.append(time.monotonic())
            tool = self.find(call.tool_name)
            if tool is None:
                futures.append(ToolResult(False, "", f"unknown tool {call.tool_name!r}; available: {list(self.names)}"))
                continue
            try:
                args = tool.validate(call.arguments)
            except ToolArgumentError as e:
                futures.append(ToolResult(False, "", str(e)))
                continue
            futures.append(self._pool.submit(tool.run, **args))
        results = []
        for start, fut in zip(starts, futures):
            if isinstance(fut, ToolResult):
                results.append(fut)
                continue
            remaining = max(0.0, start + self.call_timeout_s - time.monotonic())
            try:
                output = fut.result(timeout=remaining)
                results.append(ToolResult(True, str(output), None, time.monotonic() - start))
            except concurrent.futures.TimeoutError:
                fut.cancel()
                results.append(ToolResult(False, "", f"tool call timed out after {self.call_timeout_s:g} s",
                                          time.monotonic() - start))
            except Exception as e:  # noqa: BLE001 - any tool failure becomes the turn's result
                results.append(ToolResult(False, "", f"{type(e).__name__}: {e}", time.monotonic() - start))
        return results
