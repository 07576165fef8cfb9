"""`convert --bits 4` options (`Int4Config`, validated when built) and its result."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from quantcli.errors import InputError
from quantcli.quantize.int4.formats import (
    Choice,
)
from quantcli.quantize.int4.mixed import (
    MIXES,
)
from quantcli.quantize.int4.plan import Int4Candidate, Int4Unit

BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("auto", "rtn", "gptq")
FORMATS = ("matmulnbits", "qdq")


@dataclass(frozen=True)
class Int4Config:
    block_size: int = 32
    # Asymmetric by default: measured better on SmolLM2 and MiniLM (docs/int4.md).
    symmetric: bool = False
    # auto: GPTQ when calibration data is given, RTN with clip search without.
    algorithm: str = "auto"
    format: str = "matmulnbits"
    # MatMulNBits accuracy_level; None: chosen for this host (host.py).
    accuracy_level: int | None = None
    exclude: tuple[str, ...] = ()
    # Gather tables: None (auto): a table tied to the output head shares the head's
    # quantized data, other tables are quantized too; False: all float; True: all quantized.
    embeddings: bool | None = None
    budget_bpw: float | None = None  # mixed precision: average bits per weight
    max_bytes: int | None = None  # mixed precision: the written file at most this size
    mix: str | None = None  # a named preset (no data needed)
    # GPTQ on the outputs of the layers already quantized (True) or of the float model.
    # Measured on SmolLM2-135M: no better (25.98 against 25.95), one more run per segment.
    sequential: bool = False
    # Block scales of a float32 model stored as float16 (times a power of two) and widened by
    # Cast -> Mul, which ONNX Runtime folds into float32 initializers when it loads the model:
    # 0.5 bits per weight less at block 32, the same kernels. Off by default: with graph
    # optimizations disabled nothing folds, and ONNX Runtime 1.32's MatMulNBits at accuracy
    # level 4 then computes zeros from scales that are not initializers (docs/int4.md).
    compact_scales: bool = False

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise InputError(
                f"--block-size {self.block_size} is not supported",
                hint=f"use one of {', '.join(map(str, BLOCK_SIZES))}",
            )
        if self.algorithm not in ALGORITHMS:
            raise InputError(
                f"--algorithm '{self.algorithm}' is not supported",
                hint=f"use {', '.join(ALGORITHMS)}",
            )
        if self.format not in FORMATS:
            raise InputError(
                f"--format '{self.format}' is not an INT4 format",
                hint=f"use {' or '.join(FORMATS)}",
            )
        if self.accuracy_level is not None and not 0 <= self.accuracy_level <= 4:
            raise InputError("--accuracy-level must be 0..4")
        budgets = [b for b in (self.budget_bpw, self.max_bytes, self.mix) if b is not None]
        if len(budgets) > 1:
            raise InputError("--budget and --mix are exclusive", hint="give one of them")
        if self.budget_bpw is not None and not 2.0 < self.budget_bpw <= 32.0:
            raise InputError(
                f"--budget {self.budget_bpw:g} bits per weight is out of range",
                hint="give a value above 4 (all 4-bit) and at most 32 (float)",
            )
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise InputError("--budget must be a positive size")
        if self.compact_scales and self.format != "matmulnbits":
            raise InputError(
                "--compact-scales needs --format matmulnbits",
                hint="DequantizeLinear takes its scales in the output's type; drop the flag",
            )
        if self.mix is not None and self.mix not in MIXES:
            raise InputError(f"--mix '{self.mix}' is not a preset", hint=f"use {', '.join(MIXES)}")


@dataclass
class UnitResult:
    unit: Int4Unit
    choice: Choice
    bytes: int  # stored bytes of the unit's weights in this choice


@dataclass
class Int4Result:
    model: ir.Model
    quantized: list[Int4Candidate]
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)
    units: list[UnitResult] = field(default_factory=list)
    algorithm: str = "rtn"
    accuracy_level: int = 4
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    budget_bytes: int | None = None

    @property
    def params(self) -> int:
        return sum(u.unit.params for u in self.units)

    @property
    def bits_per_weight(self) -> float:
        params = self.params
        return 8 * sum(u.bytes for u in self.units) / params if params else 0.0
