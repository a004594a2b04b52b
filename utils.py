"""Run plumbing: the messages for a bad setting and the checks of a config's choices and ranges,
seeding, device choice, random states, atomic file writes and safe loading of weights and
checkpoints, the metrics CSV, the output folder's lock, signals and worker processes, and the
torchrun process helpers."""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import os
import pickle
import queue
import random
import re
import shutil
import stat
import signal
import sys
import tempfile
import threading
import time
import types
import typing
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

try:
    import fcntl
# Windows has no flock: runs there take no lock on their folder, and nothing fails
except ImportError:
    fcntl = None

LOCK_FILE = ".lock"  # in OUTPUT_DIR: flock'ed by the run writing there, and holding its process id
CSV_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "next_lr",
    "monitor",
               "improved", "new_best", "event", "seconds"]


class CheckpointError(ValueError):
    """A weights or checkpoint file that is missing, unreadable, unsafe or of the wrong kind."""


def not_known(name: str, value: Any, choices: Any, *, closest: bool = False) -> str:
    """The one message for a value that is not among the choices: "NAME = 'x' is not known; choose
    one of ...". With closest (for long lists, such as model names), only the nearest names are
    offered."""
    choices = list(choices)
    if closest:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=5, cutoff=0.5)
        offer = (
            f"the closest are {', '.join(near)}"
            if near
            else f"there are {len(choices)} to choose from"
        )
        return f"{name} = {value!r} is not known; {offer}"
    return f"{name} = {value!r} is not known; choose one of {', '.join(map(repr, choices))}"


def flag(name: str) -> str:
    """The command-line flag of main.py's constant: --val-split for VAL_SPLIT."""
    return "--" + name.lower().replace("_", "-")


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count with its noun, singular for one: plural(1, "file") is "1 file", plural(2, "file") "2
    files"; `many` gives a plural that is not word + "s"."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def printable(name: str) -> str:
    """A file or folder name as text any file or terminal takes: the bytes of a name that is not
    UTF-8 (a Latin-1 "café" from an old archive, which os.fsdecode keeps as surrogates and open()
    still opens) shown as \\xNN escapes, "caf\\xe9"; UTF-8 names as they are. For what is written or
    printed, never for opening."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


Rules = dict[str, tuple[Callable[[Any], bool], str]]  # a setting's name: (test, what is allowed)
TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
              dict: "a table of names and values"}


def type_words(annotation: Any) -> str:
    """What a setting of this type takes, in words: "a whole number or none" for int | None, "a
    list, each a number" for list[float]."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        kinds = typing.get_args(annotation)
        words = " or ".join(type_words(kind) for kind in kinds if kind is not type(None))
        return words + (" or none" if type(None) in kinds else "")
    if typing.get_origin(annotation) is list:
        return f"a list, each {type_words(typing.get_args(annotation)[0])}"
    return TYPE_WORDS[annotation]


def is_of_type(value: Any, annotation: Any) -> bool:
    """Whether value is exactly of the annotation's type, as a JSON file or a checkpoint holds it: a
    bool is not a number, a whole number is a number, "64" is text (int | None, list[str], dict and
    Any are understood)."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(is_of_type(value, kind) for kind in typing.get_args(annotation))
    if origin is list:
        item_type = typing.get_args(annotation)[0]
        return isinstance(value, list) and all(is_of_type(item, item_type) for item in value)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise ValueError unless value is of the annotation's type (is_of_type), in the words a flag's
    wrong type gets: "BATCH_SIZE takes a whole number, not '64'"."""
    if not is_of_type(value, annotation):
        raise ValueError(f"{name} takes {type_words(annotation)}, not {short_repr(value)}")


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to about limit characters: a value from a file can be any size, a message is
    one line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"


def check_fields(config: Any, rules: Rules, choices: dict[str, Sequence[Any]]
        | None = None) -> None:
    """Raise ValueError naming the first field of a config that is not among its choices or breaks
    its rule. A field is named as the constant of main.py that sets it: VAL_SPLIT for val_split."""
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ValueError(not_known(name.upper(), getattr(config, name), allowed))
    for name, (test, allowed) in rules.items():
        if not test(getattr(config, name)):
            raise ValueError(
                f"{name.upper()} = {getattr(config, name)!r} is out of range: use {allowed}")


# --------------------------------------------------------------------------- the time account


class TimeAccount:
    """Where a run's time went, by part, in seconds, as Lightning's simple profiler shows it: what
    the parts leave out of the whole is "other"."""

    def __init__(self, started: float):
        self.started = started  # time.perf_counter() when the process began its work
        self.parts: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, part: str):
        """Count the block's time to the part."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - started)

    def figures(self) -> dict[str, float]:
        """The parts, "other" and the "total" so far, rounded to milliseconds."""
        total = time.perf_counter() - self.started
        return {name: round(seconds, 3) for name, seconds in
                {**self.parts, "other": max(total - sum(self.parts.values()), 0.0),
                "total": total}.items()}

    def line(self) -> str:
        """The account in one line: "Time: imports 2.9 s, data 0.4 s, ..., other 0.2 s; total 19.8
        s"."""
        figures = self.figures()
        total = figures.pop("total")
        return "Time: " + ", ".join(f"{name} {seconds:.1f} s" for name,
            seconds in figures.items()) + \
            f"; total {total:.1f} s"


# --------------------------------------------------------------------------- seeding and devices


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(local_rank: int = 0) -> torch.device:
    """The accelerator when there is one (CUDA, this process's GPU under torchrun; Apple's MPS;
    others torch.accelerator knows), else the CPU."""
    if not torch.accelerator.is_available():
        return torch.device("cpu")
    device = torch.accelerator.current_accelerator()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def rng_state() -> dict[str, Any]:
    """Every random-number state a run draws from, in a form that loads with weights_only=True."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
        position,
                                                     has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- files


def _read_umask() -> int:
    """The process's umask (os.umask can only read it by setting it, so set it back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What open() gives a new file under the umask (-rw-r--r-- under 022), read once at import while no
# other thread creates files; mkstemp's temporary files are 0o600 whatever the umask.
FILE_MODE = 0o666 & ~_read_umask()


# tests: called with each path atomic_write is about to write,
write_fault: Callable[[str], None] | None = None
# raising OSError (ENOSPC, EIO, EROFS) as a full, failing or read-only disk would


class FileError(OSError):
    """An OSError whose text is its message alone (no "[Errno 28]"), for one line to the user."""

    def __str__(self) -> str:
        return self.strerror


class WriteFailed(FileError):
    """A file could not be written: the one line says which, in which folder, why, and (a full disk)
    how much room there is against what it needs."""

    def __init__(self, path: str, error: OSError, needed: int | None = None):
        folder, name = os.path.split(os.path.abspath(path))
        reason = error.strerror or str(error)
        reason = reason[:1].lower() + reason[1:]  # "no space left on device"; paths as they are
        if error.errno == errno.ENOSPC:
            reason += f" ({megabytes(free_bytes(folder))} free" + (
                f"; {name} needs about {megabytes(needed)})"
                                                                  if needed else ")")
        super().__init__(error.errno, f"could not write {name} in {folder}: {reason}")
        self.name = name


def megabytes(n: int) -> str:
    """A byte count for a message: "12 MB", "0.3 MB"."""
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**20:.1f} MB"


def free_bytes(folder: str) -> int:
    """The free space of the file system that holds folder (or, when it does not exist yet, its
    nearest parent)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def atomic_write(path: str, write: Callable[[Any], None], needed: int | None = None) -> None:
    """Write a file through a temporary file in the same folder and os.replace, so a crash or a
    power cut at any moment leaves either the old file or the new one, never half of one. The file
    gets the umask's mode, as open() would give it. Any failure to write raises WriteFailed (needed:
    the bytes the file takes, for its message)."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        if write_fault is not None:
            write_fault(path)
        problem = not_a_plain_file(path)
        if problem:  # os.replace would replace a link, not its target; but a link is not this file
            raise WriteFailed(path, OSError(errno.EEXIST, problem))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
            os.chmod(tmp, FILE_MODE)
            f.flush()
            os.fsync(f.fileno())  # the data is on the disk before the name points at it
        os.replace(tmp, path)
        fsync_folder(folder)  # and so is the new name
    except WriteFailed:
        raise
    except OSError as error:
        raise WriteFailed(path, error, needed) from None
    except RuntimeError as error:  # torch.save reports a short write as its own error
        raise WriteFailed(path, OSError(errno.EIO, str(error).splitlines()[0]), needed) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def not_a_plain_file(path: str) -> str | None:
    """Why path may not be replaced or moved as one of a run's files, in words: "PATH is a symbolic
    link to /etc/passwd, not a file of a run; ..." (or a folder, a FIFO, ...); None when it is a
    regular file or absent. Looked at with lstat: a link is never followed."""
    kind = _what_is(path)
    if kind in (None, "a file"):
        return None
    return f"{path} is {kind}, not a file of a run; remove it, or choose another OUTPUT_DIR"


def not_a_plain_folder(path: str) -> str | None:
    """Why path may not hold a run's files (previous/, tensorboard/), in words; None when it is a
    folder (not a link to one) or absent."""
    kind = _what_is(path)
    if kind in (None, "a folder"):
        return None
    return f"{path} is {kind}, not a folder of a run; remove it, or choose another OUTPUT_DIR"


def _what_is(path: str) -> str | None:
    """What path is, by lstat (a link is not followed): "a file", "a folder", "a symbolic link to
    TARGET", "a FIFO", ...; None when there is nothing there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    kinds = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((kind for test, kind in kinds if test(mode)), "of another kind")


def fsync_folder(folder: str) -> None:
    """Make the renames in folder survive a power cut (POSIX; Windows cannot open a folder, nor
    needs to)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # EINVAL: a file system that cannot sync folders; nothing more to do
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def save_torch(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), needed=tensor_bytes(obj))


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in obj (dicts, lists and tuples searched): about what torch.save
    writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(tensor_bytes, obj))
    return 0


def load_torch(path: str, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only; a file that carries
    other pickled objects (code that would run on load) is refused, never executed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{what} {path} holds pickled objects other than tensors (code could run "
                                  "on load), so it was refused and nothing in it ran; use only "
                                  "weights "
                                  f"saved by this pipeline or another source you trust") from None
        raise CheckpointError(f"{what} {path} is not a PyTorch checkpoint ({error})") from None
    # the restricted unpickler fails in many ways on foreign bytes; all mean "not ours"
    except Exception as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{what} {path} is truncated or not a PyTorch checkpoint ({detail})") from None


def load_state_dict(path: str, what: str = "WEIGHTS") -> dict[str, torch.Tensor]:
    """A model state dict (names to tensors, as best_model.pth holds) from a file, loaded safely."""
    state = load_torch(path, what)
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{what} {path} is not a model state dict (best_model.pth holds one)")
    return state


def write_metrics(history: list[dict[str, Any]], path: str) -> None:
    """Write training_metrics.csv (one row per epoch so far), atomically."""
    frame = spreadsheet_safe(pd.DataFrame(history, columns=CSV_COLUMNS))
    atomic_write(path, lambda f: frame.to_csv(f, index=False))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a cell that starts so runs as a formula (OWASP)


def safe_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will show, never run: text that starts as a formula
    (FORMULA_STARTS, as a file or class named "=HYPERLINK(...)" does) gets a leading ', as OWASP's
    CSV injection advice says; the rest as it is."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with each text cell made safe (safe_cell); numbers stay numbers."""
    text = [column for column in frame.columns if pd.api.types.is_object_dtype(frame[column]) or
            pd.api.types.is_string_dtype(frame[column])]
    return frame.assign(**{column: frame[column].map(safe_cell) for column in text})


def check_writable(folder: str) -> None:
    """Fail now, not after an epoch of training, when outputs cannot be written to folder. Creates
    nothing: a folder not there yet is checked through the nearest one that is."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        if os.path.islink(existing):  # makedirs would fail on it later: "[Errno 17] File exists"
            where = "" if existing == os.path.abspath(folder) else f"inside {existing}, "
            raise OSError(f"OUTPUT_DIR {folder} is {where}a symbolic link to "
                          f"{os.readlink(existing)}, which does not exist; make that folder, or "
                          f"choose another OUTPUT_DIR")
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(f"OUTPUT_DIR {folder} is not writable ({error.strerror}); choose another "
                      "OUTPUT_DIR") \
            from None


# --------------------------------------------------------------------------- the output folder's
# lock


class FolderInUse(OSError):
    """OUTPUT_DIR is locked by another run that is still going."""


# folder (its real path) -> the descriptor whose flock this process holds
_locks: dict[str, int] = {}


def check_unlocked(folder: str, main_process: bool = True) -> None:
    """Refuse now, before the data and model load, when another live run holds folder's lock (the
    lock itself is taken by lock_folder, later), or (ValueError) when folder/.lock is a link or not
    a plain file. Creates nothing. Under torchrun rank 0 looks, and every process raises with it."""
    error, unsafe = None, None
    path = os.path.join(folder, LOCK_FILE)
    if main_process and fcntl and os.path.realpath(folder) not in _locks and os.path.lexists(path):
        fd, unsafe = _open_lock(path, os.O_RDONLY)
        if fd is not None:
            try:  # shared: meets a holder's, and NFS allows it read-only
                error = _try_flock(fd, folder, fcntl.LOCK_SH)
            finally:
                os.close(fd)  # which drops the shared lock
    error, unsafe = broadcast((error, unsafe))
    if unsafe:
        raise ValueError(unsafe)
    if error:
        raise FolderInUse(error)


def lock_folder(folder: str, main_process: bool = True) -> None:
    """Hold an flock on folder/.lock (which then holds this process's id) until unlock_folder or the
    end of the process, however it ends: the operating system drops the lock with the process, so a
    run killed with kill -9 never blocks the next. Raises FolderInUse, naming the holder, when
    another run holds it. Under torchrun only rank 0 locks, and every process raises with it.
    ValueError when .lock is a link or not a plain file (what it points at would be overwritten)."""
    error, unsafe, key = None, None, os.path.realpath(folder)
    if main_process and fcntl and key not in _locks:
        fd, unsafe = _open_lock(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT)
        if fd is not None:
            error = _try_flock(fd, folder, fcntl.LOCK_EX)
            if error:
                os.close(fd)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                _locks[key] = fd
    error, unsafe = broadcast((error, unsafe))
    if unsafe:
        raise ValueError(unsafe)
    if error:
        raise FolderInUse(error)


def _open_lock(path: str, flags: int) -> tuple[int | None, str | None]:
    """Open a .lock without following a link (O_NOFOLLOW) or waiting on a FIFO (O_NONBLOCK): (its
    descriptor, None), or (None, why not) when it is a link, not a regular file, or one with another
    name (a hard link): lock_folder truncates it and writes into it, which must reach no other
    file."""
    problem = not_a_plain_file(path)
    if problem is None:
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENXIO):  # a link or a FIFO put there since
                raise
            problem = not_a_plain_file(path) or f"{path} changed while it was opened"
        else:
            status = os.fstat(fd)
            if stat.S_ISREG(status.st_mode) and status.st_nlink <= 1:
                return fd, None
            os.close(fd)
            problem = not_a_plain_file(path) or (
                f"{path} has {status.st_nlink} names (a hard link to another file); remove it, or "
                f"choose another OUTPUT_DIR")
    return None, problem


def unlock_folder(folder: str) -> None:
    """Let go of folder's lock, when this process holds it. The file stays: removing it would let a
    run that opened it a moment before lock a file no longer there while a third locks a new one."""
    fd = _locks.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


def _try_flock(fd: int, folder: str, kind: int) -> str | None:
    """flock fd without waiting; None when it is ours, else the message naming the process that
    holds it."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        return (f"OUTPUT_DIR {folder} is in use by another run (process {holder}); wait for it to "
                "end, "
                f"or choose another OUTPUT_DIR")


def _forget_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so that a run
    killed with kill -9 does not stay locked while its workers linger. Closing a copy never unlocks
    the parent."""
    for fd in _locks.values():
        os.close(fd)
    _locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


# ------------------------------------------------------------------ signals and worker processes


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """In the block SIGTERM raises Terminated, as Ctrl-C raises KeyboardInterrupt, wherever the run
    is; the handler before comes back after. Outside the main thread (no signals there): nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def interrupt_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status of a run stopped by Ctrl-C (130) or SIGTERM (143), as a shell gives it."""
    return 143 if isinstance(interrupt, Terminated) else 130


class WorkerDied(RuntimeError):
    """A worker process ended unasked (the out-of-memory killer, most often): a message for the
    user."""


PR_SET_PDEATHSIG = 1  # prctl(2)'s option: the signal the kernel sends when the parent ends


def become_worker(parent: int, worker_id: int | None = None) -> None:
    """Called first in a new worker process of parent (a DataLoader's worker_init_fn, parent bound):
    Ctrl-C, which a terminal sends to every process of the run, is left to the parent, which stops
    the workers; and on Linux the worker is killed when its parent dies (kill -9 too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the checks below and EOFs
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the kernel was told
        os._exit(1)


def worker_death(pid: int | None, exitcode: int | None, doing: str) -> WorkerDied:
    """The error for a worker process that ended unasked while `doing` ("decoding x.jpg"): how it
    ended, the likely cause and the fix (the caller says what then). The out-of-memory killer sends
    SIGKILL; SIGSEGV is a crash in a decoder, SIGBUS a memory-mapped file cut short (full disk); an
    exit status of its own, an error in the worker, which --num-workers 0 shows where it happens."""
    how, cause = "ended", "most likely the system ran out of memory; free some memory or lower " \
        "--num-workers (NUM_WORKERS)"
    if exitcode in (-signal.SIGSEGV, -signal.SIGBUS):
        cause = "a crash in the image decoder, or a full disk under a memory-mapped file; check " \
            "the file and the disk"
    elif exitcode is not None and exitcode > 0:
        how, cause = f"exited with status {exitcode}", "an error in the worker; see it with " \
            "--num-workers 0"
    elif exitcode is not None and exitcode < 0 and exitcode != -signal.SIGKILL:
        cause = "a signal from outside the run"
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            how = f"was killed by {signal.Signals(-exitcode).name}"
    which = f" (process {pid})" if pid is not None else ""
    return WorkerDied(f"a worker process{which} {how} while {doing}: {cause}")


def sigchld_default() -> None:
    """Call after starting a DataLoader's workers (iter(loader)). torch's SIGCHLD handler raises
    when one dies, wherever the main thread then is (amid an error message, a plot, another loader's
    shutdown: a traceback); with the default back, the loader itself raises where it is read, within
    MP_STATUS_CHECK_INTERVAL (5 s) of the death."""
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


_DATALOADER_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? (\d+)[\d, ]*\) "
                               r"(?:is killed by signal: ([^.]+)|exited unexpectedly"
                               r"(?: with exit code (-?\d+))?)")  # torch's words


def worker_died(error: BaseException, doing: str) -> WorkerDied | None:
    """What a DataLoader raises where it is read when one of its workers died, as WorkerDied:
    torch's RuntimeError, or the ConnectionError of fetching a batch's shared memory from the dead
    worker; None for any other error."""
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


# --------------------------------------------------------------------------- processes (torchrun)


def init_distributed() -> tuple[int, int, int]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world size, local
    rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, local_rank


def close_distributed() -> None:
    """Leave the torchrun process group (exiting without this can abort in gloo's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of several under torchrun."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over every process (the tensor itself when alone)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather(obj: Any) -> list[Any]:
    """Every process's obj, in rank order ([obj] when alone)."""
    if not is_distributed():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every process (obj itself when alone)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


def in_background(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items, made in a thread of their own at most `depth` ahead of the consumer, so that
    making them (reading files, copying to the device) overlaps using them. An error raised there is
    raised here; a consumer that stops early (closing the generator) stops the thread."""
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
