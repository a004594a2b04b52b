"""Files and states: atomic writes (durable, with the umask's mode), safe loading (a real payload
never runs), the output folder's lock, random states, the CSV."""

import fcntl
import itertools
import os
import pickle
import random
import re
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

import utils
from conftest import ROOT


class Payload:
    """Pickles into code that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": Payload(str(marker))}, path)
    control = tmp_path / "control"
    # the payload is real: a plain unpickler runs it
    pickle.loads(pickle.dumps(Payload(str(control))))
    assert control.read_text() == "ran"
    with pytest.raises(utils.CheckpointError, match="refused and nothing in it ran"):
        utils.load_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "truncated or not"),
                                              (b"hello, not a checkpoint",
                                              "not a PyTorch checkpoint")])
def test_bad_files_get_a_clear_message(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(utils.CheckpointError, match=message):
        utils.load_torch(str(path), "WEIGHTS")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(utils.CheckpointError, match="truncated"):
        utils.load_torch(str(path))


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(utils.CheckpointError, match="not a model state dict"):
        utils.load_state_dict(str(path))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"good")

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        utils.atomic_write(str(path), failing)
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        events.append(("fsync", status.st_ino, status.st_size if stat.S_ISREG(status.st_mode)
            else "folder"))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.stat(source).st_ino, target))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "file.bin"
    utils.atomic_write(str(path), lambda f: f.write(b"new bytes"))
    file, folder = path.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file, len(b"new bytes")), ("replace", file, str(path)), ("fsync",
        folder, "folder")]
    assert path.read_bytes() == b"new bytes"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_files_the_umask_s_mode_as_open_does(tmp_path, umask):
    """mkstemp makes -rw------- whatever the umask; the outputs get what open() gives (-rw-r--r--
    under 022)."""
    code = ("import sys, utils; utils.atomic_write(sys.argv[1], lambda f: f.write(b'x')); "
            "open(sys.argv[2], 'w').close()")
    subprocess.run([sys.executable, "-c", code, tmp_path / "atomic", tmp_path / "plain"], cwd=ROOT,
        check=True,
                   umask=umask)
    mode = stat.S_IMODE((tmp_path / "atomic").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert mode == {0o022: 0o644, 0o027: 0o640}[umask]


# ----------------------------------------------------------------------------- the output folder's
# lock


def test_a_folder_locked_by_a_live_process_is_refused_and_a_kill_9_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
        "import sys, utils; utils.lock_folder(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", tmp_path], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (tmp_path / utils.LOCK_FILE).read_text() == f"{holder.pid}\n"
        for refused in (utils.check_unlocked, utils.lock_folder):
            with pytest.raises(utils.FolderInUse,
                match=rf"^OUTPUT_DIR {tmp_path} is in use by another run "
                                                        rf"\(process {holder.pid}\)"):
                refused(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: the process gets no chance to let go
        holder.wait()
    utils.check_unlocked(str(tmp_path))
    utils.lock_folder(str(tmp_path))
    try:
        assert (tmp_path / utils.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        utils.unlock_folder(str(tmp_path))


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
    utils.lock_folder(str(tmp_path))
    lock = str(tmp_path / utils.LOCK_FILE)
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
        utils.unlock_folder(str(tmp_path))
        assert can_lock(lock)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(say_ready)


def test_check_unlocked_creates_nothing(tmp_path):
    utils.check_unlocked(str(tmp_path / "new"))
    utils.check_unlocked(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_random_states_round_trip_through_a_safe_checkpoint(tmp_path):
    utils.seed_everything(3)
    state = utils.rng_state()
    utils.save_torch(state, str(tmp_path / "rng.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.seed_everything(99)
    utils.set_rng_state(utils.load_torch(str(tmp_path / "rng.pth")))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_write_metrics_gives_the_columns_in_order(tmp_path):
    path = str(tmp_path / "m.csv")
    utils.write_metrics([{"epoch": 1, "train_loss": 1.0, "seconds": 2.0}], path)
    frame = pd.read_csv(path)
    assert list(frame.columns) == utils.CSV_COLUMNS and frame["epoch"].tolist() == [1]


def test_an_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="OUTPUT_DIR .* is not writable"):
        utils.check_writable(str(blocker / "sub"))


def test_plural_counts_one_in_the_singular_and_others_in_the_plural():
    assert [utils.plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert utils.plural(1, "class folder") == "1 class folder" and utils.plural(3, "batch",
        "batches") == "3 batches"


def test_background_items_come_in_order_an_error_there_is_raised_here_closing_stops_the_thread():
    def failing():
        yield from range(5)
        raise OSError("the disk went away")
    ahead = utils.in_background(failing(), 2)
    assert [next(ahead) for _ in range(5)] == list(range(5))
    with pytest.raises(OSError, match="the disk went away"):
        next(ahead)
    made = []

    def endless():
        for k in itertools.count():
            made.append(k)
            yield k
    ahead = utils.in_background(endless(), 2)
    assert next(ahead) == 0
    ahead.close()
    stopped = len(made)
    time.sleep(0.3)
    assert len(made) == stopped <= 5  # two queued, one handed over, one waiting to be queued
    assert not any(thread.name == "in_background" for thread in threading.enumerate())


# ------------------------------------------------------------ links and other files in OUTPUT_DIR


def planted(tmp_path, kind):
    """OUTPUT_DIR/.lock planted as `kind` ("symlink" to a file of someone else's, "fifo", "hardlink"
    to it, "folder"); returns that other file, whose bytes must never change."""
    victim, lock = tmp_path / "victim.txt", tmp_path / "out" / utils.LOCK_FILE
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


@pytest.mark.parametrize("kind, fragment", [("symlink", "is a symbolic link to "),
                                            ("fifo", "is a FIFO"),
                                            ("hardlink", "has 2 names (a hard link"),
                                            ("folder", "is a folder")])
def test_a_lock_that_is_a_link_or_not_a_plain_file_is_refused_and_what_it_points_at_left_alone(
        tmp_path, kind, fragment):
    victim = planted(tmp_path, kind)
    folder = str(tmp_path / "out")
    expected = f"^{re.escape(folder)}/.lock {re.escape(fragment)}.*; remove it, or choose " \
               f"another OUTPUT_DIR$"
    for refused in (utils.check_unlocked, utils.lock_folder):
        with pytest.raises(ValueError, match=expected) as error:
            refused(folder)
        assert not isinstance(error.value, utils.FolderInUse)
    assert victim.read_text() == "someone else's file\n"
    assert os.path.realpath(folder) not in utils._locks


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
    with pytest.raises(utils.WriteFailed, match=expected):
        utils.atomic_write(str(path), lambda f: f.write(b"new"))
    assert victim.read_text() == "someone else's file\n" and not (tmp_path / "nowhere").exists()
    assert path.is_symlink() == (kind != "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.json", "victim.txt"]


def test_an_output_dir_that_is_a_dangling_link_is_refused_naming_it_and_its_target(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(OSError, match=f"^OUTPUT_DIR {tmp_path}/out is a symbolic link to "
                                      f"{tmp_path}/gone, which does not exist; make that folder"):
        utils.check_writable(str(tmp_path / "out"))
    with pytest.raises(OSError, match=f"^OUTPUT_DIR {tmp_path}/out/run is inside {tmp_path}/out, a "
                                      f"symbolic link to {tmp_path}/gone, which does not exist"):
        utils.check_writable(str(tmp_path / "out" / "run"))
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    utils.check_writable(str(tmp_path / "linked"))  # a link to a folder that is there: allowed
    assert not (tmp_path / "gone").exists() and os.listdir(tmp_path / "real") == []


# ------------------------------------------------------------------ values read from files


@pytest.mark.parametrize("value, annotation, ok", [
    (64, int, True), ("64", int, False), (True, int, False), (64.0, int, False), (64, float, True),
    (True, float, False), (None, int | None, True), (None, int, False), (True, bool, True),
    (1, bool, False), (["a", "b"], list[str], True), (["a", 1], list[str], False),
    ("ab", list[str], False), ([0.5, 1], list[float], True), ({"a": 1}, dict, True),
    ([], dict, False)])
def test_values_read_from_files_must_be_exactly_of_their_settings_type(value, annotation, ok):
    assert utils.is_of_type(value, annotation) == ok
    if not ok:
        with pytest.raises(ValueError, match=rf"^NAME takes .+, not {re.escape(repr(value))}$"):
            utils.check_type("NAME", value, annotation)


def test_a_wrong_type_is_told_in_the_words_a_flag_gets():
    with pytest.raises(ValueError) as error:
        utils.check_type("BATCH_SIZE", "64", int | None)
    assert str(error.value) == "BATCH_SIZE takes a whole number or none, not '64'"
    assert utils.type_words(list[float]) == "a list, each a number"
    long = utils.short_repr("x" * 1000)
    assert long.endswith("...x'") and len(long) <= 60


# ------------------------------------------------------------------ CSV cells


FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+2", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"]


def test_text_cells_that_start_as_a_formula_get_a_leading_quote_and_the_rest_stay_as_they_are():
    assert [utils.safe_cell(text) for text in FORMULAS] == ["'" + text for text in FORMULAS]
    others = ("cat", "a=b", "", -2.5, 3, None)
    assert [utils.safe_cell(value) for value in others] == list(others)
    frame = pd.DataFrame({"path": ["-x.jpg", "y.jpg"], "p1": [-0.5, 0.25]})
    safe = utils.spreadsheet_safe(frame)
    assert safe["path"].tolist() == ["'-x.jpg", "y.jpg"] and safe["p1"].tolist() == [-0.5, 0.25]
    assert frame["path"].tolist() == ["-x.jpg", "y.jpg"]  # the table given is left as it was


def test_the_metrics_csv_escapes_its_text_cells(tmp_path):
    path = str(tmp_path / "m.csv")
    utils.write_metrics([{"epoch": 1, "train_loss": 1.0, "monitor": "=1+2", "event": "@x"}], path)
    row = pd.read_csv(path).iloc[0]
    assert row["monitor"] == "'=1+2" and row["event"] == "'@x" and row["epoch"] == 1


@pytest.mark.parametrize("message, how, cause", [
    ("DataLoader worker (pid 123) is killed by signal: Killed. ",
     "(process 123) was killed by SIGKILL", "most likely the system ran out of memory"),
    ("DataLoader worker (pid 7) is killed by signal: Segmentation fault. ",
     "(process 7) was killed by SIGSEGV", "a crash in the image decoder"),
    ("DataLoader worker (pid(s) 5, 6) exited unexpectedly", "(process 5) ended",
     "most likely the system ran out of memory"),
    ("DataLoader worker (pid 8) exited unexpectedly with exit code 1. Details are lost",
     "(process 8) exited with status 1", "an error in the worker; see it with --num-workers 0")])
def test_torchs_words_for_a_dead_dataloader_worker_become_a_line_with_the_likely_cause(message, how,
                                                                                     cause):
    died = utils.worker_died(RuntimeError(message), "reading training images")
    assert str(died).startswith(f"a worker process {how} while reading training images: {cause}")
    assert utils.worker_died(RuntimeError("CUDA out of memory"), "x") is None  # not a death
    assert "a worker process ended while x" in str(utils.worker_died(ConnectionResetError(), "x"))
