"""Named numpy arrays to bytes and back: the payload of a saved OpenVINO or ONNX Runtime session."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

import numpy as np

from edgellm.errors import SessionStateError

__all__ = ["pack_arrays", "unpack_arrays"]

_LEN = struct.Struct("<I")


def pack_arrays(arrays: Iterable[tuple[str, np.ndarray]]) -> bytes:
    """``[(name, array), ...]`` as one blob: a JSON index (name, dtype, shape) then the raw bytes."""
    items = [(name, np.ascontiguousarray(a)) for name, a in arrays]
    index = [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in items]
    head = json.dumps(index).encode("utf-8")
    return b"".join([_LEN.pack(len(head)), head, *(a.tobytes() for _, a in items)])


def unpack_arrays(data: bytes, where: str) -> list[tuple[str, np.ndarray]]:
    """The arrays :func:`pack_arrays` wrote; a blob that does not add up is a SessionStateError."""
    try:
        (n,) = _LEN.unpack_from(data, 0)
        index = json.loads(data[_LEN.size:_LEN.size + n].decode("utf-8"))
        pos, out = _LEN.size + n, []
        for item in index:
            dtype, shape = np.dtype(item["dtype"]), tuple(int(d) for d in item["shape"])
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if pos + size > len(data):
                raise ValueError("array data runs past the end")
            flat = np.frombuffer(data, dtype, int(np.prod(shape)), pos)
            out.append((str(item["name"]), flat.reshape(shape)))
            pos += size
    except (struct.error, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise SessionStateError(
            f"{where}: the saved KV cache does not unpack ({exc}); save it again") from None
    if pos != len(data):
        raise SessionStateError(
            f"{where}: the saved KV cache has {len(data) - pos} stray bytes; save it again")
    return out
