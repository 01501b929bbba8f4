"""Speeds measured on this host (``edgellm bench --matrix``), kept per host, read by the planner.

The planner predicts memory; it cannot predict speed. When a benchmark matrix has measured a
source model's formats, quantizations and backends on this machine, the rows are kept in
``$EDGELLM_CACHE/measured/<host>.json`` (or ``$EDGELLM_MEASURED_DIR``; ``<host>``: a hash of
the host name, CPU model, core count and RAM, so a copied cache folder never speaks for
another machine). A plan for
this host (:data:`~edgellm.devices.detect.HOST_NAME`) then chooses, among the candidates that
fit, the one measured fastest, and its reason says so with the number and the date.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgellm.devices.planner import Candidate, ModelInfo

logger = logging.getLogger(__name__)

__all__ = ["MEASURED_ENV", "host_key", "lookup", "prefer_measured", "record", "source_id", "store_path"]


def cache_root() -> Path:
    """``$EDGELLM_CACHE``, else ``~/.cache/edgellm``."""
    return Path(os.environ.get("EDGELLM_CACHE") or "~/.cache/edgellm").expanduser()


def host_key() -> str:
    """Names this machine: host name, CPU model, logical cores and RAM, hashed."""
    import psutil

    from edgellm.profiling.machine import cpu_model

    text = f"{platform.node()}|{cpu_model()}|{os.cpu_count()}|{psutil.virtual_memory().total}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: Environment variable: another folder for the measured rows (tests point it at a temporary
#: folder, so a developer's own measurements never change what a test's plan chooses).
MEASURED_ENV = "EDGELLM_MEASURED_DIR"


def store_path() -> Path:
    """This host's file of measured rows: ``$EDGELLM_MEASURED_DIR``, else ``$EDGELLM_CACHE/measured``."""
    folder = os.environ.get(MEASURED_ENV)
    root = Path(folder).expanduser() if folder else cache_root() / "measured"
    return root / f"{host_key()}.json"


def _key(source: str, fmt: str, quant: str | None, backend: str, device: str) -> str:
    return "|".join((source, fmt, str(quant or "").lower(), backend, device))


def _read() -> dict[str, dict[str, Any]]:
    path = store_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a damaged cache is ignored, never fatal
        logger.warning("ignoring measured speeds in %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def record(rows: Iterable[Mapping[str, Any]]) -> Path:
    """Merge measured rows (each with source, format, quantization, backend, device) into the store."""
    data = _read()
    for row in rows:
        key = _key(row["source"], row["format"], row["quantization"], row["backend"], row["device"])
        data[key] = dict(row)
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def lookup(source: str, fmt: str, quant: str | None, backend: str, device: str) -> dict[str, Any] | None:
    """The row measured here for this combination, or None."""
    return _read().get(_key(source, fmt, quant, backend, device))


def source_id(info: ModelInfo) -> str | None:
    """The source fingerprint a plan's model is known by: an artifact's manifest records it; a
    source checkpoint's is computed (names, sizes and mtimes of its files)."""
    from edgellm.converters.provenance import source_fingerprint

    if info.path is None:
        return None
    path = Path(info.path)
    manifest = path / "edgellm.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text(encoding="utf-8"))["source"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if info.format is None and path.is_dir():
        return source_fingerprint(path)["fingerprint"]
    return None


def _note(m: Mapping[str, Any]) -> str:
    return (f"{m['decode_tps']:.1f} tok/s decode, TTFT {m['ttft_ms']:.0f} ms (edgellm bench --matrix, "
            f"{m.get('measured_at', '?')}, KV {m.get('kv_precision') or 'default'})")


#: Speed may not buy more quality loss than this: a measured candidate whose top-1 agreement
#: with the source is further below the best measured one's is never chosen for its speed
#: (on the development host the fastest row, ONNX int4 at 0.72, would otherwise replace
#: Q8_0 at 0.98).
TOP1_TOLERANCE = 0.05


def _close_enough(measured: Mapping[int, Mapping[str, Any]]) -> tuple[set[int], float]:
    """The measured candidates whose top-1 is within :data:`TOP1_TOLERANCE` of the best, and that
    best (a row without a top-1, measured with parity off, is not held back)."""
    known = [m["top1"] for m in measured.values() if isinstance(m.get("top1"), (int, float))]
    top = max(known, default=1.0)
    return {i for i, m in measured.items() if not isinstance(m.get("top1"), (int, float))
            or m["top1"] >= top - TOP1_TOLERANCE}, top


def prefer_measured(info: ModelInfo, rows: list[Candidate]) -> list[Candidate]:
    """Choose the fitting candidate measured fastest here among those that keep the quality
    (:data:`TOP1_TOLERANCE`); reasons cite the measurements.

    Unchanged when no fitting candidate was measured (the profile order stands).
    """
    source = source_id(info)
    if source is None:
        return rows
    data = _read()
    speeds = {i: data.get(_key(source, c.format, c.quantization, c.backend, c.device))
              for i, c in enumerate(rows) if c.fits}
    measured = {i: m for i, m in speeds.items() if m}
    if not measured:
        return rows
    eligible, top = _close_enough(measured)
    best = max(eligible, key=lambda i: measured[i]["decode_tps"])
    out = []
    for i, c in enumerate(rows):
        m = measured.get(i)
        note = _note(m) if m else None
        if i == best:
            base = c.reason if c.status == "chosen" else "fits"  # not "fits, but ... comes first"
            c = replace(c, status="chosen", reason=f"{base}; fastest measured on this host: {note}")
        elif c.fits and m is not None and i not in eligible:
            c = replace(c, status="fits", reason=(
                f"fits, but its top-1 agreement {m['top1']:.3f} is more than {TOP1_TOLERANCE} below the "
                f"best measured here ({top:.3f}), so its speed does not count; this one measured {note}"))
        elif c.fits:
            why = f"this one measured {note}" if note else "this one not measured here"
            c = replace(c, status="fits", reason=f"fits, but {rows[best].label} is faster here ({why})")
        out.append(c)
    logger.info("plan: %s chosen by measured speed (%.1f tok/s)", rows[best].label,
                measured[best]["decode_tps"])
    return out
