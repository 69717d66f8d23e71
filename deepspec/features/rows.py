"""safetensors files read and written a few rows at a time, so that training holds a micro-batch, not a cache.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of each tensor)
and the raw bytes. Rows [a, b) of a tensor are one contiguous byte range, read with `os.pread`. No mmap:
mapped pages count in the process's resident memory once touched, so an epoch over a mapped cache would
grow RSS to the cache's size; read pages stay in the kernel's page cache, which the kernel may drop.
`RowWriter` writes a file whose shapes are known up front row by row, under a temp name renamed on close,
and the files it writes load with `safetensors.torch.load_file` like any other.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from deepspec.io import temp_sibling

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}
# The order safetensors lays tensors out in (its dtype enum, largest first, then by name): a RowWriter file
# is then byte for byte what `save_file` writes for the same tensors (whose metadata keys come in hash order).
LAYOUT_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "U8", "BOOL")


class RowReader:
    """Rows of the tensors of one safetensors file, read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._specs = {name: (DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"][0]) for name, h in header.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._specs[name][1]

    def rows(self, name: str, a: int = 0, b: int | None = None) -> Tensor:
        """Rows [a, b) of tensor `name` (all of them by default), as a fresh tensor."""
        dtype, shape, start = self._specs[name]
        b = shape[0] if b is None else b
        if not 0 <= a <= b <= shape[0]:
            raise IndexError(f"{self.path}: rows [{a}, {b}) of {name!r} out of range (it has {shape[0]})")
        row = math.prod(shape[1:]) * dtype.itemsize
        size = (b - a) * row
        if size == 0:
            return torch.empty((b - a, *shape[1:]), dtype=dtype)
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        fd = os.open(self.path, os.O_RDONLY)  # per read: a cache of thousands of shards holds no descriptors
        try:
            while done < size:  # pread may return less than asked
                got = os.preadv(fd, [view[done:]], self._base + start + a * row + done)
                if got == 0:
                    raise OSError(f"{self.path}: file ends before rows [{a}, {b}) of {name!r} (truncated?)")
                done += got
        finally:
            os.close(fd)
        return torch.frombuffer(buf, dtype=dtype).view(b - a, *shape[1:])


class RowWriter:
    """A safetensors file written in rows: `specs` gives each tensor's dtype and shape, `write` fills rows
    from a given row on, `close` renames the finished file into place (a killed writer leaves only its
    temp file). Use as a context manager; an exception discards the file. The bytes are those `save_file`
writes, with the metadata keys in the order given."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._layout: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in sorted(specs, key=lambda n: (LAYOUT_ORDER.index(CODES[specs[n][0]]), n)):
            dtype, shape = specs[name]
            row = math.prod(shape[1:]) * dtype.itemsize
            nbytes = shape[0] * row
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, row)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._base = 8 + len(raw)
        self._tmp = temp_sibling(self.path)
        self._fh = open(self._tmp, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fh.truncate(self._base + offset)

    def write(self, name: str, row: int, values: Tensor) -> None:
        start, row_bytes = self._layout[name]
        data = values.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes()
        os.pwrite(self._fh.fileno(), data, self._base + start + row * row_bytes)

    def close(self) -> Path:
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
