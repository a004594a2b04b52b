"""The hand-written training loop: train_one_epoch, evaluate and fit, with their small helpers."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils
from callback_module import LRA

SCHEDULES = ("lra", "onecycle")
CHECK_EVERY = 50  # batches between checks for a non-finite loss (each check waits for the GPU once)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(f"the training loss became {value} at epoch {epoch}, batch {batch}")
        self.epoch, self.batch = epoch, batch


# --------------------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                   nesterov: bool = True, norm_lr_scale: float = 1.0) -> torch.optim.SGD:
    """SGD over the trainable parameters only. BatchNorm parameters get norm_lr_scale times the LR and
    weight decay divided by it, so their decay per step (lr x decay) is the same as the others'."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in norms], "lr": lr, "weight_decay": weight_decay}]
    norm_params = [p for p in trainable if id(p) in norms]
    if norm_lr_scale != 1.0 and norm_params:
        groups.append({"params": norm_params, "lr": lr * norm_lr_scale, "weight_decay": weight_decay / norm_lr_scale})
    else:
        groups[0]["params"] += norm_params
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup: float = 0.23) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None for "lra" (LRA drives the LR), else a per-step schedule: "onecycle" rises linearly from
    0.2x to 1x the LR over the warmup share of the steps, then falls linearly to 0.07x (airbench's shape)."""
    if schedule == "lra":
        return None
    if schedule != "onecycle":
        raise ValueError(f"SCHEDULE = {schedule!r} is not known; choose one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
        pct_start=warmup, anneal_strategy="linear", cycle_momentum=False, div_factor=5.0,
        final_div_factor=0.2 / 0.07)


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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 (or other) autocast on the given device, or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _show_progress() -> bool:
    return sys.stderr.isatty()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
                    epoch: int = 1, scheduler=None, lookahead: Lookahead | None = None,
                    autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One pass over the training data; returns train_loss and train_acc (over every process).
    Each step only queues work: losses and logits are tallied on the device every CHECK_EVERY steps,
    so the GPU never waits on Python."""
    model.train()
    device = next(model.parameters()).device
    totals = [torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device), 0]
    pending = ([], [], [])  # losses, logits, targets of the steps not yet tallied
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not _show_progress())
    check_every = CHECK_EVERY if bar.disable else 10  # a bar shows running figures, which costs a sync
    batch = 0
    for batch, (images, targets) in enumerate(loader, start=1):
        with _autocast(device, autocast_dtype):
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None and scheduler.last_epoch < scheduler.total_steps - 1:
            scheduler.step()  # the schedule holds its last LR if the user asked for more epochs
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
             tta: bool = False, num_classes: int | None = None) -> dict[str, float]:
    """Cross-entropy loss and accuracy of the model over a loader (over every process); with
    num_classes, also the accuracy of each class ("per_class")."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros(num_classes or 1, dtype=torch.int64, device=device)
    totals = torch.zeros(num_classes or 1, dtype=torch.int64, device=device)
    for images, targets in loader:
        with _autocast(device, autocast_dtype):
            logits = _tta_logits(model, images) if tta else model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        by_class = targets if num_classes else torch.zeros_like(targets)
        hits += torch.bincount(by_class[logits.argmax(1) == targets], minlength=len(hits))
        totals += torch.bincount(by_class, minlength=len(totals))
    counts = utils.all_reduce_sum(torch.cat([loss_sum[None].double(), hits.double(), totals.double()])).tolist()
    loss_sum, hits, totals = counts[0], counts[1:1 + len(hits)], counts[1 + len(hits):]
    result = {"loss": loss_sum / sum(totals), "acc": sum(hits) / sum(totals)}
    if num_classes:
        result["per_class"] = [h / t if t else float("nan") for h, t in zip(hits, totals)]
    return result


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities for a batch of normalised images."""
    model.eval()
    device = next(model.parameters()).device
    return model(images.to(device)).float().softmax(1).cpu()


# --------------------------------------------------------------------------- the run


def fit(model: nn.Module, data, optimizer: torch.optim.Optimizer, lra: LRA, *, epochs: int, loss_fn: nn.Module,
        output_dir: str = ".", wrap=None, scheduler=None, lookahead: Lookahead | None = None,
        autocast_dtype: torch.dtype | None = None, start_epoch: int = 1, history: list[dict] | None = None,
        run_info: dict | None = None, main_process: bool = True) -> list[dict]:
    """Train to `epochs` (or as far as the user asks at the prompt) unless LRA stops first; after each
    epoch save last_checkpoint.pth, best_model.pth on a new best, and the CSV; at the end (or on an
    interruption) draw training_curves.png. Ends holding the best weights.

    wrap(model) gives what runs the training batches (DistributedDataParallel, torch.compile); it is
    called again after the body is unfrozen, so its new parameters train on every process.
    run_info (constants, classes, normalisation) goes into the checkpoint and best_model.json.
    """
    wrap = wrap or (lambda m: m)
    train_model, fine_tuned = wrap(model), lra.fine_tuned
    history = list(history or [])
    lra.on_train_begin()
    epoch, reason = start_epoch, None
    try:
        while epoch <= max(epochs, lra.run_until):
            if lra.fine_tuned != fine_tuned:
                train_model, fine_tuned = wrap(model), lra.fine_tuned
            started = time.perf_counter()
            data.train.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            metrics = {"epoch": epoch, **train_one_epoch(train_model, data.train, optimizer, loss_fn, epoch=epoch,
                                                         scheduler=scheduler, lookahead=lookahead,
                                                         autocast_dtype=autocast_dtype)}
            utils.release_free_memory()
            val = evaluate(_unwrapped(train_model), data.val, autocast_dtype=autocast_dtype)
            utils.release_free_memory()
            metrics.update(val_loss=val["loss"], val_acc=val["acc"], lr=lr, seconds=time.perf_counter() - started)
            metrics = utils.broadcast(metrics)  # under torchrun, rank 0's figures decide for every process
            stop = lra.on_epoch_end(epoch, metrics)
            metrics.update(next_lr=optimizer.param_groups[0]["lr"], monitor=lra.phase, improved=lra.improved,
                           new_best=lra.new_best, event=lra.event)
            history.append(metrics)
            rng = utils.gather(utils.rng_state())  # every process's, so a resume continues each one
            if main_process:
                save_epoch(output_dir, model, optimizer, lra, history, scheduler=scheduler, lookahead=lookahead,
                           rng=rng, run_info=run_info or {})
            if stop:
                break
            epoch += 1
    except NonFiniteLoss as error:
        reason = f"{error}; stopped"
        raise
    except KeyboardInterrupt:
        reason = f"interrupted during epoch {epoch}"
        raise
    finally:
        lra.on_train_end(reason)
        if main_process and history:
            utils.plot_training_curves(history, os.path.join(output_dir, utils.CURVES))
    _check_agreement(model, history, main_process)
    return history


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel: evaluation needs no gradient sync, and shards of
    different sizes must not wait on each other."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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


def save_epoch(output_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, lra: LRA,
               history: list[dict], *, scheduler=None, lookahead: Lookahead | None = None,
               rng: list[dict], run_info: dict) -> None:
    """Write the epoch's files: last_checkpoint.pth first (the authority on resume), then best_model.pth
    when this epoch is a new best, then the CSV. Each is written atomically."""
    checkpoint = {"epoch": history[-1]["epoch"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lra": lra.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                  "lookahead": lookahead.state_dict() if lookahead else None, "rng": rng,
                  "history": history, "best_epoch": lra.best_epoch, "best_val_loss": lra.best_val_loss, **run_info}
    utils.save_torch(checkpoint, os.path.join(output_dir, utils.CHECKPOINT))
    if lra.new_best:
        utils.save_best_model(lra.best_weights, output_dir, run_info, epoch=lra.best_epoch,
                              val_loss=lra.best_val_loss, val_acc=lra.best_val_acc)
    utils.write_metrics(history, os.path.join(output_dir, utils.METRICS_CSV))
