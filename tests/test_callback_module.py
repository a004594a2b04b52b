"""LRA on scripted metric sequences: cuts, phases, dwell, stops, restoring, the prompt, state."""

import builtins
import dataclasses
import io
import json
import os
import re

import pytest
import torch
from torch import nn

import callback_module
import data_module
import loader_module
import model_module
import optim_module
import source_module
import state_module
import train_module
from callback_module import LRA, LRAConfig
from conftest import augmentation, configs, make_tiny_data
from state_module import TrainState


def tiny_model(freeze=False):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = model_module.Classifier(body, nn.Linear(4, 3))
    if freeze:
        model_module.freeze_body(model)
    return model


class Harness:
    """LRA and the loop's half of the work, as fit does it: metrics in (with the epoch's LR), the
    decision carried out on a real model and optimizer."""

    def __init__(self, model=None, lr=0.1, **settings):
        """settings: LRAConfig's fields; ask_epoch is None (no prompt) unless given."""
        self.model = model or tiny_model()
        sgd = dataclasses.replace(configs(LR=lr, MOMENTUM=0.9, WEIGHT_DECAY=0.0).optim,
                                  nesterov=False)
        self.optimizer = optim_module.make_optimizer(self.model, sgd)
        self.lra = LRA(dataclasses.replace(configs(ASK_EPOCH=None).lra, **settings),
                       frozen=bool(model_module.frozen_parameters(self.model)),
                       stream=io.StringIO())
        self.state = TrainState(self.model, self.optimizer, self.lra)
        self.decision = None

    def on_epoch_end(self, epoch, epoch_metrics):
        """One epoch's decision, carried out; returns whether to stop."""
        epoch_metrics = {**epoch_metrics, "lr": optim_module.get_lr(self.optimizer)}
        self.decision = self.lra.on_epoch_end(epoch, epoch_metrics)
        train_module.apply_decision(self.decision, self.state)
        return self.decision.stop

    @property
    def output(self):
        return self.lra.stream.getvalue()


def make_lra(model=None, lr=0.1, **settings):
    return Harness(model, lr, **settings)


def metrics(train_acc=0.5, val_loss=1.0, val_acc=0.5, train_loss=1.0):
    return {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc}


def lr_of(h):
    return h.optimizer.param_groups[0]["lr"]


def train_step(model, optimizer, seed):
    """One real optimizer step, so weights, BatchNorm buffers and momentum all change."""
    torch.manual_seed(seed)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 6, 6)), torch.randint(0, 3, (8,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def snapshot(lra):
    model_state = {k: v.clone() for k, v in lra.model.state_dict().items()}
    momentum = [lra.optimizer.state[p]["momentum_buffer"].clone() for p in lra.model.parameters()
                if p in lra.optimizer.state]
    return model_state, momentum


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("name, value", [("patience", 0), ("patience", 1.5), ("stop_patience", 0),
                                         ("threshold", 1.5), ("factor", 1.0), ("factor", 0.0),
                                         ("ask_epoch", 0), ("min_lr", -1), ("min_delta", -0.1),
                                         ("unfreeze_epoch", 0)])
def test_bad_setting_is_refused_naming_its_constant(name, value):
    with pytest.raises(ValueError,
                       match=f"^{name.upper()} = {re.escape(repr(value))} is out of range: use "):
        configs(**{name.upper(): value})


def test_every_rule_is_for_a_setting_of_lra_config():
    fields = {field.name for field in dataclasses.fields(LRAConfig)}
    # monitor is a choice of VAL_MONITORS; OptimConfig checks warmup_epochs, the schedule's
    assert set(callback_module.RULES) == fields - {"dwell", "adjust_lr", "monitor", "warmup_epochs"}


def test_a_config_cannot_change_after_it_is_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        configs().lra.patience = 0


# ----------------------------------------------------------------------------- cuts


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_cut_happens_on_the_patience_th_bad_epoch(patience):
    lra = make_lra(patience=patience, threshold=1.0, stop_patience=10)  # phase: training accuracy
    lra.on_epoch_end(1, metrics(train_acc=0.5))
    for bad in range(1, patience + 1):
        lra.on_epoch_end(1 + bad, metrics(train_acc=0.4))
        expected = 0.05 if bad == patience else 0.1
        assert lr_of(lra) == pytest.approx(expected), f"after {bad} bad epochs"
        assert ("LR cut" in lra.decision.event) == (bad == patience)
    assert lra.lra.cuts == 1 and lra.lra.bad_epochs == 0


def test_no_cut_while_improving():
    lra = make_lra(threshold=1.0)
    for epoch, acc in enumerate([0.2, 0.3, 0.4, 0.5, 0.6, 0.7], start=1):
        assert lra.on_epoch_end(epoch, metrics(train_acc=acc)) is False
        assert lra.decision.improved
    assert lr_of(lra) == 0.1 and lra.lra.cuts == 0


def test_cut_respects_min_lr_and_factor():
    lra = make_lra(threshold=1.0, factor=0.25, min_lr=0.02, stop_patience=10)
    lra.on_epoch_end(1, metrics(train_acc=0.5))
    lra.on_epoch_end(2, metrics(train_acc=0.4))
    assert lr_of(lra) == pytest.approx(0.025)
    lra.on_epoch_end(3, metrics(train_acc=0.4))
    assert lr_of(lra) == pytest.approx(0.02)


def test_min_delta_counts_small_gains_as_bad():
    lra = make_lra(threshold=1.0, min_delta=0.05, stop_patience=10)
    lra.on_epoch_end(1, metrics(train_acc=0.5))
    lra.on_epoch_end(2, metrics(train_acc=0.52))
    assert not lra.decision.improved and lr_of(lra) == pytest.approx(0.05)


def test_bad_epochs_without_a_cut_print_a_row():
    """The Keras original crashed printing a bad epoch that did not cut (patience >= 2)."""
    lra = make_lra(patience=3, threshold=1.0)
    lra.on_epoch_end(1, metrics(train_acc=0.5))
    lra.on_epoch_end(2, metrics(train_acc=0.4))
    rows = lra.output.strip().splitlines()
    assert len(rows) == 2 and rows[-1].split("|")[0].strip() == "2"


# ----------------------------------------------------------------------------- phases


def test_phase_switches_at_threshold_and_back():
    lra = make_lra(threshold=0.6, stop_patience=10)
    lra.on_epoch_end(1, metrics(train_acc=0.4, val_loss=1.0))
    assert lra.decision.monitor == "train_acc"
    # exactly at the threshold: validation loss
    lra.on_epoch_end(2, metrics(train_acc=0.6, val_loss=0.9))
    assert lra.decision.monitor == "val_loss" and lra.decision.improved
    # accuracy up, but the monitor is val_loss
    lra.on_epoch_end(3, metrics(train_acc=0.7, val_loss=0.95))
    assert (lra.decision.monitor == "val_loss" and not lra.decision.improved
            and "LR cut" in lra.decision.event)
    lra.on_epoch_end(4, metrics(train_acc=0.5, val_loss=0.99))  # below the threshold again
    assert lra.decision.monitor == "train_acc"


def test_best_weights_follow_validation_loss_in_the_accuracy_phase():
    """Best weights are chosen by validation loss in both phases (the Keras original used
    accuracy)."""
    lra = make_lra(threshold=1.0, dwell=False, stop_patience=10)
    lra.on_epoch_end(1, metrics(train_acc=0.5, val_loss=0.8))
    lra.on_epoch_end(2, metrics(train_acc=0.6, val_loss=1.2))
    assert lra.decision.improved and not lra.decision.new_best and lra.lra.best_epoch == 1


def improv_column(h):
    """The % Improv column of the table's last row."""
    return h.output.strip().splitlines()[-1].split("|")[9].strip()


def test_percent_improvement_is_relative_and_blank_first():
    lra = make_lra(threshold=1.0)
    lra.on_epoch_end(1, metrics(train_acc=0.5))
    assert improv_column(lra) == ""
    lra.on_epoch_end(2, metrics(train_acc=0.6))
    assert float(improv_column(lra)) == pytest.approx(20.0)
    assert callback_module.relative_change(1.0, 0.0, True) is None  # never divides by zero


# ----------------------------------------------------------------------------- dwell


def test_dwell_restores_weights_buffers_and_optimizer_state_of_the_best_epoch():
    lra = make_lra(threshold=0.0, stop_patience=10)  # phase: validation loss
    train_step(lra.model, lra.optimizer, 1)
    lra.on_epoch_end(1, metrics(val_loss=1.0))
    best_model, best_momentum = snapshot(lra)
    train_step(lra.model, lra.optimizer, 2)
    changed_model, _ = snapshot(lra)
    assert not torch.equal(changed_model["body.1.running_mean"], best_model["body.1.running_mean"])
    lra.on_epoch_end(2, metrics(val_loss=1.5))
    restored_model, restored_momentum = snapshot(lra)
    assert_same(restored_model, best_model)
    assert all(torch.equal(a, b) for a, b in zip(restored_momentum, best_momentum))
    assert lr_of(lra) == pytest.approx(0.05)  # the new LR applies after the restore
    assert "restored epoch 1" in lra.decision.event


def test_no_dwell_keeps_the_current_weights():
    lra = make_lra(threshold=0.0, dwell=False, stop_patience=10)
    lra.on_epoch_end(1, metrics(val_loss=1.0))
    train_step(lra.model, lra.optimizer, 2)
    current, _ = snapshot(lra)
    lra.on_epoch_end(2, metrics(val_loss=1.5))
    assert_same(snapshot(lra)[0], current)
    assert lr_of(lra) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- stopping and the end


def test_stop_after_stop_patience_cuts_without_improvement():
    lra = make_lra(threshold=0.0, stop_patience=2)
    assert not lra.on_epoch_end(1, metrics(val_loss=1.0))
    assert not lra.on_epoch_end(2, metrics(val_loss=1.1))
    assert lra.on_epoch_end(3, metrics(val_loss=1.2))
    assert "2 LR cuts" in lra.lra.stop_reason and lra.lra.cuts == 2


def test_improvement_between_cuts_resets_the_stop_count():
    lra = make_lra(threshold=0.0, stop_patience=2)
    lra.on_epoch_end(1, metrics(val_loss=1.0))
    lra.on_epoch_end(2, metrics(val_loss=1.1))      # cut 1
    lra.on_epoch_end(3, metrics(val_loss=0.9))      # improvement
    assert not lra.on_epoch_end(4, metrics(val_loss=1.0))  # cut 1 again, no stop
    assert lra.on_epoch_end(5, metrics(val_loss=1.0))


def test_event_names_what_happened_in_the_order_the_loop_carries_it_out():
    lra = make_lra(threshold=0.0, stop_patience=1)
    lra.on_epoch_end(1, metrics(val_loss=1.0))
    assert lra.decision.event == "best"
    lra.on_epoch_end(2, metrics(val_loss=1.5))
    assert lra.decision.event == "restored epoch 1, LR cut, stop"
    assert callback_module.describe(True, None, True, False,
                                    True) == "best, LR cut, unfroze the body"


@pytest.mark.parametrize("ending", ["epoch limit", "LRA stop", "H", "Ctrl-C"])
def test_fit_ends_on_the_best_weights_whatever_ended_training(ending, monkeypatch, tmp_path):
    """Epoch 1 is the best, epoch 2 moves the weights and is worse; then training ends one way or
    another, and fit's own ending puts epoch 1's weights back."""
    settings = {"epoch limit": {}, "LRA stop": {"stop_patience": 1}, "H": {"ask_epoch": 2},
                "Ctrl-C": {"ask_epoch": 2}}[ending]
    if ending in ("H", "Ctrl-C"):
        scripted_input(monkeypatch, {"H": ["H"], "Ctrl-C": [KeyboardInterrupt()]}[ending])
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lra = LRA(dataclasses.replace(configs().lra, **{"threshold": 0.0, "dwell": False,
                                                    "stop_patience": 5, "ask_epoch": None,
                                                    **settings}), stream=io.StringIO())
    scripted, weights = {1: metrics(val_loss=1.0, val_acc=0.7), 2: metrics(val_loss=1.5)}, []

    # a real step moves the weights; the metrics are scripted
    def one_epoch(step, data, epoch, state, check):
        train_step(state.model, state.optimizer, epoch)
        weights.append({k: v.clone() for k, v in state.model.state_dict().items()})
        return {"epoch": epoch, **scripted[epoch], "lr": optim_module.get_lr(state.optimizer),
                "seconds": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(train_module, "_train_and_validate", one_epoch)
    epochs = 2 if ending == "epoch limit" else 5
    history = train_module.fit(TrainState(model, optimizer, lra), None,
                               configs(EPOCHS=epochs, OUTPUT_DIR=str(tmp_path)).fit)
    assert [row["epoch"] for row in history] == [1, 2]
    # epoch 2 did move them
    assert not all(torch.equal(v, weights[0][k]) for k, v in weights[1].items())
    assert_same(model.state_dict(), weights[0])
    output = lra.stream.getvalue()
    assert "from epoch 1" in output and "70.00%" in output


def test_best_weights_are_restored_when_fit_is_interrupted(monkeypatch, tmp_path):
    data = make_tiny_data()
    model = tiny_model()
    model.head = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    lra = LRA(configs(ASK_EPOCH=None).lra, stream=io.StringIO())
    best = state_module.Snapshot()
    calls = {"n": 0}
    original = train_module.train_one_epoch

    def interrupted_on_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted_on_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_module.fit(TrainState(model, optimizer, lra, best), data,
                         configs(EPOCHS=5, OUTPUT_DIR=str(tmp_path)).fit)
    assert lra.best_epoch in (1, 2)
    assert_same(model.state_dict(), best.model)
    assert "interrupted during epoch 3" in lra.stream.getvalue()


# ----------------------------------------------------------------------------- the prompt


def scripted_input(monkeypatch, answers, terminal=True):
    """Make stdin look like a terminal whose user types `answers` (EOF when they run out)."""
    answers = list(answers)
    asked = []

    def fake_input(prompt=""):
        asked.append(prompt)
        if not answers:
            raise EOFError
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(callback_module, "_stdin_is_terminal", lambda: terminal)
    monkeypatch.setattr(builtins, "input", fake_input)
    return asked


def test_h_halts(monkeypatch):
    asked = scripted_input(monkeypatch, ["h"])
    lra = make_lra(ask_epoch=2, threshold=1.0)
    assert not lra.on_epoch_end(1, metrics(train_acc=0.1))
    assert lra.on_epoch_end(2, metrics(train_acc=0.2))
    assert len(asked) == 1 and "halted by the user" in lra.lra.stop_reason


def test_a_number_trains_that_many_more_epochs_then_asks_again(monkeypatch):
    asked = scripted_input(monkeypatch, ["3", "H"])
    lra = make_lra(ask_epoch=2, threshold=1.0)
    stops = [lra.on_epoch_end(e, metrics(train_acc=0.1 * e)) for e in range(1, 6)]
    assert stops == [False, False, False, False, True]
    assert len(asked) == 2 and lra.lra.run_until == 5


@pytest.mark.parametrize("bad", ["", "   ", "0", "-3", "maybe", "2.5", "F"])
def test_bad_answers_are_asked_again(monkeypatch, bad):
    asked = scripted_input(monkeypatch, [bad, "h"])
    lra = make_lra(ask_epoch=1)  # no frozen layers, so F is not offered and not accepted
    assert lra.on_epoch_end(1, metrics())
    assert len(asked) == 2
    assert "not accepted" in lra.output
    assert "F to fine-tune" not in asked[0]


def test_end_of_input_stops_asking_and_goes_on(monkeypatch):
    asked = scripted_input(monkeypatch, [])
    lra = make_lra(ask_epoch=1, threshold=1.0)
    stops = [lra.on_epoch_end(e, metrics(train_acc=0.1 * e)) for e in range(1, 5)]
    assert stops == [False] * 4 and len(asked) == 1 and lra.lra.prompts_off


def test_ctrl_c_at_the_prompt_halts_cleanly(monkeypatch):
    scripted_input(monkeypatch, [KeyboardInterrupt()])
    lra = make_lra(ask_epoch=1)
    assert lra.on_epoch_end(1, metrics())
    assert "Ctrl-C" in lra.lra.stop_reason


def test_without_a_terminal_input_is_never_called(monkeypatch):
    def forbidden(prompt=""):
        raise AssertionError("input() was called without a terminal")
    monkeypatch.setattr(builtins, "input", forbidden)
    monkeypatch.setattr("sys.stdin", io.StringIO("H\n"))  # not a terminal, even with text waiting
    lra = make_lra(ask_epoch=1, threshold=1.0)
    stops = [lra.on_epoch_end(e, metrics(train_acc=0.1 * e)) for e in range(1, 4)]
    assert stops == [False] * 3
    assert lra.output.count("prompts are off") == 1


def test_f_unfreezes_and_gives_the_layers_to_the_optimizer(monkeypatch):
    asked = scripted_input(monkeypatch, ["F", "h"])
    model = tiny_model(freeze=True)
    lra = make_lra(model, ask_epoch=2, threshold=1.0, patience=1)
    frozen = [p for p in model.body.parameters()]
    assert not any(p.requires_grad for p in frozen)
    lra.on_epoch_end(1, metrics(train_acc=0.5))
    lra.on_epoch_end(2, metrics(train_acc=0.4))  # a cut, then F
    assert "F to fine-tune" in asked[0]
    assert all(p.requires_grad for p in frozen)
    groups = lra.optimizer.param_groups
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == {id(p) for p in frozen}
    body_lr_scale = configs().optim.body_lr_scale  # the unfrozen body trains at BODY_LR_SCALE x LR
    assert groups[1]["lr"] == pytest.approx(body_lr_scale * groups[0]["lr"])
    assert groups[0]["lr"] == pytest.approx(0.05)
    assert lra.lra.bad_epochs == 0 and lra.lra.cuts == 0 and lra.lra.ask_epoch == 4
    model.train()
    assert model.body[1].training  # the BatchNorm layer trains again
    lra.on_epoch_end(3, metrics(train_acc=0.6))
    assert lra.on_epoch_end(4, metrics(train_acc=0.7))  # asked again ask_epoch epochs later
    assert len(asked) == 2


def test_dwell_after_fine_tuning_restores_every_parameter_group(monkeypatch):
    scripted_input(monkeypatch, ["F"])
    model = tiny_model(freeze=True)
    lra = make_lra(model, ask_epoch=1, threshold=0.0, stop_patience=10)
    lra.on_epoch_end(1, metrics(val_loss=1.0))   # best, then F
    train_step(model, lra.optimizer, 5)
    lra.on_epoch_end(2, metrics(val_loss=2.0))   # cut with dwell: must not fail on the new group
    assert len(lra.optimizer.param_groups) == 2
    assert all(g["lr"] / g["lr_scale"] == pytest.approx(0.05) for g in lra.optimizer.param_groups)


def test_a_number_runs_past_the_epoch_limit_in_fit(monkeypatch, tmp_path):
    scripted_input(monkeypatch, ["3"])  # then EOF: no more questions
    data = make_tiny_data()
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    lra = LRA(configs(ASK_EPOCH=2).lra, stream=io.StringIO())
    history = train_module.fit(TrainState(model, optimizer, lra), data,
                               configs(EPOCHS=2, OUTPUT_DIR=str(tmp_path)).fit)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- state


def test_state_round_trip_makes_the_same_decisions():
    sequence = [metrics(train_acc=a, val_loss=v)
                for a, v in [(0.3, 1.0), (0.5, 0.9), (0.4, 0.95), (0.95, 0.8), (0.96, 0.85),
                             (0.97, 0.84), (0.98, 0.9)]]
    straight = make_lra(threshold=0.9, stop_patience=5)
    straight_log = [(straight.on_epoch_end(e, m), lr_of(straight), straight.decision.monitor,
                     straight.lra.cuts) for e, m in enumerate(sequence, start=1)]

    first = make_lra(threshold=0.9, stop_patience=5)
    log = [(first.on_epoch_end(e, m), lr_of(first), first.decision.monitor, first.lra.cuts)
           for e, m in enumerate(sequence[:3], start=1)]
    state = first.lra.state_dict()
    second = make_lra(threshold=0.9, stop_patience=5)
    second.model.load_state_dict(first.model.state_dict())
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    second.state.best.load_state_dict(first.state.best.state_dict(), torch.device("cpu"))
    second.lra.load_state_dict(state)
    log += [(second.on_epoch_end(e, m), lr_of(second), second.decision.monitor, second.lra.cuts)
            for e, m in enumerate(sequence[3:], start=4)]
    assert log == straight_log
    assert second.lra.best_epoch == straight.lra.best_epoch


def test_without_validation_the_last_epoch_is_best_and_training_loss_is_watched_above_threshold():
    h = make_lra(threshold=0.5, patience=1, stop_patience=5)
    # (train_acc, train_loss); no val_loss, no val_acc
    rows = [(0.3, 2.0), (0.6, 1.5), (0.7, 1.6), (0.8, 1.4)]
    decisions = []
    for epoch, (acc, loss) in enumerate(rows, start=1):
        h.on_epoch_end(epoch, {"train_acc": acc, "train_loss": loss})
        decisions.append(h.decision)
    # every epoch the best; dwell has nowhere to go
    assert all(d.new_best and not d.restore for d in decisions)
    assert [d.monitor for d in decisions] == ["train_acc", "train_loss", "train_loss", "train_loss"]
    # loss rose at epoch 3
    assert ["LR cut" in d.event for d in decisions] == [False, False, True, False]
    assert h.lra.best_epoch == 4 and h.lra.best_val_acc is None
    lines = h.output.splitlines()
    # empty V_loss, V_acc
    assert lines[3].split("|")[3].strip() == "" and lines[3].split("|")[4].strip() == ""
    h.lra.on_train_end()
    assert ("No validation images: the model and best_model.pth hold the final "
            "weights, from epoch 4" in h.output)


# ----------------------------------------------------------------------------- MONITOR, warm-up


def scored(train_acc=0.95, macro_f1=0.5, val_loss=1.0):
    return {**metrics(train_acc=train_acc, val_loss=val_loss), "macro_f1": macro_f1,
            "balanced_acc": macro_f1}


def test_a_higher_is_better_monitor_keeps_its_highest_epoch_and_cuts_when_it_falls():
    h = make_lra(monitor="macro_f1", threshold=0.9, patience=1, stop_patience=5, min_delta=0.01)
    # val_loss falls throughout: it would keep epoch 5; macro_f1 peaks at epoch 2
    for epoch, f1 in enumerate([0.50, 0.70, 0.60, 0.705, 0.65], start=1):
        h.on_epoch_end(epoch, scored(macro_f1=f1, val_loss=1.0 - 0.1 * epoch))
        assert h.decision.monitor == "macro_f1"
        assert h.decision.new_best == (epoch in (1, 2))  # 0.705 is within MIN_DELTA of 0.70
        assert ("LR cut" in h.decision.event) == (epoch >= 3)
    assert h.lra.best_epoch == 2 and h.lra.best_score == 0.70
    assert h.lra.best_val_loss == pytest.approx(0.8)  # the best epoch's, not the lowest
    h.lra.on_train_end()
    assert "(by macro_f1), from epoch 2 (macro_f1 0.7000, validation loss 0.8000" in h.output


def test_below_threshold_the_monitor_still_picks_the_best_weights():
    h = make_lra(monitor="balanced_acc", threshold=0.9, stop_patience=5)
    for epoch, score in enumerate([0.4, 0.6, 0.5], start=1):
        h.on_epoch_end(epoch, scored(train_acc=0.5, macro_f1=score))
        assert h.decision.monitor == "train_acc"
    assert h.lra.best_epoch == 2


def test_during_warm_up_lra_neither_counts_nor_cuts_nor_sets_the_lr():
    h = make_lra(warmup_epochs=3, patience=2, stop_patience=1, threshold=1.0)
    for epoch, acc in enumerate([0.5, 0.4, 0.3], start=1):  # three bad epochs: none counts
        assert not h.on_epoch_end(epoch, metrics(train_acc=acc, val_loss=1.0 - 0.1 * epoch))
        assert h.decision.next_lr is None and "cut" not in h.decision.event
        assert h.lra.bad_epochs == 0 and h.lra.cuts == 0
    assert h.decision.new_best and h.lra.best_epoch == 3  # the best weights are still kept
    h.on_epoch_end(4, metrics(train_acc=0.45))  # below epoch 1's 0.5: the first bad epoch counted
    assert h.lra.bad_epochs == 1 and h.decision.next_lr == pytest.approx(0.1)
    assert h.on_epoch_end(5, metrics(train_acc=0.45))  # the second: a cut, and STOP_PATIENCE 1
    waits = [line.split("|")[8].strip() for line in h.output.splitlines()]
    assert waits == ["warm", "warm", "warm", "1/2", "0/2"]


def test_the_table_keeps_its_columns_for_any_value():
    h = make_lra(monitor="balanced_acc", stop_patience=10)
    h.lra.on_train_begin()
    huge = {"train_loss": 123456.78, "train_acc": 1.0, "val_loss": 98765.4321, "val_acc": 1.0,
            "macro_f1": 1.0, "balanced_acc": 1.0, "seconds": 123456.7}
    h.on_epoch_end(1, {**huge, "val_loss": 1e9, "balanced_acc": 0.0})
    h.on_epoch_end(2, huge)  # % Improv: +100.00 and more
    h.on_epoch_end(3, {**huge, "train_loss": 0.1234, "val_loss": float("nan"), "seconds": 0.5})
    lines = h.output.splitlines()
    assert lines[0].split(" | ")[5].strip() == "balanced_acc"  # MONITOR's own column
    bars = {tuple(i for i, c in enumerate(line) if c == "|") for line in lines}
    assert len(bars) == 1 and len(lines) == 4, h.output
    assert "9.9e+04" not in h.output and "98765.4" in h.output  # as many decimals as fit


def test_a_stop_on_train_acc_while_validation_improves_says_so_and_names_threshold():
    h = make_lra(threshold=0.9, patience=1, stop_patience=2)
    # train_acc stalls below THRESHOLD from epoch 2 (augmentation, say); val_loss keeps falling
    rows = [(0.50, 1.0), (0.62, 0.9), (0.60, 0.8), (0.61, 0.7)]
    stops = [h.on_epoch_end(e, metrics(train_acc=a, val_loss=v)) for e, (a, v) in
             enumerate(rows, start=1)]
    assert stops == [False, False, False, True]
    assert all(d in h.output for d in ("* new best", "LR cut"))
    h.lra.on_train_end()
    ending = h.output.splitlines()[-1]
    assert "2 LR cuts in a row with no improvement of train_acc" in ending
    assert "train_acc stayed below THRESHOLD 0.9 (it reached 62.0%" in ending
    assert "while val_loss kept improving (a new best at epoch 4)" in ending
    assert "set --threshold 0.6 or lower" in ending


def test_a_stop_on_train_acc_without_validation_gains_says_nothing_of_threshold():
    h = make_lra(threshold=0.9, patience=1, stop_patience=2)
    for e, (a, v) in enumerate([(0.50, 1.0), (0.62, 0.9), (0.60, 0.95), (0.61, 0.99)], start=1):
        h.on_epoch_end(e, metrics(train_acc=a, val_loss=v))
    assert h.decision.stop and "THRESHOLD" not in h.lra.stop_reason


def test_the_no_terminal_notice_comes_before_the_table_and_once(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    h = make_lra(ask_epoch=1, threshold=1.0)
    h.lra.on_train_begin()
    for epoch in range(1, 4):
        h.on_epoch_end(epoch, metrics(train_acc=0.1 * epoch))
    lines = h.output.splitlines()
    assert lines[0] == callback_module.NO_TERMINAL and lines[1].startswith("Epoch")
    assert h.output.count("prompts are off") == 1 and len(lines) == 5


def test_a_state_saved_before_monitor_existed_resumes_chosen_by_val_loss():
    first = make_lra(threshold=0.9, stop_patience=5)
    first.on_epoch_end(1, metrics(train_acc=0.95, val_loss=0.8))
    old = {k: v for k, v in first.lra.state_dict().items()
           if k not in ("best_score", "improved_epoch")}
    second = make_lra(threshold=0.9, stop_patience=5, dwell=False)  # no snapshot to go back to
    second.lra.load_state_dict(old)
    assert second.lra.best_score == 0.8
    second.on_epoch_end(2, metrics(train_acc=0.95, val_loss=0.85))
    assert not second.decision.new_best and "LR cut" in second.decision.event


def imbalanced_data(seed=1):
    """3 classes of 8x8 images, 90:12:12 for training and 60:12:12 for validation, told apart by
    their brightness through heavy noise."""
    def split(counts, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        noise = torch.randint(0, 160, (len(labels), 8, 8, 3), generator=g)
        return (labels.view(-1, 1, 1, 1) * 35 + noise).clamp(0, 255).to(torch.uint8), labels
    (train_images, train_labels), (val_images, val_labels) = split((90, 12, 12), seed), split(
        (60, 12, 12), seed + 1)
    mean, std = source_module.channel_stats(train_images)
    train = loader_module.ResidentLoader(train_images, train_labels, loader_module.Batching(
        32, train=True, seed=seed), augmentation(mean, std, CROP_PADDING=1))
    val = loader_module.ResidentLoader(val_images, val_labels, loader_module.Batching(
        64, train=False, seed=seed), augmentation(mean, std))
    return data_module.Data(train, val, val, ["a", "b", "c"], mean, std, 8, True, test_is_val=True)


def test_on_imbalanced_classes_macro_f1_keeps_a_better_balanced_epoch_than_val_loss(
        tmp_path, one_thread):
    runs = {}
    for monitor in ("val_loss", "macro_f1"):  # no cut, so no DWELL: the same training
        config = configs(MONITOR=monitor, PATIENCE=50, EPOCHS=7, ASK_EPOCH=None,
                         OUTPUT_DIR=str(tmp_path / monitor))
        os.makedirs(config.fit.output_dir)
        torch.manual_seed(1)
        model = model_module.get_model("cnn", 3)
        state = TrainState(model, optim_module.make_optimizer(model, config.optim),
                           LRA(config.lra, stream=io.StringIO()))
        history = train_module.fit(state, imbalanced_data(), config.fit)
        best = json.loads((tmp_path / monitor / "best_model.json").read_text())
        runs[monitor] = history, best
    (history, by_loss), (_, by_f1) = runs["val_loss"], runs["macro_f1"]
    assert [row["val_loss"] for row in history] == [row["val_loss"] for row in runs["macro_f1"][0]]
    assert by_loss["epoch"] == min(history, key=lambda row: row["val_loss"])["epoch"]
    assert by_f1["epoch"] == max(history, key=lambda row: row["macro_f1"])["epoch"]
    assert by_f1["epoch"] != by_loss["epoch"]
    assert by_f1["score"] == history[by_f1["epoch"] - 1]["macro_f1"]
    loss_row, f1_row = history[by_loss["epoch"] - 1], history[by_f1["epoch"] - 1]
    assert f1_row["macro_f1"] > loss_row["macro_f1"] + 0.1
    assert f1_row["balanced_acc"] > loss_row["balanced_acc"] + 0.1
