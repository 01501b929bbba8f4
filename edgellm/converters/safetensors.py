"""A lazy, validating reader for Hugging Face safetensors checkpoints (single or sharded).

Tensors are read one at a time, so a converter holds one tensor in
memory, not the model. The header of every shard is checked against the file size before
anything is read: a truncated or corrupt download is an error naming the file, not a
crash halfway through a conversion. Pickle checkpoints (``.bin``/``.pt``) are refused
unless explicitly allowed, because loading them can run arbitrary code.

No torch is needed: BF16 is widened to float32 with numpy.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import InvalidModelError, ModelNotFoundError, UnsafeCheckpointError, one_line

logger = logging.getLogger(__name__)

__all__ = ["TensorInfo", "Checkpoint", "open_checkpoint", "write_safetensors"]

# safetensors dtype -> (numpy dtype used to read the raw bytes, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # widened to float32 on read
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The reference implementation's rules (huggingface/safetensors, safetensors/src/tensor.rs:
# read_metadata and Metadata::validate): header at most 100 MB and a JSON object, every tensor's
# bytes == prod(shape) x dtype size, tensors sorted by offset tile the data section with no
# overlap and no hole, and the data section ends exactly at the end of the file.
_MAX_HEADER_BYTES = 100_000_000
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range inside the data section."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _header_json(path: Path, size: int) -> tuple[dict[str, object], int]:
    """The header object and the data section's start; damage is an InvalidModelError."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidModelError(f"{path}: {size} bytes, too short for a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise InvalidModelError(
                f"{path}: header claims {n} bytes but the file has {size} (safetensors allows at most "
                f"{_MAX_HEADER_BYTES}); the file is truncated or not safetensors — re-download it"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw) if raw[:1] == b"{" else None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidModelError(
            f"{path}: corrupt safetensors header ({one_line(exc)}); re-download it"
        ) from None
    if not isinstance(header, dict):
        raise InvalidModelError(f"{path}: safetensors header is not a JSON object; re-download it")
    return header, 8 + n


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    header, data_start = _header_json(path, size)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidModelError(f"{path}: __metadata__ must map names to strings; re-download it")
    infos = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    _check_layout(path, sorted(infos.values(), key=lambda t: (t.start, t.nbytes)), data_start, size)
    return infos


def _check_layout(path: Path, tensors: list[TensorInfo], data_start: int, size: int) -> None:
    """Sorted by offset, the tensors tile ``[data_start, size)``: no overlap, no hole, no tail."""
    end, previous = data_start, "the header"
    for t in tensors:
        if t.start != end:
            gap = f"leaves a hole of {t.start - end} bytes after {previous}"
            what = f"overlaps {previous}" if t.start < end else gap
            raise InvalidModelError(
                f"{path}: tensor {t.name!r} (bytes {t.start - data_start}-{t.start - data_start + t.nbytes} "
                f"of the data) {what}; the file is corrupt — re-download it"
            )
        end, previous = t.start + t.nbytes, f"tensor {t.name!r}"
    if end > size:
        raise InvalidModelError(f"{path}: truncated at byte {size} of {end}; re-download it")
    if end < size:
        raise InvalidModelError(
            f"{path}: {size - end} bytes after the last tensor that no header entry describes; "
            "the file is corrupt — re-download it"
        )


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]  # type: ignore[index]
        shape = tuple(entry["shape"])  # type: ignore[index]
        begin, end = entry["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise InvalidModelError(
            f"{path}: malformed header entry for tensor {name!r}; re-download it"
        ) from None
    if not all(_is_uint(x) for x in (*shape, begin, end)) or end < begin:
        raise InvalidModelError(
            f"{path}: tensor {name!r} has shape {list(shape)} and offsets [{begin}, {end}]; shape and "
            "offsets must be non-negative integers, the end not before the start — re-download it"
        )
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InvalidModelError(
            f"{path}: tensor {name!r} has dtype {dtype!r}; supported: {', '.join(_DTYPES)}"
        )
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if end - begin != expected:
        raise InvalidModelError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
            f"of {dtype} needs {expected}; the file is corrupt — re-download it"
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Checkpoint:
    """All tensors of a checkpoint folder, validated, read lazily by name."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]) -> None:
        self.folder = folder
        self.tensors = tensors

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array: float tensors as float32 (BF16/F16 widened).

        Read with a plain file read, not a memory map: mapped pages of a multi-GB
        checkpoint would stay in the converter's resident set; read buffers are freed
        with each tensor.
        """
        info = self.tensors[name]
        if info.dtype not in _FLOAT_DTYPES:  # F32 bytes labelled I32 would convert as integers
            raise InvalidModelError(
                f"{info.file}: tensor {name!r} is stored as {info.dtype}, but a model's weights are "
                f"floating point ({', '.join(_FLOAT_DTYPES)}); the header is wrong — re-save the checkpoint"
            )
        np_dtype = _DTYPES[info.dtype][0]
        with info.file.open("rb") as f:
            f.seek(info.start)
            arr = np.fromfile(f, dtype=np_dtype, count=info.numel)
        if arr.size != info.numel:
            raise InvalidModelError(f"{info.file}: tensor {name!r} is cut short; re-download the file")
        arr = arr.reshape(info.shape)
        if info.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if info.dtype in ("F16", "F64"):
            return arr.astype(np.float32)
        return np.asarray(arr)

    def items(self) -> Iterator[tuple[str, TensorInfo]]:
        """(name, info) pairs in file order."""
        return iter(self.tensors.items())

    def close(self) -> None:
        """Nothing is held open between reads; kept for symmetry with other readers."""


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidModelError(f"{index}: unreadable shard index ({exc}); re-download it") from None
        files = sorted({str(v) for v in weight_map.values()})
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise InvalidModelError(
                f"{index}: names shard {missing[0]!r}, which is missing from {folder}; "
                "download every shard"
            )
        return [folder / f for f in files]
    return sorted(folder.glob("*.safetensors"))


def _load_pickle(folder: Path, files: list[Path]) -> dict[str, np.ndarray]:
    import torch  # only with --allow-pickle: the user accepted the risk

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        for name, value in state.items():
            tensors[name] = value.float().numpy() if value.is_floating_point() else value.numpy()
    return tensors


def open_checkpoint(folder: Path, allow_pickle: bool = False) -> Checkpoint:
    """Open and validate every weight file of a Hugging Face checkpoint folder."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {str(folder)!r} does not exist")
    files = _shard_files(folder)
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{pickles[0]}: pickle checkpoint refused (loading it can run arbitrary code); "
                "convert it to safetensors, or pass --allow-pickle if you trust the source"
            )
        if pickles:
            return _PickleCheckpoint(folder, _load_pickle(folder, pickles))
        raise ModelNotFoundError(f"{folder}: no *.safetensors weights found")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in _read_header(file).items():
            if name in tensors:
                raise InvalidModelError(f"{file}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return Checkpoint(folder, tensors)


#: dtypes :func:`write_safetensors` writes: safetensors name -> numpy dtype.
WRITE_DTYPES = {"F32": "<f4", "F16": "<f2"}


def write_safetensors(path: Path, source: Any, dtype: str = "F32") -> int:
    """Stream every tensor of ``source`` into one safetensors file at ``path``, one at a time.

    ``source`` is anything with the checkpoint read side (``items()`` giving shapes, ``read``):
    the header is computed from the shapes first, then each tensor is read, converted and
    written before the next is read, so memory holds one tensor. Returns the largest tensor's
    bytes as read (float32).
    """
    np_dtype = np.dtype(WRITE_DTYPES[dtype])
    shapes = [(name, tuple(info.shape)) for name, info in source.items()]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = math.prod(shape) * np_dtype.itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    largest = 0
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            arr = source.read(name)
            if tuple(arr.shape) != shape:
                raise InvalidModelError(f"{path}: tensor {name!r} read as {list(arr.shape)}, "
                                        f"not {list(shape)}")
            largest = max(largest, arr.size * 4)
            f.write(memoryview(np.ascontiguousarray(arr, dtype=np_dtype)).cast("B"))  # no bytes copy
    return largest


class _PickleCheckpoint(Checkpoint):
    """A checkpoint already loaded from pickle files (only with allow_pickle)."""

    def __init__(self, folder: Path, arrays: dict[str, np.ndarray]) -> None:
        infos = {
            n: TensorInfo(n, folder, "F32", tuple(a.shape), 0, a.nbytes) for n, a in arrays.items()
        }
        super().__init__(folder, infos)
        self._arrays = arrays

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]
