"""Writing a .npz archive one array at a time, each a chunk of rows at a time, so that memory holds one chunk.

A .npz is a zip archive with one ``NAME.npy`` member per array; numpy.load reads it as ``np.savez`` writes it. A
zip member is written whole before the next begins, so each array is produced by its own pass: ``Member.chunks()``
yields consecutive blocks along the first axis whose concatenation is the array. Each member is a .npy header
(format 1.0) followed by the raw C-order bytes, deflated or stored, always with zip64 sizes (a member may exceed
4 GiB). The archive is written to a temporary file beside the target and renamed over it only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

PIECE_BYTES = 1 << 22  # bytes handed to the compressor at once: its output for a chunk never builds up in memory
COMPRESS_LEVEL = 1  # zlib's fastest: on float data it compresses within 1 % of level 6, at ~1.5× the speed
ZIP_OVERHEAD = 256  # bytes per member, at most: local header, zip64 extra fields, central directory entry


@dataclass(frozen=True)
class Member:
    """One array of the archive: its name (numpy.load's key), shape and dtype, and its blocks along axis 0."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterator[np.ndarray]] | None = None  # None while only sizing

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header (format 1.0) of a C-order array of this shape and dtype."""
    header = io.BytesIO()
    description = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, description)
    return header.getvalue()


def disk_bound(members: Sequence[Member]) -> int:
    """Bytes the archive takes at most: every member's header and data (zlib's worst case if deflated: stored
    blocks, 5 bytes per 16 KiB more) and the zip records."""
    total = 22 + 56 + 20  # end of central directory, zip64 end record and locator
    for member in members:
        raw = len(npy_header(member.shape, member.dtype)) + member.nbytes
        total += raw + 5 * (raw // 16384 + 1) + 2 * len(member.name.encode()) + ZIP_OVERHEAD
    return total


def write_npz(
    path: Path, members: Sequence[Member], *, compress: bool = True, progress: Callable[[int, int], None] | None = None
) -> None:
    """Write ``members`` to the .npz at ``path``, one chunk in memory at a time; ``progress(index, rows)`` hears of
    each chunk written (the member's index, its rows so far). Nothing is left at ``path`` (nor beside it) if writing
    fails."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    try:
        level = COMPRESS_LEVEL if compress else None
        with zipfile.ZipFile(temporary, "w", compression=method, compresslevel=level, allowZip64=True) as archive:
            for index, member in enumerate(members):
                with archive.open(f"{member.name}.npy", "w", force_zip64=True) as entry:
                    _write_member(entry, member, lambda rows, index=index: progress and progress(index, rows))
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        if error.errno == errno.ENOSPC:
            raise ValueError(f"the disk holding {path.parent} ran full while writing {path.name}") from None
        raise
    except BaseException:
        _remove(temporary)
        raise


def _write_member(entry: IO[bytes], member: Member, progress: Callable[[int], object]) -> None:
    if member.chunks is None:
        raise RuntimeError(f"{member.name}: a member planned for sizing has no data")
    entry.write(npy_header(member.shape, member.dtype))
    rows = 0
    for block in member.chunks():
        block = np.asarray(block, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        if block.dtype != member.dtype or block.shape[1:] != member.shape[1:] or block.ndim != len(member.shape):
            raise RuntimeError(
                f"{member.name}: a chunk of dtype {block.dtype} and shape {block.shape} does not continue an array "
                f"of dtype {member.dtype} and shape {member.shape}"
            )
        data = memoryview(block).cast("B")
        for start in range(0, len(data), PIECE_BYTES):
            entry.write(data[start : start + PIECE_BYTES])
        rows += len(block) if block.ndim else 1
        progress(rows)
    expected = member.shape[0] if member.shape else 1
    if rows != expected:
        raise RuntimeError(f"{member.name}: its chunks hold {rows} rows, expected {expected}")


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
