"""Writing the run's files safely: atomic writes, one-line disk errors, links refused, the lock."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from typing import Any, Callable

import distributed_module

try:
    import fcntl
# Windows has no flock: runs there take no lock on their folder, and nothing fails
except ImportError:
    fcntl = None

LOCK_FILE = ".lock"  # in OUTPUT_DIR: flock'ed by the run writing there, and holding its process id


def _read_umask() -> int:
    """The process's umask (os.umask can only read it by setting it, so set it back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What open() gives a new file under the umask (-rw-r--r-- under 022), read once at import while no
# other thread creates files; mkstemp's temporary files are 0o600 whatever the umask.
FILE_MODE = 0o666 & ~_read_umask()


# tests only: called on each path atomic_write writes, to raise OSError (ENOSPC, EIO, EROFS) as a
# full, failing or read-only disk would
write_fault: Callable[[str], None] | None = None


class FileError(OSError):
    """An OSError whose text is its message alone (no "[Errno 28]"), for one line to the user."""

    def __str__(self) -> str:
        return self.strerror


class WriteFailed(FileError):
    """A failed write in one line: which file, folder, why, and on a full disk free vs needed."""

    def __init__(self, path: str, error: OSError, needed: int | None = None):
        folder, name = os.path.split(os.path.abspath(path))
        reason = error.strerror or str(error)
        reason = reason[:1].lower() + reason[1:]  # "no space left on device"; paths as they are
        if error.errno == errno.ENOSPC:
            reason += f" ({megabytes(free_bytes(folder))} free" + (
                f"; {name} needs about {megabytes(needed)})" if needed else ")")
        super().__init__(error.errno, f"could not write {name} in {folder}: {reason}")
        self.name = name


def megabytes(n: int) -> str:
    """A byte count for a message: "12 MB", "0.3 MB"."""
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**20:.1f} MB"


def free_bytes(folder: str) -> int:
    """Free space of the file system holding folder (or its nearest existing parent)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def atomic_write(path: str, write: Callable[[Any], None], needed: int | None = None) -> None:
    """Write via a temp file in the same folder and os.replace: a crash leaves the old file or the
    new, never half. The file gets the umask's mode, as open() gives; any failure raises
    WriteFailed (needed: the file's size in bytes, for its message)."""
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


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
    """obj as a JSON file, written as atomic_write writes."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def not_a_plain_file(path: str) -> str | None:
    """Why path may not be replaced as a run's file ("PATH is a symbolic link to ..., not a file of
    a run; ..."); None when a regular file or absent. By lstat: a link is never followed."""
    kind = _what_is(path)
    if kind in (None, "a file"):
        return None
    return f"{path} is {kind}, not a file of a run; remove it, or choose another OUTPUT_DIR"


def not_a_plain_folder(path: str) -> str | None:
    """Why path can't hold a run's files (previous/, tensorboard/); None when it is a real folder
    (not a link to one) or absent."""
    kind = _what_is(path)
    if kind in (None, "a folder"):
        return None
    return f"{path} is {kind}, not a folder of a run; remove it, or choose another OUTPUT_DIR"


def _what_is(path: str) -> str | None:
    """What path is by lstat: "a file", "a folder", "a symbolic link to T", ...; None if absent."""
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
    """Make folder's renames survive a power cut (POSIX; Windows can't open a folder, nor needs)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: a file system that cannot sync folders
            raise
    finally:
        os.close(fd)


def check_writable(folder: str) -> None:
    """Fail now, not after an epoch, if folder is unwritable. Creates nothing: a folder not there
    yet is checked through its nearest existing parent."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        if os.path.islink(existing):  # makedirs would fail on it later: "[Errno 17] File exists"
            where = "" if existing == os.path.abspath(folder) else f"inside {existing}, "
            raise OSError(
                f"OUTPUT_DIR {folder} is {where}a symbolic link to {os.readlink(existing)}, "
                "which does not exist; make that folder, or choose another OUTPUT_DIR")
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(f"OUTPUT_DIR {folder} is not writable ({error.strerror}); "
                      "choose another OUTPUT_DIR") from None


# ------------------------------------------------------------------------- the output folder's lock


class FolderInUse(OSError):
    """OUTPUT_DIR is locked by another run that is still going."""


_locks: dict[str, int] = {}  # a folder's real path -> the descriptor whose flock this process holds


def check_unlocked(folder: str, main_process: bool = True) -> None:
    """Refuse before the data loads when a live run holds folder's lock (lock_folder takes it
    later), or (ValueError) .lock is not a plain file. Creates nothing. Under torchrun rank 0 looks,
    and every process raises what it finds."""
    error, unsafe = None, None
    path = os.path.join(folder, LOCK_FILE)
    if main_process and fcntl and os.path.realpath(folder) not in _locks and os.path.lexists(path):
        fd, unsafe = _open_lock(path, os.O_RDONLY)
        if fd is not None:
            try:  # shared: meets a holder's, and NFS allows it read-only
                error = _try_flock(fd, folder, fcntl.LOCK_SH)
            finally:
                os.close(fd)  # which drops the shared lock
    error, unsafe = distributed_module.broadcast((error, unsafe))
    if unsafe:
        raise ValueError(unsafe)
    if error:
        raise FolderInUse(error)


def lock_folder(folder: str, main_process: bool = True) -> None:
    """Hold an flock on folder/.lock (the file holds this process's id) until unlock_folder or the
    process ends: the OS drops it with the process, so a kill -9 never blocks the next run.
    FolderInUse names a live holder (under torchrun rank 0 locks and every process raises);
    ValueError when .lock is not a plain file (what it points at would be overwritten)."""
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
    error, unsafe = distributed_module.broadcast((error, unsafe))
    if unsafe:
        raise ValueError(unsafe)
    if error:
        raise FolderInUse(error)


def _open_lock(path: str, flags: int) -> tuple[int | None, str | None]:
    """Open a .lock with O_NOFOLLOW|O_NONBLOCK (no link followed, no FIFO waited on): (descriptor,
    None), or (None, why) for a link, non-file or hard link: lock_folder's writes must reach no
    other file."""
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
                f"{path} has {status.st_nlink} names (a hard link to another file); "
                "remove it, or choose another OUTPUT_DIR")
    return None, problem


def unlock_folder(folder: str) -> None:
    """Release folder's lock if held. The file stays: removing it would let a run that had just
    opened it lock a deleted file while another run locks a new one."""
    fd = _locks.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


def _try_flock(fd: int, folder: str, kind: int) -> str | None:
    """flock fd without waiting: None once this process holds it, else a message naming who does."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        return (f"OUTPUT_DIR {folder} is in use by another run (process {holder}); "
                "wait for it to end, or choose another OUTPUT_DIR")


def _forget_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so workers
    that linger never keep a run killed with kill -9 locked. Closing a copy never unlocks the
    parent."""
    for fd in _locks.values():
        os.close(fd)
    _locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)
