"""step_module: the precision choice and the bf16 trial, and what a captured (CUDA-graph) step needs."""

import copy
import functools

import pytest
import torch
from torch import nn

import model_module
import optim_module
import state_module
import step_module
from conftest import assert_same_state, random_batch, state_of
from optim_module import OptimConfig


def test_a_resumed_run_keeps_its_precision_where_it_still_runs_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(step_module, "bf16_speedup_on_cpu", lambda *a, **k: pytest.fail("no trial on resume"))
    choose = functools.partial(step_module.choose_precision, model=None, image_size=32, channels_last=True,
                               trial=False)
    assert choose(True, cuda, recorded="fp32") == "fp32" and choose(True, cuda, recorded="bf16") == "bf16"
    assert choose(False, cuda, recorded="bf16") == "fp32"  # BF16 turned off: off
    assert choose(True, cuda) == "bf16" and choose(True, cpu) == "fp32"  # a new run without a trial
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert choose(True, cpu, recorded="bf16") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert choose(True, cpu, recorded="bf16") == "fp32"  # from a GPU to a CPU without native bf16


def test_the_bf16_trial_leaves_the_model_and_the_random_state_as_they_were(monkeypatch):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 10)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    speedup = step_module.bf16_speedup_on_cpu(model, 16, steps=1)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert isinstance(speedup, float) and speedup > 0
    else:
        assert speedup is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert step_module.bf16_speedup_on_cpu(model, 16) is None  # no native bf16: no trial, fp32


def test_a_zero_momentum_buffer_steps_exactly_as_none_does():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    plain, primed = optim_module.make_optimizer(model, OptimConfig(lr=0.1)), optim_module.make_optimizer(twin, OptimConfig(lr=0.1))
    step_module.init_momentum(primed)
    assert len(primed.state) == len(list(twin.parameters())) and not plain.state
    for m, o in ((model, plain), (twin, primed)):
        torch.manual_seed(1)  # the same dropout
        step_module.TrainStep(m, o, nn.CrossEntropyLoss())(*random_batch())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_warm_up_steps_leave_the_model_the_optimizer_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, OptimConfig(lr=0.1), lr_device=torch.device("cpu"))
    step = step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss())
    step(*random_batch())
    before, key = state_of(model, optimizer), step_module.graph_key(model, optimizer)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with step_module.rolled_back(model, optimizer):
        for seed in range(3):
            step(*random_batch(seed=seed))
            torch.rand(5)
    assert_same_state(model, optimizer, before)
    assert torch.equal(torch.rand(3), expected)
    assert step_module.graph_key(model, optimizer) == key  # put back in place: a graph would still hold


def test_the_graph_key_changes_exactly_when_a_captured_step_would_go_stale():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = optim_module.make_optimizer(model, OptimConfig(lr=0.1), lr_device=torch.device("cpu"))
    step_module.init_momentum(optimizer)
    step = step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss())
    key = step_module.graph_key(model, optimizer)
    best = state_module.Snapshot()
    best.take(model, optimizer)
    step(*random_batch())
    optim_module.set_lr(optimizer, 0.01)
    best.restore(model)  # the weights are copied in
    assert step_module.graph_key(model, optimizer) == key
    best.restore(model, optimizer)  # new momentum buffers and LR tensors
    assert step_module.graph_key(model, optimizer) != key
    key = step_module.graph_key(model, optimizer)
    model_module.unfreeze_body(model)  # more parameters train
    assert step_module.graph_key(model, optimizer) != key


def test_cuda_graphs_are_used_where_they_can_be_and_a_yes_that_cannot_be_is_refused():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert step_module.use_cuda_graph("auto", cuda)
    assert not step_module.use_cuda_graph("auto", cpu)
    assert not step_module.use_cuda_graph("auto", cuda, world_size=2)
    assert not step_module.use_cuda_graph("no", cuda)
    with pytest.raises(ValueError, match="needs a CUDA device, one process"):
        step_module.use_cuda_graph("yes", cpu, world_size=2)
    with pytest.raises(ValueError, match="a CUDA graph needs a CUDA device"):
        model = model_module.get_model("cnn", 4)
        step_module.TrainStep(model, optim_module.make_optimizer(model, OptimConfig(lr=0.1), lr_device=cpu), nn.CrossEntropyLoss(),
                               graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA device")
def test_a_captured_step_trains_as_the_eager_step_does_through_lr_changes_restores_and_a_short_batch():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = model_module.get_model("cnn", 4).to(device, memory_format=torch.channels_last)
    model.head[0].p = 0.0  # no dropout: the two must draw nothing at random
    twin = copy.deepcopy(model)
    optimizers = [optim_module.make_optimizer(m, OptimConfig(lr=0.1), lr_device=device) for m in (model, twin)]
    steps = [step_module.TrainStep(m, o, nn.CrossEntropyLoss(), graph=graph)
             for m, o, graph in ((model, optimizers[0], False), (twin, optimizers[1], True))]
    bests, graphs = [state_module.Snapshot(), state_module.Snapshot()], []
    for epoch in range(3):
        for step in steps:
            step.new_epoch()
        for i, (images, targets) in enumerate([random_batch(seed=epoch * 10 + s) for s in range(4)] + [random_batch(n=5)]):
            for o, step in zip(optimizers, steps):
                optim_module.set_lr(o, 0.1 / (1 + i + epoch))
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


def test_a_captured_step_that_trains_otherwise_than_the_eager_one_is_dropped_with_a_note(stand_in_cuda, capsys):
    captured, broken = stand_in_cuda
    broken.append(True)  # its replays leave out the optimizer step
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    steps = [step_module.TrainStep(m, optim_module.make_optimizer(m, OptimConfig(lr=0.1), lr_device=torch.device("cpu")),
                                    nn.CrossEntropyLoss(), graph=graph) for m, graph in ((model, True), (twin, False))]
    for seed in range(2):
        for step in steps:
            torch.manual_seed(seed)  # the same dropout
            step(*random_batch(seed=seed))
    assert not steps[0].use_graph and not captured
    assert "could not be captured in a CUDA graph (a replay of the captured step gave" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
