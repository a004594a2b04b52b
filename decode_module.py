"""Many image files decoded as image_module.read_stored reads them into uint8 rows: in parallel
worker processes (which die with the run and are named when they die), after the JPEGs a CUDA
device can take (gpu_decode_module)."""

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
    """Decode each file as read_stored does into out[i] (uint8 (N, size, size, 3): a tensor in
    memory, or the cache's np.memmap of its .npy file), in num_workers processes (0: in this one)
    with a progress bar; returns (i, message) for each file that could not be read (its row left
    black).

    Workers take DECODE_CHUNK file names at a time and write their rows straight into the .npy file,
    which each opens itself; rows in memory they write into a few shared chunks, which this process
    copies into out. Only the failures come back.

    With a CUDA device, the JPEGs that need no turning are decoded there first, in batches
    (_decode_jpegs: within a level of Pillow's pixels on average, a few at most); the other files,
    and any JPEG the device could not decode, then go to the processes as above."""
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
    """decode_files' CPU path: the files numbered `files` (ascending) into their rows, as
    decode_files says."""
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
    """read_stored's pixels as bytes (size rows of size RGB pixels) and "", or zeros and the message
    of a file that cannot be read."""
    try:
        return image_module.read_stored(path, size).tobytes(), ""
    except image_module.DataError as error:
        return bytes(size * size * 3), str(error)


_target: _RowFile | _RowArray | None = None  # in a decoding worker process: where it writes (_work)


def _decode_task(task: tuple[list[int], list[str], int | None, int | None], decoding,
                 worker: int) -> tuple[list[int], int | None, list[tuple[int, str]]]:
    """In a worker: files numbered `files` (their paths given) decoded into their own rows of the
    target (first None), or into its rows from `first` on; (files, slot, failures). decoding[worker]
    holds the number of the file being decoded, for the parent to name should this process die (-1
    between tasks)."""
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
    """A decoding worker's life: the tasks sent to it, one at a time, each answered with
    _decode_task's result (or the error it raised) until None comes, or the parent is gone. It
    leaves Ctrl-C to the parent and dies with it. parents_ends: the parent's ends of the pipes so
    far, which a forked worker closes (so that its pipe ends with the parent)."""
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
    """_RUN_SIGNALS blocked in this thread for the block (held until its end, when Python runs their
    handlers), so that a process started in it begins with them blocked. No masks: nothing."""
    masks = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _RUN_SIGNALS) if masks else None
    try:
        yield
    finally:
        if masks:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _Workers:
    """Decoding worker processes, each sent tasks of its own through a pipe, with shared memory
    where each notes the file it is decoding. A worker that dies (the out-of-memory killer, a crash
    in a decoder) is noticed at once and raises WorkerDied naming that file, where
    multiprocessing.Pool would start another and wait forever for the lost task. Leaving the block
    stops them all."""

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
        """The next answer of any worker, and which worker gave it; WorkerDied when one died holding
        tasks."""
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
    """What _decode_task returns for each chunk of the files (numbers into paths), as workers finish
    them: into their own rows (slot None), or into scratch slot s (rows s * chunk on). Each worker
    holds two tasks, so that it has the next one when it finishes one; with scratch, each of its
    tasks has a slot of its own, given the worker's next chunk once the caller took its rows."""
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
    """fork on Linux: workers start at once, sharing this process's imports and memory, as
    DataLoader workers do there (they touch no torch tensor, so torch's threads are not missed);
    else the platform's default (spawn), whose workers import this module."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@contextlib.contextmanager
def _shared_rows(rows: np.ndarray, scratch_rows: int, context: multiprocessing.context.BaseContext
                 ) -> Iterator[tuple[_RowFile | _RowArray, np.ndarray | None]]:
    """Where workers write, and the scratch to copy rows from (None: they write rows themselves).

    A .npy file's whole memory map (the cache): the file, which workers open. Rows in private
    memory: a scratch of scratch_rows rows, reused, in shared anonymous memory that forked workers
    inherit, else in a small temporary file. Reused, because the first write to shared memory is
    slow: on a 2-core VM, 150 us for a 256-px row (48 new pages), against 28 us once its pages are
    there."""
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
