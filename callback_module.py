"""LRA, the learning-rate adjuster: decides each epoch whether to cut the LR, go back to the best
weights, unfreeze the body or stop, and asks the user whether to go on. Specified in the README's
LRA section. LRA only decides: it returns a Decision, and the training loop carries it out."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable

import messages_module
import process_module

PROMPT_UNFREEZE = ("Enter H to halt, F to fine-tune (unfreeze the frozen layers), or a number N to "
                   "train N more epochs before asking again: ")
PROMPT = "Enter H to halt or a number N to train N more epochs before asking again: "
NO_TERMINAL = "Standard input is not a terminal: prompts are off; training goes on to EPOCHS."
STATE_TYPES = {  # LRA's state, as a checkpoint holds it: each value's type is checked on resume
    "bad_epochs": int, "cuts": int, "best_val_loss": float, "best_val_acc": float | None,
    "best_train_acc": float, "best_train_loss": float, "best_epoch": int | None, "monitor": str,
    "ask_epoch": int | None, "ask_every": int | None, "prompts_off": bool, "run_until": int,
    "frozen": bool, "best_score": float | None, "improved_epoch": int}
STATE_KEYS = tuple(STATE_TYPES)
# MONITOR's choices, each with whether higher is better: it picks the best weights, and is what
# LRA watches once train_acc reaches THRESHOLD; macro_f1 and balanced_acc suit imbalanced classes
VAL_MONITORS = {"val_loss": False, "val_acc": True, "macro_f1": True, "balanced_acc": True}
HIGHER_IS_BETTER = {"train_acc": True, "train_loss": False, **VAL_MONITORS}
MONITORS = tuple(HIGHER_IS_BETTER)  # what monitored() may choose
# (heading, width) of each column; the monitored metric gets a column of its own when the table
# has none for it (macro_f1, balanced_acc)
COLUMNS = (("Epoch", 5), ("Loss", 7), ("Accuracy", 8), ("V_loss", 7), ("V_acc", 7), ("LR", 9),
           ("Next LR", 9), ("Monitor", 12), ("Wait", 6), ("% Improv", 8), ("Duration", 8))

# (test, what is allowed) for LRAConfig's fields; dwell and adjust_lr, any bool, need none.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "patience": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "stop_patience": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "threshold": (lambda v: 0 <= v <= 1, "a fraction from 0 to 1"),
    "factor": (lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
    "ask_epoch": (lambda v: v is None or (isinstance(v, int) and v >= 1),
                  "a whole number >= 1, or None"),
    "min_lr": (lambda v: v >= 0, "a number >= 0"),
    "min_delta": (lambda v: v >= 0, "a number >= 0"),
    "unfreeze_epoch": (lambda v: v is None or (isinstance(v, int) and v >= 1),
                       "a whole number >= 1, or None"),
}


@dataclasses.dataclass(frozen=True)
class LRAConfig:
    """LRA's settings, each main.py's constant of that name in upper case (PATIENCE for patience);
    a value out of range raises ValueError naming it."""

    patience: int
    stop_patience: int
    threshold: float
    factor: float
    dwell: bool
    ask_epoch: int | None
    min_lr: float
    min_delta: float
    adjust_lr: bool  # no constant: False under a fixed SCHEDULE (LRA then never cuts nor stops)
    unfreeze_epoch: int | None
    monitor: str  # a name in VAL_MONITORS
    warmup_epochs: int  # LRA neither counts bad epochs nor cuts during them (OptimConfig checks it)

    def __post_init__(self) -> None:
        messages_module.check_fields(self, RULES, {"monitor": VAL_MONITORS})


@dataclasses.dataclass(frozen=True)
class Decision:
    """What LRA decided at the end of an epoch; the training loop carries it out, in this order:
    keep a snapshot when new_best, go back to it when restore, unfreeze, set next_lr, stop."""

    stop: bool
    next_lr: float | None  # the LR of the next epoch; None when a fixed schedule drives the LR
    restore: bool          # go back to the best epoch's weights and optimizer state (dwell)
    unfreeze: bool         # make the frozen body trainable (F at the prompt, or UNFREEZE_EPOCH)
    new_best: bool         # MONITOR's best validation value so far: the weights to keep
    improved: bool         # the monitored metric improved on its own best
    # the monitored metric: "train_acc", MONITOR, or without validation "train_loss"
    monitor: str
    event: str             # what happened, for the table and the CSV
    reason: str | None     # why training stops, once it does

    def row(self) -> dict[str, Any]:
        """The decision's columns of training_metrics.csv."""
        return {"monitor": self.monitor, "improved": self.improved, "new_best": self.new_best,
                "event": self.event}


# --------------------------------------------------------------------------- pure decision helpers


def is_improvement(value: float, best: float, min_delta: float, higher_is_better: bool) -> bool:
    """Whether value beats best by more than min_delta."""
    return value > best + min_delta if higher_is_better else value < best - min_delta


def monitored(train_acc: float, threshold: float, validated: bool = True,
              watch: str = "val_loss") -> str:
    """The metric LRA watches: train_acc below the threshold, the validation metric `watch`
    (MONITOR) at or above it (train_loss without validation images)."""
    if train_acc < threshold:
        return "train_acc"
    return watch if validated else "train_loss"


def relative_change(value: float, best: float | None, higher_is_better: bool) -> float | None:
    """Improvement of value over the previous best, in percent (positive is better); None without a
    previous best, or when it is zero."""
    if best is None or not math.isfinite(best) or best == 0 or not math.isfinite(value):
        return None
    change = (value - best) if higher_is_better else (best - value)
    return 100 * change / abs(best)


def cut_lr(lr: float, factor: float, min_lr: float) -> float:
    """The LR after a cut, never below min_lr."""
    return max(lr * factor, min_lr)


def describe(new_best: bool, restored_epoch: int | None, cut: bool, stop: bool,
             unfroze: bool) -> str:
    """The event column: what happened this epoch, in the order the loop carries it out."""
    events = [(new_best, "best"), (restored_epoch is not None, f"restored epoch {restored_epoch}"),
              (cut, "LR cut"), (stop, "stop"), (unfroze, "unfroze the body")]
    return ", ".join(text for happened, text in events if happened)


def _number(value: float | None, width: int, decimals: int, sign: str = "") -> str:
    """value with as many of its decimals as fit in width (then in e-notation); "" for None."""
    if value is None:
        return ""
    for places in range(decimals, -1, -1):
        text = f"{value:{sign}.{places}f}"
        if len(text) <= width:
            return text
    return f"{value:{sign}.0e}"


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


class LRA:
    """The learning-rate adjuster: on_epoch_end(epoch, metrics) after each epoch returns a Decision;
    metrics holds train_loss, train_acc, val_loss, val_acc and lr (the epoch's).

    config.adjust_lr False (a fixed schedule drives the LR): LRA tracks the best weights and asks,
    but never cuts or stops on its own. frozen: the model has frozen layers (F is offered, and
    unfreeze_epoch can unfreeze them). Under torchrun every process runs LRA on the same metrics;
    `share` gives them rank 0's prompt answers."""

    def __init__(self, config: LRAConfig, *, frozen: bool = False, main_process: bool = True,
                 share: Callable[[Any], Any] | None = None, stream=None):
        self.config, self.main_process, self.share, self.stream = (config, main_process, share,
                                                                   stream)

        self.bad_epochs = 0          # bad epochs in a row since the last improvement or cut
        self.cuts = 0                # LR cuts in a row with no improvement in between
        self.best_val_loss = math.inf
        self.best_val_acc: float | None = None
        self.best_train_acc = -math.inf
        self.best_train_loss = math.inf
        self.best_epoch: int | None = None
        self.best_score: float | None = None  # MONITOR's value at the best epoch
        self.improved_epoch = 0      # the last epoch the monitored metric improved
        self.monitor = "train_acc"
        # ask_epoch moves with the user's answers; ask_every is the step after F (in the state)
        self.ask_epoch, self.ask_every = config.ask_epoch, config.ask_epoch
        self.prompts_off = False
        self.run_until = 0           # the user asked to train at least to this epoch
        self.frozen = frozen         # the model has frozen layers that F would unfreeze
        self.stop_reason: str | None = None
        self._started = time.perf_counter()

    @property
    def restores(self) -> bool:
        """Whether LRA may restore the best epoch (so its optimizer state is worth keeping)."""
        return self.config.dwell and self.config.adjust_lr

    def epoch_limit(self, epochs: int) -> int:
        """The last epoch to train: EPOCHS, or further when the user asked for more at a prompt."""
        return max(epochs, self.run_until)

    # ----------------------------------------------------------------------- the epoch decision

    def on_train_begin(self) -> None:
        """Say when prompts are off (no terminal), print the table's header, start the clock."""
        if self.ask_epoch is not None and not self.prompts_off:
            terminal = _stdin_is_terminal() if self.main_process else None
            if not (self.share(terminal) if self.share is not None else terminal):
                self._print(NO_TERMINAL)
                self.prompts_off = True
        self._started = time.perf_counter()
        self._print(self._line({name: name for name, _ in self._columns()}))

    def _columns(self) -> tuple[tuple[str, int], ...]:
        """The table's (heading, width) columns: COLUMNS, MONITOR's after V_acc if it has none."""
        watch = self.config.monitor
        own = () if watch in ("val_loss", "val_acc") else ((watch, max(len(watch), 7)),)
        return COLUMNS[:5] + own + COLUMNS[5:]

    def _line(self, cells: dict[str, str]) -> str:
        """A line of the table: each cell padded to its column's width (Monitor's to the left)."""
        return " | ".join(f"{cells[name]:{'<' if name == 'Monitor' else '>'}{width}}"
                          for name, width in self._columns())

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> Decision:
        """Decide as LRA.md says (best, monitored metric, cut, stop), print the row, ask if due."""
        train_acc, train_loss, lr = (float(metrics["train_acc"]), float(metrics["train_loss"]),
                                     float(metrics["lr"]))
        # None: no validation images; the last epoch's weights are the best
        val_loss = metrics.get("val_loss")
        self.monitor = monitored(train_acc, self.config.threshold, val_loss is not None,
                                 self.config.monitor)
        change = self._change(metrics)  # against the bests before this epoch, so first
        new_best = self._note_best(epoch, metrics)  # step 1
        # step 2: every best kept, whichever is monitored
        noted = {name: self._note_train(name, value)
                 for name, value in (("train_acc", train_acc), ("train_loss", train_loss))}
        improved = noted.get(self.monitor, new_best)
        if improved:
            self.improved_epoch = epoch
        warming = epoch <= self.config.warmup_epochs  # the schedule sets the LR; nothing counts
        cut, restore = (False, False) if warming else self._count_bad_epoch(improved, new_best)
        next_lr = None if warming else self._next_lr(lr, cut)  # steps 3 and 4
        stop = self._stop_due()  # step 5
        unfreeze = epoch == self.config.unfreeze_epoch and not stop and self.frozen
        if unfreeze:
            self._unfreeze()
        event = describe(new_best, self.best_epoch if restore else None, cut, stop, unfreeze)
        shown_lr = lr if next_lr is None else next_lr
        self._print_row(epoch, metrics, shown_lr, change, event, warming)  # step 6
        if not stop and self._ask_due(epoch):  # step 7
            answer = self._ask(epoch, shown_lr)
            stop, unfreeze = answer == "halt", unfreeze or answer == "unfreeze"
        return Decision(stop=stop, next_lr=next_lr, restore=restore, unfreeze=unfreeze,
                        new_best=new_best, improved=improved, monitor=self.monitor, event=event,
                        reason=self.stop_reason if stop else None)

    def on_train_end(self, reason: str | None = None, saved_best: int | None = -1) -> None:
        """Say which epoch the best weights (restored by the loop) came from and why training ended;
        saved_best (not -1): best_model.pth's epoch, said when a failed write left it behind."""
        if reason and not self.stop_reason:
            self.stop_reason = reason
        elapsed = time.perf_counter() - self._started
        if self.best_epoch is None:
            self._print(f"Training ended ({self.stop_reason or 'no epoch completed'}) after "
                        f"{elapsed:.1f} s; no epoch finished with a finite validation loss, so no "
                        "best weights to restore.")
            return
        on_disk = ("" if saved_best in (-1, self.best_epoch)
                   else (f" best_model.pth holds epoch {saved_best}'s weights, "
                         "the last written whole." if saved_best
                         else " best_model.pth was never written whole."))
        ended = f"Training ended: {self.stop_reason or 'the epoch limit was reached'}."
        if self.best_val_acc is None:  # no validation images: the best weights are the last
            self._print(f"{ended} No validation images: the model and best_model.pth hold the "
                        f"final weights, from epoch {self.best_epoch}. "
                        f"Elapsed {elapsed:.1f} s.{on_disk}")
            return
        watch = self.config.monitor
        score = "" if watch in ("val_loss", "val_acc") else f"{watch} {self.best_score:.4f}, "
        self._print(f"{ended} Restored the best weights (by {watch}), from epoch {self.best_epoch} "
                    f"({score}validation loss {self.best_val_loss:.4f}, accuracy "
                    f"{100 * self.best_val_acc:.2f}%). Elapsed {elapsed:.1f} s.{on_disk}")

    # -------------------------------------------------------------------- the steps of on_epoch_end

    def _change(self, metrics: dict[str, float]) -> float | None:
        """% Improv: the monitored metric against its best before this epoch (so call it before
        the _note_* methods)."""
        best = {"train_acc": self.best_train_acc,
                "train_loss": self.best_train_loss}.get(self.monitor, self.best_score)
        return relative_change(float(metrics[self.monitor]), best, HIGHER_IS_BETTER[self.monitor])

    def _note_best(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Whether this epoch has the best weights (MONITOR's best validation value so far; without
        validation, every epoch: the last is the best); if so, remember it."""
        if metrics.get("val_loss") is None:
            self.best_epoch = epoch
            return True
        score, best = float(metrics[self.config.monitor]), self.best_score
        if math.isnan(score) or best is not None and not is_improvement(
                score, best, self.config.min_delta, VAL_MONITORS[self.config.monitor]):
            return False
        self.best_epoch, self.best_score = epoch, score
        self.best_val_loss, self.best_val_acc = (float(metrics["val_loss"]),
                                                 float(metrics["val_acc"]))
        return True

    def _note_train(self, name: str, value: float) -> bool:
        """Whether train_acc or train_loss (watched without validation) beats its best so far, kept
        in best_<name>; if so, remember it."""
        improved = is_improvement(value, getattr(self, f"best_{name}"), self.config.min_delta,
                                  higher_is_better=name == "train_acc")
        if improved:
            setattr(self, f"best_{name}", value)
        return improved

    def _count_bad_epoch(self, improved: bool, new_best: bool) -> tuple[bool, bool]:
        """(cut, restore): reset the counts on an improvement; cut on the patience-th bad epoch in a
        row, going back to the best epoch first under dwell unless this epoch is the best one."""
        if improved:
            self.bad_epochs = self.cuts = 0
            return False, False
        if not self.config.adjust_lr:
            return False, False
        self.bad_epochs += 1
        if self.bad_epochs < self.config.patience:
            return False, False
        self.bad_epochs, self.cuts = 0, self.cuts + 1
        return True, self.config.dwell and self.best_epoch is not None and not new_best

    def _next_lr(self, lr: float, cut: bool) -> float | None:
        """The next epoch's LR: lower after a cut; None when a fixed schedule sets it."""
        if not self.config.adjust_lr:
            return None
        return cut_lr(lr, self.config.factor, self.config.min_lr) if cut else lr

    def _stop_due(self) -> bool:
        """Whether stop_patience cuts in a row passed unimproved; if so, set stop_reason."""
        if not self.config.adjust_lr or self.cuts < self.config.stop_patience:
            return False
        self.stop_reason = (f"{self.cuts} LR cuts in a row with no improvement of {self.monitor} "
                            f"(STOP_PATIENCE = {self.config.stop_patience})"
                            f"{self._still_improving()}")
        return True

    def _still_improving(self) -> str:
        """What a stop on train_acc says when the validation MONITOR kept improving meanwhile (as
        with augmentation that holds train_acc below THRESHOLD): why, and what to set."""
        if (self.monitor != "train_acc" or (self.best_epoch or 0) <= self.improved_epoch
                or self.best_score is None):
            return ""
        below = math.floor(20 * self.best_train_acc) / 20  # a round THRESHOLD it has reached
        return (f"; train_acc stayed below THRESHOLD {self.config.threshold:g} "
                f"(it reached {100 * self.best_train_acc:.1f}%; augmentation can keep it low), "
                f"so LRA judged by it while {self.config.monitor} kept improving "
                f"(a new best at epoch {self.best_epoch}): set --threshold {below:g} or lower, "
                "or a higher --stop-patience")

    def _ask_due(self, epoch: int) -> bool:
        """Whether to ask the user after this epoch."""
        return self.ask_epoch is not None and not self.prompts_off and epoch >= self.ask_epoch

    # ----------------------------------------------------------------------- asking the user

    def _ask(self, epoch: int, lr: float) -> str:
        """Ask (rank 0; every process gets its answer); return "halt", "unfreeze" or "go on"."""
        answer = self._prompt(epoch) if self.main_process else None
        if self.share is not None:
            answer = self.share(answer)  # under torchrun, rank 0's answer for every rank
        kind = answer[0]
        if kind == "halt":
            self.stop_reason = answer[1]
            return "halt"
        if kind == "more":
            self.ask_epoch = epoch + answer[1]
            self.run_until = max(self.run_until, self.ask_epoch)
        elif kind == "unfreeze":
            self._unfreeze()
            self.ask_epoch = epoch + self.ask_every
            self._print(f"Unfreezing the body at LR {lr:.3g}; "
                        f"asking again after epoch {self.ask_epoch}.")
            return "unfreeze"
        else:  # "eof" or "off": stop asking, go on to the configured number of epochs
            self.prompts_off = True
        return "go on"

    def _prompt(self, epoch: int) -> tuple:
        """Ask on the terminal until LRA accepts the answer; never calls input() without one."""
        if not _stdin_is_terminal():
            self._print(NO_TERMINAL)
            return ("off",)
        while True:
            try:
                answer = input(PROMPT_UNFREEZE if self.frozen else PROMPT).strip()
            except EOFError:
                self._print("\nEnd of input: no more questions; training goes on to EPOCHS.")
                return ("eof",)
            except KeyboardInterrupt:  # an answer: the run goes on, and a later signal stops it
                process_module.interruptible()
                self._print("")
                return ("halt", f"halted with Ctrl-C at the prompt after epoch {epoch}")
            if answer.lower() == "h":
                return ("halt", f"halted by the user after epoch {epoch}")
            if answer.lower() == "f" and self.frozen:
                return ("unfreeze",)
            if answer.isascii() and answer.isdigit() and int(answer) > 0:
                return ("more", int(answer))
            offered = "H, F" if self.frozen else "H"
            self._print(f"{answer!r} is not accepted: enter {offered}, or a whole number of epochs "
                        "above 0.")

    def ask_anew(self, ask_epoch: int | None) -> None:
        """Ask after ask_epoch (then every ask_epoch epochs), or never (None), whatever a resumed
        state said."""
        self.ask_epoch = self.ask_every = ask_epoch
        self.prompts_off = False

    def _unfreeze(self) -> None:
        """Unfreezing is a fresh start: no frozen layers left, bad-epoch and cut counts reset."""
        self.frozen = False
        self.bad_epochs = self.cuts = 0

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything LRA needs to make the same decisions after a resume (plain values)."""
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore LRA's state; ValueError naming the first value of the wrong kind. A state saved
        before MONITOR and the warm-up existed (no best_score) was chosen by val_loss."""
        if "best_score" not in state:
            by_loss = self.config.monitor == "val_loss" and state.get("best_val_acc") is not None
            state = {**state, "improved_epoch": 0,
                     "best_score": state.get("best_val_loss") if by_loss else None}
        for key, kind in STATE_TYPES.items():
            messages_module.check_type(f"lra's {key}", state[key], kind)
        if state["monitor"] not in MONITORS:
            raise ValueError(messages_module.not_known("lra's monitor", state["monitor"], MONITORS))
        for key in STATE_KEYS:
            setattr(self, key, state[key])

    # ----------------------------------------------------------------------- the table

    def _print(self, text: str) -> None:
        if self.main_process:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _wait(self, warming: bool) -> str:
        """The Wait column: bad epochs so far of the PATIENCE that cuts, or warm-up."""
        if warming:
            return "warm"
        return f"{self.bad_epochs}/{self.config.patience}" if self.config.adjust_lr else ""

    def _print_row(self, epoch: int, metrics: dict[str, Any], next_lr: float, change: float | None,
                   event: str, warming: bool) -> None:
        """One row of the table, each cell within its column's width whatever its value."""
        val_acc, seconds = metrics.get("val_acc"), metrics.get("seconds")
        row = self._line({"Epoch": f"{epoch}", "Loss": _number(metrics["train_loss"], 7, 4),
                          "Accuracy": _number(100 * metrics["train_acc"], 7, 2) + "%",
                          "V_loss": _number(metrics.get("val_loss"), 7, 4),
                          "V_acc": "" if val_acc is None else _number(100 * val_acc, 6, 2) + "%",
                          self.config.monitor: _number(metrics.get(self.config.monitor), 7, 4),
                          "LR": f"{metrics['lr']:.3g}", "Next LR": f"{next_lr:.3g}",
                          "Monitor": self.monitor, "Wait": self._wait(warming),
                          "% Improv": _number(change, 8, 2, "+"),
                          "Duration": "" if seconds is None else _number(seconds, 6, 1) + " s"})
        if event:
            colour = getattr(self.stream or sys.stdout, "isatty", lambda: False)()
            note = event.replace("best", "* new best")
            row += f"  \033[1m{note}\033[0m" if colour else f"  {note}"
        self._print(row)
