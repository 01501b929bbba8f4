"""Convert a Hugging Face checkpoint to several GGUF types and compare their parity and size.

    python examples/convert_and_verify.py HF_DIR OUT_DIR [Q8_0 Q4_K_M ...]

Needs `pip install "torch==2.13.0" "edgellm[llama,convert]"` (transformers is the reference).
"""

from __future__ import annotations

import sys
from pathlib import Path

import edgellm


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    quants = sys.argv[3:] or ["F16", "Q8_0", "Q4_K_M"]
    print(f"{'quant':8} {'MiB':>8} {'top-1':>7} {'KL':>9} {'greedy':>7}")
    for quant in quants:
        try:
            artifact = edgellm.convert(src, out / quant, quant=quant, force=True)
        except edgellm.EdgeLLMError as exc:
            print(f"{quant:8} failed: {exc}", file=sys.stderr)
            continue
        p = artifact.manifest["parity"]
        size = artifact.model_file.stat().st_size / 2**20
        if p.get("status") != "measured":
            print(f"{quant:8} {size:8.1f}  parity skipped: {p.get('reason')}")
            continue
        print(f"{quant:8} {size:8.1f} {p['top1_agreement']:7.3f} {p['mean_kl']:9.2e} "
              f"{p['greedy_identical']}/{p['n_prompts']:<5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
