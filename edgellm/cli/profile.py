"""``edgellm profile MODEL``: timings, a memory timeline and where the memory went, here."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgellm.cli._common import add_command, positive_int, print_json, thread_count

__all__ = ["add_parser", "run"]

_DESCRIPTION = """\
Load MODEL, prefill a prompt of exactly --prompt-tokens tokens and decode --gen-tokens greedily,
sampling this process's resident memory every 5 ms from a separate thread. Reports load time,
TTFT, prefill and decode speed, peak RSS, the phases on the memory timeline, KV evictions, and
the memory at the end by part (weights, KV, scratch, other) beside the planner's prediction.

  edgellm profile ./smollm2-q8.gguf
  edgellm profile ./smollm2-ov --kv-budget 4MiB --report ./profile-ov"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``profile``."""
    p = add_command(subparsers, "profile", "memory timeline, timings and breakdown of a model here",
                    _DESCRIPTION)
    p.add_argument("model", metavar="MODEL", help="converted model folder or .gguf file")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="N",
                   help="prompt length in tokens (default: 128)")
    p.add_argument("--gen-tokens", type=positive_int, default=128, metavar="M",
                   help="tokens to generate (default: 128)")
    p.add_argument("--kv-budget", metavar="BYTES",
                   help="KV cache budget, e.g. 8MiB; past it the cache slides (evictions are marked)")
    p.add_argument("--device", default="auto", help="cpu, gpu, npu or auto (default)")
    p.add_argument("--backend", help="backend name (default: the plan's)")
    p.add_argument("--threads", type=thread_count, default="auto",
                   help="CPU threads, or auto: the physical cores idle at load (default)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--report", metavar="DIR",
                   help="write profile.json, profile.md and memory.png into DIR")
    p.add_argument("--emulate", metavar="PROFILE",
                   help="run in a child pinned to the device profile's cores, stopped past its memory "
                        "budget (exit code 1 then); adds an upper-bound decode speed from its memory "
                        "bandwidth")
    return p


def run(args: argparse.Namespace) -> int:
    """Profile and print Markdown (or JSON); with --report, also write the folder."""
    from edgellm.profiling.profile import profile
    from edgellm.profiling.report import write_report

    if args.emulate:
        return _emulate(args)
    report = profile(args.model, args.prompt_tokens, args.gen_tokens, kv_budget=args.kv_budget,
                     device=args.device, backend=args.backend, threads=args.threads)
    if args.json:
        print_json(report.to_dict())
    else:
        sys.stdout.write(report.to_markdown())
    if args.report:
        files = write_report(report, args.report)
        print(f"wrote {', '.join(str(p) for p in files.paths.values())}", file=sys.stderr)
        if files.note:
            print(files.note, file=sys.stderr)
    return 0


def _emulate(args: argparse.Namespace) -> int:
    """``--emulate``: the verdict and estimate; with --report, the child's profile folder."""
    from edgellm.profiling.emulate import emulate
    from edgellm.profiling.profile import ProfileReport
    from edgellm.profiling.report import write_report

    result = emulate(args.model, args.emulate, args.prompt_tokens, args.gen_tokens,
                     kv_budget=args.kv_budget, backend=args.backend)
    if args.json:
        print_json(result.to_dict())
    else:
        sys.stdout.write(result.to_markdown())
    if args.report and result.profile is not None:
        files = write_report(ProfileReport.from_dict(result.profile), args.report)
        print(f"wrote {', '.join(str(p) for p in files.paths.values())}", file=sys.stderr)
    return 0 if result.oom is None else 1
