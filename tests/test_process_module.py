"""Worker processes and threads: items made ahead in a background thread, and torch's words for a
dead DataLoader worker made into a line for the user."""

import itertools
import os
import signal
import threading
import time

import pytest

import process_module


def test_background_items_come_in_order_an_error_there_is_raised_here_closing_stops_the_thread():
    def failing():
        yield from range(5)
        raise OSError("the disk went away")
    ahead = process_module.in_background(failing(), 2)
    assert [next(ahead) for _ in range(5)] == list(range(5))
    with pytest.raises(OSError, match="the disk went away"):
        next(ahead)
    made = []

    def endless():
        for k in itertools.count():
            made.append(k)
            yield k
    ahead = process_module.in_background(endless(), 2)
    assert next(ahead) == 0
    ahead.close()
    stopped = len(made)
    time.sleep(0.3)
    assert len(made) == stopped <= 5  # two queued, one handed over, one waiting to be queued
    assert not any(thread.name == "in_background" for thread in threading.enumerate())


@pytest.mark.parametrize("message, how, cause", [
    ("DataLoader worker (pid 123) is killed by signal: Killed. ",
     "(process 123) was killed by SIGKILL", "most likely the system ran out of memory"),
    ("DataLoader worker (pid 7) is killed by signal: Segmentation fault. ",
     "(process 7) was killed by SIGSEGV", "a crash in the image decoder"),
    ("DataLoader worker (pid(s) 5, 6) exited unexpectedly", "(process 5) ended",
     "most likely the system ran out of memory"),
    ("DataLoader worker (pid 8) exited unexpectedly with exit code 1. Details are lost",
     "(process 8) exited with status 1", "an error in the worker; see it with --num-workers 0")])
def test_torchs_words_for_a_dead_dataloader_worker_become_a_line_with_the_likely_cause(
        message, how, cause):
    died = process_module.worker_died(RuntimeError(message), "reading training images")
    assert str(died).startswith(f"a worker process {how} while reading training images: {cause}")
    # not a death
    assert process_module.worker_died(RuntimeError("CUDA out of memory"), "x") is None
    assert "a worker process ended while x" in str(
        process_module.worker_died(ConnectionResetError(), "x"))


def test_in_the_block_signals_interrupt_until_the_run_is_ending_and_the_handlers_come_back_after():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, raised in ((signal.SIGTERM, process_module.Terminated),
                           (signal.SIGINT, KeyboardInterrupt)):
        with pytest.raises(raised), process_module.signals_interrupt():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises at once
    with process_module.signals_interrupt():
        process_module.ending()
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal while the run ends
            os.kill(os.getpid(), signum)
        time.sleep(0.1)
    assert {signum: signal.getsignal(signum) for signum in before} == before
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup: Ctrl-C stays ignored in the block
    try:
        with process_module.signals_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])


def test_a_signal_soon_after_the_one_that_stopped_the_run_is_ignored_unless_that_was_an_answer(
        monkeypatch):
    with pytest.raises(KeyboardInterrupt), process_module.signals_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises at once
        finally:  # the way out (best weights restored, files written): a SIGTERM is ignored
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    with pytest.raises(process_module.Terminated), process_module.signals_interrupt():
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C at LRA's prompt: the run goes on
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        process_module.interruptible()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    # a signal well after the one that stopped the run (a library swallowed the first) stops it
    monkeypatch.setattr(process_module, "AGAIN_SECONDS", 0.2)
    with pytest.raises(process_module.Terminated), process_module.signals_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
