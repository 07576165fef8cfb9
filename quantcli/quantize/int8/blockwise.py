"""Blockwise int8 MatMuls: `com.microsoft.MatMulNBits` with bits=8 and accuracy_level=4.

For MatMuls whose input has a few huge channels (FFN down-projections after Gelu or a gated
SiLU), one int8 scale per tensor, as dynamic quantization uses, loses the small channels.
MatMulNBits at accuracy level 4 quantizes the activation per block of `block_size` along K
at run time, so an outlier only coarsens its own block; weights are int8 per block too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import MS_DOMAIN, Namer, add_initializer, const_array

BLOCK_SIZE = 32
ZERO_POINT = 128  # MatMulNBits' default zero point for 8 bits: 2 ** (bits - 1)


def quantize_blocks_int8(
    w: np.ndarray, block_size: int, qmax: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (B uint8 [N, n_blocks, block_size], scales float32 [N, n_blocks]).

    Symmetric per (block, column): q = round(w / s) in [-qmax, qmax], stored as q + 128
    (qmax 63: the 7-bit weights --reduce-range asks for; MatMulNBits cannot saturate an
    int16 pair either way). K is padded with zeros to a whole block.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    grouped = padded.reshape(blocks, block_size, n)
    scale = np.maximum(np.abs(grouped).max(axis=1) / qmax, 1e-12).astype(np.float32)
    q = np.clip(np.rint(grouped / scale[:, None, :]), -qmax, qmax).astype(np.int32) + ZERO_POINT
    return q.transpose(2, 0, 1).astype(np.uint8), np.ascontiguousarray(scale.T)


class BlockwiseInt8Pass(ir.passes.InPlacePass):
    def __init__(
        self, nodes: frozenset[str], block_size: int = BLOCK_SIZE, reduce_range: bool = False
    ) -> None:
        super().__init__()
        self.nodes, self.block_size = nodes, block_size
        self.qmax = 63 if reduce_range else 127

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        modified = False
        for node in list(graph):
            if node.name not in self.nodes or node.op_type != "MatMul":
                continue
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 2:
                continue
            b, scales = quantize_blocks_int8(w.astype(np.float32), self.block_size, self.qmax)
            base = node.name or "matmul"
            attrs = [
                ir.AttrInt64("K", w.shape[0]),
                ir.AttrInt64("N", w.shape[1]),
                ir.AttrInt64("bits", 8),
                ir.AttrInt64("block_size", self.block_size),
                ir.AttrInt64("accuracy_level", 4),
            ]
            inputs = [
                node.inputs[0],
                add_initializer(graph, namer(f"{base}.B_int8"), b),
                add_initializer(graph, namer(f"{base}.scales"), scales),
            ]
            new = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attrs, name=namer(f"{base}_nbits8"))
            out, result = node.outputs[0], new.outputs[0]
            result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
            graph.insert_before(node, new)
            out.replace_all_uses_with(result, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            modified = True
        if modified and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)
