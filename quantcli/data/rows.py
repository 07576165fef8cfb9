"""Arrays in .npy files and in uncompressed .npz members, read a few rows at a time.

`np.load` reads a whole array, and a calibration set of 512 images is 300 MB. A chunk
here only knows where its array lies in the file; a batch reads its rows with one
positional read per run of consecutive rows, so memory stays flat however large the file
is. (Memory mapping would not: every page read stays in the process's resident set.)
Members of a compressed .npz (`np.savez_compressed`) cannot be read in slices: small ones
are loaded whole, larger ones are refused with the command that converts the file.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantcli.errors import DataError

# A compressed member up to this size (uncompressed) is loaded whole; above it, refused.
COMPRESSED_LIMIT = 64 * 2**20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra length


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # where the array data starts in the file (-1: inside a compressed member)


def read_header(f, base: int = 0) -> NpyHeader:
    """The .npy header at the file position; `base` is that position within the file."""
    start = f.tell()
    version = np.lib.format.read_magic(f)
    fmt = np.lib.format
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return NpyHeader(tuple(shape), dtype, bool(fortran), base + f.tell() - start)


def npy_header(path: Path) -> NpyHeader:
    with open(path, "rb") as f:
        return read_header(f)


def npz_headers(path: Path) -> dict[str, NpyHeader]:
    """Header of every array member (`np.savez` stores key K as K.npy), with the file
    offset of its data when the member is stored uncompressed."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as f:
                    header = read_header(f)
                out[key] = NpyHeader(header.shape, header.dtype, header.fortran, -1)
                continue
            raw.seek(info.header_offset)
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {info.filename}")
            data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            raw.seek(data)
            out[key] = read_header(raw, base=data)
    return out


class RowReader:
    """A read-only view of an array on disk that reads only the rows it is indexed with.

    `rows[index]` (an int array, as the data sources use it) returns an ndarray. With
    `batched=False` the file holds one sample without the batch axis and the reader adds it.
    """

    def __init__(self, path: Path, header: NpyHeader, batched: bool = True) -> None:
        if header.dtype.hasobject:
            raise DataError(
                f"{path.name}: arrays of Python objects cannot be read",
                hint="save numeric arrays (np.save without allow_pickle)",
            )
        self.path, self.header = path, header
        self.shape = header.shape if batched else (1, *header.shape)
        self.dtype, self.ndim = header.dtype, len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray | slice | int) -> np.ndarray:
        n = self.shape[0]
        if isinstance(index, slice):
            rows = np.arange(*index.indices(n))
        else:
            rows = np.asarray(index, dtype=np.int64)
            rows = np.where(rows < 0, rows + n, rows)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"row index out of range for {n} rows")
        scalar = rows.ndim == 0
        rows = np.atleast_1d(rows)
        if self.header.fortran:
            out = self._read_fortran(rows)
        else:
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
            self._read_rows(rows, out)
        return out[0] if scalar else out

    def _read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        row_bytes = out[0].nbytes if len(out) else 0
        flat = out.reshape(-1).view(np.uint8) if out.size else out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows
        with open(self.path, "rb") as f:
            for run in np.split(np.arange(len(rows)), breaks):
                if not run.size:
                    continue
                first, count = int(rows[run[0]]), len(run)
                f.seek(self.header.offset + first * row_bytes)
                view = flat[run[0] * row_bytes : (run[0] + count) * row_bytes]
                if f.readinto(view) != count * row_bytes:
                    raise DataError(
                        f"{self.path.name} is shorter than its header says (truncated?)",
                        hint="re-create the file with numpy.save or savez",
                    )

    def _read_fortran(self, rows: np.ndarray) -> np.ndarray:
        """Column-major arrays (rare: np.save of a transposed view) through a short-lived map."""
        mapped = np.memmap(
            self.path, self.dtype, "r", self.header.offset, self.header.shape, order="F"
        )
        try:
            whole = mapped if self.shape == self.header.shape else mapped[None]
            return np.array(whole[rows])
        finally:
            del mapped
