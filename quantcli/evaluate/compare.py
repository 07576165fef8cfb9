"""`compare`: how much a quantized model differs from its float original, and how fast it is.

One streamed pass over the data scores every output (and feeds a user metric), latency is
then timed on the first batch, and an optional second pass measures per-layer error.
`data.batches(batch_size)` is therefore iterated up to twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from quantcli.errors import DataError, InputError, ModelError, QuantcliError
from quantcli.evaluate.gates import check_gates_possible, evaluate_gates
from quantcli.evaluate.host import HostInfo, describe_host
from quantcli.evaluate.latency import measure_latency
from quantcli.evaluate.metrics import OutputAccumulator, OutputMetrics
from quantcli.evaluate.model_file import check_signatures, inspect_model
from quantcli.evaluate.per_layer import per_layer_errors
from quantcli.evaluate.plugin import MetricPlugin, load_metric
from quantcli.evaluate.result import SCHEMA, CompareConfig, CompareResult, DataInfo
from quantcli.runtime import resolve_providers, session_options

if TYPE_CHECKING:
    from quantcli.quantize.int8.saturation_check import SaturationCheck

Progress = Callable[[int, int], None]
__all__ = ["SCHEMA", "CompareConfig", "CompareResult", "DataInfo", "DataSourceLike", "compare"]


class DataSourceLike(Protocol):
    """What compare needs of quantcli.data's DataSource (read-only attributes suffice)."""

    @property
    def description(self) -> str: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def synthetic(self) -> bool: ...
    @property
    def labels(self) -> np.ndarray | None: ...

    def batches(self, batch_size: int) -> Iterable[Any]: ...  # Batch(indices, feeds)


def compare(
    float_path: str | os.PathLike,
    quant_path: str | os.PathLike,
    data: DataSourceLike,
    config: CompareConfig | None = None,
    progress: Progress | None = None,
) -> CompareResult:
    """Compare FLOAT and QUANT on `data`; bad input raises InputError before any run."""
    cfg = config or CompareConfig()
    cfg.check()
    labels = read_labels(data)
    check_gates_possible(
        cfg.gates,
        has_labels=labels is not None,
        latency_runs=cfg.runs,
        has_metric=cfg.metric is not None,
    )
    resolve_providers(cfg.provider)
    fm, qm = inspect_model(str(float_path)), inspect_model(str(quant_path))
    check_signatures(fm, qm)
    plugin = load_metric(cfg.metric) if cfg.metric else None
    n = data.num_samples if cfg.max_samples is None else min(data.num_samples, cfg.max_samples)
    if n <= 0:
        raise DataError("the data holds no samples", hint="check the --data path or pattern")
    latency_steps = cfg.warmup + cfg.runs if cfg.runs else 0
    tick = _ticker(progress, n * (2 if cfg.per_layer else 1) + latency_steps)

    fs, qs = open_session(fm.path, cfg), open_session(qm.path, cfg)
    names = [name for name, _ in fm.outputs]
    batches = labelled_batches(data, cfg.batch_size, n, labels)
    outputs, (rows, feed) = score_outputs(fs, qs, names, batches, plugin, tick)
    latency = None
    if cfg.runs:
        latency = measure_latency(fs, qs, feed, rows, cfg.runs, cfg.warmup, cfg.threads, tick)
    layers = None
    if cfg.per_layer:
        plain = ((i, f) for i, f, _ in labelled_batches(data, cfg.batch_size, n, None))
        layers = per_layer_errors(fm.path, qm.path, plain, cfg.provider, cfg.threads, tick)
    info = DataInfo(data.description, n, data.num_samples, bool(data.synthetic), labels is not None)
    custom = plugin.result() if plugin is not None else {}
    result = CompareResult(fm, qm, info, cfg, outputs, latency, layers, custom)
    host = describe_host(cfg.provider)
    check = saturation_of(qm.path)
    return replace(
        result,
        gates=evaluate_gates(cfg.gates, result.summary(), custom),
        host=host,
        x86_saturation=check.to_dict(),
        warnings=saturation_warnings(host, check),
    )


def saturation_of(path: str) -> SaturationCheck:
    import onnx_ir as ir

    from quantcli.quantize.int8.saturation_check import check_saturation

    return check_saturation(ir.load(path))


def saturation_warnings(host: HostInfo, check: SaturationCheck) -> list[str]:
    """Say when the quantized model's accuracy depends on which x86 CPU runs it."""
    if check.safe or host.provider != "cpu":
        return []
    nodes = len(check.risks) + len(check.unchecked)
    fix = "convert with --target cpu (the default) for a model accurate on every CPU"
    if host.int16_saturation:
        return [
            f"this CPU's int8 kernels saturate int16 pairs (no VNNI) and {nodes} nodes of the "
            f"quantized model can overflow them: its accuracy here is below a VNNI CPU's; {fix}"
        ]
    return [
        f"{nodes} nodes of the quantized model can saturate int16 pairs on x86 CPUs without "
        f"VNNI (AVX2): the accuracy measured here does not hold there; {fix}"
    ]


Feeds = dict[str, np.ndarray]
LabelledBatch = tuple[np.ndarray, Feeds, np.ndarray | None]  # indices, feeds, labels


def score_outputs(
    fs: Any,
    qs: Any,
    names: list[str],
    batches: Iterable[LabelledBatch],
    plugin: MetricPlugin | None,
    tick: Callable[[int], None],
) -> tuple[list[OutputMetrics], tuple[int, Feeds]]:
    """The built-in (and user) metrics over all batches, and the first batch for timing."""
    accs, first = accumulate_outputs(fs, qs, names, batches, plugin, tick)
    return [acc.result() for acc in accs.values()], first


def accumulate_outputs(
    fs: Any,
    qs: Any,
    names: list[str],
    batches: Iterable[LabelledBatch],
    plugin: MetricPlugin | None,
    tick: Callable[[int], None],
) -> tuple[dict[str, OutputAccumulator], tuple[int, Feeds]]:
    """score_outputs' accumulators, which merge across shards of the data (merge())."""
    accs = {name: OutputAccumulator(name) for name in names}
    first: tuple[int, Feeds] | None = None
    for indices, feeds, lab in batches:
        fo, qo = _run(fs, feeds, indices, "float"), _run(qs, feeds, indices, "quantized")
        for name, acc in accs.items():
            acc.update(fo[name], qo[name], indices, lab)
        if plugin is not None:
            plugin.update(fo, qo, lab, feeds)
        first = first or (len(indices), feeds)
        tick(len(indices))
    if first is None:
        raise DataError("the data yielded no batches", hint="check the --data path or pattern")
    return accs, first


def read_labels(data: DataSourceLike) -> np.ndarray | None:
    if data.labels is None:
        return None
    labels = np.asarray(data.labels)
    if labels.ndim == 2:  # one-hot rows
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.number):
        raise InputError(
            f"labels must be one class index per sample, got {labels.dtype} {labels.shape}"
        )
    if len(labels) != data.num_samples:
        raise InputError(
            f"{len(labels)} labels for {data.num_samples} samples",
            hint="give exactly one label per sample, in the data's order",
        )
    return labels


def _ticker(progress: Progress | None, total: int) -> Callable[[int], None]:
    done = 0

    def tick(steps: int) -> None:
        nonlocal done
        done += steps
        if progress is not None:
            progress(min(done, total), total)

    return tick


def labelled_batches(
    data: DataSourceLike, batch_size: int, limit: int, labels: np.ndarray | None
) -> Iterator[LabelledBatch]:
    """(indices, feeds, labels) of the first `limit` samples, the last batch cut if needed.

    Labels are in batch order (indices are dataset positions, which sharding spaces out).
    """
    seen = 0
    for batch in data.batches(batch_size):
        indices, feeds = np.asarray(batch.indices), dict(batch.feeds)
        keep = min(len(indices), limit - seen)
        if keep < len(indices):
            indices, feeds = indices[:keep], {k: v[:keep] for k, v in feeds.items()}
        yield indices, feeds, None if labels is None else labels[seen : seen + keep]
        seen += keep
        if seen >= limit:
            return


def open_session(path: str, cfg: CompareConfig) -> Any:
    """An ORT session; both models get identical options.

    Spin-waiting is off: with interleaved runs, one session's idle thread pool would
    otherwise keep spinning and steal cores from the other session's run.
    """
    import onnxruntime as ort

    opts = session_options(cfg.threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, opts, providers=resolve_providers(cfg.provider))
    except QuantcliError:
        raise
    except Exception as exc:  # ORT's own error types share no useful base class
        raise ModelError(f"onnxruntime cannot load {path}: {exc}") from None


def _run(session: Any, feeds: dict[str, np.ndarray], indices: np.ndarray, which: str) -> dict:
    try:
        values = session.run(None, feeds)
    except Exception as exc:
        span = f"{int(indices[0])}..{int(indices[-1])}" if len(indices) else "?"
        raise DataError(
            f"the {which} model failed on samples {span}: {exc}",
            hint="check that the data matches the model's inputs (names, dtypes, shapes)",
        ) from None
    return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}
