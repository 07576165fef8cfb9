"""The preparation pipeline every conversion and calibration runs first.

Deterministic: the same model gives the same prepared graph and tensor names, so a
calibration table made on one run applies to the conversion on another.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveInitializersFromInputsPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

from quantcli.graph.passes.fold_batchnorm import FoldBatchNormPass
from quantcli.graph.passes.fold_constants import FoldConstantTransformsPass
from quantcli.graph.passes.fold_pad import FoldPadIntoConvPass
from quantcli.graph.passes.lift_constants import LiftConstantsPass
from quantcli.graph.passes.opset import UpgradeOpsetPass
from quantcli.graph.passes.shapes import InferShapesPass


def prepare_model(model: ir.Model, *, min_opset: int | None = None) -> ir.Model:
    """Opset upgrade, constants to initializers, BN/Pad folding, constant folding, shapes."""
    passes: list[ir.passes.PassBase] = []
    if min_opset:  # first: the converter writes new Constant nodes (Clip bounds, axes)
        passes.append(UpgradeOpsetPass(min_opset))
    passes += [
        LiftConstantsPass(),
        RemoveInitializersFromInputsPass(),
        FoldBatchNormPass(),
        FoldConstantTransformsPass(),
        FoldPadIntoConvPass(),
        RemoveUnusedNodesPass(),
        TopologicalSortPass(),
        InferShapesPass(),
    ]
    return ir.passes.PassManager(passes)(model).model
