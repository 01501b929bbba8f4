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


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Quantize a float ``[N, K]`` weight along K in blocks (K is zero-padded to a block)."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    blocks = w.reshape(n, -1, block_size)
    levels = (1 << bits) - 1
    mid = 1 << (bits - 1)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scales = extreme / -mid
        safe = np.where(scales == 0, 1.0, scales)
        q = np.rint(blocks / safe[..., None]) + mid
        codes = np.clip(q, 0, levels).astype(np.uint8)
        return QuantizedWeight(codes, scales.astype(np.float32), None, bits, block_size, k)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scales = (hi - lo) / levels
    safe = np.where(scales == 0, 1.0, scales)
    zp = np.clip(np.rint(-lo / safe), 0, levels)
    q = np.rint(blocks / safe[..., None]) + zp[..., None]
    codes = np.clip(q, 0, levels).astype(np.uint8)
    return QuantizedWeight(codes, scales.astype(np.float32), zp.astype(np.uint8), bits, block_size, k)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The float ``[N, K]`` weight a quantized one stands for (tests and error estimates)."""
    zp = qw.zero_points if qw.zero_points is not None else np.full(qw.scales.shape, 1 << (qw.bits - 1))
    w = (qw.codes.astype(np.float32) - zp[..., None].astype(np.float32)) * qw.scales[..., None]
    return w.reshape(w.shape[0], -1)[:, : qw.k]
