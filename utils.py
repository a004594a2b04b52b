"""Run plumbing: seeding, devices, random states, the time account, safe loading and atomic saving
of weights and checkpoints, the metrics CSV."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

import files_module

CSV_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "macro_f1",
               "balanced_acc", "lr", "next_lr", "monitor", "improved", "new_best", "event",
               "seconds"]


class CheckpointError(ValueError):
    """A weights or checkpoint file that is missing, unreadable, unsafe or of the wrong kind."""


# --------------------------------------------------------------------------- the time account


class TimeAccount:
    """A run's time by part, in seconds (as Lightning's simple profiler); the rest is "other"."""

    def __init__(self, started: float):
        self.started = started  # time.perf_counter() when the process began its work
        self.parts: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, part: str):
        """Count the block's time to the part."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - started)

    def figures(self) -> dict[str, float]:
        """The parts, "other" and the "total" so far, rounded to milliseconds."""
        total = time.perf_counter() - self.started
        return {name: round(seconds, 3) for name, seconds in {
            **self.parts, "other": max(total - sum(self.parts.values()), 0.0),
            "total": total}.items()}

    def line(self) -> str:
        """The account in one line: "Time: imports 2.9 s, ..., other 0.2 s; total 19.8 s"."""
        figures = self.figures()
        total = figures.pop("total")
        return ("Time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in figures.items())
                + f"; total {total:.1f} s")


# --------------------------------------------------------------------------- seeding and devices


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(local_rank: int = 0) -> torch.device:
    """Accelerator if any (CUDA: this rank's GPU; MPS; any torch.accelerator knows), else CPU."""
    if not torch.accelerator.is_available():
        return torch.device("cpu")
    device = torch.accelerator.current_accelerator()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def rng_state() -> dict[str, Any]:
    """Every random-number state a run draws from, in a form that loads with weights_only=True."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------- checkpoint files and the CSV


def save_torch(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    files_module.atomic_write(path, lambda f: torch.save(obj, f), needed=tensor_bytes(obj))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in obj (dicts, lists, tuples searched): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(tensor_bytes, obj))
    return 0


def not_a_file(path: str) -> str:
    """Why path is no file to read, in words: it is missing, or a FIFO, device or folder."""
    return "is not a regular file" if os.path.exists(path) else "does not exist"


def load_torch(path: str, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True): tensors and plain containers only; other pickled objects
    (code that would run on load) are refused, never run."""
    if not os.path.isfile(path):  # a FIFO would wait for ever, /dev/zero never end
        raise CheckpointError(f"{what} {path} {not_a_file(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{what} {path} holds pickled objects other than tensors (code could run on load), "
                "so it was refused and nothing in it ran; "
                "use only weights saved by this pipeline or another source you trust") from None
        raise CheckpointError(f"{what} {path} is not a PyTorch checkpoint ({error})") from None
    # the restricted unpickler fails many ways on foreign bytes; all mean "not ours"
    except Exception as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{what} {path} is truncated or not a PyTorch checkpoint "
                              f"({detail})") from None


def load_state_dict(path: str, what: str = "WEIGHTS") -> dict[str, torch.Tensor]:
    """A model state dict (names to tensors, as best_model.pth holds) from a file, loaded safely."""
    state = load_torch(path, what)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{what} {path} is not a model state dict (best_model.pth holds one)")
    return state


def write_metrics(history: list[dict[str, Any]], path: str) -> None:
    """Write training_metrics.csv (one row per epoch so far), atomically."""
    frame = spreadsheet_safe(pd.DataFrame(history, columns=CSV_COLUMNS))
    files_module.atomic_write(path, lambda f: frame.to_csv(f, index=False))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a cell that starts so runs as a formula (OWASP)


def safe_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows, never runs: text starting as a formula (a file named
    "=HYPERLINK(...)") gets a leading ', per OWASP's CSV injection advice."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with each text cell made safe (safe_cell); numbers stay numbers."""
    text = [column for column in frame.columns if pd.api.types.is_object_dtype(frame[column])
            or pd.api.types.is_string_dtype(frame[column])]
    return frame.assign(**{column: frame[column].map(safe_cell) for column in text})
