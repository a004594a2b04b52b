"""run_module's ends when the loss is not finite from the first step (weights of NaN): --find-lr and
training each say so in one line, exit 1, and point at no weights that were never written."""

import math
import os

import pytest
import torch

import main
import model_module
from conftest import write_fake_cifar

TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "16",
        "--num-workers", "0"]


@pytest.fixture
def nan_run(tmp_path):
    """Arguments for a run on a fake CIFAR-10 that starts from --weights of NaN, writing to
    tmp_path/out."""
    state = model_module.get_model("cnn", 10, image_size=32).state_dict()
    weights = tmp_path / "nan.pth"
    torch.save({name: tensor.fill_(math.nan) if tensor.is_floating_point() else tensor
                for name, tensor in state.items()}, weights)
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = tmp_path / "out"
    return ["--data-dir", data, "--output-dir", str(out), "--weights", str(weights), *TINY], out


def test_find_lr_on_a_loss_never_finite_is_one_line_exit_1_and_writes_no_plot(nan_run, capsys):
    args, out = nan_run
    capsys.readouterr()
    assert main.main([*args, "--find-lr"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: the loss was not finite at the LR finder's first step (LR 1e-07): no "
                   f"curve to read, nothing written; check --weights (WEIGHTS) {args[5]}"]
    assert os.listdir(out) in ([], [".lock"])


def test_a_loss_not_finite_before_any_epoch_ends_names_no_best_weights_and_reports_nothing(
        nan_run, capsys):
    args, out = nan_run
    capsys.readouterr()
    assert main.main([*args, "--epochs", "2"]) == 1
    printed, err = capsys.readouterr()
    assert err.splitlines() == ["error: the training loss became nan at epoch 1, batch 1. No epoch "
                                "finished: no weights kept; try a lower LR."]
    assert "Test accuracy" not in printed and "Recall" not in printed  # no report on NaN
    assert not {"best_model.pth", "test_report.csv", "confusion_matrix.png"} & set(os.listdir(out))
