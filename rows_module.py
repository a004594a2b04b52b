"""Where decoded images go, consecutive rows at once: an in-place .npy file or a shared array."""

from __future__ import annotations

import mmap
from typing import Iterator

import numpy as np


def _runs(numbers: list[int]) -> Iterator[tuple[int, int]]:
    """(position, length) of each run of consecutive numbers: [4, 5, 6, 9] gives (0, 3), (3, 1)."""
    start = 0
    for k in range(1, len(numbers) + 1):
        if k == len(numbers) or numbers[k] != numbers[k - 1] + 1:
            yield start, k - start
            start = k


class _RowFile:
    """Rows of a .npy file, for a worker to write in place with write(2): a third of the system time
    of storing through a memory map, which page-faults for each of a 256-px row's 48 pages."""

    def __init__(self, filename: str, offset: int, size: int):
        # opened in the worker
        self.filename, self.offset, self.size, self.file = filename, offset, size, None

    def write(self, row: int, pixels: bytes | np.ndarray) -> None:
        """Rows from `row` on: as many as pixels holds (contiguous, whole rows)."""
        if self.file is None:
            self.file = open(self.filename, "r+b", buffering=0)
        self.file.seek(self.offset + row * 3 * self.size ** 2)
        view = memoryview(pixels).cast("B")
        while view:  # a regular file takes it whole, but for a full disk, which raises
            view = view[self.file.write(view):]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _RowArray:
    """Rows of an array in shared memory, which a forked worker inherits."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.size = rows, rows.shape[1]

    def write(self, row: int, pixels: bytes | np.ndarray) -> None:
        """Rows from `row` on: as many as pixels holds (contiguous, whole rows)."""
        rows = np.frombuffer(pixels, np.uint8).reshape(-1, *self.rows.shape[1:])
        self.rows[row:row + len(rows)] = rows

    def close(self) -> None:
        pass


def _in_a_file(rows: np.ndarray) -> bool:
    """Whether rows are a whole .npy file's memory map (not a view of one), writable by its name."""
    return isinstance(rows, np.memmap) and isinstance(rows.base, mmap.mmap) and bool(rows.filename)
