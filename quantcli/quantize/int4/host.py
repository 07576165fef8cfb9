"""MatMulNBits' accuracy_level for the host that converts (`--accuracy-level` overrides).

accuracy_level 4 quantizes activations to int8 per block at run time and runs int8 dot
products; 0 dequantizes the weights to float. Measured on SmolLM2-135M (docs/int4.md):
on x86 with AVX-512 VNNI level 4 is faster for both the 128-token prompt and the 1-token
step. Hosts with int8 dot-product instructions (VNNI, AMX, ARM dot product) take level 4
without a probe; on any other host a short probe (about half a second) times both levels on
a layer-sized product and keeps the faster.
"""

from __future__ import annotations

import functools
import time

FAST_INT8 = ("VNNI", "AMX", "ARM dot product")


@functools.cache
def choose_accuracy_level() -> tuple[int, str]:
    """(level, why) for this host."""
    from quantcli.evaluate.host import describe_host

    isa = describe_host().int8_isa
    if any(tag in isa for tag in FAST_INT8) and "no dot" not in isa:
        return 4, f"int8 dot products on this host ({isa})"
    try:
        t0, t4 = probe_levels()
    except Exception as exc:  # a probe that cannot run must not stop a conversion
        return 4, f"default (probe failed: {type(exc).__name__})"
    level = 0 if t0 < 0.95 * t4 else 4
    return level, f"measured on this host ({isa}): level 4 {t4:.2f} ms, level 0 {t0:.2f} ms"


def probe_levels(m: int = 64, k: int = 1024, n: int = 1024, reps: int = 12) -> tuple[float, float]:
    """Median ms of a [m, k] x [k, n] MatMulNBits (4-bit, block 32) at level 0 and 4."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    blocks = k // 32
    b = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.01).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    times = []
    for level in (0, 4):
        node = helper.make_node(
            "MatMulNBits",
            ["x", "b", "s"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=32,
            accuracy_level=level,
        )
        graph = helper.make_graph(
            [node],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [
                helper.make_tensor("b", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
                helper.make_tensor(
                    "s", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True
                ),
            ],
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        )
        model.ir_version = 10
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        session.run(None, {"x": x})
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            session.run(None, {"x": x})
            samples.append((time.perf_counter() - t) * 1e3)
        times.append(sorted(samples)[len(samples) // 2])
    return times[0], times[1]
