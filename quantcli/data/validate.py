"""Checks that data fits the model's inputs, so bad data fails here and never inside ORT."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from quantcli.data.base import Arrays
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

# dtype kinds that may be cast into each other; anything across groups is refused
_KIND_GROUPS = {"f": "float", "i": "int", "u": "int", "b": "bool"}


def check_inputs(inputs: list[TensorSpec]) -> None:
    """The model must have inputs, each with a batch axis (axis 0 indexes samples)."""
    if not inputs:
        raise DataError("the model has no inputs to feed", hint="check the model file")
    for spec in inputs:
        if spec.shape == ():
            raise DataError(
                f"input '{spec.name}' is a scalar, but data is fed in batches along axis 0",
                hint="export the model with a batch axis on every input",
            )


def single_input(inputs: list[TensorSpec], what: str) -> TensorSpec:
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(
            f"{what} only fits single-input models; this model has inputs {names}",
            hint="use .npz files with one key per input name",
        )
    return inputs[0]


def check_keys(found: Iterable[str], inputs: list[TensorSpec], where: str) -> None:
    names = [s.name for s in inputs]
    keys = sorted(found)
    expected = ", ".join(names)
    for name in names:
        if name not in keys:
            listed = ", ".join(keys) or "none"
            raise DataError(
                f"{where}: model input '{name}' is missing (found keys: {listed})",
                hint=f"store one array per model input: {expected}",
            )
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise DataError(
            f"{where}: unknown keys {', '.join(unknown)} (model inputs: {expected})",
            hint="remove or rename them; only model input names and 'labels' are allowed",
        )


def check_counts(counts: dict[str, int], where: str) -> int:
    """All inputs must hold the same number of samples on axis 0; returns it."""
    if len(set(counts.values())) > 1:
        text = ", ".join(f"{k} has {v}" for k, v in counts.items())
        raise DataError(
            f"{where}: inputs disagree on the number of samples ({text})",
            hint="give every input the same length on axis 0",
        )
    return next(iter(counts.values()), 0)


def conform(arrays: Arrays, inputs: list[TensorSpec], indices: Sequence[int], where: str) -> Arrays:
    """Checks one loaded chunk of samples and casts it to the model's dtypes."""
    check_keys(arrays, inputs, where)
    check_counts({k: (a.shape[0] if a.ndim else 0) for k, a in arrays.items()}, where)
    out = {}
    for spec in inputs:
        arr = _cast(arrays[spec.name], spec, where)
        if not spec.accepts_shape(arr.shape):
            raise DataError(
                f"{where}: input '{spec.name}' expects shape {spec.shape_text()} "
                f"but the data has shape {list(arr.shape)}",
                hint="reshape the data to the model's input shape",
            )
        _check_finite(arr, spec, indices)
        out[spec.name] = arr
    return out


def _cast(arr: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    want, have = spec.dtype, arr.dtype
    if have == want:
        return np.ascontiguousarray(arr)
    group = _KIND_GROUPS.get(have.kind)
    if group is None or group != _KIND_GROUPS.get(want.kind):
        raise DataError(
            f"{where}: input '{spec.name}' expects {want} but the data is {have}",
            hint=f"save the array as {want}",
        )
    if group == "int" and arr.size and not np.can_cast(have, want):
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise DataError(
                f"{where}: input '{spec.name}' holds values outside the range of {want}",
                hint=f"save the array as {want} with values in [{info.min}, {info.max}]",
            )
    return np.ascontiguousarray(arr, dtype=want)


def _check_finite(arr: np.ndarray, spec: TensorSpec, indices: Sequence[int]) -> None:
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        pos = int(np.argmax(bad))
        what = "NaN" if np.isnan(arr[pos]).any() else "Inf"
        raise DataError(
            f"input '{spec.name}' of sample {indices[pos]} holds {what}",
            hint="fix or drop that sample",
        )


def batch_size_for(inputs: list[TensorSpec], requested: int, num_samples: int) -> int:
    """The batch size to use: the requested one, unless the model fixes its batch dim."""
    if requested < 1:
        raise DataError(f"batch size must be at least 1, got {requested}")
    fixed = {s.name: s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], int)}
    if not fixed:
        return requested
    name, size = next(iter(fixed.items()))
    if num_samples % size:
        raise DataError(
            f"input '{name}' takes batches of exactly {size}, "
            f"but the data has {num_samples} samples (not a multiple of {size})",
            hint=f"limit the data to a multiple of {size} samples",
        )
    return size
