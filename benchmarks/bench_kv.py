"""Sessions and the memory-limited KV cache on SmolLM2-135M, on llama.cpp, OpenVINO and ONNX Runtime.

Every measurement runs in a fresh process (clean RSS, cold imports), per backend:

* **budget held**: a 512-token session under ``kv_overflow="sliding"`` generates 4,096 greedy
  tokens; RSS is sampled every 10 ms and its growth after the first 512 tokens is set against
  the KV budget (target: at most 10% of it);
* **eviction speed**: decode tokens/s of that sliding run against the same number of tokens in
  a cache large enough never to evict (target ratio >= 0.85);
* **quality under sliding**: perplexity of ``tests/data/long_text.txt`` through a 256-token
  window (8x the window of text), over the last window, against the same window scored alone
  ("in-window") and with the whole text in the cache; with 4 sinks and with 0;
* **KV precision**: in-window perplexity at each KV precision against f16 (f32 on ONNX Runtime,
  whose graph fixes it);
* **prefix reuse**: time to first token of a second chat turn after a 1,000-token history, against
  a cold prefill of the same prompt (target >= 3x);
* **sessions**: RSS of 4 sessions each holding 500 tokens against 1 (one copy of the weights
  plus 4 KV caches);
* **planner**: the planner's predicted peak for a 512-token session against the measured peak.

Writes the "KV cache and sessions" section of ``BENCHMARKS.md``.
Run: ``python benchmarks/bench_kv.py [--backends llamacpp,openvino,onnxruntime] [--tokens 4096]``.
The OpenVINO and ONNX int4 models are converted once into ``$EDGELLM_CACHE/bench`` (needs the
convert extras).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_in_child, write_section  # noqa: E402

TEXT = ROOT / "tests" / "data" / "long_text.txt"
WINDOW = 256
KV_LADDERS = {"llamacpp": ("f16", "q8_0", "q4_0"), "openvino": ("f16", "u8", "f32"), "onnxruntime": ("f32",)}
REFERENCE_KV = {"llamacpp": "f16", "openvino": "f16", "onnxruntime": "f32"}
HISTORY_TURNS = 12


def _load(path: Path, backend: str, **kw: Any) -> Any:
    import edgellm

    extra = (
        {
            "cache_dir": str(
                Path(os.environ.get("EDGELLM_CACHE", "~/.cache/edgellm")).expanduser() / "ov-cache"
            )
        }
        if backend == "openvino"
        else {}
    )
    threads = int(os.environ.get("EDGELLM_BENCH_THREADS", "1"))
    return edgellm.load(path, backend=backend, device="cpu", threads=threads, **extra, **kw)


def budget_run(path: Path, backend: str, tokens: int, n_ctx: int, sliding: bool) -> dict[str, float]:
    """Generate ``tokens`` greedily in a cache of ``n_ctx``; when the cache filled (wall clock).

    The RSS is watched from the parent process (:func:`watched_budget_run`), so the samples
    cost this process nothing: a sampler thread here grows by ~130 bytes per sample, about
    1 MiB over a long run, which would be counted as growth.
    """
    model = _load(path, backend, n_ctx=n_ctx, kv_overflow="sliding" if sliding else "error")
    session = model.session()
    backend_session = session._backend
    forward = backend_session.forward
    full_at = [0.0]
    count = 0

    def counted(ids: Any, all_logits: bool = False) -> Any:
        nonlocal count
        out = forward(ids, all_logits)
        count += 1
        if count == n_ctx:
            full_at[0] = time.time()
        return out

    backend_session.forward = counted
    result = session.generate("Tell me a long story about the sea.", max_tokens=tokens, temperature=0,
                              ignore_eos=True)
    done_at = time.time()
    budget = session.cache.capacity_bytes
    model.close()
    return {"decode_tps": result.timings.decode_tps, "evicted": result.timings.evicted_tokens,
            "kv_budget": budget, "full_at": full_at[0], "done_at": done_at}


def watched_budget_run(path: Path, backend: str, tokens: int, n_ctx: int, sliding: bool) -> dict[str, float]:
    """:func:`budget_run` in a child whose RSS this process samples every 10 ms."""
    import json
    import subprocess

    import psutil

    call = f"budget_run(Path({str(path)!r}), {backend!r}, {tokens}, {n_ctx}, {sliding})"
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from benchmarks.bench_kv import budget_run; print(json.dumps({call}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child, timeline = psutil.Process(proc.pid), []
    while proc.poll() is None:
        try:
            timeline.append((time.time(), child.memory_info().rss))
        except psutil.Error:
            break
        time.sleep(0.01)
    out = json.loads(proc.stdout.read().strip().splitlines()[-1])
    full, done = out["full_at"], out["done_at"]
    at_full = max((rss for t, rss in timeline if t <= full), default=0)
    after = max((rss for t, rss in timeline if full < t <= done), default=at_full)
    return {**out, "rss_at_full": at_full, "rss_growth_after": after - at_full,
            "peak_rss": max((rss for _, rss in timeline), default=0)}


def perplexities(path: Path, backend: str, window: int, kv_precision: str) -> dict[str, float]:
    """Perplexity over the last window of the text: sliding (4 sinks, 0 sinks), alone, whole text."""
    import numpy as np

    text = TEXT.read_text(encoding="utf-8")
    out: dict[str, float] = {}
    model = _load(path, backend, n_ctx=8 * window + 64, kv_precision=kv_precision)
    ids = model.tokenize(text)[: 8 * window]
    whole = model.session().logprobs(ids)
    out["whole"] = float(np.exp(-whole[-window:].mean()))
    alone = model.session(n_ctx=window + 8).logprobs(ids[-window - 1 :])
    out["in_window"] = float(np.exp(-alone[-window:].mean()))
    for sinks in (4, 0):
        s = model.session(n_ctx=window, kv_overflow="sliding", kv_sinks=sinks)
        lp = s.logprobs(ids)
        out[f"sliding_{sinks}_sinks"] = float(np.exp(-lp[-window:].mean()))
        s.close()
    out["tokens"] = len(ids)
    model.close()
    return out


def precision_ppl(path: Path, backend: str, kv_precision: str, window: int) -> dict[str, float]:
    """In-window perplexity (the first 2 windows of the text, one cache) at one KV precision."""
    import numpy as np

    model = _load(path, backend, n_ctx=2 * window + 8, kv_precision=kv_precision)
    ids = model.tokenize(TEXT.read_text(encoding="utf-8"))[: 2 * window]
    lp = model.session().logprobs(ids)
    model.close()
    return {"ppl": float(np.exp(-lp.mean()))}


def prefix_reuse(path: Path, backend: str) -> dict[str, float]:
    """TTFT of a second turn after a ~1,000-token history: cold (fresh session) vs reused."""
    model = _load(path, backend, n_ctx=2048)
    text = TEXT.read_text(encoding="utf-8")
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    words = text.split()
    for i in range(HISTORY_TURNS):
        history += [
            {"role": "user", "content": " ".join(words[i * 30 : (i + 1) * 30])},
            {"role": "assistant", "content": " ".join(words[1000 + i * 30 : 1000 + (i + 1) * 30])},
        ]
    turn = [*history, {"role": "user", "content": "Summarise our conversation."}]
    warm = model.session()
    warm.chat(
        history[:-1] + [{"role": "user", "content": history[-2]["content"]}], max_tokens=1, temperature=0
    )  # the history is in the cache now (the last reply is new text)
    reused = warm.chat(turn, max_tokens=1, temperature=0)
    cold_session = model.session()
    cold = cold_session.chat(turn, max_tokens=1, temperature=0)
    model.close()
    return {
        "prompt_tokens": cold.prompt_tokens,
        "cold_ttft_ms": cold.timings.ttft_ms,
        "reused_ttft_ms": reused.timings.ttft_ms,
        "cached_tokens": reused.timings.cached_tokens,
    }


def sessions_memory(path: Path, backend: str, n_ctx: int) -> dict[str, float]:
    """RSS after loading, then with 4 sessions each holding ~500 tokens, and the KV they reserve."""
    from edgellm.profiling.memory import current_rss_bytes

    model = _load(path, backend, n_ctx=n_ctx, kv_budget=4 * n_ctx * _bpt(path, backend))
    ids = model.tokenize(TEXT.read_text(encoding="utf-8"))[: n_ctx - 12]
    loaded = current_rss_bytes()
    sessions = [model.session() for _ in range(4)]
    for s in sessions:
        s.generate(ids, max_tokens=4, temperature=0)
    four = current_rss_bytes()
    mem = model.memory()
    model.close()
    return {
        "rss_loaded": loaded,
        "rss_four": four,
        "kv_capacity_four": 4 * sessions[0].cache.capacity_bytes,
        "kv_held_four": mem["kv"],
        "compute": mem["compute"] or 0,
        "weights": mem["weights"] or 0,
    }


def _bpt(path: Path, backend: str) -> int:
    model = _load(path, backend, n_ctx=8)
    try:
        return int(model.engine.kv_bytes_per_token())
    finally:
        model.close()


def planner_check(path: Path, backend: str, n_ctx: int) -> dict[str, float]:
    """The planner's predicted peak for one session of n_ctx, and the measured peak of filling it."""
    from edgellm.devices.planner import host_profile, plan
    from edgellm.profiling.memory import MemorySampler

    with MemorySampler(interval_ms=10) as mem:
        model = _load(path, backend, n_ctx=n_ctx, kv_budget=n_ctx * _bpt(path, backend))
        ids = model.tokenize(TEXT.read_text(encoding="utf-8"))[: n_ctx - 8]
        model.generate(ids, max_tokens=4, temperature=0)
        model.close()
    fmt = {"llamacpp": "gguf", "openvino": "openvino", "onnxruntime": "onnx"}[backend]
    chosen = plan(
        path, host_profile([fmt]), n_ctx, backends=[backend], kv_budget=n_ctx * _bpt(path, backend)
    ).choice
    assert chosen is not None
    return {"predicted": chosen.predicted_peak_bytes, "measured": mem.os_peak_rss_bytes or mem.peak_rss_bytes}


# -- artifacts and the report ----------------------------------------------------------------


def artifacts(backends: list[str]) -> dict[str, Path]:
    """The SmolLM2 model each backend runs: the packaged Q4_1 GGUF, int4 IR and int4 ONNX."""
    from tests.fixtures import smollm2

    out: dict[str, Path] = {}
    if "llamacpp" in backends:
        out["llamacpp"] = smollm2.smollm2_gguf_path()
    root = Path(os.environ.get("EDGELLM_CACHE", "~/.cache/edgellm")).expanduser() / "bench"
    for backend, fmt in (("openvino", "openvino"), ("onnxruntime", "onnx")):
        if backend in backends:
            folder = root / f"smollm2-{fmt}-int4"
            if not (folder / "edgellm.json").is_file():
                import edgellm

                edgellm.convert(
                    smollm2.smollm2_hf_dir(), folder, format=fmt, quant="int4", verify=False, force=True
                )
            out[backend] = folder
    return out


def _median_run(path: Path, backend: str, tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Sliding and never-evicting runs, interleaved, ``repeats`` each: medians (the RSS growth: the worst)."""
    runs: dict[str, list[dict[str, float]]] = {"sliding": [], "plain": []}
    for _ in range(repeats):
        runs["sliding"].append(watched_budget_run(path, backend, tokens, 512, True))
        runs["plain"].append(watched_budget_run(path, backend, tokens, tokens + 64, False))
    out = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    out["sliding"]["rss_growth_after"] = max(r["rss_growth_after"] for r in runs["sliding"])
    return out


def measure(backend: str, path: Path, tokens: int, repeats: int) -> dict[str, Any]:
    print(f"[{backend}] budget and eviction speed ...", file=sys.stderr)
    row: dict[str, Any] = _median_run(path, backend, tokens, repeats)
    print(f"[{backend}] perplexity ...", file=sys.stderr)
    row["ppl"] = run_in_child("bench_kv", "perplexities", path, backend, WINDOW, REFERENCE_KV[backend])
    row["precisions"] = {
        kv: run_in_child("bench_kv", "precision_ppl", path, backend, kv, WINDOW)["ppl"]
        for kv in KV_LADDERS[backend]
    }
    print(f"[{backend}] prefix reuse, sessions, planner ...", file=sys.stderr)
    row["reuse"] = run_in_child("bench_kv", "prefix_reuse", path, backend)
    row["sessions"] = run_in_child("bench_kv", "sessions_memory", path, backend, 512)
    row["planner"] = run_in_child("bench_kv", "planner_check", path, backend, 512)
    return row


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(rows: dict[str, dict[str, Any]], tokens: int) -> str:
    from edgellm.profiling.machine import machine_info

    m = machine_info()
    when = ", ".join(f"{b} {r['when']}" for b, r in rows.items())
    lines = [
        "## KV cache and sessions (benchmarks/bench_kv.py)",
        "",
        f"Run {when} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['total_ram_bytes'] / 2**30:.0f} GiB, {m['os']}, {m['python']}; "
        f"llama-cpp-python {m['packages'].get('llama_cpp')}, openvino {m['packages'].get('openvino')}, "
        f"onnxruntime {m['packages'].get('onnxruntime')}.",
        "",
        "SmolLM2-135M-Instruct (llama.cpp Q4_1, OpenVINO int4, ONNX int4), "
        f"{os.environ.get('EDGELLM_BENCH_THREADS', '1')} thread(s), greedy, every "
        "number from a fresh process. The machine was shared with other work: speeds are noisy.",
        "",
        f'**Budget held** (512-token session, `kv_overflow="sliding"`, {tokens} tokens) and **eviction '
        "speed** (against the same number of tokens in a cache that never evicts; interleaved fresh-process "
        "runs, medians; the RSS growth is the worst run):",
        "",
        "| backend | KV budget MiB | RSS growth after 512 tokens MiB | growth / budget | evicted | "
        "decode tok/s sliding | without eviction | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, r in rows.items():
        s, p = r["sliding"], r["plain"]
        lines.append(
            f"| {b} | {_mib(s['kv_budget'])} | {_mib(s['rss_growth_after'])} | "
            f"{s['rss_growth_after'] / s['kv_budget']:.1%} | {s['evicted']:.0f} | {s['decode_tps']:.1f} | "
            f"{p['decode_tps']:.1f} | {s['decode_tps'] / p['decode_tps']:.2f} |"
        )
    lines += [
        "",
        f"**Quality under sliding** (tests/data/long_text.txt, window {WINDOW} tokens, text of "
        f"8 windows; perplexity over the last window):",
        "",
        "| backend | whole text in cache | window alone (in-window) | sliding, 4 sinks | sliding, 0 sinks | "
        "4 sinks / in-window |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b, r in rows.items():
        q = r["ppl"]
        lines.append(
            f"| {b} | {q['whole']:.2f} | {q['in_window']:.2f} | {q['sliding_4_sinks']:.2f} | "
            f"{q['sliding_0_sinks']:.2f} | {q['sliding_4_sinks'] / q['in_window']:.3f} |"
        )
    lines += [
        "",
        "**KV precision** (in-window perplexity of the first 512 tokens; cost against f16, f32 on "
        "ONNX Runtime):",
        "",
        "| backend | " + " | ".join(["precision: perplexity (x reference)"]) + " |",
        "|---|---|",
    ]
    for b, r in rows.items():
        ref = r["precisions"][REFERENCE_KV[b]]
        cells = ", ".join(f"{kv}: {v:.3f} (x{v / ref:.3f})" for kv, v in r["precisions"].items())
        lines.append(f"| {b} | {cells} |")
    lines += [
        "",
        "**Prefix reuse** (second chat turn after a history; cold = a fresh session), "
        "**sessions** (RSS after loading, then with 4 sessions of 512 tokens each holding ~500; the "
        "growth set against the 4 caches' capacity, and the RSS against the loaded model plus 4 caches) "
        "and **planner** (one 512-token session filled by its prompt; measured: the OS peak RSS of "
        "the process):",
        "",
        "| backend | prompt tokens | cold TTFT ms | reused TTFT ms | speed-up | RSS loaded MiB | "
        "RSS 4 sessions MiB | 4 KV caches MiB | growth / 4 KV | RSS / (loaded + 4 KV) | "
        "planner predicted MiB | measured MiB | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, r in rows.items():
        u, s, pl = r["reuse"], r["sessions"], r["planner"]
        growth = (s["rss_four"] - s["rss_loaded"]) / s["kv_capacity_four"]
        whole = s["rss_four"] / (s["rss_loaded"] + s["kv_capacity_four"])
        lines.append(
            f"| {b} | {u['prompt_tokens']:.0f} | {u['cold_ttft_ms']:.0f} | {u['reused_ttft_ms']:.0f} | "
            f"{u['cold_ttft_ms'] / u['reused_ttft_ms']:.1f}x | {_mib(s['rss_loaded'])} | "
            f"{_mib(s['rss_four'])} | {_mib(s['kv_capacity_four'])} | {growth:.2f} | {whole:.2f} | "
            f"{_mib(pl['predicted'])} | {_mib(pl['measured'])} | "
            f"{(pl['predicted'] - pl['measured']) / pl['measured']:+.1%} |"
        )
    return "\n".join(lines) + "\n"


def _rows_file() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE", "~/.cache/edgellm")).expanduser() / "bench" / "kv-rows.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="llamacpp,openvino,onnxruntime")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved sliding / plain runs (medians)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per run (default 1: on a shared 2-core machine 2 spinning threads "
                         "collapse to a tenth of their speed; see DESIGN.md)")
    ap.add_argument("--keep", action="store_true",
                    help="also report the other backends' rows kept from earlier runs on this host "
                         f"({_rows_file()})")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    os.environ["EDGELLM_BENCH_THREADS"] = str(args.threads)  # the child processes read it
    paths = artifacts(backends)
    rows_file = _rows_file()
    kept = json.loads(rows_file.read_text()) if args.keep and rows_file.is_file() else {}
    for b in backends:
        kept[b] = {**measure(b, paths[b], args.tokens, args.repeats),
                   "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text(json.dumps(kept, indent=1))
    order = [b for b in ("llamacpp", "openvino", "onnxruntime") if b in kept]
    section = report({b: kept[b] for b in order}, args.tokens)
    print(section)
    write_section("## KV cache and sessions", section)


if __name__ == "__main__":
    main()
