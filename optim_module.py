"""The optimizer and what sets its LR: SGD with per-group LR scales, the fixed schedules
(SCHEDULES), airbench's Lookahead, the weights' moving average (EMA), the LR range test."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import messages_module
import model_module
import utils
from step_module import autocast


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SGD and its LR schedule: each field but nesterov is main.py's constant, upper-cased."""

    lr: float
    momentum: float
    weight_decay: float
    norm_lr_scale: float
    body_lr_scale: float
    schedule: str  # a name in SCHEDULES
    lookahead: bool
    ema_decay: float | None
    warmup_epochs: int
    nesterov: bool = True  # no constant: Nesterov momentum is the recipe's (tests turn it off)

    def __post_init__(self) -> None:
        messages_module.check_fields(self, RULES, {"schedule": SCHEDULES})


RULES: messages_module.Rules = {
    "lr": (lambda v: v > 0, "a number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "norm_lr_scale": (lambda v: v > 0, "a number > 0"),
    "body_lr_scale": (lambda v: v > 0, "a number > 0"),
    "ema_decay": (lambda v: v is None or 0 < v < 1,
                  "a number strictly between 0 and 1 (0.999, say), or None"),
    "warmup_epochs": (lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0"),
}


# --------------------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: nn.Module, config: OptimConfig,
                   lr_device: torch.device | None = None) -> torch.optim.SGD:
    """SGD over every parameter meant to train, the frozen body too (it has no gradients, so SGD
    skips it until unfrozen; the groups never change, so no schedule or saved state must follow a
    new one). A group's LR is LR x its lr_scale: norm_lr_scale for BatchNorm parameters (their
    weight decay divided by it, so their decay per step is the others'), body_lr_scale for the
    frozen body. lr_device: LRs held as tensors there, so a step captured in a CUDA graph sees each
    new LR (hold_lr_as_tensor)."""
    c = config
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    frozen = ({id(p) for p in model_module.frozen_parameters(model)}
              if isinstance(model, model_module.Classifier) else set())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad or id(p) in frozen:
            groups.setdefault((id(p) in norms and c.norm_lr_scale != 1.0, id(p) in frozen),
                              []).append(p)
    param_groups = [{"params": params, "lr_scale": (c.norm_lr_scale if norm else 1.0)
                     * (c.body_lr_scale if body else 1.0),
                     "weight_decay": c.weight_decay / c.norm_lr_scale if norm else c.weight_decay}
                    for (norm, body), params in sorted(groups.items())]
    optimizer = torch.optim.SGD(param_groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                weight_decay=c.weight_decay)
    if lr_device is not None:
        hold_lr_as_tensor(optimizer, lr_device)
    set_lr(optimizer, c.lr)
    return optimizer


def hold_lr_as_tensor(optimizer: torch.optim.SGD, device: torch.device) -> None:
    """Hold each group's LR as a one-element device tensor for the fused SGD kernel, which reads it
    at run time (foreach reads a number at launch): so a CUDA graph sees the LR change. Saved state
    keeps plain numbers, so any checkpoint loads into any optimizer; loading makes them tensors."""
    def to_tensors(optimizer: torch.optim.SGD) -> None:
        for group in optimizer.param_groups:
            group.update(lr=torch.tensor(float(group["lr"]), device=device), fused=True,
                         foreach=None)

    def to_numbers(optimizer: torch.optim.SGD, state: dict[str, Any]) -> dict[str, Any]:
        for group in state["param_groups"]:
            group.update(lr=float(group["lr"]), fused=None)
        return state
    to_tensors(optimizer)
    optimizer.register_load_state_dict_post_hook(to_tensors)
    optimizer.register_state_dict_post_hook(to_numbers)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The one writer of the LR: each group's is lr x its lr_scale (LR tensors filled in place)."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def get_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR that set_lr last set."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) / group.get("lr_scale", 1.0)


class StepSchedule:
    """A fixed LR per optimizer step, lr_at(step), held at its last value past the run (extra
    epochs); None leaves the LR to LRA. Call advance(optimizer) after each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float | None]):
        self.lr_at, self.step = lr_at, 0
        set_lr(optimizer, lr_at(0))

    def advance(self, optimizer: torch.optim.Optimizer) -> None:
        self.step += 1
        lr = self.lr_at(self.step)
        if lr is not None:
            set_lr(optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def one_cycle(peak_lr: float, total_steps: int) -> Callable[[int], float]:
    """airbench's shape: a linear rise from 0.2x to 1x the peak over the first 23% of the steps,
    then a linear fall to 0.07x at the last."""
    last, warmup = total_steps - 1, 0.23 * total_steps - 1

    def lr_at(step: int) -> float:
        step = min(step, last)
        if step <= warmup:
            return peak_lr * (0.2 + 0.8 * step / warmup)
        return peak_lr * (1 - 0.93 * (step - warmup) / (last - warmup))
    return lr_at


def cosine(peak_lr: float, total_steps: int) -> Callable[[int], float]:
    """Cosine decay from the peak to 0 after the last step: CosineAnnealingLR's closed form (eta_min
    0, T_max the steps), which stays at 0 past the end (CosineAnnealingLR would rise again)."""
    return lambda step: peak_lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2


class Schedule(NamedTuple):
    """A SCHEDULE: shape(lr, total steps) gives the LR of each step (None: LRA's decisions set it),
    and sized_to_epochs whether that depends on the epoch count (a resume then keeps EPOCHS)."""

    shape: Callable[[float, int], Callable[[int], float]] | None
    sized_to_epochs: bool


SCHEDULES = {"lra": Schedule(None, False), "onecycle": Schedule(one_cycle, True),
             "cosine": Schedule(cosine, True)}


def make_schedule(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int,
                  warmup_steps: int = 0) -> StepSchedule | None:
    """The per-step schedule, or None where LRA sets the LR ("lra"). A warm-up scales step s's LR by
    (s + 1) / warmup_steps for the first warmup_steps (under "lra", of LR; LRA takes over after)."""
    shape = SCHEDULES[schedule].shape
    if not warmup_steps:
        return None if shape is None else StepSchedule(optimizer, shape(lr, total_steps))
    lr_at = (lambda step: lr) if shape is None else shape(lr, total_steps)
    return StepSchedule(optimizer, lambda step: lr_at(step) * (step + 1) / warmup_steps
                        if step < warmup_steps else None if shape is None else lr_at(step))


class Lookahead:
    """airbench's lookahead: every `every` steps, pull a slow copy of the weights towards the fast
    ones by a share that grows over the run, then go on from the slow copy; the run ends on it."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5):
        self.total_steps, self.every, self.step = total_steps, every, 0
        state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.slow = {k: v.detach().clone() for k, v in state.items()}
        # views of the live tensors
        self._fast, self._slow = list(state.values()), list(self.slow.values())

    @torch.no_grad()
    def update(self) -> None:
        """Count one optimizer step; every `every` steps (and on the last) sync the weights."""
        self.step += 1
        if self.step % self.every and self.step != self.total_steps:
            return
        decay = (1.0 if self.step >= self.total_steps
                 else 0.95 ** 5 * (self.step / self.total_steps) ** 3)
        torch._foreach_lerp_(self._slow, self._fast, 1 - decay)
        torch._foreach_copy_(self._fast, self._slow)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for key, value in state["slow"].items():
            self.slow[key].copy_(value)


class EMA:
    """An exponential moving average of the model's weights and buffers (BatchNorm statistics too,
    as torchvision's --model-ema), updated after each optimizer step; validation, the best epoch,
    best_model.pth and the final test see it. Held as a swa_utils.AveragedModel's `module` (the
    model's class and keys), averaged by swa_utils' EMA function (one _foreach_lerp_), but not by
    update_parameters: it reads its device-held count on the host each call (a GPU wait per step).
    Whole-number buffers (num_batches_tracked) are copied, not averaged, as in timm's ModelEmaV3."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)
        # deepcopy copies any .grad
        self.averaged.module.requires_grad_(False).zero_grad(set_to_none=True)
        # (the average's, the model's): floats; the rest
        self._averaged, self._copied = ([], []), ([], [])
        for ours, theirs in zip(_tensors(self.averaged.module), _tensors(model), strict=True):
            pair = self._averaged if ours.is_floating_point() else self._copied
            pair[0].append(ours.detach())  # views of the live tensors
            pair[1].append(theirs.detach())

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (for evaluation: nothing trains it)."""
        return self.averaged.module

    def decay_at(self, update: int) -> float:
        """Update t's decay (from 0): TensorFlow's ExponentialMovingAverage num_updates rule, 0.1 at
        the first and 0.99 by the 890th, so the average soon leaves the initial weights behind."""
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model after an optimizer step (device work, no wait)."""
        get_ema_multi_avg_fn(self.decay_at(self.updates))(*self._averaged, None)
        if self._copied[0]:
            torch._foreach_copy_(*self._copied)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        # copies the values in: the lists above stay the live tensors
        self.module.load_state_dict(state["model"])


def _tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """A model's parameters and buffers, each once (as swa_utils.AveragedModel pairs them)."""
    return itertools.chain(model.parameters(), model.buffers())


# --------------------------------------------------------------------------- the LR range test


@dataclasses.dataclass(frozen=True)
class RangeTest:
    """The LR range test's sweep: from start_lr to end_lr over `steps` steps, the loss smoothed with
    `beta`, stopped once it exceeds `diverge` times the lowest so far."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    beta: float = 0.98
    diverge: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.start_lr < self.end_lr:
            raise ValueError("the LR finder needs 0 < start_lr < end_lr, "
                             f"got {self.start_lr} and {self.end_lr}")
        if self.steps < 2:
            raise ValueError(f"the LR finder needs at least 2 steps, got {self.steps}")


def find_lr(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
            loss_fn: nn.Module, *, autocast_dtype: torch.dtype | None = None,
            sweep: RangeTest = RangeTest()) -> tuple[list[float], list[float], float | None]:
    """LR range test (Smith 2017, fastai's lr_find): up to sweep.steps batches (cycling the loader)
    at an LR rising exponentially, the loss smoothed as fastai does (bias-corrected EMA), stopped
    once it diverges (a non-finite loss ends the curve with inf). Returns the LRs, smoothed losses
    and suggest_lr's LR (None: unclear). Model, optimizer and random states are put back exactly."""
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer, rng, training = (copy.deepcopy(optimizer.state_dict()), utils.rng_state(),
                                      model.training)
    device = next(model.parameters()).device
    lrs, losses, average, best = [], [], 0.0, math.inf
    try:
        model.train()
        for step, (images, targets) in enumerate(_cycle(loader, sweep.steps)):
            lr = sweep.start_lr * (sweep.end_lr / sweep.start_lr) ** (step / (sweep.steps - 1))
            set_lr(optimizer, lr)
            with autocast(device, autocast_dtype):
                loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # one wait for the device per step: 100 steps, once
            if not math.isfinite(value):
                if lrs:  # the curve ends where it blew up: unclear() reads that as divergence
                    lrs.append(lr)
                    losses.append(math.inf)
                break
            average = sweep.beta * average + (1 - sweep.beta) * value
            lrs.append(lr)
            losses.append(average / (1 - sweep.beta ** (step + 1)))
            best = min(best, losses[-1])
            if losses[-1] > sweep.diverge * best:
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        model.zero_grad(set_to_none=True)
        model.train(training)
        utils.set_rng_state(rng)
    if not lrs:
        raise ValueError("the loss was not finite at the LR finder's first step "
                         f"(LR {sweep.start_lr})")
    return lrs, losses, suggest_lr(lrs, losses)


def _trimmed(lrs: list[float], losses: list[float]) -> tuple[list[float], list[float]]:
    """The curve without its first tenth (flat and noisy) and last five points (diverging); all of
    it under 20 points."""
    if len(lrs) < 20:
        return lrs, losses
    return lrs[len(lrs) // 10:-5], losses[len(losses) // 10:-5]


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's "valley": the LR midway (on the log scale) along the longest run of points over
    which the trimmed curve keeps falling (the longest decreasing subsequence)."""
    lrs, losses = _trimmed(lrs, losses)
    # the longest run ending at each point
    lengths, firsts = [1] * len(losses), list(range(len(losses)))
    for i in range(len(losses)):
        for j in range(i):
            # ties: the later start, off a plateau
            if losses[j] > losses[i] and lengths[j] + 1 >= lengths[i]:
                lengths[i], firsts[i] = lengths[j] + 1, firsts[j]
    end = lengths.index(max(lengths))
    return lrs[(firsts[end] + end) // 2]


def steepest(lrs: list[float], losses: list[float]) -> float:
    """fastai's "steep": the LR where the trimmed curve falls fastest against log LR."""
    lrs, losses = _trimmed(lrs, losses)
    if len(lrs) < 2:
        return lrs[0]
    slopes = [(b - a) / math.log(y / x) for a, b, x, y in zip(losses, losses[1:], lrs, lrs[1:])]
    return lrs[slopes.index(min(slopes))]


def minimum(lrs: list[float], losses: list[float]) -> float:
    """fastai's "minimum": a tenth of the LR at the lowest loss (Smith: an order of magnitude below
    where the loss stops falling)."""
    return lrs[losses.index(min(losses))] / 10


def valley_minimum(lrs: list[float], losses: list[float]) -> float:
    """The geometric mean of valley and minimum: midway between them on the log scale."""
    return math.sqrt(valley(lrs, losses) * minimum(lrs, losses))


# each rule: what it computes, and its words for --find-lr's line
LR_RULES: dict[str, tuple[Callable[[list[float], list[float]], float], str]] = {
    "valley": (valley, "the middle of the longest fall of the smoothed loss, fastai's valley rule"),
    "steepest": (steepest, "where the smoothed loss falls fastest, fastai's steep rule"),
    "minimum": (minimum, "a tenth of the LR at the lowest loss, fastai's minimum rule"),
    "valley_minimum": (valley_minimum, "midway (log scale) between fastai's valley rule "
                       "and a tenth of the LR at the lowest loss"),
    "lower": (lambda lrs, losses: min(valley(lrs, losses), minimum(lrs, losses)),
              "the lower of fastai's valley and minimum rules"),
    "higher": (lambda lrs, losses: max(valley(lrs, losses), minimum(lrs, losses)),
               "the higher of fastai's valley and minimum rules"),
}
LR_RULE = "steepest"  # the one that measured best (benchmarks/lr_finder_rules.py)


def unclear(lrs: list[float], losses: list[float], fall: float = 0.05) -> str | None:
    """Why the curve gives no clear answer, or None: its low is under `fall` (a share) below its
    start (flat, or noise), or the loss still falls at the sweep's last LR (no minimum to read)."""
    start = sorted(losses[:max(1, len(losses) // 10)])[max(1, len(losses) // 10) // 2]
    lowest = losses.index(min(losses))
    if min(losses) > (1 - fall) * start:
        return ("the smoothed loss never fell clearly "
                f"(from {start:.3g} to {min(losses):.3g} at most)")
    if lowest >= len(losses) - 3 and max(losses[lowest:]) < 2 * min(losses):
        return f"the loss still falls at the sweep's last LR ({lrs[-1]:.2g}): it never diverged"
    return None


def suggest_lr(lrs: list[float], losses: list[float], rule: str = LR_RULE) -> float | None:
    """The LR that LR_RULES[rule] reads off the curve; None where the curve is unclear."""
    return None if unclear(lrs, losses) else LR_RULES[rule][0](lrs, losses)


def _cycle(loader: Iterable, steps: int) -> Iterable:
    """`steps` batches from the loader, starting it again as often as needed."""
    step = 0
    while step < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            step += 1
            if step == steps:
                return
        if empty:
            raise ValueError("the LR finder got no batches from the training data")

