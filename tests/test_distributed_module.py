"""torchrun: elastic restarts that resume exactly, every process ending with one that fails, two
nodes on one machine, a photo folder's cache, resuming with another number of processes, and the
store handshake that keeps a restart away from the keys of the start before it."""

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch.distributed as dist

import checkpoint_module
import data_module
import distributed_module
import main
import model_module
import process_module
import train_module
import utils
from conftest import ROOT, configs, write_fake_cifar, write_image_tree
from messages_module import flag

TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "16",
        "--patience", "1", "--stop-patience", "10", "--threshold", "0.3"]
NUMERIC = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "next_lr"]
LIMIT = 240  # seconds a torchrun test may take before it is killed: none hangs the suite


def launch(args, *launcher, nproc=2, script=None):
    """torchrun of main.py (or script) with args, in a session of its own (so it is ended
    whole)."""
    standalone = [] if launcher else ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *standalone, *launcher,
               f"--nproc_per_node={nproc}", script or os.path.join(ROOT, "main.py"),
               *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
    LAUNCHED.append(process)
    return process


LAUNCHED = []  # every launcher a test started


@pytest.fixture(autouse=True)
def no_launcher_left():
    """A test that fails midway leaves no torchrun (nor its workers) running."""
    yield
    while LAUNCHED:
        process = LAUNCHED.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def finish(process, timeout=LIMIT):
    """The launcher's output once it ends; killed with its workers (and the test failed) if it
    takes longer than timeout."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        pytest.fail(f"torchrun hung past {timeout} s:\n{output[-3000:]}")


def workers(launcher):
    """The process ids of a launcher's workers."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
        return sorted(int(pid) for pid in f.read().split())


def same_metrics(path, expected):
    actual, expected = pd.read_csv(path), pd.read_csv(expected)
    assert list(actual["epoch"]) == list(expected["epoch"])
    assert (actual[NUMERIC] - expected[NUMERIC]).abs().max().max() <= 1e-6
    assert list(actual["event"].fillna("")) == list(expected["event"].fillna(""))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process run of 4 epochs: (its arguments but OUTPUT_DIR, its folder)."""
    base = tmp_path_factory.mktemp("straight")
    args = ["--data-dir", write_fake_cifar(base / "data", per_batch=40), *TINY, "--epochs", "4"]
    run = launch(args + ["--output-dir", base / "out"])
    output = finish(run)
    assert run.returncode == 0, output[-3000:]
    return args, base / "out"


# ----------------------------------------------------------------------------- elastic restarts


def test_a_worker_killed_with_kill_9_comes_back_under_max_restarts_and_ends_as_the_straight_run(
        straight, tmp_path):
    args, expected = straight
    out = tmp_path / "out"
    run = launch(args + ["--output-dir", out, "--resume", "auto"], "--max-restarts=2",
                 "--standalone")
    deadline = time.monotonic() + LIMIT
    while not ((out / "training_metrics.csv").exists()
               and len(pd.read_csv(out / "training_metrics.csv")) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, "ended before the kill"
        time.sleep(0.05)
    os.kill(workers(run)[1], signal.SIGKILL)
    output = finish(run)
    assert run.returncode == 0, output[-3000:]
    assert "Resuming" in output and "connectFullMesh" not in output
    same_metrics(out / "training_metrics.csv", expected / "training_metrics.csv")


def test_a_restart_agrees_on_a_new_prefix_and_never_reads_the_keys_of_the_start_before(monkeypatch):
    server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=20))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # one store for every start

    def start(ranks):
        stores = {}

        def join(rank):
            stores[rank] = distributed_module._fresh_store(rank, 2, datetime.timedelta(seconds=20))
        threads = [threading.Thread(target=join, args=(rank,)) for rank in ranks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return stores

    first = start([0, 1])
    first[0].set("address", "of a process now dead")
    assert first[1].get("address") == b"of a process now dead"  # the two share one prefix
    # a start whose rank 1 drew a ticket and died before it was answered
    server.set("ticket/1", str(server.add("ticket", 1)))
    second = start([1, 0])
    assert set(second) == {0, 1} and not second[1].check(["address"])  # no key of the first
    second[1].set("address", "new")
    assert second[0].get("address") == b"new"


# ----------------------------------------------------------------------------- no rank left hanging

INJECT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import files_module, main, train_module
kind, victim, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if kind == "reads":  # each process notes the cache rows it reads: (training?, epoch, split, rows)
    import json, loader_module
    gather = loader_module.MappedLoader._gather
    def noted(self, indices, step):
        with open(os.path.join(os.environ["READS_DIR"], os.environ["RANK"]), "a") as f:  # a pass
            split = (len(self.rows), int(self.rows.sum()))
            f.write(json.dumps([self.batching.train, self.epoch, split,
                                self.rows[indices].tolist()]) + "\\n")
        return gather(self, indices, step)
    loader_module.MappedLoader._gather = noted
one_epoch = train_module.train_one_epoch
if int(os.environ["RANK"]) == victim:
    if kind == "write":  # the disk fills up under epoch 2's checkpoint
        written = []
        def full(path):
            written.append(path)
            if sum("last_checkpoint" in p for p in written) >= 2:
                raise OSError(28, "No space left on device")
        files_module.write_fault = full
    def failing(step, loader, *, epoch=1, **kwargs):
        if epoch == 2 and kind == "exception":
            raise ZeroDivisionError("a fault of this process alone")
        if epoch == 2 and kind in ("ctrl-c", "kill"):
            os.kill(os.getpid(), signal.SIGINT if kind == "ctrl-c" else signal.SIGKILL)
        return one_epoch(step, loader, epoch=epoch, **kwargs)
    train_module.train_one_epoch = failing
    if kind == "prompt":  # LRA's question, answered after DIST_TIMEOUT has passed
        import builtins, time, callback_module
        callback_module._stdin_is_terminal = lambda: True
        builtins.input = lambda prompt: time.sleep(float(os.environ["ANSWER_AFTER"])) or "h"
sys.exit(main.main(argv))
"""


@pytest.mark.parametrize("kind, victim, status, line", [
    ("write", 0, 3, "error: "),
    ("exception", 1, 1, "error on rank 1: ZeroDivisionError: a fault of this process alone"),
    ("ctrl-c", 0, 130, "Interrupted. The last completed epoch is saved"),
    # rank 0 stops at whichever comes first: torchrun's SIGTERM, or its collective breaking
    ("kill", 1, -9, ("Interrupted. The last", "error: another process of this run ended")),
])
def test_a_failure_on_one_process_ends_every_process_with_its_status_and_one_line(
        tmp_path, kind, victim, status, line):
    script = tmp_path / "inject.py"
    script.write_text(INJECT.format(root=ROOT))
    data = write_fake_cifar(tmp_path / "data", per_batch=40)
    run = launch([kind, victim, "--data-dir", data, "--output-dir", tmp_path / "out", *TINY,
                  "--epochs", "6"], script=script)
    output = finish(run, timeout=150)  # startup and two epochs, then under 60 s to end them all
    assert run.returncode != 0  # torchrun's own, for any failure; the first rank's below
    assert f"exitcode  : {status} " in output, output[-3000:]
    said = [row for row in output.splitlines() if row.startswith(("error", "Interrupted"))]
    assert len(said) == 1 and said[0].startswith(line), output[-3000:]
    if kind in ("write", "ctrl-c"):  # how to go on: with as many processes
        assert "torchrun --nproc_per_node=2 --standalone main.py --resume auto" in said[0]
    assert "Gloo" not in output and "[rank" not in output  # no other process's traceback
    assert len(pd.read_csv(tmp_path / "out" / "training_metrics.csv")) >= 1, output[-3000:]


def test_the_other_processes_wait_for_an_answer_at_lra_s_prompt_longer_than_dist_timeout(
        tmp_path, monkeypatch):
    script = tmp_path / "inject.py"
    script.write_text(INJECT.format(root=ROOT))
    monkeypatch.setenv("ANSWER_AFTER", "19")
    data = write_fake_cifar(tmp_path / "data", per_batch=40)
    run = launch(["prompt", 0, "--data-dir", data, "--output-dir", tmp_path / "out", *TINY,
                  "--epochs", "4", "--ask-epoch", "1", "--dist-timeout", "15"], script=script)
    output = finish(run)
    assert run.returncode == 0, output[-3000:]
    assert "halted by the user after epoch 1" in output, output[-3000:]
    assert len(pd.read_csv(tmp_path / "out" / "training_metrics.csv")) == 1


# ------------------------------------------------------------------------- two nodes, one machine


def test_two_launchers_as_two_nodes_train_as_two_processes_on_one_node(straight, tmp_path):
    args, expected = straight
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = []
    for node in (0, 1):  # node 0 first: the rendezvous ranks its launcher first (a lower pid)
        nodes.append(launch(args + ["--output-dir", tmp_path / "out"], "--nnodes=2",
                            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                            "--rdzv-id=two-nodes", f"--node-rank={node}", nproc=1))
        time.sleep(1)
    outputs = [finish(node) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    same_metrics(tmp_path / "out" / "training_metrics.csv", expected / "training_metrics.csv")


# ----------------------------------------------------------------------------- resuming


def test_a_run_resumed_with_another_number_of_processes_is_refused_in_one_line(
        straight, tmp_path, capsys):
    args, expected = straight
    shutil.copytree(expected, tmp_path / "out")
    capsys.readouterr()
    status = main.main(["--resume", "auto", "--output-dir", str(tmp_path / "out"), "--epochs", "5"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "was saved by 2 processes and this run has 1" in err and "resume with 2 processes" in err


# ----------------------------------------------------------------------------- a photo folder


def test_a_photo_folder_under_torchrun_is_decoded_once_read_by_shards_and_evaluates_as_one_process(
        tmp_path, monkeypatch):
    data = write_image_tree(tmp_path / "photos", splits=("train", "val", "test"), per_class=8)
    constants = dict(DATASET="folder", DATA_DIR=data, IMAGE_SIZE=16, BATCH_SIZE=4,
                     CACHE_DIR=str(tmp_path / "cache"), RESIDENT="no", NUM_WORKERS=0)
    script = tmp_path / "inject.py"
    script.write_text(INJECT.format(root=ROOT))
    monkeypatch.setenv("READS_DIR", str(tmp_path))
    flags = [a for name, value in constants.items() for a in (flag(name), value)]
    run = launch(["reads", -1, *flags, "--epochs", "2", "--ask-epoch", "none", "--output-dir",
                  tmp_path / "out"], script=script)
    output = finish(run)
    assert run.returncode == 0, output[-3000:]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # built once, by local rank 0
    assert output.count("decoded-image cache") <= 1  # at most one line about the wait
    # each process reads only its shard: in each pass over a split the two read disjoint rows,
    # together all 24 (3 batches of 4 each in training, 12 each in evaluation)
    passes = {}  # (training?, split): each process's passes over it, in order
    for rank in (0, 1):
        for line in (tmp_path / str(rank)).read_text().splitlines():
            train, _, split, rows = json.loads(line)
            passes.setdefault((train, tuple(split)), ([], []))[rank].append(rows)
    assert sorted(len(ours) for ours, _ in passes.values()) == [1, 2, 2]  # test; val, train
    for ours, theirs in passes.values():
        assert len(ours) == len(theirs)
        for mine, other in zip(ours, theirs):
            assert len(mine) == len(other) == 12 and len(set(mine + other)) == 24

    # one process evaluates the best weights on the same cache: the figures the two gave
    data = data_module.get_data(configs(**constants).data, "cpu")
    model = model_module.get_model("cnn", len(data.classes), image_size=16)
    model.load_state_dict(utils.load_state_dict(str(tmp_path / "out" / "best_model.pth")))
    history = pd.read_csv(tmp_path / "out" / "training_metrics.csv")
    best = history[history["event"].fillna("").str.contains("best")].iloc[-1]
    val, test = (train_module.evaluate(model, split) for split in (data.val, data.test))
    assert val["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert val["acc"] == pytest.approx(best["val_acc"])
    assert f"Test accuracy: {100 * test['acc']:.2f}% (loss {test['loss']:.4f}" in output


class FailedStore:
    """torchrun's store where rank 1 has failed with 143."""

    def check(self, keys):
        return True

    def get(self, key):
        return b"1|143|Interrupted. The last completed epoch is saved"

    def set(self, key, value):
        pass


@pytest.mark.parametrize("interrupted", [True, False])
def test_another_process_failure_ends_this_one_unless_it_is_ending_on_its_own(
        monkeypatch, interrupted):
    # a terminal's Ctrl-C reaches every process: rank 0, drawing its curves, is not cut short
    exits, stop = [], threading.Event()
    monkeypatch.setattr(distributed_module.os, "_exit", exits.append)
    monkeypatch.setattr(distributed_module, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(distributed_module, "_said", threading.Lock())
    with process_module.signals_interrupt():
        if interrupted:
            process_module.ending()
        threading.Timer(0.5, stop.set).start()  # then the process leaves the group
        distributed_module._watch(FailedStore(), 0, stop)
    assert (exits == []) == interrupted and set(exits) <= {143}


def test_another_process_failure_ends_this_one_once_its_epoch_files_land(monkeypatch, tmp_path):
    landed, exits, stop = [], [], threading.Event()

    def write_epoch(*args, **kwargs):
        time.sleep(0.3)
        landed.append(True)

    def leave(status):
        exits.append((status, list(landed)))
        stop.set()
    monkeypatch.setattr(checkpoint_module, "_write_epoch", write_epoch)
    monkeypatch.setattr(distributed_module.os, "_exit", leave)
    monkeypatch.setattr(distributed_module, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(distributed_module, "_said", threading.Lock())
    checkpoint_module.EpochWriter(str(tmp_path)).save({"history": []}, new_best=False)
    distributed_module._watch(FailedStore(), 0, stop)
    assert exits == [(143, [True])]
