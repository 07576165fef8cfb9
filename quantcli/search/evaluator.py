"""Scoring candidates with `compare`'s own machinery, the float side computed once.

The float model's outputs are cached on disk by the feeds' content, so every trial (full
set or a ranking subset) runs only the candidate; metrics, gates and latency are those of
`quantcli compare` (no second evaluator).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.data.base import Batch
from quantcli.evaluate.compare import (
    DataSourceLike,
    labelled_batches,
    open_session,
    read_labels,
    score_outputs,
)
from quantcli.evaluate.gates import GateResult, GateSpec, evaluate_gates
from quantcli.evaluate.latency import LatencyComparison, measure_latency
from quantcli.evaluate.model_file import inspect_model
from quantcli.evaluate.plugin import load_metric
from quantcli.evaluate.result import CompareConfig, CompareResult, DataInfo
from quantcli.search.switch import SWITCH


class _CachedFloat:
    """An ORT session look-alike that replays the float model's outputs from disk."""

    def __init__(self, session: Any, folder: Path) -> None:
        self.session, self.folder = session, folder
        folder.mkdir(parents=True, exist_ok=True)

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        digest = hashlib.sha1()
        for key in sorted(feeds):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(feeds[key]).tobytes())
        path = self.folder / f"{digest.hexdigest()}.npz"
        count = len(self.session.get_outputs())
        if path.exists():
            with np.load(path) as cached:
                return [cached[f"o{i}"] for i in range(count)]
        values = self.session.run(None, feeds)
        np.savez(path, **{f"o{i}": v for i, v in enumerate(values)})
        return values


class _Subset:
    """Some samples of a data source, one per batch (the ranking set)."""

    def __init__(self, data: DataSourceLike, keep: list[int], labels: np.ndarray | None) -> None:
        self._data, self._keep = data, set(keep)
        order = sorted(keep)
        self.labels = None if labels is None else labels[order]
        self.description = f"{len(order)} of {data.description}"
        self.num_samples, self.synthetic = len(order), data.synthetic

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for batch in self._data.batches(1):
            if batch.indices[0] in self._keep:
                yield batch


class _Switched:
    """A switch model's session (search/switch.py) with its switch set."""

    def __init__(self, session: Any, value: int) -> None:
        self.session, self.value = session, np.array(value, np.int64)

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(names, {**feeds, SWITCH: self.value})


@dataclass(frozen=True)
class Score:
    summary: dict[str, float | None]
    metrics: dict[str, float]  # the --metric plugin's results
    gates: list[GateResult]
    samples: int

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "metrics": self.metrics,
            "gates": [g.to_dict() for g in self.gates],
            "passed": self.passed,
            "samples": self.samples,
        }


class Evaluator:
    """Scores candidate files against the float model on `data` under `gates`."""

    def __init__(
        self,
        float_path: Path,
        data: DataSourceLike,
        gates: GateSpec,
        compare: CompareConfig,
        cache: Path,
    ) -> None:
        self.float_path, self.data, self.gates = float_path, data, gates
        self.config = replace(compare, gates=gates)
        self.labels = read_labels(data)
        self.float_info = inspect_model(str(float_path))
        self.float_session = open_session(self.float_info.path, self.config)
        self.float_cached = _CachedFloat(self.float_session, cache)
        self.names = [name for name, _ in self.float_info.outputs]

    def score(self, path: Path, subset: list[int] | None = None) -> Score:
        quant = inspect_model(str(path))
        return self._score(open_session(quant.path, self.config), quant, subset)

    def switched_scores(
        self, path: Path, switches: Iterable[int], subset: list[int]
    ) -> Iterator[tuple[Score, float]]:
        """(score, seconds) of a switch model (search/switch.py) run with its switch at
        each value in turn, on one session."""
        quant = inspect_model(str(path))
        session = open_session(quant.path, self.config)
        for value in switches:
            start = time.monotonic()
            score = self._score(_Switched(session, value), quant, subset)
            yield score, time.monotonic() - start

    def _score(self, session: Any, quant: Any, subset: list[int] | None) -> Score:
        data = self.data if subset is None else _Subset(self.data, subset, self.labels)
        labels = self.labels if subset is None else data.labels
        plugin = load_metric(self.config.metric) if self.config.metric else None
        batch = 1 if subset is not None else self.config.batch_size
        batches = labelled_batches(data, batch, data.num_samples, labels)
        outputs, _ = score_outputs(
            self.float_cached, session, self.names, batches, plugin, lambda _: None
        )
        n = data.num_samples
        info = DataInfo(data.description, n, n, False, labels is not None)
        result = CompareResult(self.float_info, quant, info, self.config, outputs)
        metrics = plugin.result() if plugin is not None else {}
        summary = result.summary()
        # Speed is the objective, measured apart (Evaluator.latency); the rest is the budget.
        budget = replace(self.gates, min_speedup=None)
        return Score(summary, metrics, evaluate_gates(budget, summary, metrics), n)

    def worst_samples(self, path: Path, count: int) -> list[int]:
        """The `count` samples whose first output is least like float's (by cosine),
        worst first."""
        session = open_session(inspect_model(str(path)).path, self.config)
        indices, values = [], []
        for batch in self.data.batches(1):
            indices.append(int(batch.indices[0]))
            feeds = dict(batch.feeds)
            f = np.asarray(self.float_cached.run(None, feeds)[0], np.float64).ravel()
            q = np.asarray(session.run(None, feeds)[0], np.float64).ravel()
            norm = np.linalg.norm(f) * np.linalg.norm(q)
            values.append(float(f @ q / norm) if norm > 0 else 1.0)
        order = np.argsort(np.asarray(values), kind="stable")[:count]
        return [indices[i] for i in order]

    def latency(self, path: Path) -> LatencyComparison:
        """Interleaved against the float model on the first sample, as compare times it."""
        session = open_session(inspect_model(str(path)).path, self.config)
        feeds = dict(next(iter(self.data.batches(1))).feeds)
        cfg = self.config
        return measure_latency(
            self.float_session, session, feeds, 1, cfg.runs, cfg.warmup, cfg.threads
        )
