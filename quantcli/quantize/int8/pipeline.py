"""`convert --bits 8`: prepare, plan, get ranges, insert Q/DQ, lower, validate, save."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.calibrate.config import CalibrationConfig
from quantcli.calibrate.table import CalibrationTable, model_fingerprint
from quantcli.data import DataSource
from quantcli.errors import InputError
from quantcli.graph.io import LoadedModel
from quantcli.quantize.detect import check_not_quantized
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.plan import Plan
from quantcli.quantize.int8.prepare import prepare_for_int8
from quantcli.quantize.int8.qdq import QDQPass
from quantcli.quantize.int8.saturation_check import SaturationCheck, check_saturation

if TYPE_CHECKING:
    from quantcli.quantize.int8.dynamic import DynamicWeights, GramSource

Progress = Callable[[int, int], None]


@dataclass
class Int8Result:
    model: ir.Model
    plan: Plan
    quantized_by_type: dict[str, int]
    float_nodes: list[tuple[str, str, str]]  # node, op type, reason
    warnings: list[str] = field(default_factory=list)
    saturation: SaturationCheck | None = None


def quantize_int8(
    loaded: LoadedModel,
    config: Int8Config,
    *,
    table: CalibrationTable | None = None,
    data: DataSource | None = None,
    calibration: CalibrationConfig | None = None,
    progress: Progress | None = None,
) -> Int8Result:
    """Quantize a loaded float model to INT8 in the configured format (returns the graph)."""
    model = loaded.model
    check_not_quantized(model)
    model, plan = prepare_for_int8(model, config)
    if config.format == "dynamic":
        return _dynamic(model, plan, config)
    if plan.empty:
        raise InputError(
            "nothing to quantize: no node matches the selected op types",
            hint="run quantcli inspect to see the op types, then set --op-types/--include",
        )
    warnings = []
    owned = table is None  # made here: its x x^T sums may be dropped once used
    if plan.nodes or plan.smooth_inputs:
        table = _table(loaded, model, plan, config, table, data, calibration, progress)
    elif data is not None or table is not None:
        warnings.append("no node is quantized statically: the calibration data was not needed")
    if plan.nodes:
        QDQPass(plan, dict(table.ranges), config, dict(table.channels))(model)
    if config.format == "qoperator":
        from quantcli.quantize.int8.qoperator import QOperatorPass

        QOperatorPass()(model)
    if plan.dynamic:
        from quantcli.quantize.int8.dynamic import DynamicQuantizePass

        names = frozenset(name for name, _ in plan.dynamic)
        inputs = {n.name: n.inputs[0].name for n in model.graph if n.name in names and n.inputs}
        scales = _smooth(model, plan, table, names) if plan.smooth_inputs else {}
        importance = _input_importance(inputs, plan, table, scales, owned) if table else {}
        fused = not config.standard_ops
        DynamicQuantizePass(_dynamic_weights(config), fused, names, importance)(model)
    if plan.blockwise:
        from quantcli.quantize.int8.blockwise import BlockwiseInt8Pass

        names = frozenset(name for name, _ in plan.blockwise)
        BlockwiseInt8Pass(names, reduce_range=config.reduce_range)(model)
    RemoveUnusedNodesPass()(model)
    result = _result(model, plan, config)
    result.warnings.extend(warnings)
    return result


def _smooth(
    model: ir.Model, plan: Plan, table: CalibrationTable, nodes: frozenset[str]
) -> dict[str, np.ndarray]:
    """Smooth the dynamic MatMuls' outlier input channels; returns the divisors by tensor."""
    from quantcli.quantize.int8.smooth import SmoothInputsPass, smoothing_scales

    scales = {}
    for name in plan.smooth_inputs:  # _table checked that every one has statistics
        s = smoothing_scales(table.channels[name].absmax)
        if s is not None:
            scales[name] = s
    smoothing = SmoothInputsPass(scales, nodes)
    smoothing(model)
    plan.smoothed = sorted(smoothing.smoothed)
    return scales


def _input_importance(
    inputs: dict[str, str | None],
    plan: Plan,
    table: CalibrationTable,
    scales: dict[str, np.ndarray],
    release: bool = False,
) -> dict[str, tuple[np.ndarray, GramSource]]:
    """E[x^2] per input channel of each dynamic MatMul (by node) and, where calibration
    kept them, its x x^T sums, as the input is after smoothing (x / s), to weigh and round
    pair-safe weights. The sums stay packed until their node is quantized (unpacked, all
    of SmolLM2's would take 0.8 GB at once); with `release`, a tensor's are dropped from
    the table once its last reader has them (0.4 GB held to the end otherwise)."""
    smoothed = set(plan.smoothed)
    readers = Counter(inputs.values())
    grams: dict[str, _Grams] = {}
    found = {}
    for node, tensor in inputs.items():
        stats = table.channels.get(tensor or "")
        msq = None if stats is None else stats.mean_square
        if msq is None or tensor is None:
            continue
        s = scales.get(tensor) if node in smoothed else None
        if s is not None:
            msq = msq / s**2
        source = grams.setdefault(tensor, _Grams(stats, readers[tensor], release))
        found[node] = (msq, partial(source.get, s))
    return found


class _Grams:
    """One tensor's x x^T sums, unpacked for each node that reads the tensor."""

    def __init__(self, stats: ChannelStats, readers: int, release: bool) -> None:
        self.stats, self.left, self.release = stats, readers, release

    def get(self, s: np.ndarray | None) -> np.ndarray | None:
        gram = self.stats.gram
        self.left -= 1
        if self.release and self.left <= 0:
            self.stats.gram = None
        return gram if gram is None or s is None else gram / np.outer(s, s)


def _pattern_warnings(plan: Plan) -> list[str]:
    return [f"--include/--exclude pattern '{p}' matches no node" for p in plan.unmatched]


def calibrate_plan(
    model: ir.Model,
    path: Path,
    plan: Plan,
    int8: Int8Config,
    data: DataSource,
    config: CalibrationConfig,
    progress: Progress | None = None,
) -> CalibrationTable:
    """The table a plan needs: its activations' ranges, per-channel statistics and, for
    pair-safe weights, the inputs' x x^T sums (GPTQ-style rounding)."""
    from quantcli.calibrate.runner import calibrate_model

    axes = plan.channel_axes()
    gram = gram_inputs(model, plan) if int8.pair_safe else set()
    return calibrate_model(model, path, plan.activations, data, config, progress, axes, gram)


def gram_inputs(model: ir.Model, plan: Plan) -> set[str]:
    """Inputs whose x x^T sums pair-safe rounding uses: those of 1x1 group-1 Convs, Gemms
    and dynamic MatMuls (a depthwise or k x k Conv's input would cost much and serve none)."""
    nodes = {n.name: n for n in model.graph}
    found = set(plan.smooth_inputs)
    for entry in plan.nodes:
        node = nodes.get(entry.node)
        if node is None or not entry.inputs or entry.weight is None:
            continue
        weight = node.inputs[1].shape if len(node.inputs) > 1 else None
        pointwise = node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1
        pointwise = pointwise and weight is not None and all(d == 1 for d in weight[2:])
        if pointwise or node.op_type == "Gemm":
            found.add(entry.inputs[0])
    return found


def _table(
    loaded: LoadedModel,
    model: ir.Model,
    plan: Plan,
    int8: Int8Config,
    table: CalibrationTable | None,
    data: DataSource | None,
    calibration: CalibrationConfig | None,
    progress: Progress | None,
) -> CalibrationTable:
    if table is None:
        if data is None:
            raise InputError(
                "static INT8 needs activation ranges",
                hint="pass --data SAMPLES or --calibration table.json, or use --dynamic",
            )
        config = calibration or CalibrationConfig()
        table = calibrate_plan(model, loaded.path, plan, int8, data, config, progress)
    elif table.fingerprint != model_fingerprint(loaded.path):
        raise InputError(
            f"the calibration table was made for another model ({table.model_name})",
            hint="recalibrate this model with quantcli calibrate",
        )
    missing = [t for t in plan.activations if t not in table.ranges]
    missing += [t for t in plan.smooth_inputs if t not in table.channels]
    if missing:
        raise InputError(
            f"the calibration table has no statistics for {len(missing)} tensors "
            f"(e.g. '{missing[0]}')",
            hint="calibrate with the same options as convert (--op-types, --include, "
            "--exclude, --smooth)",
        )
    return table


def _dynamic(model: ir.Model, plan: Plan, config: Int8Config) -> Int8Result:
    from quantcli.quantize.int8.dynamic import DynamicQuantizePass

    names = {n.node for n in plan.nodes if n.op_type in ("MatMul", "Gemm") and n.weight}
    if not names:
        raise InputError(
            "nothing to quantize dynamically: no MatMul/Gemm with a constant weight",
            hint="use static quantization (--data) for convolutional models",
        )
    DynamicQuantizePass(_dynamic_weights(config), not config.standard_ops, frozenset(names))(model)
    RemoveUnusedNodesPass()(model)
    return _result(model, plan, config)


def _dynamic_weights(config: Int8Config) -> DynamicWeights:
    from quantcli.quantize.int8.dynamic import DynamicWeights

    return DynamicWeights(config.per_channel, config.reduce_range, config.pair_safe)


def _result(model: ir.Model, plan: Plan, config: Int8Config) -> Int8Result:
    counts = Counter(n.op_type for n in plan.nodes)
    smoothed = set(plan.smoothed)
    counts.update(
        f"{op} (dynamic, smoothed)" if name in smoothed else f"{op} (dynamic)"
        for name, op in plan.dynamic
    )
    counts.update(f"{op} (blockwise int8)" for _, op in plan.blockwise)
    check = check_saturation(model)  # what the written weights do, not what was meant
    model.metadata_props["quantcli.target"] = config.target
    model.metadata_props["quantcli.x86_int16_saturation_safe"] = str(check.safe).lower()
    return Int8Result(
        model,
        plan,
        dict(sorted(counts.items())),
        list(plan.skipped),
        _pattern_warnings(plan),
        saturation=check,
    )
