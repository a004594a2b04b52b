"""A run's files: what the checkpoint holds, model weights from either file, files of the first format."""

import io
import json

import pytest
import torch
from torch import nn

import checkpoint_module
import model_module
import train_module
import utils
from callback_module import LRA
from conftest import make_tiny_data


def run_fit(tmp_path, epochs=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(model, 0.05)
    lra = LRA(ask_epoch=None, stream=io.StringIO())
    run_info = {"config": {"MODEL": "cnn", "DATASET": "cifar10", "FREEZE": False}, "classes": data.classes,
                "mean": list(data.mean), "std": list(data.std), "image_size": 16}
    history = train_module.fit(model, data, optimizer, lra, epochs=epochs, loss_fn=nn.CrossEntropyLoss(),
                               output_dir=str(tmp_path), run_info=run_info)
    return model, lra, history, run_info


def test_the_checkpoint_holds_everything_a_resume_needs(tmp_path):
    _, lra, _, _ = run_fit(tmp_path, epochs=2)
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    for key in (*checkpoint_module.STATE_KEYS, *checkpoint_module.RUN_INFO_KEYS, "format"):
        assert key in checkpoint
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert checkpoint["lra"]["best_epoch"] == lra.best_epoch and checkpoint["best"]["model"] is not None


def test_a_best_model_json_of_the_first_format_names_todays_model(tmp_path):
    info = {"model": "resnet18", "classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.2] * 3, "image_size": 32}
    (tmp_path / "best_model.json").write_text(json.dumps(info))
    assert checkpoint_module.load_best_model_info(str(tmp_path))["model"] == model_module.LEGACY_NAMES["resnet18"]
    (tmp_path / "best_model.json").write_text(json.dumps({**info, "format": checkpoint_module.FORMAT}))
    assert checkpoint_module.load_best_model_info(str(tmp_path))["model"] == "resnet18"


def test_a_checkpoint_of_the_first_format_resumes(tmp_path):
    """Before LRA returned decisions it held the best snapshot and said phase and fine_tuned."""
    model, lra, history, run_info = run_fit(tmp_path / "run", epochs=2)
    checkpoint = torch.load(tmp_path / "run" / "last_checkpoint.pth", weights_only=True)
    old_lra = {("phase" if k == "monitor" else k): v for k, v in checkpoint.pop("lra").items() if k != "frozen"}
    best = checkpoint.pop("best")
    checkpoint.pop("format")
    checkpoint["lra"] = {**old_lra, "fine_tuned": False, "best_model": best["model"], "best_optimizer": best["optimizer"]}
    utils.save_torch(checkpoint, str(tmp_path / "old.pth"))

    fresh = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(fresh, 0.05)
    resumed_lra, snapshot = LRA(ask_epoch=None, stream=io.StringIO()), train_module.Snapshot()
    next_epoch, resumed_history = checkpoint_module.resume(
        str(tmp_path / "old.pth"), model=fresh, optimizer=optimizer, lra=resumed_lra, best=snapshot, schedule=None,
        lookahead=None, run_info=run_info, output_dir=str(tmp_path / "run"))
    assert next_epoch == 3 and resumed_history == history
    assert resumed_lra.state_dict() == lra.state_dict()
    for key, value in snapshot.model.items():
        assert torch.equal(value, best["model"][key])
