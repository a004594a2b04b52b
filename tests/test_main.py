"""main.py: constants on the command line, bad input, interruptions, resume, earlier runs kept and
one run per folder, the quick real-data run."""

import datetime
import errno
import fcntl
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import checkpoint_module
import cli_module
import data_module
import export_module
import files_module
import image_module
import inference_module
import loader_module
import main
import model_module
import optim_module
import process_module
import report_module
import run_module
import step_module
import train_module
import utils
from conftest import alive, ROOT, plant_crafted_batch, run_main, write_fake_cifar, write_image_tree

TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "32"]


@pytest.fixture
def tiny_run(tmp_path):
    """Arguments for a quick run on a fake CIFAR-10 folder, writing to tmp_path/out."""
    data = write_fake_cifar(tmp_path / "data", per_batch=40)
    out = tmp_path / "out"
    return ["--data-dir", data, "--output-dir", str(out), *TINY], out


def assert_one_clean_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def main_in_process(args, capsys):
    """main.main(args) in this process (quicker than a subprocess when it stops before training)."""
    capsys.readouterr()
    status = main.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


# ----------------------------------------------------------------------------- constants and flags


def test_flags_are_derived_from_the_constants():
    config, command = main.parse_config(["--epochs", "3", "--data-dir", "/x",
                                         "--train-subset", "none", "--dwell", "false",
                                         "--lr", "0.2"])
    assert config["EPOCHS"] == 3 and config["DATA_DIR"] == "/x" and config["TRAIN_SUBSET"] is None
    assert config["DWELL"] is False and config["LR"] == 0.2 and command["predict"] is None
    assert set(main.constants()) >= {"DATA_DIR", "DATASET", "MODEL", "EPOCHS", "BATCH_SIZE", "LR",
                                     "FREEZE", "WEIGHTS", "PATIENCE", "STOP_PATIENCE", "THRESHOLD",
                                     "FACTOR", "DWELL", "ASK_EPOCH", "VAL_SPLIT", "TRAIN_SUBSET",
                                     "SEED", "OUTPUT_DIR"}


def test_auto_augment_and_random_erasing_flags_reach_the_data_config():
    config, _ = main.parse_config(["--auto-augment", "trivialaugment", "--random-erasing", "0.25"])
    data = main.build_config(config).data
    assert data.augmentations == dict(auto_augment="trivialaugment", random_erasing=0.25, mixup=0.0,
                                      cutmix=0.0)
    config, _ = main.parse_config(["--auto-augment", "none"])
    settings = main.build_config(config).data.augmentations
    assert config["AUTO_AUGMENT"] is None and settings["random_erasing"] == 0
    config["AUTO_AUGMENT"] = "rand"
    with pytest.raises(ValueError, match="^AUTO_AUGMENT = 'rand' is not known; choose one of "
                       "None, 'trivialaug"):
        main.build_config(config)


def test_a_preset_applies_and_flags_override_it():
    config, _ = main.parse_config(["--preset", "fast", "--epochs", "12"])
    assert config["MODEL"] == "fast" and config["SCHEDULE"] == "onecycle" and config["EPOCHS"] == 12


@pytest.mark.parametrize("preset", list(main.PRESETS))
def test_no_preset_validates_on_the_test_set(preset, cifar_dir):
    config, _ = main.parse_config(["--preset", preset])
    data = data_module.get_data(
        main.build_config({**config, "DATA_DIR": cifar_dir, "DOWNLOAD": False}).data)
    assert data.val is not data.test and len(data.test.labels) == 10000
    held_out = config["VAL_SPLIT"]
    # held out of the 50,000 training images, or none
    assert len(data.train.labels) == 50000 - held_out
    if held_out:
        assert data.val.labels.bincount().tolist() == [held_out // 10] * 10  # stratified
    else:
        assert data.val is None


@pytest.mark.parametrize("typed, meant",
                         [("--epoch", "--epochs"), ("--ephocs", "--epochs"),
                          ("--val_split", "--val-split"), ("--learning-rate", None)])
def test_an_unknown_flag_names_the_closest_flags_in_two_lines(typed, meant, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.parse_config([typed, "3"])
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(lines) == 2 and f"unknown flag {typed}" in lines[0]
    assert (f"did you mean {meant}" in lines[0]) if meant else "did you mean" not in lines[0]
    assert "--help" in lines[1] and "--momentum" not in "".join(lines)  # no dump of every option


def test_help_shows_each_constants_comment_and_default_grouped_as_the_constants_are(capsys):
    with pytest.raises(SystemExit):
        main.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    text = text[text.index("options:"):]  # after the usage line
    assert "Data: --data-dir STR holds cifar-10-batches-py/" in text
    assert "SGD Nesterov momentum [MOMENTUM; default 0.9]" in text
    assert text.index("LRA (") < text.index("--patience INT") < text.index("Speed:")
    comments = cli_module.documentation(main.__file__)
    assert set(comments) == set(main.constants()) and all(text for text, _ in comments.values())


def test_a_value_of_the_wrong_type_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.parse_config(["--epochs", "three"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "EPOCHS takes a whole number, not 'three'" in err


@pytest.mark.parametrize("name, value",
                         [("EPOCHS", 0), ("BATCH_SIZE", 0), ("LR", 0.0), ("FACTOR", 1.0),
                          ("PATIENCE", 0), ("STOP_PATIENCE", 0), ("THRESHOLD", 1.5),
                          ("VAL_SPLIT", -1), ("TRAIN_SUBSET", 0), ("MODEL", "vgg"),
                          ("DATASET", "mnist"), ("SCHEDULE", "step"), ("MIXUP", -0.2),
                          ("CUTMIX", -1.0), ("CLASS_WEIGHTS", "balance"), ("EMA_DECAY", 1.0),
                          ("EMA_DECAY", 0.0), ("ACCUMULATE_STEPS", 0), ("CLIP_GRAD_NORM", 0.0)])
def test_out_of_range_constants_name_the_constant(name, value):
    config = main.constants()
    config[name] = value
    with pytest.raises(ValueError, match=f"^{name} = "):
        main.build_config(config)


# ---------------------------------------------------------------------------- bad input, end to end


@pytest.mark.parametrize("args, fragments", [
    (["--epochs", "0"], ["--epochs 0 (EPOCHS) is out of range", ">= 1"]),
    (["--model", "vgg"], ["--model 'vgg' (MODEL) is not known", "the closest are", "vgg11"]),
    (["--factor", "2"], ["--factor 2.0 (FACTOR) is out of range"]),
    (["--cuda-graphs", "yes", "--compile", "true"], ["CUDA_GRAPHS='yes' needs", "COMPILE off"]),
    (["--class-weights", "inverse"],
     ["--class-weights 'inverse' (CLASS_WEIGHTS) is not known; choose one of None, 'balanced'"]),
    (["--mixup", "-1"], ["--mixup -1.0 (MIXUP) is out of range: use a number >= 0 (0: off)"]),
])
def test_bad_constants_exit_2_with_one_line(tiny_run, args, fragments, capsys):
    assert_one_clean_line(main_in_process(tiny_run[0] + args, capsys), *fragments)


def test_missing_data_offline_exits_2_with_one_line_and_no_traceback(tmp_path):
    # DOWNLOAD on, no network
    result = run_main(["--data-dir", tmp_path / "none", "--output-dir", tmp_path])
    assert_one_clean_line(result, "cifar-10-batches-py", "DATA_DIR")


def test_an_unwritable_output_dir_is_reported_before_training(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args, _ = tiny_run
    result = main_in_process(args + ["--output-dir", blocker / "out"], capsys)
    assert_one_clean_line(result, "OUTPUT_DIR")
    assert "Epoch" not in result.stdout


@pytest.mark.parametrize("flag", ["--weights", "--resume"])
def test_bad_checkpoints_exit_2_and_leave_good_files_alone(tiny_run, tmp_path, flag, capsys):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    before = {name: (out / name).read_bytes()
              for name in ("best_model.pth", "training_metrics.csv")}
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((out / "last_checkpoint.pth").read_bytes()[:1000])
    other = tmp_path / "resnet.pth"
    import model_module
    utils.save_torch(model_module.get_model("resnet18", 10).state_dict(), str(other))
    cases = [([flag, tmp_path / "missing.pth"], "does not exist"), ([flag, truncated], "truncated"),
             ([flag, out / "training_metrics.csv"], "not a PyTorch checkpoint")]
    if flag == "--weights":
        cases += [
            ([flag, other], "does not fit this model"),
            (["--model", "resnet18", flag, out / "best_model.pth"], "does not fit this model")]
    else:
        cases += [([flag, other], "not a last_checkpoint.pth"),
                  (["--model", "resnet18", flag, out / "last_checkpoint.pth"], "MODEL = 'cnn'")]
    for extra, fragment in cases:
        assert_one_clean_line(main_in_process(args + extra, capsys), fragment)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / "previous").exists()


def test_bad_data_exits_2_with_one_line(tmp_path, capsys):
    common = ["--output-dir", tmp_path / "out", "--download", "false"]
    truncated = write_fake_cifar(tmp_path / "truncated", per_batch=20)
    batch = tmp_path / "truncated" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:300])
    assert_one_clean_line(main_in_process(["--data-dir", truncated, *common], capsys),
                          "data_batch_2")
    one_class = write_image_tree(tmp_path / "one", splits=("train",), classes=("only",))
    assert_one_clean_line(main_in_process(["--dataset", "folder", "--data-dir", one_class, *common],
                                          capsys), "at least two")
    empty_val = write_image_tree(tmp_path / "empty", splits=("train",))
    (tmp_path / "empty" / "val" / "cats").mkdir(parents=True)
    assert_one_clean_line(main_in_process(["--dataset", "folder", "--data-dir", empty_val, *common],
                                          capsys), "no readable images")
    small = write_fake_cifar(tmp_path / "small", per_batch=20)
    assert_one_clean_line(main_in_process(["--data-dir", small, *common, "--val-split", "20",
                                           "--train-subset", "500"], capsys),
                          "--train-subset (TRAIN_SUBSET) 500")


def test_a_small_photo_folder_with_only_train_trains_with_the_default_constants(tmp_path, capsys):
    # 3 classes x 30 images
    photos = write_image_tree(tmp_path / "photos", splits=("train",), per_class=30)
    out = tmp_path / "out"
    result = main_in_process(["--dataset", "folder", "--data-dir", photos, "--output-dir", out,
                              "--epochs", "1", "--ask-epoch", "none"], capsys)
    assert result.returncode == 0, result.stderr
    assert "1 batch of 128 per epoch" in result.stdout
    assert ("Validation accuracy (no test split): " in result.stdout
            and "Test accuracy" not in result.stdout)
    report = pd.read_csv(out / "test_report.csv")
    # a tenth
    assert report.set_index("class").loc[["cats", "dogs", "owls"], "support"].tolist() == [3, 3, 3]


def test_a_ten_to_one_folder_trains_balanced_and_mixed_and_reports_each_classs_recall(
        tmp_path, capsys, monkeypatch):
    photos = write_image_tree(tmp_path / "photos", splits=("train", "test"),
                              classes=("cats", "dogs"), per_class=20)
    for i in range(18):  # 20 cats, 2 dogs
        os.remove(tmp_path / "photos" / "train" / "dogs" / f"{i}.png")
    setup, runs = run_module.setup, []
    monkeypatch.setattr(run_module, "setup",
                        lambda *a, **k: runs.append(setup(*a, **k)) or runs[-1])
    out = tmp_path / "out"
    result = main_in_process(["--dataset", "folder", "--data-dir", photos, "--output-dir", out,
                              "--epochs", "1", "--ask-epoch", "none", "--val-split", "0",
                              "--batch-size", "8", "--cache-dir", "none", "--mixup", "0.2",
                              "--cutmix", "1.0", "--class-weights", "balanced"], capsys)
    assert result.returncode == 0, result.stderr
    run = runs[0]
    assert (run.data.class_counts == (20, 2)
            and isinstance(run.data.train, loader_module.MixedLoader))
    assert run.fit.class_weights == pytest.approx((22 / 40, 22 / 4))
    assert ("class weights (CLASS_WEIGHTS balanced, the training loss only): 0.55 "
            "(cats) to 5.5 (dogs)" in result.stdout)
    recalls = pd.read_csv(out / "test_report.csv").set_index("class")["recall"]
    lines = result.stdout.split(
        "Recall of each class (the share of its images called it):\n")[1].splitlines()
    assert [line.split(":")[0].strip() for line in lines[:2]] == ["cats", "dogs"]
    assert [float(line.split(":")[1].strip(" %")) for line in lines[:2]] == pytest.approx(
        [100 * recalls["cats"], 100 * recalls["dogs"]], abs=0.005)


def test_the_class_weights_line_names_the_lightest_and_the_heaviest_class():
    assert run_module._class_weights_line((0.6, 3.0, 0.5), ["cats", "dogs", "owls"]) == (
        "class weights (CLASS_WEIGHTS balanced, the training loss only): 0.5 (owls) to 3 (dogs)")
    assert run_module._class_weights_line((1.0, 1.0), ["cats", "dogs"]).endswith(
        ": 1 for every class (a balanced split)")


@pytest.mark.parametrize("where, fragment",
                         [("cifar-10-batches-py", "holds CIFAR-10's files itself: use its parent"),
                          ("cifar-10-batches-py/data_batch_1", "is a file, not a folder")])
def test_a_data_dir_at_the_wrong_level_names_the_folder_to_give(where, fragment, fake_cifar,
                                                                tmp_path, capsys):
    result = main_in_process(["--data-dir", os.path.join(fake_cifar, where),
                              "--output-dir", tmp_path / "out", "--download", "false"], capsys)
    assert_one_clean_line(result, "--data-dir (DATA_DIR)", fragment)


def test_a_run_without_its_data_creates_nothing(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    # downloads: offline
    result = main_in_process(["--data-dir", nowhere, "--output-dir", tmp_path / "out"], capsys)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert os.listdir(tmp_path) == []


def test_resume_from_a_run_with_other_classes_is_refused(tiny_run, tmp_path, capsys):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    checkpoint = utils.load_torch(str(out / "last_checkpoint.pth"))
    checkpoint["classes"] = checkpoint["classes"][:5] + ["a", "b", "c", "d", "e"]
    other = tmp_path / "other.pth"
    utils.save_torch(checkpoint, str(other))
    assert_one_clean_line(main_in_process(args + ["--resume", other], capsys),
                          "trained on other classes")


# ------------------------------------------------------------------------- interruptions and resume


def start_main(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_for_rows(csv, rows, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"main.py ended early: {process.communicate()}")
        if csv.exists() and len(pd.read_csv(csv)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError("no progress")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_finishes_cleanly(tiny_run, signum, status):
    args, out = tiny_run
    process = start_main(args + ["--epochs", "500"])
    wait_for_rows(out / "training_metrics.csv", 2, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert ("Traceback" not in stderr
            and f"to go on, run: python main.py --resume auto --output-dir {out}" in stderr)
    assert "Restored the best weights" in stdout
    rows = len(pd.read_csv(out / "training_metrics.csv"))
    checkpoint = utils.load_torch(str(out / "last_checkpoint.pth"))
    assert rows >= 2 and checkpoint["epoch"] == rows and len(checkpoint["history"]) == rows
    utils.load_state_dict(str(out / "best_model.pth"))


@pytest.mark.parametrize("how", ["finished", "interrupted", "failed"])
def test_a_signal_while_the_run_ends_is_ignored_so_its_ending_keeps_its_status_and_one_line(
        how, monkeypatch, capsys):
    # torchrun's agent sends SIGTERM to every process once one dies, whatever each is doing
    def signals():
        for signum in (signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), signum)
        time.sleep(0.1)

    def run(*args):
        if how == "interrupted":
            raise KeyboardInterrupt
        if how == "failed":
            raise process_module.WorkerDied("a worker process ended")
        return run_module.Outcome(0)

    def end(status, line):
        print(line, file=sys.stderr)
        signals()
        return status
    monkeypatch.setattr(main, "_run", run)
    monkeypatch.setattr(main.distributed_module, "end_together", end)
    monkeypatch.setattr(main.distributed_module, "close_distributed", signals)
    result = main_in_process([], capsys)
    assert result.returncode == {"finished": 0, "interrupted": 130, "failed": 4}[how]
    assert len(result.stderr.splitlines()) == (how != "finished"), result.stderr


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_an_interrupted_run_stops_keeps_the_first_ones_status_line_and_files(
        tiny_run, capsys, monkeypatch, second):
    # Ctrl-C in epoch 2, then another signal (a terminal's SIGTERM, say) as the curves are drawn
    args, out = tiny_run
    real_evaluate, real_plot = train_module.evaluate, report_module.plot_training_curves
    validations = []

    def evaluate(*args, **kwargs):
        validations.append(1)
        if len(validations) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    def plot(*args):
        os.kill(os.getpid(), second)
        return real_plot(*args)
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(report_module, "plot_training_curves", plot)
    result = main_in_process(args + ["--epochs", "3"], capsys)
    assert result.returncode == 130, result.stderr
    assert result.stderr.startswith("Interrupted. The last completed epoch is saved")
    assert len(result.stderr.splitlines()) == 1 and (out / report_module.CURVES).exists()


def test_sigterm_amid_an_exporters_extension_import_is_an_interruption_not_an_export_error(
        tiny_run, capsys, monkeypatch):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0

    def export(*args, **kwargs):  # pybind11 turns an interrupt in a module's set-up into this
        raise ImportError("initialization failed") from process_module.Terminated()
    monkeypatch.setattr(inference_module.export_module, "export", export)
    result = main_in_process(args + ["--export", "onnx"], capsys)
    assert (result.returncode, result.stderr) == (143, "Interrupted while exporting the model.\n")


def test_kill_9_then_resume_matches_the_uninterrupted_run(tiny_run, tmp_path):
    args, out = tiny_run
    args = (
        args + ["--epochs", "6", "--patience", "1", "--stop-patience", "10", "--threshold", "0.3"])
    straight = tmp_path / "straight"
    assert run_main(args + ["--output-dir", straight]).returncode == 0

    process = start_main(args)
    wait_for_rows(out / "training_metrics.csv", 2, process)
    process.kill()
    process.communicate()
    killed_at = len(pd.read_csv(out / "training_metrics.csv"))
    assert killed_at < 6, "the run finished before it could be killed"
    utils.load_torch(str(out / "last_checkpoint.pth"))  # every file stays loadable
    utils.load_state_dict(str(out / "best_model.pth"))

    # the run's own settings, from its checkpoint
    resumed = run_main(["--resume", "auto", "--output-dir", out])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout
    expected, actual = (pd.read_csv(straight / "training_metrics.csv"),
                        pd.read_csv(out / "training_metrics.csv"))
    assert list(actual["epoch"]) == list(expected["epoch"]) == list(range(1, 7))
    numeric = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "next_lr"]
    assert (actual[numeric] - expected[numeric]).abs().max().max() <= 1e-6
    assert list(actual["event"].fillna("")) == list(expected["event"].fillna(""))
    best = torch.load(out / "best_model.pth", weights_only=True)
    reference = torch.load(straight / "best_model.pth", weights_only=True)
    assert all(torch.allclose(best[k].float(), reference[k].float(), atol=1e-6) for k in best)


def test_a_cpu_run_trains_in_the_precision_its_trial_chose_and_a_resume_keeps_it(
        tiny_run, capsys, monkeypatch):
    args, out = tiny_run
    monkeypatch.setattr(main, "BF16_TRIAL_STEPS", 1)  # the tiny run is long enough to measure
    used = []
    train_one_epoch = train_module.train_one_epoch

    def recording(step, *args, **kwargs):
        used.append(step.autocast_dtype)
        return train_one_epoch(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", recording)
    monkeypatch.setattr(step_module, "cpu_has_bf16", lambda: True)  # whatever this machine's CPU
    # a CPU where bf16 pays
    monkeypatch.setattr(step_module, "bf16_speedup_on_cpu", lambda *a, **k: 3.0)
    result = main_in_process(args + ["--epochs", "1"], capsys)
    assert (result.returncode == 0
            and "ran 3.00x as fast as fp32, so training is in bf16" in result.stdout)
    assert used == [torch.bfloat16]
    assert json.loads((out / "best_model.json").read_text())["precision"] == "bf16"

    # a new trial would say fp32
    monkeypatch.setattr(step_module, "bf16_speedup_on_cpu", lambda *a, **k: 0.5)
    result = main_in_process(args + ["--epochs", "2", "--resume", "auto"], capsys)
    assert result.returncode == 0 and "Resuming" in result.stdout and "trial" not in result.stdout
    assert used == [torch.bfloat16] * 2  # the resumed epoch trains as the first did

    result = main_in_process(args + ["--epochs", "1"], capsys)  # a new run: a new trial
    assert "so training is in fp32" in result.stdout and used[-1] is None
    assert json.loads((out / "best_model.json").read_text())["precision"] == "fp32"
    monkeypatch.setattr(main, "BF16_TRIAL_STEPS", 10 ** 9)  # a run too short to pay for a trial
    monkeypatch.setattr(step_module, "bf16_speedup_on_cpu",
                        lambda *a, **k: pytest.fail("measured a short run"))
    result = main_in_process(args + ["--epochs", "1"], capsys)
    assert result.returncode == 0 and "trial" not in result.stdout and used[-1] is None


def test_resume_auto_without_a_checkpoint_starts_afresh(tiny_run, capsys):
    args, out = tiny_run
    result = main_in_process(args + ["--epochs", "1", "--resume", "auto"], capsys)
    assert result.returncode == 0 and "Resuming" not in result.stdout


def test_a_resume_takes_more_epochs_but_refuses_a_flag_that_would_change_the_run(tiny_run, capsys):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "1", "--lr", "0.02"], capsys).returncode == 0
    refused = main_in_process(["--resume", "auto", "--output-dir", out, "--lr", "0.1"], capsys)
    assert_one_clean_line(refused, "--lr 0.1 differs from the run", "LR = 0.02")
    assert len(pd.read_csv(out / "training_metrics.csv")) == 1
    result = main_in_process(
        ["--resume", "auto", "--output-dir", out, "--epochs", "2", "--lr", "0.02"], capsys)
    assert result.returncode == 0 and "Resuming" in result.stdout
    history = pd.read_csv(out / "training_metrics.csv")
    assert list(history["epoch"]) == [1, 2] and history["lr"].iloc[0] == pytest.approx(0.02)


def test_a_resume_asks_anew_when_told_and_refuses_a_new_epoch_count_under_onecycle(
        tiny_run, capsys):
    args, out = tiny_run
    # ASK_EPOCH none: never asks
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    result = main_in_process(
        ["--resume", "auto", "--output-dir", out, "--epochs", "2", "--ask-epoch", "2"], capsys)
    # it came to ask after epoch 2
    assert result.returncode == 0 and "prompts are off" in result.stdout
    onecycle = out.parent / "onecycle"
    assert main_in_process(
        args + ["--output-dir", onecycle, "--epochs", "1", "--schedule", "onecycle"],
        capsys).returncode == 0
    refused = main_in_process(["--resume", "auto", "--output-dir", onecycle, "--epochs", "3"],
                              capsys)
    assert_one_clean_line(refused, "--epochs 3 differs from the run", "EPOCHS = 1")


def test_a_cosine_run_decays_the_lr_to_0_uncut_and_a_resume_keeps_its_epochs(tiny_run, capsys):
    args, out = tiny_run
    result = main_in_process(args + ["--epochs", "2", "--schedule", "cosine", "--lr", "0.05"],
                             capsys)
    assert result.returncode == 0, result.stderr
    history = pd.read_csv(out / "training_metrics.csv")
    assert history["lr"].tolist() == pytest.approx([0.05, 0.025])  # epoch 2 starts half way: cos 90
    assert history["next_lr"].iloc[-1] == 0  # after the last step
    assert not history["event"].str.contains("cut", na=False).any()  # LRA leaves the LR alone
    refused = main_in_process(["--resume", "auto", "--output-dir", out, "--epochs", "3"], capsys)
    assert_one_clean_line(refused, "--epochs 3 differs from the run", "EPOCHS = 2")


def test_a_run_with_a_relative_data_dir_resumes_from_another_directory(tmp_path, capsys,
                                                                       monkeypatch):
    write_fake_cifar(tmp_path / "project" / "data", per_batch=40)
    monkeypatch.chdir(tmp_path / "project")
    out = tmp_path / "out"
    args = ["--data-dir", "data", "--output-dir", out, *TINY[2:], "--val-split", "20"]
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    monkeypatch.chdir(tmp_path)  # where ./data is another folder (here: none)
    result = main_in_process(["--resume", "auto", "--output-dir", out, "--epochs", "2"], capsys)
    assert result.returncode == 0 and "Resuming" in result.stdout, result.stderr
    assert len(pd.read_csv(out / "training_metrics.csv")) == 2


def test_resume_after_the_last_epoch_trains_no_more(tiny_run, capsys):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "2"], capsys).returncode == 0
    result = main_in_process(args + ["--epochs", "2", "--resume", "auto"], capsys)
    assert result.returncode == 0 and "Resuming" in result.stdout
    assert len(pd.read_csv(out / "training_metrics.csv")) == 2


METRICS = "training_metrics.csv"


def test_a_run_with_ema_accumulation_and_clipping_resumes_as_if_never_stopped_tested_on_its_ema(
        tiny_run, tmp_path, capsys, one_thread):
    args, out = tiny_run
    args = [str(a) for a in args] + ["--ema-decay", "0.9", "--accumulate-steps", "2",
                                     "--clip-grad-norm", "1", "--threshold", "0"]
    straight = str(tmp_path / "straight")
    capsys.readouterr()
    expected = main.run_main(args + ["--output-dir", straight, "--epochs", "3"])
    assert (expected.status == 0
            and "batches of 32 per epoch, 2 to an optimizer step" in capsys.readouterr().out)
    assert main_in_process(args + ["--epochs", "2"], capsys).returncode == 0
    resumed = main.run_main(["--resume", "auto", "--output-dir", str(out), "--epochs", "3"])
    assert resumed.status == 0 and "Resuming" in capsys.readouterr().out
    numeric = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "next_lr"]
    before, after = pd.read_csv(tmp_path / "straight" / METRICS), pd.read_csv(out / METRICS)
    assert (list(after["epoch"]) == [1, 2, 3]
            and (after[numeric] - before[numeric]).abs().max().max() <= 1e-6)
    assert resumed.test["loss"] == pytest.approx(expected.test["loss"], rel=1e-6)

    # the best epoch's EMA, which the test saw
    best = torch.load(out / "best_model.pth", weights_only=True)
    checkpoint = utils.load_torch(str(out / "last_checkpoint.pth"))
    assert all(torch.equal(best[k], v) for k, v in checkpoint["best"]["ema"]["model"].items())
    config = main.build_config(main.parse_config(args)[0])  # the run's data, read again
    data = data_module.get_data(config.data, torch.device("cpu"))
    model = model_module.get_model("cnn", 10)
    model.load_state_dict(best)
    assert train_module.evaluate(model, data.test)["loss"] == pytest.approx(
        resumed.test["loss"], rel=1e-5)
    # the raw weights of that epoch score otherwise
    model.load_state_dict(checkpoint["best"]["model"])
    assert train_module.evaluate(model, data.test)["loss"] != pytest.approx(
        resumed.test["loss"], rel=1e-5)


# ------------------------------------------------------------ earlier runs kept, one run per folder


def run_files(folder):
    """A run's files in folder, by name (not the lock, nor previous/)."""
    return {path.name: path.read_bytes()
            for path in folder.iterdir() if path.is_file() and path.name != ".lock"}


def started(folder):
    return datetime.datetime.fromisoformat(
        json.loads((folder / "best_model.json").read_text())["started"])


def test_a_second_run_keeps_the_first_runs_files_in_previous_under_its_start_time(
        tiny_run, tmp_path):
    """Run as users run it, in a folder of their own under umask 027: every output is -rw-r-----."""
    args, out = tiny_run
    args, cwd = args + ["--epochs", "1"], tmp_path / "cwd"
    cwd.mkdir()
    data_before = {path: path.stat().st_mtime_ns for path in (tmp_path / "data").rglob("*")}
    first_began = int(time.time())
    assert run_main(args, cwd=cwd, umask=0o027).returncode == 0
    first_ended, first = time.time(), run_files(out)
    assert set(first) == {"last_checkpoint.pth", "best_model.pth", "best_model.json",
                          "training_metrics.csv", "training_curves.png", "test_report.csv",
                          "confusion_matrix.png", "misclassified.png"}

    second_began = int(time.time())
    second = run_main(args + ["--lr", "0.01"], cwd=cwd, umask=0o027)
    assert second.returncode == 0, second.stderr
    [kept] = (out / "previous").iterdir()
    assert run_files(kept) == first
    assert first_began <= datetime.datetime.strptime(kept.name,
                                                     "%Y-%m-%dT%H-%M-%S").timestamp() <= first_ended
    assert f"The earlier run's files are kept in {kept}" in second.stdout.splitlines()
    assert set(run_files(out)) == set(first) and started(out).timestamp() >= second_began
    assert run_files(out)["best_model.pth"] != first["best_model.pth"]

    for path in [out, out / "previous", kept, *out.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path
    assert list(cwd.iterdir()) == []  # nothing lands outside OUTPUT_DIR
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "data").rglob("*")} == data_before


def test_a_second_run_is_refused_at_once_while_the_first_trains(tiny_run, capsys):
    args, out = tiny_run
    first = start_main(args + ["--epochs", "5", "--stop-patience", "100"])
    wait_for_rows(out / "training_metrics.csv", 1, first)
    for extra in (["--epochs", "1"], ["--resume", "auto"]):  # a new run, and a resume
        began = time.time()
        refused = main_in_process(args + extra, capsys)
        assert time.time() - began < 5
        assert_one_clean_line(refused,
                              f"OUTPUT_DIR {out} is in use by another run (process {first.pid})")
    assert first.poll() is None, "the first run ended before the others were refused"
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert list(pd.read_csv(out / "training_metrics.csv")["epoch"]) == list(range(1, 6))
    assert not (out / "previous").exists()


def test_a_run_killed_with_kill_9_blocks_nothing_and_its_files_are_kept(tiny_run, capsys):
    args, out = tiny_run
    process = start_main(args + ["--epochs", "500"])
    wait_for_rows(out / "training_metrics.csv", 2, process)
    process.kill()
    process.communicate()
    # its lock file stays, naming the dead process
    assert (out / ".lock").read_text() == f"{process.pid}\n"
    interrupted = {name: data for name, data in run_files(out).items() if not name.startswith(".")}
    (out / ".last_checkpoint.pth.k9x2ab.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    (out / ".my_notes.tmp").write_text("not the run's")
    # --predict's, which takes no lock
    (out / ".predictions.csv.p1q2r3.tmp").write_text("path,top1\n")
    result = main_in_process(args + ["--epochs", "1"], capsys)
    assert result.returncode == 0, result.stderr
    [kept] = (out / "previous").iterdir()
    # no training_curves.png after kill -9
    assert run_files(kept) == interrupted and len(interrupted) == 4
    assert not list(out.glob(".last_checkpoint.pth.*.tmp")) and (out / ".my_notes.tmp").exists()
    assert (out / ".predictions.csv.p1q2r3.tmp").exists()


def test_resume_and_predict_find_the_current_run_and_a_moved_run_still_predicts(
        tiny_run, tmp_path, capsys):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    first = run_files(out)
    assert main_in_process(args + ["--epochs", "1", "--lr", "0.01"], capsys).returncode == 0
    second_started = json.loads((out / "best_model.json").read_text())["started"]
    [kept] = (out / "previous").iterdir()

    resumed = main_in_process(args + ["--epochs", "2", "--lr", "0.01", "--resume", "auto"], capsys)
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout and "kept" not in resumed.stdout
    assert list((out / "previous").iterdir()) == [kept] and run_files(kept) == first
    assert len(pd.read_csv(out / "training_metrics.csv")) == 2
    # the same run, going on
    assert json.loads((out / "best_model.json").read_text())["started"] == second_started

    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(picture)
    for folder in (out, kept):
        predicted = main_in_process(["--output-dir", folder, "--predict", picture], capsys)
        assert (predicted.returncode == 0
                and predicted.stdout.startswith(f"{picture}: ")), predicted.stderr


def test_resuming_another_folders_checkpoint_keeps_this_folders_run(tiny_run, tmp_path, capsys):
    args, out = tiny_run
    other = tmp_path / "other"
    assert main_in_process(args + ["--epochs", "1", "--output-dir", other], capsys).returncode == 0
    assert main_in_process(args + ["--epochs", "1", "--lr", "0.01"], capsys).returncode == 0
    own = run_files(out)
    resumed = main_in_process(args + ["--epochs", "2", "--resume", other / "last_checkpoint.pth"],
                              capsys)
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout
    [kept] = (out / "previous").iterdir()
    assert run_files(kept) == own
    assert len(pd.read_csv(out / "training_metrics.csv")) == 2


# ----------------------------------------------------------------------------- real data


def test_the_quick_start_trains_on_real_cifar10(cifar_dir, tmp_path):
    """The README's quick start command (5,000 images, 3 epochs), on the real data."""
    started = time.time()
    result = run_main(["--data-dir", cifar_dir, "--train-subset", "5000", "--val-split", "1000",
                       "--epochs", "3", "--output-dir", tmp_path], timeout=900)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "training_metrics.csv")
    assert len(frame) == 3 and frame["val_acc"].max() >= 0.35, frame
    assert "Test accuracy" in result.stdout
    print(f"quick run: {time.time() - started:.0f} s, best val acc {frame['val_acc'].max():.3f}")


# --------------------------------------------------------------------------- a full or failing disk


def fail_writes(monkeypatch, name, after=0, error=errno.ENOSPC):
    """Make every write of the file `name` after its first `after` ones fail with `error`, as a full
    (ENOSPC), failing (EIO) or read-only (EROFS) disk would; returns the paths written whole, in
    order."""
    written = []

    def fault(path):
        if os.path.basename(path) == name and written.count(name) >= after:
            raise OSError(error, os.strerror(error))
        written.append(os.path.basename(path))
    monkeypatch.setattr(files_module, "write_fault", fault)
    return written


def assert_loadable(out):
    """The checkpoint, and whichever of the other files a run writes while it trains are there, load
    as they should (weights only)."""
    utils.load_torch(str(out / "last_checkpoint.pth"))
    if (out / "best_model.pth").exists():
        utils.load_state_dict(str(out / "best_model.pth"))
    if (out / "best_model.json").exists():
        json.loads((out / "best_model.json").read_text())
    if (out / "training_metrics.csv").exists():
        assert len(pd.read_csv(out / "training_metrics.csv")) >= 1


@pytest.mark.parametrize("name, after, error", [
    ("last_checkpoint.pth", 1, errno.ENOSPC), ("last_checkpoint.pth", 1, errno.EIO),
    ("last_checkpoint.pth", 1, errno.EROFS), ("best_model.pth", 0, errno.ENOSPC),
    ("best_model.json", 0, errno.ENOSPC), ("training_metrics.csv", 1, errno.ENOSPC),
    ("training_curves.png", 0, errno.ENOSPC), ("test_report.csv", 0, errno.ENOSPC),
    ("confusion_matrix.png", 0, errno.ENOSPC), ("misclassified.png", 0, errno.ENOSPC)])
def test_each_file_a_run_writes_that_fails_gives_one_line_and_status_3(tiny_run, name, after, error,
                                                                       capsys, monkeypatch):
    args, out = tiny_run
    fail_writes(monkeypatch, name, after, error)
    result = main_in_process(args + ["--epochs", "2"], capsys)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert (len(lines) == 1
            and lines[0].startswith(f"error: could not write {name} in {out}: ")), result.stderr
    assert os.strerror(error).lower() in lines[0]
    assert_loadable(out)
    # an epoch file: the run stops in the next epoch
    if name in checkpoint_module.TRAINING_FILES[:4]:
        assert utils.load_torch(str(out / "last_checkpoint.pth"))["epoch"] <= after + 1


def test_predictions_and_an_export_that_cannot_be_written_give_one_line_and_status_3(
        tiny_run, capsys, monkeypatch, tmp_path):
    args, out = tiny_run
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    for name, command in [("predictions.csv", ["--predict", image]),
                          ("model.pt2", ["--export", "pt2"])]:
        fail_writes(monkeypatch, name)
        result = main_in_process(["--output-dir", out, *command], capsys)
        assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
        assert f"could not write {name} in {out}: no space left on device" in result.stderr
        assert not (out / name).exists()
    assert_loadable(out)


def test_a_run_stopped_by_a_full_disk_resumes_once_there_is_room_as_if_never_stopped(
        tiny_run, tmp_path, capsys, monkeypatch):
    args, out = tiny_run
    args = args + ["--epochs", "4", "--threshold", "0"]
    straight = tmp_path / "straight"
    assert main_in_process(args + ["--output-dir", straight], capsys).returncode == 0
    # epoch 1's checkpoint lands, its best model does not
    fail_writes(monkeypatch, "best_model.pth")
    stopped = main_in_process(args, capsys)
    assert stopped.returncode == 3 and "--resume auto --output-dir" in stopped.stderr
    assert "best_model.pth was never written whole" in stopped.stdout
    assert utils.load_torch(str(out / "last_checkpoint.pth"))["epoch"] == 1
    monkeypatch.setattr(files_module, "write_fault", None)  # space freed
    resumed = main_in_process(["--resume", "auto", "--output-dir", out], capsys)
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout, resumed.stderr
    expected, actual = (pd.read_csv(straight / "training_metrics.csv"),
                        pd.read_csv(out / "training_metrics.csv"))
    numeric = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "next_lr"]
    assert (list(actual["epoch"]) == [1, 2, 3, 4]
            and (actual[numeric] - expected[numeric]).abs().max().max() <= 1e-6)


def test_a_disk_too_small_for_the_epoch_files_is_refused_before_anything_is_written(
        tiny_run, capsys, monkeypatch):
    args, out = tiny_run
    monkeypatch.setattr(files_module, "free_bytes", lambda folder: 2**20)
    result = main_in_process(args, capsys)
    assert_one_clean_line(result, f"{out} has 1 MB free", "epoch files need about", "--output-dir")
    assert not out.exists()


def test_without_validation_the_test_set_is_read_once_at_the_end_and_the_val_columns_are_empty(
        tiny_run, capsys, monkeypatch):
    args, out = tiny_run
    args = [a for a in args if a not in ("--val-split", "20")]
    evaluated, evaluate = [], train_module.evaluate

    def recording(model, loader, **kwargs):
        evaluated.append(loader)
        return evaluate(model, loader, **kwargs)
    monkeypatch.setattr(train_module, "evaluate", recording)
    setup = run_module.setup
    runs = []
    monkeypatch.setattr(run_module, "setup",
                        lambda *a, **k: runs.append(setup(*a, **k)) or runs[-1])
    result = main_in_process(args + ["--val-split", "0", "--epochs", "3"], capsys)
    assert result.returncode == 0, result.stderr
    data = runs[0].data
    # once, after training, and nothing else evaluated
    assert data.val is None and evaluated == [data.test]
    frame = pd.read_csv(out / "training_metrics.csv")
    assert (frame["val_loss"].isna().all() and frame["val_acc"].isna().all()
            and list(frame["epoch"]) == [1, 2, 3])
    # the last epoch's weights
    assert json.loads((out / "best_model.json").read_text())["epoch"] == 3
    assert "No validation images" in result.stdout


def test_a_run_that_ends_at_chance_is_told_so_with_the_likely_cause():
    confusion = torch.tensor([[30, 0, 0], [30, 0, 0], [30, 0, 0]])  # every image one class
    chance = {"acc": 1 / 3, "loss": math.log(3), "confusion": confusion}
    learnt_in_training = run_module.chance_warning(chance, 3,
                                                   [{"train_acc": 0.4}, {"train_acc": 0.99}])
    assert learnt_in_training.startswith("warning: the final accuracy 33.3% is chance (1/3) "
                                         "and the loss 1.0986 is ln 3")
    assert ("training accuracy reached 99%" in learnt_in_training
            and "BatchNorm" in learnt_in_training)
    # nothing learnt: in one epoch, train longer; in ten, the LR is the likely cause
    one_epoch = run_module.chance_warning(chance, 3, [{"train_acc": 0.34}])
    assert "nothing was learnt in 1 epoch: train longer (--epochs 10 or more)" in one_epoch
    assert "--lr" not in one_epoch
    assert "a lower --lr" in run_module.chance_warning(chance, 3, [{"train_acc": 0.34}] * 10)
    assert run_module.chance_warning({**chance, "acc": 0.6}, 3, []) is None  # learnt something
    # not the same output for every image
    assert run_module.chance_warning({**chance, "loss": 0.7}, 3, []) is None


@pytest.mark.parametrize("warmup, warned", [(2, True), (3, True), (1, False)])
def test_a_warm_up_over_every_epoch_warns_once(tiny_run, capsys, warmup, warned):
    args, _ = tiny_run
    result = main_in_process([str(a) for a in args] + ["--epochs", "2", "--warmup-epochs",
                                                       str(warmup)], capsys)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "covers every epoch" in line]
    assert warnings == ([f"warning: --warmup-epochs (WARMUP_EPOCHS) {warmup} covers every epoch of "
                         "the run (--epochs (EPOCHS) 2): the LR rises throughout and LRA never "
                         "counts or cuts; set it below the epochs"] if warned else []), warnings


def test_freeze_on_a_random_body_warns_once_saying_what_to_add(tiny_run, capsys):
    args, out = tiny_run
    args = [str(a) for a in args]
    result = main_in_process(args + ["--epochs", "1", "--freeze", "true"], capsys)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "--freeze true" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "--pretrained default" in warnings[0] and "--weights PATH" in warnings[0]
    options = main.build_config(main.parse_config(args + ["--freeze", "true"])[0]).run
    assert run_module.freeze_warning(options) == warnings[0]
    for more in (["--weights", str(out / "best_model.pth")], ["--freeze", "false"],
                 ["--model", "resnet18", "--pretrained", "default"]):
        options = main.build_config(main.parse_config(args + ["--freeze", "true", *more])[0]).run
        assert run_module.freeze_warning(options) is None


def test_a_run_resumed_during_warm_up_continues_exactly_and_records_its_monitor(
        tiny_run, tmp_path, capsys):
    args, out = tiny_run
    args = [str(a) for a in args] + ["--warmup-epochs", "2", "--monitor", "balanced_acc",
                                     "--patience", "1", "--threshold", "0"]
    straight = tmp_path / "straight"
    assert main_in_process(args + ["--output-dir", straight, "--epochs", "4"],
                           capsys).returncode == 0
    assert main_in_process(args + ["--epochs", "1"], capsys).returncode == 0
    resumed = main_in_process(["--resume", "auto", "--output-dir", out, "--epochs", "4"], capsys)
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout, resumed.stderr
    numeric = ["train_loss", "train_acc", "val_loss", "val_acc", "balanced_acc", "macro_f1", "lr",
               "next_lr"]
    before, after = pd.read_csv(straight / METRICS), pd.read_csv(out / METRICS)
    assert list(after["epoch"]) == [1, 2, 3, 4]
    assert (after[numeric] - before[numeric]).abs().max().max() <= 1e-6
    assert list(after["event"].fillna("")) == list(before["event"].fillna(""))
    # the LR rises step by step over two epochs to LR, which LRA then holds or cuts
    lr = after["lr"].tolist()
    assert lr[0] < lr[1] < lr[2] == 0.05 and after["next_lr"][1] == 0.05
    assert not after["event"][:2].str.contains("cut", na=False).any()
    best = json.loads((out / "best_model.json").read_text())
    assert best["monitor"] == "balanced_acc"
    assert best["score"] == pytest.approx(after["balanced_acc"].max())
    assert best["epoch"] == after["epoch"][after["balanced_acc"].idxmax()]


# ----------------------------------------------------------------------------- off the happy path


@pytest.fixture
def no_data(monkeypatch):
    """Reading the data (decoding, caching) fails the test: what is checked first stops the run."""
    def read(*args, **kwargs):
        raise AssertionError("the data was read before the run was refused")
    monkeypatch.setattr(data_module, "get_data", read)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run on a fake CIFAR-10: (its data folder, its output folder)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_fake_cifar(root / "data", per_batch=40)
    out = root / "out"
    assert main.main(["--data-dir", data, "--output-dir", str(out), *TINY, "--epochs", "1"]) == 0
    return data, out


def copy_run(out, to):
    """A copy of a run's files (not its lock) in the folder `to`."""
    to.mkdir()
    for name, data in run_files(out).items():
        (to / name).write_bytes(data)
    return to


@pytest.mark.parametrize("name", [files_module.LOCK_FILE, *checkpoint_module.RUN_FILES])
def test_a_link_planted_for_any_run_file_is_refused_before_the_data_and_its_target_kept(
        tiny_run, tmp_path, name, no_data, capsys):
    args, out = tiny_run
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    out.mkdir()
    (out / name).symlink_to(victim)
    result = main_in_process(args + ["--epochs", "1"], capsys)
    assert_one_clean_line(result, f"{out / name} is a symbolic link to {victim}", "remove it")
    assert victim.read_text() == "someone else's file\n" and os.listdir(out) == [name]


@pytest.mark.parametrize("folder", ["previous", "tensorboard", "mlruns"])
def test_a_run_folder_planted_as_a_link_is_refused_and_the_earlier_run_stays(
        tiny_run, tmp_path, folder, no_data, capsys):
    args, out = tiny_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "training_metrics.csv").write_text("epoch\n1\n")  # an earlier run's, which would move
    (out / folder).symlink_to(elsewhere)
    result = main_in_process(args + ["--epochs", "1"], capsys)  # tracker or not
    assert_one_clean_line(result, f"{out / folder} is a symbolic link to {elsewhere}, not a folder")
    assert os.listdir(elsewhere) == []
    assert (out / "training_metrics.csv").read_text() == "epoch\n1\n"


def test_an_output_dir_that_is_a_dangling_link_is_refused_at_once_naming_it_and_its_target(
        tiny_run, tmp_path, no_data, capsys):
    args, out = tiny_run
    out.symlink_to(tmp_path / "gone")
    result = main_in_process(args + ["--epochs", "1"], capsys)
    assert_one_clean_line(
        result, f"OUTPUT_DIR {out} is a symbolic link to {tmp_path / 'gone'}, which does not exist")
    assert not (tmp_path / "gone").exists()


def test_crafted_batch_files_never_run_from_the_data_dir_a_resume_or_an_export(
        trained, tmp_path, capsys):
    data, out = trained
    crafted = write_fake_cifar(tmp_path / "crafted", per_batch=40)
    marker = tmp_path / "marker"
    batch = plant_crafted_batch(crafted, marker, "data_batch_2")
    refused = f"{batch} is not a CIFAR-10 batch file: it calls posix.system as it loads"

    result = main_in_process(["--data-dir", crafted, "--output-dir", tmp_path / "a", *TINY], capsys)
    assert_one_clean_line(result, refused)

    checkpoint = torch.load(out / "last_checkpoint.pth", weights_only=True)
    checkpoint["config"]["DATA_DIR"] = crafted  # what --resume reads when --data-dir is not given
    utils.save_torch(checkpoint, str(tmp_path / "crafted.pth"))
    resumed = ["--resume", tmp_path / "crafted.pth", "--output-dir", tmp_path / "b"]
    assert_one_clean_line(main_in_process(resumed, capsys), refused)

    exported = copy_run(out, tmp_path / "c")
    info = json.loads((exported / "best_model.json").read_text())
    (exported / "best_model.json").write_text(json.dumps({**info, "data_dir": crafted}))
    result = main_in_process(["--export", "pt2", "--output-dir", exported], capsys)
    assert_one_clean_line(result, refused)
    assert not marker.exists() and not (exported / "model.pt2").exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("BATCH_SIZE", "64", "BATCH_SIZE takes a whole number, not '64'"),
    ("IMAGE_SIZE", 60000, "IMAGE_SIZE = 60000 is out of range: use a whole number of pixels"),
    ("EPOCHS", -1, "EPOCHS = -1 is out of range"),
    ("MODEL", 5, "MODEL takes text, not 5"),
    ("LR", True, "LR takes a number, not True"),
    ("DATA_DIR", ["x"], "DATA_DIR takes text, not ['x']"),
    ("started", "9999-01-01T00:00:00+00:00", "started = '9999-01-01T00:00:00+00:00' is not when"),
    ("classes", 5, "classes takes a list, each text, not 5"),
    ("image_size", 60000, "image_size = 60000 is out of range")])
def test_a_checkpoint_with_a_hostile_field_stops_the_resume_in_one_line_before_the_data(
        trained, tmp_path, field, value, fragment, no_data, capsys):
    _, out = trained
    checkpoint = torch.load(out / "last_checkpoint.pth", weights_only=True)
    if field.isupper():  # one of the run's settings
        checkpoint["config"][field] = value
    else:
        checkpoint[field] = value
    path = tmp_path / "hostile.pth"
    utils.save_torch(checkpoint, str(path))
    result = main_in_process(["--resume", path, "--output-dir", tmp_path / "new"], capsys)
    assert_one_clean_line(result, f"RESUME {path}: {fragment}", "resume another checkpoint")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("classes", 5, "classes takes a list, each text, not 5"),
    ("mean", [0.5, 0.5], "mean = [0.5, 0.5] is out of range"),
    ("image_size", 60000, "image_size = 60000 is out of range"),
    ("started", "9999-01-01T00:00:00+00:00", "is not when a run started"),
    ("classes", [f"c{i}" for i in range(11)], "does not classify the 11 classes that best_model")])
def test_a_hostile_best_model_json_stops_predict_and_export_in_one_line(trained, tmp_path, field,
                                                                        value, fragment, capsys):
    _, out = trained
    run = copy_run(out, tmp_path / "run")
    info = json.loads((run / "best_model.json").read_text())
    (run / "best_model.json").write_text(json.dumps({**info, field: value}))
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(picture)
    for command in (["--predict", picture], ["--export", "pt2"]):
        assert_one_clean_line(main_in_process(["--output-dir", run, *command], capsys), fragment)
    assert sorted(os.listdir(run)) == sorted(run_files(out))  # nothing written


def test_predictions_csv_escapes_file_and_class_names_that_start_as_formulas(
        trained, tmp_path, monkeypatch, capsys):
    _, out = trained
    run = copy_run(out, tmp_path / "run")
    info = json.loads((run / "best_model.json").read_text())
    classes = ["=cmd|'/c calc'!A0", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "c6", "c7", "c8", "c9"]
    (run / "best_model.json").write_text(json.dumps({**info, "classes": classes}))
    monkeypatch.chdir(tmp_path)
    names = ["=x.png", "@y.png", "+z.png", "plain.png"]  # ("-y.png" would be read as a flag)
    for name in names:
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    result = main_in_process(["--output-dir", run, "--predict", *names], capsys)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert frame["path"].tolist() == ["'=x.png", "'@y.png", "'+z.png", "plain.png"]
    escaped = {"'" + name if name[0] in "=+-@\t\r" else name for name in classes}
    assert set(frame[["top1", "top2", "top3"]].to_numpy().ravel()) <= escaped
    assert pd.api.types.is_float_dtype(frame["p1"])  # numbers stay numbers


def test_missing_published_weights_stop_a_folder_run_before_anything_is_read_or_cached(
        tmp_path, monkeypatch, user_cache, no_data, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty; and no network
    photos = write_image_tree(tmp_path / "photos", splits=("train",), per_class=6)
    result = main_in_process(["--dataset", "folder", "--data-dir", photos, "--model", "resnet18",
                              "--pretrained", "default", "--output-dir", tmp_path / "out"], capsys)
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert_one_clean_line(result, f"PRETRAINED weights resnet18-f37072fd.pth are not in {folder}")
    assert not user_cache.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "torch_home").exists()  # the folders a download would have used: gone


# --------------------------------------------------------------- interruptions and workers anywhere

STALL = """
import os, sys, time
import {module}
real = {module}.{name}

def stalled(*args, **kwargs):  # once {condition}: say so (and in which process), then take long
    if {condition}:
        with open({reached!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({reached!r} + ".tmp", {reached!r})
        time.sleep(60)
    return real(*args, **kwargs)

{module}.{name} = stalled
sys.argv = [{main!r}, *{args!r}]
import runpy
runpy.run_path({main!r}, run_name="__main__")
"""


def start_stalled(args, reached, module, name, condition):
    """python main.py ARGS in a session of its own (so that a Ctrl-C can go to all its processes, as
    a terminal sends it), with module.name replaced by one that stalls once `condition` holds (of
    its args), first writing the id of the process it stalls in to `reached`."""
    code = STALL.format(module=module, name=name, condition=condition, reached=str(reached),
                        main=os.path.join(ROOT, "main.py"), args=[str(a) for a in args])
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    return int(path.read_text())


def ctrl_c(process):
    """Ctrl-C as a terminal sends it: SIGINT to every process of the run; (status, stderr lines)."""
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, [line for line in stderr.splitlines() if line.strip()]


BEFORE_TRAINING = "Interrupted while loading the data and building the model, before training."


@pytest.mark.skipif(sys.platform != "linux", reason="process groups, and /proc")
def test_ctrl_c_while_the_cache_is_built_ends_in_one_line_leaving_no_process_lock_or_file(tmp_path):
    photos = write_image_tree(tmp_path / "photos", splits=("train",), per_class=6)
    cache, reached = tmp_path / "cache", tmp_path / "reached"
    last = os.path.join(photos, "train", "owls", "5.png")
    process = start_stalled(["--dataset", "folder", "--data-dir", photos,
                             "--output-dir", tmp_path / "out", "--cache-dir", cache,
                             "--num-workers", "2"], reached, "image_module", "read_stored",
                            f"args[0] == {last!r}")
    worker = wait_for(reached, process)
    assert worker != process.pid  # a decoding worker
    assert ctrl_c(process) == (130, [BEFORE_TRAINING])  # and no traceback from the workers
    assert_cleaned_up(cache, worker)
    assert not (tmp_path / "out").exists()


def assert_cleaned_up(cache, worker):
    """No half-built cache in the folder, its locks free, the worker gone."""
    assert [name for name in os.listdir(cache) if not name.endswith(".lock")] == []
    for lock in cache.glob("*.lock"):
        fd = os.open(lock, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a process holds it
        os.close(fd)
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(worker)


def signalled(monkeypatch, module, name, when, signum, target=os.getpid):
    """module.name replaced by one that sends signum to target() (this process: the run's) once
    `when` holds of its arguments, having written its process id to $SIGNALLED_DIR/pid, and then
    goes on: a Ctrl-C or a SIGTERM at that very point."""
    real, pids = getattr(module, name), []

    def interrupted(*args, **kwargs):
        if when(*args, **kwargs) and not pids:
            pids.append(os.getpid())
            with open(os.path.join(os.environ["SIGNALLED_DIR"], "pid"), "w") as f:
                f.write(str(os.getpid()))
            os.kill(target(), signum)
            time.sleep(0.5 if os.getpid() != target() else 0)  # a worker: the run stops it
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.skipif(sys.platform != "linux", reason="workers see the patched reader when forked")
def test_sigterm_while_the_cache_is_built_ends_in_one_line_leaving_no_process_lock_or_file(
        tmp_path, capsys, monkeypatch):
    photos = write_image_tree(tmp_path / "photos", splits=("train",), per_class=6)
    monkeypatch.setenv("SIGNALLED_DIR", str(tmp_path))
    last = os.path.join(photos, "train", "owls", "5.png")
    signalled(monkeypatch, image_module, "read_stored", lambda path, size: path == last,
              signal.SIGTERM, target=os.getppid)  # from a worker to the run, as `kill` sends it
    cache = tmp_path / "cache"
    result = main_in_process(["--dataset", "folder", "--data-dir", photos,
                              "--output-dir", tmp_path / "out", "--cache-dir", cache,
                              "--num-workers", "2"], capsys)
    assert result.returncode == 143 and result.stderr == BEFORE_TRAINING + "\n"
    assert_cleaned_up(cache, int((tmp_path / "pid").read_text()))


def test_ctrl_c_in_the_evaluation_predict_export_or_lr_finder_ends_in_one_line_predict_keeping_rows(
        tiny_run, tmp_path, capsys, monkeypatch):
    args, out = tiny_run
    monkeypatch.setenv("SIGNALLED_DIR", str(tmp_path))
    with monkeypatch.context() as patch:
        signalled(patch, train_module, "evaluate", lambda *args, collect=False, **kwargs: collect,
                  signal.SIGINT)  # the final evaluation's
        result = main_in_process(args + ["--epochs", "1"], capsys)
    assert result.returncode == 130 and result.stderr == (
        "Interrupted during the final evaluation; training is done and saved. To evaluate, run: "
        f"python main.py --resume auto --output-dir {out}\n")
    assert not (out / "test_report.csv").exists()
    utils.load_state_dict(str(out / "best_model.pth"))

    images = tmp_path / "new"
    images.mkdir()
    total, kept = inference_module.PREDICT_BATCH + 6, inference_module.PREDICT_BATCH
    for i in range(total):
        Image.fromarray(np.full((32, 32, 3), 3 * i, dtype=np.uint8)).save(images / f"{i:03d}.png")
    second_batch = str(images / f"{kept + 2:03d}.png")
    with monkeypatch.context() as patch:
        signalled(patch, image_module, "load_image", lambda path, *args: path == second_batch,
                  signal.SIGINT)
        result = main_in_process(["--output-dir", out, "--predict", images, "--num-workers", "0"],
                                 capsys)
    assert (result.returncode == 130 and result.stderr == f"Interrupted with {kept} of {total} "
            f"images classified; {kept} predictions written to {out / 'predictions.csv'}\n")
    written = (out / "predictions.csv").read_bytes()
    first = sorted(map(str, images.iterdir()))[:kept]
    assert list(pd.read_csv(out / "predictions.csv")["path"]) == first

    missing = main_in_process(["--output-dir", out, "--predict", tmp_path / "missing.png"], capsys)
    assert_one_clean_line(missing, f"{tmp_path / 'missing.png'} does not exist")
    assert (out / "predictions.csv").read_bytes() == written  # the last predictions stay

    for module, name, command, stage in [
            (export_module, "export", ["--export", "pt2"], "exporting the model"),
            (optim_module, "find_lr", [*args, "--find-lr"], "finding the LR")]:
        with monkeypatch.context() as patch:
            signalled(patch, module, name, lambda *args, **kwargs: True, signal.SIGINT)
            result = main_in_process(["--output-dir", out, *command], capsys)
        assert (result.returncode, result.stderr) == (130, f"Interrupted while {stage}.\n")
        assert not (out / export_module.EXPORT_FILES["pt2"]).exists()
        assert not (out / "lr_finder.png").exists()


def killed_in(monkeypatch, module, name, when):
    """module.name replaced by one that kills its own process with SIGKILL (as the out-of-memory
    killer does) when `when` holds of its path."""
    real = getattr(module, name)

    def killed(path, *args):
        if when(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args)
    monkeypatch.setattr(module, name, killed)


def error_lines(result):
    """The lines of a run's stderr but for notes (a folder without test/ gets one)."""
    return [line for line in result.stderr.splitlines() if not line.startswith("note: ")]


@pytest.mark.skipif(sys.platform != "linux", reason="workers see the patched reader when forked")
@pytest.mark.parametrize("cache", ["auto", "none"])
def test_a_decoding_worker_killed_ends_the_run_in_one_line_naming_its_file(
        tmp_path, capsys, monkeypatch, cache):
    photos = write_image_tree(tmp_path / "photos", splits=("train",), per_class=6)
    victim = os.path.join(photos, "train", "dogs", "2.png")
    killed_in(monkeypatch, image_module, "read_stored", lambda path: path == victim)
    began = time.monotonic()
    result = main_in_process(["--dataset", "folder", "--data-dir", photos,
                              "--output-dir", tmp_path / "out", "--cache-dir", cache,
                              "--num-workers", "2"], capsys)
    assert time.monotonic() - began < 20
    [line] = error_lines(result)
    assert result.returncode == run_module.WORKER_DIED and "Traceback" not in result.stderr
    assert (f"was killed by SIGKILL while decoding {victim}: most likely the system ran out of "
            "memory" in line)


KILLED_IN_A_DATALOADER_WORKER = """
import os, runpy, signal, sys
import torch
import source_module
real = source_module.read_stored

def killed(path, *args):  # in a DataLoader worker: killed, as the out-of-memory killer kills
    if torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args)

source_module.read_stored = killed
sys.argv = [{main!r}, *{args!r}]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="workers see the patched reader when forked")
def test_a_dataloader_worker_killed_in_training_ends_the_run_in_one_line(tmp_path):
    photos = write_image_tree(tmp_path / "photos", splits=("train", "val"), per_class=6)
    out = tmp_path / "out"
    args = ["--dataset", "folder", "--data-dir", str(photos), "--output-dir", str(out),
            "--cache-dir", "none", "--resident", "no", "--num-workers", "2", "--epochs", "1"]
    code = KILLED_IN_A_DATALOADER_WORKER.format(main=os.path.join(ROOT, "main.py"), args=args)
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert time.monotonic() - began < 60
    [line] = error_lines(result)  # nothing from the workers, nor from torch's threads
    assert result.returncode == run_module.WORKER_DIED
    assert (line.startswith("error: a worker process")
            and "while reading training images: most likely the system ran out of memory" in line)
    assert line.endswith(f"then go on with: python main.py --resume auto --output-dir {out}")


SIGNAL_AROUND_THE_RUN = """
import argparse, contextlib, os, runpy, signal, sys
sys.argv, sys.path[0] = [{main!r}, "--epochs", "0"], os.path.dirname({main!r})
import process_module

def signal_now(*args, kill=os.kill, pid=os.getpid()):
    kill(pid, {signum})

if {where!r} == "reading the flags":
    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = lambda *args: signal_now() or real(*args)
elif {where!r} == "returning":  # run_main has let go of signals
    block = process_module.signals_interrupt.__wrapped__

    @contextlib.contextmanager
    def signals_interrupt():
        yield from block()
        signal_now()
    process_module.signals_interrupt = signals_interrupt
else:  # exiting: late in the interpreter's shutdown, as it clears the modules
    sys.modules["late"] = type(sys)("late")  # a module that holds the object to delete then
    sys.modules["late"].instance = type("Late", (), dict(__del__=signal_now))()
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("where", ["reading the flags", "returning", "exiting"])
def test_a_signal_just_before_or_after_the_run_is_one_line_or_ignored(tmp_path, signum, status,
                                                                      where):
    code = SIGNAL_AROUND_THE_RUN.format(signum=int(signum), where=where,
                                        main=os.path.join(ROOT, "main.py"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    if where == "reading the flags":
        line = "Interrupted while starting.\n"
    else:  # the run's own status and line stand
        status, line = 2, "error: --epochs 0 (EPOCHS) is out of range: use a whole number >= 1\n"
    assert (result.returncode, result.stderr) == (status, line)


SIGNAL_AT_IMPORT = """
import builtins, os, runpy, signal, sys
real_import = builtins.__import__

def importing(name, *args, **kwargs):  # the signal comes as main.py starts to load torch
    if name == "torch":
        os.kill(os.getpid(), {signum})
    return real_import(name, *args, **kwargs)

builtins.__import__ = importing
sys.argv = [{main!r}, "--predict", "x.png"]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("rank", ["0", "1"])  # under torchrun only rank 0 says it
def test_ctrl_c_or_sigterm_while_the_modules_load_ends_in_one_line(tmp_path, signum, status, rank):
    code = SIGNAL_AT_IMPORT.format(signum=int(signum), main=os.path.join(ROOT, "main.py"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "RANK": rank})
    line = "Interrupted while starting.\n" if rank == "0" else ""
    assert (result.returncode, result.stderr) == (status, line)


def test_ctrl_c_ignored_before_main_py_starts_stays_ignored_while_the_modules_load(tmp_path):
    main_py = os.path.join(ROOT, "main.py")
    code = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            f"sys.path[0] = {ROOT!r}\n"
            + SIGNAL_AT_IMPORT.format(signum=int(signal.SIGINT), main=main_py))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)  # nohup, or a script's background job
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert list(tmp_path.iterdir()) == []
