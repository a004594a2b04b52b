"""step_module: the precision choice and the bf16 trial, what a captured (CUDA-graph) step needs,
gradient accumulation (under torchrun too) and clipping."""

import copy
import functools

import pytest
import torch
from torch import nn

import model_module
import optim_module
import state_module
import step_module
import train_module
from conftest import assert_same_state, configs, random_batch, state_of


def test_a_resumed_run_keeps_its_precision_where_it_still_runs_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(step_module, "bf16_speedup_on_cpu", lambda *a, **k: pytest.fail(
        "no trial on resume"))
    choose = functools.partial(step_module.choose_precision, model=None, image_size=32,
                               channels_last=True, trial=False)
    assert choose(True, cuda, recorded="fp32") == "fp32" and choose(True, cuda,
        recorded="bf16") == "bf16"
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
    # BatchNorm statistics too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert step_module.bf16_speedup_on_cpu(model, 16) is None  # no native bf16: no trial, fp32


def test_a_zero_momentum_buffer_steps_exactly_as_none_does():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    sgd = configs(LR=0.1).optim
    plain, primed = optim_module.make_optimizer(model, sgd), optim_module.make_optimizer(twin, sgd)
    step_module.init_momentum(primed)
    assert len(primed.state) == len(list(twin.parameters())) and not plain.state
    for m, o in ((model, plain), (twin, primed)):
        torch.manual_seed(1)  # the same dropout
        step_module.TrainStep(m, o, nn.CrossEntropyLoss())(*random_batch())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_warm_up_steps_leave_the_model_the_optimizer_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim,
                                            lr_device=torch.device("cpu"))
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
    # put back in place: a graph would still hold
    assert step_module.graph_key(model, optimizer) == key


def test_the_graph_key_changes_exactly_when_a_captured_step_would_go_stale():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim,
                                            lr_device=torch.device("cpu"))
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
        optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim, lr_device=cpu)
        step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss(), graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA device")
def test_a_captured_step_trains_as_the_eager_step_through_lr_changes_restores_and_a_short_batch():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = model_module.get_model("cnn", 4).to(device, memory_format=torch.channels_last)
    model.head[0].p = 0.0  # no dropout: the two must draw nothing at random
    twin = copy.deepcopy(model)
    optimizers = [optim_module.make_optimizer(m, configs(LR=0.1).optim,
                                              lr_device=device) for m in (model, twin)]
    steps = [step_module.TrainStep(m, o, nn.CrossEntropyLoss(), graph=graph)
             for m, o, graph in ((model, optimizers[0], False), (twin, optimizers[1], True))]
    bests, graphs = [state_module.Snapshot(), state_module.Snapshot()], []
    for epoch in range(3):
        for step in steps:
            step.new_epoch()
        for i, (images, targets) in enumerate([random_batch(seed=epoch * 10 + s) for s in range(4)]
                                              + [random_batch(n=5)]):
            for o, step in zip(optimizers, steps):
                optim_module.set_lr(o, 0.1 / (1 + i + epoch))
                step(images.to(device), targets.to(device))
        graphs.append(steps[1].graph)
        assert steps[1].use_graph and steps[1].graph is not None
        # before the restore
        for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), f"epoch {epoch}"
        for m, o, best in zip((model, twin), optimizers, bests):
            if epoch == 0:
                best.take(m, o)
            else:
                best.restore(m, o)  # new optimizer state: the next epoch captures again
    # kept through epoch 1, captured after a restore
    assert graphs[0] is graphs[1] and graphs[2] is not graphs[1]


def test_a_captured_step_that_trains_otherwise_than_the_eager_one_is_dropped_with_a_note(
        stand_in_cuda, capsys):
    captured, broken = stand_in_cuda
    broken.append(True)  # its replays leave out the optimizer step
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    steps = [step_module.TrainStep(m, optim_module.make_optimizer(m, configs(LR=0.1).optim,
                                                                  lr_device=torch.device("cpu")),
                                   nn.CrossEntropyLoss(), graph=graph)
             for m, graph in ((model, True), (twin, False))]
    for seed in range(2):
        for step in steps:
            torch.manual_seed(seed)  # the same dropout
            step(*random_batch(seed=seed))
    assert not steps[0].use_graph and not captured
    assert (
        "could not be captured in a CUDA graph (a replay of the captured step gave"
        in capsys.readouterr().err
    )
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 twin.state_dict().values()))


# ------------------------------------------------------------------------ accumulation and clipping


def mlp():
    """A model without BatchNorm or dropout: a micro-batch trains it as its share of a larger batch
    would."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("micro_batches, groups", [(8, [4, 4]), (6, [4, 2])],
                         ids=["whole groups", "a last smaller group"])
def test_accumulating_micro_batches_updates_as_one_step_on_each_group_joined(
        micro_batches, groups, one_thread):
    batches = [random_batch(seed=seed) for seed in range(micro_batches)]
    joined, start = [], 0
    for size in groups:  # the reference: one batch of each group's micro-batches together
        joined.append(tuple(torch.cat(parts) for parts in zip(*batches[start:start + size])))
        start += size
    trained = []
    for loader, accumulate in ((batches, 4), (joined, 1)):
        model = mlp()
        optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim)  # Nesterov, decay
        schedule = optim_module.make_schedule(optimizer, "onecycle", 0.1, total_steps=len(groups))
        ema = optim_module.EMA(model, 0.9)
        step = step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss(), accumulate=accumulate)
        metrics = train_module.train_one_epoch(step, loader, schedule=schedule, ema=ema)
        assert schedule.step == ema.updates == len(groups) == step_module.optimizer_steps(len(
            loader), accumulate)
        trained.append((model, ema, metrics))
    (model, ema, metrics), (reference, reference_ema, reference_metrics) = trained
    # The two sum each step's 32 per-image gradients (and losses) in other groupings: float32 gives
    # a sum of 32 terms up to 32 roundings of eps, so its relative error is 32 eps at most, and each
    # of the len(groups) updates may round a weight's last bit the other way too (eps |w|). An EMA
    # weight is an average of the weights: its error is no larger.
    eps, steps = torch.finfo(torch.float32).eps, len(groups)
    for ours, theirs in ((model, reference), (ema.module, reference_ema.module)):
        for a, b, start in zip(ours.parameters(), theirs.parameters(), mlp().parameters()):
            bound = steps * eps * (b.abs().max() + 32 * (b - start).abs().max())
            assert (a - b).abs().max() <= bound
    loss = reference_metrics["train_loss"]
    assert metrics["train_loss"] == pytest.approx(loss, rel=steps * 32 * eps)


def test_micro_batches_fall_into_groups_of_accumulate_and_the_last_holds_what_is_left():
    assert [step_module.micro_batch(b, 6, 4) for b in range(1, 7)] == [(0, 4), (1, 4), (2, 4),
                                                                       (3, 4), (0, 2), (1, 2)]
    assert [step_module.micro_batch(b, 3, 1) for b in range(1, 4)] == [(0, 1)] * 3
    assert [step_module.optimizer_steps(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("ratio", [0.25, 4.0])
def test_clipping_scales_the_gradients_down_to_the_max_norm_and_leaves_smaller_ones_alone(
        ratio, one_thread):
    model, images_targets = mlp(), random_batch()
    reference = copy.deepcopy(model)
    nn.CrossEntropyLoss()(reference(images_targets[0]), images_targets[1]).backward()
    gradients = [p.grad for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])).item()
    max_norm, lr = ratio * norm, 0.1
    step = step_module.TrainStep(model, torch.optim.SGD(model.parameters(), lr=lr),
                                 nn.CrossEntropyLoss(), clip_grad_norm=max_norm)
    step(*images_targets)
    scale = min(1.0, max_norm / norm)  # SGD on the gradients scaled to the max norm, or as they are
    for trained, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        assert torch.allclose(trained, before - lr * scale * gradient, rtol=1e-5, atol=1e-7)


def test_only_the_last_micro_batch_of_a_group_all_reduces_the_gradients_under_torchrun(
        tmp_path, one_thread):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", world_size=1, rank=0)
    try:
        model = nn.parallel.DistributedDataParallel(mlp())
        reductions = []

        # DistributedDataParallel's all-reduce of a bucket of gradients, counted
        def count(state, bucket):
            reductions.append(len(bucket.gradients()))
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done
        model.register_comm_hook(None, count)
        step = step_module.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                     nn.CrossEntropyLoss(), accumulate=3)
        for batch in range(1, 4):
            index, group = step_module.micro_batch(batch, 3, 3)
            step(*random_batch(seed=batch), index=index, group=group)
            # every parameter's gradient, once, at the last
            assert sum(reductions) == (4 if batch == 3 else 0)
    finally:
        dist.destroy_process_group()


def test_accumulation_turns_cuda_graphs_off_with_a_note_and_a_yes_is_refused_naming_both(capsys):
    cuda = torch.device("cuda", 0)
    assert not step_module.use_cuda_graph("auto", cuda, accumulate_steps=4)
    assert "not replayed from a CUDA graph with ACCUMULATE_STEPS = 4" in capsys.readouterr().err
    assert not step_module.use_cuda_graph("auto", torch.device("cpu"), accumulate_steps=4)
    assert capsys.readouterr().err == ""  # no graph to turn off: nothing to say
    with pytest.raises(ValueError, match="CUDA_GRAPHS='yes' needs ACCUMULATE_STEPS = 1, not 4"):
        step_module.use_cuda_graph("yes", cuda, accumulate_steps=4)
    model = mlp()
    with pytest.raises(ValueError, match="accumulates no micro-batches"):
        step_module.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              nn.CrossEntropyLoss(), graph=True, accumulate=2)


def test_a_clipped_step_captures_once_and_the_ema_follows_its_replays(stand_in_cuda, one_thread):
    """Bookkeeping only (the stand-in replays eagerly): one capture, and the EMA updated after each
    replay as after each eager step, bit for bit (the same fused SGD and clipping)."""
    captured, _ = stand_in_cuda
    batches = [random_batch(seed=seed) for seed in range(4)]
    trained = []
    for graph in (True, False):
        model = mlp()
        optimizer = optim_module.make_optimizer(model, configs(LR=0.5).optim,
                                                lr_device=torch.device("cpu"))
        ema = optim_module.EMA(model, 0.9)
        step = step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss(), graph=graph,
                                     clip_grad_norm=0.1)
        train_module.train_one_epoch(step, batches, ema=ema)
        trained.append((model, ema))
    # the graphed run's steps were replays of one capture (the stand-in's)
    assert len(captured) == 1
    (model, ema), (eager, eager_ema) = trained
    for a, b in zip([*model.parameters(), *ema.module.parameters()],
                    [*eager.parameters(), *eager_ema.module.parameters()]):
        assert torch.equal(a, b)
