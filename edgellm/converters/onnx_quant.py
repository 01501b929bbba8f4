"""Block-wise weight quantization in numpy, in the layouts ONNX Runtime's kernels read.

Two consumers, one block format (ONNX Runtime ``docs/ContribOperators.md``):

* ``com.microsoft.MatMulNBits``: a linear layer ``y = x @ Wᵀ`` with ``W`` of shape
  ``[N, K]`` (a Hugging Face ``Linear.weight``: out x in) quantized along K in blocks of
  ``block_size``. ``B`` is uint8 ``[N, K / block, block * bits / 8]`` (two 4-bit values per
  byte, low nibble first), ``scales`` float ``[N * K / block]``, ``zero_points`` uint8
  ``[N * ceil(K / block * bits / 8)]`` packed the same way; absent zero points mean
  ``2^(bits-1)``. Dequantized: ``(q - zp) * scale``.
* ``com.microsoft.GatherBlockQuantized``: an embedding table ``[V, H]`` quantized along H;
  uint8 data ``[V, H * bits / 8]`` packed along the last axis, scales ``[V, H / block]``.

Symmetric blocks follow ONNX Runtime's own quantizer (MLAS ``MlasQuantizeBlockwise``): the
value of largest magnitude maps to ``-2^(bits-1)`` exactly, zero point ``2^(bits-1)``.
Asymmetric blocks span [min(0, lo), max(0, hi)] over ``2^bits - 1`` steps, so zero is exact.
Rounding is to nearest even (numpy ``rint``), as in MLAS. One tensor at a time, float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QuantizedWeight", "dequantize", "pack_low_first", "quantize_blockwise"]


@dataclass(frozen=True)
class QuantizedWeight:
    """One block-quantized ``[N, K]`` weight: codes, scales and (asymmetric) zero points."""

    codes: np.ndarray  # uint8 [N, K_pad / block, block]: one code per element, unpacked
    scales: np.ndarray  # float32 [N, K_pad / block]
    zero_points: np.ndarray | None  # uint8 [N, K_pad / block], None when symmetric
    bits: int
    block_size: int
    k: int  # the unpadded K

    @property
    def n_blocks(self) -> int:
        """Blocks per row (K padded up to a whole block)."""
        return int(self.scales.shape[1])

    def matmul_nbits_b(self) -> np.ndarray:
        """``B`` of MatMulNBits: uint8 ``[N, n_blocks, block * bits / 8]``."""
        n = self.codes.shape[0]
        packed = pack_low_first(self.codes.reshape(n * self.n_blocks, self.block_size), self.bits)
        return packed.reshape(n, self.n_blocks, -1)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits ``zero_points``: uint8, each row packed to ``ceil(n_blocks * bits / 8)``."""
        if self.zero_points is None:
            return None
        return pack_low_first(self.zero_points, self.bits).reshape(-1)

    def gather_data(self) -> np.ndarray:
        """GatherBlockQuantized ``data``: uint8 ``[N, K * bits / 8]`` (K a whole number of blocks)."""
        n = self.codes.shape[0]
        return pack_low_first(self.codes.reshape(n, -1), self.bits)


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 ``codes`` (each < 2^bits) into bytes, low bits first.

    A row of odd length (4-bit) is padded with one zero code.
    """
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2).astype(np.uint8)
    return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4))


#: Range shrink factors tried per block by the clipping search (1.0 = plain round-to-nearest).
CLIP_GRID: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)


def _round_block(blocks: np.ndarray, bits: int, symmetric: bool,
                 shrink: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scales, zero points) of every block with its range shrunk by ``shrink``."""
    levels, mid = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        scales = np.take_along_axis(blocks, idx, axis=-1)[..., 0] * np.float32(shrink) / -mid
        safe = np.where(scales == 0, np.float32(1), scales)
        codes = np.clip(np.rint(blocks / safe[..., None]) + mid, 0, levels).astype(np.uint8)
        return codes, scales.astype(np.float32), None
    lo = np.minimum(blocks.min(axis=-1), 0.0) * np.float32(shrink)
    hi = np.maximum(blocks.max(axis=-1), 0.0) * np.float32(shrink)
    scales = ((hi - lo) / levels).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)
    zp = np.clip(np.rint(-lo / safe), 0, levels)
    codes = np.clip(np.rint(blocks / safe[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
    return codes, scales, zp.astype(np.uint8)


def _error(blocks: np.ndarray, codes: np.ndarray, scales: np.ndarray, zp: np.ndarray | None,
           bits: int) -> np.ndarray:
    zero = zp if zp is not None else np.full(scales.shape, 1 << (bits - 1), np.uint8)
    diff = (codes.astype(np.float32) - zero[..., None]) * scales[..., None] - blocks
    return np.einsum("...i,...i->...", diff, diff)


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int, symmetric: bool,
                       clip_grid: tuple[float, ...] = (1.0,)) -> QuantizedWeight:
    """Quantize a float ``[N, K]`` weight along K in blocks (K is zero-padded to a block).

    ``clip_grid``: range shrink factors tried per block; each block keeps the one with the
    least squared error (round-to-nearest is ``(1.0,)``; :data:`CLIP_GRID` searches).
    """
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    blocks = w.reshape(n, -1, block_size)
    codes, scales, zp = _round_block(blocks, bits, symmetric, clip_grid[0])
    if len(clip_grid) > 1:
        best = _error(blocks, codes, scales, zp, bits)
        for shrink in clip_grid[1:]:
            c, s, z = _round_block(blocks, bits, symmetric, shrink)
            err = _error(blocks, c, s, z, bits)
            better = err < best
            codes[better], scales[better], best[better] = c[better], s[better], err[better]
            if zp is not None and z is not None:
                zp[better] = z[better]
    return QuantizedWeight(codes, scales, zp, bits, block_size, k)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The float ``[N, K]`` weight a quantized one stands for (tests and error estimates)."""
    zp = qw.zero_points if qw.zero_points is not None else np.full(qw.scales.shape, 1 << (qw.bits - 1))
    w = (qw.codes.astype(np.float32) - zp[..., None].astype(np.float32)) * qw.scales[..., None]
    return w.reshape(w.shape[0], -1)[:, : qw.k]
