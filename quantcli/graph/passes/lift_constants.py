"""Constant nodes become initializers, so weights look the same whoever exported them."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass


class LiftConstantsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Lift all sizes: rules read Clip bounds and Reshape shapes as initializers too.
        return LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
