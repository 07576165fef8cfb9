"""A float sum that is exact, so shards merge in any order to the same bits.

A float64 running sum depends on the order of its additions: the shards of a job merged on
a cluster would differ from one pass over the data in the last bits. `ExactSum` keeps the
exact sum (Shewchuk's non-overlapping partials, the algorithm behind `math.fsum`) and rounds
once, when read: the same values, added in any order and split any way, give the same
float. NaN and +-Inf are summed apart (their own arithmetic does not depend on the order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

import numpy as np


class ExactSum:
    """The exact sum of floats added one by one, rounded once when read (`value`)."""

    __slots__ = ("big", "partials", "special")

    def __init__(self) -> None:
        self.partials: list[float] = []  # non-overlapping, increasing magnitude
        self.special = 0.0  # sum of the non-finite values: 0, +-inf or nan
        # Once a partial sum leaves float64 (near 1.8e308) the rest is kept as a fraction:
        # the total may still round to a finite float.
        self.big: Fraction | None = None

    def add(self, x: float) -> None:
        x = float(x)
        if not math.isfinite(x):
            self.special += x
            return
        if self.big is not None:
            self.big += Fraction(x)
            return
        partials, i = self.partials, 0
        for j, y in enumerate(partials):
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            if math.isinf(hi):  # float64 overflow: switch to exact fractions
                rest = [*partials[:i], x, y, *partials[j + 1 :]]
                self.big, self.partials = sum(map(Fraction, rest), Fraction(0)), []
                return
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def add_all(self, values: Iterable[float] | np.ndarray) -> None:
        items = values.ravel().tolist() if isinstance(values, np.ndarray) else values
        for x in items:
            self.add(x)

    def merge(self, other: ExactSum) -> ExactSum:
        out = ExactSum()
        out.partials, out.special, out.big = list(self.partials), self.special, self.big
        out.special += other.special
        out.add_all(other.partials)
        if other.big is not None:
            out.big = _exact(out) + other.big
            out.partials = []
        return out

    @property
    def value(self) -> float:
        if self.special != 0:  # also true for nan
            return self.special
        try:
            return float(_exact(self)) if self.big is not None else math.fsum(self.partials)
        except OverflowError:
            return math.inf if _exact(self) > 0 else -math.inf


def _exact(s: ExactSum) -> Fraction:
    return s.big if s.big is not None else sum(map(Fraction, s.partials), Fraction(0))
