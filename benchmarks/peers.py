"""SmolLM2-135M through each edgellm backend and each peer, side by side, against the bandwidth roofline.

One run, on this machine: edgellm on llama.cpp (the packaged Q4_1 GGUF), OpenVINO (int4 IR) and
ONNX Runtime (int4 builder graph), against raw llama-cpp-python (same GGUF), optimum-intel and
openvino-genai (same IR), optimum ONNX Runtime (optimum's int4 export), onnxruntime-genai (its
own builder's int4 model, in its own venv: benchmarks/setup_ort_genai.sh) and transformers eager
(float32). Each runner is the one the per-format benchmarks use (bench_gguf, bench_openvino,
bench_onnx), each run a fresh process, runners interleaved, medians over ``--repeats``.

The machine's memory bandwidth is measured in the same run (numpy copy of 256 MiB on 2 threads
in a fresh process, read + written bytes, best of 5; before the runs and after each round);
each result's roofline is bandwidth / bytes read per token (the weight files, plus the KV cache
at the average context) and its share is measured decode / roofline. Writes the "Peers and the
bandwidth roofline" section of ``BENCHMARKS.md``.
Run: ``python benchmarks/peers.py [--repeats 3] [--tokens 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_onnx  # noqa: E402
from benchmarks.bench_gguf import update_benchmarks_md  # noqa: E402
from benchmarks.bench_kv import artifacts  # noqa: E402
from benchmarks.common import run_in_child  # noqa: E402

THREADS = 2  # what bench_openvino and bench_onnx use; bench_gguf takes it as an argument
N_CTX = 1024
PROMPT_TOKENS = 40  # about the shared PROMPT's length, for the KV part of bytes per token
WEIGHT_SUFFIXES = (".gguf", ".bin", ".onnx", ".data", ".safetensors")


def bandwidth_child(_root: Path, mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """Copy bandwidth of this machine on THREADS threads (numpy releases the GIL in copyto):
    bytes read + written / best time, GB/s. (``_root``: run_in_child passes a path first.)"""
    import threading

    import numpy as np

    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), THREADS + 1).astype(int)

    def copy() -> None:
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b]))
                   for a, b in zip(bounds, bounds[1:], strict=False)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t0)
    return {"copy_gbps": 2 * src.nbytes / best / 1e9}


def bench_transformers(path: Path, tokens: int) -> dict[str, float]:
    """transformers eager attention, float32, greedy (the reference the parity checks use)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_gguf import PROMPT
    from benchmarks.common import time_hf_generate

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    load_s = time.perf_counter() - t0
    ids = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT).ids])
    with torch.inference_mode():
        ttft_ms, decode_tps = time_hf_generate(model, ids, tokens)
    return {"decode_tps": decode_tps, "ttft_ms": ttft_ms, "load_s": load_s}


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files of a model file or folder (what decoding reads per token)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))


def _models() -> dict[str, Path]:
    """Every model the runners read; converted into the bench cache on first use."""
    from tests.fixtures.smollm2 import smollm2_hf_dir

    found = artifacts(["llamacpp", "openvino", "onnxruntime"])
    optimum = found["onnxruntime"].parent / "smollm2-onnx-int4-optimum"
    if not (optimum / "edgellm.json").is_file():
        run_in_child("bench_onnx", "convert_child", smollm2_hf_dir(), str(optimum), "int4", "optimum")
    return {"gguf": found["llamacpp"], "ir": found["openvino"], "onnx": found["onnxruntime"],
            "onnx_optimum": optimum, "genai": bench_onnx.GENAI_MODELS / "int4", "hf": smollm2_hf_dir()}


Runner = tuple[str, Callable[[], dict]]  # (model key, one fresh-process run)


def _runners(models: dict[str, Path], tokens: int, ov_cache: str) -> dict[str, Runner]:
    """Label -> (model key, one fresh-process run). Peers that are not installed are left out."""
    from benchmarks.bench_openvino import _genai_available

    ir_manifest = json.loads((models["ir"] / "edgellm.json").read_text())
    runners: dict[str, Runner] = {
        "edgellm llama.cpp Q4_1": ("gguf", lambda: run_in_child(
            "bench_gguf", "bench_edgellm", models["gguf"], tokens, THREADS, N_CTX)),
        "llama-cpp-python Q4_1": ("gguf", lambda: run_in_child(
            "bench_gguf", "bench_raw", models["gguf"], tokens, THREADS, N_CTX)),
        "edgellm OpenVINO int4": ("ir", lambda: run_in_child(
            "bench_openvino", "bench_edgellm", models["ir"], tokens, ov_cache)),
        "optimum-intel int4": ("ir", lambda: run_in_child(
            "bench_openvino", "bench_optimum", models["ir"], tokens, ov_cache)),
        "edgellm ONNX Runtime int4 (builder)": ("onnx", lambda: run_in_child(
            "bench_onnx", "bench_edgellm", models["onnx"], tokens)),
        "optimum ONNX Runtime int4": ("onnx_optimum", lambda: run_in_child(
            "bench_onnx", "bench_optimum", models["onnx_optimum"], tokens)),
        "transformers eager fp32": ("hf", lambda: run_in_child(
            "peers", "bench_transformers", models["hf"], tokens)),
    }
    LEFT_OUT.clear()
    ov_genai, ort_genai = _genai_available(ir_manifest), bench_onnx._genai_note()
    if ov_genai is None:
        runners["openvino-genai int4"] = ("ir", lambda: run_in_child(
            "bench_openvino", "bench_genai", models["ir"], tokens, ov_cache))
    else:
        LEFT_OUT["openvino-genai"] = ov_genai
    if ort_genai is None:
        runners["onnxruntime-genai int4"] = ("genai", lambda: bench_onnx._genai(models["genai"], tokens))
    else:
        LEFT_OUT["onnxruntime-genai"] = ort_genai
    return runners


#: Peers the last _runners() call left out, and why (the report says so).
LEFT_OUT: dict[str, str] = {}


def _kv_bytes(key: str, tokens: int) -> int:
    """KV read per token at the average context: 30 layers x 3 KV heads x 64 x K and V."""
    per_elem = 2 if key in ("gguf", "ir") else 4  # f16 caches; ONNX graphs and torch keep f32
    return 2 * 30 * 3 * 64 * per_elem * (PROMPT_TOKENS + tokens // 2)


def measure(repeats: int, tokens: int) -> dict[str, Any]:
    import tempfile

    models = _models()
    ov_cache = tempfile.mkdtemp(prefix="peers-ov-cache-")
    runners = _runners(models, tokens, ov_cache)
    for _label, (_key, run) in runners.items():  # compile caches, page cache: not measured
        run()
    runs: dict[str, list[dict]] = {label: [] for label in runners}
    bandwidth = [run_in_child("peers", "bandwidth_child", ROOT)["copy_gbps"]]
    for r in range(repeats):
        for label, (_key, run) in runners.items():
            runs[label].append(run())
            print(f"  r{r} {label}: {runs[label][-1]['decode_tps']:.1f} tok/s", flush=True)
        bandwidth.append(run_in_child("peers", "bandwidth_child", ROOT)["copy_gbps"])
    bw = statistics.median(bandwidth) * 1e9
    rows = {}
    for label, (key, _run) in runners.items():
        read = weight_bytes(models[key]) + _kv_bytes(key, tokens)
        med = {m: statistics.median(x[m] for x in runs[label]) for m in ("decode_tps", "ttft_ms")}
        rows[label] = {**med, "bytes_per_token": read, "roofline_tps": bw / read,
                       "share": med["decode_tps"] / (bw / read)}
    return {"rows": rows, "bandwidth_gbps": bw / 1e9, "bandwidth_runs": bandwidth}


def report(result: dict[str, Any], repeats: int, tokens: int, load: tuple[float, float]) -> str:
    from edgellm.profiling import machine_info

    m = machine_info()
    lines = [
        "## Peers and the bandwidth roofline (benchmarks/peers.py)", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['total_ram_bytes'] / 2**30:.0f} GiB, {m['os']}; 1-minute load "
        f"average {load[0]:.2f} before, {load[1]:.2f} after (the machine is shared with other work). "
        f"SmolLM2-135M-Instruct, greedy, {tokens} new tokens, {THREADS} threads; one unmeasured run "
        f"per runner first, then {repeats} interleaved fresh-process runs, medians.", "",
        f"Memory bandwidth measured in the same run: **{result['bandwidth_gbps']:.1f} GB/s** (numpy copy "
        f"of 256 MiB on {THREADS} threads, read + written bytes, best of 5; median over the run of "
        f"{', '.join(f'{b:.1f}' for b in result['bandwidth_runs'])}). Roofline = bandwidth / bytes read "
        f"per token (weight files + KV at the average context); share = decode / roofline.", "",
        "| runtime | decode tok/s | TTFT ms | MiB read / token | roofline tok/s | share of roofline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in sorted(result["rows"].items(), key=lambda kv: -kv[1]["decode_tps"]):
        lines.append(f"| {label} | {r['decode_tps']:.1f} | {r['ttft_ms']:.0f} | "
                     f"{r['bytes_per_token'] / 2**20:.1f} | {r['roofline_tps']:.0f} | {r['share']:.2f} |")
    lines += ["", *(f"Left out: {name}: {why}." for name, why in LEFT_OUT.items())]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    os.environ.pop("EDGELLM_THREADS", None)
    before = os.getloadavg()[0]
    result = measure(args.repeats, args.tokens)
    section = report(result, args.repeats, args.tokens, (before, os.getloadavg()[0]))
    update_benchmarks_md(section)
    print(section)


if __name__ == "__main__":
    main()
