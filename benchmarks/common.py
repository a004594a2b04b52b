"""What the benchmark scripts share: waiting for the device, the bare training step (the limit a loader is
measured against), eager or replayed from a CUDA graph, and timing passes interleaved, best kept."""

import time
from typing import Callable

import torch
from torch import nn

import optim_module
import step_module
import train_module
from optim_module import OptimConfig


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: nn.Module, autocast_dtype: torch.dtype | None = None,
               graphed: bool = False) -> step_module.TrainStep:
    """The pipeline's training step for the model, with its own SGD; graphed (CUDA only): replayed from a CUDA
    graph, as main.py's CUDA_GRAPHS does."""
    device = next(model.parameters()).device
    optimizer = optim_module.make_optimizer(model, OptimConfig(lr=0.01), lr_device=device if graphed else None)
    return step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss(), autocast_dtype=autocast_dtype,
                                  graph=graphed)


def bare_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
              autocast_dtype: torch.dtype | None = None, graphed: bool = False) -> Callable[[], None]:
    """One training step (forward, loss, backward, the pipeline's SGD step: step_module.TrainStep) on one fixed
    batch already on the device, as a function of no arguments. graphed (CUDA only): the step replayed from a
    CUDA graph, as main.py's CUDA_GRAPHS does, so no kernel is launched from Python: the rate a launch-bound
    model could reach at most."""
    step = train_step(model, autocast_dtype, graphed)
    model.train()
    return lambda: step(images, targets)


def best_rates(passes: dict[str, tuple[Callable[[], None], int]], *, repeats: int,
               device: torch.device) -> dict[str, float]:
    """Images/s of each pass (a function and the images it trains on), as the best of `repeats` timings
    taken in turn (A B C, A B C, ...) after one untimed warm-up of each, so that a clock that rises or a
    neighbour that comes and goes touches every pass alike."""
    for run, _ in passes.values():
        run()
    synchronize(device)
    best = dict.fromkeys(passes, 0.0)
    for _ in range(repeats):
        for name, (run, images) in passes.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            best[name] = max(best[name], images / (time.perf_counter() - started))
    return best


def steps(step: Callable[[], None], n: int) -> Callable[[], None]:
    """A pass of n steps."""
    def run() -> None:
        for _ in range(n):
            step()
    return run


def bare_pass(model: nn.Module, batch_size: int, image_size: int, n_steps: int, *,
              autocast_dtype: torch.dtype | None = None, graphed: bool = False) -> tuple[Callable[[], None], int]:
    """A pass of n_steps bare steps on one random batch (channels_last, on the model's device) and the images it
    trains on, for best_rates."""
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    targets = torch.randint(0, 10, (batch_size,), device=device)
    step = bare_step(model, images.contiguous(memory_format=torch.channels_last), targets,
                     autocast_dtype=autocast_dtype, graphed=graphed)
    return steps(step, n_steps), n_steps * batch_size


def epoch_pass(model: nn.Module, loader, autocast_dtype: torch.dtype | None = None,
               graphed: bool = False) -> tuple[Callable[[], None], int]:
    """A pass of train_one_epoch over the loader (the next epoch's shuffle each time) and the images it trains
    on, for best_rates; graphed: its steps replayed from a CUDA graph (captured in the first pass)."""
    step = train_step(model, autocast_dtype, graphed)
    epochs = iter(range(10**9))

    def run() -> None:
        loader.set_epoch(next(epochs))
        train_module.train_one_epoch(step, loader)
    return run, len(loader) * loader.batching.batch_size


def bare_step_rate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, steps_per_pass: int,
                   repeats: int, autocast_dtype: torch.dtype | None = None, graphed: bool = False) -> float:
    """Images/s of the bare step alone: the best of `repeats` passes of steps_per_pass steps, after one untimed
    pass."""
    run = steps(bare_step(model, images, targets, autocast_dtype=autocast_dtype, graphed=graphed), steps_per_pass)
    return best_rates({"bare": (run, steps_per_pass * len(images))}, repeats=repeats, device=images.device)["bare"]
