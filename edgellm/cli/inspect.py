"""``edgellm inspect PATH``: describe a model without loading it."""

from __future__ import annotations

import argparse
from typing import Any

from edgellm.cli._common import add_command, print_json

__all__ = ["add_parser", "run", "format_tree"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inspect``."""
    p = add_command(subparsers, "inspect", "describe a model (format, architecture, size, parity)",
                    "Describe a model folder, artifact or .gguf file without loading it.")
    p.add_argument("path", metavar="PATH", help="model folder or .gguf file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    return p


def format_tree(data: Any, indent: int = 0) -> list[str]:
    """Nested dicts as indented ``key: value`` lines."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines += format_tree(value, indent + 1)
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: {', '.join(map(str, value))}")
        else:
            lines.append(f"{pad}{key}: {value}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Print what :func:`edgellm.inspect` says about ``args.path``."""
    import edgellm

    data = edgellm.inspect(args.path)
    if args.json:
        print_json(data)
    else:
        print("\n".join(format_tree(data)))
    return 0
