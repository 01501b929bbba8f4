"""edgellm's OpenVINO backend vs optimum-intel on SmolLM2 int4, side by side in one run.

* decode tokens/s, greedy, fixed token count: edgellm ``Model.generate`` (shared loop over the
  compiled stateful IR) vs optimum-intel ``OVModelForCausalLM.generate`` on the *same* IR
  folder; runs interleaved, each in a fresh process, medians; ratio edgellm / optimum;
* load time: first load (empty compiled-model cache) and cached load (second process).

* openvino-genai ``LLMPipeline`` (C++ generation loop) on the same folder, when it is installed
  and the conversion wrote OpenVINO tokenizer models (edgellm writes them only when they
  tokenize like the HF tokenizer); the reason is printed when it cannot run.

Writes the "OpenVINO" section of ``BENCHMARKS.md``.
Run: ``python benchmarks/bench_openvino.py [--repeats 5] [--tokens 128]``.
"""

from __future__ import annotations

import argparse
import json
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

    from benchmarks.common import time_hf_generate

    t0 = time.perf_counter()
    model = OVModelForCausalLM.from_pretrained(
        path, ov_config={"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2, "CACHE_DIR": cache_dir})
    load_s = time.perf_counter() - t0
    ids = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT).ids])
    ttft_ms, decode_tps = time_hf_generate(model, ids, tokens)
    return {"decode_tps": decode_tps, "ttft_ms": ttft_ms, "load_s": load_s}


def bench_genai(path: Path, tokens: int, cache_dir: str) -> dict[str, float]:
    import openvino_genai as ov_genai

    t0 = time.perf_counter()
    pipe = ov_genai.LLMPipeline(str(path), "CPU", PERFORMANCE_HINT="LATENCY", INFERENCE_NUM_THREADS=2,
                                CACHE_DIR=cache_dir)
    load_s = time.perf_counter() - t0
    config = ov_genai.GenerationConfig()
    config.apply_chat_template = False  # the same raw prompt as the others
    config.max_new_tokens = 8
    pipe.generate(PROMPT, config)  # warm-up
    config.max_new_tokens = config.min_new_tokens = tokens
    metrics = pipe.generate([PROMPT], config).perf_metrics
    return {"decode_tps": 1e3 / metrics.get_tpot().mean, "ttft_ms": metrics.get_ttft().mean,
            "load_s": load_s}


def _child(kind: str, path: Path, tokens: int, cache_dir: str) -> dict[str, float]:
    from benchmarks.common import run_in_child

    return run_in_child("bench_openvino", f"bench_{kind}", path, tokens, cache_dir)


def _genai_available(manifest: dict) -> str | None:
    """None when openvino-genai can run the IR; else why not."""
    import importlib.util

    if importlib.util.find_spec("openvino_genai") is None:
        return "openvino-genai is not installed: pip install openvino-genai==<openvino version>"
    status = manifest.get("openvino_tokenizers", {})
    if status.get("status") != "written":
        return f"no OpenVINO tokenizer models beside the IR: {status.get('reason', 'not recorded')}"
    return None


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
        manifest = json.loads((ir / "edgellm.json").read_text())
        kinds = ["edgellm", "optimum"]
        genai_note = _genai_available(manifest)
        if genai_note is None:
            kinds.append("genai")
        loads: dict[str, list[float]] = {}
        for kind in kinds:  # first (cold cache) and second (cached) load
            cache = str(work / f"cache-{kind}")
            loads[kind] = [_child(kind, ir, 8, cache)["load_s"] for _ in range(2)]
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
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
    labels = (("edgellm", "edgellm (openvino backend)"), ("optimum", "optimum-intel OVModelForCausalLM"),
              ("genai", "openvino-genai LLMPipeline"))
    for kind, label in labels:
        if kind not in med:
            continue
        lines.append(f"| {label} | {med[kind]['decode_tps']:.1f} | {med[kind]['ttft_ms']:.0f} | "
                     f"{loads[kind][0]:.2f} | {loads[kind][1]:.2f} |")
    lines += ["", f"**Decode ratio edgellm / optimum-intel: {ratio:.3f}** (target >= 1.0)."]
    if "genai" in med:
        genai_ratio = med["edgellm"]["decode_tps"] / med["genai"]["decode_tps"]
        lines.append(f"**Decode ratio edgellm / openvino-genai: {genai_ratio:.3f}** (reported; "
                     "GenAI's loop is C++). GenAI's numbers are its own perf_metrics (TPOT, TTFT).")
    else:
        lines.append(f"openvino-genai LLMPipeline: not measured ({genai_note}).")
    lines.append("")
    section = "\n".join(lines)
    update_benchmarks_md(section)
    print(section)


if __name__ == "__main__":
    main()
