"""ONNX Runtime's INT4 weight-only quantizer (MatMulNBitsQuantizer), one recipe per call.

    python benchmarks/int4_ort.py MODEL CALIB.npz OUT.onnx RECIPE_JSON

Recipe keys: algorithm (default | k_quant | hqq | gptq), block_size (32), bits (4),
is_symmetric (false), accuracy_level (None: the op's default, 0), limit (GPTQ samples).
`default` is ORT's RTN (its DefaultWeightOnlyQuantizer); `hqq` needs torch (run this file
with the export venv's python); `gptq` is the GPTQ ORT bundles (from Intel Neural Compressor)
fed with the calibration samples. Errors are not caught: the last stderr line is recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
from ort_tool import NpzReader


class Reader(NpzReader):
    """ort_tool's reader, iterable as ORT's GPTQ wants it."""

    def __len__(self) -> int:  # the base class raises NotImplementedError
        return self.count

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def main(model: str, calib: str, out: str, recipe: dict) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nb

    algo = recipe.get("algorithm", "default")
    block, bits = recipe.get("block_size", 32), recipe.get("bits", 4)
    config = None
    if algo == "hqq":
        config = nb.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif algo == "k_quant":
        config = nb.KQuantWeightOnlyQuantConfig()
    elif algo == "gptq":
        config = nb.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=Reader(model, calib, recipe.get("limit")),
            block_size=128,  # GPTQ's lazy-update batch (its own name), not the INT4 block
            actorder=recipe.get("actorder", True),
        )
    quant = nb.MatMulNBitsQuantizer(
        onnx.load(model),
        bits=bits,
        block_size=block,
        is_symmetric=recipe.get("is_symmetric", False),
        accuracy_level=recipe.get("accuracy_level"),
        algo_config=config,
    )
    quant.process()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    quant.model.save_model_to_file(out, use_external_data_format=False)


if __name__ == "__main__":
    main(*sys.argv[1:4], json.loads(sys.argv[4]))
