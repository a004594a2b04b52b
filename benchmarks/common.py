"""What the benchmark scripts share: waiting for the device, and the bare step rate (the limit a loader
is measured against)."""

import time

import torch
from torch import nn

import train_module


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_rate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, steps: int, repeats: int,
                   warmup: int, autocast_dtype: torch.dtype | None = None) -> float:
    """Images/s of forward, loss, backward and SGD step on one fixed batch already on the device: the best
    of `repeats` timings of `steps` steps each, after `warmup` untimed steps."""
    device = images.device
    optimizer = train_module.make_optimizer(model, 0.01)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def run(n: int) -> None:
        for _ in range(n):
            with train_module.autocast(device, autocast_dtype):
                loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(warmup)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run(steps)
        synchronize(device)
        best = max(best, steps * len(images) / (time.perf_counter() - started))
    return best
