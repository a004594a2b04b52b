"""The loop: CSV rows, best_model.pth, non-finite losses, schedules, lookahead, the fast preset, evaluate's
confusion matrix and mistakes, the LR finder."""

import contextlib
import copy
import functools
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


def test_restoring_the_best_epoch_twice_brings_back_the_same_state():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(model, 0.1)
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))

    def step():
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    best = train_module.Snapshot()
    best.take(model, optimizer)
    kept = copy.deepcopy(best.optimizer)
    for _ in range(2):  # LRA restores the same best epoch after each of two bad epochs
        step()
        best.restore(model, optimizer)
        momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters() if p in optimizer.state]
        assert all(torch.equal(m, kept["state"][i]["momentum_buffer"]) for i, m in enumerate(momentum))
        assert all(torch.equal(v, best.model[k]) for k, v in model.state_dict().items())


def test_a_snapshot_read_from_a_checkpoint_shares_no_tensor_with_the_optimizer():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(model, 0.1)
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    saved = {"optimizer": optimizer.state_dict(), "best": {"model": model.state_dict(), "optimizer": None}}
    saved["best"]["optimizer"] = saved["optimizer"]  # torch.load keeps tensors that were shared when saved
    kept = copy.deepcopy(saved["optimizer"])
    best = train_module.Snapshot()
    best.load_state_dict(saved["best"], torch.device("cpu"))
    optimizer.load_state_dict(saved["optimizer"])  # as resume does
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    assert all(torch.equal(best.optimizer["state"][i]["momentum_buffer"], kept["state"][i]["momentum_buffer"])
               for i in kept["state"])


def test_a_resumed_run_keeps_its_precision_where_it_still_runs_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(train_module, "bf16_speedup_on_cpu", lambda *a, **k: pytest.fail("no trial on resume"))
    choose = functools.partial(train_module.choose_precision, model=None, image_size=32, channels_last=True,
                               run_steps=0, trial_steps=500)
    assert choose(True, cuda, recorded="fp32") == "fp32" and choose(True, cuda, recorded="bf16") == "bf16"
    assert choose(False, cuda, recorded="bf16") == "fp32"  # BF16 turned off: off
    assert choose(True, cuda) == "bf16" and choose(True, cpu) == "fp32"  # older files: the rule of their time
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert choose(True, cpu, recorded="bf16") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert choose(True, cpu, recorded="bf16") == "fp32"  # from a GPU to a CPU without native bf16


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


# --------------------------------------------------------------------------- evaluate(collect=True)


def test_evaluate_collects_a_confusion_matrix_and_the_most_confident_mistakes(one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(n_val=40, size=8, batch_size=4)  # validation batches of 8: the top-k runs over 5
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
    assert len(wrong) > train_module.MISTAKES  # an untrained model: more mistakes than the gallery keeps
    expected = confidence[wrong].sort(descending=True).values[:train_module.MISTAKES]
    mistakes = result["mistakes"]
    assert [m.probability for m in mistakes] == pytest.approx(expected.tolist(), rel=1e-5)
    for mistake in mistakes:
        with torch.no_grad():
            again = model(mistake.image[None]).softmax(1)[0]
        assert mistake.predicted != mistake.target and again.argmax().item() == mistake.predicted
        assert again.max().item() == pytest.approx(mistake.probability, rel=1e-5)
        index = next(i for i in range(len(images)) if torch.equal(images[i], mistake.image))
        assert data.val.labels[index].item() == mistake.target  # the image is the test image it claims to be


def test_evaluate_without_collect_returns_what_it_always_did():
    data = make_tiny_data(size=8)
    model = model_module.get_model("cnn", 4)
    assert set(train_module.evaluate(model, data.val)) == {"loss", "acc"}
    assert set(train_module.evaluate(model, data.val, num_classes=4)) == {"loss", "acc", "per_class"}
    with pytest.raises(ValueError, match="needs num_classes"):
        train_module.evaluate(model, data.val, collect=True)


def test_a_perfect_model_has_no_mistakes_and_a_diagonal_confusion_matrix():
    data = make_tiny_data(size=8)

    class Oracle(nn.Module):  # reads the class off the brightness that make_tiny_data gives each class
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, images):
            brightness = images.mean((1, 2, 3))
            order = brightness.argsort().argsort()  # rank within the batch; classes are balanced and in order
            return 10 * nn.functional.one_hot(order * 4 // len(images), 4).float() + self.anchor

    result = train_module.evaluate(Oracle(), data.val, num_classes=4, collect=True)
    assert result["acc"] == 1.0 and result["mistakes"] == []
    assert torch.equal(result["confusion"], torch.diag(torch.bincount(data.val.labels, minlength=4)))


# --------------------------------------------------------------------------- the LR finder


def _state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict()))


def _assert_same(model, optimizer, state):
    weights, optimizer_state = state
    for key, value in model.state_dict().items():  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(value, weights[key]), key
    assert optimizer.state_dict()["param_groups"] == optimizer_state["param_groups"]  # LRs included
    now = optimizer.state_dict()["state"]
    assert now.keys() == optimizer_state["state"].keys()
    for key in now:
        assert torch.equal(now[key]["momentum_buffer"], optimizer_state["state"][key]["momentum_buffer"])


def test_the_lr_finder_puts_everything_back_and_suggests_an_lr_it_tried(one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(size=8, batch_size=16)  # 4 batches: the finder cycles through them
    model = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(model, 0.05)
    train_module.train_one_epoch(model, data.train, optimizer, nn.CrossEntropyLoss())  # momentum to keep
    model.eval()
    before = _state(model, optimizer)
    rng = torch.get_rng_state()
    lrs, losses, suggestion = train_module.find_lr(model, data.train, optimizer, nn.CrossEntropyLoss(),
                                                   start_lr=1e-4, end_lr=10, steps=60)
    _assert_same(model, optimizer, before)
    assert not model.training and train_module.get_lr(optimizer) == 0.05
    assert torch.equal(torch.get_rng_state(), rng)  # a run with the finder draws what one without would
    assert lrs[0] == pytest.approx(1e-4) and all(a < b for a, b in zip(lrs, lrs[1:]))
    assert lrs[1] / lrs[0] == pytest.approx((10 / 1e-4) ** (1 / 59))  # exponential steps, 10 reached at 60
    assert 1e-4 <= suggestion <= 10 and suggestion in lrs
    # this net diverges before LR 10: the test stops once the smoothed loss passes 4x its lowest
    assert len(lrs) < 60 and losses[-1] > 4 * min(losses) and all(x <= 4 * min(losses[:i + 1])
                                                                   for i, x in enumerate(losses[:-1]))
    # the first smoothed loss is the first batch's own (the bias correction), at the untouched weights
    images, targets = next(iter(data.train))
    first = nn.functional.cross_entropy(model.train()(images), targets).item()
    assert losses[0] == pytest.approx(first, rel=1e-6)


def test_the_lr_finder_trains_only_the_head_of_a_frozen_model(one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(size=8)
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = train_module.make_optimizer(model, 0.05, body_lr_scale=0.1)
    before = _state(model, optimizer)
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    heads = []

    def loss_fn(logits, targets):  # called at every step: the body is as it was, the head moves
        for key, value in model.body.state_dict().items():
            assert torch.equal(value, body[key]), key
        heads.append(model.head[1].weight.detach().clone())
        return nn.functional.cross_entropy(logits, targets)

    lrs, losses, suggestion = train_module.find_lr(model, data.train, optimizer, loss_fn, steps=20, end_lr=1)
    assert len(lrs) > 5 and not torch.equal(heads[0], heads[-1])
    assert lrs[0] <= suggestion <= lrs[-1]
    _assert_same(model, optimizer, before)


def test_the_suggestion_is_the_middle_of_the_longest_fall():
    lrs = [10.0 ** (i / 10) for i in range(40)]
    losses = [3.0] * 10 + [3.0 - 0.1 * i for i in range(20)] + [1.5 + 0.5 * i for i in range(10)]
    # trimmed to points 4..34; the longest fall runs from the plateau's last point, 10, to point 29
    assert train_module.suggest_lr(lrs, losses) == lrs[(10 + 29) // 2]


def test_the_bf16_trial_leaves_the_model_and_the_random_state_as_they_were(monkeypatch):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 10)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    speedup = train_module.bf16_speedup_on_cpu(model, 16, steps=1)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert isinstance(speedup, float) and speedup > 0
    else:
        assert speedup is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert train_module.bf16_speedup_on_cpu(model, 16) is None  # no native bf16: no trial, fp32


# --------------------------------------------------------------------------- what a captured (CUDA-graph) step needs


def _batch(n=8, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def test_an_lr_held_as_a_tensor_trains_as_a_number_does_and_is_saved_as_one():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    number = train_module.make_optimizer(model, 0.1, norm_lr_scale=4.0)
    held = train_module.make_optimizer(twin, 0.1, norm_lr_scale=4.0, lr_device=torch.device("cpu"))
    tensors = [group["lr"] for group in held.param_groups]
    assert all(isinstance(t, torch.Tensor) for t in tensors) and len(tensors) == 2
    steps = [train_module.TrainStep(m, o, nn.CrossEntropyLoss()) for m, o in ((model, number), (twin, held))]
    for lr in (0.1, 0.02, 0.3):
        for optimizer, step in zip((number, held), steps):
            train_module.set_lr(optimizer, lr)
            torch.manual_seed(1)  # the same dropout
            step(*_batch(seed=int(lr * 100)))
        assert all(group["lr"] is t for group, t in zip(held.param_groups, tensors))  # filled in place
        assert [float(g["lr"]) for g in held.param_groups] == pytest.approx([g["lr"] for g in number.param_groups])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), "the fused step with tensor LRs trained differently"
    saved = held.state_dict()
    assert all(type(group["lr"]) is float for group in saved["param_groups"])  # any optimizer loads it
    number.load_state_dict(copy.deepcopy(saved))
    assert all(type(group["lr"]) is float and not group["fused"] for group in number.param_groups)
    held.load_state_dict(copy.deepcopy(number.state_dict()))
    assert all(isinstance(group["lr"], torch.Tensor) and group["fused"] for group in held.param_groups)
    assert train_module.get_lr(held) == pytest.approx(0.3)


def test_a_zero_momentum_buffer_steps_exactly_as_none_does():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    plain, primed = train_module.make_optimizer(model, 0.1), train_module.make_optimizer(twin, 0.1)
    train_module.init_momentum(primed)
    assert len(primed.state) == len(list(twin.parameters())) and not plain.state
    for m, o in ((model, plain), (twin, primed)):
        torch.manual_seed(1)  # the same dropout
        train_module.TrainStep(m, o, nn.CrossEntropyLoss())(*_batch())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_warm_up_steps_leave_the_model_the_optimizer_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = train_module.make_optimizer(model, 0.1, lr_device=torch.device("cpu"))
    step = train_module.TrainStep(model, optimizer, nn.CrossEntropyLoss())
    step(*_batch())
    before, key = _state(model, optimizer), train_module.graph_key(model, optimizer)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with train_module.rolled_back(model, optimizer):
        for seed in range(3):
            step(*_batch(seed=seed))
            torch.rand(5)
    _assert_same(model, optimizer, before)
    assert torch.equal(torch.rand(3), expected)
    assert train_module.graph_key(model, optimizer) == key  # put back in place: a graph would still hold


def test_the_graph_key_changes_exactly_when_a_captured_step_would_go_stale():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = train_module.make_optimizer(model, 0.1, lr_device=torch.device("cpu"))
    train_module.init_momentum(optimizer)
    step = train_module.TrainStep(model, optimizer, nn.CrossEntropyLoss())
    key = train_module.graph_key(model, optimizer)
    best = train_module.Snapshot()
    best.take(model, optimizer)
    step(*_batch())
    train_module.set_lr(optimizer, 0.01)
    best.restore(model)  # the weights are copied in
    assert train_module.graph_key(model, optimizer) == key
    best.restore(model, optimizer)  # new momentum buffers and LR tensors
    assert train_module.graph_key(model, optimizer) != key
    key = train_module.graph_key(model, optimizer)
    model_module.unfreeze_body(model)  # more parameters train
    assert train_module.graph_key(model, optimizer) != key


def test_cuda_graphs_are_used_where_they_can_be_and_a_yes_that_cannot_be_is_refused():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert train_module.use_cuda_graph("auto", cuda)
    assert not train_module.use_cuda_graph("auto", cpu)
    assert not train_module.use_cuda_graph("auto", cuda, world_size=2)
    assert not train_module.use_cuda_graph("no", cuda)
    with pytest.raises(ValueError, match="needs a CUDA device, one process"):
        train_module.use_cuda_graph("yes", cpu, world_size=2)
    with pytest.raises(ValueError, match="a CUDA graph needs a CUDA device"):
        model = model_module.get_model("cnn", 4)
        train_module.TrainStep(model, train_module.make_optimizer(model, 0.1, lr_device=cpu), nn.CrossEntropyLoss(),
                               graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA device")
def test_a_captured_step_trains_as_the_eager_step_does_through_lr_changes_restores_and_a_short_batch():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = model_module.get_model("cnn", 4).to(device, memory_format=torch.channels_last)
    model.head[0].p = 0.0  # no dropout: the two must draw nothing at random
    twin = copy.deepcopy(model)
    optimizers = [train_module.make_optimizer(m, 0.1, lr_device=device) for m in (model, twin)]
    steps = [train_module.TrainStep(m, o, nn.CrossEntropyLoss(), graph=graph)
             for m, o, graph in ((model, optimizers[0], False), (twin, optimizers[1], True))]
    bests, graphs = [train_module.Snapshot(), train_module.Snapshot()], []
    for epoch in range(3):
        for step in steps:
            step.new_epoch()
        for i, (images, targets) in enumerate([_batch(seed=epoch * 10 + s) for s in range(4)] + [_batch(n=5)]):
            for o, step in zip(optimizers, steps):
                train_module.set_lr(o, 0.1 / (1 + i + epoch))
                step(images.to(device), targets.to(device))
        graphs.append(steps[1].graph)
        assert steps[1].use_graph and steps[1].graph is not None
        for a, b in zip(model.state_dict().values(), twin.state_dict().values()):  # before the restore
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), f"epoch {epoch}"
        for m, o, best in zip((model, twin), optimizers, bests):
            if epoch == 0:
                best.take(m, o)
            else:
                best.restore(m, o)  # new optimizer state: the next epoch captures again
    assert graphs[0] is graphs[1] and graphs[2] is not graphs[1]  # kept through epoch 1, captured after a restore


def test_a_compiled_run_times_its_first_step_once_and_evaluates_the_plain_model(tmp_path, monkeypatch, capsys):
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend="eager"))  # quick: no code generated
    evaluated, evaluate = [], train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda model, *args, **kwargs: evaluated.append(model) or
                        evaluate(model, *args, **kwargs))
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4)
    train_module.fit(model, data, train_module.make_optimizer(model, 0.05), LRA(ask_epoch=None, stream=io.StringIO()),
                     epochs=2, loss_fn=nn.CrossEntropyLoss(), output_dir=str(tmp_path), run_info={"classes": data.classes},
                     wrap=functools.partial(train_module.wrap_for_training, compile=True))
    assert capsys.readouterr().err.count("torch.compile: the first training step took") == 1
    assert len(evaluated) == 2 and all(m is model for m in evaluated)  # not the compiled wrapper: nothing recompiles


class _EagerGraph:
    """torch.cuda.CUDAGraph's stand-in on the CPU: replay() runs the captured TrainStep's step eagerly on its
    input buffers and writes its output buffers, as a replay does; broken=True leaves out the optimizer step."""

    def __init__(self, step, broken=False):
        self.step, self.broken = step, broken

    def replay(self):
        step = self.step.optimizer.step
        if self.broken:
            self.step.optimizer.step = lambda: None
        try:
            loss, logits = self.step._step(*self.step.inputs)
        finally:
            self.step.optimizer.step = step
        with torch.no_grad():
            self.step.outputs[0].copy_(loss)
            self.step.outputs[1].copy_(logits)


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """torch.cuda's streams and graph capture replaced by stand-ins that run eagerly (the capture's step rolled
    back: a capture records work without doing it), and train_module.TrainStep by one that takes graph=True on
    the CPU. Tests that use it check bookkeeping only: when the step is captured again, which optimizer state
    a capture holds, and the fallback to eager steps. Nothing is captured or replayed here, so they say
    nothing about whether CUDA captures the step; the CUDA-only test of a captured step does that. Yields the
    sizes of the optimizer state at each capture, and a switch that breaks the replays."""
    captured, capturing, broken = [], [], []

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    class CapturedStep(train_module.TrainStep):
        def __init__(self, *args, graph=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_graph = graph  # past the CUDA check

        def _capture(self, images, targets):
            capturing[:] = [self]
            super()._capture(images, targets)
            captured.append(len(self.optimizer.state))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "graph",
                        lambda graph, **options: train_module.rolled_back(capturing[0].model, capturing[0].optimizer))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _EagerGraph(capturing[0], broken=bool(broken)))
    monkeypatch.setattr(train_module, "TrainStep", CapturedStep)
    yield captured, broken


def test_fit_captures_the_step_again_after_a_restore_or_an_unfreeze_and_trains_as_eager_fit_does(tmp_path,
                                                                                               stand_in_cuda):
    captured, _ = stand_in_cuda

    def run(cuda_graph):
        torch.manual_seed(0)
        data = make_tiny_data(size=16)
        model = model_module.get_model("cnn", 4, freeze=True)
        optimizer = train_module.make_optimizer(model, 0.5, lr_device=torch.device("cpu"))
        lra = LRA(ask_epoch=None, stream=io.StringIO(), unfreeze_epoch=2, frozen=True)
        out = tmp_path / str(cuda_graph)
        out.mkdir()
        return train_module.fit(model, data, optimizer, lra, epochs=8, loss_fn=nn.CrossEntropyLoss(),
                                output_dir=str(out), cuda_graph=cuda_graph, run_info={"classes": data.classes})

    eager = run(False)
    assert not captured
    graphed = run(True)
    events = [row["event"] for row in graphed]
    assert any("unfroze" in e for e in events) and any("restored" in e for e in events)
    assert len(captured) == 2 + sum("restored" in e for e in events)  # at the start, after unfreezing, each restore
    assert captured[1] > captured[0]  # the unfrozen body's parameters are in the new capture
    assert [row["train_loss"] for row in graphed] == pytest.approx([row["train_loss"] for row in eager], rel=1e-6)
    assert [row["event"] for row in eager] == events


def test_a_captured_step_that_trains_otherwise_than_the_eager_one_is_dropped_with_a_note(stand_in_cuda, capsys):
    captured, broken = stand_in_cuda
    broken.append(True)  # its replays leave out the optimizer step
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    steps = [train_module.TrainStep(m, train_module.make_optimizer(m, 0.1, lr_device=torch.device("cpu")),
                                    nn.CrossEntropyLoss(), graph=graph) for m, graph in ((model, True), (twin, False))]
    for seed in range(2):
        for step in steps:
            torch.manual_seed(seed)  # the same dropout
            step(*_batch(seed=seed))
    assert not steps[0].use_graph and not captured
    assert "could not be captured in a CUDA graph (a replay of the captured step gave" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
