"""``edgellm chat MODEL``: a conversation, interactive or piped.

Each stdin line is one user turn; the reply streams to stdout. ``/reset`` clears the
history, ``/exit`` (or end of input) quits. With ``--message`` one turn is answered and
the command exits. Works the same when stdin is a pipe::

    echo "What is the capital of France?" | edgellm chat MODEL
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgellm.cli._common import (
    add_command,
    add_load_args,
    add_sampling_args,
    load_model,
    result_dict,
    sampling_kwargs,
    stats_line,
    write_stream,
)

__all__ = ["add_parser", "run", "ChatSession"]

HELP_TEXT = "commands: /reset clears the history, /exit quits (or Ctrl-D)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chat``."""
    p = add_command(subparsers, "chat", "chat with a model (interactive, piped, or --message)",
                    __doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_load_args(p, model_help="converted model folder or .gguf file")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--message", metavar="TEXT", help="answer this one message and exit")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true",
                   help="print each reply as one JSON line (text, tokens, timings)")
    return p


class ChatSession:
    """The conversation state: system prompt plus alternating user/assistant turns."""

    def __init__(self, model: Any, system: str | None, sampling: dict[str, Any],
                 as_json: bool = False, verbose: bool = False) -> None:
        self.model = model
        self.system = system
        self.sampling = sampling
        self.as_json = as_json
        self.verbose = verbose
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn but the system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str) -> str:
        """Answer one user message, print the reply, remember both."""
        self.messages.append({"role": "user", "content": text})
        try:
            if self.as_json:
                result = self.model.chat(self.messages, **self.sampling)
                reply = result.text
                sys.stdout.write(json.dumps(result_dict(result), default=str) + "\n")
            else:
                reply = write_stream(self.model.chat(self.messages, stream=True, **self.sampling))
                sys.stdout.write("\n")
                result = getattr(self.model, "last_result", None)
            sys.stdout.flush()
        except BaseException:
            self.messages.pop()  # a failed turn is not part of the history
            raise
        self.messages.append({"role": "assistant", "content": reply})
        if self.verbose and result is not None:
            print(stats_line(result), file=sys.stderr)
        return reply


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline()
    return line if line else None


def _repl(session: ChatSession) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP_TEXT, file=sys.stderr)
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and text[1:].isalpha():
            print(f"unknown command {text!r}; {HELP_TEXT}", file=sys.stderr)
            continue
        try:
            session.turn(text)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(interrupted)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Load the model, then answer ``--message`` or every stdin line."""
    model = load_model(args)
    try:
        session = ChatSession(model, args.system, sampling_kwargs(args),
                              as_json=args.json, verbose=bool(args.verbose))
        if args.message is not None:
            session.turn(args.message)
            return 0
        return _repl(session)
    finally:
        model.close()
