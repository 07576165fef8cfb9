"""Run the model on ONNX Runtime batch by batch and update streaming statistics.

Memory is bounded by the model, one batch of activations and a fixed-size state per
tensor: activations are folded into the statistics and dropped, whatever the sample count.
A model whose weights exceed `SEGMENT_ABOVE` runs one segment at a time instead
(`segments.py`): one segment's weights are resident, not a whole second copy in ONNX
Runtime beside our mapped file.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.calibrate.config import CalibrationConfig
from quantcli.calibrate.observers import TensorStats
from quantcli.calibrate.segments import (
    SegmentRunner,
    frontier,
    producer_positions,
    weight_segments,
)
from quantcli.calibrate.table import CalibrationTable, model_fingerprint
from quantcli.data import DataSource
from quantcli.errors import DataError, InputError
from quantcli.graph.io import weights_bytes
from quantcli.graph.mapped import release_external
from quantcli.memory import trim_heap
from quantcli.runtime import session_for_model

Progress = Callable[[int, int], None]  # (samples done, samples total)
SEGMENT_ABOVE = 256_000_000  # bytes of weights above which calibration runs by segments
SEGMENT_WEIGHTS = 64 << 20  # bytes of weights per segment


def run_exposed(
    model: ir.Model,
    tensors: list[str],
    data: DataSource,
    on_batch: Callable[[dict[str, np.ndarray], range], None],
    batch_size: int = 1,
    progress: Progress | None = None,
    provider: str = "cpu",
) -> None:
    """Run `model` over `data`, handing each batch's values of `tensors` to `on_batch`."""
    _check_tensors(tensors)
    with _exposed(model, tensors), session_for_model(model, provider) as session:
        done = 0
        for batch in data.batches(batch_size):
            outputs = session.run(tensors, batch.feeds)
            on_batch(dict(zip(tensors, outputs, strict=True)), batch.indices)
            done += len(batch.indices)
            if progress:
                progress(done, data.num_samples)


def collect_stats(
    model: ir.Model,
    tensors: list[str],
    data: DataSource,
    batch_size: int = 1,
    progress: Progress | None = None,
    provider: str = "cpu",
    channel_axes: dict[str, int] | None = None,
    gram: Collection[str] = (),
    segment_weights: int | None = None,
) -> tuple[dict[str, TensorStats], dict[str, ChannelStats]]:
    """Streaming statistics of `tensors` (intermediate values of `model`) over all of `data`,
    and per-channel statistics of those named in `channel_axes` (with x x^T sums for those
    also in `gram`). `segment_weights`: run by segments of that many weight bytes (default:
    `SEGMENT_WEIGHTS` when the model's weights exceed `SEGMENT_ABOVE` on the CPU)."""
    stats = {name: TensorStats() for name in tensors}
    channels = {
        name: ChannelStats(axis, track_gram=name in gram)
        for name, axis in (channel_axes or {}).items()
    }

    def update(values: dict[str, np.ndarray], indices: range) -> None:
        for name, array in values.items():
            _check_finite(name, array, indices)
            if name in stats:
                stats[name].update(array)
            if name in channels:
                channels[name].update(array)

    def spill(done: list[str]) -> None:  # a segment's tensors are complete
        for name in done:
            if name in channels:
                channels[name].spill_gram()

    exposed = tensors + [t for t in channels if t not in stats]  # shared-scale inputs too
    if segment_weights is None and provider == "cpu" and weights_bytes(model) > SEGMENT_ABOVE:
        segment_weights = SEGMENT_WEIGHTS
    if segment_weights is None:
        run_exposed(model, exposed, data, update, batch_size, progress, provider)
    else:
        run_segmented(model, exposed, data, update, batch_size, progress, segment_weights, spill)
    return stats, channels


def run_segmented(
    model: ir.Model,
    tensors: list[str],
    data: DataSource,
    on_batch: Callable[[dict[str, np.ndarray], range], None],
    batch_size: int,
    progress: Progress | None,
    budget: int,
    on_segment: Callable[[list[str]], None] | None = None,
) -> None:
    """Like `run_exposed`, one segment of about `budget` weight bytes at a time: each batch
    is handed to `on_batch` once per segment, with the tensors that segment computes;
    `on_segment` is then given those tensors (their data are done)."""
    _check_tensors(tensors)
    where = producer_positions(model)
    missing = [t for t in tensors if t not in where]
    if missing:
        raise InputError(f"tensor '{missing[0]}' is not in the model")
    nodes = list(model.graph)
    pos = {n.name: i for i, n in enumerate(nodes)}
    ranges = weight_segments(model, budget)
    runner = SegmentRunner(model, data, batch_size)
    steps, step = len(ranges) * len(runner.cache), 0
    try:
        for i, (start, end) in enumerate(ranges):
            outputs = [t for t in tensors if start <= where[t] < end or (i == 0 and where[t] < 0)]
            last = i + 1 == len(ranges)
            keep = None if last else frontier(model, nodes, pos, end)
            batch = iter(runner.indices)

            def update(values: dict[str, np.ndarray], outputs=outputs, batch=batch) -> None:
                nonlocal step
                indices = next(batch)
                if outputs:
                    on_batch({t: values[t] for t in outputs}, indices)
                step += 1
                if progress:
                    progress(data.num_samples * step // steps, data.num_samples)

            runner.run(outputs, update, keep=keep)
            if on_segment:
                on_segment(outputs)
            release_external(model)
            trim_heap()
    finally:
        runner.close()


def _check_tensors(tensors: list[str]) -> None:
    if not tensors:
        raise InputError(
            "the model has nothing to calibrate (no tensor would be quantized)",
            hint="check --op-types/--exclude, or run quantcli inspect on the model",
        )


class _exposed:
    """Temporarily list intermediate tensors as graph outputs so ORT returns them."""

    def __init__(self, model: ir.Model, tensors: list[str]) -> None:
        self.graph = model.graph
        values = {v.name: v for n in model.graph for v in n.outputs}
        values.update((v.name, v) for v in model.graph.inputs)
        missing = [t for t in tensors if t not in values]
        if missing:
            raise InputError(f"tensor '{missing[0]}' is not in the model")
        self.added = [values[t] for t in tensors if not values[t].is_graph_output()]

    def __enter__(self) -> None:
        for value in self.added:
            if value.type is None:  # shape inference gave up; activations here are float
                value.dtype = ir.DataType.FLOAT
        self.graph.outputs.extend(self.added)

    def __exit__(self, *exc: object) -> None:
        for value in self.added:
            self.graph.outputs.remove(value)


def _check_finite(name: str, array: np.ndarray, indices: range) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        sample = indices[0] if len(indices) == 1 else f"{indices[0]}..{indices[-1]}"
        raise DataError(
            f"activation '{name}' has NaN or Inf on sample {sample}",
            hint="check that sample's values and the model's preprocessing",
        )


def calibrate_model(
    model: ir.Model,
    model_path: Path,
    tensors: list[str],
    data: DataSource,
    config: CalibrationConfig,
    progress: Progress | None = None,
    channel_axes: dict[str, int] | None = None,
    gram: Collection[str] = (),
) -> CalibrationTable:
    """A full calibration table for a prepared model's planned tensors (`gram`: the
    channel-statistics tensors whose x x^T sums to keep as well)."""
    stats, channels = collect_stats(
        model, tensors, data, config.batch_size, progress, channel_axes=channel_axes, gram=gram
    )
    table = CalibrationTable(
        fingerprint=model_fingerprint(model_path),
        model_name=model_path.name,
        method=config.method,
        percentile=config.percentile,
        symmetric=config.symmetric,
        samples=data.num_samples,
        stats=stats,
        shard=config.shard,
        channels=channels,
    )
    table.compute_ranges()
    return table
