"""``edgellm verify ARTIFACT --reference HF_DIR|GGUF``: compare logits with transformers (or llama.cpp)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from edgellm.cli._common import add_command, print_json, read_prompts_file

__all__ = ["add_parser", "run", "format_parity"]

# (label, ParityReport.to_dict() key, format); see edgellm.converters.verify.
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("top-1 agreement", "top1_agreement", "{:.2%}"),
    ("max |logit diff|", "max_abs_logit_diff", "{:.4g}"),
    ("mean KL", "mean_kl", "{:.4g}"),
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``verify``."""
    p = add_command(subparsers, "verify", "measure a converted model's parity with its source",
                    "Run the artifact and transformers (or llama.cpp, for a .gguf reference) on the "
                    "same prompts and compare logits: "
                    "top-1 agreement, max absolute logit difference, mean KL divergence. "
                    "The result is recorded in the artifact's manifest.")
    p.add_argument("artifact", metavar="ARTIFACT", help="converted model folder or .gguf file")
    p.add_argument("--reference", required=True, metavar="HF_DIR|GGUF",
                   help="Hugging Face checkpoint folder (run by transformers) or .gguf file (run by "
                        "llama.cpp) to compare with")
    p.add_argument("--prompts-file", metavar="F", help="prompts, one per line")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def format_parity(report: Mapping[str, Any]) -> str:
    """The parity numbers, one per line (or why parity was not measured)."""
    if report.get("status") == "skipped":
        return f"{'parity':<18}not measured: {report.get('reason', 'no reason recorded')}"
    lines = []
    for label, key, fmt in _ROWS:
        value = report.get(key)
        lines.append(f"{label:<18}{fmt.format(value) if value is not None else 'n/a'}")
    if report.get("n_prompts") is not None and report.get("greedy_identical") is not None:
        lines.append(f"{'greedy identical':<18}{report['greedy_identical']}/{report['n_prompts']} "
                     f"prompts ({report.get('n_greedy_tokens', '?')} tokens each)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Verify and print the parity report."""
    import edgellm

    report = edgellm.verify(args.artifact, args.reference,
                            prompts=read_prompts_file(args.prompts_file))
    data = report.to_dict()
    if args.json:
        print_json(data)
    else:
        print(format_parity(data))
    return 0
