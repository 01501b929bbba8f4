"""Pieces the benchmark scripts share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` in a fresh process (``env``: variables added to ours); its last stdout line is
    a JSON object of measurements."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, **env} if env else None)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_in_child(module: str, func: str, path: Path, *args: Any) -> dict[str, float]:
    """``benchmarks.<module>.<func>(Path(path), *args)`` in a fresh Python process (clean RSS,
    cold imports), returning the dict it prints."""
    call = ", ".join([f"Path({str(path)!r})", *map(repr, args)])
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from benchmarks.{module} import {func}; print(json.dumps({func}({call})))")
    return run_json([sys.executable, "-c", code])


def time_hf_generate(model: Any, ids: Any, tokens: int) -> tuple[float, float]:
    """(TTFT in ms, decode tokens/s) of a transformers-style ``generate`` (optimum's models).

    Greedy; a warm-up first; TTFT is a one-token generate, decode the remaining tokens of an
    exactly-``tokens`` generate (EOS cannot stop it).
    """
    import torch

    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # warm-up
    t1 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    total = time.perf_counter() - t2
    return ttft * 1e3, (tokens - 1) / (total - ttft)


def write_section(head: str, section: str) -> None:
    """Replace the ``head`` section of BENCHMARKS.md with ``section`` (append it when absent)."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def conversion_stats(t0: float, art: Any) -> dict[str, Any]:
    """What a conversion benchmark child reports once ``art`` is written (started at ``t0``):
    wall time, this process's peak RSS, whether torch was imported, size, largest source tensor."""
    import resource

    largest = art.manifest.get("builder", {}).get("largest_source_tensor_bytes", 0)
    return {"wall_s": time.perf_counter() - t0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_imported": "torch" in sys.modules, "size_mib": art.size_bytes / 2**20,
            "largest_tensor_mib": largest / 2**20}
