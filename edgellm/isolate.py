"""Open an untrusted model once in a child process before the host process touches it.

Python validation (:mod:`edgellm.gguf_meta`, :mod:`edgellm.gguf_rules`, the artifact file
checks) refuses every damage edgellm knows of; native code may still find one it does not.
:func:`check_model` runs the whole path a user takes (inspect, load, one generated token) in
a fresh interpreter with a timeout and its output captured: a native crash (a signal) or a
hang there becomes one :class:`~edgellm.errors.InvalidModelError` naming the file and the
signal, and the host never loads that file. Files that passed are recorded by the SHA-256 of
their bytes under ``${EDGELLM_CACHE:-~/.cache/edgellm}/checked/``, so a second check (or
``load(..., isolate=True)``) of the same bytes skips the child.

``python -m edgellm.isolate PATH [BACKEND] [DEVICE]`` is the child's entry point: it prints
one JSON line (``{"ok": ..., "error": ..., "message": ...}``) and exits 0 (opened), 2 (an
edgellm error) or 3 (any other exception: a bug the caller should hear about).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm import errors
from edgellm.errors import EdgeLLMError, InvalidModelError

logger = logging.getLogger(__name__)

__all__ = ["ChildResult", "check_model", "open_once", "run_child"]

#: Seconds a child may take to open a model and generate one token before it counts as hung.
DEFAULT_TIMEOUT_S = 120.0
_RECORD_VERSION = 1
#: The child's interpreter arguments (tests point it at a program that crashes or hangs).
CHILD_ENTRY = ["-m", "edgellm.isolate"]


@dataclass(frozen=True)
class ChildResult:
    """What happened in the child: ``status`` is ok, error, raw, signal or hang."""

    status: str
    message: str
    seconds: float
    error: str | None = None  # the edgellm error class name (status "error") or the raw type


def open_once(path: str | os.PathLike[str], backend: str | None = None,
              device: str = "cpu") -> dict[str, Any]:
    """Inspect, load and generate one greedy token, in this process (the child's work)."""
    import edgellm

    edgellm.inspect(path)
    model = edgellm.load(path, backend=backend, device=device, n_ctx=64, threads=1)
    try:
        result = model.generate("Hello", max_tokens=1, temperature=0)
        return {"completion_tokens": result.completion_tokens}
    finally:
        model.close()


def _child_main(argv: list[str]) -> int:
    path, backend, device = (argv + ["", "cpu"])[:3]
    try:
        detail = open_once(path, backend or None, device)
        out, code = {"ok": True, **detail}, 0
    except EdgeLLMError as exc:
        out, code = {"ok": False, "error": type(exc).__name__, "message": errors.one_line(exc)}, 2
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a raw exception
        out, code = {"ok": False, "error": type(exc).__name__, "message": errors.one_line(exc)[:500]}, 3
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return code


def run_child(path: Path, backend: str | None = None, device: str = "cpu",
              timeout_s: float = DEFAULT_TIMEOUT_S) -> ChildResult:
    """Run :func:`open_once` on ``path`` in a fresh interpreter; classify how it ended."""
    cmd = [sys.executable, *CHILD_ENTRY, str(path), backend or "", device]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ChildResult("hang", f"did not finish within {timeout_s:.0f} s", timeout_s)
    seconds = time.perf_counter() - start
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return ChildResult("signal", name, seconds, error=name)
    last = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), "")
    try:
        report = json.loads(last)
    except ValueError:
        report = {"ok": False, "error": "exit", "message": f"exit code {proc.returncode}, no report"}
    if report.get("ok"):
        return ChildResult("ok", "opened and generated a token", seconds)
    status = "error" if proc.returncode == 2 else "raw"
    return ChildResult(status, str(report.get("message")), seconds, error=str(report.get("error")))


def _files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())


def _sha256(path: Path, backend: str | None, device: str) -> str:
    digest = hashlib.sha256(f"v{_RECORD_VERSION}|{backend}|{device}|".encode())
    for file in _files_of(path):
        digest.update(f"{file.name}:{file.stat().st_size}|".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _record_dir() -> Path:
    root = os.environ.get("EDGELLM_CACHE") or str(Path("~/.cache/edgellm").expanduser())
    return Path(root) / "checked"


def _raise_for(path: Path, result: ChildResult) -> None:
    if result.status == "signal":
        raise InvalidModelError(
            f"{path}: the native runtime crashed opening this file in a child process (signal "
            f"{result.message}); the file is damaged or not supported — it was not loaded here"
        )
    if result.status == "hang":
        raise InvalidModelError(
            f"{path}: opening it in a child process {result.message}; the file is damaged or too "
            "large for this machine — it was not loaded here"
        )
    kind = getattr(errors, result.error or "", None)
    if result.status == "error" and isinstance(kind, type) and issubclass(kind, EdgeLLMError):
        try:
            raise kind(result.message)
        except TypeError:  # an error class with its own constructor arguments
            pass
    raise InvalidModelError(
        f"{path}: opening it in a child process failed ({result.error}: {result.message})"
    )


def check_model(path: str | os.PathLike[str], backend: str | None = None, device: str = "cpu",
                timeout_s: float = DEFAULT_TIMEOUT_S, use_record: bool = True) -> ChildResult:
    """Open ``path`` once in a child process; raise the child's error, or one naming a crash or hang.

    Returns the child's result when it opened the model and generated a token (or the record
    says these exact bytes already did, ``status`` "ok" and ``seconds`` 0).
    """
    from edgellm.artifact import find_artifact

    artifact = find_artifact(path)
    key = _sha256(artifact.path, backend, device)
    record = _record_dir() / f"{key}.json"
    if use_record and record.is_file():
        logger.info("%s: passed a child-process check before (record %s)", artifact.path, record.name)
        return ChildResult("ok", "passed before (recorded)", 0.0)
    result = run_child(artifact.path, backend, device, timeout_s)
    logger.info("%s: child-process check: %s in %.1f s", artifact.path, result.status, result.seconds)
    if result.status != "ok":
        _raise_for(artifact.path, result)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"path": str(artifact.path), "seconds": round(result.seconds, 2)}))
    except OSError as exc:  # a read-only cache only costs a re-check next time
        logger.warning("could not record the check of %s (%s)", artifact.path, exc)
    return result


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
