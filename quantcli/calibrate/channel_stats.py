"""Per-channel statistics of an activation, streamed and exactly mergeable.

Three uses: the per-channel mean drives bias correction (quantizing W to Wq shifts a layer's
mean output by (Wq - W) . E[x]; Nagel et al., 2019), the per-channel max |x| drives
activation smoothing (a few channels far above the rest ruin a per-tensor int8 scale;
quantize/int8/smooth.py moves their range into the weights), and the mean square E[x^2] weighs
weight errors by how much of the output they move (pair-safe weights, saturation.py).

Batches are summed in blocks of BLOCK_BATCHES and the blocks' float64 sums are then added in
order, so the bits depend on the block boundaries only, not on who computed which block: a
cluster job computes whole blocks anywhere and its driver adds them in the same order
(quantcli/cluster/), which gives the bits of one pass. Reading the sums closes the open
block: read them once the data is done.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np

MAX_GRAM_CHANNELS = 4096  # a [C, C] float64 sum is 128 MB at this size
BLOCK_BATCHES = 32  # batches summed apart before their sums join the total


def _pack(full: np.ndarray) -> np.ndarray:
    """The upper triangle (with the diagonal) of a symmetric [C, C] matrix, row by row."""
    return np.ascontiguousarray(full[np.triu_indices(full.shape[0])], dtype=np.float64)


def _unpack(packed: np.ndarray) -> np.ndarray:
    channels = (math.isqrt(8 * packed.size + 1) - 1) // 2
    upper = np.triu_indices(channels)
    full = np.empty((channels, channels), np.float64)
    full[upper] = packed
    full[upper[1], upper[0]] = packed
    return full


class ChannelStats:
    """Per-channel sums, sums of squares, max |x| and (when tracked) x x^T sums."""

    def __init__(
        self,
        axis: int,
        sums: np.ndarray | None = None,  # float64 per channel
        absmax: np.ndarray | None = None,  # float64 per channel
        count: int = 0,  # values per channel seen
        squares: np.ndarray | None = None,  # float64 sums of x^2 per channel (None: older table)
        # Sums of x x^T over channels (float64 [C, C]) when asked for: GPTQ-style rounding of
        # pair-safe weights (saturation.py). Saved beside a table file (table.py), not in it.
        gram: np.ndarray | None = None,
        track_gram: bool = False,
    ) -> None:
        self.axis, self.count, self.track_gram = axis, count, track_gram
        self._sums = np.zeros(0) if sums is None else sums
        self._absmax = np.zeros(0) if absmax is None else absmax
        self._squares = squares
        # x x^T sums are kept packed (they are symmetric), the total and the open block's
        # alike: every tracked input has a block open at once (121 on SmolLM2-135M, 0.9 GB
        # of float64 matrices), so a full block sum would cost half as much again.
        self._gram = None if gram is None else _pack(gram)
        self._gram_open: np.ndarray | None = None  # the block's own sum, packed
        self._block: ChannelStats | None = None  # the block being summed
        self._block_batches = 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch to the open block; every BLOCK_BATCHES batches it is closed."""
        if self._block is None:
            self._block = ChannelStats(self.axis, track_gram=self.track_gram)
        self._block._add(x)
        self._block_batches += 1
        if self._block_batches == BLOCK_BATCHES:
            self.close()

    def close(self) -> None:
        """Add the open block to the totals (in place: no third copy of an x x^T sum)."""
        if self._block is None:
            return
        block, self._block, self._block_batches = self._block, None, 0
        if block._gram_open is not None:
            block._gram, block._gram_open = block._gram_open, None
        if self.count == 0:
            self.count, self._sums, self._absmax = block.count, block._sums, block._absmax
            self._squares, self._gram = block._squares, block._gram
            return
        self.count += block.count
        self._sums += block._sums
        np.maximum(self._absmax, block._absmax, out=self._absmax)
        if self._squares is not None and block._squares is not None:
            self._squares += block._squares
        else:
            self._squares = None
        if self._gram is not None and block._gram is not None:
            if isinstance(self._gram, np.memmap):  # spilled, read-only: the sum in memory
                self._gram = self._gram + block._gram
            else:
                self._gram += block._gram
        else:
            self._gram = None

    def _add(self, x: np.ndarray) -> None:
        axis = self.axis % x.ndim
        moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
        sums, absmax = moved.sum(axis=0), np.abs(moved).max(axis=0, initial=0.0)
        squares = np.einsum("ij,ij->j", moved, moved)
        if self.count:
            sums, absmax = sums + self._sums, np.maximum(absmax, self._absmax)
            squares = squares + self._squares if self._squares is not None else None
        self._sums, self._absmax, self._squares = sums, absmax, squares
        if self.track_gram and moved.shape[1] <= MAX_GRAM_CHANNELS:
            # float32 products (3x faster on large feature maps), float64 totals.
            rows = np.ascontiguousarray(moved, np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                gram = (rows.T @ rows).astype(np.float64)
                if not np.isfinite(gram).all():  # float32 overflowed: redo in float64
                    gram = moved.T @ moved
            # numpy sums x^T x symmetric (syrk): the upper triangle holds it all, and the
            # element-wise sums are those of full matrices, bit for bit.
            packed = _pack(gram)
            del gram
            if self._gram_open is None:
                self._gram_open = packed
            else:
                self._gram_open += packed
        self.count += moved.shape[0]

    @property
    def sums(self) -> np.ndarray:
        self.close()
        return self._sums

    @property
    def absmax(self) -> np.ndarray:
        self.close()
        return self._absmax

    @property
    def squares(self) -> np.ndarray | None:
        self.close()
        return self._squares

    @property
    def gram(self) -> np.ndarray | None:
        """The x x^T sum, [C, C] (a new array on each read)."""
        self.close()
        return None if self._gram is None else _unpack(self._gram)

    @gram.setter
    def gram(self, value: np.ndarray | None) -> None:  # from a table's sidecar file
        self.close()
        self._gram = None if value is None else _pack(np.asarray(value, np.float64))

    def spill_gram(self) -> None:
        """Move the x x^T sum (closed) to a memory-mapped temporary file, unlinked at once
        (the mapping keeps it): it is read back only when `gram` is, so a model's many sums
        (SmolLM2-135M: 121, 0.4 GB) need not all be resident between calibration and their
        use. The sum can no longer grow: call this once the data is done."""
        self.close()
        if self._gram is None or isinstance(self._gram, np.memmap) or os.name != "posix":
            return
        with tempfile.NamedTemporaryFile(prefix="quantcli-gram-") as file:
            self._gram.tofile(file)
            file.flush()
            self._gram = np.memmap(file, np.float64, "r", shape=self._gram.shape)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Both together, `other`'s data after `self`'s (float sums add in that order)."""
        self.close()
        other.close()
        return self._merge_closed(other)

    def _merge_closed(self, other: ChannelStats) -> ChannelStats:
        out = ChannelStats(self.axis, track_gram=self.track_gram)
        if self.count == 0 or other.count == 0:
            src = other if self.count == 0 else self
            out.track_gram, out.count = src.track_gram, src.count
            out._sums, out._absmax = src._sums.copy(), src._absmax.copy()
            out._squares = None if src._squares is None else src._squares.copy()
            out._gram = None if src._gram is None else src._gram.copy()
            return out
        both = self._squares is not None and other._squares is not None
        grams = self._gram is not None and other._gram is not None
        out.count = self.count + other.count
        out._sums, out._absmax = self._sums + other._sums, np.maximum(self._absmax, other._absmax)
        out._squares = self._squares + other._squares if both else None  # type: ignore[operator]
        out._gram = self._gram + other._gram if grams else None  # type: ignore[operator]
        return out

    @property
    def mean(self) -> np.ndarray:
        return self.sums / max(self.count, 1)

    @property
    def mean_square(self) -> np.ndarray | None:
        return None if self.squares is None else self.squares / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "count": self.count,
            "sums": self.sums.tolist(),
            "absmax": self.absmax.tolist(),
            **({} if self.squares is None else {"squares": self.squares.tolist()}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelStats:
        return cls(
            int(data["axis"]),
            np.asarray(data["sums"], np.float64),
            np.asarray(data["absmax"], np.float64),
            int(data["count"]),
            np.asarray(data["squares"], np.float64) if "squares" in data else None,
        )
