"""ONNX Runtime's own quantizer, driven by a JSON recipe; run by run.py in a child process.

    python benchmarks/ort_tool.py convert MODEL CALIB.npz OUT.onnx RECIPE_JSON
    python benchmarks/ort_tool.py calibrate MODEL CALIB.npz TABLE.json METHOD LIMIT

Errors are not caught: the child's last stderr line ("Type: message") is what run.py records.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime import quantization as q
from onnxruntime.quantization.shape_inference import quant_pre_process


class NpzReader(q.CalibrationDataReader):
    """One sample at a time (batch 1) from a .npz whose keys are the model's input names."""

    def __init__(self, model: str, npz: str, limit: int | None = None) -> None:
        names = [i.name for i in onnx.load(model, load_external_data=False).graph.input]
        data = np.load(npz)
        self.arrays = {n: data[n] for n in names}
        total = len(next(iter(self.arrays.values())))
        self.count = min(total, limit) if limit else total
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.count:
            return None
        i, self.pos = self.pos, self.pos + 1
        return {n: a[i : i + 1] for n, a in self.arrays.items()}

    def rewind(self) -> None:
        self.pos = 0


def static(model: str, calib: str, out: str, r: dict[str, Any], tmp: Path) -> None:
    src = model
    if r.get("preprocess", True):
        src = str(tmp / "pre.onnx")
        quant_pre_process(model, src)
    q.quantize_static(
        src,
        out,
        NpzReader(src, calib, r.get("limit")),
        quant_format=q.QuantFormat[r.get("quant_format", "QDQ")],
        op_types_to_quantize=r.get("op_types"),
        per_channel=r.get("per_channel", True),
        reduce_range=r.get("reduce_range", False),
        activation_type=q.QuantType[r.get("activation_type", "QInt8")],
        weight_type=q.QuantType[r.get("weight_type", "QInt8")],
        calibrate_method=q.CalibrationMethod[r.get("calibrate_method", "MinMax")],
        extra_options=r.get("extra_options", {}),
    )


def dynamic(model: str, out: str, r: dict[str, Any]) -> None:
    q.quantize_dynamic(
        model,
        out,
        op_types_to_quantize=r.get("op_types"),
        per_channel=r.get("per_channel", True),
        reduce_range=r.get("reduce_range", False),
        weight_type=q.QuantType[r.get("weight_type", "QInt8")],
        extra_options=r.get("extra_options", {}),
    )


def nbits(model: str, out: str, r: dict[str, Any]) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nb

    algo = r.get("algorithm", "default")
    config = None
    if algo == "hqq":
        config = nb.HQQWeightOnlyQuantConfig(
            block_size=r.get("block_size", 32), bits=r.get("bits", 4)
        )
    elif algo == "k_quant":
        config = nb.KQuantWeightOnlyQuantConfig()
    quant = nb.MatMulNBitsQuantizer(
        onnx.load(model),
        bits=r.get("bits", 4),
        block_size=r.get("block_size", 32),
        is_symmetric=r.get("is_symmetric", False),
        accuracy_level=r.get("accuracy_level"),
        algo_config=config,
    )
    quant.process()
    quant.model.save_model_to_file(out, use_external_data_format=False)


def calibrate(model: str, calib: str, table: str, method: str, limit: int, tmp: Path) -> None:
    cal = q.create_calibrator(
        model,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=q.CalibrationMethod[method],
    )
    cal.collect_data(NpzReader(model, calib, limit))
    ranges = cal.compute_data()
    flat = {
        name: [float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))]
        for name, v in ranges.data.items()
    }
    Path(table).write_text(json.dumps(flat))


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="ort-tool-") as d:
        tmp = Path(d)
        if argv[0] == "convert":
            model, calib, out, recipe = argv[1:5]
            r = json.loads(recipe)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            if r["mode"] == "static":
                static(model, calib, out, r, tmp)
            elif r["mode"] == "dynamic":
                dynamic(model, out, r)
            else:
                nbits(model, out, r)
        else:
            model, calib, table, method, limit = argv[1:6]
            calibrate(model, calib, table, method, int(limit), tmp)


if __name__ == "__main__":
    main(sys.argv[1:])
