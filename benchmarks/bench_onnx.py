"""edgellm's ONNX Runtime backend vs its peers on SmolLM2 fp32 and int4, side by side in one run.

* edgellm ``Model.generate`` (shared loop, I/O-bound KV buffers) on the folders edgellm
  converted, vs optimum's ``ORTModelForCausalLM.generate`` on the *same* folders;
* onnxruntime-genai (C++ loop) on the models its own builder made, when its separate venv
  exists (``bash benchmarks/setup_ort_genai.sh HF_DIR``: its builder needs transformers 5);
  its int4 is symmetric RTN with lm_head and embedding in int4 too, so its file is smaller
  than edgellm's: the table gives sizes beside speeds.

Greedy, a fixed number of new tokens, 2 threads, CPU; every run in a fresh process, runs
interleaved, medians; ratios edgellm / peer. Writes the "ONNX" section of ``BENCHMARKS.md``.
Run: ``python benchmarks/bench_onnx.py [--repeats 5] [--tokens 128]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ("Write a detailed story about a lighthouse keeper who discovers a message in a bottle. "
          "Describe the sea, the weather and the keeper's thoughts.")
GENAI_PYTHON = Path(os.environ.get("ORT_GENAI_VENV", "/work/venvs/ort-genai")) / "bin" / "python"
GENAI_MODELS = Path(os.environ.get("ORT_GENAI_MODELS", "/work/venvs/ort-genai-models"))
THREADS = 2


def bench_edgellm(path: Path, tokens: int) -> dict[str, float]:
    import edgellm

    t0 = time.perf_counter()
    model = edgellm.load(path, backend="onnxruntime", n_ctx=1024, threads=THREADS)
    load_s = time.perf_counter() - t0
    model.generate(PROMPT, max_tokens=8, temperature=0)  # warm-up
    model.reset()
    r = model.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    model.close()
    t = r.timings
    return {"decode_tps": t.decode_tps, "ttft_ms": t.ttft_ms, "load_s": load_s}


def bench_optimum(path: Path, tokens: int) -> dict[str, float]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from tokenizers import Tokenizer

    from benchmarks.common import time_hf_generate

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, session_options=options)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT).ids])
    ttft_ms, decode_tps = time_hf_generate(model, ids, tokens)
    return {"decode_tps": decode_tps, "ttft_ms": ttft_ms, "load_s": load_s}


def _child(kind: str, path: Path, tokens: int) -> dict[str, float]:
    from benchmarks.common import run_in_child, run_json

    if kind == "genai":
        return run_json([str(GENAI_PYTHON), str(ROOT / "benchmarks" / "ort_genai_peer.py"), str(path),
                         "--prompt", PROMPT, "--tokens", str(tokens), "--threads", str(THREADS)])
    return run_in_child("bench_onnx", f"bench_{kind}", path, tokens)


def _genai_note() -> str | None:
    if not GENAI_PYTHON.is_file():
        return (f"no venv at {GENAI_PYTHON.parent.parent}; create it with "
                "`bash benchmarks/setup_ort_genai.sh HF_DIR` (its builder needs transformers 5)")
    missing = [q for q in ("fp32", "int4") if not (GENAI_MODELS / q / "genai_config.json").is_file()]
    return f"models {missing} not built under {GENAI_MODELS}" if missing else None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import edgellm
    from benchmarks.bench_gguf import update_benchmarks_md
    from edgellm.profiling.machine import machine_info
    from tests.fixtures.smollm2 import smollm2_hf_dir

    note = _genai_note()
    kinds = ["edgellm", "optimum"] + (["genai"] if note is None else [])
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    med: dict[str, dict[str, dict[str, float]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    try:
        for quant in ("fp32", "int4"):
            ours = edgellm.convert(smollm2_hf_dir(), work / quant, format="onnx", quant=quant,
                                   verify=False).path
            paths = {"edgellm": ours, "optimum": ours, "genai": GENAI_MODELS / quant}
            sizes[quant] = {k: _size(paths[k]) for k in kinds}
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
            for _ in range(args.repeats):
                for kind in kinds:
                    runs[kind].append(_child(kind, paths[kind], args.tokens))
            metrics = ("decode_tps", "ttft_ms", "load_s")
            med[quant] = {k: {m: statistics.median(r[m] for r in v) for m in metrics}
                          for k, v in runs.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = machine_info()
    lines = [
        "## ONNX (benchmarks/bench_onnx.py)", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['total_ram_bytes'] / 2**30:.0f} GiB; onnxruntime "
        f"{m['packages'].get('onnxruntime', '?')}. SmolLM2-135M-Instruct; greedy, {args.tokens} new "
        f"tokens, {THREADS} threads, CPU; median of {args.repeats} interleaved runs, each in a fresh "
        "process. edgellm and optimum run the same folder converted by edgellm (int4: MatMulNBits "
        "block 32, asymmetric, accuracy level 4); onnxruntime-genai runs its builder's models.", "",
        "| model | runtime | size MiB | decode tok/s | TTFT ms | load s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    labels = {"edgellm": "edgellm (onnxruntime backend)", "optimum": "optimum ORTModelForCausalLM",
              "genai": "onnxruntime-genai"}
    for quant, by_kind in med.items():
        for kind, r in by_kind.items():
            lines.append(f"| {quant} | {labels[kind]} | {sizes[quant][kind] / 2**20:.0f} | "
                         f"{r['decode_tps']:.1f} | {r['ttft_ms']:.0f} | {r['load_s']:.2f} |")
    lines.append("")
    for quant, by_kind in med.items():
        ours = by_kind["edgellm"]["decode_tps"]
        ratios = [f"{ours / by_kind[k]['decode_tps']:.3f} vs {labels[k]}" for k in by_kind if k != "edgellm"]
        lines.append(f"**{quant} decode ratio edgellm / peer: {'; '.join(ratios)}** "
                     "(target vs optimum >= 1.0).")
    if note:
        lines.append(f"onnxruntime-genai: not measured ({note}).")
    lines.append("")
    section = "\n".join(lines)
    update_benchmarks_md(section)
    print(section)


if __name__ == "__main__":
    main()
