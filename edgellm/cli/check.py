"""``edgellm check MODEL``: open an untrusted model once in a child process, safely."""

from __future__ import annotations

import argparse
from typing import Any

from edgellm.cli._common import add_command, print_json

__all__ = ["add_parser", "run"]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``check``."""
    p = add_command(subparsers, "check", "open a model once in a child process (for untrusted files)",
                    "Inspect, load and generate one token from MODEL in a child process with a "
                    "timeout. A native crash or hang there is reported as one error line naming "
                    "the file and the signal; this process never loads the file. Files that passed "
                    "are recorded by content hash, so a re-check of the same bytes is instant.")
    p.add_argument("model", metavar="MODEL", help="converted model folder or .gguf file")
    p.add_argument("--backend", help="backend name (default: the first that reads the format)")
    p.add_argument("--device", default="cpu", help="device to open it on (default: cpu)")
    p.add_argument("--timeout", type=_seconds, default=120.0, metavar="S",
                   help="seconds before the child counts as hung (default: 120)")
    p.add_argument("--no-record", action="store_true", help="check again even if these bytes passed before")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Check ``args.model``; errors (crash, hang, bad file) propagate as one edgellm error line."""
    from edgellm.isolate import check_model

    result = check_model(args.model, backend=args.backend, device=args.device, timeout_s=args.timeout,
                         use_record=not args.no_record)
    if args.json:
        print_json({"model": args.model, "status": result.status, "message": result.message,
                    "seconds": round(result.seconds, 2)})
    else:
        took = f" ({result.seconds:.1f} s)" if result.seconds else ""
        print(f"ok: {args.model}: {result.message}{took}")
    return 0
