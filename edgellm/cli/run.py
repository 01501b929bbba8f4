"""``edgellm run MODEL PROMPT``: generate a completion, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgellm.cli._common import (
    add_command,
    add_load_args,
    add_sampling_args,
    load_model,
    print_json,
    result_dict,
    sampling_kwargs,
    stats_line,
    write_stream,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run``."""
    p = add_command(subparsers, "run", "complete a prompt (raw text, no chat template)",
                    "Generate a completion of PROMPT and stream it to stdout.\n\n"
                    "example:\n"
                    "  edgellm run ./smollm2-q8 'The capital of France is' --max-tokens 16")
    add_load_args(p, model_help="converted model folder or .gguf file")
    p.add_argument("prompt", metavar="PROMPT", help="the text to complete")
    add_sampling_args(p)
    p.add_argument("--no-stream", action="store_true", help="print the text when it is complete")
    p.add_argument("--json", action="store_true",
                   help="print text, token counts and timings as JSON (implies --no-stream)")
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model, generate, print."""
    sampling = sampling_kwargs(args)
    model = load_model(args)
    try:
        if args.json or args.no_stream:
            result = model.generate(args.prompt, **sampling)
            if args.json:
                print_json(result_dict(result))
                return 0
            sys.stdout.write(result.text)
        else:
            write_stream(model.stream(args.prompt, **sampling))
            result = model.last_result
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.verbose and result is not None:
            print(stats_line(result), file=sys.stderr)
    finally:
        model.close()
    return 0
