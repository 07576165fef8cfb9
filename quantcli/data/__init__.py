"""Data sources for `--data SPEC`: .npz files, directories of .npz/.npy/images, random."""

from __future__ import annotations

from quantcli.data.base import Batch, DataSource
from quantcli.data.images import ImageOptions
from quantcli.data.sources import open_data, parse_shard

__all__ = ["Batch", "DataSource", "ImageOptions", "open_data", "parse_shard"]
