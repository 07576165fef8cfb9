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


@dataclass
class ChannelStats:
    axis: int
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 per channel
    absmax: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 per channel
    count: int = 0  # values per channel seen
    squares: np.ndarray | None = None  # float64 sums of x^2 per channel (None: older table)

    def update(self, x: np.ndarray) -> None:
        axis = self.axis % x.ndim
        moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
        sums, absmax = moved.sum(axis=0), np.abs(moved).max(axis=0, initial=0.0)
        squares = np.einsum("ij,ij->j", moved, moved)
        if self.count:
            sums, absmax = sums + self.sums, np.maximum(absmax, self.absmax)
            squares = squares + self.squares if self.squares is not None else None
        self.sums, self.absmax, self.squares = sums, absmax, squares
        self.count += moved.shape[0]

    def merge(self, other: ChannelStats) -> ChannelStats:
        if self.count == 0 or other.count == 0:
            source = other if self.count == 0 else self
            squares = None if source.squares is None else source.squares.copy()
            return ChannelStats(
                source.axis, source.sums.copy(), source.absmax.copy(), source.count, squares
            )
        both = self.squares is not None and other.squares is not None
        return ChannelStats(
            self.axis,
            self.sums + other.sums,
            np.maximum(self.absmax, other.absmax),
            self.count + other.count,
            self.squares + other.squares if both else None,  # type: ignore[operator]
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
