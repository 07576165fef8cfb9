"""`--data SPEC` to a DataSource: sample selection (shard, limit) and validated batches."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from quantcli.data.arrays import npy_chunks, npz_chunks
from quantcli.data.base import Arrays, Batch, Chunk, DataSource
from quantcli.data.images import IMAGE_SUFFIXES, ImageOptions, image_chunks
from quantcli.data.synthetic import parse_random, random_chunks
from quantcli.data.validate import batch_size_for, check_inputs, conform
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

ACCEPTED = "use a .npz file, a directory of .npz, .npy or image files, or random[:N]"


class ChunkedSource:
    """Samples stored in chunks loaded one at a time; implements DataSource.

    Shard `(i, n)` keeps the samples whose global index % n == i (0 <= i < n; the command
    line's `--shard I/N` counts from 1: I = i + 1), a deterministic interleaved subset;
    `limit` then keeps the first `limit` of those, and `window` (start, stop) the selected
    samples at those positions (the part a cluster task processes).
    """

    def __init__(
        self,
        name: str,
        chunks: list[Chunk],
        inputs: list[TensorSpec],
        *,
        labels: np.ndarray | None = None,
        synthetic: bool = False,
        shard: tuple[int, int] | None = None,
        limit: int | None = None,
        window: tuple[int, int] | None = None,
    ) -> None:
        self._chunks, self._inputs, self._all_labels = chunks, inputs, labels
        self._starts = np.cumsum([0, *(c.count for c in chunks)])
        total = int(self._starts[-1])
        if total == 0:
            raise DataError(f"{name} holds no samples", hint="point --data at a non-empty dataset")
        i, n = shard or (0, 1)
        self._selection = range(i, total, n)[:limit]
        if not self._selection:
            raise DataError(f"shard {i + 1}/{n} of {name} selects none of its {total} samples")
        extra = f", shard {i + 1}/{n}" if shard else ""
        extra += f", using {len(self._selection)}" if len(self._selection) != total else ""
        if window is not None:
            start, stop = window
            if not 0 <= start < stop <= len(self._selection):
                raise DataError(
                    f"samples {start + 1}-{stop} are outside the {len(self._selection)} "
                    f"selected from {name}",
                    hint="the data changed since the job was split: rerun it",
                )
            self._selection = self._selection[start:stop]
            extra += f", samples {start + 1}-{stop}"
        self.num_samples = len(self._selection)
        self.synthetic = synthetic
        self.labels = self._labels_of(self._selection)
        self.description = f"{name} ({total} samples{extra})"

    def _labels_of(self, indices: range) -> np.ndarray | None:
        return None if self._all_labels is None else self._all_labels[np.asarray(indices)]

    def batches(self, batch_size: int) -> Iterator[Batch]:
        size = batch_size_for(self._inputs, batch_size, self.num_samples)
        cache: dict[int, Arrays] = {}  # holds the one chunk in use
        for k in range(0, self.num_samples, size):
            indices = self._selection[k : k + size]
            feeds = self._gather(indices, cache)
            yield Batch(indices, feeds, self._labels_of(indices))

    def _gather(self, indices: range, cache: dict[int, Arrays]) -> Arrays:
        positions = np.asarray(indices)
        owners = np.searchsorted(self._starts, positions, side="right") - 1
        parts = []
        for c in dict.fromkeys(owners.tolist()):  # chunk ids in order
            chunk = self._chunks[c]
            if c not in cache:
                cache.clear()
                cache[c] = chunk.load()
            mine = positions[owners == c]
            arrays = {k: a[mine - self._starts[c]] for k, a in cache[c].items()}
            parts.append((chunk.where, conform(arrays, self._inputs, mine.tolist(), chunk.where)))
        return _concat(parts)


def _concat(parts: list[tuple[str, Arrays]]) -> Arrays:
    if len(parts) == 1:
        return parts[0][1]
    out = {}
    for name, first in parts[0][1].items():
        for where, arrays in parts[1:]:
            if arrays[name].shape[1:] != first.shape[1:]:
                raise DataError(
                    f"input '{name}': samples in {parts[0][0]} have shape {list(first.shape[1:])} "
                    f"but those in {where} have {list(arrays[name].shape[1:])}",
                    hint="a batch needs equal sample shapes: use batch size 1 or pad the data",
                )
        out[name] = np.concatenate([arrays[name] for _, arrays in parts])
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N', "shard I of N" counted from 1 as in Jest, Playwright and Vitest, to the
    0-based (I - 1, N) that open_data takes."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise DataError(f"invalid shard '{text}'", hint="write it as I/N, e.g. 1/4")
    i, n = int(match[1]), int(match[2])
    if i == 0 and n >= 1:
        raise DataError(
            f"invalid shard 0/{n}: shards count from 1",
            hint=f"the first of {n} shards is 1/{n}, the last {n}/{n}",
        )
    if n < 1 or not 1 <= i <= n:
        raise DataError(f"invalid shard {i}/{n}", hint="write it as I/N with 1 <= I <= N")
    return i - 1, n


def _check_shard(i: int, n: int) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise DataError(f"invalid shard index {i} of {n}", hint="use 0 <= index < count")
    return i, n


Found = tuple[str, list[Chunk], np.ndarray | None]  # name, chunks, labels


def _directory(path: Path, inputs: list[TensorSpec], images: ImageOptions | None) -> Found:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    kinds = {
        ".npz": [p for p in files if p.suffix.lower() == ".npz"],
        ".npy": [p for p in files if p.suffix.lower() == ".npy"],
        "image": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    found = [k for k, v in kinds.items() if v]
    if not found:
        raise DataError(f"{path} holds no .npz, .npy or image files", hint=ACCEPTED)
    if len(found) > 1:
        raise DataError(
            f"{path} mixes {' and '.join(found)} files", hint="keep one kind per directory"
        )
    kind, paths = found[0], kinds[found[0]]
    if kind == ".npz":
        return (f"{path.name}/*.npz", *npz_chunks(paths, inputs))
    if kind == ".npy":
        return f"{path.name}/*.npy", npy_chunks(paths, inputs), None
    return f"{path.name}/ images", image_chunks(paths, inputs, images or ImageOptions()), None


def _find(spec: str, inputs: list[TensorSpec], images: ImageOptions | None) -> Found:
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path '{spec}' does not exist", hint=ACCEPTED)
    if path.is_dir():
        return _directory(path, inputs, images)
    if path.suffix.lower() == ".npz":
        return (path.name, *npz_chunks([path], inputs))
    raise DataError(f"unsupported data '{spec}'", hint=ACCEPTED)


def open_data(
    spec: str,
    inputs: list[TensorSpec],
    *,
    images: ImageOptions | None = None,
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    window: tuple[int, int] | None = None,
) -> DataSource:
    """Opens `--data SPEC` for a model with these inputs; see ChunkedSource for shard
    (0-based), limit and window.

    `seed` only affects random data. `images` applies to a directory of images.
    """
    check_inputs(inputs)
    if shard is not None:
        _check_shard(*shard)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    select = {"shard": shard, "limit": limit, "window": window}
    if spec == "random" or spec.startswith("random:"):
        chunks = random_chunks(inputs, parse_random(spec), seed)
        return ChunkedSource("random", chunks, inputs, synthetic=True, **select)
    name, chunks, labels = _find(spec, inputs, images)
    return ChunkedSource(name, chunks, inputs, labels=labels, **select)
