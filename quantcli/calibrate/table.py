"""The calibration table: a versioned JSON document, mergeable across shards.

Each tensor keeps its mergeable statistics (min/max and a zero-anchored histogram), so
tables from shards merge into exactly what one run over all the data gives, and the
chosen ranges are recomputed from the merged statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.calibrate.methods import choose_range
from quantcli.calibrate.observers import TensorStats
from quantcli.errors import InputError

SCHEMA = "quantcli.calibration/1"


def model_fingerprint(path: Path) -> str:
    """sha256 of the model file and its external data files, streamed."""
    from quantcli.graph.mapped import model_structure

    digest = hashlib.sha256()
    proto = model_structure(path)  # not onnx.load: that holds every weight in memory
    files = [path]
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value != path.name:
                locations.add(entry.value)
    files += [path.parent / loc for loc in sorted(locations)]
    for file in files:
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class CalibrationTable:
    fingerprint: str
    model_name: str
    method: str
    percentile: float
    symmetric: bool
    samples: int
    stats: dict[str, TensorStats]
    shard: tuple[int, int] | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    channels: dict[str, ChannelStats] = field(default_factory=dict)  # bias correction, smoothing

    def compute_ranges(self) -> None:
        self.ranges = {
            name: choose_range(s, self.method, symmetric=self.symmetric, percentile=self.percentile)
            for name, s in self.stats.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "method": self.method,
            "params": {"percentile": self.percentile, "symmetric": self.symmetric},
            "samples": self.samples,
            "shard": list(self.shard) if self.shard else None,
            "tensors": {
                name: {
                    "min": s.min,
                    "max": s.max,
                    "range": list(self.ranges[name]),
                    "stats": s.to_dict(),
                }
                for name, s in sorted(self.stats.items())
            },
            "channels": {name: c.to_dict() for name, c in sorted(self.channels.items())},
            **({"gram": self.gram_manifest()} if self.grams() else {}),
        }

    def grams(self) -> dict[str, np.ndarray]:
        """The in-memory x x^T sums, by tensor (they go to a sidecar .npz, not the JSON)."""
        return {n: c.gram for n, c in sorted(self.channels.items()) if c.gram is not None}

    def gram_manifest(self) -> dict[str, Any]:
        grams = self.grams()
        digest = hashlib.sha256()
        for name, g in grams.items():
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(g, np.float64).tobytes())
        return {"tensors": list(grams), "sha256": digest.hexdigest()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "table") -> CalibrationTable:
        if doc.get("schema") != SCHEMA:
            raise InputError(
                f"{source} is not a quantcli calibration table (schema {doc.get('schema')!r})",
                hint=f"expected schema {SCHEMA}; recreate it with quantcli calibrate",
            )
        try:
            table = cls(
                fingerprint=doc["model"]["fingerprint"],
                model_name=doc["model"]["name"],
                method=doc["method"],
                percentile=float(doc["params"]["percentile"]),
                symmetric=bool(doc["params"]["symmetric"]),
                samples=int(doc["samples"]),
                shard=tuple(doc["shard"]) if doc.get("shard") else None,
                stats={k: TensorStats.from_dict(v["stats"]) for k, v in doc["tensors"].items()},
                ranges={k: tuple(v["range"]) for k, v in doc["tensors"].items()},
                channels={k: ChannelStats.from_dict(v) for k, v in doc.get("channels", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{source} is a damaged calibration table ({type(exc).__name__}: {exc})",
                hint="recreate it with quantcli calibrate",
            ) from exc
        return table


def gram_path(table_path: Path) -> Path:
    """Where a table's x x^T sums live: `table.json.gram.npz` beside it."""
    return table_path.with_name(table_path.name + ".gram.npz")


def load_table(path: Path) -> CalibrationTable:
    if not path.is_file():
        raise InputError(f"calibration table {path} does not exist", hint="check the path")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", hint="pass a table.json") from exc
    table = CalibrationTable.from_dict(doc, source=str(path))
    if "gram" in doc:
        _load_grams(table, doc["gram"], gram_path(path))
    return table


def _load_grams(table: CalibrationTable, manifest: dict[str, Any], path: Path) -> None:
    hint = "keep the .gram.npz file beside its table, or recalibrate"
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = [stored[f"g{i}"] for i in range(len(manifest["tensors"]))]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read {path}, which the table needs ({exc})", hint=hint) from exc
    for name, gram in zip(manifest["tensors"], arrays, strict=True):
        if name in table.channels:
            table.channels[name].gram = gram
    if table.gram_manifest()["sha256"] != manifest["sha256"]:
        raise InputError(f"{path} does not belong to this table (checksum differs)", hint=hint)


def save_table(table: CalibrationTable, path: Path) -> None:
    """Atomic writes: temp files beside the targets, then renames (the sidecar first)."""
    grams = table.grams()
    if grams:
        side = gram_path(path)
        fd, tmp_side = tempfile.mkstemp(prefix=f".{side.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with open(tmp_side, "wb") as fh:
                np.savez(fh, **{f"g{i}": g for i, g in enumerate(grams.values())})
            os.replace(tmp_side, side)
        finally:
            if os.path.exists(tmp_side):
                os.unlink(tmp_side)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(table.to_dict(), fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def merge_tables(tables: list[CalibrationTable]) -> CalibrationTable:
    """Combine shard tables: exactly the statistics one run over all their data gives."""
    if not tables:
        raise InputError("nothing to merge", hint="pass two or more calibration tables")
    first = tables[0]
    for other in tables[1:]:
        if other.fingerprint != first.fingerprint:
            raise InputError(
                f"tables come from different models ({first.model_name} vs {other.model_name})",
                hint="merge only tables calibrated on the same model file",
            )
        if set(other.stats) != set(first.stats):
            raise InputError(
                "tables cover different tensors", hint="calibrate all shards with the same options"
            )
        if (other.method, other.percentile, other.symmetric) != (
            first.method,
            first.percentile,
            first.symmetric,
        ):
            raise InputError(
                "tables use different methods or parameters",
                hint="calibrate all shards with the same --method options",
            )
    shards = [t.shard for t in tables]
    _check_shards(shards)
    stats = {name: first.stats[name] for name in first.stats}
    channels = dict(first.channels)
    for other in tables[1:]:
        stats = {name: stats[name].merge(other.stats[name]) for name in stats}
        channels = {
            name: c.merge(other.channels[name])
            for name, c in channels.items()
            if name in other.channels
        }
    merged = CalibrationTable(
        fingerprint=first.fingerprint,
        model_name=first.model_name,
        method=first.method,
        percentile=first.percentile,
        symmetric=first.symmetric,
        samples=sum(t.samples for t in tables),
        stats=stats,
        shard=None,
        channels=channels,
    )
    merged.compute_ranges()
    return merged


def _check_shards(shards: list[tuple[int, int] | None]) -> None:
    if any(s is None for s in shards):
        return  # plain tables from different datasets may be merged too
    counts = {n for _, n in shards}  # type: ignore[misc]
    indices = [i for i, _ in shards]  # type: ignore[misc]
    if len(counts) == 1 and len(set(indices)) != len(indices):
        raise InputError("the same shard appears twice", hint="merge each shard once")
