"""Per-channel mean of an activation, streamed and exactly mergeable (a sum and a count).

Bias correction uses it: quantizing a weight W to Wq shifts a layer's mean output by
(Wq - W) . E[x]; subtracting that from the bias removes the shift (Nagel et al., 2019).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ChannelMean:
    axis: int
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 per channel
    count: int = 0  # values per channel seen

    def update(self, x: np.ndarray) -> None:
        axis = self.axis % x.ndim
        moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
        sums = moved.sum(axis=0)
        self.sums = sums if self.count == 0 else self.sums + sums
        self.count += moved.shape[0]

    def merge(self, other: ChannelMean) -> ChannelMean:
        if self.count == 0:
            return ChannelMean(other.axis, other.sums.copy(), other.count)
        if other.count == 0:
            return ChannelMean(self.axis, self.sums.copy(), self.count)
        return ChannelMean(self.axis, self.sums + other.sums, self.count + other.count)

    @property
    def mean(self) -> np.ndarray:
        return self.sums / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "count": self.count, "sums": self.sums.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelMean:
        return cls(int(data["axis"]), np.asarray(data["sums"], np.float64), int(data["count"]))
