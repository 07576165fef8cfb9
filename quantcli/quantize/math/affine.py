"""Pure quantization math (numpy only): parameters, quantize, dequantize.

Affine quantization maps a real x to q = clip(round(x / scale) + zero_point, qmin, qmax).
Ranges always contain zero so that zero (padding, ReLU outputs) is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

INT_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int32": (-(2**31), 2**31 - 1),
}
_TINY = np.float32(1e-12)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point, scalar (per-tensor) or a vector along `axis` (per-channel)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # of `dtype`
    dtype: str  # "int8" | "uint8" | "int32"
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


def qrange(dtype: str, reduce_range: bool = False) -> tuple[int, int]:
    """Integer limits; reduce_range drops one bit (7-bit values) for CPUs without VNNI."""
    lo, hi = INT_RANGES[dtype]
    if reduce_range and dtype in ("int8", "uint8"):
        return (lo // 2, hi // 2) if dtype == "int8" else (0, 127)
    return lo, hi


def activation_qparams(
    lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False
) -> QParams:
    """Per-tensor parameters for an activation whose calibrated range is [lo, hi]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = qrange(dtype)
    if symmetric:
        bound = max(-lo, hi)
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zero = (qmin + qmax + 1) // 2  # 128 for uint8, 0 for int8
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zero = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    scale = np.float32(max(scale, _TINY))
    return QParams(np.array(scale, np.float32), np.array(zero, dtype=dtype), dtype)


def weight_qparams(
    w: np.ndarray,
    axis: int | None,
    dtype: str = "int8",
    symmetric: bool = True,
    reduce_range: bool = False,
) -> QParams:
    """Parameters for a constant weight, per-channel along `axis` or per-tensor (axis None)."""
    w = np.asarray(w, dtype=np.float32)
    qmin, qmax = qrange(dtype, reduce_range)
    if axis is None:
        lo, hi = np.minimum(w.min(initial=0.0), 0.0), np.maximum(w.max(initial=0.0), 0.0)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        lo = np.minimum(w.min(axis=reduce_axes, initial=0.0), 0.0)
        hi = np.maximum(w.max(axis=reduce_axes, initial=0.0), 0.0)
    if symmetric:
        bound = np.maximum(-lo, hi)
        # int8 symmetric uses [-127, 127] so that -x quantizes to -q exactly.
        half = (qmax - max(qmin, -qmax)) / 2 if dtype == "int8" else (qmax - qmin) / 2
        scale = bound / half
        zero = np.full(np.shape(scale), 0 if dtype == "int8" else (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.maximum(np.asarray(scale, np.float32), _TINY).astype(np.float32)
    return QParams(scale, np.asarray(zero).astype(dtype), dtype, axis)


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """q = clip(round_half_even(x / scale) + zero_point): what QuantizeLinear computes."""
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast(qp.scale, x.ndim, qp.axis)
    zero = _broadcast(qp.zero_point.astype(np.int64), x.ndim, qp.axis)
    qmin, qmax = INT_RANGES[qp.dtype]
    q = np.rint(x / scale).astype(np.int64) + zero
    return np.clip(q, qmin, qmax).astype(qp.dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    scale = _broadcast(qp.scale, q.ndim, qp.axis)
    zero = _broadcast(qp.zero_point.astype(np.int64), q.ndim, qp.axis)
    return ((q.astype(np.int64) - zero) * scale).astype(np.float32)


def bias_qparams(input_scale: np.ndarray, weight_scale: np.ndarray) -> QParams:
    """int32 bias parameters: scale = input scale x weight scale, zero point 0."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    scale = np.maximum(scale, _TINY)
    axis = 0 if scale.ndim == 1 else None
    return QParams(scale, np.zeros(scale.shape, np.int32), "int32", axis)


def clamps_within(qp: QParams, lo: float | None, hi: float | None) -> bool:
    """True when every dequantized value of `qp` lies in [lo, hi] (None: unbounded).

    Then a Relu/Clip with those bounds before the QuantizeLinear changes nothing: the
    quantizer saturates exactly where the activation would clamp.
    """
    qmin, qmax = INT_RANGES[qp.dtype]
    scale, zero = float(qp.scale), int(qp.zero_point)
    low, high = (qmin - zero) * scale, (qmax - zero) * scale
    tol = 1e-6 * max(abs(low), abs(high), 1e-30)
    return (lo is None or low >= lo - tol) and (hi is None or high <= hi + tol)


def quantize_weight(
    w: np.ndarray,
    axis: int | None,
    dtype: str = "int8",
    reduce_range: bool = False,
    pair_safe: bool = False,
    importance: np.ndarray | None = None,
    gram: np.ndarray | None = None,
) -> tuple[np.ndarray, QParams]:
    """A constant weight as stored integers and their parameters (symmetric).

    `pair_safe` keeps int8 weights within what x86 kernels without VNNI can add in int16
    (`saturation.py`); 7-bit (`reduce_range`) and uint8 weights are safe already.
    """
    if not (pair_safe and dtype == "int8" and not reduce_range):
        qp = weight_qparams(w, axis, dtype, True, reduce_range)
        return quantize(w, qp), qp
    key = None
    if _REUSED is not None:  # a search builds the same weights over and over
        digest = hashlib.sha1(np.ascontiguousarray(w, np.float32).tobytes())
        for extra in (importance, gram):
            if extra is not None:
                digest.update(np.ascontiguousarray(extra, np.float64).tobytes())
        key = (digest.hexdigest(), w.shape, axis)
        if key in _REUSED:
            return _REUSED[key]
    from quantcli.quantize.math.saturation import pair_safe_int8

    q, scale = pair_safe_int8(w, axis, axis is not None, importance, gram)
    found = q, QParams(scale, np.zeros(scale.shape, np.int8), "int8", axis)
    if _REUSED is not None:
        _REUSED[key] = found
    return found


_REUSED: dict | None = None


@contextlib.contextmanager
def reusing_weights(cache: dict | None = None) -> Iterator[None]:
    """Within the block, a pair-safe weight already quantized (same values, axis and
    importance) is reused instead of searched again: `quantcli tune` builds many
    candidates of one model. A `cache` given by the caller outlives the block (a cluster
    worker keeps one across the trials it runs)."""
    global _REUSED
    _REUSED = {} if cache is None else cache
    try:
        yield
    finally:
        _REUSED = None
