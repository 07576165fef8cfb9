"""Recognize models that are already quantized (one list of op types, used everywhere)."""

from __future__ import annotations

import onnx_ir as ir

from quantcli.errors import InputError

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
QOPERATOR_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLinear",
    "MatMulIntegerToFloat",
}
NBITS_OPS = {"MatMulNBits", "GatherBlockQuantized"}


def quantization_state(op_types: set[str]) -> list[str]:
    """Which quantized forms a set of op types contains."""
    state = []
    if op_types & QDQ_OPS:
        state.append("QDQ")
    if op_types & QOPERATOR_OPS:
        state.append("QOperator")
    if op_types & NBITS_OPS:
        state.append("MatMulNBits")
    return state


def check_not_quantized(model: ir.Model) -> None:
    found = sorted({n.op_type for n in model.graph} & (QDQ_OPS | QOPERATOR_OPS | NBITS_OPS))
    if found:
        raise InputError(
            f"the model is already quantized (it has {', '.join(found)})",
            hint="pass the float model",
        )
