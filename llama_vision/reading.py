"""Reading checkpoint tensors with bounded memory: whole or one slice, straight into the target dtype and
device, a few tens of MiB at a time.

A `Source` is a tensor not read yet. `source.read(part, dtype, device)` returns it, or the slice `part`
= (dim, start, stop) of it (a tensor-parallel rank's shard), as a new tensor of `dtype` on `device`:
- `SafetensorsEntry`: one tensor of a `.safetensors` file, read with plain `pread`s, not through a
  memory map. A mapped file's pages count in the process's resident memory while the file is open
  (safetensors' `safe_open` maps the whole file: measured, a 1 GiB fp32 tensor read as bfloat16 through
  it raised RSS by 1.5 GiB, three times the result). Same dtype on the CPU: the bytes land in the result
  directly; otherwise chunks of at most `CHUNK_BYTES` are read into a staging buffer and converted, and
  on a GPU copied to it, so the whole model is never staged in host memory. A slice along dim 0 reads
  only its rows; along another dim, chunks of whole rows are read and cut.
- `TensorSource`: a tensor already in memory, e.g. one of Meta's `.pth` shards opened with
  `torch.load(mmap=True)`. With `mapped=True` its pages are handed back to the kernel
  (`madvise(MADV_DONTNEED)`, Linux) after each chunk is copied: a private, read-only file mapping just
  reads them from the file again if touched, and resident memory stays at the result's size.
- `Concat`: sources joined along one dim (Meta's model-parallel shards, the embedding table and its 8
  learnable rows) without ever building the joined tensor; a slice reads only the pieces it overlaps.

The safetensors header is validated before any read: known dtypes, offsets inside the file, byte counts
that match the shapes; a bad one is a ValueError naming the file and the key.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK_BYTES = 64 * 2**20
Part = tuple[int, int, int]  # (dim, start, stop): the slice of a tensor that is read

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


class Source:
    """A tensor to be read: its shape and stored dtype are known, its data is read by `read`."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(
        self, part: Part | None, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The tensor, or its slice `part`, as a new tensor of `dtype` (None: as stored) on `device`."""
        shape = sliced_shape(self.shape, part)
        out = torch.empty(shape, dtype=dtype or self.dtype, device=device)
        self.read_into(out, part)
        return out

    def read_into(self, out: torch.Tensor, part: Part | None) -> None:
        raise NotImplementedError


def sliced_shape(shape: tuple[int, ...], part: Part | None) -> tuple[int, ...]:
    if part is None:
        return tuple(shape)
    dim, start, stop = part
    if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
        raise ValueError(f"slice {part} (dim, start, stop) is outside a tensor of shape {tuple(shape)}")
    return tuple(shape[:dim]) + (stop - start,) + tuple(shape[dim + 1 :])


def _row_chunks(
    shape: tuple[int, ...], element_size: int, start: int, stop: int
) -> Iterator[tuple[int, int]]:
    """Ranges of dim-0 rows of at most CHUNK_BYTES each (at least one row)."""
    row_bytes = math.prod(shape[1:]) * element_size
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for a in range(start, stop, step):
        yield a, min(stop, a + step)


def _cut(chunk: torch.Tensor, part: Part | None) -> torch.Tensor:
    """The part of a chunk of whole rows that a slice along dim >= 1 keeps."""
    if part is None or part[0] == 0:
        return chunk
    dim, start, stop = part
    return chunk.narrow(dim, start, stop - start)


def _rows(part: Part | None, shape: tuple[int, ...]) -> tuple[int, int]:
    """The dim-0 rows a read touches."""
    if part is not None and part[0] == 0:
        return part[1], part[2]
    return 0, shape[0] if shape else 1


# ---------------------------------------------------------------------------------------- safetensors
@dataclass
class SafetensorsEntry(Source):
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # of the first byte in the file

    def read_into(self, out: torch.Tensor, part: Part | None) -> None:
        if not self.shape:  # a scalar
            out.copy_(self._read_rows(0, 1).view(()))
            return
        start, stop = _rows(part, self.shape)
        direct = out.device.type == "cpu" and out.dtype == self.dtype and (part is None or part[0] == 0)
        if direct and out.is_contiguous():  # no staging: the bytes land in the result
            self._pread(out, self.offset + start * self._row_bytes)
            return
        for a, b in _row_chunks(self.shape, self.dtype.itemsize, start, stop):
            out[a - start : b - start].copy_(_cut(self._read_rows(a, b), part))

    @property
    def _row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def _read_rows(self, a: int, b: int) -> torch.Tensor:
        rows = _staging((b - a) * self._row_bytes).view(self.dtype).view(b - a, *self.shape[1:])
        self._pread(rows, self.offset + a * self._row_bytes)
        return rows

    def _pread(self, out: torch.Tensor, offset: int) -> None:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        fd = os.open(self.file, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ValueError(f"cannot read {self.file}: file ends inside tensor {self.key!r}")
                done += n
        finally:
            os.close(fd)


def safetensors_entries(file: Path) -> list[SafetensorsEntry]:
    """The tensors of a .safetensors file, from its header; no tensor data is read."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    except ValueError as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"cannot read {file}: the header is not a JSON object")
    entries = []
    data_start, data_size = 8 + n, size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"cannot read {file}: bad header entry for {key!r}: {info!r}") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"cannot read {file}: tensor {key!r} has {end - begin} bytes for shape {shape}")
        if not 0 <= begin <= end <= data_size:
            raise ValueError(
                f"cannot read {file}: tensor {key!r} lies beyond the end of the file (truncated?)"
            )
        entries.append(SafetensorsEntry(file, key, shape, dtype, data_start + begin))
    return entries


_local = threading.local()  # one staging buffer per thread: two loads in two threads never share one


def _staging(nbytes: int) -> torch.Tensor:
    """A reused uint8 buffer of at least `nbytes`: a fresh one per chunk would leave the freed chunks
    scattered between the loaded tensors on the heap (measured: +10% resident memory on an fp32 ->
    bfloat16 load)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _local.buffer = None  # the smaller one is freed before the new one is made
        buffer = _local.buffer = torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
    return buffer[:nbytes]


def release_staging() -> None:
    """Free this thread's staging buffer (the loader calls it when done)."""
    _local.buffer = None


# ---------------------------------------------------------------------------------------- in memory
class TensorSource(Source):
    """A tensor in memory; `mapped=True` when it lives in a read-only file mapping (torch.load(mmap=True))
    whose pages may be dropped once copied."""

    def __init__(self, tensor: torch.Tensor, mapped: bool = False) -> None:
        self.tensor, self.mapped = tensor, mapped
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def read_into(self, out: torch.Tensor, part: Part | None) -> None:
        t = self.tensor
        if t.dim() == 0:
            out.copy_(t)
            return
        start, stop = _rows(part, self.shape)
        for a, b in _row_chunks(self.shape, t.element_size(), start, stop):
            chunk = t[a:b]
            out[a - start : b - start].copy_(_cut(chunk, part))
            if self.mapped:
                release_pages(chunk)


class Concat(Source):
    """Sources joined along `dim`, read piece by piece into the result (never joined in memory)."""

    def __init__(self, pieces: list[Source], dim: int) -> None:
        first = pieces[0].shape
        for p in pieces[1:]:
            if len(p.shape) != len(first) or any(
                a != b for i, (a, b) in enumerate(zip(p.shape, first)) if i != dim
            ):
                raise ValueError(f"cannot join shapes {first} and {p.shape} along dim {dim}")
        self.pieces, self.dim = pieces, dim
        self.shape = first[:dim] + (sum(p.shape[dim] for p in pieces),) + first[dim + 1 :]
        self.dtype = pieces[0].dtype

    def read_into(self, out: torch.Tensor, part: Part | None) -> None:
        dim, lo, hi = part if part is not None else (self.dim, 0, self.shape[self.dim])
        at = 0  # where the current piece begins along self.dim
        for piece in self.pieces:
            size = piece.shape[self.dim]
            if dim != self.dim:  # the slice cuts across the pieces: each gives its share
                piece.read_into(out.narrow(self.dim, at, size), part)
            else:
                a, b = max(lo, at), min(hi, at + size)
                if a < b:
                    piece.read_into(out.narrow(dim, a - lo, b - a), (dim, a - at, b - at))
            at += size


# ---------------------------------------------------------------------------------------- page release
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages under a contiguous tensor that lives in a private file mapping back to the
    kernel. Only call it on such tensors: on ordinary memory MADV_DONTNEED would zero the pages."""
    if _libc is None or not tensor.is_contiguous() or tensor.numel() == 0:
        return
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
