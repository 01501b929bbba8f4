"""Byte budgets: ``"96MiB"``, ``"1.5GB"`` or an int, shared by every session of a model."""

from __future__ import annotations

import re
import threading
from typing import Any

from edgellm.errors import InvalidInputError, KVBudgetError

__all__ = ["KVBudget", "format_bytes", "parse_bytes"]

#: Unit -> bytes. Binary units (KiB, MiB, GiB) are powers of 1024; decimal ones (KB, MB, GB)
#: powers of 1000, as in IEC 80000-13. A bare "K"/"M"/"G" is binary, as llama.cpp reads it.
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any, name: str = "kv_budget") -> int:
    """Bytes from an int (``100_000_000``) or a size string (``"96MiB"``, ``"1.5GB"``, ``"512k"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInputError(f"{name} must be bytes (an int) or a size such as '96MiB', not {value!r}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match[2].lower() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidInputError(
                f"{name} {value!r} is not a size; write bytes or a number with a unit "
                f"(B, KiB, MiB, GiB, KB, MB, GB), e.g. '96MiB' or '1.5GB'"
            )
        value = float(match[1]) * _UNITS[unit]
    if value != value or value < 1 or value > 2**60:  # NaN, zero, negative, absurd
        raise InvalidInputError(f"{name} must be at least 1 byte (and below 1 EiB), got {value!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``12582912`` -> ``'12.0 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


class KVBudget:
    """The KV bytes every session of one model may reserve together (thread-safe).

    ``total_bytes`` None means no limit. Each open session reserves its cache's capacity;
    closing it gives the bytes back.
    """

    def __init__(self, total_bytes: int | None) -> None:
        self.total_bytes = total_bytes
        self._held: dict[object, int] = {}
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by open sessions."""
        with self._lock:
            return sum(self._held.values())

    @property
    def free_bytes(self) -> int | None:
        """Bytes still free (None: no limit)."""
        if self.total_bytes is None:
            return None
        return self.total_bytes - self.reserved_bytes

    def reserve(self, key: object, n_bytes: int, what: str) -> None:
        """Reserve ``n_bytes`` for session ``key``, or raise :class:`KVBudgetError` naming the numbers."""
        with self._lock:
            used = sum(self._held.values())
            if self.total_bytes is not None and used + n_bytes > self.total_bytes:
                free = self.total_bytes - used
                raise KVBudgetError(
                    f"{what} needs {format_bytes(n_bytes)} of KV cache but only {format_bytes(free)} "
                    f"of the kv_budget {format_bytes(self.total_bytes)} is free ({len(self._held)} "
                    "session(s) open); close a session, ask for a smaller n_ctx, or load with a "
                    "larger kv_budget"
                )
            self._held[key] = n_bytes

    def release(self, key: object) -> None:
        """Give back what session ``key`` reserved (harmless when it reserved nothing)."""
        with self._lock:
            self._held.pop(key, None)
