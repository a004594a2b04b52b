"""Experiment trackers (TRACKER): TensorBoard or MLflow, each imported only when asked. Rank 0 only.
Opening one logs the constants; then log_epoch, log_test (final figures), log_files and close."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

import report_module

FOLDERS = ("tensorboard", "mlruns")  # what the trackers make in OUTPUT_DIR
EXPERIMENT = "lra-pipeline"  # the MLflow experiment every run is logged under


class TensorBoardTracker:
    """Per-epoch metrics, LR and LRA's events, and the test confusion matrix, in
    OUTPUT_DIR/tensorboard/<start time>/ (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""

    def __init__(self, output_dir: str, started: str, run_id: str | None, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        folder = os.path.join(output_dir, FOLDERS[0], started)
        new = not os.path.isdir(folder)  # a resume goes on in its run's folder
        self.writer, self.run_id = SummaryWriter(folder), run_id  # no id of its own
        if new:
            self.writer.add_text("constants",
                                 "  \n".join(f"{k} = {v!r}" for k, v in params.items()))

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch's metrics dict (fit's history row): losses, accuracies, the LR, LRA's event."""
        epoch = row["epoch"]
        for name, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"),
                          ("accuracy/train", "train_acc"), ("accuracy/val", "val_acc"),
                          ("val/macro_f1", "macro_f1"), ("val/balanced_acc", "balanced_acc"),
                          ("lr", "lr")):
            # without validation images there are no validation figures
            if row.get(key) is not None:
                self.writer.add_scalar(name, row[key], epoch)
        if row.get("event"):
            self.writer.add_text("lra", row["event"], epoch)
        self.writer.flush()

    def log_test(self, result: dict[str, Any], classes: Sequence[str], step: int) -> None:
        """The test accuracy and the confusion matrix figure, as an image."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.writer.add_scalar("accuracy/test", result["acc"], step)
        canvas = FigureCanvasAgg(report_module.confusion_figure(result["confusion"], classes))
        canvas.draw()
        self.writer.add_image("test/confusion_matrix", np.asarray(canvas.buffer_rgba())[..., :3],
                              step, dataformats="HWC")
        self.writer.flush()

    def log_files(self, paths: Sequence[str]) -> None:
        """TensorBoard keeps no files: they stay in OUTPUT_DIR."""

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """Constants as parameters, epoch metrics (LRA's events as tags), test figures, files as
    artifacts, in OUTPUT_DIR/mlruns/ (`mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlruns/
    mlflow.db`) or MLFLOW_TRACKING_URI when set. run_id: the MLflow run a resume goes on with."""

    def __init__(self, output_dir: str, started: str, run_id: str | None, params: dict[str, Any]):
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its database's INFO lines
        remote = os.environ.get("MLFLOW_TRACKING_URI")
        store = pathlib.Path(output_dir, FOLDERS[1]).absolute()
        if not remote:
            store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(remote or f"sqlite:///{store / 'mlflow.db'}")
        self.status = RunStatus
        if run_id is not None:
            try:
                self.client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING))
            except MlflowException:
                print(f"warning: MLflow run {run_id} is not in {self.client.tracking_uri}; "
                      "logging to a new run", file=sys.stderr)
                run_id = None
        if run_id is None:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            experiment = found.experiment_id if found else self.client.create_experiment(
                EXPERIMENT, None if remote else (store / "artifacts").as_uri())
            run_id = self.client.create_run(experiment, tags={"started": started}).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.run_id = run_id

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Every number of fit's history row, at the epoch as step; LRA's event as a tag."""
        from mlflow.entities import Metric, RunTag

        now, epoch = int(1000 * time.time()), row["epoch"]
        metrics = [Metric(k, float(v), now, epoch) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
        tags = [RunTag(f"lra.epoch_{epoch:03d}", row["event"])] if row.get("event") else []
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def log_test(self, result: dict[str, Any], classes: Sequence[str], step: int) -> None:
        """The test accuracy and loss (the confusion matrix is among the files)."""
        for name in ("acc", "loss"):
            self.client.log_metric(self.run_id, f"test_{name}", float(result[name]), step=step)

    def log_files(self, paths: Sequence[str]) -> None:
        """Each file as an artifact of the run (a resume's replace the earlier)."""
        for path in paths:
            self.client.log_artifact(self.run_id, path)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, self.status.to_string(self.status.FINISHED))


@dataclasses.dataclass(frozen=True)
class Kind:
    """One TRACKER: its class, the modules it imports, and the pip install that brings them."""

    make: type
    modules: tuple[str, ...]
    install: str


TRACKERS = {"tensorboard": Kind(TensorBoardTracker, ("tensorboard",), "tensorboard"),
            # sqlalchemy and alembic: MLflow's local SQLite store, which mlflow-skinny leaves out
            "mlflow": Kind(MLflowTracker, ("mlflow", "sqlalchemy", "alembic"),
                           "mlflow-skinny sqlalchemy alembic")}


def check_installed(kind: str | None) -> None:
    """ValueError naming the pip install for TRACKER's missing packages (found without importing,
    before any data is read)."""
    entry = TRACKERS.get(kind)
    missing = (
        [name for name in entry.modules if importlib.util.find_spec(name) is None] if entry else [])
    if missing:
        raise ValueError(f"TRACKER = {kind!r} needs {', '.join(missing)}: "
                         f"pip install {entry.install}")


class Guarded:
    """A tracker whose failure mid-run (a full disk, a tracking server gone) never stops the
    training: one warning, then it logs no more; the run's own files hold every figure."""

    def __init__(self, tracker: TensorBoardTracker | MLflowTracker):
        self.tracker, self.run_id = tracker, tracker.run_id

    def _call(self, name: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, name)(*args)
        except Exception as error:  # whatever the tracker's packages raise
            print(f"warning: the tracker stopped logging ({type(error).__name__}: {error}); the "
                  "run goes on, and its files hold every figure", file=sys.stderr)
            self.tracker = None

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._call("log_epoch", row)

    def log_test(self, result: dict[str, Any], classes: Sequence[str], step: int) -> None:
        self._call("log_test", result, classes, step)

    def log_files(self, paths: Sequence[str]) -> None:
        self._call("log_files", paths)

    def close(self) -> None:
        self._call("close")


def open_tracker(kind: str, output_dir: str, started: str, run_id: str | None,
                 params: dict[str, Any]) -> Guarded:
    """TRACKER's tracker for the run that started at `started`, going on with run_id (its MLflow
    run) when given; ValueError when it cannot start (a tracking server out of reach, say)."""
    # MLflow's usage reports leave the machine and write an id under ~/.config: only when asked
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return Guarded(TRACKERS[kind].make(output_dir, started, run_id, params))
    except Exception as error:  # whatever the tracker's packages raise
        raise ValueError(f"TRACKER = {kind!r} could not start: "
                         f"{type(error).__name__}: {error}") from error
