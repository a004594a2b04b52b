"""The run's other processes and threads: SIGTERM handled as Ctrl-C, DataLoader worker processes
(their set-up and their deaths, named for the user), and items made ahead in a background thread."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import re
import signal
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


_ending: list[bool] = []  # not empty once the run is ending (see `ending`)
_stopped: list[float] = []  # when a signal last stopped the run (time.monotonic())
AGAIN_SECONDS = 10.0  # a signal this soon after the one that stopped the run belongs to that stop


def _interrupt(signum, frame) -> None:
    # a second signal soon after (a terminal's, torchrun's SIGTERM) can't break the stop, where the
    # best weights are restored and files land; a later one stops the run again (had a library
    # swallowed the first, Ctrl-C still works)
    if _ending or _stopped and time.monotonic() - _stopped[-1] < AGAIN_SECONDS:
        return
    _stopped.append(time.monotonic())
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


# Called first where the outcome is decided: then Ctrl-C and SIGTERM are ignored, so a second one
# (torchrun's agent sends SIGTERM to every process when one dies) can't make the ending a traceback.
# A C callable: no Python frame starts before it takes effect, where a pending signal's handler
# would run first.
ending = functools.partial(_ending.append, True)


def ended() -> bool:
    """Whether the run is ending (see `ending`), or a signal has stopped it."""
    return bool(_ending or _stopped)


def interruptible() -> None:
    """After a Ctrl-C taken as an answer (LRA's prompt) the run goes on: signals interrupt again."""
    _stopped.clear()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """In the block SIGTERM raises Terminated as Ctrl-C raises KeyboardInterrupt, until `ending`;
    old handlers return after. An ignored Ctrl-C (nohup) stays ignored. Outside the main thread (no
    signals there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _ending.clear()
    _stopped.clear()
    taken = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) != signal.SIG_IGN)
    before = {signum: signal.signal(signum, _interrupt) for signum in taken}
    try:
        yield
    finally:
        ending()
        for signum, handler in before.items():
            signal.signal(signum, handler)


def interrupt_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status of a run stopped by Ctrl-C (130) or SIGTERM (143), as a shell gives it."""
    return 143 if isinstance(interrupt, Terminated) else 130


class WorkerDied(RuntimeError):
    """A worker process ended unasked (most often the OOM killer): a message for the user."""


PR_SET_PDEATHSIG = 1  # prctl(2)'s option: the signal the kernel sends when the parent ends


def become_worker(parent: int, worker_id: int | None = None) -> None:
    """First thing in a worker of parent: Ctrl-C (a terminal sends it to all) is left to the parent,
    which stops the workers; on Linux the worker dies with its parent (kill -9 too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the checks below and EOFs
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the kernel was told
        os._exit(1)


def worker_death(pid: int | None, exitcode: int | None, doing: str) -> WorkerDied:
    """The error for a worker that ended unasked while `doing` ("decoding x.jpg"): how it ended,
    the likely cause and the fix. SIGKILL is most likely the OOM killer, SIGSEGV a decoder crash,
    SIGBUS a memory-mapped file cut short (full disk); an exit status of its own means an error in
    the worker, which --num-workers 0 shows where it happens."""
    how, cause = ("ended", "most likely the system ran out of memory; free some memory or lower "
                  "--num-workers (NUM_WORKERS)")
    if exitcode in (-signal.SIGSEGV, -signal.SIGBUS):
        cause = ("a crash in the image decoder, or a full disk under a memory-mapped file; check "
                 "the file and the disk")
    elif exitcode is not None and exitcode > 0:
        how, cause = (f"exited with status {exitcode}",
                      "an error in the worker; see it with --num-workers 0")
    elif exitcode is not None and exitcode < 0 and exitcode != -signal.SIGKILL:
        cause = "a signal from outside the run"
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            how = f"was killed by {signal.Signals(-exitcode).name}"
    which = f" (process {pid})" if pid is not None else ""
    return WorkerDied(f"a worker process{which} {how} while {doing}: {cause}")


def sigchld_default() -> None:
    """Call after iter(loader): torch's SIGCHLD handler raises wherever the main thread is when a
    worker dies (a traceback amid a plot, say); with the default handler back, the loader raises
    where it is read, within MP_STATUS_CHECK_INTERVAL (5 s) of the death."""
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


_DATALOADER_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? (\d+)[\d, ]*\) "
                               r"(?:is killed by signal: ([^.]+)|exited unexpectedly"
                               r"(?: with exit code (-?\d+))?)")  # torch's words


def worker_died(error: BaseException, doing: str) -> WorkerDied | None:
    """A DataLoader's error for a dead worker as WorkerDied: torch's RuntimeError, or the
    ConnectionError of fetching shared memory from it; None for any other error."""
    if isinstance(error, (ConnectionError, EOFError)):
        return worker_death(None, None, doing)
    match = _DATALOADER_DEATH.search(str(error)) if isinstance(error, RuntimeError) else None
    if match is None:
        return None
    pid, signal_text, status = match.groups()
    exitcode = int(status) if status else None
    if signal_text:  # strsignal's words: "Killed", "Segmentation fault"
        exitcode = next((-number for number in signal.Signals
                         if signal.strsignal(number) == signal_text), None)
    return worker_death(int(pid), exitcode, doing)


T = TypeVar("T")


def in_background(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items, made in a thread up to `depth` ahead so making them overlaps using them; an error
    there is raised here, and closing the generator stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as error:  # any failure belongs to the consumer, which raises it
            put(("error", error))

    thread = threading.Thread(target=produce, name="in_background", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
