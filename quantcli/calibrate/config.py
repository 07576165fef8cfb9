"""Typed calibration settings."""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.errors import InputError

METHODS = ("minmax", "percentile", "entropy", "mse")
# Chosen by measurement on the real models (docs/calibration.md).
DEFAULT_METHOD = "mse"


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    symmetric: bool = False
    batch_size: int = 1
    limit: int | None = None
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(
                f"calibration method '{self.method}' is not supported",
                hint=f"use one of {', '.join(METHODS)}",
            )
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(
                f"--percentile {self.percentile} is out of range", hint="use a value in (50, 100]"
            )
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
