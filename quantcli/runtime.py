"""ONNX Runtime sessions: provider selection and models held in memory or on disk.

onnxruntime is imported lazily so that `quantcli --help` stays fast.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError

if TYPE_CHECKING:
    import onnx_ir as ir
    import onnxruntime as ort

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Above this we hand ORT a file instead of serialized bytes: the proto copy and its bytes
# would sit beside our model and ORT's own copy (SmolLM2 INT8 calibration peak: 3.0 GB from
# bytes, 2.4 GB from a file; a protobuf cannot exceed 2 GiB anyway).
_IN_MEMORY_LIMIT = 256_000_000


def resolve_providers(provider: str) -> list[str]:
    """Map `cpu|cuda|tensorrt` to ORT provider names, failing clearly when unavailable."""
    import onnxruntime as ort

    key = provider.lower()
    if key not in PROVIDERS:
        raise InputError(
            f"unknown provider '{provider}'", hint=f"choose one of {', '.join(PROVIDERS)}"
        )
    wanted = PROVIDERS[key]
    available = ort.get_available_providers()
    if wanted not in available:
        names = ", ".join(k for k, v in PROVIDERS.items() if v in available)
        extra = " (install quantcli[gpu] and a CUDA driver)" if key != "cpu" else ""
        raise InputError(
            f"execution provider '{key}' is not available in this onnxruntime{extra}",
            hint=f"available here: {names}",
        )
    # Keep CPU as a fallback for ops the accelerator does not implement.
    return [wanted] if key == "cpu" else [wanted, "CPUExecutionProvider"]


_default_threads: int | None = None


def set_default_threads(threads: int | None) -> None:
    """Intra-op threads for sessions that do not ask for a number (None: ONNX Runtime's
    default, one per core). A cluster task sets the CPUs it was given, so tasks sharing a
    node do not each start a thread per core."""
    global _default_threads
    _default_threads = threads


def session_options(
    threads: int | None = None, optimize: bool = True, arena: bool = True
) -> ort.SessionOptions:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    threads = threads or _default_threads
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def create_session(
    model: str | os.PathLike | bytes,
    provider: str = "cpu",
    threads: int | None = None,
    optimize: bool = True,
    arena: bool = True,
) -> ort.InferenceSession:
    """An ORT session over a model file path or serialized bytes (`arena=False`: CPU memory
    is returned after each run instead of kept for the next, for a session run once or
    twice)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source,
        sess_options=session_options(threads, optimize, arena),
        providers=resolve_providers(provider),
    )


@contextmanager
def session_for_model(
    model: ir.Model, provider: str = "cpu", threads: int | None = None, optimize: bool = True
) -> Iterator[Any]:
    """A session over an in-memory onnx-ir model; large models go through a temp directory."""
    import onnx_ir as ir

    if _weights_bytes(model) < _IN_MEMORY_LIMIT and not _has_external(model):
        data = ir.to_proto(model).SerializeToString()
        yield create_session(data, provider, threads, optimize)
        return
    with tempfile.TemporaryDirectory(prefix="quantcli-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield create_session(path, provider, threads, optimize)


def _has_external(model: ir.Model) -> bool:
    """Serialized bytes would point ORT at external files relative to the working dir."""
    import onnx_ir as ir

    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


def _weights_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
