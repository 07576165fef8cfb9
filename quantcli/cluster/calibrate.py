"""`calibrate --ray`: blocks of batches calibrated by Ray tasks, folded in order by the driver.

Each task calibrates one block (BLOCK_BATCHES batches: the unit whose float sums
channel_stats.py adds in order) and returns its state; the driver folds the states in
block order as they arrive: histograms merge exactly in any order, and the per-channel
float sums are added block by block as one process adds them, so the table is byte for
byte the one `calibrate` writes without --ray. A block's state is fixed-size (histograms,
per-channel sums, the x x^T sums), and at most a few per CPU are held at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli.calibrate.channel_stats import BLOCK_BATCHES, ChannelStats
from quantcli.calibrate.config import CalibrationConfig
from quantcli.calibrate.observers import TensorStats
from quantcli.calibrate.table import CalibrationTable
from quantcli.cluster.config import ClusterConfig
from quantcli.cluster.engine import (
    Cluster,
    connect,
    map_ordered,
    node_name,
    on_node,
    shared_path,
)
from quantcli.cluster.shards import Ledger, Part, PartResult, split
from quantcli.data import DataSource, ImageOptions, open_data
from quantcli.data.validate import batch_size_for
from quantcli.errors import ClusterError, ModelError, QuantcliError
from quantcli.quantize.int8.config import Int8Config

Progress = Any  # Callable[[int parts done, int parts, int samples done, str where], None]


@dataclass(frozen=True)
class CalibrationJob:
    """Everything a task needs, with paths as the workers see them."""

    model: str
    data: str
    config: CalibrationConfig
    int8: Int8Config
    images: ImageOptions | None


@dataclass
class BlockState:
    """The statistics of one calibration block."""

    stats: dict[str, TensorStats]
    channels: dict[str, ChannelStats]


def calibrate_on_cluster(
    model_path: Path,
    data_spec: str,
    config: CalibrationConfig,
    int8: Int8Config | None,
    cluster: ClusterConfig,
    *,
    images: ImageOptions | None = None,
    progress: Progress | None = None,
) -> tuple[CalibrationTable, DataSource]:
    """The table calibrate_file gives, computed by tasks on a Ray cluster."""
    int8 = int8 or Int8Config()
    data, batch = _check_locally(model_path, data_spec, config, images)
    with connect(cluster) as joined:
        job = CalibrationJob(
            shared_path(model_path, joined),
            data_spec if data_spec.startswith("random") else shared_path(data_spec, joined),
            config,
            int8,
            images,
        )
        parts = split(data.num_samples, batch * BLOCK_BATCHES, data.num_samples)
        table = _run(job, parts, joined, cluster, data.num_samples, progress)
    return table, data


def _check_locally(
    model_path: Path, data_spec: str, config: CalibrationConfig, images: ImageOptions | None
) -> tuple[DataSource, int]:
    """What fails on bad input fails here, before any cluster is involved; the data's
    headers give the number of samples to split."""
    from quantcli.graph.io import load_model
    from quantcli.graph.signature import input_specs
    from quantcli.quantize.detect import check_not_quantized

    loaded = load_model(model_path)
    check_not_quantized(loaded.model)
    specs = input_specs(loaded.model)
    data = open_data(data_spec, specs, images=images, shard=config.shard, limit=config.limit)
    return data, batch_size_for(specs, config.batch_size, data.num_samples)


def _run(
    job: CalibrationJob,
    parts: list[Part],
    joined: Cluster,
    cluster: ClusterConfig,
    samples: int,
    progress: Progress | None,
) -> CalibrationTable:
    ledger = Ledger(len(parts))
    done = {"parts": 0, "samples": 0}

    def on_done(i: int, result: PartResult) -> None:
        done["parts"] += 1
        done["samples"] += result.samples
        if progress is not None:
            progress(done["parts"], len(parts), done["samples"], joined.describe())

    if progress is not None:
        progress(0, len(parts), 0, joined.describe())
    total: BlockState | None = None
    fingerprint = None
    calls = [(job, part) for part in parts]
    results = map_ordered(
        calibrate_part,
        calls,
        retries=cluster.retries,
        max_pending=joined.cpus + 1,  # block states can be large (x x^T sums): few held
        on_done=on_done,
        what=lambda i: parts[i].label(),
    )
    for result in results:
        ledger.add(result)
        part_fingerprint, block = result.payload
        if fingerprint is not None and part_fingerprint != fingerprint:
            raise ClusterError(
                f"the nodes read different model files at {job.model} "
                f"({result.node} differs from the first)",
                hint="every node must see the same model file at the same path",
            )
        fingerprint = part_fingerprint
        total = block if total is None else _fold(total, block)
    ledger.check_complete()
    if ledger.samples != samples or total is None:
        raise ClusterError(
            f"the parts hold {ledger.samples} samples, the data {samples}",
            hint="the data changed while the job ran: rerun it",
        )
    table = CalibrationTable(
        fingerprint=str(fingerprint),
        model_name=Path(job.model).name,
        method=job.config.method,
        percentile=job.config.percentile,
        symmetric=job.config.symmetric,
        samples=samples,
        stats=total.stats,
        shard=job.config.shard,
        channels=total.channels,
    )
    table.compute_ranges()
    return table


def _fold(total: BlockState, block: BlockState) -> BlockState:
    """`block`'s data after `total`'s, as one process adds it."""
    return BlockState(
        {name: s.merge(block.stats[name]) for name, s in total.stats.items()},
        {name: c.merge(block.channels[name]) for name, c in total.channels.items()},
    )


# ------------------------------------------------------------------ on the workers


def calibrate_part(job: CalibrationJob, part: Part) -> PartResult:
    """Calibrate one block (runs in a Ray task on one CPU)."""
    from quantcli.calibrate.runner import collect_stats
    from quantcli.runtime import set_default_threads

    set_default_threads(1)  # the task holds one CPU: one ONNX Runtime thread
    try:
        model, activations, axes, gram, specs, fingerprint = _prepared(job)
        config = job.config
        data = open_data(
            job.data,
            specs,
            images=job.images,
            shard=config.shard,
            limit=config.limit,
            window=part.window,
        )
        stats, channels = collect_stats(
            model, activations, data, config.batch_size, channel_axes=axes, gram=gram
        )
        for c in channels.values():
            c.close()
        block = BlockState(stats, channels)
        return PartResult(part, data.num_samples, (fingerprint, block), node_name())
    except QuantcliError as exc:
        return PartResult(part, 0, node=node_name(), error=on_node(exc))


_CACHE: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _prepared(job: CalibrationJob) -> tuple[Any, ...]:
    """The prepared model, what to collect (as quantize.int8.calibrate_plan asks calibrate
    for it) and the model's fingerprint: once per worker process for each model file
    version (a worker runs many blocks)."""
    from quantcli.calibrate.table import model_fingerprint
    from quantcli.graph.io import load_model
    from quantcli.graph.signature import input_specs
    from quantcli.quantize.int8.pipeline import gram_inputs
    from quantcli.quantize.int8.prepare import prepare_for_int8

    if not os.path.isfile(job.model):
        raise ModelError(f"model file not found: {job.model}")
    stat = os.stat(job.model)
    key = (job.model, stat.st_size, stat.st_mtime_ns, repr(job.int8))
    if key not in _CACHE:
        _CACHE.clear()  # one model at a time
        path = Path(job.model)
        loaded = load_model(path)
        prepared, plan = prepare_for_int8(loaded.model, job.int8)
        gram = gram_inputs(prepared, plan) if job.int8.pair_safe else set()
        _CACHE[key] = (
            prepared,
            plan.activations,
            plan.channel_axes(),
            gram,
            input_specs(loaded.model),
            model_fingerprint(path),
        )
    return _CACHE[key]
