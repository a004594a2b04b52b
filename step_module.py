"""One training step and how it runs: gradient accumulation and clipping, autocast precision (chosen
once per run, by a timing trial on a CPU), CUDA-graph replay, compiled or data-parallel models."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

import distributed_module
import utils

CUDA_GRAPHS = ("auto", "yes", "no")
# bf16 trains on a CPU only where a trial step runs at least this many times as fast
BF16_CPU_GAIN = 1.25
# images in each trial step: enough for a CPU's kernels to show their speed, quick at any size
TRIAL_BATCH = 64


# --------------------------------------------------------------------------- the step


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """bf16 (or other) autocast on the given device, or nothing. cache=False: no cache of cast
    weights (which a CUDA graph must not capture)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


@contextlib.contextmanager
def autotuned(worth_it: bool):
    """cuDNN's benchmark mode (run_module.setup's: each new input shape first times every
    convolution's algorithms) kept only where worth_it: off for a batch size that runs once (an
    evaluation's last batch), whose timing costs more than it saves."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark and worth_it
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


class TrainStep:
    """One training step on a batch (forward, loss, backward, optimizer step); returns loss, logits.

    accumulate > 1: a call trains the index-th micro-batch of a group of `group` (micro_batch); its
    mean loss counts 1/group, gradients are zeroed at the group's first and the optimizer steps at
    its last, so equal micro-batches update as one batch would (BatchNorm aside: it sees each
    alone); under torchrun they are all-reduced at the last only. clip_grad_norm: the summed
    gradients are scaled to this total norm before each optimizer step, on the device, with no wait.

    graph=True (CUDA): captured once in a CUDA graph, replayed for every batch of that size: one
    launch where eager mode launches a kernel per operation (what holds small models back on a GPU).
    The graph uses fixed tensors (inputs, model state, momentum buffers, LR tensors that set_lr
    fills in place); new_epoch() notices a replaced one (a restore or resume loads optimizer state,
    unfreezing adds parameters) and the next batch captures again. Other sizes run eagerly (.grad is
    then that step's, while replays write the graph's own gradients: read neither)."""

    # eager steps before a capture, as PyTorch's whole-network example takes (cuDNN's choices)
    WARMUP_STEPS = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
                 autocast_dtype: torch.dtype | None = None, graph: bool = False,
                 accumulate: int = 1, clip_grad_norm: float | None = None):
        self.model, self.optimizer, self.loss_fn, self.autocast_dtype = (
            model, optimizer, loss_fn, autocast_dtype)
        self.accumulate, self.clip_grad_norm = accumulate, clip_grad_norm
        self.device = next(model.parameters()).device
        # use_cuda_graph keeps graphs off then: a captured step is a whole update
        if graph and accumulate > 1:
            raise ValueError("a captured step is one whole optimizer step: "
                             "it accumulates no micro-batches")
        if graph and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, not {self.device}")
        if graph and not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
            raise ValueError("a captured step needs the LR held as a tensor "
                             "(make_optimizer's lr_device)")
        self.use_graph = graph
        # torch.compile's: timed once
        self.compiling = hasattr(unwrapped(model, compiled=False), "_orig_mod")
        if graph and self.compiling:
            raise ValueError("a torch.compile'd model is not captured in a CUDA graph of ours "
                             "(it makes its own)")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key: tuple | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, *, index: int = 0,
                 group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on the batch, the index-th micro-batch of a group of `group` (a step per group)."""
        assert 0 <= index < group <= self.accumulate, (
            "micro_batch's position in a group of at most accumulate")
        if self.compiling:  # torch.compile compiles on the first call
            started, self.compiling = time.perf_counter(), False
            result = self._step(images, targets, index, group)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if not distributed_module.is_distributed() or torch.distributed.get_rank() == 0:
                print("torch.compile: the first training step took "
                      f"{time.perf_counter() - started:.1f} s, compiling included", file=sys.stderr)
            return result
        if not self.use_graph or (self.graph is not None and images.shape != self.inputs[0].shape):
            return self._step(images, targets, index, group)
        if self.graph is None:
            try:
                self._capture(images, targets)
            # an operation that cannot be captured (one that reads the device, say)
            except RuntimeError as error:
                print("note: the training step could not be captured in a CUDA graph "
                      f"({(str(error).splitlines() or [repr(error)])[0]}); training without one",
                      file=sys.stderr)
                self.use_graph, self.graph = False, None
                return self._step(images, targets)
        self.inputs[0].copy_(images)
        self.inputs[1].copy_(targets)
        self.graph.replay()
        # the graph overwrites its outputs next step
        return self.outputs[0].clone(), self.outputs[1].clone()

    def new_epoch(self) -> None:
        """Drop the graph when a tensor it reads or writes was replaced since its capture."""
        if self.graph is not None and graph_key(self.model, self.optimizer) != self.key:
            self.graph = self.inputs = self.outputs = None

    def _step(self, images: torch.Tensor, targets: torch.Tensor, index: int = 0,
              group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        last = index == group - 1
        # DDP decides in forward: both inside
        with contextlib.nullcontext() if last else _no_sync(self.model):
            with autocast(self.device, self.autocast_dtype, cache=not self.use_graph):
                logits = self.model(images)
                loss = self.loss_fn(logits, targets)
            if index == 0:
                # in a capture: backward makes the graph's own .grad
                self.optimizer.zero_grad(set_to_none=True)
            (loss / group if group > 1 else loss).backward()
        if last:
            # no error_if_nonfinite: that would wait for the device
            if self.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            self.optimizer.step()
        return loss, logits

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Warm up on a side stream, capture the step there (PyTorch's whole-network recipe), check
        that a replay trains as the first eager step did (loss, weight change, momentum; else
        RuntimeError), rolling all back after each; a capture does no work, so a replay then trains
        the batch. thread_local: a loader's thread may pin memory meanwhile (backward's thread is
        unwatched too: the replay check catches what it misses)."""
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
            # a capture that fails at its end can leave its stream current
            torch.cuda.set_stream(current)
            raise
        self.outputs = tuple(t.detach() for t in self.outputs)
        with rolled_back(self.model, self.optimizer):
            graph.replay()
            replayed = _step_figures(self.outputs[0], self.optimizer, start)
            # one wait for the device
            if not torch.allclose(replayed, expected, rtol=1e-3, atol=1e-6):
                raise RuntimeError(
                    "a replay of the captured step gave (loss, weight change, momentum) "
                    f"{replayed.tolist()} where the eager step gave {expected.tolist()}")
        self.graph, self.key = graph, graph_key(self.model, self.optimizer)


def micro_batch(batch: int, batches: int, accumulate: int) -> tuple[int, int]:
    """Where the batch-th batch (from 1) falls when accumulate batches make an optimizer step: its
    index in its group and the group's size (the epoch's last group holds what is left)."""
    first = (batch - 1) // accumulate * accumulate
    return batch - 1 - first, min(accumulate, batches - first)


def optimizer_steps(batches: int, accumulate: int) -> int:
    """An epoch's optimizer steps, accumulate batches to a step (a last smaller group counts)."""
    return -(-batches // accumulate)


def _no_sync(model: nn.Module):
    """DDP's no_sync (backward leaves the gradients unreduced), or nothing for a plain model."""
    return (model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel)
            else contextlib.nullcontext())


def _trained(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _momentum(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | None:
    """p's momentum buffer, or None (adding no empty state for p, as optimizer.state[p] would)."""
    return optimizer.state.get(p, {}).get("momentum_buffer")


def _step_figures(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                  start: list[torch.Tensor]) -> torch.Tensor:
    """A step's loss, the norm of its weight change (from start) and of the momentum buffers, as one
    device tensor: they tell apart steps that differ in forward, backward or update."""
    params = _trained(optimizer)
    buffers = [b for b in map(functools.partial(_momentum, optimizer), params) if b is not None]

    def norm(tensors: list[torch.Tensor]) -> torch.Tensor:
        return (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())
                if tensors else torch.zeros((), device=loss.device))
    return torch.stack([loss.detach().float(), norm(torch._foreach_sub(params, start)),
                        norm(buffers)])


def graph_key(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """Where a captured step's tensors live (model state, momentum buffers, LR tensors) and which
    parameters train: while this is unchanged, the captured step is still the step."""
    state = [t.data_ptr() for t in model.state_dict().values()]
    buffers = [_momentum(optimizer, p) for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"].data_ptr() if isinstance(g["lr"], torch.Tensor) else g["lr"]
           for g in optimizer.param_groups]
    return (tuple(state), tuple(b.data_ptr() if b is not None else None for b in buffers),
            tuple(lrs), tuple(p.requires_grad for p in model.parameters()))


def init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """A zero momentum buffer for each trainable parameter without one: SGD's first step computes
    the same (the buffer becomes the gradient), and a captured step has a buffer to update."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                if p.requires_grad and _momentum(optimizer, p) is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)


@contextlib.contextmanager
def rolled_back(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Run the block, then put the model's state, momentum buffers and random states back in place
    (a captured step keeps pointing at the same tensors)."""
    tensors = list(model.state_dict().values()) + [s["momentum_buffer"]
                                                   for s in optimizer.state.values()
                                                   if s.get("momentum_buffer") is not None]
    saved, rng = [t.clone() for t in tensors], utils.rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
        utils.set_rng_state(rng)


# --------------------------------------------------------------------------- precision


def choose_precision(bf16: bool, device: torch.device, model: nn.Module, image_size: int, *,
                     channels_last: bool, trial: bool, recorded: str | None = None) -> str:
    """"bf16" or "fp32": with bf16 on, bf16 on CUDA, and on a CPU only where trial is allowed (a run
    long enough to pay, in the main process; others take its answer) and bf16_speedup_on_cpu finds
    it BF16_CPU_GAIN times as fast; fp32 elsewhere. recorded: a resumed run's precision, kept (it
    goes on as it would have) unless BF16 is now off or this device lacks native bf16."""
    if not bf16 or device.type not in ("cuda", "cpu"):
        return "fp32"
    native = device.type == "cuda" or cpu_has_bf16()
    if recorded == "fp32" or (recorded == "bf16" and native):
        return recorded
    if device.type == "cuda":
        return "bf16"
    if not trial:
        return "fp32"
    speedup = bf16_speedup_on_cpu(model, image_size, channels_last)
    if speedup is None:
        return "fp32"
    choice = "bf16" if speedup >= BF16_CPU_GAIN else "fp32"
    print(f"bf16 on this CPU: a trial step ran {speedup:.2f}x as fast as fp32, "
          f"so training is in {choice} (bf16 needs {BF16_CPU_GAIN}x)")
    return choice


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's answer)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_speedup_on_cpu(model: nn.Module, image_size: int, channels_last: bool = True,
                        steps: int = 3) -> float | None:
    """How many times as fast a training step runs on the CPU under bf16 autocast as in fp32 (best
    of `steps`, each precision on its own copy: the model and random state are left as they were);
    None without native bf16 (oneDNN). Measured, not assumed: with AVX512-BF16, the default CNN ran
    bf16 at 0.66x fp32 on an Intel Xeon without AMX, at 2x on an AMD EPYC
    (benchmarks/RESULTS.md)."""
    if not cpu_has_bf16():
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
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                momentum=0.9)
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(), autocast_dtype=dtype)
    return lambda: step(images, targets)


# --------------------------------------------------------------------------- what runs the step


def use_cuda_graph(setting: str, device: torch.device, *, world_size: int = 1,
                   compile: bool = False, accumulate_steps: int = 1,
                   main_process: bool = True) -> bool:
    """Whether training steps replay a CUDA graph: "auto" on a CUDA device in one process without
    torch.compile (its own graphs would nest) and without gradient accumulation (a captured step is
    a whole optimizer step; a line then says graphs are off), "yes" there or a ValueError why not,
    "no" never."""
    possible = {"a CUDA device": device.type == "cuda",
                "one process (not torchrun)": world_size == 1, "COMPILE off": not compile}
    if setting == "yes" and not all(possible.values()):
        missing = ", ".join(need for need, met in possible.items() if not met)
        raise ValueError(f"CUDA_GRAPHS='yes' needs {missing}; set it to 'auto' or 'no'")
    if setting != "no" and all(possible.values()) and accumulate_steps > 1:
        if setting == "yes":
            raise ValueError(
                f"CUDA_GRAPHS='yes' needs ACCUMULATE_STEPS = 1, not {accumulate_steps} "
                "(a captured step is one whole optimizer step); set CUDA_GRAPHS to 'auto' or 'no'")
        if main_process:
            print("note: training steps are not replayed from a CUDA graph with ACCUMULATE_STEPS = "
                  f"{accumulate_steps} (a captured step is one whole optimizer step)",
                  file=sys.stderr)
        return False
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


def unwrapped(model: nn.Module, compiled: bool = True) -> nn.Module:
    """The module inside DDP (evaluation needs no gradient sync, and shards of different sizes must
    not wait on each other) and, with compiled, inside torch.compile's wrapper (evaluation runs
    eagerly: its other mode and batch sizes compile nothing more)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model) if compiled else model

