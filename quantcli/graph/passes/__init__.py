"""Preparation passes: each small, one job, run before quantization planning."""

from quantcli.graph.passes.fold_batchnorm import FoldBatchNormPass
from quantcli.graph.passes.fold_constants import FoldConstantTransformsPass
from quantcli.graph.passes.fold_pad import FoldPadIntoConvPass
from quantcli.graph.passes.lift_constants import LiftConstantsPass
from quantcli.graph.passes.opset import UpgradeOpsetPass
from quantcli.graph.passes.prepare import prepare_model
from quantcli.graph.passes.shapes import InferShapesPass

__all__ = [
    "FoldBatchNormPass",
    "FoldConstantTransformsPass",
    "FoldPadIntoConvPass",
    "InferShapesPass",
    "LiftConstantsPass",
    "UpgradeOpsetPass",
    "prepare_model",
]
