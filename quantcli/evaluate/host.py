"""What the host is: CPU, its int8 instructions, and whether its int8 kernels saturate.

The int8 ISA comes from the CPU's flags; whether ONNX Runtime's u8 x s8 kernels add pairs
in a saturating int16 is measured with a two-row MatMulInteger (exact answer 64770, a
saturating kernel returns 32767), so it holds under emulators and odd dispatch too.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

_X86_ISA = (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"))


@dataclass(frozen=True)
class HostInfo:
    cpu: str
    machine: str  # x86_64, aarch64, arm64 ...
    int8_isa: str  # AMX | AVX512-VNNI | AVX-VNNI | AVX2 (no VNNI) | ARM dot product | ...
    int16_saturation: bool | None  # measured on ONNX Runtime's CPU kernels; None: unknown
    onnxruntime: str
    provider: str

    def to_dict(self) -> dict:
        return asdict(self)


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and not name:
            name = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return name or platform.processor() or platform.machine(), flags


def _isa(machine: str, flags: set[str]) -> str:
    if machine.lower() in ("x86_64", "amd64", "i686", "x86"):
        found = [label for flag, label in _X86_ISA if flag in flags]
        if found:
            return " + ".join(found)
        return "AVX2 (no VNNI)" if "avx2" in flags else "no AVX2"
    if machine.lower() in ("aarch64", "arm64"):
        if not flags:
            return "ARM (features unknown)"
        dot = "ARM dot product" if "asimddp" in flags else "ARM (no dot product)"
        return dot + (" + i8mm" if "i8mm" in flags else "")
    return "unknown"


@functools.cache
def int16_pairs_saturate() -> bool | None:
    """Run the probe on ONNX Runtime's CPU provider; None if it cannot run."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper

        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 2])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [4, 1])
        b = helper.make_tensor("b", TensorProto.INT8, [2, 1], [127, 127])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        graph = helper.make_graph([node], "probe", [a], [y], [b])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        out = session.run(None, {"a": np.full((4, 2), 255, np.uint8)})[0]
    except Exception:
        return None
    return bool(out.max() < 64770)


def describe_host(provider: str = "cpu") -> HostInfo:
    import onnxruntime

    machine = platform.machine()
    cpu, flags = _cpuinfo()
    return HostInfo(
        cpu=cpu,
        machine=machine,
        int8_isa=_isa(machine, flags),
        int16_saturation=int16_pairs_saturate(),
        onnxruntime=onnxruntime.__version__,
        provider=provider,
    )
