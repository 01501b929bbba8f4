"""``edgellm bench --matrix SOURCE``: every format x quantization x backend of one model, here.

For each row of :data:`MATRIX` the source is converted once (cached under
``$EDGELLM_CACHE/matrix/<source fingerprint>/``; the conversion verifies parity against the
source, so top-1 agreement comes from the manifest), then each installed backend that reads the
format is benchmarked in a fresh process (:func:`~edgellm.profiling.bench.bench`: clean peak
RSS, cold imports). Rows: size on disk, peak RSS, TTFT, decode tokens/s, top-1 agreement. The
rows are kept for this host (:mod:`edgellm.devices.measured`), so plans on this host choose
what was measured fastest. A row that fails (a converter or backend missing) is reported with
its reason, never dropped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["MATRIX", "MatrixReport", "bench_matrix"]

#: (format, quantization) rows: the table a user reads to choose a deployment.
MATRIX: tuple[tuple[str, str], ...] = (
    ("gguf", "Q8_0"), ("gguf", "Q4_K_M"),
    ("openvino", "int8"), ("openvino", "int4"),
    ("onnx", "int8"), ("onnx", "int4"),
)

_CHILD = """
import json, sys
from edgellm.profiling.bench import bench
a = json.loads(sys.argv[1])
r = bench(a["path"], prompt=a["prompt"], max_tokens=a["max_tokens"], repeats=a["repeats"], warmup=1,
          backend=a["backend"], n_ctx=a["n_ctx"])
print(json.dumps({"decode_tps": r.decode_tps, "ttft_ms": r.ttft_ms, "prefill_tps": r.prefill_tps,
                  "peak_rss_bytes": r.peak_rss_bytes, "load_ms": r.load_ms,
                  "threads": r.backend.get("threads"), "device": r.backend.get("device", "cpu"),
                  "kv_precision": r.backend.get("kv_precision")}))
"""


@dataclass(frozen=True)
class MatrixReport:
    """Rows of the matrix (dicts, one per format x quantization x backend) and the machine."""

    source: str
    source_fingerprint: str
    rows: tuple[dict[str, Any], ...]
    max_tokens: int
    repeats: int
    machine: dict[str, Any] = field(default_factory=dict)
    store: str = ""  # this host's measured-speeds file
    folder: str = ""  # the artifacts, matrix.md and matrix.json

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["rows"] = [dict(r) for r in self.rows]
        return data

    def to_markdown(self) -> str:
        """The table, fastest first, with failures and the machine under it."""
        mib = 2**20
        ok = sorted((r for r in self.rows if "error" not in r), key=lambda r: -r["decode_tps"])
        lines = [f"## edgellm bench --matrix: {Path(self.source).name}", "",
                 "| format | quant | backend | size MiB | peak RSS MiB | TTFT ms | decode tok/s | top-1 |",
                 "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in ok:
            top1 = "n/a" if r.get("top1") is None else f"{r['top1']:.3f}"
            lines.append(f"| {r['format']} | {r['quantization']} | {r['backend']} | "
                         f"{r['size_bytes'] / mib:.1f} | {r['peak_rss_bytes'] / mib:.1f} | "
                         f"{r['ttft_ms']:.1f} | {r['decode_tps']:.1f} | {top1} |")
        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['format']} | {r['quantization']} | {r.get('backend', '-')} | "
                             f"failed: {r['error']} | | | | |")
        m = self.machine
        lines += ["", f"Greedy, {self.max_tokens} tokens, 1 warm-up + {self.repeats} runs (medians), each "
                      f"backend in a fresh process; top-1 agreement with the source on edgellm's parity "
                      f"prompts. Machine: {m.get('cpu_model', '?')}, {m.get('physical_cores', '?')} cores, "
                      f"{m.get('total_ram_bytes', 0) / 2**30:.0f} GiB. Kept for this host in {self.store}."]
        return "\n".join(lines) + "\n"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _artifact(source: Path, root: Path, fmt: str, quant: str) -> Path:
    """The converted artifact for (fmt, quant), converted (with parity) on first use."""
    import edgellm

    folder = root / f"{fmt}-{quant.lower()}"
    if not (folder / "edgellm.json").is_file():
        logger.info("matrix: converting %s to %s %s", source, fmt, quant)
        edgellm.convert(source, folder, format=fmt, quant=quant, verify=True, force=True)
    return folder


def _top1(folder: Path) -> float | None:
    parity = json.loads((folder / "edgellm.json").read_text(encoding="utf-8")).get("parity") or {}
    return parity.get("top1_agreement")


#: Context every row is benchmarked at (capped by the model's positions): the same KV size for all.
N_CTX = 1024


def _bench_child(folder: Path, backend: str, prompt: str, max_tokens: int, repeats: int,
                 n_ctx: int) -> dict[str, Any]:
    args = {"path": str(folder), "backend": backend, "prompt": prompt, "max_tokens": max_tokens,
            "repeats": repeats, "n_ctx": n_ctx}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeLLMError(f"benchmark of {folder.name} on {backend} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _backends_for(fmt: str) -> list[str]:
    from edgellm.runtimes.base import backend_names, get_backend

    return [n for n in backend_names() if n != "fake" and fmt in get_backend(n).formats
            and get_backend(n).installed()]


def bench_matrix(
    source: str | os.PathLike[str],
    rows: Sequence[tuple[str, str]] = MATRIX,
    *,
    prompt: str | None = None,
    max_tokens: int = 64,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> MatrixReport:
    """Convert ``source`` (a HF checkpoint) to each row, benchmark every backend, keep the rows."""
    from edgellm.converters.provenance import source_fingerprint
    from edgellm.devices.measured import cache_root, record, store_path
    from edgellm.profiling.bench import DEFAULT_PROMPT
    from edgellm.profiling.machine import machine_info
    from edgellm.spec import ModelSpec

    src = Path(source)
    n_ctx = min(N_CTX, ModelSpec.from_hf_dir(src).max_positions)  # a clear error when not a checkpoint
    if max_tokens < 2 or repeats < 1:
        raise InvalidInputError(f"max_tokens must be >= 2 and repeats >= 1, got {max_tokens}, {repeats}")
    fp = source_fingerprint(src)["fingerprint"]
    root = cache_root() / "matrix" / fp
    out: list[dict[str, Any]] = []
    for fmt, quant in rows:
        out += _measure_row(src, root, fmt, quant, fp, (prompt or DEFAULT_PROMPT, max_tokens, repeats, n_ctx),
                            progress or (lambda _msg: None))
    record(r for r in out if "error" not in r)
    report = MatrixReport(str(src), fp, tuple(out), max_tokens, repeats, machine_info(), str(store_path()),
                          str(root))
    root.mkdir(parents=True, exist_ok=True)
    (root / "matrix.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    (root / "matrix.md").write_text(report.to_markdown(), encoding="utf-8")
    return report


def _measure_row(src: Path, root: Path, fmt: str, quant: str, fp: str, run: tuple[str, int, int, int],
                 progress: Callable[[str], None]) -> list[dict[str, Any]]:
    base = {"source": fp, "format": fmt, "quantization": quant}
    try:
        progress(f"{fmt} {quant}: converting")
        folder = _artifact(src, root, fmt, quant)
    except EdgeLLMError as exc:
        return [{**base, "error": f"conversion failed: {exc}"}]
    rows = []
    for backend in _backends_for(fmt) or [None]:
        if backend is None:
            rows.append({**base, "error": f"no installed backend reads {fmt}"})
            continue
        progress(f"{fmt} {quant}: {backend}")
        try:
            m = _bench_child(folder, backend, *run)
        except EdgeLLMError as exc:
            rows.append({**base, "backend": backend, "error": str(exc)})
            continue
        rows.append({**base, "backend": backend, **m, "size_bytes": _folder_bytes(folder),
                     "top1": _top1(folder), "artifact": str(folder),
                     "measured_at": time.strftime("%Y-%m-%d", time.gmtime())})
    return rows
