"""quantcli.data: every kind of --data, validation errors, sharding, batching, images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from quantcli.data import ImageOptions, open_data, parse_shard
from quantcli.data.rows import RowReader
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

F32, I64 = np.dtype(np.float32), np.dtype(np.int64)
X = TensorSpec("x", F32, ("N", 3))
IDS = TensorSpec("ids", I64, ("N", 2))


def feeds_of(source, batch_size: int = 100) -> list[dict[str, np.ndarray]]:
    return [b.feeds for b in source.batches(batch_size)]


def npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def data_error(spec: str, inputs: list[TensorSpec], *texts: str, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        source = open_data(spec, inputs, **kw)
        feeds_of(source)
    for text in texts:
        assert text in info.value.message
    return info.value


def test_npz_file_batches_and_casts(tmp_path: Path) -> None:
    x = np.arange(21, dtype=np.float64).reshape(7, 3)
    source = open_data(npz(tmp_path / "d.npz", x=x), [X])
    assert (source.num_samples, source.synthetic, source.labels) == (7, False, None)
    assert source.description == "d.npz (7 samples)"
    batches = list(source.batches(3))
    assert [b.indices for b in batches] == [range(0, 3), range(3, 6), range(6, 7)]
    got = np.concatenate([b.feeds["x"] for b in batches])
    assert got.dtype == F32 and np.array_equal(got, x)


def test_labels_exposed_not_fed(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1])
    source = open_data(npz(tmp_path / "d.npz", x=np.zeros((4, 3)), labels=labels), [X])
    assert np.array_equal(source.labels, labels)
    batches = list(source.batches(3))
    assert set(batches[0].feeds) == {"x"}
    assert np.array_equal(batches[1].labels, [1])


@pytest.mark.parametrize(
    ("arrays", "texts"),
    [
        (
            {"x": np.zeros((2, 3)), "ids": np.zeros((2, 2), int), "y": np.zeros(2)},
            ["unknown keys y", "model inputs: x, ids"],
        ),
        ({"x": np.zeros((2, 3))}, ["'ids' is missing", "found keys: x"]),
        ({"x": np.zeros((2, 3)), "ids": np.zeros((2, 2))}, ["'ids' expects int64", "float64"]),
        ({"x": np.zeros((2, 3), int), "ids": np.zeros((2, 2), int)}, ["'x' expects float32"]),
        ({"x": np.zeros((2, 4)), "ids": np.zeros((2, 2), int)}, ["'x' expects shape [N, 3]"]),
        ({"x": np.zeros((3, 3)), "ids": np.zeros((2, 2), int)}, ["x has 3, ids has 2"]),
        ({"x": np.zeros((0, 3)), "ids": np.zeros((0, 2), int)}, ["holds no samples"]),
        ({"x": np.zeros((2, 3, 1)), "ids": np.zeros((2, 2), int)}, ["[2, 3, 1]", "[N, 3]"]),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, texts: list[str]) -> None:
    data_error(npz(tmp_path / "d.npz", **arrays), [X, IDS], *texts)


def test_found_shape_in_message(tmp_path: Path) -> None:
    err = data_error(npz(tmp_path / "d.npz", x=np.zeros((2, 4))), [X], "input 'x'", "[2, 4]")
    assert err.hint


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_names_sample(tmp_path: Path, bad: float) -> None:
    x = np.zeros((6, 3))
    x[4, 1] = bad
    what = "NaN" if np.isnan(bad) else "Inf"
    data_error(npz(tmp_path / "d.npz", x=x), [X], f"input 'x' of sample 4 holds {what}")


def test_npz_directory_samples_and_batches(tmp_path: Path) -> None:
    # sorted names: a (batch of 2, labelled), b (one sample without batch axis)
    npz(tmp_path / "b.npz", x=np.full(3, 2.0), labels=np.array(7))
    npz(tmp_path / "a.npz", x=np.array([[0.0] * 3, [1.0] * 3]), labels=np.array([5, 6]))
    source = open_data(str(tmp_path), [X])
    assert source.num_samples == 3 and list(source.labels) == [5, 6, 7]
    got = np.concatenate([b.feeds["x"] for b in source.batches(2)])
    assert np.array_equal(got[:, 0], [0, 1, 2])


def test_npz_directory_errors(tmp_path: Path) -> None:
    npz(tmp_path / "a.npz", x=np.zeros((1, 3)), labels=np.array([1]))
    npz(tmp_path / "b.npz", x=np.zeros((1, 3)))
    data_error(str(tmp_path), [X], "b.npz has no 'labels' key")
    npz(tmp_path / "b.npz", x=np.zeros((1, 3)), z=np.zeros(1), labels=np.array([1]))
    data_error(str(tmp_path), [X], "b.npz: unknown keys z")
    np.save(tmp_path / "c.npy", np.zeros(3))
    data_error(str(tmp_path), [X], "mixes .npz and .npy")


def test_directory_loads_file_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in "abc":
        npz(tmp_path / f"{name}.npz", x=np.zeros((2, 3)))
    loaded: list[str] = []
    real_read = RowReader.__getitem__

    def spy(self: RowReader, index: object) -> np.ndarray:
        loaded.append(self.path.name)
        return real_read(self, index)

    monkeypatch.setattr(RowReader, "__getitem__", spy)
    source = open_data(str(tmp_path), [X])
    assert source.num_samples == 6 and loaded == []  # counted from headers only
    assert [len(b.indices) for b in source.batches(3)] == [3, 3]
    assert loaded == ["a.npz", "b.npz", "b.npz", "c.npz"]


def test_batch_across_files_needs_equal_shapes(tmp_path: Path) -> None:
    npz(tmp_path / "a.npz", x=np.zeros((1, 2)))
    npz(tmp_path / "b.npz", x=np.zeros((1, 3)))
    seq = TensorSpec("x", F32, ("N", "S"))
    assert [f["x"].shape for f in feeds_of(open_data(str(tmp_path), [seq]), 1)] == [(1, 2), (1, 3)]
    data_error(str(tmp_path), [seq], "samples in a.npz have shape [2]", "b.npz have [3]")


def test_npy_directory(tmp_path: Path) -> None:
    np.save(tmp_path / "0.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "1.npy", np.zeros(3, np.float32))
    source = open_data(str(tmp_path), [X])
    assert source.num_samples == 3
    assert [f["x"].shape for f in feeds_of(source, 2)] == [(2, 3), (1, 3)]
    data_error(str(tmp_path), [X, IDS], "only fits single-input models", "x, ids")


def test_empty_missing_and_unsupported(tmp_path: Path) -> None:
    data_error(str(tmp_path), [X], "holds no .npz, .npy or image files")
    data_error(str(tmp_path / "nope.npz"), [X], "does not exist")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    data_error(str(tmp_path / "bad.npz"), [X], "cannot read", "bad.npz")
    small = TensorSpec("x", np.dtype(np.int8), ("N",))
    data_error(npz(tmp_path / "d.npz", x=np.array([1, 300])), [small], "outside the range of int8")
    (tmp_path / "d.csv").write_text("1,2,3")
    err = data_error(str(tmp_path / "d.csv"), [X], "unsupported data")
    assert "random[:N]" in (err.hint or "")


def test_shards_partition_samples(tmp_path: Path) -> None:
    path = npz(tmp_path / "d.npz", x=np.arange(30.0).reshape(10, 3))
    seen: list[int] = []
    for i in range(3):  # 0-based here; the command line's --shard counts from 1
        source = open_data(path, [X], shard=(i, 3))
        for b in source.batches(2):
            assert all(k % 3 == i for k in b.indices)
            assert np.array_equal(b.feeds["x"][:, 0], np.array(b.indices) * 3.0)
            seen += b.indices
    assert sorted(seen) == list(range(10))
    source = open_data(path, [X], shard=(1, 3), limit=2)
    assert [list(b.indices) for b in source.batches(8)] == [[1, 4]]
    assert source.description == "d.npz (10 samples, shard 2/3, using 2)"
    data_error(path, [X], "shard 16/20 of d.npz selects none", shard=(15, 20))
    data_error(path, [X], "invalid shard index 3 of 3", shard=(3, 3))
    data_error(path, [X], "limit must be at least 1", limit=0)


def test_windows_split_the_selection_into_parts(tmp_path: Path) -> None:
    path = npz(tmp_path / "d.npz", x=np.arange(30.0).reshape(10, 3))
    parts = [open_data(path, [X], shard=(1, 2), window=w) for w in ((0, 2), (2, 5))]
    assert [[list(b.indices) for b in p.batches(2)] for p in parts] == [[[1, 3]], [[5, 7], [9]]]
    assert parts[1].description == "d.npz (10 samples, shard 2/2, using 5, samples 3-5)"
    data_error(path, [X], "samples 5-6 are outside the 5 selected", shard=(0, 2), window=(4, 6))


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (1, 4)  # 1-based text, 0-based index
    assert parse_shard("4/4") == (3, 4)  # "shard 4 of 4", as in Jest, Playwright and Vitest
    for bad in ("5/4", "x", "1/0", "-1/2"):
        with pytest.raises(DataError, match="invalid shard"):
            parse_shard(bad)
    with pytest.raises(DataError, match="shards count from 1") as err:
        parse_shard("0/2")
    assert "the first of 2 shards is 1/2" in (err.value.hint or "")


def test_limit_and_fixed_batch_of_one(tmp_path: Path) -> None:
    path = npz(tmp_path / "d.npz", x=np.zeros((5, 3)))
    assert open_data(path, [X], limit=3).num_samples == 3
    one = TensorSpec("x", F32, (1, 3))
    assert [len(b.indices) for b in open_data(path, [one]).batches(4)] == [1] * 5
    four = TensorSpec("x", F32, (4, 3))
    data_error(path, [four], "batches of exactly 4")


def test_random_is_deterministic() -> None:
    inputs = [TensorSpec("x", F32, ("N", "S", 4)), IDS, TensorSpec("m", np.dtype(bool), None)]
    with pytest.raises(DataError, match="unknown rank"):
        open_data("random", inputs)
    inputs = inputs[:2]
    source = open_data("random:5", inputs, seed=1)
    assert source.synthetic and source.num_samples == 5
    a = np.concatenate([f["x"] for f in feeds_of(source, 2)])
    b = np.concatenate([f["x"] for f in feeds_of(open_data("random:5", inputs, seed=1), 5)])
    c = feeds_of(open_data("random:5", inputs, seed=2))[0]["x"]
    assert a.shape == (5, 1, 4) and np.array_equal(a, b) and not np.array_equal(a, c)
    ids = feeds_of(source)[0]["ids"]
    assert ids.dtype == I64 and ids.min() >= 0 and ids.max() < 100
    assert open_data("random", [X]).num_samples == 8
    data_error("random:zero", [X], "invalid data")


PIXELS = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], np.uint8)
IMG = TensorSpec("img", F32, ("N", 3, 2, 2))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    from PIL import Image

    Image.fromarray(PIXELS).save(tmp_path / "a.PNG")
    return tmp_path


def test_image_nchw(image_dir: Path) -> None:
    x = feeds_of(open_data(str(image_dir), [IMG], images=ImageOptions(scale=1.0)))[0]["img"]
    assert x.shape == (1, 3, 2, 2)
    assert np.array_equal(x[0], PIXELS.transpose(2, 0, 1))


def test_image_nhwc_bgr_mean_std(image_dir: Path) -> None:
    opts = ImageOptions(scale=0.1, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), layout="NHWC")
    nhwc = TensorSpec("img", F32, ("N", 2, 2, 3))
    x = feeds_of(open_data(str(image_dir), [nhwc], images=opts))[0]["img"][0]
    want = (PIXELS * 0.1 - np.array([1.0, 2.0, 3.0])) / np.array([2.0, 4.0, 8.0])
    np.testing.assert_allclose(x, want, rtol=1e-6)
    bgr = ImageOptions(scale=1.0, channels="BGR", layout="NHWC")
    x = feeds_of(open_data(str(image_dir), [nhwc], images=bgr))[0]["img"][0]
    assert np.array_equal(x, PIXELS[:, :, ::-1])


def test_image_resize_crop_and_gray(image_dir: Path) -> None:
    from PIL import Image

    wide = np.zeros((2, 4), np.uint8)
    wide[:, 1:3] = 200  # center columns survive the crop
    Image.fromarray(wide).save(image_dir / "a.PNG")
    gray = TensorSpec("img", F32, ("N", 1, "H", "W"))
    opts = ImageOptions(size=(2, 2), scale=1.0, channels="L")
    x = feeds_of(open_data(str(image_dir), [gray], images=opts))[0]["img"]
    assert x.shape == (1, 1, 2, 2) and np.all(x == 200)


def test_image_errors(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(image_dir)
    (image_dir / "b.jpg").write_bytes(b"not an image")
    data_error(path, [IMG], "cannot read image", "b.jpg")
    data_error(path, [TensorSpec("img", F32, ("N", 3, "H", "W"))], "no fixed height and width")
    data_error(path, [IMG, X], "only fits single-input models")
    data_error(path, [IMG], "takes 3 channel(s)", images=ImageOptions(channels="L"))
    with pytest.raises(DataError, match="mean has 2 values"):
        ImageOptions(mean=(1.0, 2.0))
    monkeypatch.setitem(sys.modules, "PIL", None)
    err = data_error(path, [IMG], "needs Pillow")
    assert err.hint == 'pip install "quantcli[images]"'
