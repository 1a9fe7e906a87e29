"""Readers for the IDX format (MNIST / Fashion-MNIST files), plain or gzip-compressed."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from data.sources import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw). The header's magic number gives dtype and rank."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"cannot read IDX file {str(path)!r}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{str(path)!r} is not an IDX file (bad magic number)")
    dtype, rank = np.dtype(_DTYPES[data[2]]), data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    offset = 4 + 4 * rank
    count = int(np.prod(dims)) if dims else 0
    if len(data) - offset < count * dtype.itemsize:
        raise DataError(f"IDX file {str(path)!r} is truncated: header says {dims}, "
                        f"found {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))
