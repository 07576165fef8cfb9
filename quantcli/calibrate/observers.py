"""Per-tensor streaming statistics that keep no activations and merge exactly.

The histogram grid is anchored at zero and its bin width is a power of two, `2**exp`. Bin
`i` covers `[i*w, (i+1)*w)` for `i` in `[-B, B)`. Doubling the width maps bin `i` to bin
`i >> 1` exactly (`floor(x/2w) == floor(floor(x/w)/2)`), so coarsening loses nothing that a
single pass at the final width would have kept. The final width depends only on the
largest |x| ever seen, hence the state after any sequence of updates and merges equals one
pass over all the data, bit for bit, whatever the order and the shard boundaries.
"""

from __future__ import annotations

import base64
import math
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_BINS_PER_SIDE = 2048
EXP_MIN = -1074  # 2**-1074 is the smallest positive float64: no narrower bin exists
FORMAT_VERSION = 1


def fit_exp(amax: float, bins_per_side: int) -> int:
    """Smallest bin exponent (>= EXP_MIN) whose grid holds every |x| <= amax: amax < B * 2**exp."""
    if amax == 0.0:
        return EXP_MIN
    _, e = math.frexp(amax)  # amax < 2**e, and B == 2**(bit_length - 1)
    return max(e - (bins_per_side.bit_length() - 1), EXP_MIN)


def _bin_counts(x: np.ndarray, exp: int, bins_per_side: int) -> np.ndarray:
    """Histogram of finite float32/64 values on the grid of width 2**exp (all must fit)."""
    # Scaling by a power of two is exact in x's own precision (no float64 copy needed)
    # unless the product underflows, which only happens for |x| far below one bin.
    if x.dtype == np.float32 and exp < -120:  # bin width below float32's normal range
        x = x.astype(np.float64)
    idx = np.floor(x / x.dtype.type(math.ldexp(1.0, exp)))
    # A tiny negative x that underflowed to -0.0 must still land in bin -1, not 0.
    idx[(idx == 0) & (x < 0)] = -1
    bins = idx.astype(np.intp)
    bins += bins_per_side
    return np.bincount(bins, minlength=2 * bins_per_side)


def _coarsen(counts: np.ndarray, steps: int, bins_per_side: int) -> np.ndarray:
    """Counts after doubling the bin width `steps` times (bin i -> i >> steps)."""
    if steps <= 0:
        return counts.copy()
    # Past log2(B) doublings every bin is already 0 or -1; capping keeps groups inside the array.
    group = 1 << min(steps, bins_per_side.bit_length() - 1)
    half = bins_per_side // group
    out = np.zeros_like(counts)
    out[bins_per_side - half : bins_per_side + half] = counts.reshape(-1, group).sum(axis=1)
    return out


class TensorStats:
    """Count, min, max, exact zeros, non-finite counts and a zero-anchored histogram.

    The size is fixed (2 * bins_per_side int64 counts) whatever the number of samples.
    Non-finite values are counted in `nan_count` / `inf_count` and otherwise ignored.
    Exact zeros (also in bin 0) are counted apart because quantization represents them
    exactly: range searches leave them out, which matters after ReLU.
    """

    __slots__ = (
        "bins_per_side",
        "count",
        "counts",
        "exp",
        "inf_count",
        "max",
        "min",
        "nan_count",
        "zero_count",
    )

    def __init__(self, bins_per_side: int = DEFAULT_BINS_PER_SIDE) -> None:
        if bins_per_side < 2 or bins_per_side & (bins_per_side - 1):
            raise ValueError(f"bins_per_side must be a power of two >= 2, got {bins_per_side}")
        self.bins_per_side = bins_per_side
        self.exp: int | None = None  # None until the first finite value
        self.count = 0
        self.zero_count = 0
        self.min = math.inf
        self.max = -math.inf
        self.nan_count = 0
        self.inf_count = 0
        self.counts = np.zeros(2 * bins_per_side, dtype=np.int64)

    @property
    def width(self) -> float:
        """Bin width 2**exp (0.0 before any finite value)."""
        return 0.0 if self.exp is None else math.ldexp(1.0, self.exp)

    @property
    def amax(self) -> float:
        """Largest |x| seen (0.0 before any finite value)."""
        return max(-self.min, self.max) if self.count else 0.0

    @property
    def nonfinite_count(self) -> int:
        return self.nan_count + self.inf_count

    def signed_counts(self, *, drop_zeros: bool = False) -> np.ndarray:
        """Copy of the histogram, optionally without the exact zeros (bin i at index i + B)."""
        out = self.counts.copy()
        if drop_zeros:
            out[self.bins_per_side] -= self.zero_count
        return out

    def abs_counts(self, *, drop_zeros: bool = False) -> np.ndarray:
        """Histogram of |x|: bin j covers [j*w, (j+1)*w) for j in [0, B).

        Negative bin -j-1 holds |x| in (j*w, (j+1)*w], so the rare x exactly on a negative
        edge lands one bin low; every consumer tolerates one bin of error anyway.
        """
        b = self.bins_per_side
        out = self.counts[b:] + self.counts[b - 1 :: -1]
        if drop_zeros:
            out[0] -= self.zero_count
        return out

    def update(self, x: npt.ArrayLike) -> None:
        """Add every value of `x` (any shape); NaN and +-Inf are counted, not binned."""
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        x = x.ravel()
        finite = np.isfinite(x)
        if not finite.all():
            nans = int(np.isnan(x).sum())
            self.nan_count += nans
            self.inf_count += int(x.size - finite.sum()) - nans
            x = x[finite]
        if x.size == 0:
            return
        lo, hi = float(x.min()) + 0.0, float(x.max()) + 0.0  # + 0.0 turns -0.0 into 0.0
        self._widen_to(fit_exp(max(-lo, hi), self.bins_per_side))
        assert self.exp is not None
        self.counts += _bin_counts(x, self.exp, self.bins_per_side)
        self.count += int(x.size)
        self.zero_count += int(np.count_nonzero(x == 0))
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def _widen_to(self, exp: int) -> None:
        if self.exp is None:
            self.exp = exp
        elif exp > self.exp:
            self.counts = _coarsen(self.counts, exp - self.exp, self.bins_per_side)
            self.exp = exp

    def merge(self, other: TensorStats) -> TensorStats:
        """New state equal to one pass over the data of both; neither input changes."""
        if other.bins_per_side != self.bins_per_side:
            raise ValueError(
                f"cannot merge stats with {self.bins_per_side} and {other.bins_per_side} "
                "bins per side"
            )
        out = TensorStats(self.bins_per_side)
        for part in (self, other):
            if part.exp is not None:
                out._widen_to(part.exp)
        for part in (self, other):
            if part.exp is not None:
                assert out.exp is not None
                out.counts += _coarsen(part.counts, out.exp - part.exp, self.bins_per_side)
        out.count = self.count + other.count
        out.zero_count = self.zero_count + other.zero_count
        out.min = min(self.min, other.min)
        out.max = max(self.max, other.max)
        out.nan_count = self.nan_count + other.nan_count
        out.inf_count = self.inf_count + other.inf_count
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; counts keep only the nonzero span, zlib'd little-endian int64."""
        nonzero = np.flatnonzero(self.counts)
        start, stop = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 0)
        span = self.counts[start:stop].astype("<i8").tobytes()
        return {
            "format": FORMAT_VERSION,
            "bins_per_side": self.bins_per_side,
            "exp": self.exp,
            "count": self.count,
            "zero_count": self.zero_count,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
            "first_bin": start - self.bins_per_side,
            "counts": base64.b64encode(zlib.compress(span)).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorStats:
        """Inverse of to_dict; raises ValueError on data that cannot be a valid state."""
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported TensorStats format {data.get('format')!r}")
        out = cls(int(data["bins_per_side"]))
        out.exp = None if data["exp"] is None else int(data["exp"])
        out.count = int(data["count"])
        out.zero_count = int(data["zero_count"])
        out.nan_count = int(data["nan_count"])
        out.inf_count = int(data["inf_count"])
        if out.count:
            out.min, out.max = float(data["min"]), float(data["max"])
        span = np.frombuffer(zlib.decompress(base64.b64decode(data["counts"])), dtype="<i8")
        start = int(data["first_bin"]) + out.bins_per_side
        if not 0 <= start <= start + span.size <= out.counts.size:
            raise ValueError("TensorStats counts fall outside the histogram")
        out.counts[start : start + span.size] = span
        out._check()
        return out

    def _check(self) -> None:
        ok = (
            (self.count == 0) == (self.exp is None)
            and min(self.count, self.nan_count, self.inf_count, int(self.counts.min())) >= 0
            and int(self.counts.sum()) == self.count
            and 0 <= self.zero_count <= self.counts[self.bins_per_side]
            and (self.count == 0 or self.min <= self.max)
        )
        if not ok:
            raise ValueError("inconsistent TensorStats data")

    def _key(self) -> tuple[Any, ...]:
        return (
            self.bins_per_side,
            self.exp,
            self.count,
            self.zero_count,
            self.min,
            self.max,
            self.nan_count,
            self.inf_count,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        return self._key() == other._key() and np.array_equal(self.counts, other.counts)

    def __repr__(self) -> str:
        return (
            f"TensorStats(count={self.count}, min={self.min}, max={self.max}, "
            f"exp={self.exp}, nonfinite={self.nonfinite_count})"
        )
