"""`.npz` and `.npy` files as chunks. Sizes come from array headers only, so opening a
large dataset reads a few bytes per file and the data is loaded file by file later."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from quantcli.data.base import Arrays, Chunk
from quantcli.data.validate import check_counts, check_keys, single_input
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

LABELS = "labels"
Header = tuple[tuple[int, ...], np.dtype]
T = TypeVar("T")


def _read(path: Path, fn: Callable[[], T]) -> T:
    """Runs a read and turns a corrupt or unreadable file into a DataError naming it."""
    try:
        return fn()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"cannot read {path}: {e}", hint="re-create the file with numpy.save or savez"
        ) from e


def _header(f) -> Header:
    version = np.lib.format.read_magic(f)
    fmt = np.lib.format
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _fortran, dtype = read(f)
    return tuple(shape), dtype


def _npz_headers(path: Path) -> dict[str, Header]:
    def read() -> dict[str, Header]:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for member in zf.namelist():
                if member.endswith(".npy"):  # np.savez stores key K as K.npy
                    with zf.open(member) as f:
                        out[member[:-4]] = _header(f)
            return out

    return _read(path, read)


def _npy_header(path: Path) -> Header:
    def read() -> Header:
        with open(path, "rb") as f:
            return _header(f)

    return _read(path, read)


def _is_batched(shape: tuple[int, ...], spec: TensorSpec, where: str) -> bool:
    """True for a batch (model rank), False for one sample without the batch axis."""
    rank = None if spec.shape is None else len(spec.shape)
    if rank is not None and len(shape) == rank - 1:
        return False
    if len(shape) == rank or (rank is None and shape):
        return True
    raise DataError(
        f"{where}: input '{spec.name}' has shape {list(shape)} but the model expects "
        f"{spec.shape_text()} (or one sample without the batch axis)",
        hint="reshape the data to the model's input shape",
    )


def _load_npz(path: Path, batched: dict[str, bool]) -> Arrays:
    def read() -> Arrays:
        with np.load(path) as z:
            return {k: z[k] if b else z[k][None] for k, b in batched.items()}

    return _read(path, read)


def _load_npy(path: Path, name: str, batched: bool) -> Arrays:
    arr = _read(path, lambda: np.load(path))
    return {name: arr if batched else arr[None]}


def _labels(path: Path, header: Header, count: int) -> np.ndarray:
    shape, dtype = header
    if dtype.kind not in "iu" or shape not in ((), (count,)):
        raise DataError(
            f"{path.name}: 'labels' must hold {count} integer class ids, "
            f"found {dtype} with shape {list(shape)}",
            hint="store labels as a 1-D int array, one per sample",
        )

    def read() -> np.ndarray:
        with np.load(path) as z:
            return z[LABELS]

    return _read(path, read).reshape(count).astype(np.int64)


def npz_chunk(path: Path, inputs: list[TensorSpec]) -> tuple[Chunk, np.ndarray | None]:
    """One .npz file: a chunk plus its labels, when it has a 'labels' key."""
    headers = _npz_headers(path)
    label_header = headers.pop(LABELS, None)
    check_keys(headers, inputs, path.name)
    batched = {s.name: _is_batched(headers[s.name][0], s, path.name) for s in inputs}
    counts = {k: headers[k][0][0] if b else 1 for k, b in batched.items()}
    count = check_counts(counts, path.name)
    labels = None if label_header is None else _labels(path, label_header, count)
    return Chunk(count, partial(_load_npz, path, batched), path.name), labels


def npz_chunks(
    paths: list[Path], inputs: list[TensorSpec]
) -> tuple[list[Chunk], np.ndarray | None]:
    """Several .npz files in order; labels must be in all of them or in none."""
    pairs = [npz_chunk(p, inputs) for p in paths]
    without = [c.where for c, lab in pairs if lab is None]
    if without and len(without) != len(pairs):
        other = next(c.where for c, lab in pairs if lab is not None)
        raise DataError(
            f"{without[0]} has no 'labels' key but {other} has one",
            hint="store labels in every file or in none",
        )
    chunks = [c for c, _ in pairs]
    labels = None if without else np.concatenate([lab for _, lab in pairs])
    return chunks, labels


def npy_chunks(paths: list[Path], inputs: list[TensorSpec]) -> list[Chunk]:
    spec = single_input(inputs, "a directory of .npy files")
    chunks = []
    for path in paths:
        shape, _ = _npy_header(path)
        batched = _is_batched(shape, spec, path.name)
        count = shape[0] if batched else 1
        chunks.append(Chunk(count, partial(_load_npy, path, spec.name, batched), path.name))
    return chunks
