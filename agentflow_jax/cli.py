"""What every command-line entry point shares: flag parsing and the config file flag, and user errors
(a misspelt key, a missing file or model directory, an unreachable server) reported as one line
`error: ...` with exit status 2. The traceback appears only with --verbosity=1 or higher.

    _CONFIG = cli.config_flag()

    def main(argv):
        config, source = cli.load_config(_CONFIG)
        ...

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from agentflow_jax import distributed
from agentflow_jax.engines import EngineError
from agentflow_jax.errors import UserError

USER_ERRORS = (UserError, EngineError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               app.UsageError)
"""Exceptions that describe a problem in the user's request rather than a bug."""

EXIT_USER_ERROR = 2


_CONFIG_FLAG: flags.FlagHolder | None = None
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 of a multi-process run "
                                   "(else $AGENTFLOW_COORDINATOR, or detected on TPU pods and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize_distributed() -> None:
    """Joins a multi-process run from the flags, the environment or the cluster (`distributed.initialize`)."""
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def config_flag() -> flags.FlagHolder:
    """The `--config=FILE.py` flag (an ml_collections config file; `--config.KEY=VALUE` overrides),
    defined once however many entry points import each other."""
    global _CONFIG_FLAG
    if _CONFIG_FLAG is None:
        _CONFIG_FLAG = config_flags.DEFINE_config_file(
            "config", None, "Path to an ml_collections config file (experiments/configs/*.py); override keys "
            "with --config.KEY=VALUE.", lock_config=True)
    return _CONFIG_FLAG


def load_config(holder: flags.FlagHolder) -> tuple[Any, str]:
    """The config of a `config_flag()` flag and its file name (with any `:ARG`); UserError when absent
    or unloadable."""
    name = holder.name
    filename = config_flags.get_config_filename(flags.FLAGS[name])
    if not filename:
        raise UserError(f"pass --{name}=experiments/configs/<name>.py")
    path = filename.split(":", 1)[0]  # FILE.py:ARG passes ARG to the file's get_config
    if not os.path.isfile(path):
        raise UserError(f"--{name}: config file {path!r} does not exist")
    try:
        config = holder.value
        config.keys()  # a file that failed to load raises here
    except OSError as e:
        raise UserError(f"--{name}: cannot load {filename!r}: {_one_line(e)}") from e
    return config, filename


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with user errors as one line and exit status 2 (module docstring)."""
    app.run(_guarded(main), flags_parser=_parse_flags)


def fail(message: str) -> NoReturn:
    """Prints `error: message` on one line to stderr and exits with status 2."""
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    def run_main(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:  # library INFO lines (Orbax, XLA) drown the run's own messages
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as e:
            if flags.FLAGS.verbosity >= 1:
                raise
            fail(str(e))

    return run_main


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses flags; a bad flag or override (e.g. a misspelt --config.KEY) is one line and exit 2."""
    try:
        return flags.FLAGS(list(argv))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks
        fail(f"bad command line: a --config.KEY override names no such key: {_one_line(_message(e))}")
    except (flags.Error, ValueError, TypeError, SyntaxError, OSError) as e:
        fail(f"bad command line: {_one_line(_message(e))}")


def _message(error: BaseException) -> str:
    """An exception's message, without the quoting KeyError's str() adds (ml_collections even passes
    such a repr on as an AttributeError's message) and without the traceback ml_collections puts
    before an error raised by a config file's get_config (its last line is the error)."""
    message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    if "Traceback (most recent call last)" in message:
        message = message.strip().splitlines()[-1]
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
        try:
            message = ast.literal_eval(message)
        except (ValueError, SyntaxError):
            pass
    return message


def _one_line(text: Any) -> str:
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
