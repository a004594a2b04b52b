"""The hand-written training loop: train_one_epoch, evaluate and fit, with their small helpers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoint_module
import model_module
import report_module
import utils
from callback_module import LRA, Decision

SCHEDULES = ("lra", "onecycle")
CHECK_EVERY = 50  # batches between checks for a non-finite loss (each check waits for the GPU once)
BF16_CPU_GAIN = 1.25  # bf16 trains on a CPU only where a trial step runs at least this many times as fast
TRIAL_BATCH = 64  # images in each trial step: enough for a CPU's kernels to show their speed, quick at any size


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(f"the training loss became {value} at epoch {epoch}, batch {batch}")


# --------------------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                   nesterov: bool = True, norm_lr_scale: float = 1.0, body_lr_scale: float = 1.0,
                   lr_device: torch.device | None = None) -> torch.optim.SGD:
    """SGD over every parameter meant to train, the frozen body included (it has no gradients, so SGD
    skips it until it is unfrozen; the groups never change, so no schedule or saved state has to follow
    a new one). Each group trains at LR x its lr_scale: BatchNorm parameters at norm_lr_scale (their
    weight decay divided by it, so their decay per step is the others'), the frozen body at body_lr_scale.
    lr_device: each group's LR is held as a tensor there and read by the fused SGD kernel, so a step
    captured in a CUDA graph sees every new LR (see hold_lr_as_tensor)."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    frozen = {id(p) for p in model_module.frozen_parameters(model)} if isinstance(model, model_module.Classifier) \
        else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad or id(p) in frozen:
            groups.setdefault((id(p) in norms and norm_lr_scale != 1.0, id(p) in frozen), []).append(p)
    param_groups = [{"params": params, "lr_scale": (norm_lr_scale if norm else 1.0) * (body_lr_scale if body else 1.0),
                     "weight_decay": weight_decay / norm_lr_scale if norm else weight_decay}
                    for (norm, body), params in sorted(groups.items())]
    optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if lr_device is not None:
        hold_lr_as_tensor(optimizer, lr_device)
    set_lr(optimizer, lr)
    return optimizer


def hold_lr_as_tensor(optimizer: torch.optim.SGD, device: torch.device) -> None:
    """Hold each group's LR as a one-element tensor on the device, stepped by the fused SGD kernel (which
    reads the LR from the tensor, where the foreach one reads a number when the step is launched): what a
    CUDA graph needs to see the LR change. set_lr fills the tensors in place. Saved state still holds plain
    numbers, so every checkpoint loads into every optimizer, and loading one makes them tensors again."""
    def to_tensors(optimizer: torch.optim.SGD) -> None:
        for group in optimizer.param_groups:
            group.update(lr=torch.tensor(float(group["lr"]), device=device), fused=True, foreach=None)

    def to_numbers(optimizer: torch.optim.SGD, state: dict[str, Any]) -> dict[str, Any]:
        for group in state["param_groups"]:
            group.update(lr=float(group["lr"]), fused=None)
        return state
    to_tensors(optimizer)
    optimizer.register_load_state_dict_post_hook(to_tensors)
    optimizer.register_state_dict_post_hook(to_numbers)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The one writer of the LR: every group trains at lr times its lr_scale (an LR tensor is filled in place)."""
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


class OneCycle:
    """A fixed per-step LR: rises linearly from 0.2x to 1x the peak over the first 23% of the steps,
    then falls linearly to 0.07x (airbench's shape), and holds its last value past the end (when the
    user asks for more epochs). Call advance(optimizer) after each optimizer step."""

    WARMUP = 0.23  # share of the steps spent rising (airbench's)

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int):
        self.peak_lr, self.total_steps, self.step = peak_lr, total_steps, 0
        self.warmup_steps = self.WARMUP * total_steps - 1
        set_lr(optimizer, self.lr_at(0))

    def lr_at(self, step: int) -> float:
        """The LR of the given step (0-based)."""
        last = self.total_steps - 1
        step = min(step, last)
        if step <= self.warmup_steps:
            return self.peak_lr * (0.2 + 0.8 * step / self.warmup_steps)
        return self.peak_lr * (1 - 0.93 * (step - self.warmup_steps) / (last - self.warmup_steps))

    def advance(self, optimizer: torch.optim.Optimizer) -> None:
        self.step += 1
        set_lr(optimizer, self.lr_at(self.step))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def make_schedule(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int) -> OneCycle | None:
    """None for "lra" (LRA's decisions set the LR), else the per-step schedule that does."""
    if schedule not in SCHEDULES:
        raise ValueError(utils.not_known("SCHEDULE", schedule, SCHEDULES))
    return OneCycle(optimizer, lr, total_steps) if schedule == "onecycle" else None


class Lookahead:
    """airbench's lookahead: every `every` steps, pull a slow copy of the weights towards the fast ones
    by an amount that grows over the run, then continue from the slow copy; the run ends on it."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5):
        self.total_steps, self.every, self.step = total_steps, every, 0
        state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.slow = {k: v.detach().clone() for k, v in state.items()}
        self._fast, self._slow = list(state.values()), list(self.slow.values())  # views of the live tensors

    @torch.no_grad()
    def update(self) -> None:
        """Count one optimizer step; every `every` steps (and on the last) sync the weights."""
        self.step += 1
        if self.step % self.every and self.step != self.total_steps:
            return
        decay = 1.0 if self.step >= self.total_steps else 0.95 ** 5 * (self.step / self.total_steps) ** 3
        torch._foreach_lerp_(self._slow, self._fast, 1 - decay)
        torch._foreach_copy_(self._fast, self._slow)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for key, value in state["slow"].items():
            self.slow[key].copy_(value)


# --------------------------------------------------------------------------- one epoch


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """bf16 (or other) autocast on the given device, or nothing. cache=False: no cache of cast weights (which a
    CUDA graph must not capture)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class TrainStep:
    """One training step on a batch (forward, loss, backward, optimizer step); returns the loss and the logits.

    graph=True (CUDA): the step is captured once in a CUDA graph, then replayed for every batch of the captured
    size: one launch where eager mode launches one kernel per operation, which is what holds small models back
    on a GPU. The graph reads and writes fixed tensors: its input buffers, the model's state, the momentum
    buffers and the LR tensors (make_optimizer's lr_device; set_lr fills them in place). new_epoch() notices
    when any of them was replaced (a restore or resume loads new optimizer state, unfreezing adds parameters)
    and the next batch captures the step again. Batches of another size run eagerly (after one, the parameters'
    .grad are that step's, while replays write the graph's own gradient tensors: read neither)."""

    WARMUP_STEPS = 3  # eager steps before a capture, as PyTorch's whole-network example takes (cuDNN's choices)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
                 autocast_dtype: torch.dtype | None = None, graph: bool = False):
        self.model, self.optimizer, self.loss_fn, self.autocast_dtype = model, optimizer, loss_fn, autocast_dtype
        self.device = next(model.parameters()).device
        if graph and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, not {self.device}")
        if graph and not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
            raise ValueError("a captured step needs the LR held as a tensor (make_optimizer's lr_device)")
        self.use_graph = graph
        self.compiling = hasattr(_unwrapped(model, compiled=False), "_orig_mod")  # torch.compile's: timed once
        if graph and self.compiling:
            raise ValueError("a torch.compile'd model is not captured in a CUDA graph of ours (it makes its own)")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key: tuple | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiling:  # torch.compile compiles on the first call
            started, self.compiling = time.perf_counter(), False
            result = self._step(images, targets)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if not utils.is_distributed() or torch.distributed.get_rank() == 0:
                print(f"torch.compile: the first training step took {time.perf_counter() - started:.1f} s, "
                      f"compiling included", file=sys.stderr)
            return result
        if not self.use_graph or (self.graph is not None and images.shape != self.inputs[0].shape):
            return self._step(images, targets)
        if self.graph is None:
            try:
                self._capture(images, targets)
            except RuntimeError as error:  # an operation that cannot be captured (one that reads the device, say)
                print(f"note: the training step could not be captured in a CUDA graph "
                      f"({(str(error).splitlines() or [repr(error)])[0]}); training without one", file=sys.stderr)
                self.use_graph, self.graph = False, None
                return self._step(images, targets)
        self.inputs[0].copy_(images)
        self.inputs[1].copy_(targets)
        self.graph.replay()
        return self.outputs[0].clone(), self.outputs[1].clone()  # the graph overwrites its outputs next step

    def new_epoch(self) -> None:
        """Drop the graph when a tensor it reads or writes has been replaced since it was captured."""
        if self.graph is not None and graph_key(self.model, self.optimizer) != self.key:
            self.graph = self.inputs = self.outputs = None

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.autocast_dtype, cache=not self.use_graph):
            logits = self.model(images)
            loss = self.loss_fn(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)  # in a capture: backward makes the graph's own .grad tensors
        loss.backward()
        self.optimizer.step()
        return loss, logits

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Warm up on a side stream, put everything back, and capture the step there (PyTorch's whole-network
        capture, which records the work without doing it); then check that a replay trains as the first eager
        step did (the same loss, change to the weights and momentum, from the same state), and put everything
        back again. The model, the optimizer and the random state are as they were, and the batch is then
        trained on by a replay. A replay that disagrees raises RuntimeError. The capture is thread_local: a
        loader's thread may pin memory meanwhile (and backward's own thread is not watched either, so the
        check after it is what catches a step that the graph does not repeat)."""
        init_momentum(self.optimizer)
        self.inputs = (images.clone(), targets.clone())
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        start = [p.detach().clone() for p in _trained(self.optimizer)]
        with rolled_back(self.model, self.optimizer):
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for i in range(self.WARMUP_STEPS):
                    loss, _ = self._step(*self.inputs)
                    if i == 0:
                        expected = _step_figures(loss, self.optimizer, start)
            current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.outputs = self._step(*self.inputs)
        except BaseException:
            torch.cuda.set_stream(current)  # a capture that fails at its end can leave its stream current
            raise
        self.outputs = tuple(t.detach() for t in self.outputs)
        with rolled_back(self.model, self.optimizer):
            graph.replay()
            replayed = _step_figures(self.outputs[0], self.optimizer, start)
            if not torch.allclose(replayed, expected, rtol=1e-3, atol=1e-6):  # one wait for the device
                raise RuntimeError(f"a replay of the captured step gave (loss, weight change, momentum) "
                                   f"{replayed.tolist()} where the eager step gave {expected.tolist()}")
        self.graph, self.key = graph, graph_key(self.model, self.optimizer)


def _trained(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _momentum(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | None:
    """p's momentum buffer, or None (without adding an empty state for p, as optimizer.state[p] would)."""
    return optimizer.state.get(p, {}).get("momentum_buffer")


def _step_figures(loss: torch.Tensor, optimizer: torch.optim.Optimizer, start: list[torch.Tensor]) -> torch.Tensor:
    """A step's loss, the norm of the change it made to the weights (from start) and the norm of the momentum
    buffers, as one device tensor: figures that tell apart steps that differ in forward, backward or update."""
    params = _trained(optimizer)
    buffers = [b for b in map(functools.partial(_momentum, optimizer), params) if b is not None]

    def norm(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float()) if tensors \
            else torch.zeros((), device=loss.device)
    return torch.stack([loss.detach().float(), norm(torch._foreach_sub(params, start)), norm(buffers)])


def graph_key(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """Where the tensors a captured step reads and writes live (the model's state, the momentum buffers, the LR
    tensors), and which parameters train: while it is unchanged, a captured step is still the step."""
    state = [t.data_ptr() for t in model.state_dict().values()]
    buffers = [_momentum(optimizer, p) for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"].data_ptr() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups]
    return (tuple(state), tuple(b.data_ptr() if b is not None else None for b in buffers), tuple(lrs),
            tuple(p.requires_grad for p in model.parameters()))


def init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter that has none a zero momentum buffer: SGD's first step then computes what
    it computes without one (the buffer becomes the gradient), and a captured step has a buffer to update."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                if p.requires_grad and _momentum(optimizer, p) is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@contextlib.contextmanager
def rolled_back(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Run the block (warm-up steps), then put the model's state, the momentum buffers and the random states back
    as they were, in place (a captured step keeps pointing at the same tensors)."""
    tensors = list(model.state_dict().values()) + [s["momentum_buffer"] for s in optimizer.state.values()
                                                   if s.get("momentum_buffer") is not None]
    saved, rng = [t.clone() for t in tensors], utils.rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
        utils.set_rng_state(rng)


def choose_precision(bf16: bool, device: torch.device, model: nn.Module, image_size: int, *, channels_last: bool,
                     run_steps: int, trial_steps: int, main_process: bool = True, recorded: str | None = None) -> str:
    """"bf16" or "fp32" for a run of run_steps training steps: with bf16 on, always bf16 on CUDA, and on a CPU
    only where a trial (bf16_speedup_on_cpu, on runs of at least trial_steps) finds it BF16_CPU_GAIN times
    as fast; other devices, and other processes than the main one, fp32 (they take the main one's answer).
    recorded: what a resumed run trained in, kept (so it goes on as it would have) unless BF16 is now off or
    this device has no native bf16."""
    if not bf16 or device.type not in ("cuda", "cpu"):
        return "fp32"
    native = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if recorded == "fp32" or (recorded == "bf16" and native):
        return recorded
    if device.type == "cuda":
        return "bf16"
    if run_steps < trial_steps or not main_process:
        return "fp32"
    speedup = bf16_speedup_on_cpu(model, image_size, channels_last)
    if speedup is None:
        return "fp32"
    choice = "bf16" if speedup >= BF16_CPU_GAIN else "fp32"
    print(f"bf16 on this CPU: a trial step ran {speedup:.2f}x as fast as fp32, so training is in {choice} "
          f"(bf16 needs {BF16_CPU_GAIN}x)")
    return choice


def bf16_speedup_on_cpu(model: nn.Module, image_size: int, channels_last: bool = True, steps: int = 3) -> float | None:
    """How many times as fast a training step of this model runs on the CPU under bf16 autocast as in fp32,
    or None where the CPU has no native bf16 (oneDNN says so). Each precision trains its own copy for one
    untimed step and then `steps` timed steps, taken in turn, best kept; the model, the optimizer and the
    random state are left as they were. Measured, not assumed: on an Intel Xeon with AVX512-BF16 and no AMX
    bf16 ran at 0.66x fp32 for the default CNN, on an AMD EPYC with AVX512-BF16 at 2x (README)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(TRIAL_BATCH, 3, image_size, image_size, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    targets = torch.randint(0, 2, (TRIAL_BATCH,), generator=generator)
    with torch.random.fork_rng(devices=[]):  # dropout, stochastic depth
        steps_of = {dtype: _trial_step(copy.deepcopy(model), images, targets, dtype)
                    for dtype in (None, torch.bfloat16)}
        best = dict.fromkeys(steps_of, math.inf)
        for step in steps_of.values():
            step()
        for _ in range(steps):
            for dtype, step in steps_of.items():
                started = time.perf_counter()
                step()
                best[dtype] = min(best[dtype], time.perf_counter() - started)
    return best[None] / best[torch.bfloat16]


def _trial_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype | None) -> Callable[[], Any]:
    """One training step of model (a copy) as a function: forward, loss, backward, SGD."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(), autocast_dtype=dtype)
    return lambda: step(images, targets)


def _show_progress() -> bool:
    return sys.stderr.isatty()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
                    epoch: int = 1, schedule: OneCycle | None = None, lookahead: Lookahead | None = None,
                    autocast_dtype: torch.dtype | None = None, step: TrainStep | None = None) -> dict[str, float]:
    """One pass over the training data; returns train_loss and train_acc (over every process).
    Each step only queues work: losses and logits are tallied on the device every CHECK_EVERY steps,
    so the GPU never waits on Python. step: the TrainStep to use (one kept across epochs keeps its CUDA graph);
    None: an eager one."""
    model.train()
    device = next(model.parameters()).device
    step = step or TrainStep(model, optimizer, loss_fn, autocast_dtype=autocast_dtype)
    step.new_epoch()
    totals = [torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device), 0]
    pending = ([], [], [])  # losses, logits, targets of the steps not yet tallied
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not _show_progress())
    check_every = CHECK_EVERY if bar.disable else 10  # a bar shows running figures, which costs a sync
    batch = 0
    for batch, (images, targets) in enumerate(loader, start=1):
        loss, logits = step(images, targets)
        if schedule is not None:
            schedule.advance(optimizer)
        if lookahead is not None:
            lookahead.update()
        for store, value in zip(pending, (loss.detach(), logits.detach(), targets)):
            store.append(value)
        if batch % check_every == 0:
            _tally(pending, totals, epoch, batch)
            if not bar.disable:
                bar.set_postfix(loss=f"{totals[0].item() / totals[2]:.4f}", acc=f"{totals[1].item() / totals[2]:.2%}")
        bar.update()
    bar.close()
    _tally(pending, totals, epoch, batch)
    loss_sum, correct, seen = _sum_over_processes(*totals)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen}


def _tally(pending: tuple[list, list, list], totals: list, epoch: int, last_batch: int) -> None:
    """Add the pending steps' summed loss, correct count and size to totals; raise NonFiniteLoss
    naming the first batch whose loss is not finite."""
    losses, logits, targets = pending
    if not losses:
        return
    values = torch.stack(losses).float()
    bad = (~torch.isfinite(values)).nonzero()  # the one wait for the GPU in CHECK_EVERY steps
    if len(bad):
        i = int(bad[0])
        raise NonFiniteLoss(epoch, last_batch - len(losses) + 1 + i, float(values[i]))
    sizes = [len(t) for t in targets]
    totals[0] += values @ torch.tensor(sizes, device=values.device, dtype=values.dtype)
    totals[1] += (torch.cat(logits).argmax(1) == torch.cat(targets)).sum()
    totals[2] += sum(sizes)
    for store in pending:
        store.clear()


def _sum_over_processes(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float, float]:
    """Read the device accumulators once (summed over torchrun processes) as Python floats."""
    totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=loss_sum.device)])
    return tuple(utils.all_reduce_sum(totals.double()).tolist())


def _tta_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean logits over the image and its mirror, and both shifted one pixel up-left and down-right
    (airbench's test-time augmentation, level 2)."""
    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(x) + 0.5 * model(x.flip(-1))
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:])
    return 0.5 * mirrored(images) + 0.25 * shifted


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, autocast_dtype: torch.dtype | None = None,
             tta: bool = False, num_classes: int | None = None, collect: bool = False) -> dict[str, Any]:
    """Cross-entropy loss and accuracy of the model over a loader (over every process); with
    num_classes, also the accuracy of each class ("per_class"); with collect (which needs num_classes),
    also the confusion matrix ("confusion": counts, rows the true class, columns the predicted one) and
    the MISTAKES most confident wrong predictions ("mistakes", a list of Mistake, most confident first)."""
    if collect and not num_classes:
        raise ValueError("evaluate(collect=True) needs num_classes")
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros(num_classes or 1, dtype=torch.int64, device=device)
    totals = torch.zeros(num_classes or 1, dtype=torch.int64, device=device)
    confusion = torch.zeros((num_classes or 1) ** 2, dtype=torch.int64, device=device)  # true x C + predicted
    mistakes = _MostConfidentMistakes(MISTAKES)
    for images, targets in loader:
        with autocast(device, autocast_dtype):
            logits = _tta_logits(model, images) if tta else model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        predicted = logits.argmax(1)
        by_class = targets if num_classes else torch.zeros_like(targets)
        hits += torch.bincount(by_class[predicted == targets], minlength=len(hits))
        totals += torch.bincount(by_class, minlength=len(totals))
        if collect:
            confusion += torch.bincount(targets * num_classes + predicted, minlength=len(confusion))
            mistakes.add(images, logits, targets)
    counts = utils.all_reduce_sum(torch.cat([loss_sum[None].double(), hits.double(), totals.double()])).tolist()
    loss_sum, hits, totals = counts[0], counts[1:1 + len(hits)], counts[1 + len(hits):]
    result = {"loss": loss_sum / sum(totals), "acc": sum(hits) / sum(totals)}
    if num_classes:
        result["per_class"] = [h / t if t else float("nan") for h, t in zip(hits, totals)]
    if collect:
        result["confusion"] = utils.all_reduce_sum(confusion).view(num_classes, num_classes).cpu()
        result["mistakes"] = mistakes.result()
    return result


MISTAKES = 25  # wrong predictions evaluate(collect=True) keeps for the gallery (misclassified.png)


@dataclasses.dataclass
class Mistake:
    """A wrong prediction: the image as the model saw it (normalised, C x H x W, on the CPU), its true and
    predicted class indices, and the probability the model gave the predicted class."""

    image: torch.Tensor
    target: int
    predicted: int
    probability: float


class _MostConfidentMistakes:
    """A running top-k of the wrong predictions by the predicted class's probability, kept on the device:
    k images at most, never the whole set, and no wait for the device per batch."""

    def __init__(self, k: int):
        self.k = k
        self.kept: tuple[torch.Tensor, ...] | None = None  # probabilities, images, targets, predictions

    def add(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        probability, predicted = logits.float().softmax(1).max(1)
        score = torch.where(predicted != targets, probability, -1.0)  # right answers rank below every mistake
        chosen = score.topk(min(self.k, len(score))).indices
        candidates = (score[chosen], images[chosen], targets[chosen], predicted[chosen])
        if self.kept is not None:
            candidates = tuple(torch.cat(pair) for pair in zip(self.kept, candidates))
        keep = candidates[0].topk(min(self.k, len(candidates[0]))).indices
        self.kept = tuple(c[keep] for c in candidates)

    def result(self) -> list[Mistake]:
        """The k most confident mistakes over every process, most confident first."""
        mine = []
        if self.kept is not None:
            probabilities, images, targets, predicted = self.kept
            mine = [Mistake(image, target, prediction, probability) for probability, image, target, prediction
                    in zip(probabilities.tolist(), images.cpu(), targets.tolist(), predicted.tolist())
                    if probability >= 0]
        everyone = [m for mistakes in utils.gather(mine) for m in mistakes]
        return sorted(everyone, key=lambda m: -m.probability)[:self.k]


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities for a batch of normalised images."""
    model.eval()
    device = next(model.parameters()).device
    return model(images.to(device)).float().softmax(1).cpu()


# --------------------------------------------------------------------------- the LR range test


def find_lr(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
            start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100, autocast_dtype: torch.dtype | None = None,
            beta: float = 0.98, diverge: float = 4.0) -> tuple[list[float], list[float], float]:
    """An LR range test (Smith 2017, fastai's lr_find): train up to `steps` batches (cycling the loader when
    it has fewer) with the LR rising exponentially from start_lr to end_lr, recording the loss smoothed
    as fastai does (an exponential moving average with `beta`, bias-corrected), and stop once it exceeds
    `diverge` times the lowest so far (or is not finite). Returns the LRs, the smoothed losses and the
    suggested LR (see suggest_lr). The model, the optimizer and the random states are then put back exactly
    as they were: the test trains only to measure."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"the LR finder needs 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise ValueError(f"the LR finder needs at least 2 steps, got {steps}")
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer, rng, training = copy.deepcopy(optimizer.state_dict()), utils.rng_state(), model.training
    device = next(model.parameters()).device
    lrs, losses, average, best = [], [], 0.0, math.inf
    try:
        model.train()
        for step, (images, targets) in enumerate(_cycle(loader, steps)):
            lr = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
            set_lr(optimizer, lr)
            with autocast(device, autocast_dtype):
                loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # one wait for the device per step: 100 steps, once
            if not math.isfinite(value):
                break
            average = beta * average + (1 - beta) * value
            smoothed = average / (1 - beta ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        model.zero_grad(set_to_none=True)
        model.train(training)
        utils.set_rng_state(rng)
    if not lrs:
        raise ValueError(f"the loss was not finite at the LR finder's first step (LR {start_lr})")
    return lrs, losses, suggest_lr(lrs, losses)


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """After fastai's "valley" rule: leave out the first tenth of the points and the last five (the start is
    flat and noisy, the end diverging), find the longest run of points over which the smoothed loss keeps
    falling (the longest decreasing subsequence), and take the LR midway between its first and last point
    (on the log scale). With under 20 points, all are used."""
    if len(lrs) >= 20:
        lrs, losses = lrs[len(lrs) // 10:-5], losses[len(losses) // 10:-5]
    lengths, firsts = [1] * len(losses), list(range(len(losses)))  # the longest run ending at each point
    for i in range(len(losses)):
        for j in range(i):
            if losses[j] > losses[i] and lengths[j] + 1 >= lengths[i]:  # ties: the later start, off a plateau
                lengths[i], firsts[i] = lengths[j] + 1, firsts[j]
    end = lengths.index(max(lengths))
    return lrs[(firsts[end] + end) // 2]


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


# --------------------------------------------------------------------------- carrying out LRA's decisions


class Snapshot:
    """The best epoch's model state and (when a restore can use it) optimizer state, on the device."""

    def __init__(self, with_optimizer: bool = True):
        self.with_optimizer = with_optimizer
        self.model: dict[str, torch.Tensor] | None = None
        self.optimizer: dict[str, Any] | None = None

    def take(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.with_optimizer:
            self.optimizer = copy.deepcopy(optimizer.state_dict())

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load the snapshot into the model (and the optimizer, when given)."""
        model.load_state_dict(self.model)  # copies the values in
        if optimizer is not None:  # load_state_dict keeps the tensors it is given: training would change the snapshot
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.model = None if state["model"] is None else {k: v.to(device) for k, v in state["model"].items()}
        self.optimizer = copy.deepcopy(state["optimizer"])  # the optimizer may be loaded from the same tensors


def apply_decision(decision: Decision, model: nn.Module, optimizer: torch.optim.Optimizer, best: Snapshot) -> None:
    """Carry out LRA's decision: keep a new best, go back to the best, unfreeze the body, set the LR."""
    if decision.new_best:
        best.take(model, optimizer)
    if decision.restore:
        best.restore(model, optimizer)
    if decision.unfreeze:
        model_module.unfreeze_body(model)  # the optimizer already holds its parameters (make_optimizer)
    if decision.next_lr is not None:
        set_lr(optimizer, decision.next_lr)


def use_cuda_graph(setting: str, device: torch.device, *, world_size: int = 1, compile: bool = False) -> bool:
    """Whether training steps are replayed from a CUDA graph: "auto" on a CUDA device in one process without
    torch.compile (whose own graphs would nest), "yes" there or a ValueError saying why not, "no" never."""
    possible = {"a CUDA device": device.type == "cuda", "one process (not torchrun)": world_size == 1,
                "COMPILE off": not compile}
    if setting == "yes" and not all(possible.values()):
        missing = ", ".join(need for need, met in possible.items() if not met)
        raise ValueError(f"CUDA_GRAPHS='yes' needs {missing}; set it to 'auto' or 'no'")
    return setting != "no" and all(possible.values())


def wrap_for_training(model: nn.Module, *, compile: bool = False, world_size: int = 1,
                      device: torch.device | None = None) -> nn.Module:
    """What runs the training batches: the model, compiled and/or data-parallel as asked. Call again
    after unfreezing, so the new trainable parameters are synchronised too."""
    if compile:
        model = torch.compile(model)
    if world_size > 1:
        devices = [device.index] if device is not None and device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=devices)
    return model


# --------------------------------------------------------------------------- the run


def fit(model: nn.Module, data, optimizer: torch.optim.Optimizer, lra: LRA, *, epochs: int, loss_fn: nn.Module,
        output_dir: str = ".", best: Snapshot | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None,
        schedule: OneCycle | None = None, lookahead: Lookahead | None = None,
        autocast_dtype: torch.dtype | None = None, start_epoch: int = 1, history: list[dict] | None = None,
        run_info: dict | None = None, main_process: bool = True,
        on_epoch: Callable[[dict], None] | None = None, cuda_graph: bool = False) -> list[dict]:
    """Train to `epochs` (or as far as the user asks at the prompt) unless LRA stops first, carrying out
    its decisions; save the epoch's files (checkpoint_module.EpochWriter, while the next epoch trains); at
    the end, or on an interruption, restore the best weights and draw training_curves.png. wrap(model) gives what runs
    the training batches (see wrap_for_training); run_info (constants, classes, normalisation) goes
    into the checkpoint and best_model.json; on_epoch(metrics) is called after each epoch's files (TensorBoard);
    cuda_graph: replay the training step from a CUDA graph (TrainStep; the optimizer needs make_optimizer's
    lr_device)."""
    wrap = wrap or (lambda m: m)
    best = best or Snapshot(with_optimizer=lra.restores)
    train_model, history, run_info = wrap(model), list(history or []), run_info or {}
    step = TrainStep(train_model, optimizer, loss_fn, autocast_dtype=autocast_dtype, graph=cuda_graph)
    lra.on_train_begin()
    epoch, reason = start_epoch, None
    writer = checkpoint_module.EpochWriter(output_dir) if main_process else None
    try:
        while epoch <= lra.epoch_limit(epochs):
            metrics = _train_and_validate(train_model, data, optimizer, loss_fn, epoch, schedule=schedule,
                                          lookahead=lookahead, autocast_dtype=autocast_dtype, step=step)
            decision = lra.on_epoch_end(epoch, metrics)
            apply_decision(decision, model, optimizer, best)
            if decision.unfreeze:
                train_model = wrap(model)
                step = TrainStep(train_model, optimizer, loss_fn, autocast_dtype=autocast_dtype, graph=step.use_graph)
            history.append({**metrics, "next_lr": get_lr(optimizer), **decision.row()})
            rng = utils.gather(utils.rng_state())  # every process's, so a resume continues each one
            if writer is not None:  # written while the next epoch trains
                writer.save(model=model, optimizer=optimizer, lra=lra, best=best, new_best=decision.new_best,
                            schedule=schedule, lookahead=lookahead, rng=rng, history=history, run_info=run_info)
                if on_epoch is not None:
                    on_epoch(history[-1])
            if decision.stop:
                break
            epoch += 1
        if writer is not None:
            writer.wait()  # the last epoch's files are on disk, or their error is raised, before fit returns
    except (NonFiniteLoss, KeyboardInterrupt) as error:
        reason = f"{error}; stopped" if isinstance(error, NonFiniteLoss) else f"interrupted during epoch {epoch}"
        raise
    finally:
        if writer is not None:
            writer.wait(raise_error=False)  # interrupted: the write in flight still lands
        if best.model is not None:
            best.restore(model)
        lra.on_train_end(reason)
        if main_process and history:
            report_module.plot_training_curves(history, os.path.join(output_dir, report_module.CURVES))
    _check_agreement(model, history, main_process)
    return history


def _train_and_validate(model: nn.Module, data, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, epoch: int,
                        **train_options: Any) -> dict[str, Any]:
    """One epoch: train, then validate; returns the epoch's metrics, rank 0's under torchrun."""
    started = time.perf_counter()
    data.train.set_epoch(epoch)
    lr = get_lr(optimizer)
    metrics = {"epoch": epoch, **train_one_epoch(model, data.train, optimizer, loss_fn, epoch=epoch, **train_options)}
    trained = time.perf_counter()  # train_one_epoch ends by reading the device, so the time is real
    val = evaluate(_unwrapped(model), data.val, autocast_dtype=train_options.get("autocast_dtype"))
    metrics.update(val_loss=val["loss"], val_acc=val["acc"], lr=lr, seconds=time.perf_counter() - started,
                   train_seconds=trained - started)
    return utils.broadcast(metrics)  # under torchrun, rank 0's figures decide for every process


def _unwrapped(model: nn.Module, compiled: bool = True) -> nn.Module:
    """The module inside DistributedDataParallel (evaluation needs no gradient sync, and shards of different
    sizes must not wait on each other) and, with compiled, inside torch.compile's wrapper (evaluation runs
    eagerly, so its other mode and batch sizes compile nothing more)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model) if compiled else model


def _check_agreement(model: nn.Module, history: list[dict], main_process: bool) -> None:
    """Under torchrun, confirm every process made the same LR decisions and ends with the same weights
    (they must, to stay in step)."""
    if not utils.is_distributed():
        return
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    states = utils.gather(([(row["epoch"], row["next_lr"], row["event"]) for row in history], checksum))
    if main_process:
        agree = all(state == states[0] for state in states)
        print(f"LR decisions and weights {'agreed' if agree else 'DIFFERED'} on all {len(states)} processes"
              f"{'' if agree else ': ' + repr(states)}", file=sys.stdout if agree else sys.stderr)
