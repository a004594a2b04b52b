"""The loop: CSV rows, best_model.pth, non-finite losses, schedules, lookahead, the fast preset."""

import io
import json

import pandas as pd
import pytest
import torch
from torch import nn

import model_module
import train_module
import utils
from callback_module import LRA
from conftest import make_tiny_data


def run_fit(tmp_path, epochs=3, model_name="cnn", lr=0.05, **lra_kwargs):
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model(model_name, 4)
    optimizer = train_module.make_optimizer(model, lr)
    lra = LRA(ask_epoch=None, stream=io.StringIO(), **lra_kwargs)
    run_info = {"config": {"MODEL": model_name}, "classes": data.classes, "mean": list(data.mean),
                "std": list(data.std), "image_size": 16}
    history = train_module.fit(model, data, optimizer, lra, epochs=epochs, loss_fn=nn.CrossEntropyLoss(),
                               output_dir=str(tmp_path), run_info=run_info)
    return model, data, lra, history


def test_the_csv_has_one_row_per_epoch_with_the_columns(tmp_path):
    _, _, _, history = run_fit(tmp_path, epochs=3)
    frame = pd.read_csv(tmp_path / "training_metrics.csv")
    assert list(frame["epoch"]) == [1, 2, 3]
    assert set(utils.CSV_COLUMNS) <= set(frame.columns)
    assert frame["val_acc"].between(0, 1).all() and frame["monitor"].isin(["train_acc", "val_loss"]).all()
    assert frame["val_loss"].tolist() == pytest.approx([row["val_loss"] for row in history])


def test_best_model_loads_safely_and_reproduces_the_best_epoch(tmp_path):
    _, data, lra, history = run_fit(tmp_path, epochs=4)
    fresh = model_module.get_model("cnn", 4)
    fresh.load_state_dict(torch.load(tmp_path / "best_model.pth", weights_only=True))
    result = train_module.evaluate(fresh, data.val)
    best = next(row for row in history if row["epoch"] == lra.best_epoch)
    assert result["acc"] == pytest.approx(best["val_acc"], abs=1e-9)
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    info = json.loads((tmp_path / "best_model.json").read_text())
    assert info["epoch"] == lra.best_epoch and info["model"] == "cnn" and info["classes"] == data.classes


def test_fit_ends_holding_the_best_weights(tmp_path):
    model, _, lra, _ = run_fit(tmp_path, epochs=3)
    saved = torch.load(tmp_path / "best_model.pth", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])


def test_a_non_finite_loss_names_the_epoch_and_batch(tmp_path):
    data = make_tiny_data(size=16, batch_size=8)
    model = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(model, 0.01)
    calls = {"n": 0}

    def loss_fn(logits, targets):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if calls["n"] == 11 else loss  # batch 3 of epoch 2 (8 batches an epoch)

    lra = LRA(ask_epoch=None, stream=io.StringIO())
    best = train_module.Snapshot()
    with pytest.raises(train_module.NonFiniteLoss, match="nan at epoch 2, batch 3"):
        train_module.fit(model, data, optimizer, lra, epochs=3, loss_fn=loss_fn, output_dir=str(tmp_path), best=best)
    assert lra.best_epoch == 1
    for key, value in model.state_dict().items():  # the best weights are back, the files kept
        assert torch.equal(value, best.model[key])
    assert len(pd.read_csv(tmp_path / "training_metrics.csv")) == 1


def test_evaluate_reports_per_class_accuracy():
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4)
    result = train_module.evaluate(model, data.val, num_classes=4)
    assert len(result["per_class"]) == 4
    assert sum(result["per_class"]) / 4 == pytest.approx(result["acc"])  # balanced classes


def test_tta_evaluation_averages_the_six_views():
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4).eval()
    model.head[1].weight.data *= 50  # confident logits, so the views' disagreement shows in the loss
    images, targets = next(iter(data.val))
    with torch.no_grad():  # by hand: the image, and shifted one pixel up-left and down-right, each mirrored
        padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        views = [images, padded[..., :16, :16], padded[..., 2:, 2:]]
        mirrored = [(model(v) + model(v.flip(-1))) / 2 for v in views]
        logits = 0.5 * mirrored[0] + 0.25 * (mirrored[1] + mirrored[2])
    expected = nn.functional.cross_entropy(logits, targets).item()
    assert len(targets) == len(data.val.labels)  # one batch holds the whole validation set
    augmented = train_module.evaluate(model, data.val, tta=True)
    assert augmented["loss"] == pytest.approx(expected, rel=1e-5)
    assert augmented["loss"] != pytest.approx(train_module.evaluate(model, data.val)["loss"], rel=1e-5)


def test_onecycle_rises_then_falls_and_holds_past_its_end():
    model = nn.Linear(2, 2)
    optimizer = train_module.make_optimizer(model, 1.0)
    schedule = train_module.make_schedule(optimizer, "onecycle", 1.0, total_steps=100)
    lrs = []
    for _ in range(120):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.advance(optimizer)
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0, abs=0.01)
    assert lrs[99] == pytest.approx(0.07, abs=0.01) and lrs[119] == lrs[99]
    assert train_module.make_schedule(optimizer, "lra", 1.0, 100) is None


def test_onecycle_matches_torchs_one_cycle_lr():
    """The schedule is airbench's shape in OneCycleLR's terms, step for step."""
    model = nn.Linear(2, 2)
    ours = train_module.make_optimizer(model, 1.5)
    schedule = train_module.make_schedule(ours, "onecycle", 1.5, total_steps=50)
    theirs = torch.optim.SGD(model.parameters(), lr=1.5)
    reference = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=1.5, total_steps=50, pct_start=0.23,
                                                    anneal_strategy="linear", cycle_momentum=False,
                                                    div_factor=5.0, final_div_factor=0.2 / 0.07)
    for _ in range(49):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9)
        theirs.step()
        reference.step()
        schedule.advance(ours)


def test_onecycle_schedules_the_body_after_unfreezing():
    """Unfreezing under SCHEDULE = onecycle used to fail (OneCycleLR did not know the new group)."""
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = train_module.make_optimizer(model, 1.0)
    schedule = train_module.make_schedule(optimizer, "onecycle", 1.0, total_steps=10)
    schedule.advance(optimizer)
    model_module.unfreeze_body(model)
    schedule.advance(optimizer)
    assert len({group["lr"] for group in optimizer.param_groups}) == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(2))


def test_norm_parameters_get_a_scaled_lr_and_the_same_decay_per_step():
    model = model_module.get_model("cnn", 10)
    optimizer = train_module.make_optimizer(model, 0.1, weight_decay=1e-3, norm_lr_scale=64)
    main, norms = optimizer.param_groups
    assert norms["lr"] == pytest.approx(6.4) and norms["lr"] * norms["weight_decay"] == pytest.approx(1e-4)
    assert main["lr"] * main["weight_decay"] == pytest.approx(1e-4)
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in norms["params"]} == bn_ids


def test_lookahead_ends_on_the_slow_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    lookahead = train_module.Lookahead(model, total_steps=7, every=5)
    for _ in range(7):
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        lookahead.update()
    for key, value in model.state_dict().items():
        assert torch.equal(value, lookahead.slow[key])


def test_the_fast_preset_trains_a_few_steps_on_tiny_data(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_data(n_train=64, size=32, batch_size=16)
    model = model_module.get_model("fast", 4, sample_images=lambda: data.train.first_images(64))
    optimizer = train_module.make_optimizer(model, 1.5, momentum=0.85, weight_decay=1.33e-3, norm_lr_scale=64)
    steps = 2 * len(data.train)
    schedule = train_module.make_schedule(optimizer, "onecycle", 1.5, steps)
    lookahead = train_module.Lookahead(model, steps)
    lra = LRA(ask_epoch=None, adjust_lr=False, stream=io.StringIO())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_module.fit(model, data, optimizer, lra, epochs=2, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2),
                               output_dir=str(tmp_path), schedule=schedule, lookahead=lookahead)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert schedule.step == steps and lookahead.step == steps
