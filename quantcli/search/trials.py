"""What a search records: each trial (formats per node, score, speed) and the result, with
the measures the search compares trials by."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli.errors import GateFailed
from quantcli.search.space import Assignment, Space


@dataclass
class Trial:
    stage: str  # default | rank | greedy | speed
    assignment: Assignment
    formats: dict[str, str]
    score: dict[str, Any]
    passed: bool
    subset: bool
    speedup: float | None = None
    quant_ms: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "assignment": list(self.assignment),
            "formats": self.formats,
            "score": self.score,
            "passed": self.passed,
            "subset": self.subset,
            "speedup": self.speedup,
            "quant_ms": self.quant_ms,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class TuneResult:
    found: bool
    best: Trial | None
    trials: list[Trial]
    space: Space
    output: Path | None
    recipe: Path | None
    stopped: str  # why the search ended
    held_back: list[str]
    cluster: dict[str, Any] | None = None  # with --ray: the cluster and the trials it ran

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "quantcli.tune/1",
            "found": self.found,
            "output": str(self.output) if self.output else None,
            "recipe": str(self.recipe) if self.recipe else None,
            "stopped": self.stopped,
            "best": self.best.to_dict() if self.best else None,
            "held_back": self.held_back,
            "cluster": self.cluster,
            "groups": [
                {"name": g.name, "nodes": list(g.nodes), "ladder": list(g.ladder)}
                for g in self.space.groups
            ],
            "trials": [t.to_dict() for t in self.trials],
        }


def sqnr(trial: Trial) -> float:
    value = trial.score["summary"].get("sqnr_db_min")
    return float(value) if value is not None and math.isfinite(value) else float("-inf")


def closer(trial: Trial, than: Trial) -> bool:
    """Nearer the budget; on a tie of the budget (a coarse count), the higher SQNR."""
    a, b = shortfall(trial), shortfall(than)
    return a < b or (a == b and sqnr(trial) > sqnr(than))


def shortfall(trial: Trial) -> float:
    """How far a trial is from its budget: the sum of relative gate shortfalls (0: met)."""
    total = 0.0
    for gate in trial.score["gates"]:
        value, threshold = gate["value"], gate["threshold"]
        if value is None:
            total += 1e9
        elif not gate["passed"]:
            total += abs(value - threshold) / max(abs(threshold), 1e-9)
    return total


def held_back(trial: Trial | None) -> list[str]:
    if trial is None:
        return ["no candidate could be evaluated"]
    return [
        f"{g['name']}: {g['value']} vs {g['threshold']}"
        for g in trial.score["gates"]
        if not g["passed"]
    ] or ["latency: slower than --min-speedup"]


def raise_if_not_found(result: TuneResult) -> None:
    if not result.found:
        why = "; ".join(result.held_back)
        raise GateFailed(f"no candidate met the budget ({result.stopped}): {why}")
