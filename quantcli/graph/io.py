"""Loading and saving models: clear errors for bad files, atomic writes, external data.

Models are held as onnx-ir graphs whose external tensors stay memory-mapped, so a model
over 2 GB never becomes a single protobuf in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from quantcli.errors import ModelError, OutputError
from quantcli.memory import trim_heap

# Domains whose ops ONNX Runtime implements; anything else must come with its own kernels.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
# Model files are always binary protobuf, whatever their suffix (onnx would read out.json
# as JSON and write model.txt as text).
PROTOBUF = "protobuf"
# Above this many bytes of weights, outputs are written with external data.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
_IN_FLIGHT_BYTES = 64 << 20  # onnx-ir's save reads at most this much ahead


@dataclass
class LoadedModel:
    model: ir.Model
    path: Path
    size_bytes: int  # the .onnx file plus its external data files
    external_data: bool = False  # weights live in files beside the .onnx


def load_model(path: str | os.PathLike, *, check: bool = True) -> LoadedModel:
    """Read an ONNX model, or raise a ModelError that says what is wrong with the file."""
    path = Path(path)
    check_model_path(path)
    try:
        proto = onnx.load(str(path), format=PROTOBUF, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"{path} is not a readable ONNX model (truncated or another format: {_short(exc)})",
            hint="pass an .onnx file exported by a framework",
        ) from exc
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelError(f"{path} is not an ONNX model (no graph found)", hint="pass an .onnx file")
    data_files = _external_files(proto, path.parent)
    if check:
        _check_domains(proto)
        _run_checker(path)
    # Reuse the proto parsed above (ir.load would parse the file a second time); external
    # tensors stay references resolved against the model's folder and are memory-mapped.
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    return LoadedModel(model=model, path=path, size_bytes=size, external_data=bool(data_files))


def check_model_path(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist", hint="check the path")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a model file", hint="pass the .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {path} is empty", hint="re-export or re-download it")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _iter_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def _external_files(proto: onnx.ModelProto, base: Path) -> list[Path]:
    """The external data files a model refers to; each must exist."""
    files: dict[str, Path] = {}
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = base / location
        if not target.is_file():
            raise ModelError(
                f"external data file '{location}' of tensor '{tensor.name}' is missing "
                f"(looked in {base})",
                hint="keep the model's data files next to the .onnx file",
            )
        files[location] = target
    return list(files.values())


def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from _iter_nodes(sub)


def _check_domains(proto: onnx.ModelProto) -> None:
    local = {f.domain for f in proto.functions}
    for node in _iter_nodes(proto.graph):  # If/Loop bodies too
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise ModelError(
                f"node '{node.name}' uses op '{node.op_type}' from the custom domain "
                f"'{node.domain}', which ONNX Runtime does not know",
                hint="export the model with standard ONNX ops",
            )


def _run_checker(path: Path) -> None:
    try:
        # A path (not a proto) lets the checker handle external data and models over 2 GB.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelError(
            f"{path} fails the ONNX checker: {_short(exc)}",
            hint="re-export the model or fix it with onnx tools",
        ) from exc


def weights_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def check_output_path(output: Path, *, inputs: list[Path], force: bool) -> None:
    """Refuse to write onto an input or an existing file (unless forced), before any work."""
    if output.exists() and output.is_dir():
        raise OutputError(f"output {output} is a directory", hint="name a file with -o")
    for source in inputs:
        if source.exists() and output.exists() and output.samefile(source):
            raise OutputError(
                f"output {output} is the input {source}; quantcli never overwrites its inputs",
                hint="choose another path with -o",
            )
    if output.exists() and not force:
        raise OutputError(f"output {output} already exists", hint="pass --force to replace it")
    if not output.parent.is_dir():
        raise OutputError(f"output folder {output.parent} does not exist", hint="create it first")


Validator = Callable[[Path], None]


def save_model(
    model: ir.Model,
    output: str | os.PathLike,
    *,
    inputs: list[Path] | None = None,
    force: bool = False,
    validate: Validator | None = None,
    external_data: bool = False,
    release: bool = False,
) -> Path:
    """Write atomically: a temp folder beside the target, validate there, then rename.

    Weights go to `<output>.data` when asked (the input had external data: tensors then
    stream to the file instead of through one big protobuf) or when they are too large for
    one protobuf. `release`: the caller is done with `model`; its weights are dropped once
    written, so that validation does not run beside them (the model is unusable after).
    """
    output = Path(output)
    check_output_path(output, inputs=inputs or [], force=force)
    external = external_data or weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = output.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        # Staged with external data even for a single-file output: weights stream to disk
        # instead of through one protobuf and its bytes, and ONNX Runtime validates it
        # without another copy; a single file is then joined from it (`single_file.py`).
        staged = tmp / output.name
        ir.save(
            model,
            staged,
            format=PROTOBUF,
            external_data=data_name,
            max_in_flight_bytes=_IN_FLIGHT_BYTES,
        )
        if release:
            _drop_weights(model)
        if validate is not None:
            validate(staged)
        if external:
            os.replace(tmp / data_name, output.parent / data_name)
            os.replace(staged, output)
        else:
            _join(staged, data_name, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _join(staged: Path, data_name: str, output: Path) -> None:
    """Write the single-file form of a validated staged pair, then rename it into place."""
    from quantcli.graph.single_file import join_external

    joined = staged.with_name(staged.name + ".joined")
    if not join_external(staged, data_name, joined):  # weights outside the main graph
        proto = onnx.load(str(staged))  # every tensor read in (rare: subgraph weights)
        onnx.save(proto, str(joined))
    os.replace(joined, output)


def _drop_weights(model: ir.Model) -> None:
    """Let go of a saved model's weights (they are in the staged file now)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            value.const_value = None
    trim_heap()
