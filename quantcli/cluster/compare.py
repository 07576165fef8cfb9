"""`compare --ray`: accuracy metrics from Ray tasks, merged exactly; latency on one node.

Each task scores a window of whole batches and returns compare's own accumulators; their
sums are exact (quantcli/exact.py), so the driver's merge equals one pass over all the data
to the bit. Latency is never averaged across machines: after the scoring, one task takes
every CPU of one node and times both models there, interleaved as `compare` does; the
result names that node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from quantcli.cluster.config import ClusterConfig
from quantcli.cluster.engine import (
    Cluster,
    Node,
    connect,
    map_ordered,
    node_name,
    on_node,
    run_on_node,
    shared_path,
)
from quantcli.cluster.shards import Ledger, Part, PartResult, split
from quantcli.data import ImageOptions, open_data
from quantcli.data.validate import batch_size_for
from quantcli.errors import ClusterError, InputError, QuantcliError
from quantcli.evaluate.compare import (
    DataSourceLike,
    accumulate_outputs,
    labelled_batches,
    open_session,
    read_labels,
    saturation_of,
    saturation_warnings,
)
from quantcli.evaluate.gates import check_gates_possible, evaluate_gates
from quantcli.evaluate.model_file import check_signatures, inspect_model
from quantcli.evaluate.result import CompareConfig, CompareResult, DataInfo

Progress = Any  # Callable[[int parts done, int parts, int samples done, str where], None]


@dataclass(frozen=True)
class CompareJob:
    """Everything a task needs, with paths as the workers see them."""

    float_model: str
    quant_model: str
    data: str
    config: CompareConfig
    images: ImageOptions | None
    limit: int | None


def compare_on_cluster(
    float_path: str | os.PathLike,
    quant_path: str | os.PathLike,
    data_spec: str,
    source: DataSourceLike,
    config: CompareConfig,
    cluster: ClusterConfig,
    *,
    images: ImageOptions | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> CompareResult:
    """compare() with the data scored by tasks on a Ray cluster.

    `source` is the data opened here (headers only, labels attached); the tasks reopen
    `data_spec` with the same `images` and `limit` and score windows of it.
    """
    cfg = config
    cfg.check()
    if cfg.metric is not None:
        raise InputError(
            "--metric plugins run in one process; they are not merged across a cluster",
            hint="run compare without --ray for a custom metric",
        )
    if cfg.per_layer:
        raise InputError(
            "--per-layer is not distributed yet",
            hint="run it without --ray (with --limit for a quick look)",
        )
    labels = read_labels(source)
    check_gates_possible(cfg.gates, has_labels=labels is not None, latency_runs=cfg.runs)
    fm, qm = inspect_model(str(float_path)), inspect_model(str(quant_path))
    check_signatures(fm, qm)
    n = source.num_samples if cfg.max_samples is None else min(source.num_samples, cfg.max_samples)
    specs = _specs(str(float_path))
    batch = batch_size_for(specs, cfg.batch_size, n)
    with connect(cluster) as joined:
        job = CompareJob(
            shared_path(fm.path, joined),
            shared_path(qm.path, joined),
            data_spec if data_spec.startswith("random") else shared_path(data_spec, joined),
            cfg,
            images,
            limit,
        )
        parts = split(n, batch, cluster.shards or 2 * joined.cpus)
        accs, ledger = _score(job, parts, labels, joined, cluster, progress)
        timed = None
        if cfg.runs:
            node = _timing_node(joined)
            if progress is not None:
                progress(len(parts), len(parts), ledger.samples, f"timing on {node.address}")
            timed = run_on_node(
                time_first_batch, (job, n), node, retries=cluster.retries, what="latency"
            )
    latency, host, timed_on = timed if timed is not None else (None, _local_host(cfg), None)
    outputs = [acc.result() for acc in accs.values()]
    has_labels = labels is not None
    info = DataInfo(source.description, n, source.num_samples, bool(source.synthetic), has_labels)
    result = CompareResult(fm, qm, info, cfg, outputs, latency, None, {})
    check = saturation_of(qm.path)
    return replace(
        result,
        gates=evaluate_gates(cfg.gates, result.summary(), {}),
        host=host,
        x86_saturation=check.to_dict(),
        warnings=saturation_warnings(host, check),
        cluster={
            "address": joined.address,
            "nodes": len(joined.nodes),
            "cpus": joined.cpus,
            "parts": len(parts),
            "scored_on": sorted(ledger.nodes),
            "latency_node": timed_on,
        },
    )


def _score(
    job: CompareJob,
    parts: list[Part],
    labels: np.ndarray | None,
    joined: Cluster,
    cluster: ClusterConfig,
    progress: Progress | None,
) -> tuple[dict[str, Any], Ledger]:
    ledger = Ledger(len(parts))
    done = {"parts": 0, "samples": 0}

    def on_done(i: int, result: PartResult) -> None:
        done["parts"] += 1
        done["samples"] += result.samples
        if progress is not None:
            progress(done["parts"], len(parts), done["samples"], joined.describe())

    if progress is not None:
        progress(0, len(parts), 0, joined.describe())
    calls = [(job, p, None if labels is None else labels[p.start : p.stop]) for p in parts]
    merged: dict[str, Any] | None = None
    results = map_ordered(
        score_part,
        calls,
        retries=cluster.retries,
        max_pending=2 * joined.cpus + 2,
        on_done=on_done,
        what=lambda i: parts[i].label(),
    )
    for result in results:  # in data order: the first part's first batch decides as in one pass
        ledger.add(result)
        accs = result.payload
        merged = accs if merged is None else {k: merged[k].merge(accs[k]) for k in merged}
    ledger.check_complete()
    if merged is None or ledger.samples != sum(p.stop - p.start for p in parts):
        raise ClusterError(
            f"the parts hold {ledger.samples} samples, the job {parts[-1].stop}",
            hint="the data changed while the job ran: rerun it",
        )
    return merged, ledger


def _timing_node(joined: Cluster) -> Node:
    """The node with the most CPUs (the first by address among equals)."""
    return sorted(joined.nodes, key=lambda n: (-n.cpus, n.address, n.node_id))[0]


def _local_host(cfg: CompareConfig) -> Any:
    from quantcli.evaluate.host import describe_host

    return describe_host(cfg.provider)


# ------------------------------------------------------------------ on the workers

_SESSIONS: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _specs(path: str) -> list[Any]:
    from quantcli.graph.io import load_model
    from quantcli.graph.signature import input_specs

    return input_specs(load_model(path, check=False).model)


def _sessions(job: CompareJob) -> tuple[Any, ...]:
    """Both sessions and the input specs, once per worker process and file versions."""
    stamps = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in _paths(job))
    key = (*stamps, repr(job.config))
    if key not in _SESSIONS:
        _SESSIONS.clear()
        fs = open_session(job.float_model, job.config)
        qs = open_session(job.quant_model, job.config)
        names = [o.name for o in fs.get_outputs()]
        _SESSIONS[key] = (fs, qs, names, _specs(job.float_model))
    return _SESSIONS[key]


def _paths(job: CompareJob) -> tuple[str, str]:
    for path in (job.float_model, job.quant_model):
        if not os.path.isfile(path):
            from quantcli.errors import ModelError

            raise ModelError(f"model file not found: {path}")
    return job.float_model, job.quant_model


def score_part(job: CompareJob, part: Part, labels: np.ndarray | None) -> PartResult:
    """compare's accumulators over one window of the data (runs in a Ray task, one CPU)."""
    from quantcli.runtime import set_default_threads

    set_default_threads(1)  # the task holds one CPU: one ONNX Runtime thread
    try:
        fs, qs, names, specs = _sessions(job)
        data = open_data(job.data, specs, images=job.images, limit=job.limit, window=part.window)
        batches = labelled_batches(data, job.config.batch_size, data.num_samples, labels)
        accs, _ = accumulate_outputs(fs, qs, names, batches, None, lambda _: None)
        return PartResult(part, data.num_samples, accs, node_name())
    except QuantcliError as exc:
        return PartResult(part, 0, node=node_name(), error=on_node(exc))


def time_first_batch(job: CompareJob, n: int) -> tuple[Any, Any, str]:
    """Latency of both models on the data's first batch, on this node with all its CPUs
    (runs in a Ray task that holds them all)."""
    from quantcli.evaluate.host import describe_host
    from quantcli.evaluate.latency import measure_latency
    from quantcli.runtime import set_default_threads

    set_default_threads(None)  # ONNX Runtime's default, as compare without --ray
    cfg = job.config
    try:
        _paths(job)
        specs = _specs(job.float_model)
        batch = batch_size_for(specs, cfg.batch_size, n)
        data = open_data(
            job.data, specs, images=job.images, limit=job.limit, window=(0, min(batch, n))
        )
        batches = labelled_batches(data, cfg.batch_size, data.num_samples, None)
        indices, feeds, _ = next(iter(batches))
        fs, qs = open_session(job.float_model, cfg), open_session(job.quant_model, cfg)
        latency = measure_latency(fs, qs, feeds, len(indices), cfg.runs, cfg.warmup, cfg.threads)
        return latency, describe_host(cfg.provider), node_name()
    except QuantcliError as exc:
        raise on_node(exc) from None
