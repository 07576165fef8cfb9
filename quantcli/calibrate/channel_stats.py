"""Per-channel statistics of an activation, streamed and exactly mergeable.

Three uses: the per-channel mean drives bias correction (quantizing W to Wq shifts a layer's
mean output by (Wq - W) . E[x]; Nagel et al., 2019), the per-channel max |x| drives
activation smoothing (a few channels far above the rest ruin a per-tensor int8 scale;
quantize/smooth.py moves their range into the weights), and the mean square E[x^2] weighs
weight errors by how much of the output they move (pair-safe weights, saturation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_GRAM_CHANNELS = 4096  # a [C, C] float64 sum is 128 MB at this size


@dataclass
class ChannelStats:
    axis: int
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 per channel
    absmax: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 per channel
    count: int = 0  # values per channel seen
    squares: np.ndarray | None = None  # float64 sums of x^2 per channel (None: older table)
    # Sums of x x^T over channels (float64 [C, C]) when asked for: GPTQ-style rounding of
    # pair-safe weights (saturation.py). Saved beside a table file (table.py), not in it.
    gram: np.ndarray | None = None
    track_gram: bool = False

    def update(self, x: np.ndarray) -> None:
        axis = self.axis % x.ndim
        moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
        sums, absmax = moved.sum(axis=0), np.abs(moved).max(axis=0, initial=0.0)
        squares = np.einsum("ij,ij->j", moved, moved)
        if self.count:
            sums, absmax = sums + self.sums, np.maximum(absmax, self.absmax)
            squares = squares + self.squares if self.squares is not None else None
        self.sums, self.absmax, self.squares = sums, absmax, squares
        if self.track_gram and moved.shape[1] <= MAX_GRAM_CHANNELS:
            gram = moved.T @ moved
            self.gram = gram if self.gram is None else self.gram + gram
        self.count += moved.shape[0]

    def merge(self, other: ChannelStats) -> ChannelStats:
        if self.count == 0 or other.count == 0:
            source = other if self.count == 0 else self
            squares = None if source.squares is None else source.squares.copy()
            gram = None if source.gram is None else source.gram.copy()
            return ChannelStats(
                source.axis,
                source.sums.copy(),
                source.absmax.copy(),
                source.count,
                squares,
                gram,
                source.track_gram,
            )
        both = self.squares is not None and other.squares is not None
        grams = self.gram is not None and other.gram is not None
        return ChannelStats(
            self.axis,
            self.sums + other.sums,
            np.maximum(self.absmax, other.absmax),
            self.count + other.count,
            self.squares + other.squares if both else None,  # type: ignore[operator]
            self.gram + other.gram if grams else None,  # type: ignore[operator]
            self.track_gram,
        )

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
