"""The KV cache a session owns, the byte budget its sessions share, and the overflow policies.

* :class:`KVCache`: one session's cache as the backend reports it: capacity in tokens and
  bytes, precision, bytes really held (measured from the backend's buffers or state) and
  what it can do (:class:`KVAbility`: trim, shift, snapshot).
* :class:`KVBudget` and :func:`parse_bytes`: ``kv_budget="96MiB"`` shared by every session
  of a model; a session that does not fit is refused.
* :class:`OverflowPolicy`: what the shared decode loop does when a session is full
  (``error``, ``sliding`` with attention sinks, ``truncate`` of whole chat turns).
* :mod:`edgellm.kvcache.statefile`: ``session.save(path)`` / ``model.restore(path)``.
"""

from __future__ import annotations

from edgellm.kvcache.budget import KVBudget, format_bytes, parse_bytes
from edgellm.kvcache.cache import KV_PRECISIONS, KVAbility, KVCache, normalize_precision
from edgellm.kvcache.policy import Overflow, OverflowPolicy

__all__ = [
    "KV_PRECISIONS",
    "KVAbility",
    "KVBudget",
    "KVCache",
    "Overflow",
    "OverflowPolicy",
    "format_bytes",
    "normalize_precision",
    "parse_bytes",
]
