"""Pure-numpy INT4 block quantization of MatMul weights and its two ONNX encodings.

A weight ``W`` has shape ``[K, N]`` (``Y = X @ W``); blocks of ``block_size`` run along K and
every (block, column) pair has its own scale, plus a zero point when asymmetric.

Encodings:

* ``com.microsoft::MatMulNBits`` (bits=4), see onnxruntime ``docs/ContribOperators.md``:
  ``B`` uint8 ``[N, n_blocks, block_size // 2]``, element ``2j`` of a block in the low nibble
  and ``2j + 1`` in the high nibble; ``scales`` ``[N, n_blocks]``; optional packed
  ``zero_points`` uint8 ``[N, ceil(n_blocks / 2)]`` (same nibble order, each row of N padded
  on its own). Without ``zero_points`` the kernel uses the default zero point 8, so
  symmetric int4 values ``q`` in [-8, 7] are stored as ``q + 8`` with no zero-point input
  (this is what ORT's own ``quantize_matmul_4bits(..., is_symmetric=True)`` emits).
* ONNX ``DequantizeLinear`` (opset 21) with blocked ``axis=0``: ``x`` INT4/UINT4 ``[K, N]``,
  ``x_scale`` ``[ceil(K / block_size), N]``, ``x_zero_point`` like ``x_scale`` (UINT4) or
  omitted (INT4). The last block may be partial, so no padding is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

SYM_MIN, SYM_MAX = -8, 7
ASYM_MAX = 15
MATMULNBITS_SYM_ZERO_POINT = 8
# Ratio 1.0 first: ties keep the unclipped range, so clip search is never worse per block.
CLIP_RATIOS = np.linspace(1.0, 0.5, 20)
CLIP_MIN_GAIN = 0.25  # a clipped range must cut the block's squared error by a quarter
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256


@dataclass(frozen=True)
class BlockQuantized:
    """Block-quantized INT4 weight.

    ``q``: ``[k_padded, N]`` with ``k_padded = n_blocks * block_size``; int8 values in [-8, 7]
    when symmetric, uint8 values in [0, 15] otherwise. Rows ``>= k`` are padding (they hold
    the quantized value of 0). ``scales``: float32 ``[n_blocks, N]``; ``zero_points``: uint8
    ``[n_blocks, N]`` or None when symmetric.
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int
    k: int
    symmetric: bool

    @property
    def n(self) -> int:
        return int(self.q.shape[1])

    @property
    def n_blocks(self) -> int:
        return int(self.scales.shape[0])

    def dequantize(self) -> np.ndarray:
        """Float32 ``[k, N]`` weight as a runtime reconstructs it: ``(q - zp) * scale``."""
        scale = np.repeat(self.scales, self.block_size, axis=0)
        zp = None
        if self.zero_points is not None:
            zp = np.repeat(self.zero_points, self.block_size, axis=0)
        return dequantize_values(self.q, scale, zp)[: self.k]


def check_block_size(block_size: int) -> None:
    """Reject block sizes MatMulNBits cannot run (power of two in [16, 256])."""
    ok = MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0
    if not ok:
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")


def n_blocks_for(k: int, block_size: int) -> int:
    return -(-k // block_size)


def quantize_values(
    w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, symmetric: bool
) -> np.ndarray:
    """Round ``w`` onto the int4 grid given broadcastable ``scale`` (and ``zp``)."""
    x = np.asarray(w, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
    if symmetric:
        return np.clip(np.rint(x), SYM_MIN, SYM_MAX).astype(np.int8)
    return np.clip(np.rint(x) + zp, 0, ASYM_MAX).astype(np.uint8)


def dequantize_values(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
    """``(q - zp) * scale`` in float32, the arithmetic ORT's kernels use."""
    x = q.astype(np.float32)
    if zp is not None:
        x = x - zp.astype(np.float32)
    return x * scale.astype(np.float32)


def _range_params(
    lo: np.ndarray, hi: np.ndarray, symmetric: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (float32, never zero) and zero point covering ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    if symmetric:
        # Positive scale that still uses -8 when the negative side dominates.
        scale = np.maximum(hi / SYM_MAX, -lo / -SYM_MIN).astype(np.float32)
    else:
        scale = ((hi - lo) / ASYM_MAX).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    if symmetric:
        return scale, None
    zp = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, ASYM_MAX).astype(np.uint8)
    return scale, zp


def block_params(
    blocks: np.ndarray, symmetric: bool, clip_search: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales/zero points for ``blocks`` of shape ``[..., block_size, N]`` -> ``[..., N]``.

    The range always includes 0, so zero padding neither widens a block's range nor adds
    reconstruction error (0 maps exactly to q=0 / q=zp); padding therefore can't move scales.
    With ``clip_search`` every block independently picks the clipping ratio in
    ``CLIP_RATIOS`` with the lowest squared reconstruction error (vectorized over blocks).
    """
    w = np.asarray(blocks, dtype=np.float64)
    lo = np.minimum(w.min(axis=-2), 0.0)
    hi = np.maximum(w.max(axis=-2), 0.0)
    ratios = CLIP_RATIOS if clip_search else CLIP_RATIOS[:1]
    best_scale, best_zp, best_err = None, None, None
    for ratio in ratios:
        scale, zp = _range_params(lo * ratio, hi * ratio, symmetric)
        err = _block_error(w, scale, zp, symmetric)
        if best_err is None:
            best_scale, best_zp, best_err = scale, zp, err
            base_err = err
            continue
        # Clip only for a clear gain: clipping trades outlier error for rounding error,
        # and outlier weights weigh more in a layer's output than in the weight error.
        better = (err < best_err) & (err < (1.0 - CLIP_MIN_GAIN) * base_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        if zp is not None:
            best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def _block_error(
    w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, symmetric: bool
) -> np.ndarray:
    s, z = scale[..., None, :], None if zp is None else zp[..., None, :]
    deq = dequantize_values(quantize_values(w, s, z, symmetric), s, z)
    return np.square(w - deq).sum(axis=-2)


def pad_k(w: np.ndarray, block_size: int) -> np.ndarray:
    """Zero-pad the K axis (axis 0) up to a multiple of ``block_size``."""
    k = w.shape[0]
    pad = n_blocks_for(k, block_size) * block_size - k
    return np.pad(w, ((0, pad), (0, 0))) if pad else w


def quantize_rtn(
    w: np.ndarray, block_size: int, symmetric: bool = True, clip_search: bool = True
) -> BlockQuantized:
    """Round-to-nearest block quantization of a ``[K, N]`` weight."""
    check_block_size(block_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    blocks = pad_k(w, block_size).reshape(-1, block_size, n)
    scales, zps = block_params(blocks, symmetric, clip_search)
    z = None if zps is None else zps[:, None, :]
    q = quantize_values(blocks, scales[:, None, :], z, symmetric).reshape(-1, n)
    return BlockQuantized(q, scales, zps, block_size, k, symmetric)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack uint8 values in [0, 15] pairwise along the last axis, even index in the low nibble."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def pack_matmulnbits(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, scales, zero_points)`` for ``com.microsoft::MatMulNBits`` with ``bits=4``.

    B: uint8 ``[N, n_blocks, block_size // 2]``; scales: float32 ``[N, n_blocks]``;
    zero_points: uint8 ``[N, ceil(n_blocks / 2)]`` or None when symmetric (the op's default
    zero point 8 then applies, matching the ``q + 8`` storage). Use attributes ``K=bq.k``,
    ``N=bq.n``, ``bits=4``, ``block_size=bq.block_size``.
    """
    if bq.symmetric:
        unsigned = (bq.q.astype(np.int16) + MATMULNBITS_SYM_ZERO_POINT).astype(np.uint8)
    else:
        unsigned = bq.q.astype(np.uint8)
    per_col = unsigned.T.reshape(bq.n, bq.n_blocks, bq.block_size)
    b = np.ascontiguousarray(_pack_nibbles(per_col))
    scales = np.ascontiguousarray(bq.scales.T, dtype=np.float32)
    zps = None
    if bq.zero_points is not None:
        zps = np.ascontiguousarray(_pack_nibbles(bq.zero_points.T.astype(np.uint8)))
    return b, scales, zps


def to_dequantize_linear_int4(
    bq: BlockQuantized,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, x_scale, x_zero_point)`` for opset-21 ``DequantizeLinear(axis=0, block_size)``.

    x: ``ml_dtypes.int4`` (symmetric) or ``ml_dtypes.uint4`` ``[K, N]``; x_scale: float32
    ``[ceil(K / block_size), N]``; x_zero_point: ``ml_dtypes.uint4`` of the same shape, or
    None when symmetric. ``onnx_ir.tensor`` serializes these packed two per byte, low first.
    """
    q = bq.q[: bq.k]
    if bq.symmetric:
        return q.astype(ml_dtypes.int4), bq.scales.astype(np.float32), None
    zps = bq.zero_points.astype(ml_dtypes.uint4)
    return q.astype(ml_dtypes.uint4), bq.scales.astype(np.float32), zps


def float16_scaled(scales: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Block scales stored as float16 times one power of two: ``(half, factor)``, the scales
    read back as ``half.astype(float32) * factor`` (exact in float32).

    The factor puts the largest scale in [2^14, 2^15) (float16 holds up to 65504), so no
    scale overflows and every scale down to 2^-28 of the largest is a float16 normal that
    keeps 11 significant bits (relative error at most 2^-11); smaller ones, whose blocks hold
    the smallest weights, lose bits gradually.
    """
    s = np.asarray(scales, dtype=np.float32)
    top = float(np.abs(s).max()) if s.size else 0.0
    exponent = int(np.frexp(top)[1]) - 15 if 0 < top < np.inf else 0
    factor = np.float32(np.ldexp(np.float32(1), exponent))
    return (s / factor).astype(np.float16), factor
