"""Upgrade the default-domain opset when a feature needs it (per-channel QDQ needs 13)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter

from quantcli.errors import ModelError


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    def __init__(self, minimum: int) -> None:
        super().__init__()
        self.minimum = minimum

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if default_opset(model) >= self.minimum:  # a functional pass returns a new model
            return ir.passes.PassResult(model.clone(), modified=False)
        converted = convert_opset(
            ir.to_proto(model),
            self.minimum,
            f"from opset {default_opset(model)} to {self.minimum} "
            "(needed for per-channel quantization)",
            "re-export at opset 13 or newer, or pass --per-tensor",
        )
        onnx.checker.check_model(converted)
        return ir.passes.PassResult(ir.from_proto(converted), modified=True)


def convert_opset(proto: onnx.ModelProto, target: int, what: str, hint: str) -> onnx.ModelProto:
    """ONNX's version converter, its errors as one ModelError (`what`: "from opset X to Y
    (needed for ...)"), and the IR version it leaves behind raised to what the opset needs
    (opset 13 needs IR 7, opset 21 IR 10)."""
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ModelError(f"cannot upgrade the model {what}: {exc}", hint=hint) from exc
    needed = onnx.helper.find_min_ir_version_for(converted.opset_import, ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, needed)
    return converted
