""".npy files and .npz members read a batch of rows at a time: memory flat in the data."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from quantcli.data import arrays, open_data
from quantcli.data.rows import RowReader, npy_header, npz_headers
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

X = TensorSpec("x", np.dtype(np.float32), ("N", 4, 5))


def _all(source, batch: int) -> np.ndarray:
    return np.concatenate([b.feeds["x"] for b in source.batches(batch)])


def test_npz_members_and_npy_files_read_the_right_rows(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((23, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(23))
    source = open_data(str(tmp_path / "d.npz"), [X], shard=(1, 3))
    assert np.array_equal(_all(source, 4), x[1::3])
    assert list(source.labels) == list(range(1, 23, 3))
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", x[:10])
    np.save(folder / "b.npy", np.asfortranarray(x[10:]))  # column-major on disk
    np.save(folder / "c.npy", x[0])  # one sample without the batch axis
    got = _all(open_data(str(folder), [X]), 5)
    assert np.array_equal(got, np.concatenate([x, x[:1]]))


def test_row_reader_reads_only_the_rows_asked(tmp_path: Path) -> None:
    x = np.arange(6 * 1000, dtype=np.float64).reshape(6, 1000)
    np.savez(tmp_path / "d.npz", x=x)
    header = npz_headers(tmp_path / "d.npz")["x"]
    reader = RowReader(tmp_path / "d.npz", header)
    assert reader.shape == (6, 1000) and len(reader) == 6
    assert np.array_equal(reader[np.array([4, 1, 2])], x[[4, 1, 2]])
    assert np.array_equal(reader[1:5:2], x[1:5:2])
    assert np.array_equal(reader[-1], x[-1])
    with pytest.raises(IndexError):
        reader[np.array([6])]
    np.save(tmp_path / "d.npy", x)
    assert npy_header(tmp_path / "d.npy").offset == 128  # data right after the header


def test_batches_of_a_large_npz_take_memory_of_a_batch_not_of_the_file(tmp_path: Path) -> None:
    x = np.ones((2000, 4, 5 * 50), np.float32)  # 8 MB; a batch of 10 is 40 kB
    spec = TensorSpec("x", np.dtype(np.float32), ("N", 4, 250))
    np.savez(tmp_path / "big.npz", x=x)
    source = open_data(str(tmp_path / "big.npz"), [spec])
    tracemalloc.start()
    try:
        seen = sum(len(b.indices) for b in source.batches(10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == 2000
    assert peak < 1_000_000, peak  # loading the array would take 8 MB


def test_compressed_npz_small_loads_large_is_refused_with_the_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.random.default_rng(1).standard_normal((12, 4, 5)).astype(np.float32)
    path = tmp_path / "z.npz"
    np.savez_compressed(path, x=x)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("x.npy").compress_type == zipfile.ZIP_DEFLATED
    assert np.array_equal(_all(open_data(str(path), [X]), 5), x)
    monkeypatch.setattr(arrays, "COMPRESSED_LIMIT", 100)
    with pytest.raises(DataError) as info:
        open_data(str(path), [X])
    assert "stores 'x' (0 MB) compressed (np.savez_compressed)" in info.value.message
    assert "np.savez(" in (info.value.hint or "") and "z_flat.npz" in (info.value.hint or "")


def test_a_truncated_npz_member_is_a_data_error(tmp_path: Path) -> None:
    x = np.zeros((50, 4, 5), np.float32)
    np.save(tmp_path / "t.npy", x)
    path = tmp_path / "t.npy"
    path.write_bytes(path.read_bytes()[:-100])
    source = open_data(str(tmp_path), [X])
    with pytest.raises(DataError, match="shorter than its header says"):
        _all(source, 50)
