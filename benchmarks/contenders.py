"""Who competes on each model, as commands run in child processes.

ORT recipes are JSON for ort_tool.py; quantcli is its CLI (`python -m quantcli`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import Spec

HERE = Path(__file__).resolve().parent
HEAVY = ["Conv", "MatMul", "Gemm"]

# ort-default: ONNX Runtime's quantizer as its documentation shows it.
DEFAULT_STATIC = {"mode": "static", "per_channel": True}  # quant_pre_process + QDQ + MinMax
DEFAULT_DYNAMIC = {"mode": "dynamic", "per_channel": True}
DEFAULT_INT4 = {"mode": "nbits", "block_size": 32}  # MatMulNBitsQuantizer, default algorithm

# ort-tuned candidates: `run.py --tune` measures each once; TUNED keeps the best per model.
_STATIC_TUNED = {
    "mode": "static",
    "per_channel": True,
    "reduce_range": False,
    "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True},
}
_HEAVY = _STATIC_TUNED | {"op_types": HEAVY}
TUNE_STATIC = {
    "heavy-minmax": _HEAVY,
    "heavy+clip-minmax": _HEAVY | {"op_types": [*HEAVY, "Clip", "Relu"]},
    "all-minmax-u8": _STATIC_TUNED | {"activation_type": "QUInt8"},
    "all-minmax-movavg": _STATIC_TUNED
    | {"extra_options": _STATIC_TUNED["extra_options"] | {"CalibMovingAverage": True}},
    "all-percentile": _STATIC_TUNED | {"calibrate_method": "Percentile", "limit": 128},
    "all-entropy": _STATIC_TUNED | {"calibrate_method": "Entropy", "limit": 128},
}
_DYN_TUNED = {"mode": "dynamic", "per_channel": True, "reduce_range": False, "op_types": ["MatMul"]}
TUNE_DYNAMIC = {
    "matmul-perchannel-s8": _DYN_TUNED,
    "matmul-perchannel-u8": _DYN_TUNED | {"weight_type": "QUInt8"},
    "matmul-pertensor-s8": _DYN_TUNED | {"per_channel": False},
    # MatMuls whose B is not a constant (attention, a tied LM head) keep float:
    "matmul-constb-perchannel-s8": _DYN_TUNED | {"extra_options": {"MatMulConstBOnly": True}},
    # weight-only INT8 (MatMulNBits, bits=8): activations stay float
    "nbits8-b32": {"mode": "nbits", "bits": 8, "block_size": 32},
    "nbits8-b32-acc4": {"mode": "nbits", "bits": 8, "block_size": 32, "accuracy_level": 4},
}
TUNE_INT4 = {
    "b32-asym": DEFAULT_INT4,
    "b32-sym": DEFAULT_INT4 | {"is_symmetric": True},
    "b32-asym-acc4": DEFAULT_INT4 | {"accuracy_level": 4},
    "b32-k_quant": DEFAULT_INT4 | {"algorithm": "k_quant"},
    "b32-hqq": DEFAULT_INT4 | {"algorithm": "hqq"},
}
# Kept after `run.py --tune` (figures: last section of docs/benchmarks.md). Static CNNs: U8
# activations / S8 weights, all ops (heavy-only loses Conv+Clip fusion: top-1 0.40 on
# EfficientNet). Transformers: dynamic MatMul per-channel S8 (as good as the default, and
# MatMulConstBOnly changes nothing here); since dynamic INT8 hurts SmolLM2 (perplexity 43 vs
# 24.7), weight-only INT8 (MatMulNBits bits=8, accuracy_level 4) is a contender of its own.
TUNED = {
    "mnist": "all-minmax-u8",
    "digits_sample": "all-minmax-u8",
    "efficientnet": "all-minmax-u8",
    "minilm": "matmul-perchannel-s8",
    "smollm2": "matmul-perchannel-s8",
}
TUNED_W8 = "nbits8-b32-acc4"
TUNED_INT4 = {"minilm": "b32-asym-acc4", "smollm2": "b32-asym-acc4"}


@dataclass
class Contender:
    name: str
    tool: str  # "float" | "ort" | "quantcli"
    recipe: dict[str, Any] | list[str]  # ORT recipe, or the quantcli arguments

    def command(self, model: Path, calib: Path, out: Path) -> list[str]:
        if self.tool == "ort":
            return [
                sys.executable,
                str(HERE / "ort_tool.py"),
                "convert",
                str(model),
                str(calib),
                str(out),
                json.dumps(self.recipe),
            ]
        args = [
            str(model) if a == "MODEL" else str(calib) if a == "CALIB" else a for a in self.recipe
        ]
        return [sys.executable, "-m", "quantcli", *args, "-o", str(out)]


def contenders(spec: Spec, tune: bool = False) -> list[Contender]:
    """float, ort-default, ort-tuned(-w8), quantcli, and the INT4 contenders where they apply."""
    static = not spec.transformer
    out = [
        Contender("float", "float", {}),
        Contender("ort-default", "ort", DEFAULT_STATIC if static else DEFAULT_DYNAMIC),
    ]
    table = TUNE_STATIC if static else TUNE_DYNAMIC
    out.append(Contender("ort-tuned", "ort", table[TUNED[spec.name]]))
    if not static:
        out.append(Contender("ort-tuned-w8", "ort", TUNE_DYNAMIC[TUNED_W8]))
    int8 = ["convert", "MODEL", "--bits", "8", "--data", "CALIB"]
    out.append(Contender("quantcli", "quantcli", int8))
    # Full 8-bit weights (VNNI/AMX x86, ARM64 dot product only): what portability costs.
    out.append(Contender("quantcli-cpu-vnni", "quantcli", [*int8, "--target", "cpu-vnni"]))
    # Notable options: what each default buys, measured against turning it off.
    if static:
        out += [
            Contender("quantcli-no-bias-correction", "quantcli", [*int8, "--no-bias-correction"]),
            Contender("quantcli-minmax", "quantcli", [*int8, "--method", "minmax"]),
            Contender("quantcli-entropy", "quantcli", [*int8, "--method", "entropy"]),
            Contender("quantcli-qoperator", "quantcli", [*int8, "--format", "qoperator"]),
        ]
    else:
        out += [
            Contender("quantcli-dynamic", "quantcli", ["convert", "MODEL", "--dynamic"]),
            Contender("quantcli-qdq", "quantcli", [*int8, "--format", "qdq"]),
        ]
    if spec.int4:
        # The defaults: RTN without data, GPTQ with (8-bit vocabulary head, tied table
        # shared); benchmarks/int4_bench.py measures budgets, presets and ORT's algorithms.
        int4 = ["convert", "MODEL", "--bits", "4"]
        gptq = [*int4, "--data", "CALIB"]
        out += [
            Contender("ort-default-int4", "ort", DEFAULT_INT4),
            Contender("ort-tuned-int4", "ort", TUNE_INT4[TUNED_INT4[spec.name]]),
            Contender("quantcli-int4-rtn", "quantcli", int4),
            Contender("quantcli-int4-gptq", "quantcli", gptq),
            Contender("quantcli-int4-qdq-form", "quantcli", [*int4, "--format", "qdq"]),
            Contender("quantcli-int4-budget-5.5", "quantcli", [*gptq, "--budget", "5.5"]),
        ]
        if spec.head:  # the same weights as ORT's INT4 (head and table float)
            same = [*int4, "--exclude", spec.head, "--no-embeddings"]
            out.append(Contender("quantcli-int4-rtn-head-float", "quantcli", same))
    if tune:
        out = out[:2] + [Contender(f"tune:{k}", "ort", v) for k, v in table.items()]
        if spec.int4:
            out += [Contender(f"tune:{k}", "ort", v) for k, v in TUNE_INT4.items()]
    return out


def calibration_commands(model: Path, calib: Path, table: Path, n: int) -> dict[str, list[str]]:
    """ORT's calibrators (create_calibrator + collect_data) and `quantcli calibrate`."""
    ort = {
        f"ort-{m.lower()}": [
            sys.executable,
            str(HERE / "ort_tool.py"),
            "calibrate",
            str(model),
            str(calib),
            str(table),
            m,
            str(n),
        ]
        for m in ("MinMax", "Entropy", "Percentile")
    }
    # --format qdq: calibrate the same MatMul inputs a static QDQ transformer needs (auto
    # quantizes transformer MatMuls dynamically and would have nothing to calibrate).
    return ort | {
        f"quantcli-{method}": [
            sys.executable,
            "-m",
            "quantcli",
            "calibrate",
            str(model),
            "--data",
            str(calib),
            "--limit",
            str(n),
            "--method",
            method,
            "--format",
            "qdq",
            "-o",
            str(table),
            "--force",
        ]
        for method in ("entropy", "mse")
    }
