"""Labels given apart from the data (`--labels F.npy`), attached to a data source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import DataError


def read_labels_file(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels from {path}: {exc}", hint="pass an .npy") from exc


class WithLabels:
    """A data source whose labels come from a separate file."""

    def __init__(self, source: Any, labels: Any) -> None:
        self._source, self.labels = source, labels
        self.description, self.num_samples = source.description, source.num_samples
        self.synthetic = source.synthetic

    def batches(self, batch_size: int) -> Any:
        return self._source.batches(batch_size)
