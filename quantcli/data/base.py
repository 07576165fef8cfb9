"""Types shared by every data source: what a batch is and what a source offers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Batch:
    """Consecutive selected samples, ready to feed to the model."""

    indices: range  # sample indices in the whole dataset (step n when sharded)
    feeds: Arrays  # input name -> array with the batch on axis 0
    labels: np.ndarray | None = None  # class ids of these samples, when the data has them


class DataSource(Protocol):
    description: str  # e.g. "calib.npz (256 samples)"
    num_samples: int  # after sharding and limit
    synthetic: bool  # True for random data
    labels: np.ndarray | None  # class ids of the selected samples, in batch order

    def batches(self, batch_size: int) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Chunk:
    """A unit that is loaded whole (a file, an image, a random sample).

    Sources are lists of chunks so that only one chunk is in memory at a time.
    """

    count: int  # samples in this chunk
    load: Callable[[], Arrays]  # arrays with `count` samples on axis 0
    where: str  # file name (or similar) for error messages
