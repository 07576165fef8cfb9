"""Data sources for `--data SPEC`: .npz files, directories of .npz/.npy/images, random."""

from __future__ import annotations

from quantcli.data.base import Batch, DataSource
from quantcli.data.images import ImageOptions
from quantcli.data.labels import WithLabels, read_labels_file
from quantcli.data.sources import open_data, parse_shard

__all__ = [
    "Batch",
    "DataSource",
    "ImageOptions",
    "WithLabels",
    "open_data",
    "parse_shard",
    "read_labels_file",
]
