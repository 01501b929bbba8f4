"""``edgellm plan MODEL --device PROFILE [--context N] [--json]``: what fits a device, and why."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from edgellm.cli._common import add_command, format_bytes, print_json

if TYPE_CHECKING:
    from edgellm.devices.planner import Candidate, Plan

__all__ = ["add_parser", "run", "plan_lines"]

_DESCRIPTION = """\
Plan MODEL (a Hugging Face checkpoint folder, a .gguf file, a converted model folder or a
ModelSpec .json file) for a device profile without loading anything: weight bytes per format
and quantization, KV bytes per token, runtime overhead, the largest context that fits the
budget, the chosen format, quantization, backend and device, and every rejected alternative
with its reason.

  edgellm plan ./SmolLM2-135M-Instruct --device raspberry-pi-5-8gb
  edgellm plan ./smollm2-q8 --device this-host --context 2048 --json
  edgellm plan ./smollm2-q8 --device raspberry-pi-5-4gb --kv-budget 96MiB"""

_COLUMNS = ("BACKEND", "FORMAT", "QUANT", "KV", "WEIGHTS", "PEAK", "MAX CTX", "STATUS", "REASON")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan``."""
    p = add_command(subparsers, "plan", "will a model fit a device, and on which backend", _DESCRIPTION)
    p.add_argument("model", metavar="MODEL", help="HF checkpoint folder, .gguf file, converted model "
                                                  "folder or ModelSpec .json file")
    p.add_argument("--device", default="this-host", metavar="PROFILE",
                   help="device profile name or .toml file (default: this-host, i.e. detected)")
    p.add_argument("--context", type=int, metavar="N",
                   help="context to fit in tokens (default: min(4096, the model's positions))")
    p.add_argument("--kv-budget", metavar="BYTES",
                   help="KV cache bytes for every session together, e.g. 96MiB or 1.5GB (a session's "
                        "context is what it holds when --context is not given)")
    p.add_argument("--kv-precision", metavar="P",
                   help="only options with this KV precision (f16, q8_0, u8, ...)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _row(c: Candidate) -> tuple[str, ...]:
    peak = format_bytes(c.predicted_peak_bytes) if c.predicted_peak_bytes is not None else "-"
    weights = format_bytes(c.weight_bytes) if c.weight_bytes is not None else "-"
    return (f"{c.backend}:{c.device}", c.format, c.quantization or "-", c.kv_precision or "-", weights, peak,
            str(c.max_context) if c.max_context is not None else "-", c.status, c.reason)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    return ["  ".join([*(r[i].ljust(w) for i, w in enumerate(widths)), r[-1]]).rstrip() for r in rows]


def plan_lines(p: Plan) -> list[str]:
    """The plan for reading: model, device, KV table, choice, then every candidate."""
    info = p.to_dict()
    spec = info["model"]["spec"]
    lines = [f"model: {p.model.path or spec['architecture']} ({spec['architecture']}, "
             f"{info['model']['n_params'] / 1e6:.1f}M parameters, {spec['max_positions']} positions)",
             f"device: {p.profile}, budget {format_bytes(p.budget_bytes)}",
             "KV bytes per token: " + ", ".join(f"{k} {v}" for k, v in info["kv_bytes_per_token"].items())]
    if info["sliding_window"]:
        lines.append(f"sliding window: {info['sliding_window']}")
    c = p.choice
    if c is not None:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in c.breakdown.items())
        lines += [f"choice: {c.label} at {c.context} tokens: predicted peak "
                  f"{format_bytes(c.predicted_peak_bytes)} ({parts}); fits up to {c.max_context} tokens"]
    return [*lines, "", *_table([_COLUMNS, *(_row(x) for x in p.candidates)])]


def _show(p: Plan, as_json: bool) -> None:
    if as_json:
        print_json(p.to_dict())
    else:
        print("\n".join(plan_lines(p)))


def run(args: argparse.Namespace) -> int:
    """Plan and print; when nothing fits, print what was tried, then fail with the reason."""
    from edgellm.devices.planner import plan
    from edgellm.errors import NoCompatibleRuntimeError

    try:
        result = plan(args.model, args.device, args.context, kv_budget=args.kv_budget,
                      kv_precision=args.kv_precision)
    except NoCompatibleRuntimeError as exc:
        partial = getattr(exc, "plan", None)
        if partial is not None:
            _show(partial, args.json)
        raise
    _show(result, args.json)
    return 0
