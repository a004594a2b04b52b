"""LRA, the learning-rate adjuster: cuts the LR when training stalls, restores the best weights,
stops early and asks the user whether to go on. Specified in ../shared/docs/LRA.md."""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any, Callable

import torch

import model_module

PROMPT_FINE_TUNE = ("Enter H to halt, F to fine-tune (unfreeze the frozen layers), or a number N to train N "
                    "more epochs before asking again: ")
PROMPT = "Enter H to halt or a number N to train N more epochs before asking again: "
STATE_KEYS = ("bad_epochs", "cuts", "best_val_loss", "best_val_acc", "best_train_acc", "best_epoch", "phase",
              "ask_epoch", "ask_every", "prompts_off", "run_until", "fine_tuned")
HEADER = (f"{'Epoch':>5} | {'Loss':>7} | {'Accuracy':>8} | {'V_loss':>7} | {'V_acc':>7} | {'LR':>9} | "
          f"{'Next LR':>9} | {'Monitor':<9} | {'% Improv':>8} | {'Duration':>8}")


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def relative_change(value: float, best: float | None, higher_is_better: bool) -> float | None:
    """Improvement of value over the previous best, in percent (positive is better); None when there is
    no previous best or it is zero."""
    if best is None or not math.isfinite(best) or best == 0 or not math.isfinite(value):
        return None
    change = (value - best) if higher_is_better else (best - value)
    return 100 * change / abs(best)


class LRA:
    """The learning-rate adjuster. Call on_epoch_end(epoch, metrics) after every epoch; True means stop.

    After each call: `new_best` (this epoch has the lowest validation loss so far), `improved` (the
    monitored metric improved), `best_epoch`, `event` (what LRA did) and, once stopped, `stop_reason`.
    With adjust_lr=False (a fixed LR schedule drives the LR) LRA keeps the best weights and asks, but
    never cuts the LR or stops on its own. unfreeze_epoch does what F at the prompt does, after that epoch.
    Under torchrun every process runs LRA on the same metrics; `share` gives them rank 0's prompt answers.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, patience: int = 1,
                 stop_patience: int = 3, threshold: float = 0.9, factor: float = 0.5, dwell: bool = True,
                 ask_epoch: int | None = 5, min_lr: float = 0.0, min_delta: float = 0.0, *,
                 adjust_lr: bool = True, unfreeze_epoch: int | None = None, main_process: bool = True,
                 share: Callable[[Any], Any] | None = None, stream=None):
        _check("patience", patience, isinstance(patience, int) and patience >= 1, "a whole number >= 1")
        _check("stop_patience", stop_patience, isinstance(stop_patience, int) and stop_patience >= 1,
               "a whole number >= 1")
        _check("threshold", threshold, 0 <= threshold <= 1, "a fraction from 0 to 1")
        _check("factor", factor, 0 < factor < 1, "a number strictly between 0 and 1")
        _check("ask_epoch", ask_epoch, ask_epoch is None or (isinstance(ask_epoch, int) and ask_epoch >= 1),
               "a whole number >= 1, or None to never ask")
        _check("min_lr", min_lr, min_lr >= 0, "a number >= 0")
        _check("min_delta", min_delta, min_delta >= 0, "a number >= 0")
        _check("unfreeze_epoch", unfreeze_epoch, unfreeze_epoch is None or unfreeze_epoch >= 1,
               "a whole number >= 1, or None")
        self.unfreeze_epoch = unfreeze_epoch
        self.model, self.optimizer = model, optimizer
        self.patience, self.stop_patience, self.threshold, self.factor = patience, stop_patience, threshold, factor
        self.dwell, self.min_lr, self.min_delta, self.adjust_lr = dwell, min_lr, min_delta, adjust_lr
        self.main_process, self.share, self.stream = main_process, share, stream

        self.bad_epochs = 0          # bad epochs in a row since the last improvement or cut
        self.cuts = 0                # LR cuts in a row with no improvement in between
        self.best_val_loss = math.inf
        self.best_val_acc: float | None = None
        self.best_train_acc = -math.inf
        self.best_epoch: int | None = None
        self.phase = "train_acc"     # the monitored metric: train_acc below threshold, val_loss at or above
        self.ask_epoch, self.ask_every = ask_epoch, ask_epoch
        self.prompts_off = False
        self.run_until = 0           # the user asked to train at least to this epoch
        self.fine_tuned = False
        self._best_model: dict[str, torch.Tensor] | None = None
        self._best_optimizer: dict[str, Any] | None = None

        self.new_best = self.improved = False
        self.change: float | None = None
        self.event = ""
        self.stop_reason: str | None = None
        self._started = time.perf_counter()

    # ----------------------------------------------------------------------- the epoch decision

    def on_train_begin(self) -> None:
        """Print the table's header and start the clock."""
        self._started = time.perf_counter()
        self._print(HEADER)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record the epoch, cut the LR / restore / stop as LRA.md says, print its row, ask when due.
        Returns True when training should stop."""
        train_acc, val_loss = float(metrics["train_acc"]), float(metrics["val_loss"])
        lr = self.optimizer.param_groups[0]["lr"]
        events = []

        # 1. Best weights: lowest validation loss, whatever the phase.
        previous_val_loss, previous_train_acc = self.best_val_loss, self.best_train_acc
        self.new_best = val_loss < self.best_val_loss - self.min_delta
        if self.new_best:
            self.best_val_loss, self.best_val_acc, self.best_epoch = val_loss, float(metrics["val_acc"]), epoch
            self._snapshot()
            events.append("best")
        # 2. The monitored metric and whether it improved on its own best; both bests always tracked.
        acc_improved = train_acc > self.best_train_acc + self.min_delta
        if acc_improved:
            self.best_train_acc = train_acc
        self.phase = "train_acc" if train_acc < self.threshold else "val_loss"
        if self.phase == "train_acc":
            self.improved, self.change = acc_improved, relative_change(train_acc, previous_train_acc, True)
        else:
            self.improved, self.change = self.new_best, relative_change(val_loss, previous_val_loss, False)
        # 3-4. Reset on improvement; on the patience-th bad epoch cut the LR (after going back to the best).
        if self.improved:
            self.bad_epochs = self.cuts = 0
        elif self.adjust_lr:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                new_lrs = [max(group["lr"] * self.factor, self.min_lr) for group in self.optimizer.param_groups]
                if self.dwell and self._best_model is not None and not self.new_best:
                    self._restore()
                    events.append(f"restored epoch {self.best_epoch}")
                for group, new_lr in zip(self.optimizer.param_groups, new_lrs):
                    group["lr"] = new_lr
                self.bad_epochs, self.cuts = 0, self.cuts + 1
                events.append("LR cut")
        # 5. Stop after stop_patience cuts with no improvement in between.
        stop = self.adjust_lr and self.cuts >= self.stop_patience
        if stop:
            self.stop_reason = (f"{self.cuts} LR cuts in a row with no improvement of {self.phase} "
                                f"(STOP_PATIENCE = {self.stop_patience})")
            events.append("stop")
        if epoch == self.unfreeze_epoch and not stop and model_module.frozen_parameters(self.model):
            self._fine_tune()  # as F at the prompt does
            events.append("unfroze the body")
        self.event = ", ".join(events)
        # 6. The row.
        self._print_row(epoch, metrics, lr, self.optimizer.param_groups[0]["lr"])
        # 7. The question.
        if not stop and self.ask_epoch is not None and not self.prompts_off and epoch >= self.ask_epoch:
            stop = self._ask(epoch)
        return stop

    def on_train_end(self, reason: str | None = None) -> None:
        """Load the best weights, whatever ended training, and say where they came from and why it ended."""
        if reason and not self.stop_reason:
            self.stop_reason = reason
        elapsed = time.perf_counter() - self._started
        if self._best_model is None:
            self._print(f"Training ended ({self.stop_reason or 'no epoch completed'}) after {elapsed:.1f} s; "
                        f"no epoch finished with a finite validation loss, so no best weights to restore.")
            return
        self.model.load_state_dict(self._best_model)
        self._print(f"Training ended: {self.stop_reason or 'the epoch limit was reached'}. Restored the best "
                    f"weights, from epoch {self.best_epoch} (validation loss {self.best_val_loss:.4f}, "
                    f"accuracy {100 * self.best_val_acc:.2f}%). Elapsed {elapsed:.1f} s.")

    @property
    def best_weights(self) -> dict[str, torch.Tensor] | None:
        """The model state of the best epoch (what best_model.pth holds)."""
        return self._best_model

    # ----------------------------------------------------------------------- asking the user

    def _ask(self, epoch: int) -> bool:
        decision = self._prompt(epoch) if self.main_process else None
        if self.share is not None:
            decision = self.share(decision)  # under torchrun, rank 0's answer for every rank
        kind = decision[0]
        if kind == "halt":
            self.stop_reason = decision[1]
            return True
        if kind == "more":
            self.ask_epoch = epoch + decision[1]
            self.run_until = max(self.run_until, self.ask_epoch)
        elif kind == "fine_tune":
            self._fine_tune()
            self.ask_epoch = epoch + self.ask_every
            self._print(f"Unfroze the body at LR {self.optimizer.param_groups[0]['lr']:.3g}; asking again "
                        f"after epoch {self.ask_epoch}.")
        else:  # "eof" or "off": stop asking, go on to the configured number of epochs
            self.prompts_off = True
        return False

    def _prompt(self, epoch: int) -> tuple:
        """Ask on the terminal until the answer is one LRA accepts; never calls input() without one."""
        if not _stdin_is_terminal():
            self._print("Standard input is not a terminal: prompts are off; training goes on to EPOCHS.")
            return ("off",)
        can_fine_tune = bool(model_module.frozen_parameters(self.model))
        while True:
            try:
                answer = input(PROMPT_FINE_TUNE if can_fine_tune else PROMPT).strip()
            except EOFError:
                self._print("\nEnd of input: no more questions; training goes on to EPOCHS.")
                return ("eof",)
            except KeyboardInterrupt:
                self._print("")
                return ("halt", f"halted with Ctrl-C at the prompt after epoch {epoch}")
            if answer.lower() == "h":
                return ("halt", f"halted by the user after epoch {epoch}")
            if answer.lower() == "f" and can_fine_tune:
                return ("fine_tune",)
            if answer.isascii() and answer.isdigit() and int(answer) > 0:
                return ("more", int(answer))
            offered = "H, F" if can_fine_tune else "H"
            self._print(f"{answer!r} is not accepted: enter {offered}, or a whole number of epochs above 0.")

    def _fine_tune(self) -> None:
        """Unfreeze the frozen layers, give them to the optimizer at the current LR, reset the counts."""
        thawed = model_module.unfreeze_body(self.model)
        if thawed:
            self.optimizer.add_param_group({"params": thawed, "lr": self.optimizer.param_groups[0]["lr"]})
            if self._best_optimizer is not None:  # a later dwell restores every group, the new one included
                self._best_optimizer["param_groups"].append(
                    copy.deepcopy(self.optimizer.state_dict()["param_groups"][-1]))
        self.bad_epochs = self.cuts = 0
        self.fine_tuned = True

    # ----------------------------------------------------------------------- snapshots and state

    def _snapshot(self) -> None:
        self._best_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.dwell and self.adjust_lr:  # only a dwell ever goes back to the optimizer's state
            self._best_optimizer = copy.deepcopy(self.optimizer.state_dict())

    def _restore(self) -> None:
        self.model.load_state_dict(self._best_model)
        self.optimizer.load_state_dict(self._best_optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Everything LRA needs to make the same decisions after a resume (loads with weights_only)."""
        state = {key: getattr(self, key) for key in STATE_KEYS}
        state["lrs"] = [group["lr"] for group in self.optimizer.param_groups]
        state["best_model"], state["best_optimizer"] = self._best_model, self._best_optimizer
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore LRA's state. Call before loading the optimizer's state: a fine-tuned run's state adds
        the unfrozen layers' parameter group first."""
        for key in STATE_KEYS:
            setattr(self, key, state[key])
        if self.fine_tuned and model_module.frozen_parameters(self.model):
            self._fine_tune()
        for group, lr in zip(self.optimizer.param_groups, state["lrs"]):
            group["lr"] = lr
        device = next(self.model.parameters()).device
        self._best_model = None if state["best_model"] is None else \
            {k: v.to(device) for k, v in state["best_model"].items()}
        self._best_optimizer = state["best_optimizer"]

    # ----------------------------------------------------------------------- the table

    def _print(self, text: str) -> None:
        if self.main_process:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _print_row(self, epoch: int, metrics: dict[str, float], lr: float, next_lr: float) -> None:
        change = "" if self.change is None else f"{self.change:+.2f}"
        seconds = metrics.get("seconds")
        row = (f"{epoch:>5} | {metrics['train_loss']:>7.4f} | {100 * metrics['train_acc']:>7.2f}% | "
               f"{metrics['val_loss']:>7.4f} | {100 * metrics['val_acc']:>6.2f}% | {lr:>9.3g} | {next_lr:>9.3g} | "
               f"{self.phase:<9} | {change:>8} | {'' if seconds is None else f'{seconds:.1f} s':>8}")
        if self.event:
            stream = self.stream or sys.stdout
            colour = getattr(stream, "isatty", lambda: False)()
            note = self.event.replace("best", "* new best")
            row += f"  \033[1m{note}\033[0m" if colour else f"  {note}"
        self._print(row)


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LRA {name} = {value!r} is out of range: use {allowed}")
