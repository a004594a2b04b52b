"""What one run trains with, as one object: TrainState (model, optimizer, LRA, best snapshot,
schedule, Lookahead, EMA, history, RunInfo), whose state_dict() last_checkpoint.pth holds."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

import distributed_module
import model_module
import utils
from callback_module import LRA
from optim_module import EMA, Lookahead, StepSchedule

KEYS = ("epoch", "model", "optimizer", "lra", "best", "schedule", "lookahead", "ema", "rng",
        "history")  # beside RunInfo's
# a checkpoint written before these existed lacks them, and resumes as a run without them
NEWER_KEYS = ("ema",)
PRECISIONS = ("bf16", "fp32")  # what a run trains in (RunInfo.precision)


@dataclasses.dataclass
class RunInfo:
    """What a run is, recorded in last_checkpoint.pth and (but config) best_model.json."""

    config: dict[str, Any]  # main.py's constants, by name, as the run set them
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    resize_size: int | None = None  # photo folders: the size images are stored at; None: CIFAR-10
    precision: str = "fp32"  # "bf16" or "fp32", chosen once (step_module.choose_precision)
    # when it started (checkpoint_module.timestamp()): its folder's name in previous/
    started: str | None = None
    tracker_run: str | None = None  # TRACKER's run id (MLflow's): a resume goes on with it


class Snapshot:
    """The best epoch's model, EMA (if kept), optimizer state (if a restore uses it), on device."""

    def __init__(self, with_optimizer: bool = True):
        self.with_optimizer = with_optimizer
        self.model: dict[str, torch.Tensor] | None = None
        self.optimizer: dict[str, Any] | None = None
        self.ema: dict[str, Any] | None = None  # EMA.state_dict()'s copy

    def take(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             ema: EMA | None = None) -> None:
        self.model = _clone(model.state_dict())
        if self.with_optimizer:
            self.optimizer = copy.deepcopy(optimizer.state_dict())
        averaged = None if ema is None else ema.state_dict()
        self.ema = None if averaged is None else {**averaged, "model": _clone(averaged["model"])}

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                ema: EMA | None = None) -> None:
        """Load the snapshot into the model (and the optimizer and the EMA, when given)."""
        model.load_state_dict(self.model)  # copies the values in
        # load_state_dict keeps the tensors it is given: training would change the snapshot
        if optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        if ema is not None and self.ema is not None:
            ema.load_state_dict(self.ema)  # copies the values in

    @property
    def weights(self) -> dict[str, torch.Tensor] | None:
        """What best_model.pth holds: best_weights of this snapshot."""
        return best_weights(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.model = None if state["model"] is None else _to(state["model"], device)
        self.optimizer = copy.deepcopy(state["optimizer"])  # the optimizer may load these tensors
        ema = state.get("ema")  # None: a run without an EMA, or a checkpoint from before EMA_DECAY
        self.ema = None if ema is None else {**ema, "model": _to(ema["model"], device)}


def best_weights(best: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """best_model.pth's weights from a Snapshot's state_dict(): the best epoch's EMA if kept
    (validation chose it by that), else its model state."""
    return best["ema"]["model"] if best.get("ema") is not None else best["model"]


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _to(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in state.items()}



@dataclasses.dataclass
class TrainState:
    """Everything a run trains with and a resume needs; best defaults to an empty Snapshot keeping
    optimizer state when LRA can go back to it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lra: LRA
    best: Snapshot | None = None
    schedule: StepSchedule | None = None
    lookahead: Lookahead | None = None
    ema: EMA | None = None  # the weights' moving average (EMA_DECAY), which validation and test see
    history: list[dict] = dataclasses.field(default_factory=list)  # a metrics row per epoch
    info: RunInfo | None = None

    def __post_init__(self) -> None:
        if self.best is None:
            self.best = Snapshot(with_optimizer=self.lra.restores)

    @property
    def evaluated_model(self) -> nn.Module:
        """What validation (hence the best epoch) and the test evaluate: the EMA's copy if kept."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def epoch(self) -> int:
        """The last finished epoch (0 before the first)."""
        return self.history[-1]["epoch"] if self.history else 0

    def state_dict(self) -> dict[str, Any]:
        """KEYS and RunInfo's fields, referring to the live tensors. Every process calls it
        together: it gathers each one's random state, so a resume continues each."""
        optional = {name: part.state_dict() if part is not None else None
                    for name, part in (("schedule", self.schedule), ("lookahead", self.lookahead),
                                       ("ema", self.ema))}
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lra": self.lra.state_dict(),
                "best": self.best.state_dict(), **optional,
                "rng": distributed_module.gather(utils.rng_state()), "history": list(self.history),
                **(dataclasses.asdict(self.info) if self.info is not None else {})}

    def load_state_dict(self, state: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
        """Continue exactly where state left off: weights, optimizer, LRA (and the body it unfroze),
        best snapshot, schedule, Lookahead, EMA, history, this process's random state."""
        self.model.load_state_dict(state["model"])
        self.lra.load_state_dict(state["lra"])
        if not self.lra.frozen:  # unfrozen in the saved run (the optimizer always held the body)
            model_module.unfreeze_body(self.model)
        self.best.load_state_dict(state["best"], next(self.model.parameters()).device)
        self.optimizer.load_state_dict(state["optimizer"])
        for part, name in ((self.schedule, "schedule"), (self.lookahead, "lookahead"),
                           (self.ema, "ema")):
            if part is not None and state.get(name):
                part.load_state_dict(state[name])
        self.history = list(state["history"])
        states = state["rng"]  # one per process of the saved run
        utils.set_rng_state(states[rank] if len(states) == world_size else states[0])
