"""Prepare a loaded model for INT8 and plan it: shared by calibrate and convert."""

from __future__ import annotations

import onnx_ir as ir

from quantcli.graph.passes import prepare_model
from quantcli.graph.passes.opset import default_opset
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.plan import Plan, build_plan


def needed_opset(model: ir.Model, config: Int8Config) -> int | None:
    """Per-channel Q/DQ needs opset 13; float16 Q/DQ needs 19; the standard dynamic form
    (DynamicQuantizeLinear) 11."""
    has_fp16 = any(
        v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values()
    ) or any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.inputs)
    need = 19 if has_fp16 else (13 if config.per_channel else 10)
    if config.standard_ops:  # DynamicQuantizeLinear is opset 11
        need = max(need, 11)
    return need if default_opset(model) < need else None


def prepare_for_int8(model: ir.Model, config: Int8Config) -> tuple[ir.Model, Plan]:
    prepared = prepare_model(model, min_opset=needed_opset(model, config))
    return prepared, build_plan(prepared, config)
