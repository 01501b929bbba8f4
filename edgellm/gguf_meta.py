"""Read and validate a GGUF file's header before any native code sees it.

llama.cpp aborts or prints to stderr on a damaged file; edgellm checks the magic, the
header and that every tensor's data lies inside the file first, and raises
:class:`InvalidModelError` naming the file and the fix.

The parser is edgellm's own (the GGUF spec, ggml ``docs/gguf.md``): it reads the key/value
section straight from a memory map and skips the vocabulary arrays unless asked for them.
gguf-py's ``GGUFReader`` builds a numpy view per array element, which costs seconds for a
49k-token vocabulary, on every load.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidModelError, ModelNotFoundError
from edgellm.spec import ModelSpec

__all__ = ["GGUFHeader", "ggml_nbytes", "read_gguf_header", "read_gguf_spec", "read_gguf_metadata",
           "gguf_summary"]

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value types -> struct format (8 = string, 9 = array are handled apart)
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_LIST_KEYS_SKIPPED = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                      "tokenizer.ggml.scores")


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's info record: name, GGML type id, dims and absolute data range."""

    name: str
    type_id: int
    dims: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """The parsed header: version, metadata and tensor records."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorEntry]


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated()
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated()
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool = True) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, n = self.unpack("<I"), self.unpack("<Q")
            if not keep:
                return self._skip_array(item_type, n)
            return [self.value(item_type) for _ in range(n)]
        raise ValueError(f"unknown value type {vtype}")

    def _skip_array(self, item_type: int, n: int) -> str:
        if item_type in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[item_type]) * n
        elif item_type == 8:
            for _ in range(n):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        else:
            for _ in range(n):
                self.value(item_type, keep=False)
        if self.pos > len(self.buf):
            raise _Truncated()
        return f"<{n} items>"


def ggml_nbytes(type_id: int, dims: Sequence[int]) -> int:
    """Bytes of a tensor of GGML type ``type_id`` (gguf-py's block table) and element ``dims``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return math.prod(dims) // block * type_size


def _parse(buf: Any, full_lists: bool) -> GGUFHeader:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (edgellm reads versions 2 and 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"), keep=full_lists or key not in _LIST_KEYS_SKIPPED)
    records = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        records.append((name, cur.unpack("<I"), dims, cur.unpack("<Q")))
    align = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = (cur.pos + align - 1) // align * align
    tensors = [TensorEntry(n, t, d, data_start + off, ggml_nbytes(t, d)) for n, t, d, off in records]
    return GGUFHeader(version, meta, tensors)


def read_gguf_header(path: Path, full_lists: bool = False) -> GGUFHeader:
    """Parse and validate ``path``; any damage is an InvalidModelError naming the file."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != _MAGIC:
            raise InvalidModelError(
                f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                "the file is corrupt or another format — re-download or re-convert it"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                header = _parse(buf, full_lists)
            except _Truncated:
                raise InvalidModelError(
                    f"{path}: the GGUF header ends early ({size} bytes); the file is truncated — "
                    "re-download or re-convert it"
                ) from None
            except (ValueError, KeyError, struct.error) as exc:
                raise InvalidModelError(
                    f"{path}: damaged GGUF header ({exc}); re-download or re-convert it"
                ) from None
    for t in header.tensors:
        if t.start + t.nbytes > size:
            raise InvalidModelError(
                f"{path}: tensor {t.name!r} ends at byte {t.start + t.nbytes} but the file has {size} "
                "bytes; the file is truncated — re-download or re-convert it"
            )
    return header


def read_gguf_spec(path: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The ModelSpec of a validated GGUF file (and its short metadata), tying included."""
    header = read_gguf_header(path, full_lists=False)
    tied = not any(t.name == "output.weight" for t in header.tensors)
    spec = ModelSpec.from_gguf_metadata(header.metadata, source=str(path), tied_embeddings=tied)
    return spec, header.metadata


def read_gguf_metadata(path: Path, full_lists: bool = True) -> dict[str, Any]:
    """All key/value metadata of a validated GGUF file (vocabulary lists only if asked)."""
    return read_gguf_header(path, full_lists=full_lists).metadata


def gguf_summary(path: Path) -> dict[str, Any]:
    """Tensor count, parameter count, bytes and types of a validated GGUF file."""
    from gguf.constants import GGMLQuantizationType

    header = read_gguf_header(path)
    types = Counter(GGMLQuantizationType(t.type_id).name for t in header.tensors)
    n_params = sum(math.prod(t.dims) for t in header.tensors)
    return {
        "n_tensors": len(header.tensors),
        "n_params": n_params,
        "tensor_types": dict(types.most_common()),
        "tensor_bytes": sum(t.nbytes for t in header.tensors),
    }
