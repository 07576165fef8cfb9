"""Quality gates of `compare`: thresholds a CI job can fail on.

Every gate reads one headline number of the result's summary. A gate that could not be
evaluated at all (max-drop without labels) is refused before anything runs, by
`check_gates_possible`; one whose number is missing after the run (no classifier output,
a NaN) fails rather than passing silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from quantcli.errors import InputError
from quantcli.evaluate.metrics import json_number


@dataclass(frozen=True)
class GateSpec:
    """Thresholds; None leaves a gate out."""

    max_drop: float | None = None  # accuracy drop in percentage points (needs labels)
    min_cosine: float | None = None  # worst output's mean per-sample cosine
    min_speedup: float | None = None  # median float latency / median quantized latency
    max_size_ratio: float | None = None  # quantized size / float size
    min_top1: float | None = None  # top-1 agreement with float (classifiers)
    # (metric name, "<=" or ">=", threshold) on a --metric plugin's results
    metrics: tuple[tuple[str, str, float], ...] = ()

    def active(self) -> list[tuple[str, float]]:
        fixed = [(g.name, v) for g in _GATES if (v := getattr(self, g.field)) is not None]
        return fixed + [(f"metric {n} {op}", t) for n, op, t in self.metrics]


@dataclass(frozen=True)
class _Gate:
    name: str  # as the CLI option, without dashes
    field: str  # GateSpec field
    key: str  # summary key it reads
    upper: bool  # True: value must be <= threshold; False: >= threshold


_GATES = (
    _Gate("max-drop", "max_drop", "accuracy_drop_points", upper=True),
    _Gate("min-cosine", "min_cosine", "cosine_min", upper=False),
    _Gate("min-speedup", "min_speedup", "speedup", upper=False),
    _Gate("max-size-ratio", "max_size_ratio", "size_ratio", upper=True),
    _Gate("min-top1", "min_top1", "top1_agreement", upper=False),
)


@dataclass(frozen=True)
class GateResult:
    name: str
    threshold: float
    value: float | None  # None: could not be measured, which fails the gate
    passed: bool

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "value": json_number(self.value),
            "passed": self.passed,
        }


def check_gates_possible(
    gates: GateSpec, *, has_labels: bool, latency_runs: int, has_metric: bool = False
) -> None:
    """Raise InputError for a gate that is meaningless or cannot be evaluated on this run."""
    if gates.metrics and not has_metric:
        raise InputError(
            f"the gate on '{gates.metrics[0][0]}' needs a metric plugin",
            hint="pass --metric module:function that returns that name",
        )
    if gates.min_top1 is not None and not 0.0 <= gates.min_top1 <= 1.0:
        raise InputError(f"--min-top1 must be within [0, 1], not {gates.min_top1}")
    for name, threshold in gates.active():
        if not math.isfinite(threshold):
            raise InputError(f"--{name} must be a finite number, not {threshold}")
    if gates.min_cosine is not None and not -1.0 <= gates.min_cosine <= 1.0:
        raise InputError(f"--min-cosine must be within [-1, 1], not {gates.min_cosine}")
    positive = {"min-speedup": gates.min_speedup, "max-size-ratio": gates.max_size_ratio}
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise InputError(f"--{name} must be positive, not {value}")
    if gates.max_drop is not None and not has_labels:
        raise InputError(
            "--max-drop needs labels to measure accuracy, and the data has none",
            hint="give the data labels, or gate on --min-cosine instead",
        )
    if gates.min_speedup is not None and latency_runs <= 0:
        raise InputError(
            "--min-speedup needs latency measurements, but runs is 0",
            hint="set --runs to 1 or more",
        )


def parse_metric_gate(text: str) -> tuple[str, str, float]:
    """'perplexity<=25.4' -> ("perplexity", "<=", 25.4), for gates on a --metric plugin."""
    for op in ("<=", ">="):
        name, sep, value = text.partition(op)
        if sep:
            try:
                return name.strip(), op, float(value)
            except ValueError:
                break
    raise InputError(
        f"cannot read the metric gate '{text}'", hint="write NAME<=VALUE or NAME>=VALUE"
    )


def evaluate_gates(
    gates: GateSpec,
    summary: Mapping[str, float | None],
    metrics: Mapping[str, float] | None = None,
) -> list[GateResult]:
    """Each active gate against the summary's (or the plugin metrics') values, in order."""
    results = []
    upper = {g.name: (g.key, g.upper) for g in _GATES}
    upper.update({f"metric {n} {op}": (n, op == "<=") for n, op, _ in gates.metrics})
    values = {**summary, **(metrics or {})}
    for name, threshold in gates.active():
        key, is_upper = upper[name]
        value = values.get(key)
        ok = value is not None and math.isfinite(value)
        if ok:
            ok = value <= threshold if is_upper else value >= threshold
        results.append(GateResult(name, threshold, value, bool(ok)))
    return results
