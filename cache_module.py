"""The decoded-image cache: a folder's images decoded once into a memory-mapped file for later runs.

Its files are named by a key of (the stored size, the image files' paths, sizes and mtimes), so a
changed folder or size finds no cache and builds a new one:

    <size>px-<key>.npy   uint8 (N, size, size, 3), row i the i-th file; numpy's .npy, mmap'ed
    <size>px-<key>.json  the index: format, key, root, size, count, bytes (the .npy's length), the
                         failed rows with their messages
    <size>px-<key>.statistics.json  per-channel statistics of sets of rows, by their hash

Each is written to a temporary file and moved into place (os.replace), .npy first: the index marks
completion, its byte count catching a truncated .npy; what does not check out is rebuilt. Builders
of one cache take turns under an flock (<size>px-<key>.lock), so the second finds the first's; a
killed build's leftovers (temporary files, a .npy without its index) are removed by a later run once
no process holds that cache's lock."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

import files_module

try:
    import fcntl
# Windows has no flock: concurrent builders each write, and the last complete one stays
except ImportError:
    fcntl = None

FORMAT = 2  # raise it when the stored pixels or the layout change: older caches are then rebuilt
# (2: failed rows kept with their messages; images other than JPEGs resized before to_rgb)
PROJECT = "lra-pipeline"  # the per-user cache folder's name, under $XDG_CACHE_HOME or ~/.cache


class CacheError(OSError):
    """The cache cannot be written (a read-only folder, a full disk): a message for the user."""


@dataclass
class Cache:
    """A folder's decoded images, memory-mapped: pages are read from the file as rows are used."""

    # uint8 (N, size, size, 3): row i is paths[i]; never written (copy-on-write mapping)
    images: torch.Tensor
    failed: list[tuple[int, str]]  # rows whose files could not be read (left black), and why
    path: str  # the .npy file
    built: bool  # decoded by this call (False: opened as a later run finds it)


def default_cache_dir() -> str:
    """The per-user cache folder (CACHE_DIR "auto"), where pip and torchvision keep theirs:
    $XDG_CACHE_HOME/lra-pipeline, else ~/.cache/lra-pipeline; the environment read at each call."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG spec says to ignore it
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, PROJECT)


def open_or_build(paths: list[str], size: int, cache_dir: str, root: str,
                  fill: Callable[[np.memmap], list[tuple[int, str]]]) -> Cache:
    """The cache of these files at this size: opened if a valid one is in cache_dir, else built by
    fill(images), which decodes paths[i] into images[i] (the new .npy's np.memmap, which workers
    open by filename) and returns unreadable rows with messages, kept for later runs. Keyed relative
    to root, so a moved folder keeps its cache. CacheError when it cannot be written."""
    base = os.path.join(cache_dir, f"{size}px-{cache_key(paths, size, root)}")
    _remove_leftovers(cache_dir)
    cache, damage = _open(base, len(paths), size)
    if cache is not None:
        return cache
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with _locked(base + ".lock", waiting=f"building the decoded-image cache {base}.npy"):
            cache, damage = _open(base, len(paths), size)  # built by another process meanwhile?
            if cache is None:
                if damage:
                    print(f"warning: the decoded-image cache {base}.npy is damaged ({damage}); "
                          "rebuilding it", file=sys.stderr)
                cache = _build(base, len(paths), size, os.path.abspath(root), fill)
    except OSError as error:
        if isinstance(error, CacheError):
            raise
        raise CacheError(f"cannot write the decoded-image cache in {cache_dir} "
                         f"({error.strerror or error})") from None
    return cache


def cache_key(paths: list[str], size: int, root: str) -> str:
    """A hash of the format, the size and every file's path (relative to root), size and
    modification time; a name that is not UTF-8 (os.fsdecode's surrogates) as its bytes."""
    entries, prefix = [], os.path.join(os.path.abspath(root), "")
    for path in paths:
        status, absolute = os.stat(path), os.path.abspath(path)
        relative = (absolute[len(prefix):] if absolute.startswith(prefix)
                    else os.path.relpath(absolute, prefix))
        # relpath's answer, a tenth of its time
        entries.append([relative, status.st_size, status.st_mtime_ns])
    text = json.dumps([FORMAT, size, entries], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _open(base: str, count: int, size: int) -> tuple[Cache | None, str | None]:
    """The cache at base when its index and its .npy are complete and agree, else None and what is
    wrong with what is there (None when nothing is: no index yet, or one of an older FORMAT)."""
    try:
        with open(base + ".json", encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:  # unreadable, or not JSON
        return None, f"its index does not read: {error}"
    if isinstance(index, dict) and type(index.get("format")) is int and index["format"] < FORMAT:
        return None, None  # written by an older version: rebuilt, as expected
    problem = _index_problem(index, os.path.basename(base).split("-", 1)[1], count, size)
    if problem:
        return None, problem
    try:
        length = os.path.getsize(base + ".npy")
        if length != index["bytes"]:  # truncated, or another build's half
            return None, f"its .npy has {length} bytes where the index says {index['bytes']}"
        images = np.load(base + ".npy", mmap_mode="c")  # copy-on-write: never written back
    except (OSError, ValueError) as error:  # missing, unreadable, or not a .npy
        return None, f"its .npy does not read: {error}"
    shape = (count, size, size, 3)
    if images.shape != shape or images.dtype != np.uint8:
        return None, f"its .npy holds {images.dtype} {images.shape}, not uint8 {shape}"
    failed = [(row, message) for row, message in index["failed"]]
    return Cache(torch.from_numpy(images), failed, base + ".npy", built=False), None


def _index_problem(index, key: str, count: int, size: int) -> str | None:
    """What is wrong with an index read from JSON (as _build writes it for this key, count and
    size), or None."""
    if not isinstance(index, dict):
        return f"its index is a {type(index).__name__}, not an object"
    for name, value in dict(format=FORMAT, key=key, size=size, count=count).items():
        if index.get(name) != value:
            return f"its index has {name} {index.get(name)!r}, not {value!r}"
    if not isinstance(index.get("root"), str):
        return "its index has no root folder"
    if type(index.get("bytes")) is not int:
        return "its index has no byte count"
    failed = index.get("failed")
    if (not isinstance(failed, list) or any(
            not isinstance(entry, list) or len(entry) != 2 or type(entry[0]) is not int
            or not 0 <= entry[0] < count or not isinstance(entry[1], str) for entry in failed)
            or len({entry[0] for entry in failed}) != len(failed)):
        return (f"its index's failed rows are not distinct [row, message] pairs "
                f"with rows below {count}")
    return None


def _build(base: str, count: int, size: int, root: str,
           fill: Callable[[np.memmap], list[tuple[int, str]]]) -> Cache:
    """Decode into a temporary .npy, move it into place, then write the index that marks it done."""
    folder, name = os.path.split(base)
    if fcntl is not None:  # under the lock no other build is live: these are killed builds'
        for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.*.tmp")):
            os.remove(stale)
    with contextlib.suppress(FileNotFoundError):  # a killed build's, or a damaged one: its room
        os.remove(base + ".npy")  # is needed
    needed = count * size * size * 3 + 4096
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"the decoded-image cache needs {needed / 2**30:.2f} GiB in {folder}, "
                         f"which has {free / 2**30:.2f} GiB free")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npy.tmp", dir=folder)
    try:
        os.close(fd)
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(count, size, size, 3))
        _claim_space(tmp)
        failed = sorted(fill(images))
        images.flush()
        del images
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, files_module.FILE_MODE)
        os.replace(tmp, base + ".npy")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        index = dict(format=FORMAT, key=name.split("-", 1)[1], root=root, size=size, count=count,
                     bytes=os.path.getsize(base + ".npy"), failed=failed)
        files_module.write_json(base + ".json", index)
    except BaseException:  # a full disk, say: a .npy without its index is never opened, and would
        with contextlib.suppress(OSError):  # take the room that the next build needs
            os.remove(base + ".npy")
        raise
    _remove_superseded(base, root, size)
    cache, damage = _open(base, count, size)
    assert cache is not None, f"the cache just written at {base} does not open: {damage}"
    return Cache(cache.images, cache.failed, cache.path, built=True)


def remembered(
        cache_file: str, rows: torch.Tensor,
        compute: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]]) -> tuple[tuple, tuple]:
    """compute()'s per-channel (mean, std) of these cache rows, memoised in its .statistics.json by
    the rows' hash: a later run reads two lines, not the pixels. An unreadable or unwritable file is
    a missed memo; one holding what compute cannot give (not 3 channels, std 0, NaN) is recomputed,
    with a warning."""
    base = cache_file[:-len(".npy")]
    path = base + ".statistics.json"
    key = hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()[:24]
    known, damage = {}, None
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as error:  # unreadable, or not JSON
        damage = f"it does not read: {error}"
    if not isinstance(known, dict):
        known, damage = {}, f"it holds a {type(known).__name__}, not an object"
    if key in known:
        damage = _statistics_problem(known[key])
        if damage is None:
            mean, std = known[key]
            return tuple(map(float, mean)), tuple(map(float, std))
    if damage:
        print(f"warning: the statistics remembered in {path} are damaged ({damage}); "
              "computing them anew", file=sys.stderr)
    mean, std = compute()
    memo = json.dumps({**known, key: [mean, std]}).encode()
    with contextlib.suppress(OSError), _locked(base + ".lock"):  # not amid a build's clean-up
        files_module.atomic_write(path, lambda f: f.write(memo))
    return mean, std


MIN_STD = 1e-3  # the smallest standard deviation source_module.channel_stats gives (a flat
# channel's), as normalisation divides by it: a memo's smaller one (0) would make a NaN loss


def _statistics_problem(entry) -> str | None:
    """What is wrong with a memo's [mean, std] as compute gives them (three channels, on the 0-1
    scale: a mean in [0, 1], a std in [MIN_STD, 1]), or None."""
    if not (isinstance(entry, list) and len(entry) == 2 and all(type(p) is list for p in entry)):
        return "not a mean and a standard deviation"
    mean, std = entry
    if len(mean) != 3 or len(std) != 3:
        return f"{len(mean)} and {len(std)} channels where the images have 3"
    if not all(type(value) in (int, float) and math.isfinite(value) for value in mean + std):
        return "a value that is not a finite number"
    if not all(0 <= value <= 1 for value in mean) or not all(MIN_STD <= v <= 1 for v in std):
        return f"mean {mean} or standard deviation {std} out of range for images scaled to 0-1"
    return None


def _claim_space(path: str) -> None:
    """Allocate the file's blocks now: a disk that fills up under a memory map kills the process
    (SIGBUS) instead of raising. File systems that cannot allocate ahead are left as they are."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _remove_superseded(base: str, root: str, size: int) -> None:
    """Delete this folder's older caches of this size and root (their files changed: never opened
    again). Other sizes stay, for runs at another IMAGE_SIZE, as do caches another process has
    locked."""
    folder = glob.escape(os.path.dirname(base))
    for index_path in glob.glob(os.path.join(folder, f"{size}px-*.json")):
        other = index_path[:-len(".json")]
        if other == base or other.endswith(".statistics"):
            continue
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if not isinstance(index, dict) or index.get("root") != root:
                continue
        except (OSError, ValueError):
            continue
        with _unless_locked(other + ".lock") as free:
            if free:
                for suffix in (".json", ".npy", ".statistics.json", ".lock"):
                    with contextlib.suppress(OSError):  # gone, or not ours to remove
                        os.remove(other + suffix)


_LEFTOVER = re.compile(r"\.(\d+px-[0-9a-f]+)\..+\.tmp|(\d+px-[0-9a-f]+)\.npy")  # temporary; .npy


def _remove_leftovers(folder: str) -> None:
    """Delete killed builds' and memo writes' leftovers in folder (temporaries, an index-less .npy)
    of caches whose lock no process holds (every build and memo write holds its cache's lock while
    such files exist). Without flock, nothing is deleted."""
    try:
        names = os.listdir(folder) if fcntl is not None else []
    except OSError:  # none yet, or unreadable: nothing to clean up
        return
    for name in names:
        match = _LEFTOVER.fullmatch(name)
        base = match and os.path.join(folder, match.group(1) or match.group(2))
        if not match or (name.endswith(".npy") and os.path.exists(base + ".json")):
            continue
        with _unless_locked(base + ".lock") as free:
            if free:
                with contextlib.suppress(OSError):  # gone meanwhile, or a folder we cannot write
                    os.remove(os.path.join(folder, name))


_held: set[int] = set()  # the descriptors of the cache locks this process holds


def _forget_locks() -> None:
    """In a forked child (a decoding worker): close the inherited lock descriptors. An flock belongs
    to the open file, which a fork shares: a worker left running after its parent's kill -9 would
    hold the lock, and later runs would wait for it. Closing a copy never unlocks the parent."""
    for fd in _held:
        os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


@contextlib.contextmanager
def _locked(path: str, waiting: str | None = None) -> Iterator[None]:
    """An exclusive flock on path for the block (a second builder waits, then opens the cache); the
    file holds the holder's process id. waiting: what the holder is doing, for a line saying this
    process waits for it (None: wait without a word)."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), files_module.FILE_MODE)
    _held.add(fd)
    try:
        quiet_until, held = time.monotonic() + LOCK_NOTE_AFTER, _try_flock(fd)
        while not held and time.monotonic() < quiet_until:
            time.sleep(0.01)
            held = _try_flock(fd)
        if not held:
            if waiting:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                print(f"note: waiting for another run (process {holder}), which is {waiting}",
                      file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _held.discard(fd)
        os.close(fd)  # closing releases the lock


LOCK_NOTE_AFTER = 0.5  # seconds a run waits for a cache's lock before it says so: _remove_leftovers
# holds another cache's lock for a moment, which is no wait worth a line


def _try_flock(fd: int) -> bool:
    """Whether this process now holds an exclusive flock on fd (taken without waiting)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def _unless_locked(path: str) -> Iterator[bool]:
    """Whether path's lock was free, holding it for the block when it was (no lock file: free)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        yield True
        return
    except OSError:  # unreadable (another user's): as if held, left alone
        yield False
        return
    _held.add(fd)
    try:
        yield _try_flock(fd)
    finally:
        _held.discard(fd)
        os.close(fd)
