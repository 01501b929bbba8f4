"""Read and validate a GGUF file's header before any native code sees it.

llama.cpp aborts or prints to stderr on a damaged file; edgellm checks the magic, the
header with the limits of llama.cpp's own reader (``ggml/src/gguf.cpp``: string and array
lengths, counts against the file size, value types, alignment, tensor records and offsets) and
that every tensor's data lies inside the file first, then the model-level rules of
:mod:`edgellm.gguf_rules`, and raises :class:`InvalidModelError` naming the file and the fix.
Every claim is bounded before it is used, so time and memory follow the file, never a count
written in it.

The parser is edgellm's own (the GGUF spec, ggml ``docs/gguf.md``): it reads the key/value
section straight from a memory map and skips the vocabulary arrays unless asked for them
(the token list is still walked once, raw, for repeated tokens and byte-fallback tokens).
gguf-py's ``GGUFReader`` builds a numpy view per array element, which costs seconds for a
49k-token vocabulary, on every load.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidModelError, ModelNotFoundError
from edgellm.spec import ModelSpec

__all__ = ["GGUFHeader", "SkippedArray", "TensorEntry", "ggml_nbytes", "read_gguf_header", "read_gguf_spec",
           "read_gguf_metadata", "gguf_summary"]

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value types -> struct format (8 = string, 9 = array are handled apart)
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_TOKENS = "tokenizer.ggml.tokens"
_LIST_KEYS_SKIPPED = (_TOKENS, "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                      "tokenizer.ggml.scores")
# The limits llama.cpp's reader enforces (ggml/src/gguf.cpp, ggml/include/ggml.h): beyond them it
# refuses the file, so edgellm refuses it first, with the reason.
_MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH
_MAX_ARRAY_ITEMS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) including the terminating zero
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a one-byte key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8  # name length, name, n_dims, type, offset


class _Truncated(Exception):
    """A read would run past the end of the buffer: ``needed`` bytes, reading ``what``."""

    def __init__(self, needed: int, what: str) -> None:
        super().__init__(what)
        self.needed, self.what = needed, what


class _Damaged(Exception):
    """A header value llama.cpp would refuse (the message says which and why)."""


def _duplicate(what: str, item: object) -> _Damaged:
    # llama-vocab.cpp asserts id_to_token.size() == token_to_id.size(): a repeated token aborts
    text = item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
    return _Damaged(f"{what} lists {text[:40]!r} twice (llama.cpp aborts on a repeated token)")


class SkippedArray:
    """A metadata array that was not read (a vocabulary list): its length and item type only."""

    def __init__(self, n: int, item_type: int) -> None:
        self.n, self.item_type = n, item_type

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"<{self.n} items>"

    __str__ = __repr__


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
    """The parsed header: version, metadata (with each key's GGUF value type) and tensor records."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorEntry]
    types: dict[str, int] = field(default_factory=dict)
    byte_tokens: frozenset[int] = frozenset()  # bytes with a byte-fallback token (<0x0A>, ...)


def _item_bytes(item_type: int) -> int:
    """Fewest bytes one array item takes (a string: its 8-byte length)."""
    return 8 if item_type == _STRING else struct.calcsize(_SCALARS[item_type])


def _byte_value(token: bytes) -> int | None:
    """The byte a byte-fallback token stands for: ``<0x0A>`` -> 10, or a one-byte token itself."""
    if len(token) == 6 and token.startswith(b"<0x") and token.endswith(b">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return token[0] if len(token) == 1 else None


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)
        self.byte_tokens: set[int] = set()  # bytes the vocabulary can fall back to

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Truncated(self.pos + n, what)

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def _string_length(self, what: str) -> int:
        n = self.unpack("<Q", what)
        if n > _MAX_STRING_BYTES:
            raise _Damaged(f"{what} claims a string of {n} bytes (llama.cpp reads at most 2^30)")
        self.need(n, what)
        return int(n)

    def string(self, what: str) -> str:
        n = self._string_length(what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, keep: bool = True, unique: bool = False) -> Any:
        """One value; ``unique``: an array whose items must differ (a vocabulary's tokens)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type, n = self.unpack("<I", what), self.unpack("<Q", what)
            self._check_array(item_type, n, what)
            if not keep:
                return self._skip_array(item_type, n, what, unique)
            items = [self.value(item_type, what) for _ in range(n)]
            if unique and len(set(items)) != n:
                seen: set[Any] = set()
                raise _duplicate(what, next(x for x in items if x in seen or seen.add(x)))
            if unique:
                found = (_byte_value(x.encode("utf-8", "surrogatepass")) for x in items if isinstance(x, str))
                self.byte_tokens.update(b for b in found if b is not None)
            return items
        raise _Damaged(f"{what} has value type {vtype}, not a GGUF type (0-12)")

    def _check_array(self, item_type: int, n: int, what: str) -> None:
        """Refuse a claim at once, before any per-item work: time and memory never follow ``n``."""
        if item_type not in _SCALARS and item_type != _STRING:
            raise _Damaged(f"{what} is an array of type {item_type} (arrays hold scalars or strings)")
        if n > _MAX_ARRAY_ITEMS:
            raise _Damaged(f"{what} claims {n} items (llama.cpp reads at most 2^30)")
        self.need(n * _item_bytes(item_type), what)

    def _skip_array(self, item_type: int, n: int, what: str, unique: bool) -> SkippedArray:
        if item_type in _SCALARS:
            self.pos += _item_bytes(item_type) * n
            return SkippedArray(n, item_type)
        seen: set[bytes] = set()
        for _ in range(n):
            length = self._string_length(what)  # moves past the length field first
            if unique:  # raw bytes: no need to decode the list to find a repeat
                token = bytes(self.buf[self.pos:self.pos + length])
                if token in seen:
                    raise _duplicate(what, token)
                seen.add(token)
                if (byte := _byte_value(token)) is not None:
                    self.byte_tokens.add(byte)
            self.pos += length
        return SkippedArray(n, item_type)

    def count(self, what: str, min_bytes: int) -> int:
        """A count of records, each at least ``min_bytes``: more than the file can hold is damage."""
        n = self.unpack("<Q", what)
        if n * min_bytes > self.size - self.pos:
            raise _Damaged(f"the header claims {n} {what}, more than the file's {self.size} bytes can hold")
        return n


def ggml_nbytes(type_id: int, dims: Sequence[int]) -> int:
    """Bytes of a tensor of GGML type ``type_id`` (gguf-py's block table) and element ``dims``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return math.prod(dims) // block * type_size


def _block(name: str, type_id: int) -> int:
    """Elements per block of a GGML type; an unknown type id is damage."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)][0]
    except (ValueError, KeyError):
        raise _Damaged(f"tensor {name!r} has GGML type {type_id}, which is not a known type") from None


def _read_kv(cur: _Cursor, n_kv: int, full_lists: bool) -> tuple[dict[str, Any], dict[str, int]]:
    meta: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        if not key or key in meta:
            raise _Damaged(f"key #{i} is {'empty' if not key else f'a duplicate of {key!r}'}")
        types[key] = cur.unpack("<I", f"key {key!r}")
        meta[key] = cur.value(types[key], f"key {key!r}", keep=full_lists or key not in _LIST_KEYS_SKIPPED,
                              unique=key == _TOKENS)
    return meta, types


def _alignment(meta: dict[str, Any], types: dict[str, int]) -> int:
    """``general.alignment``: a uint32 power of two, as gguf.cpp requires (32 when absent)."""
    if "general.alignment" not in meta:
        return _DEFAULT_ALIGNMENT
    align = meta["general.alignment"]
    if types["general.alignment"] != _UINT32:
        raise _Damaged(f"general.alignment has GGUF type {types['general.alignment']}; it must be uint32 (4)")
    if align <= 0 or align & (align - 1):
        raise _Damaged(f"general.alignment is {align}; it must be a power of two (32 by default)")
    return int(align)


def _read_tensor_info(cur: _Cursor, i: int, seen: set[str]) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string(f"tensor #{i} name")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES or name in seen:
        reason = "a duplicate" if name in seen else f"longer than {_MAX_NAME_BYTES} bytes"
        raise _Damaged(f"tensor #{i} name {name[:80]!r} is {reason}")
    seen.add(name)
    n_dims = cur.unpack("<I", f"tensor {name!r}")
    if n_dims > _MAX_DIMS:
        raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most {_MAX_DIMS})")
    dims = tuple(cur.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims))
    type_id = cur.unpack("<I", f"tensor {name!r}")
    if math.prod(dims) >= 2**63:
        raise _Damaged(f"tensor {name!r} has shape {list(dims)}, too many elements to address")
    block = _block(name, type_id)
    if dims and dims[0] % block:
        raise _Damaged(f"tensor {name!r} has rows of {dims[0]} elements, not a multiple of its type's "
                       f"block of {block}")
    return name, type_id, dims, cur.unpack("<Q", f"tensor {name!r}")


def _parse(buf: Any, full_lists: bool) -> GGUFHeader:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in (2, 3):
        raise _Damaged(f"GGUF version {version} (edgellm and llama.cpp read versions 2 and 3)")
    n_tensors = cur.count("tensors", _MIN_TENSOR_INFO_BYTES)
    n_kv = cur.count("keys", _MIN_KV_BYTES)
    meta, types = _read_kv(cur, n_kv, full_lists)
    align = _alignment(meta, types)
    seen: set[str] = set()
    records = [_read_tensor_info(cur, i, seen) for i in range(n_tensors)]
    data_start = (cur.pos + align - 1) // align * align
    tensors, expected = [], 0
    for name, type_id, dims, offset in records:
        if offset != expected:  # gguf.cpp: tensors in order, each padded to the alignment
            raise _Damaged(f"tensor {name!r} starts at data offset {offset}, expected {expected} "
                           f"(tensors are stored in order, each padded to {align} bytes)")
        nbytes = ggml_nbytes(type_id, dims)
        tensors.append(TensorEntry(name, type_id, dims, data_start + offset, nbytes))
        expected += (nbytes + align - 1) // align * align
    return GGUFHeader(version, meta, tensors, types, frozenset(cur.byte_tokens))


def _fix() -> str:
    return "re-download or re-convert it"


def read_gguf_header(path: Path, full_lists: bool = False) -> GGUFHeader:
    """Parse and validate ``path``; any damage is an InvalidModelError naming the file.

    The checks are llama.cpp's, done in Python before native code sees the file: the reader's
    (``ggml/src/gguf.cpp``: lengths, counts, types, alignment, tensor records and offsets) and
    the model loader's (:mod:`edgellm.gguf_rules`: layer, head, expert and vocabulary limits).
    """
    from edgellm.gguf_rules import check_model_rules

    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != _MAGIC:
            raise InvalidModelError(
                f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                f"the file is corrupt or another format — {_fix()}"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                header = _parse(buf, full_lists)
            except _Truncated as exc:
                raise InvalidModelError(
                    f"{path}: truncated at byte {size} of at least {exc.needed} ({exc.what} runs past "
                    f"the end of the file); {_fix()}"
                ) from None
            except _Damaged as exc:
                raise InvalidModelError(f"{path}: damaged GGUF header: {exc}; {_fix()}") from None
    end = max((t.start + t.nbytes for t in header.tensors), default=0)
    if end > size:
        last = max(header.tensors, key=lambda t: t.start + t.nbytes)
        raise InvalidModelError(
            f"{path}: truncated at byte {size} of {end} (tensor {last.name!r} ends at byte {end}); {_fix()}"
        )
    check_model_rules(path, header)
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
