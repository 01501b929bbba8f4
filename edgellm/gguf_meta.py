"""Read and validate a GGUF file's header with gguf-py, before any native code sees it.

llama.cpp aborts or prints to stderr on a damaged file; edgellm checks the magic, the
header and that every tensor's data lies inside the file first, and raises
:class:`InvalidModelError` naming the file and the fix.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidModelError, ModelNotFoundError

__all__ = ["read_gguf_metadata", "gguf_summary"]

_GGUF_MAGIC = b"GGUF"
_LIST_PREVIEW_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                      "tokenizer.ggml.scores")


def _open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise InvalidModelError(
            f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
            "the file is corrupt or another format — re-download or re-convert it"
        )
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError/IndexError/... on damage
        raise InvalidModelError(
            f"{path}: damaged GGUF header ({type(exc).__name__}: {exc}); re-download or re-convert it"
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InvalidModelError(
                f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} but the file "
                f"has {size} bytes; the file is truncated — re-download or re-convert it"
            )
    return reader


def read_gguf_metadata(path: Path, full_lists: bool = True) -> dict[str, Any]:
    """All key/value metadata of a validated GGUF file (token lists shortened unless asked)."""
    reader = _open_reader(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if not full_lists and key in _LIST_PREVIEW_KEYS:
            meta[key] = f"<{len(field.data)} items>"
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an unreadable value is reported, not fatal
            meta[key] = None
    return meta


def gguf_summary(path: Path) -> dict[str, Any]:
    """Tensor count, bytes and types of a validated GGUF file, plus short metadata."""
    reader = _open_reader(path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return {
        "n_tensors": len(reader.tensors),
        "n_params": n_params,
        "tensor_types": dict(types.most_common()),
        "tensor_bytes": sum(int(t.n_bytes) for t in reader.tensors),
    }
