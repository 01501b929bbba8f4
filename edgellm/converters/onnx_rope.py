"""Rotary-embedding tables for GroupQueryAttention's ``cos_cache`` / ``sin_cache`` inputs.

GroupQueryAttention with ``do_rotary=1`` rotates Q and K itself, reading row ``p`` (the
absolute position) of two ``[max_positions, rotary_dim / 2]`` tables. Those tables are
computed here, in numpy float64 then stored float32, the way transformers computes them
(``modeling_rope_utils.py``): one function per ``rope_type``, found through
:data:`ROPE_TYPES`. A type missing from the table is refused by the builder, naming it.

``longrope`` (Phi-3) has two tables, short and long factors; which one applies depends on
the total sequence length (transformers switches when it passes
``original_max_position_embeddings``), so the graph selects between them with an ``If``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ROPE_TYPES", "RopeTables", "rope_tables", "rope_type"]


@dataclass(frozen=True)
class RopeTables:
    """cos/sin tables for one rope base; ``long`` is set for longrope (the long-factor pair)."""

    cos: np.ndarray
    sin: np.ndarray
    long: tuple[np.ndarray, np.ndarray] | None = None
    switch_at: int | None = None  # longrope: the long tables apply past this total length


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The ``rope_type`` of a config's ``rope_scaling`` block (``default`` when none)."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default").lower()


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))


def _default(theta: float, dim: int, scaling: Mapping[str, Any], cfg: Mapping[str, Any]) -> np.ndarray:
    return _base_inv_freq(theta, dim)


def _linear(theta: float, dim: int, scaling: Mapping[str, Any], cfg: Mapping[str, Any]) -> np.ndarray:
    return _base_inv_freq(theta, dim) / float(scaling["factor"])


def _llama3(theta: float, dim: int, scaling: Mapping[str, Any], cfg: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1 frequency smoothing (transformers ``_compute_llama3_parameters``), the divisors
    the runtime's K-shift uses too."""
    from edgellm.kvcache.rope import llama3_factors

    return _base_inv_freq(theta, dim) / llama3_factors(scaling, theta, dim)


_InvFreq = Callable[[float, int, Mapping[str, Any], Mapping[str, Any]], np.ndarray]

#: rope_type -> inverse frequencies (longrope is handled by :func:`rope_tables` on top).
ROPE_TYPES: dict[str, _InvFreq] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "longrope": _default,
}


def _tables(inv_freq: np.ndarray, positions: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    return ((np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32))


def rope_tables(theta: float, rotary_dim: int, positions: int, scaling: Mapping[str, Any] | None,
                cfg: Mapping[str, Any]) -> RopeTables:
    """The tables for ``positions`` rows; the caller has checked ``rope_type`` is in the table."""
    kind = rope_type(scaling)
    inv = ROPE_TYPES[kind](theta, rotary_dim, scaling or {}, cfg)
    if kind != "longrope":
        return RopeTables(*_tables(inv, positions))
    # transformers _compute_longrope_parameters: one attention factor scales both tables
    orig = int(cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings"))
    factor = positions / orig if positions > orig else 1.0
    default_attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    attn = float(scaling.get("attention_factor") or default_attn)
    short = np.asarray(scaling["short_factor"], np.float64)
    long = np.asarray(scaling["long_factor"], np.float64)
    cos_s, sin_s = _tables(inv / short, positions, attn)
    cos_l, sin_l = _tables(inv / long, positions, attn)
    return RopeTables(cos_s, sin_s, (cos_l, sin_l), orig)
