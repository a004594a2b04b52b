"""The decoded-image cache: built once, opened after, rebuilt when the files or the size change or a
file of it is cut short, and one valid cache when two processes build it at once."""

import errno
import glob
import json
import multiprocessing
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cache_module
import decode_module
import files_module
import image_module
from cache_module import fcntl
from conftest import alive, REAL_DEFAULT_CACHE_DIR

needs_flock = pytest.mark.skipif(fcntl is None, reason="no flock (Windows): builds take no lock")


def write_files(folder, n=5):
    """n small files standing for images (the cache only stats them; fill 'decodes' them)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i}.jpg")
        with open(path, "wb") as f:
            f.write(bytes([i]) * (10 + i))
        paths.append(path)
    return paths


class Fill:
    """A stand-in decoder: row i is filled with the first byte of file i; files named bad* fail
    (with the message "bad"). Counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, out):
        self.calls += 1
        failed = []
        for i, path in enumerate(self.paths):
            if os.path.basename(path).startswith("bad"):
                failed.append((i, "bad"))
                continue
            with open(path, "rb") as f:
                out[i] = f.read(1)[0]
        return failed


def build(paths, cache_dir, root, size=4, fill=None):
    fill = fill or Fill()
    fill.paths = paths
    return cache_module.open_or_build(paths, size, str(cache_dir), root=str(root), fill=fill), fill


def cache_files(cache_dir):
    return sorted(os.listdir(cache_dir))


def test_the_cache_is_built_once_then_opened_without_decoding(tmp_path):
    paths = write_files(tmp_path / "images")
    first, fill = build(paths, tmp_path / "cache", tmp_path)
    assert first.built and fill.calls == 1 and first.failed == []
    assert first.images.shape == (5, 4, 4, 3) and first.images[:, 0, 0, 0].tolist() == [
        0, 1, 2, 3, 4]
    written = os.stat(first.path)
    again, fill = build(paths, tmp_path / "cache", tmp_path)
    assert not again.built and fill.calls == 0 and again.path == first.path
    assert torch.equal(again.images, first.images)
    assert os.stat(again.path).st_mtime_ns == written.st_mtime_ns and os.stat(
        again.path).st_ino == written.st_ino
    assert [name for name in cache_files(tmp_path / "cache")
            if name.endswith((".npy", ".json"))] == [os.path.basename(first.path)[:-4] + ".json",
                                                     os.path.basename(first.path)]


def test_unreadable_files_are_remembered_with_the_cache(tmp_path):
    paths = write_files(tmp_path / "images", 3)
    os.rename(paths[1], str(tmp_path / "images" / "bad.jpg"))
    paths[1] = str(tmp_path / "images" / "bad.jpg")
    assert build(paths, tmp_path / "cache", tmp_path)[0].failed == [(1, "bad")]
    cache, fill = build(paths, tmp_path / "cache", tmp_path)
    assert cache.failed == [(1, "bad")] and fill.calls == 0


@pytest.mark.parametrize("change", ["content", "mtime", "added", "removed", "size"])
def test_a_changed_folder_or_size_gets_a_new_cache_and_the_superseded_one_goes(tmp_path, change):
    paths = write_files(tmp_path / "images")
    old, _ = build(paths, tmp_path / "cache", tmp_path)
    size = 4
    if change == "content":
        with open(paths[2], "wb") as f:
            f.write(b"\x09" * 30)
    elif change == "mtime":  # same bytes, touched
        stat = os.stat(paths[2])
        os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "added":
        paths += write_files(tmp_path / "more", 1)
    elif change == "removed":
        os.remove(paths.pop())
    else:
        size = 6
    new, fill = build(paths, tmp_path / "cache", tmp_path, size=size)
    assert new.built and fill.calls == 1 and new.path != old.path
    assert new.images.shape == (len(paths), size, size, 3)
    if change == "content":
        assert new.images[2, 0, 0, 0] == 9
    # the old cache of the same folder and size can never be opened again: it is deleted; another
    # size stays
    assert os.path.exists(old.path) == (change == "size")
    assert len(glob.glob(str(tmp_path / "cache" / "*.npy"))) == (2 if change == "size" else 1)


def test_a_moved_folder_keeps_its_cache(tmp_path):
    paths = write_files(tmp_path / "a" / "images")
    build(paths, tmp_path / "cache", tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = [path.replace(os.sep + "a" + os.sep, os.sep + "b" + os.sep) for path in paths]
    assert not build(moved, tmp_path / "cache", tmp_path / "b")[0].built


def test_the_key_is_the_same_for_relative_and_absolute_paths_and_roots(tmp_path, monkeypatch):
    paths = write_files(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(path, tmp_path) for path in paths]
    key = cache_module.cache_key(paths, 4, str(tmp_path))
    assert cache_module.cache_key(relative, 4, ".") == key == cache_module.cache_key(
        relative, 4, str(tmp_path))
    # the relative paths differ
    assert cache_module.cache_key(paths, 4, str(tmp_path / "images")) != key


class Statistics:
    """A stand-in for channel statistics that counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_statistics_are_computed_once_per_set_of_rows_and_remembered_beside_the_cache(tmp_path):
    cache, _ = build(write_files(tmp_path / "images"), tmp_path / "cache", tmp_path)
    first = Statistics(((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)))
    assert cache_module.remembered(cache.path, torch.tensor([0, 2, 4]),
                                   first) == first.value and first.calls == 1
    again = Statistics(((9.0,) * 3, (9.0,) * 3))
    assert cache_module.remembered(cache.path, torch.tensor([0, 2, 4]),
                                   again) == first.value and again.calls == 0
    other = Statistics(((0.7,) * 3, (0.8,) * 3))  # other rows: computed, and both kept
    assert cache_module.remembered(cache.path, torch.tensor([0, 2, 3]),
                                   other) == other.value and other.calls == 1
    assert cache_module.remembered(cache.path, torch.tensor([0, 2, 4]),
                                   again) == first.value and again.calls == 0


@pytest.mark.parametrize("damage", ["garbage", "a list", "read-only folder"])
def test_a_memo_that_cannot_be_read_or_written_is_only_computed(tmp_path, damage):
    cache, _ = build(write_files(tmp_path / "images"), tmp_path / "cache", tmp_path)
    memo = cache.path[:-len(".npy")] + ".statistics.json"
    if damage == "read-only folder":
        os.chmod(tmp_path / "cache", 0o555)
        if os.access(tmp_path / "cache", os.W_OK):
            pytest.skip("running as a user that writes read-only folders")
    else:
        with open(memo, "w") as f:
            f.write("{not json" if damage == "garbage" else "[1, 2]")
    try:
        for calls in (1, 2):
            statistics = Statistics(((0.5,) * 3, (0.25,) * 3))
            assert cache_module.remembered(cache.path, torch.arange(3),
                                           statistics) == statistics.value
            assert statistics.calls == (1 if damage == "read-only folder" or calls == 1 else 0)
    finally:
        os.chmod(tmp_path / "cache", 0o755)


def test_two_folders_with_the_same_file_names_get_caches_of_their_own(tmp_path):
    first = write_files(tmp_path / "one" / "images")
    second = write_files(tmp_path / "two" / "images")  # the same names and sizes
    for path, twin in zip(first, second):
        with open(twin, "r+b") as f:
            f.write(b"\x09")  # other pixels
        stat = os.stat(path)
        os.utime(twin, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # written at another time
    one, _ = build(first, tmp_path / "cache", tmp_path / "one")
    two, fill = build(second, tmp_path / "cache", tmp_path / "two")
    assert fill.calls == 1 and two.path != one.path
    assert one.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] and two.images[:, 0, 0,
        0].tolist() == [9] * 5
    # the second did not replace the first
    again, fill = build(first, tmp_path / "cache", tmp_path / "one")
    assert fill.calls == 0 and again.path == one.path
    # a copy that keeps every file's name, size and time to the nanosecond (cp -a) is taken for the
    # same files, as a moved folder is
    for path, twin in zip(first, second):
        os.utime(twin, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))
    assert build(second, tmp_path / "cache", tmp_path / "two")[0].path == one.path


def test_the_default_cache_folder_is_the_users_own_read_from_the_environment_at_each_call(
        tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert REAL_DEFAULT_CACHE_DIR() == str(tmp_path / "xdg" / "lra-pipeline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # the XDG spec: a relative path is ignored
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert REAL_DEFAULT_CACHE_DIR() == str(tmp_path / "home" / ".cache" / "lra-pipeline")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert REAL_DEFAULT_CACHE_DIR() == str(tmp_path / "home" / ".cache" / "lra-pipeline")
    # naming it creates nothing
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("damage", ["truncated npy", "truncated index", "no index",
                                    "index of another size"])
def test_a_damaged_cache_is_rebuilt_never_trusted(tmp_path, damage):
    paths = write_files(tmp_path / "images")
    good, _ = build(paths, tmp_path / "cache", tmp_path)
    expected = good.images.clone()
    index = good.path[:-4] + ".json"
    del good
    if damage == "truncated npy":  # an interrupted copy of the cache folder, say
        with open(index[:-5] + ".npy", "r+b") as f:
            f.truncate(os.path.getsize(index[:-5] + ".npy") - 7)
    elif damage == "truncated index":
        with open(index, "r+b") as f:
            f.truncate(10)
    # killed after the .npy was moved into place, before the index was written
    elif damage == "no index":
        os.remove(index)
    else:
        with open(index) as f:
            fields = json.load(f)
        with open(index, "w") as f:
            json.dump({**fields, "size": 8}, f)
    cache, fill = build(paths, tmp_path / "cache", tmp_path)
    assert cache.built and fill.calls == 1 and torch.equal(cache.images, expected)
    assert not build(paths, tmp_path / "cache", tmp_path)[0].built


def test_a_failed_build_leaves_no_file_and_the_next_run_builds(tmp_path):
    paths = write_files(tmp_path / "images")

    def interrupted(out):
        out[0] = 7
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_module.open_or_build(paths, 4, str(tmp_path / "cache"), root=str(tmp_path),
                                   fill=interrupted)
    assert [name for name in cache_files(tmp_path / "cache") if not name.endswith(".lock")] == []
    assert build(paths, tmp_path / "cache", tmp_path)[0].built


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(tmp_path):
    paths = write_files(tmp_path / "images")
    key = cache_module.cache_key(paths, 4, str(tmp_path))
    os.makedirs(tmp_path / "cache")
    stale = tmp_path / "cache" / f".4px-{key}.abc123.npy.tmp"
    stale.write_bytes(b"half a cache")
    build(paths, tmp_path / "cache", tmp_path)
    assert not stale.exists()


def test_a_cache_folder_that_cannot_be_written_raises_cache_error(tmp_path):
    paths = write_files(tmp_path / "images")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(cache_module.CacheError, match="cannot write the decoded-image cache in"):
        build(paths, tmp_path / "a_file" / "cache", tmp_path)


def test_a_cache_larger_than_the_free_space_is_refused_before_decoding(tmp_path, monkeypatch):
    paths = write_files(tmp_path / "images")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda folder: type("Usage", (), {
        "free": 1000})())
    with pytest.raises(cache_module.CacheError,
                       match="needs 0.00 GiB in .*which has 0.00 GiB free"):
        build(paths, tmp_path / "cache", tmp_path, size=40)


def build_in_a_process(paths, cache_dir, lock, barrier, results):
    """One of two processes building the same cache of 64-px rows at once: row i is i + 1. Numpy
    only: torch's OpenMP threads, once started in the test process, do not survive a fork."""
    if not lock:
        # as on Windows: no lock, both decode, and os.replace leaves one whole cache
        cache_module.fcntl = None
    decoded = []

    def fill(out):
        decoded.append(True)
        for i in range(len(paths)):
            out[i] = i + 1
            time.sleep(0.02)  # slow enough that the two builds overlap
        return []

    barrier.wait()
    cache = cache_module.open_or_build(paths, 64, cache_dir, root=os.path.dirname(paths[0]),
                                       fill=fill)
    results.put((bool(decoded), int(cache.images.numpy().sum(dtype=np.int64))))


@pytest.mark.skipif(sys.platform != "linux",
                    reason="forks the test process (the children need no torch import)")
@pytest.mark.parametrize("lock", [True, False])
def test_two_processes_building_at_once_leave_one_valid_cache(tmp_path, lock):
    paths = write_files(tmp_path / "images", 20)
    cache_dir = str(tmp_path / "cache")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    builders = [context.Process(target=build_in_a_process,
                                args=(paths, cache_dir, lock, barrier, results)) for _ in range(2)]
    for builder in builders:
        builder.start()
    outcomes = [results.get(timeout=60) for _ in builders]
    for builder in builders:
        builder.join(timeout=60)
    assert [builder.exitcode for builder in builders] == [0, 0]
    expected = sum((i + 1) * 64 * 64 * 3 for i in range(20))
    assert [total for _, total in outcomes] == [expected] * 2
    decoded = sum(built for built, _ in outcomes)
    # under the lock the second waits, then opens the first's cache
    assert decoded == (1 if lock else 2)
    names = cache_files(cache_dir)
    assert len([name for name in names if name.endswith(".npy")]) == 1
    assert len([name for name in names if name.endswith(".json")]) == 1
    assert not [name for name in names if name.endswith(".tmp")]
    cache, fill = build(paths, cache_dir, str(tmp_path / "images"), size=64)
    assert not cache.built and cache.images[:, 0, 0, 0].tolist() == list(range(1, 21))


# ----------------------------------------------------------------------------- off the happy path


def index_of(cache):
    return cache.path[:-len(".npy")] + ".json"


@pytest.mark.parametrize("change", [
    {"failed": [99999]}, {"failed": "0"}, {"failed": [1, 1]}, {"failed": [[1]]}, {"bytes": "12"},
    {"root": None}, {"count": 4}, {"format": "1"}, "[]", "null", "{}"])
def test_an_index_that_reads_but_is_wrong_is_rebuilt_with_one_warning(tmp_path, capsys, change):
    paths = write_files(tmp_path / "images")
    good, _ = build(paths, tmp_path / "cache", tmp_path)
    expected, index = good.images.clone(), index_of(good)
    with open(index) as f:
        fields = json.load(f)
    with open(index, "w") as f:
        f.write(change if isinstance(change, str) else json.dumps({**fields, **change}))
    del good
    capsys.readouterr()
    cache, fill = build(paths, tmp_path / "cache", tmp_path)
    assert cache.built and fill.calls == 1 and cache.failed == []
    assert torch.equal(cache.images, expected)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: the decoded-image cache {cache.path} is damaged (") and \
        line.endswith("); rebuilding it")
    assert not build(paths, tmp_path / "cache", tmp_path)[0].built and capsys.readouterr().err == ""


def test_an_index_of_an_older_format_is_rebuilt_without_a_word(tmp_path, capsys):
    paths = write_files(tmp_path / "images")
    index = index_of(build(paths, tmp_path / "cache", tmp_path)[0])
    with open(index) as f:
        fields = json.load(f)
    with open(index, "w") as f:
        json.dump({**fields, "format": cache_module.FORMAT - 1}, f)
    capsys.readouterr()
    assert build(paths, tmp_path / "cache", tmp_path)[0].built and capsys.readouterr().err == ""


@pytest.mark.parametrize("entry", [[[0.5, 0.5], [0.2, 0.2]], [[0.5] * 3, [0.2, 0.0, 0.2]],
                                   [[0.5] * 3, [0.2] * 3, 1], [[0.5, float("nan"), 0.5], [0.2] * 3],
                                   [[0.5] * 3, ["0.2"] * 3], [[2.0] * 3, [0.2] * 3], "mean"])
def test_a_memo_that_reads_but_is_wrong_is_computed_anew_with_one_warning(tmp_path, capsys, entry):
    cache, _ = build(write_files(tmp_path / "images"), tmp_path / "cache", tmp_path)
    rows, right = torch.arange(3), Statistics(((0.5,) * 3, (0.25,) * 3))
    cache_module.remembered(cache.path, rows, right)
    memo = cache.path[:-len(".npy")] + ".statistics.json"
    with open(memo) as f:
        [key] = json.load(f)
    with open(memo, "w") as f:
        f.write(json.dumps({key: entry}))  # json writes NaN as NaN, which json.load reads
    capsys.readouterr()
    statistics = Statistics(((0.5,) * 3, (0.25,) * 3))
    assert cache_module.remembered(cache.path, rows, statistics) == statistics.value
    assert statistics.calls == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: the statistics remembered in {memo} are damaged (")
    again = Statistics(((0.9,) * 3, (0.9,) * 3))
    assert cache_module.remembered(cache.path, rows, again) == statistics.value and again.calls == 0
    assert capsys.readouterr().err == ""


def test_a_failed_index_write_removes_the_npy_whose_room_the_next_build_needs(
        tmp_path, monkeypatch):
    paths = write_files(tmp_path / "images")

    def full_disk(path):
        if path.endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files_module, "write_fault", full_disk)
    with pytest.raises(cache_module.CacheError, match="no space left on device"):
        build(paths, tmp_path / "cache", tmp_path)
    assert [name for name in cache_files(tmp_path / "cache") if not name.endswith(".lock")] == []
    monkeypatch.setattr(files_module, "write_fault", None)
    assert build(paths, tmp_path / "cache", tmp_path)[0].built


@needs_flock
def test_what_killed_builds_of_any_cache_left_is_removed_once_no_process_holds_its_lock(tmp_path):
    """Temporary files (the .npy's, the index's, the memo's) and a .npy without its index, of the
    folder before it changed: the next run removes them, unless a live build (which holds that
    cache's lock) is writing."""
    paths = write_files(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    os.makedirs(cache_dir)
    killed, live = "4px-" + "a" * 24, "4px-" + "b" * 24
    leftovers = [f".{killed}.k9x2ab.npy.tmp", f".{killed}.json.p1q2r3.tmp",
                 f".{killed}.statistics.json.z.tmp", f"{killed}.npy"]
    writing = [f".{live}.u7v8w9.npy.tmp", f"{live}.npy"]
    for name in leftovers + writing + ["notes.tmp", "8px-old.npy.bak"]:
        (cache_dir / name).write_bytes(b"half a cache")
    holder = os.open(cache_dir / f"{live}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a live build holds it
    try:
        build(paths, cache_dir, tmp_path)
        names = cache_files(cache_dir)
        assert not set(leftovers) & set(names) and set(writing) <= set(names)
        assert {"notes.tmp", "8px-old.npy.bak"} <= set(names)  # not a build's
    finally:
        os.close(holder)
    build(paths, cache_dir, tmp_path)  # opened, not built: the leftovers go too, the lock now free
    assert not set(writing) & set(cache_files(cache_dir))


@pytest.mark.skipif(sys.platform != "linux", reason="forks")
def test_a_process_forked_while_a_build_holds_the_lock_does_not_hold_it(tmp_path):
    lock = str(tmp_path / "4px-key.lock")
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    with cache_module._locked(lock):
        child = context.Process(target=wait_for, args=(started, release))
        child.start()  # as a decoding worker starts during a build
    started.wait(60)
    try:
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child held it
        os.close(fd)
    finally:
        release.set()
        child.join()


def wait_for(started, release):
    started.set()
    release.wait(60)


@needs_flock
def test_a_build_that_waits_for_another_runs_lock_says_so_in_one_line(tmp_path, capsys):
    paths = write_files(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    os.makedirs(cache_dir)
    base = cache_dir / f"4px-{cache_module.cache_key(paths, 4, str(tmp_path))}"
    holder = os.open(f"{base}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.pwrite(holder, b"4242\n", 0)
    waiter = threading.Thread(target=build, args=(paths, cache_dir, tmp_path))
    waiter.start()
    try:
        deadline, said = time.monotonic() + 30, ""
        while "note:" not in said and time.monotonic() < deadline:
            time.sleep(0.01)
            said += capsys.readouterr().err
        assert waiter.is_alive()
    finally:
        os.close(holder)
        waiter.join(timeout=30)
    assert said == f"note: waiting for another run (process 4242), which is building the " \
        f"decoded-image cache {base}.npy\n"
    assert build(paths, cache_dir, tmp_path)[0].path == f"{base}.npy"


def build_stuck_on_the_last_file(paths, cache_dir, pid_file):
    """A run building a cache whose worker decodes the last file for long, having written its
    process id."""
    read_stored = image_module.read_stored

    def stuck(path, size):
        if path == paths[-1]:
            with open(f"{pid_file}.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(f"{pid_file}.tmp", pid_file)
            time.sleep(30)
        return read_stored(path, size)
    image_module.read_stored = stuck
    cache_module.open_or_build(paths, 8, cache_dir, os.path.dirname(paths[0]),
                               lambda out: decode_module.decode_files(paths, 8, out, 2, "decoding"))


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent by prctl")
def test_a_decoding_worker_dies_with_its_parent_and_the_next_run_builds_at_once(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    paths = [str(images / f"{i}.png") for i in range(8)]
    for path in paths:
        Image.new("RGB", (8, 8), "blue").save(path)
    cache_dir, pid_file = tmp_path / "cache", tmp_path / "worker.pid"
    run = multiprocessing.get_context("fork").Process(target=build_stuck_on_the_last_file,
                                                      args=(paths, str(cache_dir), str(pid_file)))
    run.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid_file.exists()
    worker = int(pid_file.read_text())
    run.kill()  # kill -9: no clean-up of its own
    run.join()
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(worker)
    assert [name for name in cache_files(cache_dir) if name.endswith(".tmp")]  # the killed build's
    began = time.monotonic()
    cache = cache_module.open_or_build(paths, 8, str(cache_dir), str(images), lambda out: [])
    assert cache.built and time.monotonic() - began < 5  # the lock was free: no wait
    assert not [name for name in cache_files(cache_dir) if name.endswith(".tmp")]


