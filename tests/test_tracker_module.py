"""tracker_module: TRACKER's TensorBoard and MLflow logs, read back with their own readers, a resume
that goes on with the same MLflow run, and the one-line errors. CI installs the trackers
(requirements-trackers.txt): there their tests run, never skip."""

import io
import os
import re
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

import data_module
import main
import tracker_module
import utils
from conftest import write_fake_cifar

TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "32"]


def needs(module: str):
    """The tracker's package; a test without it skips, but fails under CI, which installs it."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(
        module, reason=f"{module} is optional: pip install -r requirements-trackers.txt")


@pytest.fixture
def tiny_run(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=40)
    return ["--data-dir", data, "--output-dir", str(tmp_path / "out"), *TINY], tmp_path / "out"


@pytest.mark.parametrize("tracker, missing, install", [
    ("tensorboard", "tensorboard", "tensorboard"),
    ("mlflow", "sqlalchemy", "mlflow-skinny sqlalchemy alembic")])
def test_a_missing_tracker_package_is_one_line_naming_its_pip_install_before_any_data(
        tiny_run, monkeypatch, capsys, tracker, missing, install):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    monkeypatch.setattr(data_module, "get_data", None)  # never reached
    args, out = tiny_run
    assert main.main(args + ["--tracker", tracker]) == 2
    err = capsys.readouterr().err  # naming each package missing here, this one among them
    assert re.fullmatch(f"error: --tracker '{tracker}' \\(TRACKER\\) needs ([a-z]+, )*{missing}"
                        f"(, [a-z]+)*: pip install {install}\n", err) and not out.exists()


def test_a_bad_tracker_is_one_line_naming_the_choices(tiny_run, capsys):
    args, out = tiny_run
    assert main.main(args + ["--tracker", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --tracker 'wandb' (TRACKER) is not known; choose one of None, "
                   "'tensorboard', 'mlflow'\n") and not out.exists()


def test_tensorboard_logs_the_epochs_lra_events_and_the_confusion_matrix(tmp_path):
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tracker_module.open_tracker("tensorboard", str(tmp_path), "start", None, {"LR": 0.05})
    for epoch in (1, 2):
        log.log_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch,
                       "train_acc": 0.5, "val_acc": 0.4 + epoch / 10, "lr": 0.05 / epoch,
                       "event": "LR cut" if epoch == 2 else ""})
    log.log_test({"acc": 0.875, "confusion": torch.tensor([[3, 1], [0, 4]])}, ["a", "b"], step=2)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "start"),
                              size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, pytest.approx(0.05)),
                                                                 (2, pytest.approx(0.025))]
    assert [e.value for e in events.Scalars("accuracy/val")] == pytest.approx([0.5, 0.6])
    assert [(e.step, e.value) for e in events.Scalars("accuracy/test")] == [(2, 0.875)]
    lra = events.Tensors("lra/text_summary")
    assert [(e.step, e.tensor_proto.string_val) for e in lra] == [(2, [b"LR cut"])]
    image = events.Images("test/confusion_matrix")[0]
    assert image.step == 2 and Image.open(io.BytesIO(image.encoded_image_string)).format == "PNG"


def test_a_tensorboard_run_logs_each_epoch_and_the_test_accuracy(tiny_run):
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args, out = tiny_run
    assert main.main(args + ["--epochs", "2", "--tracker", "tensorboard"]) == 0
    [folder] = os.listdir(out / "tensorboard")  # the run's start time
    events = EventAccumulator(str(out / "tensorboard" / folder)).Reload()
    csv = pd.read_csv(out / "training_metrics.csv")
    train_loss = events.Scalars("loss/train")
    assert [e.step for e in train_loss] == [1, 2]
    assert [e.value for e in train_loss] == pytest.approx(csv["train_loss"].tolist())
    assert [e.step for e in events.Scalars("accuracy/test")] == [2]


def test_an_mlflow_run_logs_params_metrics_and_files_and_a_resume_goes_on_with_it(tiny_run, capsys):
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    args, out = tiny_run
    assert main.main(args + ["--epochs", "2", "--tracker", "mlflow"]) == 0
    run_id = torch.load(out / "last_checkpoint.pth", weights_only=True)["tracker_run"]
    client = MlflowClient(f"sqlite:///{out}/mlruns/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.params["EPOCHS"] == "2" and run.data.params["TRACKER"] == "mlflow"
    assert run.data.params["BATCH_SIZE"] == "32" and run.info.status == "FINISHED"
    csv = pd.read_csv(out / "training_metrics.csv")
    val_loss = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in val_loss] == [1, 2]
    assert [m.value for m in val_loss] == pytest.approx(csv["val_loss"].tolist())
    assert sorted(a.path for a in client.list_artifacts(run_id)) == [
        "best_model.json", "best_model.pth", "confusion_matrix.png", "misclassified.png",
        "test_report.csv", "training_curves.png", "training_metrics.csv"]
    assert run.data.tags["lra.epoch_001"].startswith("best")  # LRA's event of epoch 1
    test_acc = client.get_metric_history(run_id, "test_acc")
    # the resume: the same MLflow run, with epoch 3 added
    assert main.main(["--resume", "auto", "--output-dir", str(out), "--epochs", "3"]) == 0
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    csv = pd.read_csv(out / "training_metrics.csv")
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "lr"))
    assert [step for step, _ in lrs] == [1, 2, 3]
    assert [lr for _, lr in lrs] == pytest.approx(csv["lr"].tolist())
    assert len(client.get_metric_history(run_id, "test_acc")) == len(test_acc) + 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_checkpoint_that_recorded_tensorboard_resumes(tiny_run):
    args, out = tiny_run
    assert main.main(args + ["--epochs", "1"]) == 0
    path = out / "last_checkpoint.pth"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["TRACKER"], checkpoint["tracker_run"]  # as written before TRACKER
    checkpoint["config"]["TENSORBOARD"] = False
    utils.save_torch(checkpoint, str(path))
    assert main.main(["--resume", "auto", "--output-dir", str(out), "--epochs", "2"]) == 0
    assert torch.load(path, weights_only=True)["epoch"] == 2


def test_a_tracker_failing_mid_run_warns_once_and_the_run_trains_on(tiny_run, monkeypatch, capsys):
    needs("tensorboard")
    calls = []

    def fail(self, row):
        calls.append(row["epoch"])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tracker_module.TensorBoardTracker, "log_epoch", fail)
    args, out = tiny_run
    assert main.main(args + ["--epochs", "3", "--tracker", "tensorboard"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "tracker" in line]
    assert warnings == ["warning: the tracker stopped logging (OSError: [Errno 28] No space left "
                        "on device); the run goes on, and its files hold every figure"], err
    assert calls == [1] and len(pd.read_csv(out / "training_metrics.csv")) == 3


def test_a_tracker_that_cannot_start_is_one_line_and_mlflow_usage_reports_stay_off(
        tiny_run, monkeypatch, capsys):
    def unreachable(*args):
        raise ConnectionError("tracking server 10.0.0.9:5000 refused the connection")
    monkeypatch.setattr(tracker_module.MLflowTracker, "__init__", unreachable)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    args, out = tiny_run
    assert main.main(args + ["--tracker", "mlflow"]) == 2
    assert capsys.readouterr().err == ("error: --tracker 'mlflow' (TRACKER) could not start: "
                                       "ConnectionError: tracking server 10.0.0.9:5000 refused "
                                       "the connection\n")
    # bookkeeping: MLflow's reports to its makers (and their id under ~/.config) only when asked
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
