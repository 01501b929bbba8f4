"""Moving cached keys to new positions: the K-shift llama.cpp does, for caches edgellm holds as arrays.

Rotary embeddings (RoPE) rotate each pair of key components by ``position x omega_i``, so a
key cached at position ``p`` is moved to ``p - d`` by one more rotation of ``-d x omega_i``
(rotations compose; a YaRN-style magnitude factor already in the key is kept). Values carry no
position and just move. This is exact for every RoPE whose frequencies do not depend on the
sequence length; for the others (dynamic NTK, YaRN's blend, Phi-3's long-context factors,
Gemma 3's per-layer bases) :func:`shift_frequencies` returns None and the decode loop
re-prefills the kept tokens instead.

The cached layout is Hugging Face's (what optimum exports for ONNX Runtime and OpenVINO):
``[..., positions, head_dim]`` with the two halves of ``head_dim`` as the pair
(``rotate_half``), not interleaved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgellm.spec import ModelSpec

__all__ = ["SHIFTABLE", "llama3_factors", "rotate_keys", "shift_frequencies", "shift_positions"]


def llama3_factors(rope: Mapping[str, Any], base: float, dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency divisors (transformers ``_compute_llama3_parameters``)."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float64)


def _divisors(rope: Mapping[str, Any], base: float, dim: int) -> np.ndarray | float:
    return {"default": lambda: 1.0, "linear": lambda: float(rope.get("factor", 1.0)),
            "llama3": lambda: llama3_factors(rope, base, dim)}[_kind(rope)]()


def _kind(rope: Mapping[str, Any]) -> str:
    return str(rope.get("rope_type", rope.get("type", "default")) or "default").lower()


#: RoPE scalings whose frequencies are fixed (a shift is one rotation), by rope_type.
SHIFTABLE: frozenset[str] = frozenset({"default", "linear", "llama3"})
#: Architectures whose layers do not all share one RoPE (Gemma 3: local and global bases).
_PER_LAYER_ROPE = frozenset({"gemma3"})


def shift_frequencies(spec: ModelSpec) -> np.ndarray | None:
    """``omega_i`` (radians per position) of each of the ``head_dim / 2`` pairs, or None.

    None when a shift cannot be a pure rotation: an unknown or length-dependent scaling, or
    layers with different bases.
    """
    rope = dict(spec.rope_scaling or {})
    if spec.architecture in _PER_LAYER_ROPE or _kind(rope) not in SHIFTABLE or spec.head_dim % 2:
        return None
    dim, base = spec.head_dim, float(spec.rope_theta)
    omega = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return omega / _divisors(rope, base, dim)


def rotate_keys(keys: np.ndarray, delta: int, omega: np.ndarray) -> np.ndarray:
    """``keys`` (``[..., positions, head_dim]``, half-split pairs) moved by ``delta`` positions."""
    half = keys.shape[-1] // 2
    angle = delta * omega
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    k = keys.astype(np.float32, copy=False)
    k1, k2 = k[..., :half], k[..., half:]
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1).astype(keys.dtype, copy=False)


def shift_positions(data: np.ndarray, axis: int, start: int, n: int, past: int, is_key: bool,
                    omega: np.ndarray) -> np.ndarray:
    """``data`` with positions ``[start, start + n)`` dropped along ``axis`` and the later ones
    moved down by ``n`` (keys re-rotated); the result has ``past - n`` positions."""
    moved = np.take(data, range(start + n, past), axis=axis)
    if is_key:
        moved = rotate_keys(np.moveaxis(moved, axis, -2), -n, omega)
        moved = np.moveaxis(moved, -2, axis)
    return np.concatenate([np.take(data, range(start), axis=axis), moved], axis=axis)

