"""`tune --ray`: ranking candidates built and scored by Ray tasks, in parallel.

Ranking is the part of the search whose trials are independent (each group moved one rung,
scored on the same worst samples), and the part with the most trials. Each task builds its
candidate from the shared calibration table with the same `quantize_int8` and scores it
with the same `Evaluator` as one process does, so the scores are the same; the greedy steps,
the full-set checks and every latency measurement stay on the driver (one machine times
every candidate, as `compare` does), and so do the moves ranked on a switch model
(switch.py: one session, no candidate to build).

Every node must read the model and the evaluation data at the same path
(docs/cluster.md); a worker process keeps its evaluator (the float outputs it computed)
and its quantized weights across the trials of one search.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.calibrate.table import CalibrationTable
from quantcli.evaluate.gates import GateSpec
from quantcli.evaluate.result import CompareConfig
from quantcli.quantize.int8.config import Int8Config
from quantcli.search.evaluator import Evaluator, Score


@dataclass(frozen=True)
class TrialJob:
    """What every ranking task of one search shares."""

    job_id: str  # one per search: a worker's cached evaluator belongs to one job
    model: str
    eval_spec: str
    labels: np.ndarray | None
    gates: GateSpec
    compare: CompareConfig
    base: Int8Config


_WORKER: dict[str, tuple[Evaluator, dict, Path]] = {}  # job id -> evaluator, weights, cache


def _worker_state(job: TrialJob) -> tuple[Evaluator, dict]:
    if job.job_id not in _WORKER:
        for _, _, old in _WORKER.values():  # another search's: not needed any more
            shutil.rmtree(old, ignore_errors=True)
        _WORKER.clear()
        from quantcli.data import WithLabels, open_data
        from quantcli.graph.io import load_model
        from quantcli.graph.signature import input_specs

        data = open_data(job.eval_spec, input_specs(load_model(job.model).model))
        if job.labels is not None:
            data = WithLabels(data, job.labels)
        cache = Path(tempfile.mkdtemp(prefix="quantcli-tune-float-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)  # workers end with the job
        evaluator = Evaluator(Path(job.model), data, job.gates, job.compare, cache)
        _WORKER[job.job_id] = (evaluator, {}, cache)
    evaluator, weights, _ = _WORKER[job.job_id]
    return evaluator, weights


def score_trial(
    job: TrialJob,
    table: CalibrationTable,
    node_formats: tuple[tuple[str, str], ...],
    subset: list[int],
) -> tuple[Score, float]:
    """Build one candidate and score it on `subset` (a Ray task; also callable directly)."""
    from quantcli.cluster.engine import on_node
    from quantcli.errors import InputError
    from quantcli.graph.io import load_model, save_model
    from quantcli.quantize.int8.pipeline import quantize_int8
    from quantcli.quantize.math.affine import reusing_weights
    from quantcli.runtime import set_default_threads

    set_default_threads(job.compare.threads or 1)  # a task holds one CPU of its node
    start = time.monotonic()
    try:
        evaluator, weights = _worker_state(job)
    except InputError as exc:
        raise on_node(exc) from None
    config = replace(job.base, node_formats=node_formats)
    with reusing_weights(weights), tempfile.TemporaryDirectory(prefix="quantcli-trial-") as tmp:
        loaded = load_model(job.model)
        result = quantize_int8(loaded, config, table=table)
        path = Path(tmp) / "model.onnx"
        save_model(result.model, path, force=True, external_data=loaded.external_data)
        del result, loaded
        score = evaluator.score(path, subset)
    return score, time.monotonic() - start


def ray_scorer(
    cluster: Any, retries: int, model: Path, eval_spec: str, labels: Any, gates: GateSpec,
    compare: CompareConfig, base: Int8Config,
) -> Any:  # fmt: skip
    """A `RemoteScorer` (search/tune.py) running `score_trial` as Ray tasks on `cluster`."""
    from quantcli.cluster.engine import import_ray, map_ordered, shared_path

    job = TrialJob(
        uuid.uuid4().hex,
        shared_path(model, cluster),
        eval_spec if eval_spec.startswith("random") else shared_path(eval_spec, cluster),
        None if labels is None else np.asarray(labels),
        gates,
        compare,
        base,
    )

    def score(
        table: CalibrationTable, calls: list[tuple[tuple[tuple[str, str], ...], list[int]]]
    ) -> Iterator[tuple[Score, float]]:
        ray = import_ray()
        shared = ray.put(table)  # once per batch, not once per task
        args = [(job, shared, formats, subset) for formats, subset in calls]
        what = lambda i: f"ranking trial {i + 1} of {len(calls)}"  # noqa: E731
        yield from map_ordered(score_trial, args, retries=retries, what=what)

    return score
