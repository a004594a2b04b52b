"""The loop: CSV rows, best_model.pth, non-finite losses, the fast preset, evaluate's confusion
matrix and mistakes, TTA, fit with a compiled model and with a captured step, mixed batches' soft
targets, class weights."""

import errno
import io
import json
import math
import os
from dataclasses import replace

import pandas as pd
import pytest
import torch
from torch import nn

import augment_module
import checkpoint_module
import files_module
import loader_module
import model_module
import optim_module
import report_module
import state_module
import step_module
import train_module
import utils
from callback_module import LRA
from conftest import configs, make_tiny_data
from state_module import RunInfo, TrainState


def run_fit(tmp_path, epochs=3, model_name="cnn", lr=0.05, **lra_settings):
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model(model_name, 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=lr).optim)
    lra = LRA(replace(configs(ASK_EPOCH=None).lra, **lra_settings), stream=io.StringIO())
    info = RunInfo({"MODEL": model_name}, data.classes, list(data.mean), list(data.std), 16)
    history = train_module.fit(TrainState(model, optimizer, lra, info=info), data,
                               configs(EPOCHS=epochs, OUTPUT_DIR=str(tmp_path)).fit)
    return model, data, lra, history


def test_the_csv_has_one_row_per_epoch_with_the_columns(tmp_path):
    _, _, _, history = run_fit(tmp_path, epochs=3)
    frame = pd.read_csv(tmp_path / "training_metrics.csv")
    assert list(frame["epoch"]) == [1, 2, 3]
    assert set(utils.CSV_COLUMNS) <= set(frame.columns)
    assert frame["val_acc"].between(0, 1).all() and frame["monitor"].isin(["train_acc",
        "val_loss"]).all()
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
    assert info["epoch"] == lra.best_epoch and info["model"] == "cnn" and info[
        "classes"] == data.classes


def test_fit_ends_holding_the_best_weights(tmp_path):
    model, _, lra, _ = run_fit(tmp_path, epochs=3)
    saved = torch.load(tmp_path / "best_model.pth", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])


def test_a_non_finite_loss_names_the_epoch_and_batch(tmp_path):
    data = make_tiny_data(size=16, batch_size=8)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.01).optim)
    calls = {"n": 0}

    def loss_fn(logits, targets):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(logits, targets)
        # batch 3 of epoch 2 (8 batches an epoch)
        return loss * float("nan") if calls["n"] == 11 else loss

    lra = LRA(configs(ASK_EPOCH=None).lra, stream=io.StringIO())
    best = state_module.Snapshot()
    with pytest.raises(train_module.NonFiniteLoss, match="nan at epoch 2, batch 3"):
        train_module.fit(TrainState(model, optimizer, lra, best), data,
                         configs(EPOCHS=3, OUTPUT_DIR=str(tmp_path)).fit, loss_fn=loss_fn)
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


def test_evaluation_times_cudnn_algorithms_for_its_full_batches_only(monkeypatch):
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, images):
            seen.append((len(images), torch.backends.cudnn.benchmark))
            return self.linear(images)

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    batches = [(torch.randn(n, 4), torch.zeros(n, dtype=torch.int64)) for n in (4, 4, 3)]
    train_module.evaluate(Recording(), batches)
    assert seen == [(4, True), (4, True), (3, False)] and torch.backends.cudnn.benchmark
    # never turned on where it was off
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen.clear()
    train_module.evaluate(Recording(), batches)
    assert seen == [(4, False), (4, False), (3, False)]


def test_tta_evaluation_averages_the_six_views():
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4).eval()
    # confident logits, so the views' disagreement shows in the loss
    model.head[1].weight.data *= 50
    images, targets = next(iter(data.val))
    # by hand: the image, and shifted one pixel up-left and down-right, each mirrored
    with torch.no_grad():
        padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        views = [images, padded[..., :16, :16], padded[..., 2:, 2:]]
        mirrored = [(model(v) + model(v.flip(-1))) / 2 for v in views]
        logits = 0.5 * mirrored[0] + 0.25 * (mirrored[1] + mirrored[2])
    expected = nn.functional.cross_entropy(logits, targets).item()
    assert len(targets) == len(data.val.labels)  # one batch holds the whole validation set
    augmented = train_module.evaluate(model, data.val, tta=True)
    assert augmented["loss"] == pytest.approx(expected, rel=1e-5)
    assert augmented["loss"] != pytest.approx(train_module.evaluate(model, data.val)["loss"],
                                              rel=1e-5)


def test_the_fast_preset_trains_a_few_steps_on_tiny_data(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_data(n_train=64, size=32, batch_size=16)
    model = model_module.get_model("fast", 4,
                                   sample_images=lambda n: data.train.first_images(min(n, 64)))
    sgd = configs(LR=1.5, MOMENTUM=0.85, WEIGHT_DECAY=1.33e-3, NORM_LR_SCALE=64).optim
    optimizer = optim_module.make_optimizer(model, sgd)
    steps = 2 * len(data.train)
    schedule = optim_module.make_schedule(optimizer, "onecycle", 1.5, steps)
    lookahead = optim_module.Lookahead(model, steps)
    lra = LRA(configs(ASK_EPOCH=None, SCHEDULE="onecycle").lra, stream=io.StringIO())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainState(model, optimizer, lra, schedule=schedule, lookahead=lookahead)
    history = train_module.fit(state, data, configs(EPOCHS=2, OUTPUT_DIR=str(tmp_path),
                                                    LABEL_SMOOTHING=0.2).fit)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert schedule.step == steps and lookahead.step == steps


def test_evaluate_collects_a_confusion_matrix_and_the_most_confident_mistakes(one_thread):
    torch.manual_seed(0)
    # validation batches of 8: the top-k runs over 5
    data = make_tiny_data(n_val=40, size=8, batch_size=4)
    model = model_module.get_model("cnn", 4).eval()
    result = train_module.evaluate(model, data.val, num_classes=4, collect=True)
    confusion = result["confusion"]
    assert confusion.shape == (4, 4) and confusion.dtype == torch.int64
    assert confusion.sum() == len(data.val.labels) == 40
    assert confusion.trace().item() / 40 == pytest.approx(result["acc"])
    assert (confusion.diag() / confusion.sum(1)).tolist() == pytest.approx(result["per_class"])

    images = torch.cat([batch for batch, _ in data.val])  # by hand: every wrong prediction, ranked
    with torch.no_grad():
        probabilities = model(images).softmax(1)
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != data.val.labels).nonzero().squeeze(1)
    # an untrained model: more mistakes than the gallery keeps
    assert len(wrong) > train_module.MISTAKES
    expected = confidence[wrong].sort(descending=True).values[:train_module.MISTAKES]
    mistakes = result["mistakes"]
    assert [m.probability for m in mistakes] == pytest.approx(expected.tolist(), rel=1e-5)
    for mistake in mistakes:
        with torch.no_grad():
            again = model(mistake.image[None]).softmax(1)[0]
        assert mistake.predicted != mistake.target and again.argmax().item() == mistake.predicted
        assert again.max().item() == pytest.approx(mistake.probability, rel=1e-5)
        index = next(i for i in range(len(images)) if torch.equal(images[i], mistake.image))
        # the image is the test image it claims to be
        assert data.val.labels[index].item() == mistake.target


def test_evaluate_without_collect_gives_the_loss_and_accuracy_and_per_class_with_num_classes():
    data = make_tiny_data(size=8)
    model = model_module.get_model("cnn", 4)
    assert set(train_module.evaluate(model, data.val)) == {"loss", "acc"}
    assert set(train_module.evaluate(model, data.val, num_classes=4)) == {
        "loss", "acc", "per_class", "confusion", "macro_f1", "balanced_acc"}
    with pytest.raises(ValueError, match="needs num_classes"):
        train_module.evaluate(model, data.val, collect=True)


def test_class_scores_average_recall_and_f1_over_the_classes_that_have_them():
    # class 2 has no images and is never predicted: left out; class 3 is never predicted: F1 0
    confusion = torch.tensor([[8, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [3, 0, 0, 0]])
    scores = train_module.class_scores(confusion)
    assert scores["balanced_acc"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert scores["macro_f1"] == pytest.approx((16 / 22 + 2 / 5 + 0.0) / 3)
    report = report_module.classification_report(confusion, ["a", "b", "c", "d"])
    macro = report.set_index("class").loc["macro avg"]
    assert scores["macro_f1"] == pytest.approx(macro["f1"])
    assert scores["balanced_acc"] == pytest.approx(macro["recall"])


def test_a_perfect_model_has_no_mistakes_and_a_diagonal_confusion_matrix():
    data = make_tiny_data(size=8)

    # reads the class off the brightness that make_tiny_data gives each class
    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, images):
            brightness = images.mean((1, 2, 3))
            # rank within the batch; classes are balanced and in order
            order = brightness.argsort().argsort()
            return 10 * nn.functional.one_hot(order * 4 // len(images), 4).float() + self.anchor

    result = train_module.evaluate(Oracle(), data.val, num_classes=4, collect=True)
    assert result["acc"] == 1.0 and result["mistakes"] == []
    assert torch.equal(result["confusion"],
                       torch.diag(torch.bincount(data.val.labels, minlength=4)))


def test_a_compiled_run_times_its_first_step_once_and_evaluates_the_plain_model(
        tmp_path, monkeypatch, capsys):
    compile = torch.compile
    # quick: no code generated
    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend="eager"))
    evaluated, evaluate = [], train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda model, *args, **kwargs: evaluated.append(
        model) or
                        evaluate(model, *args, **kwargs))
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4)
    state = TrainState(model, optim_module.make_optimizer(model, configs(LR=0.05).optim),
                       LRA(configs(ASK_EPOCH=None).lra, stream=io.StringIO()))
    train_module.fit(state, data, configs(EPOCHS=2, OUTPUT_DIR=str(tmp_path), COMPILE=True).fit)
    assert capsys.readouterr().err.count("torch.compile: the first training step took") == 1
    # not the compiled wrapper: nothing recompiles
    assert len(evaluated) == 2 and all(m is model for m in evaluated)


def test_fit_captures_again_after_a_restore_or_an_unfreeze_and_replays(tmp_path, stand_in_cuda):
    """Bookkeeping only (the stand-in replays eagerly): when fit captures, and that its rolled-back
    warm-ups and captures leave training as an eager fit's, bit for bit (the same fused SGD)."""
    captured, _ = stand_in_cuda

    def run(cuda_graph):
        torch.manual_seed(0)
        data = make_tiny_data(size=16)
        model = model_module.get_model("cnn", 4, freeze=True)
        optimizer = optim_module.make_optimizer(model, configs(LR=0.5).optim,
                                                lr_device=torch.device("cpu"))
        lra = LRA(configs(ASK_EPOCH=None, UNFREEZE_EPOCH=2).lra, stream=io.StringIO(), frozen=True)
        out = tmp_path / str(cuda_graph)
        out.mkdir()
        return train_module.fit(TrainState(model, optimizer, lra), data,
                                replace(configs(EPOCHS=8, OUTPUT_DIR=str(out)).fit,
                                        cuda_graph=cuda_graph))

    eager = run(False)
    assert not captured
    graphed = run(True)
    events = [row["event"] for row in graphed]
    assert any("unfroze" in e for e in events) and any("restored" in e for e in events)
    # at the start, after unfreezing, each restore
    assert len(captured) == 2 + sum("restored" in e for e in events)
    assert captured[1] > captured[0]  # the unfrozen body's parameters are in the new capture
    assert [row["train_loss"] for row in graphed] == [row["train_loss"] for row in eager]
    assert [row["event"] for row in eager] == events


def test_a_write_that_failed_in_the_background_stops_training_before_the_next_step(
        tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = make_tiny_data(size=8)
    state = TrainState(model_module.get_model("cnn", 4), None, LRA(configs(ASK_EPOCH=None).lra))
    state.optimizer = optim_module.make_optimizer(state.model, configs(LR=0.05).optim)

    def full_disk(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files_module, "write_fault", full_disk)
    writer = checkpoint_module.EpochWriter(str(tmp_path))
    writer.save(state.state_dict(), new_best=False)
    writer._thread.join()  # the write has failed, and nobody has asked yet
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    step = step_module.TrainStep(state.model, state.optimizer, nn.CrossEntropyLoss())
    with pytest.raises(files_module.WriteFailed,
                       match=f"could not write last_checkpoint.pth in {tmp_path}: no space left"):
        train_module.train_one_epoch(step, data.train, check=writer.check)
    # not one step taken
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    writer.wait()  # raised once, by check()


# ------------------------------------------------------------------- soft targets and class weights


def test_the_accuracy_tally_counts_a_hit_when_the_logits_argmax_is_the_soft_targets_largest_class():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    # hit, miss, hit, miss
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.0, 0.2, 0.8], [0.1, 0.0, 0.9]])
    totals = [torch.zeros(()), torch.zeros((), dtype=torch.int64), 0]
    train_module._tally(([torch.tensor(0.5)], [logits], [soft]), totals, epoch=1, last_batch=1)
    assert totals[1].item() == 2 and totals[2] == 4 and totals[0].item() == pytest.approx(2.0)
    # indices
    train_module._tally(([torch.tensor(0.5)], [logits], [torch.tensor([0, 1, 1, 0])]), totals, 1, 2)
    assert totals[1].item() == 2 + 3 and totals[2] == 8


def mixed_fit(tmp_path, cuda_graph=False):
    """fit on tiny data whose training batches get Mixup or CutMix (both on, as the reference
    recipe)."""
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    mix = augment_module.batch_mixer(dict(mixup=0.2, cutmix=1.0), num_classes=4)
    data.train = loader_module.MixedLoader(data.train, mix)
    model = model_module.get_model("cnn", 4)
    cpu = torch.device("cpu")  # the LR as a tensor: fused SGD, eager or captured
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05).optim, lr_device=cpu)
    lra = LRA(configs(ASK_EPOCH=None).lra, stream=io.StringIO())
    tmp_path.mkdir(exist_ok=True)
    return train_module.fit(TrainState(model, optimizer, lra), data,
                            replace(configs(EPOCHS=2, OUTPUT_DIR=str(tmp_path),
                                            LABEL_SMOOTHING=0.1).fit, cuda_graph=cuda_graph))


def test_fit_trains_on_mixed_batches_on_the_cpu_and_validates_on_plain_ones(
        tmp_path, monkeypatch, one_thread):
    evaluated, evaluate = [], train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate",
                        lambda model, loader, **kwargs: evaluated.append(loader)
                        or evaluate(model, loader, **kwargs))
    history = mixed_fit(tmp_path)
    assert len(history) == 2 and all(math.isfinite(row["train_loss"]) for row in history)
    assert all(0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1 for row in history)
    assert all(isinstance(loader, loader_module.ResidentLoader) for loader in evaluated) and len(
        evaluated) == 2


def test_a_step_with_soft_targets_captures_once_and_replays(tmp_path, stand_in_cuda, one_thread):
    """Bookkeeping only (the stand-in replays eagerly): the float (N, 4) targets go through the
    graph's input buffer, and the rolled-back capture leaves training as the eager run's, bit for
    bit."""
    captured, _ = stand_in_cuda
    eager = mixed_fit(tmp_path / "eager")
    graphed = mixed_fit(tmp_path / "graphed", cuda_graph=True)
    restores = sum("restored" in row["event"] for row in graphed[:-1])  # each followed by a capture
    assert len(captured) == 1 + restores
    assert [row["train_loss"] for row in graphed] == [row["train_loss"] for row in eager]


def test_balanced_class_weights_are_n_over_classes_times_each_count():
    weights = train_module.balanced_class_weights([90, 10, 20], ["a", "b", "c"])
    assert weights == pytest.approx((120 / (3 * 90), 120 / (3 * 10), 120 / (3 * 20)))
    # each class adds n / classes
    assert sum(w * c for w, c in zip(weights, [90, 10, 20])) == pytest.approx(120)
    with pytest.raises(ValueError,
                       match="^CLASS_WEIGHTS = 'balanced' needs training images of every class, "
                             "and 'b' has none"):
        train_module.balanced_class_weights([5, 0, 3], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"^CLASS_WEIGHTS = \(1.0, 0.0\) is out of range"):
        replace(configs(EPOCHS=1).fit, class_weights=(1.0, 0.0))


def test_the_training_loss_weighs_each_class_and_keeps_label_smoothing():
    logits, targets = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([
        0, 0, 0, 0, 1, 2])
    loss = train_module.training_loss(replace(configs(EPOCHS=1, LABEL_SMOOTHING=0.1).fit,
                                              class_weights=(0.5, 2.0, 2.0)))
    per_image = nn.functional.cross_entropy(logits, targets, label_smoothing=0.1, reduction="none")
    smoothed = 0.9 * nn.functional.one_hot(targets, 3) + 0.1 / 3
    # weight of each class
    by_hand = -(torch.tensor([0.5, 2.0, 2.0]) * smoothed * logits.log_softmax(1)).sum(1)
    weights = torch.tensor([0.5, 2.0, 2.0])[targets]
    assert loss(logits, targets).item() == pytest.approx((by_hand.sum() / weights.sum()).item(),
                                                         rel=1e-5)
    unweighted = train_module.training_loss(configs(EPOCHS=1, LABEL_SMOOTHING=0.1).fit)
    assert unweighted(logits, targets).item() == pytest.approx(per_image.mean().item(), rel=1e-6)


def test_balanced_class_weights_raise_the_recall_of_the_rare_class_on_a_ten_to_one_split(
        one_thread):
    """Two overlapping Gaussians, 1,000 images of class 0 and 100 of class 1, and a linear model
    trained by train_one_epoch with fit's loss (training_loss): unweighted, it calls most of the
    rare class common; with the balanced weights, it trains as if balanced and finds most of it, on
    a balanced test set."""
    generator = torch.Generator().manual_seed(0)

    def gaussians(n_common, n_rare):
        points = torch.cat([torch.randn(n_common, 2, generator=generator),
                            torch.randn(n_rare, 2, generator=generator) + torch.tensor([1.5, 0.0])])
        return points, torch.cat([torch.zeros(n_common, dtype=torch.int64),
                                  torch.ones(n_rare, dtype=torch.int64)])

    train_points, train_labels = gaussians(1000, 100)
    test_batches = [gaussians(500, 500)]
    counts = torch.bincount(train_labels).tolist()

    def rare_recall(class_weights):
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        loss_fn = train_module.training_loss(replace(configs().fit, class_weights=class_weights))
        step = step_module.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1,
                                                            momentum=0.9), loss_fn)
        for epoch in range(20):
            order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(
                epoch))
            batches = [(train_points[i], train_labels[i]) for i in order.split(50)]
            train_module.train_one_epoch(step, batches, epoch=epoch)
        return train_module.evaluate(model, test_batches, num_classes=2)["per_class"][1]

    weights = train_module.balanced_class_weights(counts, ["common", "rare"])
    assert weights == pytest.approx((1100 / 2000, 1100 / 200))
    plain, balanced = rare_recall(None), rare_recall(weights)
    assert plain < 0.4 and balanced > 0.6, (plain, balanced)


def test_validation_and_best_model_pth_see_the_ema_worked_out_from_the_weights_after_each_step(
        tmp_path, one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(size=8)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05).optim)
    ema = optim_module.EMA(model, decay=0.8)
    lra = LRA(replace(configs(ASK_EPOCH=None).lra, adjust_lr=False),
              stream=io.StringIO())  # no cuts: no restores
    def exact(state):  # floats in float64, whole numbers as they are
        return {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
    initial, after_steps = exact(model.state_dict()), []
    optimizer.register_step_post_hook(lambda *_: after_steps.append(exact(model.state_dict())))
    state = TrainState(model, optimizer, lra, ema=ema)
    history = train_module.fit(state, data, configs(EPOCHS=3, OUTPUT_DIR=str(tmp_path)).fit)

    # the EMA by its definition, in float64, from the weights after each step
    averages, average = [], initial
    for t, weights in enumerate(after_steps):
        decay = min(0.8, (1 + t) / (10 + t))
        average = {k: decay * average[k] + (1 - decay) * v if v.is_floating_point() else v
                   for k, v in weights.items()}
        if (t + 1) % len(data.train) == 0:
            averages.append(average)
    assert len(averages) == len(history) == 3
    saved = torch.load(tmp_path / "best_model.pth", weights_only=True)
    for row, average in zip(history, averages):
        averaged_model = model_module.get_model("cnn", 4)
        averaged_model.load_state_dict({k: v.to(saved[k].dtype) for k, v in average.items()})
        assert train_module.evaluate(averaged_model, data.val)["loss"] == pytest.approx(row[
            "val_loss"], rel=1e-4)
    for key, value in averages[lra.best_epoch - 1].items():
        assert torch.allclose(saved[key].to(value.dtype), value, atol=1e-5), key
        # what the final test sees
        assert torch.equal(state.evaluated_model.state_dict()[key], saved[key])
    raw = train_module.evaluate(model, data.val)["loss"]  # fit ends on the best epoch's own weights
    # which validation did not see
    assert raw != pytest.approx(history[lra.best_epoch - 1]["val_loss"], rel=1e-3)
