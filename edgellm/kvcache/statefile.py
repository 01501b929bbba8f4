"""Saved sessions: ``session.save(path)`` and ``model.restore(path)``.

One file: a magic line, the length of a JSON header (4 bytes, little-endian), the header,
then the backend's own cache bytes (llama.cpp's sequence state, OpenVINO's state tensors,
ONNX Runtime's KV buffers). The header records the model's fingerprint, the backend, the
KV precision, the tokens the cache holds and the payload's length and SHA-256, so a file
from other weights, another backend or precision, or a damaged or truncated file, is
refused in one line before any byte reaches the backend. Files are written to a temporary
name and renamed, so an interrupted save never leaves a half-written file at ``path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidInputError, SessionStateError, one_line

__all__ = ["MAGIC", "VERSION", "read_state", "write_state"]

MAGIC = b"EDGELLM-KV-STATE\n"
VERSION = 1
_LEN = struct.Struct("<I")
_MAX_HEADER = 64 * 2**20  # a header holds token ids: 64 MiB is ~10 M tokens of JSON


def write_state(path: Path, header: dict[str, Any], payload: bytes) -> Path:
    """Write ``header`` and ``payload`` to ``path`` atomically; the header gains the checksum."""
    head = {**header, "version": VERSION, "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest()}
    raw = json.dumps(head, separators=(",", ":")).encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidInputError(f"cannot save the session to {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(raw)) + raw)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InvalidInputError(f"cannot save the session to {path}: {one_line(exc)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_state(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header and payload of a saved session, checked for damage (not yet for the model)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionStateError(f"saved session {path} does not exist") from None
    except OSError as exc:
        raise SessionStateError(f"cannot read saved session {path}: {one_line(exc)}") from None
    if not data.startswith(MAGIC):
        raise SessionStateError(f"{path} is not an edgellm saved session (no {MAGIC.strip().decode()} "
                                "header); save one with session.save(path)")
    start = len(MAGIC) + _LEN.size
    if len(data) < start:
        raise SessionStateError(f"{path}: saved session is truncated inside its header; save it again")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    if n > _MAX_HEADER or start + n > len(data):
        raise SessionStateError(f"{path}: saved session is truncated or damaged (header of {n} bytes); "
                                "save it again")
    try:
        header = json.loads(data[start:start + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise SessionStateError(f"{path}: saved session header is damaged ({one_line(exc)}); "
                                "save it again") from None
    payload = data[start + n:]
    if header.get("version") != VERSION:
        raise SessionStateError(f"{path}: saved session format version {header.get('version')!r} is not "
                                f"{VERSION}; save it again with this edgellm")
    if len(payload) != header.get("payload_bytes") or \
            hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise SessionStateError(f"{path}: saved session is damaged (its cache bytes do not match their "
                                "checksum); save it again")
    return header, payload


def check_header(path: Path, header: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a saved session whose model, backend or KV precision is not ``expected``'s."""
    names = {"fingerprint": "model weights", "backend": "backend", "kv_precision": "KV precision"}
    for key, what in names.items():
        if header.get(key) != expected[key]:
            raise SessionStateError(
                f"{path} was saved with {what} {header.get(key)!r}, but this model has "
                f"{expected[key]!r}; restore it onto the model (and options) it was saved from"
            )
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise SessionStateError(f"{path}: saved session has no token list; save it again")
