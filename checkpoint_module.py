"""A run's files, written and read side by side: last_checkpoint.pth (all a resume needs),
best_model.pth and .json (for --predict and WEIGHTS), training_metrics.csv; and an earlier run's
files, moved to previous/ when a new run starts."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import errno
import itertools
import json
import math
import os
import sys
import threading
import typing
from typing import Any, Iterator

import torch

import data_module
import export_module
import files_module
import messages_module
import model_module
import report_module
import state_module
import tracker_module
import utils
from state_module import TrainState

BEST_MODEL, BEST_MODEL_INFO = "best_model.pth", "best_model.json"
CHECKPOINT, METRICS_CSV = "last_checkpoint.pth", "training_metrics.csv"
FORMAT = 2  # of the files written here: a resume refuses files of another
# best_model.json: what --predict needs (and resize_size)
INFO_KEYS = ("model", "classes", "mean", "std", "image_size")
INFO_FIELDS = [f.name for f in dataclasses.fields(state_module.RunInfo) if f.name != "config"]
PREDICTIONS = "predictions.csv"
# under the lock
TRAINING_FILES = (CHECKPOINT, BEST_MODEL, BEST_MODEL_INFO, METRICS_CSV, *report_module.FILES)
# all a run writes in OUTPUT_DIR
RUN_FILES = (*TRAINING_FILES, PREDICTIONS, *export_module.EXPORT_FILES.values())
PREVIOUS = "previous"  # OUTPUT_DIR/previous/<start time>/ holds the files of the runs before
RUN_FOLDERS = (PREVIOUS, *tracker_module.FOLDERS)  # the folders a run makes in OUTPUT_DIR
MAX_INFO_BYTES = 16 * 2**20  # best_model.json: ImageNet-21k's 21,841 class names take under 1 MB;
# a bigger file is not one of ours (json reads it whole before any field can be looked at)
STARTED_SLACK = datetime.timedelta(days=1)  # a `started` may be this far ahead of this clock
RESUME_FIX = "resume another checkpoint, or start afresh"  # what to do about a damaged checkpoint
FOLDER_TIME = "%Y-%m-%dT%H-%M-%S"  # a start time as a folder name (no colons: Windows's rule)


# --------------------------------------------------------------------------- writing


class EpochWriter:
    """Each epoch's files, written atomically by a background thread as the device trains on, in
    this order: last_checkpoint.pth (resume's authority), best_model.pth and .json on a new best,
    the CSV. save() waits for the previous write, then copies the state to the CPU (the next epoch
    changes the live tensors). A failed write's error is raised by check() (the loop calls it every
    step, so a full disk stops training at once), save() or wait(). A kill mid-write leaves the
    earlier files whole, so resume starts from the last checkpoint that landed. `landed`: the epoch
    best_model.pth holds, once written whole."""

    def __init__(self, output_dir: str, best_epoch: int | None = None):
        self.output_dir = output_dir
        self.landed: dict[str, int | None] = {BEST_MODEL: best_epoch}  # best_epoch: already on disk
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, checkpoint: dict[str, Any], new_best: bool) -> None:
        """Write a TrainState.state_dict() as the epoch's files (best_model.pth and .json too when
        new_best)."""
        self.wait()
        checkpoint = _cpu_copy({"format": FORMAT, **checkpoint})
        best_files = ((state_module.best_weights(checkpoint["best"]), _best_info(checkpoint))
                      if new_best else (None, None))
        self._thread = threading.Thread(target=self._write,
                                        args=(checkpoint, *best_files, checkpoint["history"]),
                                        name="epoch-writer")  # not a daemon: waited for at exit
        self._thread.start()

    def _write(self, *files) -> None:
        try:
            _write_epoch(self.output_dir, *files, landed=self.landed)
        except BaseException as error:  # the training thread raises it
            self._error = error

    def check(self) -> None:
        """Raise a failed background write's error, without waiting for the one in flight."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self, raise_error: bool = True) -> None:
        """Wait for the write in flight; raise its error (or, with raise_error False, print it)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error
        if error is not None:
            print(f"warning: the last epoch's files could not be written ({error})",
                  file=sys.stderr)


def _cpu_copy(value: Any, hosts: Iterator[torch.Tensor] | None = None) -> Any:
    """A copy of value that nothing changes after: tensors copied by one copy_to_host call,
    containers rebuilt, the rest deep-copied. hosts: the copies, in walk order (None: make them)."""
    if hosts is None:
        def tensors_in(item: Any) -> Iterator[torch.Tensor]:  # in the order of the walk below
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (dict, list, tuple)):
                for inner in (item.values() if isinstance(item, dict) else item):
                    yield from tensors_in(inner)
        hosts = iter(copy_to_host(list(tensors_in(value))))
        copied = _cpu_copy(value, hosts)
        assert next(hosts, None) is None, "a copy for every tensor, and every copy used"
        return copied
    if isinstance(value, torch.Tensor):
        return next(hosts)
    # a model's state_dict is an OrderedDict with its modules' versions in _metadata
    if isinstance(value, dict):
        copied = type(value)((key, _cpu_copy(item, hosts)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copied._metadata = copy.deepcopy(value._metadata)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item, hosts) for item in value)
    return copy.deepcopy(value)


def copy_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies: CUDA tensors into pinned memory without waiting, then one event wait (.to("cpu")
    waits for each: most of a run's host syncs); the rest copied too, as the live ones change."""
    copies, devices = [], set()
    for tensor in tensors:
        tensor = tensor.detach()
        if tensor.is_cuda and tensor.layout == torch.strided:
            # the same strides (channels_last)
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            copies.append(host.copy_(tensor, non_blocking=True))
            devices.add(tensor.device)
        else:
            copies.append(tensor.to("cpu", copy=True))
    for device in devices:  # one, but for a state spread over several GPUs
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))  # after the copies, queued on that stream
        event.synchronize()  # they are in host memory: the writer's thread may read them
    return copies


def _best_info(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """best_model.json: what --predict needs (RunInfo less config), the data, the best's scores."""
    info, config = ({name: checkpoint.get(name) for name in INFO_FIELDS},
                    checkpoint.get("config", {}))
    data_dir = config.get("DATA_DIR")  # what --export reads its example images from
    lra = checkpoint["lra"]
    return {"format": FORMAT, "model": config.get("MODEL"), **info,
            "dataset": config.get("DATASET"), "data_dir": data_dir and os.path.abspath(data_dir),
            "epoch": lra["best_epoch"], "monitor": config.get("MONITOR", "val_loss"),
            "score": lra.get("best_score"),  # None:
            "val_loss": lra["best_val_loss"] if lra["best_val_acc"] is not None else None,  # no val
            "val_acc": lra["best_val_acc"]}


def _write_epoch(output_dir: str, checkpoint: dict | None, best_weights: dict | None,
                 info: dict | None, history: list[dict],
                 landed: dict[str, int | None] | None = None) -> None:
    """Write the files given, the CSV last; landed gets best_model.pth's epoch once it is whole."""
    landed = {} if landed is None else landed
    if checkpoint is not None:
        utils.save_torch(checkpoint, os.path.join(output_dir, CHECKPOINT))
    if best_weights is not None:
        utils.save_torch(best_weights, os.path.join(output_dir, BEST_MODEL))
        landed[BEST_MODEL] = info["epoch"]
        files_module.write_json(os.path.join(output_dir, BEST_MODEL_INFO), info, indent=2)
    utils.write_metrics(history, os.path.join(output_dir, METRICS_CSV))


def record_time(output_dir: str, figures: dict[str, float]) -> None:
    """Add the run's time account (seconds by part) to its best_model.json, as "time"."""
    path = os.path.join(output_dir, BEST_MODEL_INFO)
    if not os.path.isfile(path):
        return
    try:  # read as any run file is: a file changed under the run is told in one line
        info = _read_json(path)
        files_module.write_json(path, {**info, "time": figures}, indent=2)
    except (utils.CheckpointError, TypeError) as error:  # TypeError: not a JSON object
        print(f"warning: {error}; the run's time is not recorded there", file=sys.stderr)


def check_room(output_dir: str, state: TrainState, resuming: bool) -> None:
    """Refuse (OSError: folder, bytes needed and free) a run whose epoch files cannot fit. The
    checkpoint holds the model, its momentum, the best snapshot (with momentum when LRA can go
    back), Lookahead's slow weights, the EMA and the best epoch's; best_model.pth the model. Each is
    written beside the file it replaces: a new run needs room for two of each, a resumed one for one
    more."""
    model = utils.tensor_bytes(state.model.state_dict())
    trained = sum(p.nelement() * p.element_size() for p in state.model.parameters())
    checkpoint = (2 * model + trained * (1 + state.best.with_optimizer)
                  + (model if state.lookahead else 0) + (2 * model if state.ema is not None else 0))
    needed = (1 if resuming else 2) * (checkpoint + model)
    free = files_module.free_bytes(output_dir)
    if free < needed:
        raise files_module.FileError(errno.ENOSPC,
                                     f"{os.path.abspath(output_dir)} has "
                                     f"{files_module.megabytes(free)} free, and this run's epoch "
                                     f"files need about {files_module.megabytes(needed)} (the "
                                     "checkpoint, best_model.pth and their temporary copies); free "
                                     "some space or choose another --output-dir")


def timestamp() -> str:
    """Now, as `started` records it: ISO 8601 local time with its UTC offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def move_earlier_run(output_dir: str) -> str | None:
    """Move an earlier run's files to previous/<its start time>/ (_2, _3, ... if taken) by atomic
    renames, saying where; returns that folder, or None when there were none. The caller holds the
    lock: no run writes them."""
    check_output_dir(output_dir)  # no link is moved, and no file leaves output_dir through one
    names = _run_files(output_dir)
    if not names:
        return None
    stamp = run_started(output_dir).strftime(FOLDER_TIME)
    os.makedirs(os.path.join(output_dir, PREVIOUS), exist_ok=True)
    for n in itertools.count(1):
        target = os.path.join(output_dir, PREVIOUS, stamp if n == 1 else f"{stamp}_{n}")
        try:
            os.mkdir(target)  # claims the name: fails if it is there
            break
        except FileExistsError:
            continue
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    files_module.fsync_folder(target)
    files_module.fsync_folder(output_dir)
    print(f"The earlier run's files are kept in {target}")
    return target


def check_output_dir(output_dir: str, names: tuple[str, ...] = RUN_FILES) -> None:
    """Refuse (ValueError; creating nothing) an output_dir whose named run files (all by default) or
    lock are links or not regular files, or whose RUN_FOLDERS are not plain folders: a run writes
    through no link and moves nothing out of output_dir. Called before the data is read."""
    for name in (*names, files_module.LOCK_FILE):
        problem = files_module.not_a_plain_file(os.path.join(output_dir, name))
        if problem:
            raise ValueError(problem)
    for name in RUN_FOLDERS:
        problem = files_module.not_a_plain_folder(os.path.join(output_dir, name))
        if problem:
            raise ValueError(problem)


def _run_files(output_dir: str) -> list[str]:
    """The names of the run files that output_dir holds as regular files (links never count)."""
    paths = {name: os.path.join(output_dir, name) for name in RUN_FILES}
    return [name for name, path in paths.items()
            if os.path.isfile(path) and not os.path.islink(path)]


def remove_partial_writes(output_dir: str) -> None:
    """Delete training files' temporaries (.NAME.*.tmp) a killed run left, never others'. The caller
    holds the lock all their writers hold (--predict takes none: its temporaries stay)."""
    for entry in os.scandir(output_dir):
        if (entry.is_file(follow_symlinks=False) and entry.name.endswith(".tmp")
                and any(entry.name.startswith(f".{name}.") for name in TRAINING_FILES)):
            os.remove(entry.path)


# --------------------------------------------------------------------------- reading


def run_started(output_dir: str) -> datetime.datetime | None:
    """When output_dir's run started: the `started` in best_model.json or last_checkpoint.pth, else
    (older files) the oldest file's mtime; None when output_dir holds no run files."""
    paths = [os.path.join(output_dir, name) for name in _run_files(output_dir)]
    if not paths:
        return None
    for read in (_info_started, _checkpoint_started):
        try:
            return parse_started(read(output_dir))
        except ValueError:  # not recorded, or not a time it started at: only a folder's name
            continue
    oldest = min(os.path.getmtime(path) for path in paths)
    return datetime.datetime.fromtimestamp(oldest).astimezone()


def parse_started(value: Any) -> datetime.datetime:
    """A recorded `started` as local time; ValueError unless it is ISO 8601 text with a UTC offset,
    no later than now plus STARTED_SLACK."""
    try:
        when = datetime.datetime.fromisoformat(value)
        if when.tzinfo is not None and when <= datetime.datetime.now().astimezone() + STARTED_SLACK:
            return when.astimezone()
    except (TypeError, ValueError, OverflowError):  # not text, not a time, the calendar's ends
        pass
    raise ValueError(f"started = {messages_module.short_repr(value)} is not when a run started: "
                     f"use a past time in ISO 8601 with its UTC offset, as {timestamp()}")


def _info_started(output_dir: str) -> str | None:
    """The `started` of output_dir's best_model.json, if it has one."""
    try:
        info = _read_json(os.path.join(output_dir, BEST_MODEL_INFO))
        return info.get("started")
    except (utils.CheckpointError, AttributeError):  # missing, too big, or not a JSON object
        return None


def _checkpoint_started(output_dir: str) -> str | None:
    """The `started` of output_dir's last_checkpoint.pth, if it has one."""
    try:  # mmap: the tensors stay on the disk, however big the checkpoint
        checkpoint = torch.load(os.path.join(output_dir, CHECKPOINT), map_location="cpu",
                                weights_only=True, mmap=True)
        return checkpoint.get("started")
    except Exception:  # missing, truncated, foreign: any failure means the time is not recorded
        return None


def read_checkpoint(path: str) -> dict[str, Any]:
    """A last_checkpoint.pth of this FORMAT, its plain fields checked (main.resumed_config checks
    its settings); else CheckpointError."""
    checkpoint = utils.load_torch(path, "RESUME")
    if not is_checkpoint(checkpoint) or checkpoint.get("format") != FORMAT:
        raise utils.CheckpointError(f"RESUME {path} is not a last_checkpoint.pth of this pipeline")
    check_run_info(checkpoint, f"RESUME {path}", RESUME_FIX)
    try:
        config, history = checkpoint["config"], checkpoint["history"]
        messages_module.check_type("config", config, dict)
        messages_module.check_type("config's names", list(config), list[str])
        messages_module.check_type("epoch", checkpoint["epoch"], int)
        messages_module.check_type("history", history, list[dict])
        for row in history:
            messages_module.check_type("history's values", list(row.values()),
                                       list[float | str | bool | None])
        epochs = [row.get("epoch") for row in history]
        if epochs != list(range(1, len(epochs) + 1)) or checkpoint["epoch"] != len(epochs):
            raise ValueError(f"epoch = {messages_module.short_repr(checkpoint['epoch'])} and its "
                             f"history's epochs, {messages_module.short_repr(epochs)}, "
                             "are not 1, 2, ... up to it")
    except ValueError as error:
        raise damaged(f"RESUME {path}", error, RESUME_FIX) from None
    return checkpoint


def damaged(where: str, error: Exception, fix: str) -> utils.CheckpointError:
    """The one line for a run file with a field that is wrong: "{where}: {error}; ...: {fix}"."""
    return utils.CheckpointError(f"{where}: {error}; the file was changed, "
                                 f"or not written by this pipeline: {fix}")


def check_run_info(info: dict[str, Any], where: str, fix: str) -> None:
    """CheckpointError (damaged) for the first RunInfo field (but config) of the wrong type or out
    of range; a missing one takes its default. Checked before use: image_size sizes memory."""
    fields = {field.name: field for field in dataclasses.fields(state_module.RunInfo)}
    types = typing.get_type_hints(state_module.RunInfo)
    try:
        values = {name: info.get(name, fields[name].default) for name in INFO_FIELDS}
        for name, value in values.items():
            messages_module.check_type(name, value, types[name])
        classes = values["classes"]
        if len(classes) < 2 or len(set(classes)) < len(classes):
            raise ValueError(f"classes = {messages_module.short_repr(classes)} is out of range: "
                             "use two or more names, each once")
        for name in ("mean", "std"):
            channels = values[name]
            if (len(channels) != 3 or not all(map(math.isfinite, channels))
                    or (name == "std" and min(channels) <= 0)):
                positive = ", each > 0" if name == "std" else ""
                raise ValueError(f"{name} = {messages_module.short_repr(channels)} is out of "
                                 f"range: use three finite numbers, one a colour channel{positive}")
        size, resize = values["image_size"], values["resize_size"]
        test, allowed = data_module.RULES["image_size"]
        if not test(size):
            raise ValueError(f"image_size = {size!r} is out of range: use {allowed}")
        if resize is not None and not size <= resize <= 2 * size:
            raise ValueError(f"resize_size = {resize!r} is out of range: use from image_size "
                             f"({size}) to twice it")
        if values["precision"] not in state_module.PRECISIONS:
            raise ValueError(messages_module.not_known("precision", values["precision"],
                                                       state_module.PRECISIONS))
        if values["started"] is not None:
            parse_started(values["started"])
    except ValueError as error:
        raise damaged(where, error, fix) from None


def resume(checkpoint: dict[str, Any], path: str, state: TrainState, *, output_dir: str,
           rank: int = 0, world_size: int = 1) -> None:
    """Load a read_checkpoint() into state to continue exactly; rewrite best_model.pth and the CSV
    from it (their authority), first moving output_dir's own run aside if path is elsewhere."""
    for name in ("MODEL", "DATASET"):
        if checkpoint["config"].get(name) != state.info.config[name]:
            raise utils.CheckpointError(f"RESUME {path} was saved with {name} = "
                                        f"{checkpoint['config'].get(name)!r}, "
                                        f"but this run has {state.info.config[name]!r}; "
                                        f"set {name} to match or start afresh")
    if checkpoint.get("classes") != state.info.classes:
        raise utils.CheckpointError(f"RESUME {path} was trained on other classes "
                                    f"({checkpoint.get('classes')})")
    try:
        state.load_state_dict(checkpoint, rank, world_size)
    # a wrong kind of value in the state fails in any of these ways, all meaning the same
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise utils.CheckpointError(f"RESUME {path} does not fit this run's model or optimizer "
                                    f"({str(error).splitlines()[0]})") from None
    if rank == 0:
        own = os.path.join(output_dir, CHECKPOINT)
        if not (os.path.exists(own) and os.path.samefile(path, own)):
            move_earlier_run(output_dir)
        best = _best_info(
            {**checkpoint, "lra": state.lra.state_dict(), **dataclasses.asdict(state.info)})
        _write_epoch(output_dir, None, _cpu_copy(state.best.weights), best, checkpoint["history"])
        print(f"Resuming {path} after epoch {checkpoint['epoch']} (best so far: epoch "
              f"{state.lra.best_epoch}).")


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a last_checkpoint.pth."""
    return isinstance(obj, dict) and all(
        key in obj for key in (*state_module.KEYS, "config") if key not in state_module.NEWER_KEYS)


def load_best_model_info(output_dir: str) -> dict[str, Any]:
    """best_model.json (model, classes, normalisation, size of best_model.pth), each field checked
    before use (CheckpointError naming the first wrong one)."""
    path = os.path.join(output_dir, BEST_MODEL_INFO)
    if not os.path.isfile(path):
        raise utils.CheckpointError(f"{path} {utils.not_a_file(path)}: train first "
                                    "(python main.py), or set OUTPUT_DIR to the folder that holds "
                                    "best_model.pth and best_model.json")
    info, fix = _read_json(path), "train again to rewrite it"
    if not isinstance(info, dict):
        raise utils.CheckpointError(f"{path} is not a JSON object of a run; {fix}")
    missing = [key for key in INFO_KEYS if info.get(key) is None]
    if missing:
        raise utils.CheckpointError(f"{path} lacks {', '.join(missing)}; {fix}")
    check_run_info(info, path, fix)
    try:
        names = model_module.model_names()
        messages_module.check_type("model", info["model"], str)
        if info["model"] not in names:
            raise ValueError(messages_module.not_known("model", info["model"], names, closest=True))
        messages_module.check_type("data_dir", info.get("data_dir"), str | None)
        if info.get("dataset") not in (None, *data_module.DATASETS):
            raise ValueError(
                messages_module.not_known("dataset", info.get("dataset"), data_module.DATASETS))
    except ValueError as error:
        raise damaged(path, error, fix) from None
    return info


def _read_json(path: str) -> Any:
    """A run's JSON file, size checked first; CheckpointError if unreadable, too big or not JSON."""
    try:
        size = os.path.getsize(path)
        if size <= MAX_INFO_BYTES:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    except OSError as error:
        raise utils.CheckpointError(f"{path} could not be read ({error.strerror})") from None
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deep
        detail = messages_module.short_repr(str(error))[1:-1]
        raise utils.CheckpointError(f"{path} is not readable JSON ({detail})") from None
    most = files_module.megabytes(MAX_INFO_BYTES)
    raise utils.CheckpointError(f"{path} takes {files_module.megabytes(size)}, more than a "
                                f"{BEST_MODEL_INFO} ever does ({most}); train again to rewrite it")
