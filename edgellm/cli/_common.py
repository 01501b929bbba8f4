"""Helpers shared by the subcommands: common flags, model loading, output formatting."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgellm.model import Model

__all__ = [
    "GLOBAL_FLAGS",
    "add_command",
    "positive_int",
    "non_negative_int",
    "thread_count",
    "add_load_args",
    "add_sampling_args",
    "load_model",
    "sampling_kwargs",
    "print_json",
    "write_stream",
    "format_bytes",
    "read_prompts_file",
    "result_dict",
    "stats_line",
]


def _global_flags(suppress: bool) -> argparse.ArgumentParser:
    """Flags accepted before or after the command. Sub-parsers use SUPPRESS defaults so
    a flag given before the command is not reset by the sub-parser."""
    parser = argparse.ArgumentParser(add_help=False)
    default_false: Any = argparse.SUPPRESS if suppress else False
    default_zero: Any = argparse.SUPPRESS if suppress else 0
    parser.add_argument("--debug", action="store_true", default=default_false,
                        help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="count", default=default_zero,
                        help="log progress (INFO); twice for DEBUG")
    return parser


GLOBAL_FLAGS = _global_flags(suppress=False)
_SUB_FLAGS = _global_flags(suppress=True)


def add_command(subparsers: Any, name: str, help: str, description: str | None = None
                ) -> argparse.ArgumentParser:
    """Add a sub-command parser that also accepts the global flags."""
    return subparsers.add_parser(
        name, help=help, description=description or help, parents=[_SUB_FLAGS],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def thread_count(text: str) -> int | str:
    """argparse type: a positive integer or "auto"."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def add_load_args(parser: argparse.ArgumentParser, model_help: str | None = None) -> None:
    """MODEL plus --backend/--device/--n-ctx/--threads and the KV cache flags."""
    if model_help is not None:
        parser.add_argument("model", metavar="MODEL", help=model_help)
    parser.add_argument("--backend", help="backend name (default: the first installed one "
                                          "that reads the model's format)")
    parser.add_argument("--device", default="auto",
                        help="cpu, gpu, npu, or auto: what `edgellm plan` chooses for this host (default)")
    parser.add_argument("--n-ctx", type=positive_int, help="context size in tokens")
    parser.add_argument("--threads", type=thread_count, default="auto",
                        help="CPU threads, or auto: the physical cores idle at load (default)")
    kv = parser.add_argument_group("KV cache")
    kv.add_argument("--kv-budget", metavar="BYTES",
                    help="KV cache bytes for every session together, e.g. 96MiB or 1.5GB")
    kv.add_argument("--kv-precision", metavar="P",
                    help="KV precision: llama.cpp f16/q8_0/q4_0/f32, OpenVINO f16/u8/f32, ONNX the graph's")
    kv.add_argument("--kv-overflow", choices=("error", "sliding", "truncate"),
                    help="when the cache is full: refuse (default), slide (keep the first "
                         "--kv-sinks tokens and the newest), or drop the oldest chat turns")
    kv.add_argument("--kv-sinks", type=non_negative_int, help="tokens kept at the start when sliding (4)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-tokens/--temperature/--top-k/--top-p/--min-p/--repeat-penalty/--seed/--stop."""
    parser.add_argument("--max-tokens", type=positive_int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--min-p", type=float,
                        help="drop tokens below min-p times the best one's probability")
    parser.add_argument("--repeat-penalty", type=float, help="penalise recent tokens (1.0: off)")
    parser.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    parser.add_argument("--stop", action="append", metavar="TEXT",
                        help="stop when TEXT is generated (repeatable)")


def load_model(args: argparse.Namespace, path: Any = None) -> Model:
    """``edgellm.load`` with the load flags of ``args``."""
    from edgellm.api import load

    kwargs: dict[str, Any] = {"backend": args.backend, "device": args.device,
                              "n_ctx": args.n_ctx, "threads": args.threads}
    for name in ("kv_budget", "kv_precision", "kv_overflow", "kv_sinks"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "seed", None) is not None:
        kwargs["seed"] = args.seed
    return load(args.model if path is None else path, **kwargs)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave (unset ones keep the library defaults)."""
    names = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed",
             "stop")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def print_json(data: Any) -> None:
    """Machine output: indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def write_stream(chunks: Iterable[str]) -> str:
    """Write text chunks to stdout as they arrive; return the whole text."""
    parts = []
    for chunk in chunks:
        parts.append(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return "".join(parts)


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def read_prompts_file(path: str | None) -> list[str] | None:
    """One prompt per non-blank line of ``path`` (UTF-8), or None when no file is given."""
    if path is None:
        return None
    from edgellm.errors import InvalidInputError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read prompts file {path!r}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError(f"prompts file {path!r} has no prompts; write one per line")
    return prompts


def result_dict(result: Any) -> dict[str, Any]:
    """A generation Result as JSON-ready data."""
    if hasattr(result, "to_dict"):
        return dict(result.to_dict())
    timings = getattr(result, "timings", None)
    return {
        "text": result.text,
        "finish_reason": getattr(result, "finish_reason", None),
        "prompt_tokens": getattr(result, "prompt_tokens", None),
        "completion_tokens": getattr(result, "completion_tokens", None),
        "timings": timings.to_dict() if timings is not None else None,
    }


def stats_line(result: Any) -> str:
    """'12 prompt + 40 completion tokens, TTFT 35 ms, decode 80.1 tok/s' for stderr."""
    t = getattr(result, "timings", None)
    if t is None:
        return ""
    return (f"[{t.prompt_tokens} prompt + {t.completion_tokens} completion tokens, "
            f"TTFT {t.ttft_ms:.0f} ms, prefill {t.prefill_tps:.1f} tok/s, "
            f"decode {t.decode_tps:.1f} tok/s, finish: {result.finish_reason}]")
