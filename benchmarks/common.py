"""What the benchmark scripts share: waiting for the device, the bare training step (the limit a
loader is measured against), eager or replayed from a CUDA graph, timing passes interleaved, best
kept, and this process's resident memory, anonymous apart from file pages."""

import os
import threading
import time
from typing import Callable

import torch
from torch import nn

import main
import optim_module
import run_module
import step_module
import train_module


def configs(**constants) -> run_module.Config:
    """main.build_config of main.py's constants (the defaults), the ones named changed."""
    return main.build_config({**main.constants(), **constants})


def add_device_arguments(parser, workers: str) -> None:
    """--workers (what the DataLoader's are, in words) and --no-bf16, which both scripts take."""
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help=workers)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA too")


def device_name(on_gpu: bool) -> str:
    """The GPU's name, or the CPU's cores and torch's threads: what a benchmark ran on."""
    if on_gpu:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: nn.Module, autocast_dtype: torch.dtype | None = None, graphed: bool = False,
               **options) -> step_module.TrainStep:
    """The pipeline's training step for the model, with its own SGD; graphed (CUDA only): replayed
    from a CUDA graph, as main.py's CUDA_GRAPHS does; options: TrainStep's accumulate and
    clip_grad_norm."""
    device = next(model.parameters()).device
    optimizer = optim_module.make_optimizer(model, configs(LR=0.01).optim,
                                            lr_device=device if graphed else None)
    return step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss(),
                                 autocast_dtype=autocast_dtype, graph=graphed, **options)


def bare_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
              autocast_dtype: torch.dtype | None = None,
              graphed: bool = False) -> Callable[[], None]:
    """One training step (forward, loss, backward, the pipeline's SGD step: step_module.TrainStep)
    on one fixed batch already on the device, as a function of no arguments. graphed (CUDA only):
    the step replayed from a CUDA graph, as main.py's CUDA_GRAPHS does, so no kernel is launched
    from Python: the rate a launch-bound model could reach at most."""
    step = train_step(model, autocast_dtype, graphed)
    model.train()
    return lambda: step(images, targets)


def best_rates(passes: dict[str, tuple[Callable[[], None], int]], *, repeats: int,
               device: torch.device) -> dict[str, float]:
    """Images/s of each pass (a function and the images it trains on), as the best of `repeats`
    timings taken in turn (A B C, A B C, ...) after one untimed warm-up of each, so that a clock
    that rises or a neighbour that comes and goes touches every pass alike."""
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
              autocast_dtype: torch.dtype | None = None,
              graphed: bool = False) -> tuple[Callable[[], None], int]:
    """A pass of n_steps bare steps on one random batch (channels_last, on the model's device) and
    the images it trains on, for best_rates."""
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    targets = torch.randint(0, 10, (batch_size,), device=device)
    step = bare_step(model, images.contiguous(memory_format=torch.channels_last), targets,
                     autocast_dtype=autocast_dtype, graphed=graphed)
    return steps(step, n_steps), n_steps * batch_size


def epoch_pass(model: nn.Module, loader, autocast_dtype: torch.dtype | None = None,
               graphed: bool = False, ema_decay: float | None = None,
               **options) -> tuple[Callable[[], None], int]:
    """A pass of train_one_epoch over the loader (the next epoch's shuffle each time) and the images
    it trains on, for best_rates; graphed: its steps replayed from a CUDA graph (captured in the
    first pass); ema_decay: an EMA of the weights follows each optimizer step (optim_module.EMA);
    options: TrainStep's."""
    step = train_step(model, autocast_dtype, graphed, **options)
    ema = optim_module.EMA(model, ema_decay) if ema_decay is not None else None
    epochs = iter(range(10**9))

    def run() -> None:
        loader.set_epoch(next(epochs))
        train_module.train_one_epoch(step, loader, ema=ema)
    return run, len(loader) * loader.batching.batch_size


def bare_step_rate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                   steps_per_pass: int, repeats: int, autocast_dtype: torch.dtype | None = None,
                   graphed: bool = False) -> float:
    """Images/s of the bare step alone: the best of `repeats` passes of steps_per_pass steps, after
    one untimed pass."""
    run = steps(bare_step(model, images, targets, autocast_dtype=autocast_dtype, graphed=graphed),
                steps_per_pass)
    return best_rates({"bare": (run, steps_per_pass * len(images))}, repeats=repeats,
                      device=images.device)["bare"]


def resident_mb() -> dict[str, float]:
    """This process's resident memory now (Linux's /proc/self/status, MB): anonymous (RssAnon: the
    heap, tensors, what grows with the data held) and file pages (RssFile: libraries, and a
    memory-mapped cache's pages, which the kernel can drop); empty where there is no /proc."""
    sizes = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    name, kilobytes = line.split()[:2]
                    sizes[name[3:-1].lower() + "_mb"] = int(kilobytes) / 1024
    except OSError:
        pass
    return sizes


class MemoryWatch:
    """resident_mb now and at its peak since the last read, sampled every `interval` seconds by a
    daemon thread (the kernel keeps no peak of each kind apart)."""

    def __init__(self, interval: float = 0.02):
        self.peak, self.stop = resident_mb(), threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self.thread.start()

    def _sample(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self._update()

    def _update(self) -> dict[str, float]:
        now = resident_mb()
        with self.lock:
            self.peak = {name: max(value, self.peak.get(name, 0.0)) for name, value in now.items()}
        return now

    def read(self) -> dict[str, float]:
        """{anon_mb, file_mb, peak_anon_mb, peak_file_mb}: now, and the peaks since the last
        read."""
        now = self._update()
        with self.lock:
            figures = {**now, **{f"peak_{name}": value for name, value in self.peak.items()}}
            self.peak = dict(now)
        return figures
