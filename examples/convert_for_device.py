"""Convert a model for a named device: print the plan, convert as it says, print the verify report.

    python examples/convert_for_device.py SOURCE DEVICE OUT [--kv-budget 64MiB]
    python examples/convert_for_device.py ./SmolLM2-135M-Instruct raspberry-pi-5-4gb ./for-pi

SOURCE is a Hugging Face checkpoint folder or a .gguf file; DEVICE a profile name from
`edgellm devices list` (or a TOML file). The plan picks format, quantization, backend and
context for that device's memory; the conversion verifies the result against SOURCE
(top-1 agreement, logit error, KL, greedy tokens) and records it in OUT/edgellm.json.
Needs `pip install "torch==2.13.0" "edgellm[llama,convert]"` (plus the extra of the format
the plan picks: convert-openvino or convert-onnx).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import edgellm
from edgellm.devices import plan
from edgellm.kvcache import format_bytes


def print_plan(chosen: Any) -> None:
    """The candidates the planner weighed, the chosen one first."""
    print(f"plan for {chosen.profile}: budget {format_bytes(chosen.budget_bytes)}")
    print(f"  {'':2}{'candidate':44} {'context':>8} {'peak':>11}  status")
    for c in chosen.candidates:
        mark = "->" if c is chosen.choice else ""
        peak = format_bytes(c.predicted_peak_bytes)
        print(f"  {mark:2}{c.label:44} {c.context or 0:8d} {peak:>11}  {c.status}")


def print_report(artifact: Any) -> None:
    """The parity the conversion measured against its source."""
    m = artifact.manifest
    p = m.get("parity", {})
    print(f"converted: {m.get('format')} {m.get('quantization')} at {artifact.path}")
    if p.get("status") != "measured":
        print(f"verify: not measured ({p.get('reason', 'no reason recorded')})")
        return
    print(f"verify ({p.get('backend')}, {p['n_prompts']} prompts): top-1 {p['top1_agreement']:.3f}, "
          f"max |dlogit| {p['max_abs_logit_diff']:.3g}, mean KL {p['mean_kl']:.2e}, "
          f"greedy identical {p['greedy_identical']}/{p['n_prompts']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("device")
    parser.add_argument("out")
    parser.add_argument("--kv-budget", help="plan the KV cache within this many bytes, e.g. 64MiB")
    args = parser.parse_args()
    try:
        chosen = plan(args.source, args.device, kv_budget=args.kv_budget)
        print_plan(chosen)
        if chosen.choice is None:
            print(f"convert_for_device: nothing fits {args.device}; see the reasons above", file=sys.stderr)
            return 2
        artifact = edgellm.convert(args.source, args.out, device=args.device)
    except edgellm.EdgeLLMError as exc:
        print(f"convert_for_device: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print_report(artifact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
