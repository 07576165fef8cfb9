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
        proto = ir.to_proto(model)
        try:
            converted = version_converter.convert_version(proto, self.minimum)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ModelError(
                f"cannot upgrade the model from opset {default_opset(model)} to "
                f"{self.minimum} (needed for per-channel quantization): {exc}",
                hint="re-export at opset 13 or newer, or pass --per-tensor",
            ) from exc
        # The converter keeps the IR version; opset 13 needs IR 7, opset 21 (int4) IR 10.
        needed = onnx.helper.find_min_ir_version_for(converted.opset_import, ignore_unknown=True)
        converted.ir_version = max(converted.ir_version, needed)
        onnx.checker.check_model(converted)
        return ir.passes.PassResult(ir.from_proto(converted), modified=True)
