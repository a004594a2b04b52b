"""Many image files decoded as image_module.read_stored reads them into uint8 rows: in worker
processes (dying with the run, named when they die), after a CUDA device decodes its JPEGs."""

from __future__ import annotations

import contextlib
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
from multiprocessing.connection import Connection
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

import gpu_decode_module
import image_module
import process_module
from rows_module import _in_a_file, _RowArray, _RowFile, _runs

# most files per decoding task: a task's own cost (about 0.1 ms) is under 1% of theirs
DECODE_CHUNK = 16


def decode_files(paths: list[str], size: int, out: torch.Tensor | np.ndarray, num_workers: int,
                 desc: str, *, device: torch.device | str | None = None) -> list[tuple[int, str]]:
    """Decode each file as read_stored does into out[i] (uint8 (N, size, size, 3): a tensor, or the
    cache's .npy memmap) in num_workers processes (0: in this process); returns (i, message) per
    unreadable file (its row left black). Workers write straight into the .npy file; rows in memory
    go through shared chunks this process copies. With a CUDA device, JPEGs needing no turning are
    decoded there first (within a level of Pillow's on average, a few at most)."""
    rows = out.numpy() if isinstance(out, torch.Tensor) else out
    assert rows.shape == (len(paths), size, size, 3) and rows.dtype == np.uint8, (
        "out is not N stored squares")
    with tqdm(total=len(paths), desc=desc, unit="image", disable=not sys.stderr.isatty()) as bar:
        left = list(range(len(paths)))
        jpeg_device = gpu_decode_module._jpeg_device(device)
        if jpeg_device is not None and paths:
            left = gpu_decode_module._decode_jpegs(paths, size, rows, jpeg_device, bar)
        return _decode_in_processes(paths, left, rows, num_workers, bar)


def _decode_in_processes(paths: list[str], files: list[int], rows: np.ndarray, num_workers: int,
                         bar: tqdm) -> list[tuple[int, str]]:
    """decode_files' CPU path for the files numbered `files` (ascending)."""
    size, failures = rows.shape[1], []
    if num_workers == 0 or not files:
        for i in files:
            pixels, message = _stored_bytes(paths[i], size)
            rows[i] = np.frombuffer(pixels, np.uint8).reshape(size, size, 3)
            failures += [(i, message)] if message else []
            bar.update(1)
        return failures
    chunk = max(1, min(DECODE_CHUNK, len(files) // (4 * num_workers)))  # every worker gets several
    processes = min(num_workers, -(-len(files) // chunk))
    context = _worker_context()
    with (_shared_rows(rows, 2 * processes * chunk, context) as (target, scratch),
          _Workers(context, processes, target, paths) as workers):
        for done, slot, failed in _in_turn(workers, paths, files, chunk, scratch is not None):
            if scratch is not None:
                for k, count in _runs(done):
                    first = slot * chunk + k
                    rows[done[k]:done[k] + count] = scratch[first:first + count]
            failures += failed
            bar.update(len(done))
    return sorted(failures)


def _stored_bytes(path: str, size: int) -> tuple[bytes, str]:
    """(read_stored's RGB pixels as bytes, ""), or (zeros, message) for an unreadable file."""
    try:
        return image_module.read_stored(path, size).tobytes(), ""
    except image_module.DataError as error:
        return bytes(size * size * 3), str(error)


_target: _RowFile | _RowArray | None = None  # in a decoding worker process: where it writes (_work)


def _decode_task(task: tuple[list[int], list[str], int | None, int | None], decoding,
                 worker: int) -> tuple[list[int], int | None, list[tuple[int, str]]]:
    """In a worker: decode `files` into their own target rows (when first is None) or into rows from
    `first` on; returns (files, slot, failures). decoding[worker] holds the file being decoded (-1
    between tasks), for the parent to name should this process die."""
    files, paths, first, slot = task
    failures = []
    for k, (i, path) in enumerate(zip(files, paths)):
        decoding[worker] = i
        pixels, message = _stored_bytes(path, _target.size)
        _target.write(i if first is None else first + k, pixels)
        failures += [(i, message)] if message else []
    decoding[worker] = -1
    return files, slot, failures


def _work(connection: Connection, parents_ends: list[Connection], target: _RowFile | _RowArray,
          decoding, worker: int, parent: int) -> None:
    """A decoding worker: answer each task with _decode_task's result (or its error) until None or
    the parent is gone; leaves Ctrl-C to the parent and dies with it. parents_ends: the parent's
    pipe ends so far, which a forked worker closes so its pipe ends with the parent."""
    global _target
    for end in parents_ends:
        end.close()
    process_module.become_worker(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the run's handler
    if hasattr(signal, "pthread_sigmask"):  # blocked by _Workers while it started this process
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RUN_SIGNALS)
    _target = target
    while True:
        try:
            task = connection.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        try:
            result = _decode_task(task, decoding, worker)
        except Exception as error:  # the parent raises it (a DataError is caught in _stored_bytes)
            result = error
        try:
            connection.send(result)
        except Exception:  # an error that does not pickle: its text
            connection.send(RuntimeError(f"{type(result).__name__}: {result}"))


_RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the run's to handle, never a decoding worker's


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """_RUN_SIGNALS blocked in this thread for the block (handled at its end), so processes started
    in it begin with them blocked. Where the platform has no signal masks, it does nothing."""
    masks = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _RUN_SIGNALS) if masks else None
    try:
        yield
    finally:
        if masks:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _Workers:
    """Decoding processes, each with its own task pipe and a shared slot naming its file. A worker
    that dies (OOM killer, decoder crash) raises WorkerDied naming that file at once, where
    multiprocessing.Pool would wait forever for the lost task. Leaving the block stops them all."""

    def __init__(self, context: multiprocessing.context.BaseContext, count: int,
                 target: _RowFile | _RowArray, paths: list[str]):
        self.context, self.count, self.target, self.paths = context, count, target, paths
        self.decoding = context.RawArray("q", [-1] * count)  # the file each worker is on (-1: none)
        self.processes, self.connections, self.held = [], [], [0] * count

    def __enter__(self) -> _Workers:
        try:
            with _signals_blocked():  # until each worker has set its own handling (_work); one that
                for w in range(self.count):  # comes to this process meanwhile waits for the unblock
                    ours, theirs = self.context.Pipe()
                    args = (theirs, self.connections + [ours], self.target, self.decoding, w,
                            os.getpid())
                    process = self.context.Process(target=_work, args=args, name=f"decode-{w}",
                                                   daemon=True)
                    process.start()
                    theirs.close()
                    self.processes.append(process)
                    self.connections.append(ours)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exception) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join()
        for connection in self.connections:
            connection.close()

    def send(self, worker: int, task: tuple) -> None:
        """Queue a task for this worker (it takes its tasks in the order sent)."""
        self.connections[worker].send(task)
        self.held[worker] += 1

    def result(self) -> tuple[int, object]:
        """(worker, its next answer), from any worker; WorkerDied when one died holding tasks."""
        while True:
            watched = [w for w in range(self.count) if self.held[w]]
            ready = multiprocessing.connection.wait([self.connections[w] for w in watched] +
                                                    [self.processes[w].sentinel for w in watched])
            for w in watched:
                if self.connections[w] in ready:
                    with contextlib.suppress(EOFError, ConnectionError):  # died: see its sentinel
                        answer = self.connections[w].recv()
                        self.held[w] -= 1
                        return w, answer
            for w in watched:
                process = self.processes[w]
                if process.sentinel in ready:
                    process.join()
                    i = self.decoding[w]
                    doing = f"decoding {self.paths[i]}" if i >= 0 else "decoding images"
                    raise process_module.worker_death(process.pid, process.exitcode, doing)


def _in_turn(workers: _Workers, paths: list[str], files: list[int], chunk: int,
             scratch: bool) -> Iterator[tuple[list[int], int | None, list[tuple[int, str]]]]:
    """_decode_task's result per chunk of files as workers finish: into their own rows (slot None)
    or scratch slot s (rows s * chunk on). Each worker holds two tasks, so it never waits for the
    next; with scratch each task owns a slot, reused once the caller took its rows."""
    starts = iter(range(0, len(files), chunk))

    def submit(worker: int, slot: int | None) -> int:
        start = next(starts, None)
        if start is None:
            return 0
        numbers = files[start:start + chunk]
        first = None if slot is None else slot * chunk
        workers.send(worker, (numbers, [paths[i] for i in numbers], first, slot))
        return 1

    n = workers.count
    in_flight = sum(submit(w, k * n + w if scratch else None) for k in range(2) for w in range(n))
    while in_flight:
        worker, result = workers.result()
        if isinstance(result, BaseException):  # raised in a worker (a DataError is caught there)
            raise result
        yield result
        in_flight += submit(worker, result[1]) - 1


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers start at once sharing imports and memory, as DataLoader's do (they
    touch no tensor, so torch's threads are not missed); else the default (spawn)."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@contextlib.contextmanager
def _shared_rows(rows: np.ndarray, scratch_rows: int, context: multiprocessing.context.BaseContext
                 ) -> Iterator[tuple[_RowFile | _RowArray, np.ndarray | None]]:
    """(where workers write, the scratch to copy rows from; None when workers write the rows):
    a .npy memmap's file, which workers open, else a reused scratch of scratch_rows rows, in shared
    anonymous memory forked workers inherit or in a temporary file. Reused: a first write to shared
    memory is slow (a 256-px row touches 48 new pages; benchmarks/RESULTS.md)."""
    size = rows.shape[1]
    if _in_a_file(rows):
        yield _RowFile(rows.filename, rows.offset, size), None
        return
    shape = (scratch_rows, *rows.shape[1:])
    if context.get_start_method() == "fork":
        # MAP_SHARED
        scratch = np.frombuffer(mmap.mmap(-1, math.prod(shape)), np.uint8).reshape(shape)
        yield _RowArray(scratch), scratch
        return
    with tempfile.TemporaryDirectory(prefix="decode_", ignore_cleanup_errors=True) as folder:
        scratch = np.lib.format.open_memmap(os.path.join(folder, "rows.npy"), "w+", np.uint8, shape)
        yield _RowFile(scratch.filename, scratch.offset, size), scratch
        del scratch  # unmapped before the folder is removed (Windows cannot remove a mapped file)
