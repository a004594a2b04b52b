"""The benchmark scripts that tests can run on a CPU in seconds: profile_step's table and
synchronisation counts."""

import contextlib
import json
import os
import subprocess
import sys
import warnings

import torch

from conftest import ROOT, write_fake_cifar

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import profile_step  # noqa: E402  (benchmarks/profile_step.py)

SCRIPT = os.path.join(ROOT, "benchmarks", "profile_step.py")


def run_profile_step(*args, timeout=300):
    result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_the_sync_counter_counts_sync_warnings_and_explicit_waits_by_where_they_come_from():
    with profile_step.counting_syncs(torch.device("cpu")) as count:
        for _ in range(3):
            # as torch.cuda.set_sync_debug_mode("warn") warns
            warnings.warn(profile_step.SYNC_WARNING)
        with contextlib.suppress(RuntimeError):  # no CUDA here: counted, then refused
            torch.cuda.synchronize()
    (stack, n), = count.waited.items()
    assert n == 3 and stack.startswith("tests/test_benchmarks.py:")
    assert stack.endswith(
        "test_the_sync_counter_counts_sync_warnings_and_explicit_waits_by_where_they_come_from")
    assert sum(count.explicit.values()) == 1 and count.total() == 4
    assert not hasattr(torch.cuda.synchronize, "__wrapped__")  # put back


def test_profile_step_prints_the_kernel_table_and_the_sync_count_of_the_step_on_a_cpu(tmp_path):
    printed = run_profile_step("--model", "cnn", "--steps", 2, "--batch-size", 8, "--warmup", 1,
                               "--output", tmp_path)
    assert ("host synchronisations in 2 warm steps: 0 (on the CPU there is no device to "
            "synchronise with)" in printed)
    assert "kernel table: top 20 by self CPU time over 2 warm steps" in printed
    assert "aten::convolution_backward" in printed and "Self CPU time total" in printed
    report = json.loads((tmp_path / "profile_step_cnn_nopreset_cpu.json").read_text())
    calls = {row["name"]: row["calls"] for row in report["table"]}
    # the CNN's six convolutions, in each of the two steps
    assert calls["aten::convolution_backward"] == 6 * 2
    assert len(report["table"]) == 20 and report["step_syncs"]["total"] == 0
    assert (report["batch_size"], report["image_size"], report["precision"]) == (8, 32, "fp32")
    assert (tmp_path / "profile_step_cnn_nopreset_cpu.txt").read_text().strip() in printed


def test_profile_step_fit_counts_a_whole_main_run(tmp_path):
    data = write_fake_cifar(tmp_path / "data")
    printed = run_profile_step("--model", "cnn", "--steps", 1, "--warmup", 1, "--batch-size", 8,
                               "--fit", "--epochs", 1, "--data-dir", data, "--main-args",
                               "--val-split 20 --download false", "--output", tmp_path)
    fit = json.loads((tmp_path / "profile_step_cnn_nopreset_cpu.json").read_text())["fit"]
    assert fit["status"] == 0 and fit["epochs"] == 1 and fit["syncs"]["total"] == 0
    assert f"Test accuracy: {100 * fit['test_acc']:.2f}%" in printed  # as main.py printed it
    assert "host synchronisations in the whole run: 0" in printed
