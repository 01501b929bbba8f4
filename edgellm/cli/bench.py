"""``edgellm bench MODEL``: load time, TTFT, prefill/decode speed and peak RSS on this host."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgellm.cli._common import add_command, non_negative_int, positive_int, print_json, thread_count

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench``."""
    p = add_command(subparsers, "bench", "measure speed and peak memory of a model here",
                    "Load MODEL, generate greedily from a fixed prompt WARMUP + REPEATS times, "
                    "and report medians of TTFT, prefill and decode speed, plus load time "
                    "and peak RSS.")
    p.add_argument("model", metavar="MODEL", help="converted model folder or .gguf file")
    p.add_argument("--prompt", help="prompt to complete (default: a fixed paragraph request)")
    p.add_argument("--max-tokens", type=positive_int, default=128,
                   help="tokens per run (default: 128)")
    p.add_argument("--repeats", type=positive_int, default=3, help="measured runs (default: 3)")
    p.add_argument("--warmup", type=non_negative_int, default=1,
                   help="unmeasured runs first (default: 1)")
    p.add_argument("--backend", help="backend name (default: the first that fits)")
    p.add_argument("--threads", type=thread_count, default="auto",
                   help="CPU threads, or auto: the physical cores idle at load (default)")
    p.add_argument("--n-ctx", type=positive_int, help="context size in tokens")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--matrix", action="store_true",
                   help="MODEL is a HF checkpoint: convert it to GGUF Q8_0/Q4_K_M, OpenVINO int8/int4 and "
                        "ONNX int8/int4, benchmark each on every installed backend (fresh processes), and "
                        "keep the results for this host (plans here then prefer the fastest)")
    return p


def run(args: argparse.Namespace) -> int:
    """Benchmark and print Markdown (or JSON)."""
    from edgellm.profiling.bench import DEFAULT_PROMPT, bench

    if args.matrix:
        return _matrix(args)
    if sys.stderr.isatty() and not args.json:
        print(f"benchmarking {args.model}: {args.warmup} warmup + {args.repeats} runs "
              f"of {args.max_tokens} tokens...", file=sys.stderr)
    report = bench(args.model, prompt=args.prompt or DEFAULT_PROMPT, max_tokens=args.max_tokens,
                   repeats=args.repeats, warmup=args.warmup, backend=args.backend,
                   threads=args.threads, n_ctx=args.n_ctx)
    if args.json:
        print_json(report.to_dict())
    else:
        sys.stdout.write(report.to_markdown())
    return 0


def _matrix(args: argparse.Namespace) -> int:
    """``--matrix``: the table (Markdown, or JSON), also written beside the converted artifacts."""
    from edgellm.profiling.matrix import bench_matrix

    def progress(msg: str) -> None:
        if sys.stderr.isatty():
            print(f"matrix: {msg}...", file=sys.stderr)

    report = bench_matrix(args.model, prompt=args.prompt, max_tokens=args.max_tokens,
                          repeats=args.repeats, progress=progress)
    print(f"wrote {report.folder}/matrix.md and matrix.json; kept for this host in {report.store}",
          file=sys.stderr)
    if args.json:
        print_json(report.to_dict())
    else:
        sys.stdout.write(report.to_markdown())
    return 0 if all("error" not in r for r in report.rows) else 1
