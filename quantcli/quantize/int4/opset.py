"""Opset upgrade for `--format qdq` without copying the weights.

ONNX's version converter works on a whole protobuf: for a 0.5 GB model it held several
copies of every weight (4.5 GB peak). Only the graph needs converting, so the converter
gets the model with each large initializer replaced by an external-data reference that
nobody reads; the converted graph then gets the original tensors back by name.
"""

from __future__ import annotations

import onnx_ir as ir

from quantcli.graph.passes.opset import convert_opset, default_opset

_PLACEHOLDER = "quantcli-weights-kept-aside"
_SMALL = 1024  # bytes: smaller tensors travel with the graph (the converter may read them)


def upgrade_opset_light(model: ir.Model, target: int) -> ir.Model:
    if default_opset(model) >= target:
        return model
    kept: dict[str, ir.TensorProtocol] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes > _SMALL:
            kept[name] = tensor
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER,
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=tensor.shape,
                name=name,
            )
    try:
        proto = ir.to_proto(model)
    finally:
        for name, tensor in kept.items():
            model.graph.initializers[name].const_value = tensor
    converted = convert_opset(
        proto,
        target,
        f"from opset {default_opset(model)} to {target} (needed for INT4 DequantizeLinear)",
        "re-export at opset 21, or use --format matmulnbits",
    )
    del proto
    upgraded = ir.from_proto(converted)
    for name, value in upgraded.graph.initializers.items():
        if name in kept and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = kept[name]
    return upgraded
