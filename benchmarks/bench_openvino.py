"""edgellm's OpenVINO backend vs optimum-intel on SmolLM2 int4, side by side in one run.

* decode tokens/s, greedy, fixed token count: edgellm ``Model.generate`` (shared loop over the
  compiled stateful IR) vs optimum-intel ``OVModelForCausalLM.generate`` on the *same* IR
  folder; runs interleaved, each in a fresh process, medians; ratio edgellm / optimum;
* load time: first load (empty compiled-model cache) and cached load (second process).

openvino-genai's ``LLMPipeline`` needs OpenVINO tokenizer models, which openvino-tokenizers
cannot build for this model's detokenizer (DESIGN.md): it is not measured here.

Writes the "OpenVINO" section of ``BENCHMARKS.md``.
Run: ``python benchmarks/bench_openvino.py [--repeats 5] [--tokens 128]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ("Write a detailed story about a lighthouse keeper who discovers a message in a bottle. "
          "Describe the sea, the weather and the keeper's thoughts.")


def bench_edgellm(path: Path, tokens: int, cache_dir: str) -> dict[str, float]:
    import edgellm

    t0 = time.perf_counter()
    model = edgellm.load(path, backend="openvino", n_ctx=1024, threads=2, cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    model.generate(PROMPT, max_tokens=8, temperature=0)  # warm-up
    model.reset()
    r = model.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    model.close()
    t = r.timings
    return {"decode_tps": t.decode_tps, "ttft_ms": t.ttft_ms, "load_s": load_s}


def bench_optimum(path: Path, tokens: int, cache_dir: str) -> dict[str, float]:
    import torch
    from optimum.intel import OVModelForCausalLM
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    model = OVModelForCausalLM.from_pretrained(
        path, ov_config={"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2, "CACHE_DIR": cache_dir})
    load_s = time.perf_counter() - t0
    ids = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT).ids])
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # warm-up
    t1 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    total = time.perf_counter() - t2
    return {"decode_tps": (tokens - 1) / (total - ttft), "ttft_ms": ttft * 1e3, "load_s": load_s}


def _child(kind: str, path: Path, tokens: int, cache_dir: str) -> dict[str, float]:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
            f"from benchmarks.bench_openvino import bench_{kind}; from pathlib import Path; "
            f"print(json.dumps(bench_{kind}(Path({str(path)!r}), {tokens}, {cache_dir!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import edgellm
    from benchmarks.bench_gguf import update_benchmarks_md
    from edgellm.profiling.machine import machine_info
    from tests.fixtures.smollm2 import smollm2_hf_dir

    work = Path(tempfile.mkdtemp(prefix="bench-ov-"))
    try:
        ir = edgellm.convert(smollm2_hf_dir(), work / "int4", format="openvino", quant="int4",
                             verify=False).path
        loads: dict[str, list[float]] = {"edgellm": [], "optimum": []}
        for kind in ("edgellm", "optimum"):  # first (cold cache) and second (cached) load
            cache = str(work / f"cache-{kind}")
            loads[kind] = [_child(kind, ir, 8, cache)["load_s"] for _ in range(2)]
        runs: dict[str, list[dict[str, float]]] = {"edgellm": [], "optimum": []}
        for _ in range(args.repeats):
            for kind in ("edgellm", "optimum"):
                runs[kind].append(_child(kind, ir, args.tokens, str(work / f"cache-{kind}")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tps", "ttft_ms")}
           for k, v in runs.items()}
    ratio = med["edgellm"]["decode_tps"] / med["optimum"]["decode_tps"]
    m = machine_info()
    lines = [
        "## OpenVINO (benchmarks/bench_openvino.py)", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['total_ram_bytes'] / 2**30:.0f} GiB; openvino "
        f"{m['packages'].get('openvino', '?')}. SmolLM2-135M-Instruct converted by edgellm to int4 IR "
        f"(group 64); greedy, {args.tokens} new tokens, 2 threads, CPU; median of {args.repeats} "
        "interleaved runs, each in a fresh process.", "",
        "| runtime | decode tok/s | TTFT ms | first load s | cached load s |", "|---|---:|---:|---:|---:|",
    ]
    labels = (("edgellm", "edgellm (openvino backend)"), ("optimum", "optimum-intel OVModelForCausalLM"))
    for kind, label in labels:
        lines.append(f"| {label} | {med[kind]['decode_tps']:.1f} | {med[kind]['ttft_ms']:.0f} | "
                     f"{loads[kind][0]:.2f} | {loads[kind][1]:.2f} |")
    lines += ["", f"**Decode ratio edgellm / optimum-intel: {ratio:.3f}** (target >= 1.0). "
              "openvino-genai LLMPipeline: not measured — it needs OpenVINO tokenizer models, and "
              "openvino-tokenizers could not convert this model's detokenizer (DESIGN.md; not re-tried "
              "in this run, openvino-genai is not installed).", ""]
    section = "\n".join(lines)
    update_benchmarks_md(section)
    print(section)


if __name__ == "__main__":
    main()
