"""The planner's predicted peak memory against the measured one, per backend and context.

    python benchmarks/bench_planner.py [--backends llamacpp,openvino,onnxruntime] [--contexts 512,1024,2048]

For each backend (SmolLM2 Q4_1 GGUF, OpenVINO int4 IR, ONNX int4 builder graph) and each
context, a fresh process loads the model with that ``n_ctx``, prefills a prompt of
``n_ctx - 8`` tokens (tests/data/long_text.txt), generates 4 tokens and reports its peak RSS
(``ru_maxrss``) beside what ``plan()`` predicted for the same backend and context on this
host. These are the figures the calibration notes of ``edgellm/devices/memory.py`` quote.
Writes the "Planner calibration" section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_kv import artifacts  # noqa: E402
from benchmarks.common import run_in_child, write_section  # noqa: E402


def peak_after_prefill(path: Path, backend: str, n_ctx: int) -> dict[str, Any]:
    """In a fresh process: peak RSS after a prompt filling ``n_ctx``, and the plan's prediction."""
    import edgellm
    from edgellm.devices.planner import host_profile, plan

    model = edgellm.load(path, backend=backend, device="cpu", n_ctx=n_ctx, threads=1)
    text = (ROOT / "tests" / "data" / "long_text.txt").read_text(encoding="utf-8") * 4
    ids = model.tokenize(text)[: n_ctx - 8]
    model.generate(ids, max_tokens=4, temperature=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kv = model.engine.kv_precision
    model.close()
    rows = plan(path, host_profile(), context=n_ctx, backends=[backend]).candidates
    predicted = next(c for c in rows if c.kv_precision == kv and c.predicted_peak_bytes)
    return {"measured": peak, "predicted": predicted.predicted_peak_bytes, "prompt": len(ids), "kv": kv}


def report(rows: list[dict[str, Any]]) -> str:
    from edgellm.profiling.machine import machine_info

    m = machine_info()
    lines = [
        "## Planner calibration (benchmarks/bench_planner.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['os']}, {m['python']}. SmolLM2-135M (llama.cpp Q4_1, OpenVINO "
        "int4, ONNX int4 builder graph), 1 thread, a fresh process per row: load at n_ctx, prefill "
        "n_ctx - 8 tokens, generate 4; peak RSS (`ru_maxrss`) against `plan()` for the same backend, "
        "context and KV precision.",
        "",
        "| backend | n_ctx | KV | predicted MiB | measured MiB | error |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        err = (r["predicted"] - r["measured"]) / r["measured"]
        lines.append(f"| {r['backend']} | {r['n_ctx']} | {r['kv']} | {r['predicted'] / 2**20:.0f} | "
                     f"{r['measured'] / 2**20:.0f} | {err:+.1%} |")
    return "\n".join(lines) + "\n"


ALL_BACKENDS = ("llamacpp", "openvino", "onnxruntime")
DEFAULT_CONTEXTS = "512,1024,2048"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS))
    ap.add_argument("--contexts", default=DEFAULT_CONTEXTS)
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    paths = artifacts(backends)
    rows = []
    for backend in backends:
        for n_ctx in (int(c) for c in args.contexts.split(",")):
            row = run_in_child("bench_planner", "peak_after_prefill", paths[backend], backend, n_ctx)
            rows.append({"backend": backend, "n_ctx": n_ctx, **row})
            print(rows[-1], file=sys.stderr, flush=True)
    section = report(rows)
    print(section)
    if set(backends) == set(ALL_BACKENDS) and args.contexts == DEFAULT_CONTEXTS:
        write_section("## Planner calibration", section)
    else:  # a partial run must not replace the whole section with its few rows
        print("(a subset of backends or contexts: BENCHMARKS.md left as it was)", file=sys.stderr)


if __name__ == "__main__":
    main()
