"""The decoded-image cache: a folder's images decoded once into a memory-mapped uint8 file that later runs open.

A cache is two files in the cache folder, named by a key of (the stored size, the image files' paths, sizes and
modification times), so a changed folder or size finds no cache and builds a new one:

    <size>px-<key>.npy   uint8 (N, size, size, 3), row i the i-th file; numpy's .npy, opened with mmap
    <size>px-<key>.json  the index: format, key, root, size, count, bytes (the .npy's length), the
                         failed rows with their messages
    <size>px-<key>.statistics.json  per-channel statistics of sets of rows, by a hash of the rows (remembered)

Both are written to temporary files in the same folder and moved into place (os.replace), the .npy first: the
index is the completion marker, and its byte count catches a truncated .npy. Whatever does not check out is
rebuilt, never trusted. Builders of the same cache take turns under an flock, so the second finds the first's.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

import utils

try:
    import fcntl
except ImportError:  # Windows has no flock: concurrent builders each write, and the last complete one stays
    fcntl = None

FORMAT = 2  # raise it when the stored pixels or the layout change: older caches are then rebuilt
# (2: failed rows kept with their messages; images other than JPEGs resized before to_rgb)
PROJECT = "lra-pipeline"  # the per-user cache folder's name, under $XDG_CACHE_HOME or ~/.cache


class CacheError(OSError):
    """The cache cannot be written (a read-only folder, a full disk): a message for the user."""


@dataclass
class Cache:
    """A folder's decoded images, memory-mapped: pages are read from the file as rows are used."""

    images: torch.Tensor  # uint8 (N, size, size, 3): row i is paths[i]; never written (copy-on-write mapping)
    failed: list[tuple[int, str]]  # rows whose files could not be read (left black), and why
    path: str  # the .npy file
    built: bool  # decoded by this call (False: opened as a later run finds it)


def default_cache_dir() -> str:
    """The per-user cache folder (CACHE_DIR "auto"), where pip and torchvision keep theirs:
    $XDG_CACHE_HOME/lra-pipeline, else ~/.cache/lra-pipeline. The environment is read at each call."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG spec says to ignore it
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, PROJECT)


def open_or_build(paths: list[str], size: int, cache_dir: str, root: str,
                  fill: Callable[[np.memmap], list[tuple[int, str]]]) -> Cache:
    """The cache of these image files at this size: opened when a valid one is in cache_dir, else
    built by fill(images), which decodes paths[i] into images[i] and returns the rows it could not
    read, each with a message (kept in the index, for later runs to tell): images is the new .npy
    file's np.memmap (uint8 (N, size, size, 3)), which worker processes can open by its filename.
    Paths are keyed relative to root, so a moved folder keeps its cache. Raises CacheError when a
    cache is needed and cannot be written."""
    base = os.path.join(cache_dir, f"{size}px-{cache_key(paths, size, root)}")
    cache = _open(base, len(paths), size)
    if cache is not None:
        return cache
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with _locked(base + ".lock"):
            cache = _open(base, len(paths), size)  # built by another process while this one waited
            if cache is None:
                cache = _build(base, len(paths), size, os.path.abspath(root), fill)
    except OSError as error:
        if isinstance(error, CacheError):
            raise
        raise CacheError(f"cannot write the decoded-image cache in {cache_dir} ({error.strerror or error})") \
            from None
    return cache


def cache_key(paths: list[str], size: int, root: str) -> str:
    """A hash of the format, the size and every file's path (relative to root), size and
    modification time; a name that is not UTF-8 (os.fsdecode's surrogates) as its bytes."""
    entries, prefix = [], os.path.join(os.path.abspath(root), "")
    for path in paths:
        status, absolute = os.stat(path), os.path.abspath(path)
        relative = absolute[len(prefix):] if absolute.startswith(prefix) else os.path.relpath(absolute, prefix)
        entries.append([relative, status.st_size, status.st_mtime_ns])  # relpath's answer, a tenth of its time
    text = json.dumps([FORMAT, size, entries], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _open(base: str, count: int, size: int) -> Cache | None:
    """The cache at base when its index and its .npy are complete and agree; None otherwise."""
    try:
        with open(base + ".json", encoding="utf-8") as f:
            index = json.load(f)
        expected = dict(format=FORMAT, key=os.path.basename(base).split("-", 1)[1], size=size, count=count)
        if any(index.get(name) != value for name, value in expected.items()):
            return None
        if os.path.getsize(base + ".npy") != index["bytes"]:  # truncated, or another build's half
            return None
        images = np.load(base + ".npy", mmap_mode="c")  # copy-on-write: writable for torch, never written back
        failed = [(int(row), str(message)) for row, message in index["failed"]]
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable, or not what this format writes
        return None
    if images.shape != (count, size, size, 3) or images.dtype != np.uint8:
        return None
    return Cache(torch.from_numpy(images), failed, base + ".npy", built=False)


def _build(base: str, count: int, size: int, root: str,
           fill: Callable[[np.memmap], list[tuple[int, str]]]) -> Cache:
    """Decode into a temporary .npy, move it into place, then write the index that marks it complete."""
    folder, name = os.path.split(base)
    if fcntl is not None:  # under the lock no other build of this cache is live: these are killed builds'
        for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.*.tmp")):
            os.remove(stale)
    needed = count * size * size * 3 + 4096
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"the decoded-image cache needs {needed / 2**30:.2f} GiB in {folder}, which has "
                         f"{free / 2**30:.2f} GiB free")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npy.tmp", dir=folder)
    try:
        os.close(fd)
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
        _claim_space(tmp)
        failed = sorted(fill(images))
        images.flush()
        del images
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, utils.FILE_MODE)
        os.replace(tmp, base + ".npy")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    index = dict(format=FORMAT, key=name.split("-", 1)[1], root=root, size=size, count=count,
                 bytes=os.path.getsize(base + ".npy"), failed=failed)
    utils.atomic_write(base + ".json", lambda f: f.write(json.dumps(index).encode()))
    _remove_superseded(base, root, size)
    cache = _open(base, count, size)
    assert cache is not None, f"the cache just written at {base} does not open"
    return Cache(cache.images, cache.failed, cache.path, built=True)


def remembered(cache_file: str, rows: torch.Tensor,
               compute: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]]) -> tuple[tuple, tuple]:
    """compute()'s per-channel (mean, std) of these rows of the cache, kept beside it (its .statistics.json,
    by a hash of the rows) so that a later run on the same rows reads two lines instead of the rows' pixels.
    A file that cannot be read or written is only a missed memo: computed, as without it."""
    path = cache_file[:-len(".npy")] + ".statistics.json"
    key = hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()[:24]
    known = {}
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
        mean, std = known[key]
        return tuple(map(float, mean)), tuple(map(float, std))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, these rows not in it, or not what it writes
        known = known if isinstance(known, dict) else {}
    mean, std = compute()
    with contextlib.suppress(OSError):
        utils.atomic_write(path, lambda f: f.write(json.dumps({**known, key: [mean, std]}).encode()))
    return mean, std


def _claim_space(path: str) -> None:
    """Allocate the file's blocks now: a disk that fills up under a memory map kills the process (SIGBUS)
    instead of raising. File systems that cannot allocate ahead are left as they are."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _remove_superseded(base: str, root: str, size: int) -> None:
    """Delete this folder's older caches of the same size (the files changed since): they would never be
    opened again. Other sizes stay, for runs at another IMAGE_SIZE."""
    for index_path in glob.glob(os.path.join(os.path.dirname(base), f"{size}px-*.json")):
        other = index_path[:-len(".json")]
        if other == base:
            continue
        try:
            with open(index_path, encoding="utf-8") as f:
                if json.load(f).get("root") != root:
                    continue
        except (OSError, ValueError):
            continue
        for suffix in (".json", ".npy", ".lock", ".statistics.json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(other + suffix)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on path for the block: a second builder of the same cache waits, then opens it."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, utils.FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
