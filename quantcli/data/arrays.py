"""`.npz` and `.npy` files as chunks. Sizes come from array headers only, so opening a
large dataset reads a few bytes per file; a batch then reads only its own rows (rows.py),
so memory does not grow with the size of a file."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from quantcli.data.base import Arrays, Chunk
from quantcli.data.rows import COMPRESSED_LIMIT, NpyHeader, RowReader, npy_header, npz_headers
from quantcli.data.validate import check_counts, check_keys, single_input
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

LABELS = "labels"
T = TypeVar("T")


def _read(path: Path, fn: Callable[[], T]) -> T:
    """Runs a read and turns a corrupt or unreadable file into a DataError naming it."""
    try:
        return fn()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"cannot read {path}: {e}", hint="re-create the file with numpy.save or savez"
        ) from e


def _npz_headers(path: Path) -> dict[str, NpyHeader]:
    return _read(path, lambda: npz_headers(path))


def _npy_header(path: Path) -> NpyHeader:
    return _read(path, lambda: npy_header(path))


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


def _check_compressed(path: Path, key: str, header: NpyHeader) -> None:
    """A compressed member is decompressed whole: refuse one that would not fit easily."""
    size = int(np.prod(header.shape, dtype=np.int64)) * header.dtype.itemsize
    if header.offset < 0 and size > COMPRESSED_LIMIT:
        flat = path.with_name(path.stem + "_flat.npz")
        raise DataError(
            f"{path.name} stores '{key}' ({size / 2**20:.0f} MB) compressed "
            "(np.savez_compressed), which cannot be read a batch at a time",
            hint='store it uncompressed once, then pass the new file: python -c "import '
            f"numpy as np; np.savez('{flat}', **np.load('{path}'))\"",
        )


def _load_npz(path: Path, headers: dict[str, NpyHeader], batched: dict[str, bool]) -> Arrays:
    def read() -> Arrays:
        out: dict[str, Any] = {}
        compressed = [k for k in batched if headers[k].offset < 0]
        if compressed:  # small (checked on opening): loaded whole
            with np.load(path) as z:
                out.update({k: z[k] if batched[k] else z[k][None] for k in compressed})
        for key, b in batched.items():
            if key not in out:
                out[key] = RowReader(path, headers[key], batched=b)
        return out

    return _read(path, read)


def _load_npy(path: Path, header: NpyHeader, name: str, batched: bool) -> Arrays:
    return {name: RowReader(path, header, batched=batched)}  # type: ignore[dict-item]


def _labels(path: Path, header: NpyHeader, count: int) -> np.ndarray:
    shape, dtype = header.shape, header.dtype
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
    batched = {s.name: _is_batched(headers[s.name].shape, s, path.name) for s in inputs}
    for key in batched:
        _check_compressed(path, key, headers[key])
    counts = {k: headers[k].shape[0] if b else 1 for k, b in batched.items()}
    count = check_counts(counts, path.name)
    labels = None if label_header is None else _labels(path, label_header, count)
    return Chunk(count, partial(_load_npz, path, headers, batched), path.name), labels


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
        header = _npy_header(path)
        batched = _is_batched(header.shape, spec, path.name)
        count = header.shape[0] if batched else 1
        load = partial(_load_npy, path, header, spec.name, batched)
        chunks.append(Chunk(count, load, path.name))
    return chunks
