"""Splitting the selected samples into parts, and checking the parts that come back.

A part is a window (start, stop) of consecutive selected samples, cut at multiples of a
step (the batch size, or a calibration block of batches) so that every batch, and every
block of batches, is the one a single process would form. Results carry their part's id;
the ledger refuses one seen twice and names the ones missing, so nothing is counted twice
or lost whatever the retries did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantcli.errors import ClusterError, QuantcliError


@dataclass(frozen=True)
class Part:
    id: int  # 0-based; shown 1-based, "part 3/8"
    total: int
    start: int  # positions in the selected samples
    stop: int

    @property
    def window(self) -> tuple[int, int]:
        return self.start, self.stop

    def label(self) -> str:
        return f"part {self.id + 1}/{self.total} (samples {self.start + 1}-{self.stop})"


def split(samples: int, step: int, parts: int) -> list[Part]:
    """At most `parts` windows over `samples`, each a whole number of steps (the last may
    end short), as even as the steps allow."""
    if samples < 1 or step < 1 or parts < 1:
        raise ValueError(f"cannot split {samples} samples in steps of {step} into {parts}")
    steps = -(-samples // step)
    count = min(parts, steps)
    bounds = [min(k * steps // count * step, samples) for k in range(count + 1)]
    return [Part(i, count, bounds[i], bounds[i + 1]) for i in range(count)]


@dataclass(frozen=True)
class PartResult:
    """What a task returns: its part, what it computed, and where."""

    part: Part
    samples: int
    payload: Any = None
    node: str = ""
    error: QuantcliError | None = None  # an input error, raised by the driver as is


class Ledger:
    """The parts folded so far: each exactly once, none missing at the end."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.seen: set[int] = set()
        self.samples = 0
        self.nodes: set[str] = set()

    def add(self, result: PartResult) -> None:
        part = result.part
        if result.error is not None:
            raise result.error
        if part.total != self.total or not 0 <= part.id < self.total:
            raise ClusterError(
                f"a result names part {part.id + 1}/{part.total} of a {self.total}-part job",
                hint="this is a bug in quantcli: please report it",
            )
        if part.id in self.seen:
            raise ClusterError(
                f"{part.label()} came back twice; refusing to count it again",
                hint="this is a bug in quantcli: please report it",
            )
        self.seen.add(part.id)
        self.samples += result.samples
        self.nodes.add(result.node)

    def check_complete(self) -> None:
        missing = [i + 1 for i in range(self.total) if i not in self.seen]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ClusterError(
                f"{len(missing)} of {self.total} parts never came back (parts {shown})",
                hint="rerun; check the cluster's nodes (ray status)",
            )
