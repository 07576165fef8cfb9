"""Drop stale value_info (dynamo exports carry some) and infer shapes afresh."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


class InferShapesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        keep = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.outputs:
                if id(value) not in keep:
                    value.type = None
                    value.shape = None
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        return ir.passes.PassResult(model, modified=True)
