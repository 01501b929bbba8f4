"""``edgellm``: the command line entry point.

Each sub-command lives in its own module (``edgellm/cli/<command>.py``) exposing
``add_parser(subparsers)`` and ``run(args) -> int``; :data:`COMMANDS` is the table that
wires them up. This module owns what every command shares: global flags, logging, and
the translation of errors into ``edgellm: error: <message>`` with an exit code.

Exit codes: 0 success, 1 failure, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from edgellm import __version__
from edgellm.cli import (
    bench,
    chat,
    check,
    convert,
    devices,
    inspect,
    plan,
    profile,
    quickstart,
    run,
    serve,
    verify,
)
from edgellm.cli._common import GLOBAL_FLAGS
from edgellm.errors import EdgeLLMError, InvalidInputError

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "edgellm"

#: Sub-command name -> module with ``add_parser(subparsers)`` and ``run(args) -> int``.
#: Order is the order of ``edgellm --help``. Adding a command is adding a row.
COMMANDS: dict[str, ModuleType] = {
    "quickstart": quickstart,
    "run": run,
    "chat": chat,
    "convert": convert,
    "verify": verify,
    "inspect": inspect,
    "check": check,
    "bench": bench,
    "profile": profile,
    "devices": devices,
    "plan": plan,
    "serve": serve,
}

#: Exception type -> exit code, most specific first.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidInputError, 2),
    (EdgeLLMError, 1),
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global flags plus one sub-parser per row of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[GLOBAL_FLAGS],
        description="Convert, run and profile language models on small devices.",
        epilog="Run 'edgellm <command> --help' for a command's options. "
               "Start with: edgellm quickstart",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in COMMANDS.items():
        sub = module.add_parser(subparsers)
        if sub.prog.split()[-1] != name:
            raise RuntimeError(f"edgellm.cli.{name}.add_parser registered {sub.prog!r}")
    return parser


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (tests swap it between calls)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never break the command
            self.handleError(record)


def _configure_logging(verbose: int, debug: bool) -> None:
    """Level and a stderr handler for the ``edgellm`` logger only; the root logger (and
    an embedding application's handlers) are left alone, so main() can run repeatedly."""
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("edgellm")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def _error(message: str) -> None:
    one_line = " ".join(str(message).splitlines()).strip()
    sys.stderr.write(f"{PROG}: error: {one_line}\n")
    sys.stderr.flush()


def _exit_code(exc: BaseException) -> int:
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)


def _on_broken_pipe() -> int:
    """stdout was closed early (``edgellm run ... | head``): stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 1


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:
        return _on_broken_pipe()
    except EdgeLLMError as exc:
        if args.debug:
            traceback.print_exc()
        _error(str(exc))
        return _exit_code(exc)
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if args.debug:
            traceback.print_exc()
            _error(f"{type(exc).__name__}: {exc}")
        else:
            _error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``edgellm`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit code instead of exiting, so tests can call it directly.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors (argparse exits 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    _configure_logging(args.verbose, args.debug)
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
