"""The KV cache object every backend session exposes.

A backend keeps its cache in its own form (llama.cpp cells of one ``llama_context``,
OpenVINO variable states of one infer request, ONNX Runtime buffers bound with I/O
binding). :class:`KVCache` is the same view of all three: capacity in tokens and bytes,
the precision of the stored elements, the bytes really held now (asked from the backend
each time: llama.cpp's own sequence-state size, OpenVINO's state tensors, the written part
of ONNX Runtime's buffers) and the abilities the shared decode loop chooses its overflow
handling from.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgellm.errors import InvalidInputError

__all__ = ["KV_PRECISIONS", "KVAbility", "KVCache", "normalize_precision"]

#: Bytes per cached K or V element. q8_0 / q4_0 are ggml blocks of 32 values (34 and 18
#: bytes, ggml-common.h); OpenVINO's u8 cache also keeps a scale and zero point per token and
#: head (8 bytes per head_dim values), which the backend adds to its bytes per token.
KV_PRECISIONS: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "u8": 1.0}

#: Other spellings users bring from the runtimes' own documentation.
_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "q8": "q8_0",
            "q4": "q4_0", "int8": "u8"}


def normalize_precision(value: Any, allowed: Iterable[str], where: str) -> str:
    """``value`` as a canonical KV precision name among ``allowed``, or a one-line error."""
    allowed = tuple(allowed)
    name = str(value).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in allowed:
        raise InvalidInputError(
            f"kv_precision {value!r} is not supported by {where}; use one of: {', '.join(allowed)}"
        )
    return name


class KVAbility(enum.Enum):
    """What a backend can do to a session's cache without recomputing it."""

    TRIM = "trim"  # drop every position from n on (prefix reuse)
    SHIFT = "shift"  # drop a range of positions and move the later ones down (RoPE re-applied)
    SNAPSHOT = "snapshot"  # copy the cache out and back in (save / restore)


@dataclass
class KVCache:
    """One session's KV cache: what it can hold, what it holds, what it can do.

    ``bytes_per_token`` counts every copy the backend keeps (ONNX Runtime's ping-pong
    buffers are two). ``held_bytes()`` asks the backend; ``n_tokens`` is how many positions
    are filled now.
    """

    capacity_tokens: int
    bytes_per_token: int
    precision: str
    abilities: frozenset[KVAbility]
    _held: Callable[[], int] = field(repr=False)
    _used: Callable[[], int] = field(repr=False)

    @property
    def capacity_bytes(self) -> int:
        """Bytes the cache may grow to (what the budget reserves for it)."""
        return self.capacity_tokens * self.bytes_per_token

    @property
    def n_tokens(self) -> int:
        """Positions filled now."""
        return self._used()

    def held_bytes(self) -> int:
        """Bytes the backend reports holding for this cache now (measured, not computed)."""
        return int(self._held())

    def can(self, ability: KVAbility) -> bool:
        """True when the backend has ``ability``."""
        return ability in self.abilities

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready facts (for ``info()``, ``memory()`` and reports)."""
        return {
            "capacity_tokens": self.capacity_tokens,
            "capacity_bytes": self.capacity_bytes,
            "bytes_per_token": self.bytes_per_token,
            "precision": self.precision,
            "n_tokens": self.n_tokens,
            "held_bytes": self.held_bytes(),
            "abilities": sorted(a.value for a in self.abilities),
        }
