"""optim_module: SGD's groups and LR scales, the one-cycle schedule, Lookahead, the LR held as a
tensor, the LR finder."""

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import augment_module
import loader_module
import model_module
import optim_module
import step_module
import train_module
from conftest import assert_same_state, configs, make_tiny_data, random_batch, state_of
from optim_module import RangeTest


def test_onecycle_rises_then_falls_and_holds_past_its_end():
    model = nn.Linear(2, 2)
    optimizer = optim_module.make_optimizer(model, configs(LR=1.0).optim)
    schedule = optim_module.make_schedule(optimizer, "onecycle", 1.0, total_steps=100)
    lrs = []
    for _ in range(120):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.advance(optimizer)
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0, abs=0.01)
    assert lrs[99] == pytest.approx(0.07, abs=0.01) and lrs[119] == lrs[99]
    assert optim_module.make_schedule(optimizer, "lra", 1.0, 100) is None


def test_a_warm_up_rises_linearly_then_leaves_the_lr_to_lra_or_to_the_schedule():
    model = nn.Linear(2, 2)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.4).optim)
    schedule = optim_module.make_schedule(optimizer, "lra", 0.4, 100, warmup_steps=4)
    lrs = []
    for step in range(7):
        lrs.append(optim_module.get_lr(optimizer))
        schedule.advance(optimizer)
        if step == 4:
            optim_module.set_lr(optimizer, 0.2)  # an LRA cut: the warm-up is over and keeps it
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.2, 0.2])
    cosine = optim_module.cosine(0.4, 100)
    schedule = optim_module.make_schedule(optimizer, "cosine", 0.4, 100, warmup_steps=4)
    for step in range(6):
        scale = min(1, (step + 1) / 4)
        assert optim_module.get_lr(optimizer) == pytest.approx(cosine(step) * scale)
        schedule.advance(optimizer)


def test_onecycle_matches_torchs_one_cycle_lr():
    """The schedule is airbench's shape in OneCycleLR's terms, step for step."""
    model = nn.Linear(2, 2)
    ours = optim_module.make_optimizer(model, configs(LR=1.5).optim)
    schedule = optim_module.make_schedule(ours, "onecycle", 1.5, total_steps=50)
    theirs = torch.optim.SGD(model.parameters(), lr=1.5)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        theirs, max_lr=1.5, total_steps=50, pct_start=0.23, anneal_strategy="linear",
        cycle_momentum=False, div_factor=5.0, final_div_factor=0.2 / 0.07)
    for _ in range(49):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9)
        theirs.step()
        reference.step()
        schedule.advance(ours)


def test_cosine_is_torchs_cosine_annealing_lr_over_the_run_and_then_holds_0():
    model = nn.Linear(2, 2)
    ours = optim_module.make_optimizer(model, configs(LR=1.5, SCHEDULE="cosine").optim)
    schedule = optim_module.make_schedule(ours, "cosine", 1.5, total_steps=50)
    theirs = torch.optim.SGD(model.parameters(), lr=1.5)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=50)
    # theirs is recursive: each step multiplies the last LR by a ratio of cosines, so 50 steps
    # accumulate about 50 x 3 float64 roundings (eps 2.2e-16): 1e-12 x the peak covers them
    for step in range(56):
        expected = theirs.param_groups[0]["lr"] if step <= 50 else 0.0  # theirs would rise again
        assert optim_module.get_lr(ours) == pytest.approx(expected, abs=1.5e-12)
        theirs.step()
        reference.step()
        schedule.advance(ours)
    assert optim_module.get_lr(ours) == 0.0 and not configs(SCHEDULE="cosine").lra.adjust_lr


def test_onecycle_schedules_the_body_after_unfreezing():
    """The body's group is in the optimizer from the start, so the schedule sets its LR once it
    trains."""
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = optim_module.make_optimizer(model, configs(LR=1.0).optim)
    schedule = optim_module.make_schedule(optimizer, "onecycle", 1.0, total_steps=10)
    schedule.advance(optimizer)
    model_module.unfreeze_body(model)
    schedule.advance(optimizer)
    groups = optimizer.param_groups  # the body's at BODY_LR_SCALE x the schedule's LR
    lrs = [group["lr"] / group["lr_scale"] for group in groups]
    assert lrs == pytest.approx([schedule.lr_at(2)] * len(groups))


def test_norm_parameters_get_a_scaled_lr_and_the_same_decay_per_step():
    model = model_module.get_model("cnn", 10)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1, WEIGHT_DECAY=1e-3,
                                                           NORM_LR_SCALE=64).optim)
    main, norms = optimizer.param_groups
    assert norms["lr"] == pytest.approx(6.4) and norms["lr"] * norms[
        "weight_decay"] == pytest.approx(1e-4)
    assert main["lr"] * main["weight_decay"] == pytest.approx(1e-4)
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              for p in m.parameters()}
    assert {id(p) for p in norms["params"]} == bn_ids


def test_lookahead_ends_on_the_slow_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    lookahead = optim_module.Lookahead(model, total_steps=7, every=5)
    for _ in range(7):
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        lookahead.update()
    for key, value in model.state_dict().items():
        assert torch.equal(value, lookahead.slow[key])


def test_the_lr_finder_puts_everything_back_and_suggests_an_lr_in_its_range(one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(size=8, batch_size=16)  # 4 batches: the finder cycles through them
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05).optim)
    # momentum
    train_module.train_one_epoch(step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss()),
                                 data.train)
    model.eval()
    before = state_of(model, optimizer)
    rng = torch.get_rng_state()
    lrs, losses, suggestion = optim_module.find_lr(
        model, data.train, optimizer, nn.CrossEntropyLoss(),
        sweep=RangeTest(start_lr=1e-4, end_lr=10, steps=60))
    assert_same_state(model, optimizer, before)
    assert not model.training and optim_module.get_lr(optimizer) == 0.05
    # a run with the finder draws what one without would
    assert torch.equal(torch.get_rng_state(), rng)
    assert lrs[0] == pytest.approx(1e-4) and all(a < b for a, b in zip(lrs, lrs[1:]))
    # exponential steps, 10 reached at 60
    assert lrs[1] / lrs[0] == pytest.approx((10 / 1e-4) ** (1 / 59))
    assert suggestion == optim_module.suggest_lr(lrs, losses) and lrs[0] <= suggestion <= lrs[-1]
    # this net diverges before LR 10: the test stops once the smoothed loss passes 4x its lowest
    assert len(lrs) < 60 and losses[-1] > 4 * min(losses) and all(
        x <= 4 * min(losses[:i + 1]) for i, x in enumerate(losses[:-1]))
    # the first smoothed loss is the first batch's own (the bias correction), at the untouched
    # weights
    images, targets = next(iter(data.train))
    first = nn.functional.cross_entropy(model.train()(images), targets).item()
    assert losses[0] == pytest.approx(first, rel=1e-6)


def test_the_lr_finder_trains_only_the_head_of_a_frozen_model(one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(size=8)
    model = model_module.get_model("cnn", 4, freeze=True)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05, BODY_LR_SCALE=0.1).optim)
    before = state_of(model, optimizer)
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    heads = []

    def loss_fn(logits, targets):  # called at every step: the body is as it was, the head moves
        for key, value in model.body.state_dict().items():
            assert torch.equal(value, body[key]), key
        heads.append(model.head[1].weight.detach().clone())
        return nn.functional.cross_entropy(logits, targets)

    lrs, losses, suggestion = optim_module.find_lr(model, data.train, optimizer, loss_fn,
                                                   sweep=RangeTest(steps=20, end_lr=1))
    assert len(lrs) > 5 and not torch.equal(heads[0], heads[-1])
    assert suggestion == optim_module.suggest_lr(lrs, losses)  # None: a random body's flat curve
    assert_same_state(model, optimizer, before)


def test_the_lr_finder_runs_on_mixed_batches_with_fits_weighted_loss(one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(size=8)
    mix = augment_module.batch_mixer(dict(mixup=0.2, cutmix=1.0), num_classes=4)
    mixed = loader_module.MixedLoader(data.train, mix)
    model = model_module.get_model("cnn", 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05).optim)
    before, rng = state_of(model, optimizer), torch.get_rng_state()
    loss_fn = train_module.training_loss(replace(configs(EPOCHS=1, LABEL_SMOOTHING=0.1).fit,
                                                 class_weights=(1.0, 2.0, 1.0, 0.5)))
    lrs, losses, suggestion = optim_module.find_lr(model, mixed, optimizer, loss_fn,
                                                   sweep=RangeTest(steps=20, end_lr=1))
    assert len(lrs) > 5 and all(math.isfinite(x) for x in losses) and lrs[0] <= suggestion <= lrs[
        -1]
    assert_same_state(model, optimizer, before)
    assert torch.equal(torch.get_rng_state(), rng)  # the mixing's draws too are put back


def test_the_valley_is_the_middle_of_the_longest_fall():
    lrs = [10.0 ** (i / 10) for i in range(40)]
    losses = [3.0] * 10 + [3.0 - 0.1 * i for i in range(20)] + [1.5 + 0.5 * i for i in range(10)]
    # trimmed to points 4..34; the longest fall runs from the plateau's last point, 10, to point 29
    assert optim_module.valley(lrs, losses) == lrs[(10 + 29) // 2]


def range_curve() -> tuple[list[float], list[float]]:
    """100 LRs from 1e-7 to 10: flat to point 29, a fall of 0.02 a point to its lowest at 80 but
    for one drop of 0.3 from 55 to 56, then a rise of 0.1 a point."""
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    losses = [2.3 - 0.02 * min(max(i - 29, 0), 51) - 0.3 * (i > 55) + 0.1 * max(i - 80, 0)
              for i in range(100)]
    return lrs, losses


def test_each_rule_reads_its_own_point_off_the_curve():
    lrs, losses = range_curve()
    assert optim_module.minimum(lrs, losses) == lrs[80] / 10
    assert optim_module.steepest(lrs, losses) == lrs[55]
    # the longest fall runs from the plateau's last point, 29, to the lowest, 80
    assert optim_module.valley(lrs, losses) == lrs[54]
    rules = {name: rule(lrs, losses) for name, (rule, _) in optim_module.LR_RULES.items()}
    # midway on the log scale: 10 ** the mean of the exponents (-7 + 8 i / 99), minimum's less 1
    assert rules["valley_minimum"] == pytest.approx(10 ** ((-14 + 8 * 134 / 99 - 1) / 2))
    assert rules["lower"] == lrs[54] and rules["higher"] == lrs[80] / 10


def test_the_chosen_rule_suggests_its_lr_on_a_clear_curve():
    lrs, losses = range_curve()
    assert optim_module.unclear(lrs, losses) is None
    rule = optim_module.LR_RULES[optim_module.LR_RULE][0]
    assert optim_module.suggest_lr(lrs, losses) == rule(lrs, losses)


def test_a_flat_noisy_curve_gives_no_suggestion():
    torch.manual_seed(0)
    lrs, _ = range_curve()
    losses = (2.3 + 0.03 * torch.randn(100)).tolist()  # noise, up to 4% below the start
    assert "never fell clearly" in optim_module.unclear(lrs, losses)
    assert optim_module.suggest_lr(lrs, losses) is None


def test_a_curve_still_falling_at_the_sweeps_end_gives_no_suggestion():
    lrs, losses = range_curve()
    falling = [2.3 - 0.01 * i for i in range(100)]
    assert "never diverged" in optim_module.unclear(lrs, falling)
    assert optim_module.suggest_lr(lrs, falling) is None
    # a non-finite loss just after the lowest point is a divergence: the curve is clear
    assert optim_module.unclear(lrs, [*falling[:-1], math.inf]) is None


def test_an_lr_held_as_a_tensor_trains_as_a_number_does_and_is_saved_as_one():
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    twin = copy.deepcopy(model)
    number = optim_module.make_optimizer(model, configs(LR=0.1, NORM_LR_SCALE=4.0).optim)
    held = optim_module.make_optimizer(twin, configs(LR=0.1, NORM_LR_SCALE=4.0).optim,
                                       lr_device=torch.device("cpu"))
    tensors = [group["lr"] for group in held.param_groups]
    assert all(isinstance(t, torch.Tensor) for t in tensors) and len(tensors) == 2
    steps = [step_module.TrainStep(m, o, nn.CrossEntropyLoss())
             for m, o in ((model, number), (twin, held))]
    for lr in (0.1, 0.02, 0.3):
        for optimizer, step in zip((number, held), steps):
            optim_module.set_lr(optimizer, lr)
            torch.manual_seed(1)  # the same dropout
            step(*random_batch(seed=int(lr * 100)))
        # filled in place
        assert all(group["lr"] is t for group, t in zip(held.param_groups, tensors))
        assert [float(g["lr"]) for g in held.param_groups] == pytest.approx(
            [g["lr"] for g in number.param_groups])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), "the fused step with tensor LRs trained differently"
    saved = held.state_dict()
    # any optimizer loads it
    assert all(type(group["lr"]) is float for group in saved["param_groups"])
    number.load_state_dict(copy.deepcopy(saved))
    assert all(type(group["lr"]) is float and not group["fused"] for group in number.param_groups)
    held.load_state_dict(copy.deepcopy(number.state_dict()))
    assert all(isinstance(group["lr"], torch.Tensor) and group["fused"]
               for group in held.param_groups)
    assert optim_module.get_lr(held) == pytest.approx(0.3)


# --------------------------------------------------------------------------- the EMA of the weights


def test_the_ema_of_constant_weights_is_those_weights(one_thread):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)  # BatchNorm: its statistics are averaged too
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.add_(3)  # not the initial values a fresh copy would share by chance
    ema = optim_module.EMA(model, decay=0.999)
    for _ in range(25):  # the warm-up's decays (0.1 rising) and all
        ema.update()
    assert ema.updates == 25
    for key, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value), key


def test_the_ema_after_k_updates_is_the_closed_form_for_a_scalar_parameter():
    """With decays d_t = min(D, (1 + t) / (10 + t)) and weights w_1..w_k after the steps, the
    average is w_0 d_0 ... d_(k-1) + the sum over t of (1 - d_t) w_(t+1) d_(t+1) ... d_(k-1)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    decay, k = 0.5, 20  # the warm-up's decay passes 0.5 at t = 8: both regimes
    ema = optim_module.EMA(model, decay)
    weights = [2.0] + [math.sin(t) + t / 4 for t in range(1, k + 1)]
    for w in weights[1:]:
        model.w.data.fill_(w)
        ema.update()
    decays = [min(decay, (1 + t) / (10 + t)) for t in range(k)]
    expected = weights[0] * math.prod(decays) + sum(
        (1 - decays[t]) * weights[t + 1] * math.prod(decays[t + 1:]) for t in range(k))
    assert ema.module.w.item() == pytest.approx(expected, rel=1e-12)
    assert decays[0] == pytest.approx(0.1) and decays[-1] == decay and ema.decay_at(10**6) == decay


def test_the_ema_copies_whole_number_buffers_and_leaves_the_model_alone(one_thread):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    ema = optim_module.EMA(model, decay=0.9)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16))  # BatchNorm counts batches and moves its statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update()
    averaged = ema.module.state_dict()
    counts = [k for k in averaged if k.endswith("num_batches_tracked")]
    assert counts and all(averaged[k].item() == 3 for k in counts)
    # the first decay, 0.1: 0.9 of the way there
    mean = next(k for k in averaged if k.endswith("running_mean"))
    assert torch.allclose(averaged[mean], 0.9 * before[mean], atol=1e-7)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in ema.module.parameters())
