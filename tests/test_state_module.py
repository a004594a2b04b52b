"""state_module: the best epoch's snapshot (the EMA's too), taken, restored and read back from a
checkpoint; a TrainState saved and loaded goes on as the one it was saved from, with an EMA,
accumulation and clipping too."""

import copy
import dataclasses
import functools
import io

import pytest
import torch
from torch import nn

import model_module
import optim_module
import state_module
import step_module
import train_module
import utils
from callback_module import LRA
from conftest import assert_same_state, configs, make_tiny_data, random_batch, state_of
from state_module import RunInfo, TrainState


def test_restoring_the_best_epoch_twice_brings_back_the_same_state():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim)
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))

    def step():
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    best = state_module.Snapshot()
    best.take(model, optimizer)
    kept = copy.deepcopy(best.optimizer)
    for _ in range(2):  # LRA restores the same best epoch after each of two bad epochs
        step()
        best.restore(model, optimizer)
        momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()
                    if p in optimizer.state]
        assert all(torch.equal(m, kept["state"][i]["momentum_buffer"]) for i, m in enumerate(
            momentum))
        assert all(torch.equal(v, best.model[k]) for k, v in model.state_dict().items())


def test_a_snapshot_read_from_a_checkpoint_shares_no_tensor_with_the_optimizer():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim)
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    saved = {"optimizer": optimizer.state_dict(), "best": {"model": model.state_dict(),
                                                           "optimizer": None}}
    # torch.load keeps tensors that were shared when saved
    saved["best"]["optimizer"] = saved["optimizer"]
    kept = copy.deepcopy(saved["optimizer"])
    best = state_module.Snapshot()
    best.load_state_dict(saved["best"], torch.device("cpu"))
    optimizer.load_state_dict(saved["optimizer"])  # as resume does
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    assert all(torch.equal(best.optimizer["state"][i]["momentum_buffer"],
                           kept["state"][i]["momentum_buffer"]) for i in kept["state"])


def new_state(data, ema_decay=None, accumulate=1):
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.5, SCHEDULE="onecycle",
                                                           LOOKAHEAD=True).optim)
    steps = 4 * step_module.optimizer_steps(len(data.train), accumulate)
    info = RunInfo({"MODEL": "cnn"}, data.classes, list(data.mean), list(data.std), 8,
                   precision="fp32", started="2026-11-30T04:00:00+00:00")
    return TrainState(model, optimizer, LRA(configs(ASK_EPOCH=None, SCHEDULE="onecycle").lra,
                                            stream=io.StringIO()),
                      schedule=optim_module.make_schedule(optimizer, "onecycle", 0.5, steps),
                      lookahead=optim_module.Lookahead(model, steps),
                      ema=optim_module.EMA(model, ema_decay) if ema_decay else None, info=info)


@pytest.mark.parametrize("ema_decay, accumulate, clip", [(None, 1, None), (0.9, 3, 1.0)],
                         ids=["plain", "EMA, accumulation and clipping"])
def test_a_state_loaded_from_its_state_dict_trains_on_exactly_as_the_original(
        tmp_path, ema_decay, accumulate, clip, one_thread):
    torch.manual_seed(0)
    # 4 batches: with accumulate 3, a group of 3 and one of 1 each epoch
    data = make_tiny_data(size=8)
    original = new_state(data, ema_decay, accumulate)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fit_config = functools.partial(configs, ACCUMULATE_STEPS=accumulate, CLIP_GRAD_NORM=clip)
    train_module.fit(original, data, fit_config(EPOCHS=2, OUTPUT_DIR=str(tmp_path / "a")).fit)
    saved = original.state_dict()
    assert set(saved) == {*state_module.KEYS, *(f.name for f in dataclasses.fields(RunInfo))}
    assert saved["epoch"] == original.epoch == 2 and saved["started"] == original.info.started
    utils.save_torch(saved, str(tmp_path / "state.pth"))
    train_module.fit(original, data, fit_config(EPOCHS=3, OUTPUT_DIR=str(tmp_path / "a")).fit)
    torch.manual_seed(123)  # the loaded random state, not this one, must decide what comes next
    copy_ = new_state(data, ema_decay, accumulate)
    copy_.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=True))
    assert copy_.epoch == 2 and copy_.history == original.history[:2]
    steps = 2 * step_module.optimizer_steps(len(data.train), accumulate)
    assert copy_.schedule.step == steps and copy_.lookahead.step == steps
    assert copy_.ema is None or copy_.ema.updates == steps
    train_module.fit(copy_, data, fit_config(EPOCHS=3, OUTPUT_DIR=str(tmp_path / "b")).fit)
    assert copy_.history[-1]["train_loss"] == original.history[-1]["train_loss"]
    assert [row["val_loss"] for row in copy_.history] == [row["val_loss"]
                                                          for row in original.history]
    assert all(torch.equal(a, b) for a, b in zip(copy_.model.state_dict().values(),
                                                 original.model.state_dict().values()))
    if ema_decay:
        assert all(torch.equal(a, b) for a, b in zip(copy_.ema.module.state_dict().values(),
                                                     original.ema.module.state_dict().values()))
        assert torch.load(tmp_path / "b" / "best_model.pth", weights_only=True).keys() == \
            original.model.state_dict().keys()  # the EMA's weights, under the model's own names


def test_restoring_the_best_epoch_puts_back_the_weights_the_optimizer_state_and_the_ema(one_thread):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim)
    ema = optim_module.EMA(model, 0.9)
    step = step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss())

    def train(seed):
        step(*random_batch(seed=seed))
        ema.update()

    train(0)
    best = state_module.Snapshot()
    best.take(model, optimizer, ema)
    kept = state_of(model, optimizer), {k: v.clone()
                                        for k, v in ema.module.state_dict().items()}, ema.updates
    assert best.weights is best.ema["model"]  # best_model.pth: the EMA's
    for seed in (1, 2):  # two bad epochs
        train(seed)
    best.restore(model, optimizer, ema)
    assert_same_state(model, optimizer, kept[0])
    assert all(torch.equal(v, kept[1][k])
               for k, v in ema.module.state_dict().items()) and ema.updates == kept[2]
    train(3)  # training on changes neither the snapshot nor what it was taken from
    assert all(torch.equal(v, kept[1][k]) for k, v in best.ema["model"].items())
