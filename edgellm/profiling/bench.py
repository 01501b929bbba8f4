"""Benchmark one model on this host: load time, TTFT, prefill/decode speed, peak RSS.

Decoding is greedy (temperature 0) on a fixed prompt, past EOS (exactly ``max_tokens``: a model
that ends its reply at once would otherwise measure no decoding), so repeated runs do the same work;
results are medians over ``repeats`` runs after ``warmup`` unmeasured runs. Peak RSS is
sampled around load *and* generation, because loading is often where memory peaks.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidInputError
from edgellm.profiling.machine import machine_info
from edgellm.profiling.memory import MemorySampler

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROMPT", "BenchReport", "bench"]

DEFAULT_PROMPT = "Write a short paragraph about the history of the bicycle."

#: Per-run timing keys whose median is reported.
MEDIAN_KEYS = ("ttft_ms", "prefill_tps", "decode_tps", "total_ms")


@dataclass(frozen=True)
class BenchReport:
    """What :func:`bench` measured. Speeds in tokens/s, times in ms, memory in bytes."""

    model_path: str
    prompt: str
    max_tokens: int
    repeats: int
    warmup: int
    runs: tuple[dict[str, Any], ...]  # one Timings.to_dict() per measured run
    ttft_ms: float  # medians over runs
    prefill_tps: float
    decode_tps: float
    total_ms: float
    load_ms: float
    peak_rss_bytes: int
    baseline_rss_bytes: int
    model_size_bytes: int
    backend: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``runs`` as a list)."""
        data = asdict(self)
        data["runs"] = [dict(r) for r in self.runs]
        return data

    def to_markdown(self) -> str:
        """A human report: summary table, per-run table, machine line."""
        mib = 1024 * 1024
        lines = [
            f"## edgellm bench: {Path(self.model_path).name}",
            "",
            "| metric | value |",
            "|---|---|",
            f"| backend | {self.backend.get('backend', '?')} |",
            f"| model size | {self.model_size_bytes / mib:.1f} MiB |",
            f"| load | {self.load_ms:.0f} ms |",
            f"| TTFT (median) | {self.ttft_ms:.1f} ms |",
            f"| prefill (median) | {self.prefill_tps:.1f} tok/s |",
            f"| decode (median) | {self.decode_tps:.1f} tok/s |",
            f"| total (median) | {self.total_ms:.0f} ms |",
            f"| peak RSS | {self.peak_rss_bytes / mib:.1f} MiB "
            f"(baseline {self.baseline_rss_bytes / mib:.1f} MiB) |",
            "",
            "| run | prompt tok | completion tok | TTFT ms | prefill tok/s | decode tok/s "
            "| total ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.runs, 1):
            lines.append(
                f"| {i} | {r.get('prompt_tokens', '')} | {r.get('completion_tokens', '')} | "
                f"{r.get('ttft_ms', 0):.1f} | {r.get('prefill_tps', 0):.1f} | "
                f"{r.get('decode_tps', 0):.1f} | {r.get('total_ms', 0):.0f} |"
            )
        m = self.machine
        lines += ["", f"Machine: {m.get('cpu_model', '?')}, {m.get('physical_cores', '?')} cores "
                      f"({m.get('logical_cores', '?')} logical), "
                      f"{m.get('total_ram_bytes', 0) / 2**30:.1f} GiB RAM, {m.get('os', '?')}, "
                      f"Python {m.get('python', '?')}; prompt {self.prompt!r}, "
                      f"max_tokens {self.max_tokens}, greedy, {self.warmup} warmup + "
                      f"{self.repeats} runs."]
        return "\n".join(lines) + "\n"


def _check_counts(max_tokens: int, repeats: int, warmup: int) -> None:
    for name, value, low in (("max_tokens", max_tokens, 1), ("repeats", repeats, 1),
                             ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")


def _model_size_bytes(model_path: str | os.PathLike[str]) -> int:
    from edgellm.artifact import find_artifact

    return find_artifact(model_path).model_file.stat().st_size


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r.get(key) or 0.0) for r in runs))


def bench(
    model_path: str | os.PathLike[str],
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    backend: str | None = None,
    threads: int | str | None = "auto",
    n_ctx: int | None = None,
) -> BenchReport:
    """Load ``model_path`` and generate ``max_tokens`` greedily ``warmup + repeats`` times.

    Each run starts from an empty KV cache, so prefill is measured every time rather
    than served from the previous run's cached prefix.
    """
    from edgellm.api import load

    _check_counts(max_tokens, repeats, warmup)
    size = _model_size_bytes(model_path)
    runs: list[dict[str, Any]] = []
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        model = load(model_path, backend=backend, threads=threads, n_ctx=n_ctx)
        load_ms = (time.perf_counter() - t0) * 1000.0
        try:
            for i in range(warmup + repeats):
                _reset(model)
                result = model.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                if i >= warmup:
                    runs.append(result.timings.to_dict())
                    logger.info("bench run %d: %s", i - warmup + 1, runs[-1])
            info = dict(model.info())
        finally:
            model.close()
    return BenchReport(
        model_path=str(model_path), prompt=prompt, max_tokens=max_tokens, repeats=repeats,
        warmup=warmup, runs=tuple(runs),
        **{k: _median(runs, k) for k in MEDIAN_KEYS},
        load_ms=load_ms, peak_rss_bytes=mem.peak_rss_bytes,
        baseline_rss_bytes=mem.baseline_rss_bytes, model_size_bytes=size,
        backend=info, machine=machine_info(),
    )


def _reset(model: Any) -> None:
    """Empty the KV cache so the next run prefills the whole prompt again."""
    reset = getattr(model, "reset", None)
    if callable(reset):
        reset()
