"""The hand-written training loop: train_one_epoch, evaluate and fit, with their small helpers."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoint_module
import distributed_module
import messages_module
import model_module
import step_module
import utils
from callback_module import Decision
from optim_module import EMA, Lookahead, StepSchedule, get_lr, set_lr
from state_module import TrainState
from step_module import TrainStep, autocast

CHECK_EVERY = 50  # batches between checks for a non-finite loss (each check waits for the GPU once)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(f"the training loss became {value} at epoch {epoch}, batch {batch}")


def _show_progress() -> bool:
    return sys.stderr.isatty()


def train_one_epoch(step: TrainStep, loader: Iterable, *, epoch: int = 1,
                    schedule: StepSchedule | None = None, lookahead: Lookahead | None = None,
                    ema: EMA | None = None,
                    check: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over the data with this step (kept across epochs, it keeps its CUDA graph):
    train_loss and train_acc over every process. With step.accumulate > 1, each group of that many
    batches (the last holds what is left) takes one optimizer step, then schedule, Lookahead, EMA in
    turn. Tallied on the device every CHECK_EVERY batches, so the GPU never waits on Python. check()
    runs before each batch (the epoch writer's: it raises a failed write's error)."""
    step.model.train()
    device = step.device
    step.new_epoch()
    totals = [torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device), 0]
    pending = ([], [], [])  # losses, logits, targets of the steps not yet tallied
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=not _show_progress())
    check_every = CHECK_EVERY if bar.disable else 10  # a bar's running figures cost a sync
    batch, batches = 0, len(loader)
    for batch, (images, targets) in enumerate(loader, start=1):
        if check is not None:
            check()
        index, group = step_module.micro_batch(batch, batches, step.accumulate)
        loss, logits = step(images, targets, index=index, group=group)
        if index == group - 1:  # the group's optimizer step was taken
            if schedule is not None:
                schedule.advance(step.optimizer)
            if lookahead is not None:
                lookahead.update()
            if ema is not None:
                ema.update()
        for store, value in zip(pending, (loss.detach(), logits.detach(), targets)):
            store.append(value)
        if batch % check_every == 0:
            _tally(pending, totals, epoch, batch)
            if not bar.disable:
                bar.set_postfix(loss=f"{totals[0].item() / totals[2]:.4f}",
                                acc=f"{totals[1].item() / totals[2]:.2%}")
        bar.update()
    bar.close()
    _tally(pending, totals, epoch, batch)
    loss_sum, correct, seen = _sum_over_processes(*totals)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen}


def _tally(pending: tuple[list, list, list], totals: list, epoch: int, last_batch: int) -> None:
    """Add pending steps' loss sum, hits and size to totals; NonFiniteLoss names the first batch
    whose loss is not finite."""
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
    classes = torch.cat(targets)
    if classes.ndim == 2:  # soft targets (Mixup, CutMix): a hit when argmax is their largest class
        classes = classes.argmax(1)
    totals[1] += (torch.cat(logits).argmax(1) == classes).sum()
    totals[2] += sum(sizes)
    for store in pending:
        store.clear()


def _sum_over_processes(loss_sum: torch.Tensor, correct: torch.Tensor,
                        seen: int) -> tuple[float, float, float]:
    """Read the device accumulators once (summed over torchrun processes) as Python floats."""
    totals = torch.stack(
        [loss_sum.float(), correct.float(), torch.tensor(float(seen), device=loss_sum.device)])
    return tuple(distributed_module.all_reduce_sum(totals.double()).tolist())


def _tta_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean logits over image and mirror, unshifted and shifted a pixel up-left and down-right
    (airbench's TTA level 2)."""
    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(x) + 0.5 * model(x.flip(-1))
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:])
    return 0.5 * mirrored(images) + 0.25 * shifted


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, autocast_dtype: torch.dtype | None = None,
             tta: bool = False, num_classes: int | None = None,
             collect: bool = False) -> dict[str, Any]:
    """Cross-entropy loss and accuracy over a loader (every process); with num_classes, also
    "confusion" (counts, rows the true class) and class_scores' figures; with collect (needs
    num_classes), "mistakes": the MISTAKES most confident wrong predictions, most confident
    first."""
    if collect and not num_classes:
        raise ValueError("evaluate(collect=True) needs num_classes")
    model.eval()
    device = next(model.parameters()).device
    loss_sum, hits = torch.zeros((), device=device), torch.zeros((), device=device)
    # true x C + predicted; one cell without num_classes: the image count
    confusion = torch.zeros((num_classes or 1) ** 2, dtype=torch.int64, device=device)
    mistakes = _MostConfidentMistakes(MISTAKES)
    first_size = None
    for images, targets in loader:
        first_size = first_size or len(images)
        with autocast(device, autocast_dtype), step_module.autotuned(len(images) == first_size):
            logits = _tta_logits(model, images) if tta else model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        predicted = logits.argmax(1)
        hits += (predicted == targets).sum()
        cells = targets * num_classes + predicted if num_classes else torch.zeros_like(targets)
        confusion += torch.bincount(cells, minlength=len(confusion))
        if collect:
            mistakes.add(images, logits, targets)
    counts = distributed_module.all_reduce_sum(
        torch.cat([loss_sum[None].double(), hits[None].double(), confusion.double()]))
    seen = counts[2:].sum().item()
    result = {"loss": counts[0].item() / seen, "acc": counts[1].item() / seen}
    if num_classes:
        result["confusion"] = counts[2:].long().view(num_classes, num_classes).cpu()
        result.update(class_scores(result["confusion"]))
    if collect:
        result["mistakes"] = mistakes.result()
    return result


def class_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """From a confusion matrix (rows the true class): each class's recall ("per_class", NaN with no
    images), their mean over classes with images ("balanced_acc", scikit-learn's), and the mean F1
    over classes seen or predicted ("macro_f1", as report_module.classification_report)."""
    counts = confusion.double()
    hits, support, predicted = counts.diag(), counts.sum(1), counts.sum(0)
    recall, f1 = hits / support, 2 * hits / (support + predicted)  # 0 / 0: NaN, left out
    return {"per_class": recall.tolist(), "balanced_acc": recall.nanmean().item(),
            "macro_f1": f1.nanmean().item()}


MISTAKES = 25  # wrong predictions evaluate(collect=True) keeps for the gallery (misclassified.png)


@dataclasses.dataclass
class Mistake:
    """A wrong prediction: the image as the model saw it (normalised, C x H x W, on the CPU), its
    true and predicted class indices, and the probability the model gave the predicted class."""

    image: torch.Tensor
    target: int
    predicted: int
    probability: float


class _MostConfidentMistakes:
    """A running top-k of the wrong predictions by the predicted class's probability, kept on the
    device: k images at most, never the whole set, and no wait for the device per batch."""

    def __init__(self, k: int):
        self.k = k
        # probabilities, images, targets, predictions
        self.kept: tuple[torch.Tensor, ...] | None = None

    def add(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        probability, predicted = logits.float().softmax(1).max(1)
        score = torch.where(predicted != targets, probability, -1.0)  # right answers rank last
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
            mine = [Mistake(image, target, prediction, probability)
                    for probability, image, target, prediction
                    in zip(probabilities.tolist(), images.cpu(), targets.tolist(),
                           predicted.tolist())
                    if probability >= 0]
        everyone = [m for mistakes in distributed_module.gather(mine) for m in mistakes]
        return sorted(everyone, key=lambda m: -m.probability)[:self.k]


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities for a batch of normalised images."""
    model.eval()
    device = next(model.parameters()).device
    return model(images.to(device)).float().softmax(1).cpu()


def apply_decision(decision: Decision, state: TrainState) -> None:
    """LRA's decision: keep a new best, restore it (weights, optimizer, EMA), unfreeze, set LR."""
    if decision.new_best:
        state.best.take(state.model, state.optimizer, state.ema)
    if decision.restore:
        state.best.restore(state.model, state.optimizer, state.ema)
    if decision.unfreeze:
        model_module.unfreeze_body(state.model)  # the optimizer holds them already (make_optimizer)
    if decision.next_lr is not None:
        set_lr(state.optimizer, decision.next_lr)


# --------------------------------------------------------------------------- the run


# CLASS_WEIGHTS: equal, or scikit-learn's "balanced" (balanced_class_weights)
CLASS_WEIGHTS = (None, "balanced")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How fit trains: fields up to clip_grad_norm are main.py's constants of those names in upper
    case; the rest are what setup finds out."""

    epochs: int
    output_dir: str
    label_smoothing: float
    compile: bool  # torch.compile what runs the training batches
    accumulate_steps: int
    clip_grad_norm: float | None
    # the training loss's weight of each class; None: equal (validation and test losses never are)
    class_weights: tuple[float, ...] | None = None
    autocast_dtype: torch.dtype | None = None
    cuda_graph: bool = False  # replay the step as a CUDA graph (needs make_optimizer's lr_device)
    world_size: int = 1  # processes under torchrun: the model runs data-parallel when more than one
    main_process: bool = True  # the one that writes the files

    def __post_init__(self) -> None:
        messages_module.check_fields(self, RULES)


RULES: messages_module.Rules = {
    "epochs": (lambda v: v >= 1, "a whole number >= 1"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "class_weights": (lambda v: v is None or all(0 < w < math.inf for w in v),
                      "finite numbers > 0, or None"),
    "accumulate_steps": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "clip_grad_norm": (lambda v: v is None or v > 0, "a number > 0, or None"),
}


def balanced_class_weights(counts: Sequence[int], classes: Sequence[str]) -> tuple[float, ...]:
    """scikit-learn's "balanced" weights: class c weighs n / (classes x count_c): each adds to the
    loss as in a balanced split. ValueError (CLASS_WEIGHTS) for an empty class (infinite weight)."""
    if len(counts) != len(classes):
        raise ValueError(f"{len(counts)} class counts for {len(classes)} classes")
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise ValueError("CLASS_WEIGHTS = 'balanced' needs training images of every class, and "
                         f"{empty[0]!r} has none after VAL_SPLIT and TRAIN_SUBSET; give it images, "
                         "or set CLASS_WEIGHTS to None")
    n = sum(counts)
    return tuple(n / (len(counts) * count) for count in counts)


def training_loss(config: FitConfig) -> nn.CrossEntropyLoss:
    """Cross-entropy with config's label smoothing and class weights, on the CPU (move it to the
    model's device). With probabilities (Mixup, CutMix) and weights the mean is over images; with
    class indices, over their classes' weights."""
    weight = (None if config.class_weights is None
              else torch.tensor(config.class_weights, dtype=torch.float32))
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def fit(state: TrainState, data, config: FitConfig, *, loss_fn: nn.Module | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        account: utils.TimeAccount | None = None) -> list[dict]:
    """Train from the epoch after state's last to config.epochs (or as the prompt asks) unless LRA
    stops first, applying its decisions and writing each epoch's files as the next trains; however
    it ends, the model (and EMA) holds the best epoch's. loss_fn None: training_loss(config);
    on_epoch(row) after each epoch; account: this thread's seconds training, validating, writing."""
    loss_fn = loss_fn or training_loss(config).to(next(state.model.parameters()).device)
    account = account or utils.TimeAccount(time.perf_counter())
    step = _make_step(state, config, loss_fn, config.cuda_graph)
    writer = (checkpoint_module.EpochWriter(config.output_dir, state.lra.best_epoch)
              if config.main_process else None)
    state.lra.on_train_begin()
    epoch, reason = state.epoch + 1, None
    try:
        while epoch <= state.lra.epoch_limit(config.epochs):
            metrics = _train_and_validate(step, data, epoch, state,
                                          writer.check if writer else None)
            decision = state.lra.on_epoch_end(epoch, metrics)
            apply_decision(decision, state)
            if decision.unfreeze:  # new trainable parameters: wrapped (and captured) again
                step = _make_step(state, config, loss_fn, step.use_graph)
            state.history.append({**metrics, "next_lr": get_lr(state.optimizer), **decision.row()})
            account.add("training", metrics["train_seconds"])
            account.add("validation", metrics["seconds"] - metrics["train_seconds"])
            with account.timed("epoch files"):
                checkpoint = state.state_dict()  # every process: it gathers their random states
                if writer is not None:  # written while the next epoch trains
                    writer.save(checkpoint, new_best=decision.new_best)
            if writer is not None and on_epoch is not None:
                on_epoch(state.history[-1])
            if decision.stop:
                break
            epoch += 1
        with account.timed("epoch files"):
            if writer is not None:
                writer.wait()  # last epoch's files on disk (or its error raised) before fit returns
    except BaseException as error:  # what ended training early: the reason in LRA's closing line
        reason = (f"interrupted during epoch {epoch}" if isinstance(error, KeyboardInterrupt)
                  else f"{error}; stopped")
        raise
    finally:
        if writer is not None:
            writer.wait(raise_error=False)  # interrupted: the write in flight still lands
        if state.best.model is not None:
            state.best.restore(state.model, ema=state.ema)
        state.lra.on_train_end(reason,
                               writer.landed[checkpoint_module.BEST_MODEL] if writer else -1)
    _check_agreement([state.model] + ([state.ema.module] if state.ema is not None else []),
                     state.history, config.main_process)
    return state.history


def _make_step(state: TrainState, config: FitConfig, loss_fn: nn.Module, graph: bool) -> TrainStep:
    """The training step over the model, compiled and/or data-parallel as asked."""
    model = step_module.wrap_for_training(state.model, compile=config.compile,
                                          world_size=config.world_size,
                                          device=next(state.model.parameters()).device)
    return TrainStep(model, state.optimizer, loss_fn, autocast_dtype=config.autocast_dtype,
                     graph=graph, accumulate=config.accumulate_steps,
                     clip_grad_norm=config.clip_grad_norm)


def _train_and_validate(step: TrainStep, data, epoch: int, state: TrainState,
                        check: Callable[[], None] | None) -> dict[str, Any]:
    """One epoch: train (check() before each step), then validate (val_loss and val_acc None without
    validation images); the metrics are rank 0's under torchrun."""
    started = time.perf_counter()
    data.train.set_epoch(epoch)
    lr = get_lr(state.optimizer)
    metrics = {"epoch": epoch,
               **train_one_epoch(step, data.train, epoch=epoch, schedule=state.schedule,
                                 lookahead=state.lookahead, ema=state.ema, check=check)}
    trained = time.perf_counter()  # train_one_epoch ends by reading the device, so the time is real
    distributed_module.share_buffers(state.model, state.evaluated_model)
    # the EMA, with one
    val = (dict.fromkeys(("loss", "acc", "macro_f1", "balanced_acc")) if data.val is None
           else evaluate(state.evaluated_model, data.val, autocast_dtype=step.autocast_dtype,
                         num_classes=len(data.classes)))
    metrics.update(val_loss=val["loss"], val_acc=val["acc"], macro_f1=val["macro_f1"],
                   balanced_acc=val["balanced_acc"], lr=lr, seconds=time.perf_counter() - started,
                   train_seconds=trained - started)
    return distributed_module.broadcast(metrics)  # rank 0's figures decide for every process


def _check_agreement(models: list[nn.Module], history: list[dict], main_process: bool) -> None:
    """Under torchrun, check all processes made the same LR decisions and end with equal weights
    (model and EMA)."""
    if not distributed_module.is_distributed():
        return
    with torch.no_grad():
        checksum = [float(sum(p.double().sum() for p in model.parameters())) for model in models]
    states = distributed_module.gather(
        ([(row["epoch"], row["next_lr"], row["event"]) for row in history], checksum))
    if main_process:
        agree = all(state == states[0] for state in states)
        print(f"LR decisions and weights {'agreed' if agree else 'DIFFERED'} on all {len(states)} "
              f"processes{'' if agree else ': ' + repr(states)}",
              file=sys.stdout if agree else sys.stderr)
