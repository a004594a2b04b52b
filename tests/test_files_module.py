"""Writing the run's files: atomic writes (durable, with the umask's mode), the output folder's
checks and lock, and links or other non-files refused where a run's file goes."""

import fcntl
import os
import re
import stat
import subprocess
import sys
import time

import pytest

import files_module
from conftest import ROOT


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"good")

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files_module.atomic_write(str(path), failing)
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        events.append(("fsync", status.st_ino,
                       status.st_size if stat.S_ISREG(status.st_mode) else "folder"))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.stat(source).st_ino, target))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "file.bin"
    files_module.atomic_write(str(path), lambda f: f.write(b"new bytes"))
    file, folder = path.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file, len(b"new bytes")), ("replace", file, str(path)),
                      ("fsync", folder, "folder")]
    assert path.read_bytes() == b"new bytes"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_files_the_umask_s_mode_as_open_does(tmp_path, umask):
    """mkstemp makes -rw------- whatever the umask; the outputs get what open() gives (-rw-r--r--
    under 022)."""
    code = ("import sys, files_module; "
            "files_module.atomic_write(sys.argv[1], lambda f: f.write(b'x')); "
            "open(sys.argv[2], 'w').close()")
    subprocess.run([sys.executable, "-c", code, tmp_path / "atomic", tmp_path / "plain"], cwd=ROOT,
                   check=True, umask=umask)
    mode = stat.S_IMODE((tmp_path / "atomic").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert mode == {0o022: 0o644, 0o027: 0o640}[umask]


# ------------------------------------------------------------------------- the output folder's lock


def test_a_folder_locked_by_a_live_process_is_refused_and_a_kill_9_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, files_module; files_module.lock_folder(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", tmp_path], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (tmp_path / files_module.LOCK_FILE).read_text() == f"{holder.pid}\n"
        for refused in (files_module.check_unlocked, files_module.lock_folder):
            with pytest.raises(files_module.FolderInUse,
                               match=rf"^OUTPUT_DIR {tmp_path} is in use by another run "
                                     rf"\(process {holder.pid}\)"):
                refused(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: the process gets no chance to let go
        holder.wait()
    files_module.check_unlocked(str(tmp_path))
    files_module.lock_folder(str(tmp_path))
    try:
        assert (tmp_path / files_module.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        files_module.unlock_folder(str(tmp_path))


def can_lock(path) -> bool:
    """Whether a new open file description can take an exclusive flock on path now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_unlock_folder_lets_go_and_a_forked_child_does_not_hold_on(tmp_path):
    """A DataLoader worker forked by a run must not keep its folder locked after the run is gone."""
    files_module.lock_folder(str(tmp_path))
    lock = str(tmp_path / files_module.LOCK_FILE)
    assert not can_lock(lock)
    ready, say_ready = os.pipe()
    child = os.fork()
    # the child says it is up, then sleeps, holding whatever descriptors it still has
    if child == 0:
        os.write(say_ready, b"up")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready, 2) == b"up"
        files_module.unlock_folder(str(tmp_path))
        assert can_lock(lock)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(say_ready)


def test_check_unlocked_creates_nothing(tmp_path):
    files_module.check_unlocked(str(tmp_path / "new"))
    files_module.check_unlocked(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_an_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="OUTPUT_DIR .* is not writable"):
        files_module.check_writable(str(blocker / "sub"))


# ------------------------------------------------------------ links and other files in OUTPUT_DIR


def planted(tmp_path, kind):
    """OUTPUT_DIR/.lock planted as `kind` ("symlink" to a file of someone else's, "fifo", "hardlink"
    to it, "folder"); returns that other file, whose bytes must never change."""
    victim, lock = tmp_path / "victim.txt", tmp_path / "out" / files_module.LOCK_FILE
    victim.write_text("someone else's file\n")
    lock.parent.mkdir()
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    return victim


@pytest.mark.parametrize(
    "kind, fragment", [("symlink", "is a symbolic link to "), ("fifo", "is a FIFO"),
                       ("hardlink", "has 2 names (a hard link"), ("folder", "is a folder")])
def test_a_lock_that_is_a_link_or_not_a_plain_file_is_refused_and_what_it_points_at_left_alone(
        tmp_path, kind, fragment):
    victim = planted(tmp_path, kind)
    folder = str(tmp_path / "out")
    expected = f"^{re.escape(folder)}/.lock {re.escape(fragment)}.*; remove it, or choose " \
               f"another OUTPUT_DIR$"
    for refused in (files_module.check_unlocked, files_module.lock_folder):
        with pytest.raises(ValueError, match=expected) as error:
            refused(folder)
        assert not isinstance(error.value, files_module.FolderInUse)
    assert victim.read_text() == "someone else's file\n"
    assert os.path.realpath(folder) not in files_module._locks


@pytest.mark.parametrize("kind", ["symlink", "dangling", "folder"])
def test_atomic_write_refuses_a_link_or_a_folder_where_its_file_goes_and_leaves_it(tmp_path, kind):
    victim, path = tmp_path / "victim.txt", tmp_path / "best_model.json"
    victim.write_text("someone else's file\n")
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.mkdir()
    expected = f"^could not write best_model.json in {tmp_path}: {path} is a"
    with pytest.raises(files_module.WriteFailed, match=expected):
        files_module.atomic_write(str(path), lambda f: f.write(b"new"))
    assert victim.read_text() == "someone else's file\n" and not (tmp_path / "nowhere").exists()
    assert path.is_symlink() == (kind != "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.json", "victim.txt"]


def test_an_output_dir_that_is_a_dangling_link_is_refused_naming_it_and_its_target(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(OSError, match=f"^OUTPUT_DIR {tmp_path}/out is a symbolic link to "
                                      f"{tmp_path}/gone, which does not exist; make that folder"):
        files_module.check_writable(str(tmp_path / "out"))
    with pytest.raises(OSError, match=f"^OUTPUT_DIR {tmp_path}/out/run is inside {tmp_path}/out, a "
                                      f"symbolic link to {tmp_path}/gone, which does not exist"):
        files_module.check_writable(str(tmp_path / "out" / "run"))
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    # a link to a folder that is there: allowed
    files_module.check_writable(str(tmp_path / "linked"))
    assert not (tmp_path / "gone").exists() and os.listdir(tmp_path / "real") == []
