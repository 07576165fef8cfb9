"""Typed, frozen configs: what a conversion should do. Unknown or contradictory is an error."""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.errors import InputError

FORMATS = ("auto", "qdq", "qoperator", "dynamic")
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
# cpu: every CPU, x86 without VNNI included (int8 weights kept within int16 pair sums);
# cpu-vnni: full 8-bit, for x86 with AVX512-VNNI/AVX-VNNI/AMX or ARM64 with dot product only.
TARGETS = ("cpu", "cpu-vnni", "tensorrt")
# Per-node formats a recipe (quantcli tune) can set, over what the planner would choose:
# static int8 (QDQ), dynamic int8 (DynamicQuantizeMatMul), weight-only int8 (MatMulNBits
# bits=8), or float.
NODE_FORMATS = ("static", "dynamic", "weight-only", "float")


@dataclass(frozen=True)
class Int8Config:
    # auto: QDQ for convolutions and Gemm, dynamic int8 for MatMul weights (the faster and
    # more accurate form for transformer layers on CPU, measured: docs/int8.md).
    format: str = "auto"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    symmetric_activations: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None  # None: the measured default set
    include: tuple[str, ...] = ()  # node names / globs forced in (over default heuristics)
    exclude: tuple[str, ...] = ()  # node names / globs kept float
    quantize_depthwise: bool = True  # float depthwise convs between Q/DQ get per-tensor
    # weights from ONNX Runtime's WeightBiasQuantization; int8 is also faster (docs/int8.md)
    bias_correction: bool = True  # needs per-channel input means from calibration
    # auto: divide outlier channels of dynamic MatMul inputs into the weights (quantize/
    # smooth.py); needs per-channel max |x| from calibration. Off: FFN down-projections
    # (after Gelu / gated SiLU) become blockwise int8 instead.
    smooth: bool = True
    target: str = "cpu"
    # (node name, one of NODE_FORMATS), sorted: overrides the planner for those nodes.
    node_formats: tuple[tuple[str, str], ...] = ()
    # Only standard ONNX ops (no com.microsoft): dynamic MatMuls as DynamicQuantizeLinear ->
    # MatMulInteger (ONNX Runtime fuses them back into its kernel), no blockwise MatMulNBits.
    standard_ops: bool = False

    def __post_init__(self) -> None:
        _choice("--format", self.format, FORMATS)
        _choice("--activation-type", self.activation_type, ACTIVATION_TYPES)
        _choice("--weight-type", self.weight_type, WEIGHT_TYPES)
        _choice("--target", self.target, TARGETS)
        if self.target == "tensorrt":
            if self.format != "qdq":
                raise InputError("--target tensorrt needs --format qdq", hint="drop --format")
            if self.activation_type != "int8" or not self.symmetric_activations:
                raise InputError(
                    "--target tensorrt uses symmetric int8 activations",
                    hint="use Int8Config.for_target('tensorrt') or drop the activation options",
                )
        for name, fmt in self.node_formats:
            _choice(f"the format of node '{name}'", fmt, NODE_FORMATS)
        if self.node_formats and self.format != "auto":
            raise InputError("per-node formats need --format auto", hint="drop --format")
        if self.standard_ops and self.format == "qoperator":
            raise InputError(
                "--standard-ops cannot write the QOperator form (QGemm and others are "
                "com.microsoft ops)",
                hint="use --format qdq or auto",
            )
        if self.standard_ops and any(f == "weight-only" for _, f in self.node_formats):
            raise InputError("weight-only nodes are MatMulNBits, not a standard ONNX op")
        if self.weight_type == "uint8" and self.format == "dynamic":
            raise InputError("--dynamic needs --weight-type int8", hint="drop --weight-type")

    def node_format(self, name: str) -> str | None:
        return dict(self.node_formats).get(name)

    @property
    def pair_safe(self) -> bool:
        """Int8 weights must not saturate the int16 pair sums of x86 kernels without VNNI."""
        return self.target == "cpu"

    @staticmethod
    def for_target(target: str, **overrides: object) -> Int8Config:
        if target == "tensorrt":
            base = {
                "activation_type": "int8",
                "symmetric_activations": True,
                "target": target,
                "format": "qdq",
            }
            return Int8Config(**{**base, **overrides})  # type: ignore[arg-type]
        return Int8Config(target=target, **overrides)  # type: ignore[arg-type]


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{option} '{value}' is not supported", hint=f"use {', '.join(allowed)}")
