"""Where a training step's time goes and how often it makes the host wait: the step's kernel table
under torch.profiler and its host synchronisations, for any MODEL and PRESET, on the CPU or CUDA;
with --fit, the synchronisations of a whole short `main.py` run too. Prints the figures and writes
them as JSON to --output.

    python benchmarks/profile_step.py --preset fast --steps 20 --output out/  # the fast preset
    python benchmarks/profile_step.py --preset fast --fit --epochs 2 --data-dir .device/cifar
    python benchmarks/profile_step.py --model cnn --steps 2 --batch-size 8       # seconds on a CPU

The step is built as main.py builds it, from main.py's constants after --preset and the flags here
(and --main-args): model_module.get_model in channels_last, make_optimizer (with the LR on the
device when the step is captured), step_module.TrainStep (replayed from a CUDA graph where
CUDA_GRAPHS allows, bf16 on CUDA with BF16), and what train_one_epoch runs after each step (the
one-cycle schedule, Lookahead); it trains on one random batch, after --warmup steps (the first of
which captures the graph). Not in it: the loader and train_one_epoch's tallies of the loss.

Synchronisations are counted two ways: operations that made the host wait for the device (what
torch.cuda.set_sync_debug_mode("warn") reports: .item(), a copy to pageable host memory, ...), and
explicit waits (calls of torch.cuda.synchronize and of a CUDA Event's or Stream's synchronize, which
that mode does not report), each by the project's call stack. A CPU has no device to synchronise
with: both count 0.
"""

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import main as pipeline  # noqa: E402
import model_module  # noqa: E402
import optim_module  # noqa: E402
import step_module  # noqa: E402
import utils  # noqa: E402

NUM_CLASSES = 10  # of the random targets (CIFAR-10's)
TABLE_ROWS = 20  # kernels (operations on a CPU) in the table, by self time
STACK_DEPTH = 4  # project frames that name where a synchronisation comes from, innermost first
SYNC_WARNING = "called a synchronizing CUDA operation"  # what set_sync_debug_mode("warn") warns


# ------------------------------------------------------------------------ counting synchronisations


@dataclasses.dataclass
class SyncCount:
    """Host synchronisations, by the project's call stack: operations that waited for the device
    (sync debug mode's warnings) and explicit waits (synchronize calls)."""

    waited: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    explicit: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def total(self) -> int:
        return sum(self.waited.values()) + sum(self.explicit.values())

    def as_dict(self) -> dict:
        return {"total": self.total(), "waited": sum(self.waited.values()),
                "explicit": sum(self.explicit.values()),
                "waited_by_stack": dict(self.waited.most_common()),
                "explicit_by_stack": dict(self.explicit.most_common())}


_COUNTER_FRAMES = {"_project_stack", "_on_warning", "_counted_call"}


def _project_stack() -> str:
    """Where the caller is, as the innermost STACK_DEPTH frames in the project's files:
    "file.py:line function <- ...", as the 2026-11-30 syncs.txt names them."""
    frames = [f for f in reversed(traceback.extract_stack()) if f.filename.startswith(ROOT + os.sep)
              # not a venv in ROOT
              and "site-packages" not in f.filename and f.name not in _COUNTER_FRAMES]
    return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in frames[
        :STACK_DEPTH])


@contextlib.contextmanager
def counting_syncs(device: torch.device):
    """Count the host's synchronisations with the device inside the block (a SyncCount). On CUDA it
    turns on torch.cuda.set_sync_debug_mode("warn") and catches its warnings (not printed); on any
    device it counts calls of torch.cuda.synchronize and of torch.cuda.Event's and Stream's
    synchronize made from Python."""
    count = SyncCount()
    shown = warnings.showwarning

    def _on_warning(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            count.waited[_project_stack()] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    def counted(function):
        @functools.wraps(function)
        def _counted_call(*args, **kwargs):
            count.explicit[_project_stack()] += 1
            return function(*args, **kwargs)
        return _counted_call

    waits = [(owner, name, getattr(owner, name))
             for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                                 (torch.cuda.Stream, "synchronize"))]
    with warnings.catch_warnings():  # puts showwarning and the filters back
        warnings.filterwarnings("always", message=SYNC_WARNING)  # every one, not once a line
        warnings.showwarning = _on_warning
        for owner, name, function in waits:
            setattr(owner, name, counted(function))
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            for owner, name, function in waits:
                setattr(owner, name, function)


def _synchronize(device: torch.device) -> None:
    """Wait for the device (outside the counted blocks), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the step


@dataclasses.dataclass
class Step:
    """One training step as train_one_epoch runs it (run: on a fixed random batch), and how it
    runs."""

    run: Callable[[], None]
    # its use_graph: whether the step is replayed from a CUDA graph
    train_step: step_module.TrainStep
    device: torch.device
    precision: str  # "bf16" or "fp32", as step_module.choose_precision chose it
    batch_size: int
    image_size: int


def make_step(values: dict, device: torch.device, total_steps: int) -> Step:
    """The step main.py would train with under these constants (main.parse_config's), on random
    data."""
    config = pipeline.build_config(values)
    run = config.run
    utils.seed_everything(config.data.seed)
    torch.backends.cudnn.benchmark = True  # as run_module.setup
    size, batch = config.data.image_size, config.data.batch_size
    model = model_module.get_model(run.model, NUM_CLASSES, freeze=run.freeze, image_size=size,
                                   sample_images=lambda n: torch.randn(min(n, 512), 3, size, size))
    memory_format = torch.channels_last if config.data.channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    graph = step_module.use_cuda_graph(run.cuda_graphs, device, compile=config.fit.compile)
    optimizer = optim_module.make_optimizer(model, config.optim,
                                            lr_device=device if graph else None)
    schedule = optim_module.make_schedule(optimizer, config.optim.schedule, config.optim.lr,
                                          total_steps)
    lookahead = optim_module.Lookahead(model, total_steps) if config.optim.lookahead else None
    precision = step_module.choose_precision(run.bf16, device, model, size,
                                             channels_last=config.data.channels_last, trial=False)
    wrapped = step_module.wrap_for_training(model, compile=config.fit.compile)
    step = step_module.TrainStep(
        wrapped, optimizer, nn.CrossEntropyLoss(label_smoothing=config.fit.label_smoothing),
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None, graph=graph)
    model.train()
    images = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=memory_format)
    targets = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def run() -> None:
        step(images, targets)
        if schedule is not None:
            schedule.advance(optimizer)
        if lookahead is not None:
            lookahead.update()
    return Step(run, step, device, precision, batch, size)


def kernel_table(step: Step, n: int) -> tuple[str, list[dict]]:
    """torch.profiler's table of n steps, the top TABLE_ROWS by self device time (self CPU time on a
    CPU), and its rows as dicts (times in microseconds)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if step.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(n):
            step.run()
        _synchronize(step.device)
    on_device = step.device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    averages = profile.key_averages()
    table = averages.table(sort_by=key, row_limit=TABLE_ROWS)
    rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:TABLE_ROWS]
    return table, [{"name": e.key, "calls": e.count, "self_us": round(getattr(e, key), 1),
                    "self_cpu_us": round(e.self_cpu_time_total, 1)} for e in rows]


def counted_pass(step: Step, n: int) -> tuple[SyncCount, float]:
    """The synchronisations of n warm steps, and their wall time per step in milliseconds."""
    _synchronize(step.device)
    started = time.perf_counter()
    with counting_syncs(step.device) as count:
        for _ in range(n):
            step.run()
    _synchronize(step.device)
    return count, 1000 * (time.perf_counter() - started) / n


# --------------------------------------------------------------------------- a whole run


def count_fit(flags: list[str], device: torch.device) -> dict:
    """The synchronisations of one whole `main.py FLAGS` run in this process, after one uncounted
    run (the CUDA context, cuDNN's choices and the data read once, as a warm run finds them)."""
    for counted in (False, True):
        out = tempfile.mkdtemp(prefix="profile_fit_")
        try:
            with counting_syncs(device) if counted else contextlib.nullcontext(
                    SyncCount()) as count:
                started = time.perf_counter()
                outcome = pipeline.run_main([*flags, "--output-dir", out])
                seconds = time.perf_counter() - started
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if outcome.status != 0:
            raise SystemExit(f"main.py {' '.join(flags)} exited with status {outcome.status}")
    return {"flags": flags, "status": outcome.status, "epochs": len(outcome.history),
            "run_seconds": round(seconds, 2), "fit_seconds": round(outcome.fit_seconds, 3),
            "test_acc": outcome.test and outcome.test["acc"], "syncs": count.as_dict(),
            "count": count}


# --------------------------------------------------------------------------- report


def _print_syncs(what: str, count: SyncCount, device: torch.device) -> None:
    if device.type != "cuda":
        print(f"host synchronisations in {what}: 0 (on the CPU there is no device to "
              "synchronise with)")
        return
    print(f"host synchronisations in {what}: {count.total()} ({sum(count.waited.values())} "
          f"operations that waited, {sum(count.explicit.values())} explicit waits)")
    for kind, counter in (("waited", count.waited), ("explicit", count.explicit)):
        for stack, n in counter.most_common(15):
            print(f"  {n:>6}  {kind:<8}  {stack}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fast", help="MODEL (default fast)")
    parser.add_argument("--preset", default=None, choices=[None, *pipeline.PRESETS],
                        type=lambda v: None if v.lower() == "none" else v,
                        help="PRESET (default none): its constants as main.py applies them "
                             "(batch size, ...)")
    parser.add_argument("--batch-size", type=int,
                        help="BATCH_SIZE (default: the preset's, else main.py's)")
    parser.add_argument("--image-size", type=int,
                        help="IMAGE_SIZE (default: main.py's, 32 for our models)")
    parser.add_argument("--steps", type=int, default=20,
                        help="warm steps profiled, and as many counted")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps first (the first captures a CUDA graph)")
    parser.add_argument("--fit", action="store_true",
                        help="also count a whole main.py run's synchronisations")
    parser.add_argument("--epochs", type=int, default=2, help="EPOCHS of the --fit run")
    parser.add_argument("--data-dir", default="./data", help="DATA_DIR of the --fit run")
    parser.add_argument("--main-args", default="",
                        help="more main.py flags, for the step and the --fit run")
    parser.add_argument("--output", help="a folder for the JSON (and the table as text)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")

    flags = ["--model", args.model, *(["--preset", args.preset] if args.preset else [])]
    flags += [*(["--batch-size", str(args.batch_size)] if args.batch_size else []),
              *(["--image-size", str(args.image_size)] if args.image_size else []),
              *args.main_args.split()]
    values, _ = pipeline.parse_config(flags)
    device = utils.get_device()
    step = make_step(values, device, total_steps=args.warmup + 2 * args.steps)
    for _ in range(args.warmup):
        step.run()
    _synchronize(device)
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"the CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    graph = "yes" if step.train_step.use_graph else "no"
    print(f"profile_step: {values['MODEL']}, preset {args.preset}, on {where} | batch "
          f"{step.batch_size} of {step.image_size} px | {step.precision} | CUDA graph: {graph} | "
          f"{args.warmup} warm-up steps")

    count, step_ms = counted_pass(step, args.steps)
    print(f"step: {step_ms:.3f} ms ({args.steps} warm steps, profiler off)")
    _print_syncs(f"{args.steps} warm steps", count, device)
    table, rows = kernel_table(step, args.steps)
    by = "self CUDA time" if device.type == "cuda" else "self CPU time"
    print(f"kernel table: top {TABLE_ROWS} by {by} over {args.steps} warm steps")
    print(table)

    report = {"device": where, "model": values["MODEL"], "preset": args.preset, "flags": flags,
              "batch_size": step.batch_size, "image_size": step.image_size,
              "precision": step.precision, "cuda_graph": step.train_step.use_graph,
              "warmup": args.warmup, "steps": args.steps, "step_ms": round(step_ms, 3),
              "step_syncs": count.as_dict(), "table_by": by, "table": rows}
    if args.fit:
        fit_flags = [*flags, "--epochs", str(args.epochs), "--data-dir", args.data_dir,
                     "--ask-epoch", "none"]
        print(f"whole run: main.py {' '.join(fit_flags)} (counted after one uncounted run)",
              flush=True)
        fit = count_fit(fit_flags, device)
        print(f"whole run: status {fit['status']}, {fit['epochs']} epochs, fit "
              f"{fit['fit_seconds']:.2f} s, test accuracy {fit['test_acc']:.4f}")
        _print_syncs("the whole run", fit.pop("count"), device)
        report["fit"] = fit
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        name = f"profile_step_{values['MODEL']}_{args.preset or 'nopreset'}_{device.type}"
        with open(os.path.join(args.output, name + ".json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.output, name + ".txt"), "w") as f:
            f.write(table + "\n")
        print(f"wrote {os.path.join(args.output, name)}.json and .txt")


if __name__ == "__main__":
    main()
