"""External data of an ONNX model, read from the protobuf itself before ONNX Runtime opens it.

A minimal field scan (no ``onnx`` package, nothing loaded): every tensor's external-data
location is found and refused when it is absolute, climbs out with ``..``, resolves outside
the model folder (a symlink) or is missing, or when the data file is shorter than a tensor's
byte range.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidModelError

__all__ = ["ExternalData", "external_data_files"]


# -- external data: a minimal scan of the ONNX protobuf -------------------------------------

#: Per ONNX message, its fields (numbers from onnx/onnx.proto) that hold messages which can
#: contain a TensorProto; every other field is skipped without being read. TensorProto
#: field 13 is ``external_data`` (StringStringEntryProto: key 1, value 2), field 8 ``name``.
_SUBMESSAGES: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
}
_MODEL_GRAPH_FIELD = 7


@dataclass(frozen=True)
class ExternalData:
    """One tensor stored outside ``model.onnx``: where, and which byte range."""

    tensor: str
    location: str
    offset: int
    length: int | None


class _Corrupt(Exception):
    """The protobuf scan hit bytes that cannot be an ONNX model (internal)."""


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= end:
            raise _Corrupt(f"a field runs past the end of its message at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Corrupt(f"an over-long varint at byte {pos}")


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field number, start, end)`` of each length-delimited field of one message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Corrupt(f"field number 0 at byte {pos}")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            continue
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        if wire != 2:
            raise _Corrupt(f"wire type {wire} at byte {pos} (not written by ONNX)")
        size, pos = _varint(buf, pos, end)
        start, pos = pos, pos + size
        if pos <= end:
            yield field, start, pos
    if pos != end:
        raise _Corrupt(f"a field runs {pos - end} bytes past the end of its message")


def _tensor_external(buf: Any, start: int, end: int) -> ExternalData | None:
    name, entries = "", {}
    for field, a, b in _fields(buf, start, end):
        if field == 8:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == 13:
            kv = {f: bytes(buf[x:y]).decode("utf-8", "replace") for f, x, y in _fields(buf, a, b)}
            entries[kv.get(1, "")] = kv.get(2, "")
    if "location" not in entries:
        return None
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise _Corrupt(f"tensor {name!r} has a non-numeric external-data offset/length") from None
    return ExternalData(name, entries["location"], offset, length)


def _walk(buf: Any, start: int, end: int, kind: str, out: list[ExternalData]) -> None:
    if kind == "TensorProto":
        found = _tensor_external(buf, start, end)
        if found is not None:
            out.append(found)
        return
    children = _SUBMESSAGES[kind]
    for field, a, b in _fields(buf, start, end):
        child = children.get(field)
        if child is not None:
            _walk(buf, a, b, child, out)


def _scan_model(buf: Any, size: int) -> list[ExternalData]:
    if not any(field == _MODEL_GRAPH_FIELD for field, _, _ in _fields(buf, 0, size)):
        raise _Corrupt("no graph in the model")
    found: list[ExternalData] = []
    _walk(buf, 0, size, "ModelProto", found)
    return found


def external_data_files(model: Path) -> list[ExternalData]:
    """The external-data references of ``model`` (an .onnx file), read without ONNX Runtime.

    Raises :class:`InvalidModelError` when the file is not a readable ONNX protobuf or a
    location is absolute, climbs out with ``..``, resolves outside the model folder (a
    symlink) or is missing, or the data file is shorter than a tensor's byte range.
    """
    size = model.stat().st_size
    if size == 0:
        raise InvalidModelError(f"{model}: the file is empty; re-convert the model")
    try:
        with model.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            refs = _scan_model(buf, size)
    except _Corrupt as exc:
        raise InvalidModelError(
            f"{model}: not a readable ONNX model ({exc}); the file is corrupt or truncated: "
            "re-convert the model"
        ) from None
    sizes: dict[str, int] = {}
    for ref in refs:
        data = _check_location(model, ref)
        sizes.setdefault(ref.location, data.stat().st_size)
        end = ref.offset + (ref.length or 0)
        if end > sizes[ref.location]:
            raise InvalidModelError(
                f"{model}: external data file {ref.location!r} holds {sizes[ref.location]} bytes but "
                f"tensor {ref.tensor!r} ends at byte {end}; the data file is truncated or from "
                "another export: copy it again or re-convert the model"
            )
    return refs


def _check_location(model: Path, ref: ExternalData) -> Path:
    folder = model.parent.resolve()
    loc = ref.location
    parts = re.split(r"[\\/]", loc)
    if not loc or loc.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", loc) or ".." in parts:
        raise InvalidModelError(
            f"{model}: tensor {ref.tensor!r} names external data {loc!r}, outside the model "
            "folder; refused (external data must be a relative path inside the folder): "
            "re-convert the model"
        )
    data = (folder / loc).resolve()
    if not data.is_relative_to(folder):
        raise InvalidModelError(
            f"{model}: external data {loc!r} resolves to {str(data)!r}, outside the model folder "
            "(a symlink?); refused: copy the data file into the folder"
        )
    if not data.is_file():
        raise InvalidModelError(
            f"{model}: its external data file {loc!r} is missing; copy it beside {model.name} "
            "or re-convert the model"
        )
    return data
