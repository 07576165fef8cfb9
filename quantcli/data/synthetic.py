"""Random inputs shaped from the model signature (`--data random[:N]`).

Each sample has its own generator seeded by (seed, index), so a sample's values do not
depend on the batch size, sharding or limit.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from quantcli.data.base import Arrays, Chunk
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

DEFAULT_COUNT = 8
INT_HIGH = 2  # ints in {0, 1}: valid ids, masks and type ids for nearly any model


def parse_random(spec: str) -> int:
    """Sample count of 'random' or 'random:N'."""
    if spec == "random":
        return DEFAULT_COUNT
    text = spec.removeprefix("random:")
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"invalid data '{spec}'", hint="use random or random:N with N >= 1")
    return int(text)


def _sample_shape(spec: TensorSpec) -> tuple[int, ...]:
    if spec.shape is None:
        raise DataError(
            f"input '{spec.name}' has unknown rank, so random data cannot be shaped",
            hint="use real data (.npz, .npy or images)",
        )
    if spec.dtype.kind not in "fiub":
        raise DataError(
            f"input '{spec.name}' has dtype {spec.dtype}, which random data does not support",
            hint="use real data (.npz, .npy or images)",
        )
    # symbolic and unknown dims become 1; the batch axis holds this one sample
    return (1, *(d if isinstance(d, int) else 1 for d in spec.shape[1:]))


def _sample(inputs: list[TensorSpec], seed: int, index: int) -> Arrays:
    rng = np.random.default_rng([seed, index])
    out = {}
    for spec in inputs:
        shape = _sample_shape(spec)
        if spec.dtype.kind == "f":
            arr = rng.standard_normal(shape)
        elif spec.dtype.kind == "b":
            arr = rng.random(shape) < 0.5
        else:
            arr = rng.integers(0, INT_HIGH, size=shape)
        out[spec.name] = arr.astype(spec.dtype)
    return out


def random_chunks(inputs: list[TensorSpec], count: int, seed: int) -> list[Chunk]:
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    for spec in inputs:
        _sample_shape(spec)  # fail now on inputs that cannot be synthesized
    return [Chunk(1, partial(_sample, inputs, seed, i), f"random sample {i}") for i in range(count)]
