"""Train an image classifier on CIFAR-10 (or any ImageFolder tree) with the LRA callback in charge.

Edit the constants below, or set any of them for one run from the command line: `--epochs 3` sets
EPOCHS, `--data-dir DIR` sets DATA_DIR, `--train-subset none` sets TRAIN_SUBSET to None.
`python main.py --predict IMAGE [IMAGE ...]` classifies images with OUTPUT_DIR/best_model.pth.
"""

import argparse
import dataclasses
import difflib
import errno
import gc
import math
import os
import re
import shlex
import signal
import sys
import time
import types
import typing

# the time account's start: everything below it is counted, the imports first
STARTED = time.perf_counter()
# no cycle collections while torch's modules load: a quarter of the imports' time (README, Start-up)
gc.disable()
# on Apple's MPS, run missing operations on the CPU
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")


def _stop_while_starting(signum, frame) -> None:
    """Ctrl-C or SIGTERM while the modules load (nothing to clean up yet): one line, no
    traceback."""
    os.write(2, b"Interrupted while starting.\n")
    os._exit(130 if signum == signal.SIGINT else 143)


_SIGNALS_BEFORE = {signum: signal.signal(signum, _stop_while_starting)
                   for signum in (signal.SIGINT, signal.SIGTERM)}

import torch  # noqa: E402 (torch must see the setting above when it loads)

import augment_module
import callback_module
import checkpoint_module
import data_module
import folder_module
import inference_module
import model_module
import optim_module
import report_module
import state_module
import step_module
import train_module
import utils
from callback_module import LRA
from utils import flag

# the modules' objects, never garbage, leave the collector's sight: later collections skip them
gc.freeze()
gc.enable()
for _signum, _handler in _SIGNALS_BEFORE.items():  # run_main takes them from here
    signal.signal(_signum, _handler)
IMPORTED = time.perf_counter()
_imports_counted = False  # whether a run's time account has counted them

# Every annotated UPPER_CASE name below is a constant: settable here or as --lower-case-name on the
# command line, recorded in each checkpoint, and checked before anything runs.

# --- Data
DATA_DIR: str = "./data"         # holds cifar-10-batches-py/ (fetched when missing), or train/ val/
                                 # test/ trees
DATASET: str = "cifar10"         # "cifar10", or "folder" for an ImageFolder tree:
                                 # DATA_DIR/train/<class>/<image>
DOWNLOAD: bool = True            # fetch CIFAR-10 (and check the archive's checksum) when DATA_DIR
                                 # lacks it
IMAGE_SIZE: int | None = None    # pixels the model sees (folders); None: PRETRAINED's crop size,
                                 # else 32. CIFAR is 32
VAL_SPLIT: int | None = None     # training images held out for validation, stratified; None: 5,000
                                 # for CIFAR-10, a tenth of a folder's train/ (one of each class at
                                 # least); 0: no validation (the last epoch's weights are kept; the
                                 # test set is only for the end)
TRAIN_SUBSET: int | None = None  # train on only this many images (stratified), for quick runs; None
                                 # = all
AUGMENT: str = "auto"            # "photo": RandomResizedCrop + flip (torchvision's reference),
                                 # "shift": pad-crops + flips (CIFAR's, for small images); "auto":
                                 # shift for CIFAR-10, photo for folders
CROP_PADDING: int = 4            # "shift" crops: random shift in pixels (0 = no crop)
REFLECT: bool = False            # crops pad by reflecting the border instead of with black
FLIP: str = "random"             # "random" flips, "alternate" (each image every other epoch, as
                                 # airbench) or "none"
AUTO_AUGMENT: str | None = None  # "trivialaugment": one op of torchvision's TrivialAugmentWide for
                                 # each training image (its own op, magnitude and sign),
                                 # "randaugment": two of RandAugment's at magnitude 9; batched on
                                 # the device; None: off
RANDOM_ERASING: float = 0.0      # probability that a training image gets RandomErasing's box (2-33%
                                 # of its area) set to 0 after normalisation; torchvision's
                                 # reference uses 0.25 with AUTO_AUGMENT
MIXUP: float = 0.0               # Mixup's alpha: each training image blended with another of its
                                 # batch, by a share drawn from Beta(alpha, alpha), targets alike
                                 # (torchvision's v2.MixUp); 0 off; torchvision's reference recipe
                                 # uses 0.2
CUTMIX: float = 0.0              # CutMix's alpha: a box of another image of the batch pasted into
                                 # each, targets by area (v2.CutMix); 0 off; the reference uses 1.0.
                                 # With MIXUP too, each batch gets one of the two at random
                                 # (v2.RandomChoice, as the reference)
RESIDENT: str = "auto"           # keep the data on the device as uint8: "auto" (when it fits),
                                 # "yes" or "no"
NUM_WORKERS: int | None = None   # DataLoader worker processes when not resident; None = one per CPU
                                 # core
CACHE_DIR: str | None = "auto"   # folders: images decoded once and kept here for later runs;
                                 # "auto": the user's cache folder (~/.cache/lra-pipeline, or
                                 # $XDG_CACHE_HOME's); None: no cache (decoded every run; streamed
                                 # by PIL workers when not resident)

# --- Model
MODEL: str = "cnn"               # "cnn" (three conv blocks), "resnet18_cifar", "fast"
                                 # (airbench94's), or any torchvision classification model:
                                 # "resnet50", "mobilenet_v3_small", "vit_b_16", ...
PRETRAINED: str | None = None    # a torchvision MODEL's ImageNet weights: "default" or a name such
                                 # as "IMAGENET1K_V2"
FREEZE: bool = False             # train only the classifier head (answer F at the prompt to
                                 # unfreeze the rest)
UNFREEZE_EPOCH: int | None = None  # with FREEZE: unfreeze the body after this epoch, as F at the
                                 # prompt does
WEIGHTS: str | None = None       # start from a saved best_model.pth; a new head when the class
                                 # count differs

# --- Optimisation
EPOCHS: int = 40                 # the epoch limit (the prompt can extend it)
BATCH_SIZE: int = 128            # images per step, per process under torchrun (128 keeps a CPU run
                                 # under 1.5 GB)
LR: float = 0.05                 # SGD learning rate (not scaled with BATCH_SIZE or the number of
                                 # processes)
MOMENTUM: float = 0.9            # SGD Nesterov momentum
WEIGHT_DECAY: float = 5e-4       # L2 penalty, coupled to the LR as in torch.optim.SGD
NORM_LR_SCALE: float = 1.0       # BatchNorm parameters train at this many times LR (decay divided
                                 # by it)
BODY_LR_SCALE: float = 0.1       # a body unfrozen after FREEZE trains at this many times LR
                                 # (fastai's discriminative LR)
LABEL_SMOOTHING: float = 0.0     # share of each target spread over the other classes
CLASS_WEIGHTS: str | None = None  # "balanced": the training loss weighs class c by n / (classes x
                                 # count_c) over the training split (scikit-learn's), so a 10:1
                                 # split trains as if balanced; None: equal. Validation and test
                                 # losses (and LRA's val_loss) stay unweighted
SCHEDULE: str = "lra"            # "lra": LRA cuts the LR on plateaus; "onecycle": fixed per-step
                                 # warm-up and decay; "cosine": per-step cosine decay from LR to 0
                                 # over the run
LOOKAHEAD: bool = False          # airbench's lookahead: every 5 steps pull the weights towards a
                                 # slow average
EMA_DECAY: float | None = None   # keep an exponential moving average of the weights and evaluate
                                 # and save it (torchvision's --model-ema); decay per optimizer
                                 # step, e.g. 0.999, warmed up as TensorFlow's: min(EMA_DECAY, (1 +
                                 # t) / (10 + t)) at step t; None: no average
ACCUMULATE_STEPS: int = 1        # batches of BATCH_SIZE whose gradients add up to one optimizer
                                 # step (a larger batch in the memory of one; CUDA graphs then stay
                                 # off)
CLIP_GRAD_NORM: float | None = None  # scale the gradients down to this total L2 norm before each
                                 # optimizer step (torch.nn.utils.clip_grad_norm_); None: no
                                 # clipping
TTA: bool = False                # final test evaluation averages flipped and shifted views

# --- LRA (README: LRA, the callback in charge)
PATIENCE: int = 1                # bad epochs in a row that cut the LR
STOP_PATIENCE: int = 3           # cuts in a row with no improvement that stop training
THRESHOLD: float = 0.9           # training accuracy below which LRA watches it; above, validation
                                 # loss
FACTOR: float = 0.5              # a cut multiplies the LR by this
DWELL: bool = True               # a cut first goes back to the best weights and optimizer state
ASK_EPOCH: int | None = 5        # ask whether to go on after this epoch; None never asks
MIN_LR: float = 0.0              # cuts never go below this LR
MIN_DELTA: float = 0.0           # smallest change that counts as an improvement

# --- Speed
BF16: bool = True                # bf16 autocast on CUDA, and on a CPU where a trial step finds it
                                 # faster (README)
CHANNELS_LAST: bool = True       # NHWC memory layout: faster convolutions on GPUs and CPUs
COMPILE: bool = False            # torch.compile the model (a slower start, faster steps)
CUDA_GRAPHS: str = "auto"        # replay each training step from a CUDA graph (one launch, not
                                 # hundreds): "yes", "no", or "auto": on CUDA in one process without
                                 # COMPILE (README)

# --- Run
SEED: int = 0                    # seeds the split, initialisation, shuffling and augmentation
OUTPUT_DIR: str = "."            # where best_model.pth, training_metrics.csv and
                                 # last_checkpoint.pth go
RESUME: str | None = None        # a last_checkpoint.pth to continue from, or "auto" (OUTPUT_DIR's,
                                 # when there)
PRESET: str | None = None        # "fast": PRESETS["fast"] replaces the constants it names
TENSORBOARD: bool = False        # also log each epoch and the test confusion matrix to
                                 # OUTPUT_DIR/tensorboard/

# airbench94's recipe on this pipeline: about 90.5% test accuracy in seconds on a GPU. As airbench,
# it trains on all 50,000 images with no validation (VAL_SPLIT = 0: one-cycle's best epoch is its
# last, so LRA keeps the last weights) and touches the test set once, at the end. 10 epochs: with
# 2,000 images held out, 10 gave 90.40% (lowest 90.25%) in 0.99x airbench94's time on an H200, 11
# gave 90.78% in 1.08x (README, The fast preset). LR and WEIGHT_DECAY are airbench's 11.5 and 0.0153
# (per 1024 images, summed loss) in torch.optim.SGD's terms for a mean loss: 11.5 / (1 + 1 / (1 -
# 0.85)) = 1.5, and 0.0153 * 1024 / 7851 / 1.5 = 1.33e-3.
# a CPU run of at least this many training steps first times bf16 against fp32 (~2 s)
BF16_TRIAL_STEPS = 500

PRESETS = {
    "fast": dict(MODEL="fast", EPOCHS=10, BATCH_SIZE=1024, LR=1.5, MOMENTUM=0.85,
    WEIGHT_DECAY=1.33e-3,
                 NORM_LR_SCALE=64.0, LABEL_SMOOTHING=0.2, SCHEDULE="onecycle", LOOKAHEAD=True,
                 TTA=True,
                 VAL_SPLIT=0, CROP_PADDING=2, REFLECT=True, FLIP="alternate", ASK_EPOCH=None),
}

# --------------------------------------------------------------------------- constants and command
# line


def constants() -> dict[str, typing.Any]:
    """The constants of this file, by name."""
    return {name: globals()[name] for name in __annotations__ if name.isupper()}


def _type_name(annotation) -> str:
    """INT for int and int | None, and so on: the metavar of a constant's flag."""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,
        )
    return next(k for k in kinds if k is not type(None)).__name__.upper()


def _parse_value(name: str, annotation) -> typing.Callable[[str], typing.Any]:
    """A command-line parser for a constant of the given type (int | None, bool, str, ...)."""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,
        )
    optional, kind = type(None) in kinds, next(k for k in kinds if k is not type(None))

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        if kind is bool:
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
        else:
            try:
                return kind(text)
            except ValueError:
                pass
        allowed = utils.type_words(annotation)  # as a checkpoint's value of the wrong type is told
        raise argparse.ArgumentTypeError(f"{name} takes {allowed}, not {text!r}")
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse that answers a mistyped flag with the closest ones, not a dump of every option."""

    def error(self, message: str) -> typing.NoReturn:
        flags = [option for action in self._actions for option in action.option_strings]
        if message.startswith("unrecognized arguments: "):
            unknown = [word for word in message.split(": ", 1)[1].split() if word.startswith("-")]
            word = (unknown or message.split(": ", 1)[1].split())[0]
            near = difflib.get_close_matches(word.split("=")[0], flags, n=3, cutoff=0.6)
            message = f"unknown flag {word}" + (f"; did you mean {' or '.join(near)}?" if near
                else "")
        self.exit(2, f"{self.prog}: error: {message}\n(python main.py --help lists every flag)\n")


def _documentation() -> dict[str, tuple[str, str]]:
    """Each constant's comment in this file (its continuation lines joined) and its group (the `#
    --- Data` line above it): what --help shows."""
    with open(__file__, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found, group, last = {}, "Constants", None
    for line in lines:
        heading = re.match(r"# --- (.+)$", line)
        constant = re.match(r"([A-Z][A-Z0-9_]*): [^#]*#\s?(.*)$", line)
        more = re.match(r"\s+#\s?(.*)$", line)
        if heading:
            group, last = heading.group(1), None
        elif constant:
            last = constant.group(1)
            found[last] = (constant.group(2).strip(), group)
        elif more and last:
            found[last] = (f"{found[last][0]} {more.group(1).strip()}", group)
        else:
            last = None
    return found


def parse_config(argv: list[str] | None = None) -> tuple[dict[str, typing.Any],
                                                         dict[str, typing.Any]]:
    """The constants, with the chosen PRESET and then the command line applied; and the command:
    what --predict, --export and --find-lr ask for instead of training (None or False when not
    given), and "given": the constants the command line set."""
    parser = _Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    documentation, groups = _documentation(), {}
    for name, value in constants().items():
        text, group = documentation.get(name, ("", "Constants"))
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(flag(name), dest=name, metavar=_type_name(__annotations__[name]),
                                   type=_parse_value(name, __annotations__[name]),
                                   default=argparse.SUPPRESS,
                                   help=f"{text} [{name}; default {value!r}]".replace("%", "%%"))
    commands = parser.add_argument_group("Instead of training")
    commands.add_argument("--predict", nargs="+", metavar="PATH",
        help="classify image files, and the images in "
                          "folders, with OUTPUT_DIR/best_model.pth; writes "
                          "OUTPUT_DIR/predictions.csv")
    commands.add_argument("--export", choices=model_module.EXPORT_KINDS,
        help="write OUTPUT_DIR/best_model.pth as "
                          "model.onnx or torch.export's model.pt2, checked against PyTorch on real "
                          "test images")
    commands.add_argument("--find-lr", action="store_true",
        help="run the LR range test: lr_finder.png and a "
                          "suggested LR")
    args = vars(parser.parse_args(argv))
    command = {name: args.pop(name) for name in ("predict", "export", "find_lr")}
    command["given"] = set(args)
    config = constants()
    preset = args.get("PRESET", config["PRESET"])
    if preset is not None and preset not in PRESETS:
        parser.error(utils.not_known("PRESET", preset, (None, *PRESETS)))
    config.update(PRESETS.get(preset, {}))
    config.update(args)
    return config, command


# how far a resumed run goes, and where it is;
RESUME_MAY_CHANGE = ("EPOCHS", "ASK_EPOCH", "RESUME", "OUTPUT_DIR",
                     # where its data is now
                     "DATA_DIR", "DOWNLOAD", "CACHE_DIR", "NUM_WORKERS", "TENSORBOARD")
# recorded as absolute paths, so a resume finds them from anywhere
PATHS = ("DATA_DIR", "CACHE_DIR", "WEIGHTS")


def resumed_config(values: dict[str, typing.Any], given: set[str],
                   checkpoint: dict[str, typing.Any] | None) -> dict[str, typing.Any]:
    """With a checkpoint to resume (read_checkpoint's), the constants the resumed run started with,
    so it goes on as it began; the flags in RESUME_MAY_CHANGE given now apply, and any other given
    flag that differs from the run's is refused (ValueError naming both values)."""
    if checkpoint is None:
        return values
    path, saved = _resume_path(values), checkpoint["config"]
    mine = {"RESUME", "OUTPUT_DIR"} | (given & set(RESUME_MAY_CHANGE))  # where, how far it goes
    taken = {name: saved[name] for name in values if name in saved and name not in mine}
    for name, value in taken.items():  # the run's own settings, of the types their flags take
        try:
            utils.check_type(name, value, __annotations__[name])
        except ValueError as error:
            raise checkpoint_module.damaged(f"RESUME {path}", error, checkpoint_module.RESUME_FIX) \
                from None
    schedule = optim_module.SCHEDULES.get(saved.get("SCHEDULE"))  # it, Lookahead: sized to EPOCHS
    fixed = ("EPOCHS",) if saved.get("LOOKAHEAD") or schedule and schedule.sized_to_epochs else ()
    for name in sorted(given - set(RESUME_MAY_CHANGE) | (given & set(fixed))):
        if name in saved and saved[name] != values[name]:
            raise ValueError(
                f"{flag(name)} {values[name]!r} differs from the run in {path}, which has {name} = "
                             f"{saved[name]!r}; leave the flag out to resume, or start a new run "
                             "elsewhere")
    try:  # and in the ranges build_config allows them
        build_config({**values, **taken})
    except ValueError as error:
        named = re.match(r"[A-Z][A-Z0-9_]*", str(error))
        if named and named.group(0) in taken:  # else a flag's error, which build_config gives again
            raise checkpoint_module.damaged(f"RESUME {path}", error, checkpoint_module.RESUME_FIX) \
                from None
    return {**values, **taken}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What setup, train and report read besides the modules' configs (SEED and CHANNELS_LAST are
    DataConfig's): each field but resume is the constant of the same name in upper case, checked as
    it is built."""

    model: str
    pretrained: str | None
    freeze: bool
    weights: str | None
    bf16: bool
    cuda_graphs: str
    class_weights: str | None  # the weights themselves come from the data (setup)
    tta: bool
    tensorboard: bool
    resume: str | None  # RESUME's checkpoint ("auto": OUTPUT_DIR's, when there); None: a new run

    def __post_init__(self) -> None:
        model_module.check_name(self.model)
        utils.check_fields(self, {}, {"cuda_graphs": step_module.CUDA_GRAPHS,
                                      "class_weights": train_module.CLASS_WEIGHTS})


@dataclasses.dataclass(frozen=True)
class Config:
    """One run's settings: the constants after PRESET and the command line (`constants`, by name,
    paths made absolute: what each checkpoint records), and the configs built from them and checked
    as they are built."""

    constants: dict[str, typing.Any]
    data: data_module.DataConfig
    optim: optim_module.OptimConfig
    lra: callback_module.LRAConfig
    fit: train_module.FitConfig
    run: RunConfig


def build_config(values: dict[str, typing.Any]) -> Config:
    """Each config from the constants (the one place that reads them by name); ValueError naming the
    first constant that is out of range."""
    run = RunConfig(**_lower(values, "MODEL", "PRETRAINED", "FREEZE", "WEIGHTS", "BF16",
                             "CUDA_GRAPHS", "CLASS_WEIGHTS", "TTA", "TENSORBOARD"),
                    resume=_resume_path(values))
    weights = model_module.preprocessing(run.model, run.pretrained) or {}  # their preparation
    own_size = values["IMAGE_SIZE"] is not None
    data = data_module.DataConfig(
        **_lower(values, "DATASET", "DATA_DIR", "BATCH_SIZE", "VAL_SPLIT", "TRAIN_SUBSET",
        "AUGMENT",
                 "CROP_PADDING", "FLIP", "REFLECT", "RESIDENT", "NUM_WORKERS", "DOWNLOAD", "SEED",
                 "CHANNELS_LAST", "CACHE_DIR"),
        augmentations=_lower(values, *map(str.upper, augment_module.AUGMENTATIONS)),
        image_size=values["IMAGE_SIZE"] if own_size else weights.get("crop_size", 32),
        resize_size=None if own_size else weights.get("resize_size"),
        mean=weights.get("mean"), std=weights.get("std"))
    optim = optim_module.OptimConfig(**_lower(values, "LR", "MOMENTUM", "WEIGHT_DECAY",
        "NORM_LR_SCALE",
                                              "BODY_LR_SCALE", "SCHEDULE", "LOOKAHEAD",
                                              "EMA_DECAY"))
    lra = callback_module.LRAConfig(**_lower(values, "PATIENCE", "STOP_PATIENCE", "THRESHOLD",
        "FACTOR", "DWELL",
                                             "ASK_EPOCH", "MIN_LR", "MIN_DELTA", "UNFREEZE_EPOCH"),
                                    adjust_lr=optim_module.SCHEDULES[optim.schedule].shape is None)
    fit = train_module.FitConfig(**_lower(values, "EPOCHS", "OUTPUT_DIR", "LABEL_SMOOTHING",
        "COMPILE",
                                          "ACCUMULATE_STEPS", "CLIP_GRAD_NORM"))
    recorded = {**values, **{name: os.path.abspath(values[name]) for name in PATHS
                             if values[name] not in (None, "auto")}}
    return Config(recorded, data, optim, lra, fit, run)


def as_typed(message: str, given: set[str]) -> str:
    """A message that starts "NAME = value" about a constant the user set by its flag, said as they
    typed it: "--name value (NAME) ..."."""
    match = re.match(r"([A-Z][A-Z0-9_]*) = (\S+)", message)
    if not match or match.group(1) not in given:
        return message
    name, value = match.groups()
    return f"{flag(name)} {value} ({name}){message[match.end():]}"


def _lower(values: dict[str, typing.Any], *names: str) -> dict[str, typing.Any]:
    """The named constants as a config's fields: {"val_split": VAL_SPLIT, ...}."""
    return {name.lower(): values[name] for name in names}


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything setup builds for train and report."""

    device: torch.device
    data: data_module.Data
    state: state_module.TrainState
    # the config's, with what setup found out: precision, CUDA graph, processes
    fit: train_module.FitConfig
    rank: int
    account: utils.TimeAccount  # where the run's time goes
    tensorboard: report_module.TensorBoardLog | None = None

    @property
    def main_process(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class Outcome:
    """What one run gives back to code that calls it (the benchmarks): the exit status and the
    figures."""

    status: int
    history: list[dict] = dataclasses.field(default_factory=list)  # one metrics dict per epoch
    fit_seconds: float | None = None  # the whole of fit: training, validation, LRA and the files
    # evaluate's result on the test set, and its "seconds"
    test: dict[str, typing.Any] | None = None
    time: dict[str, float] | None = None  # the time account: seconds by part, "other" and "total"


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the test set and report (or predict, export, find the LR); returns the
    exit status."""
    return run_main(argv).status


def run_main(argv: list[str] | None = None) -> Outcome:
    """main, returning the run's figures too. Ctrl-C or SIGTERM anywhere ends it with one line and
    130 or 143, and a worker process that dies with one line and WORKER_DIED."""
    values, command = parse_config(argv)
    stage = ["starting"]  # what the run is doing: said when an interruption stops it there
    with utils.signals_interrupt():
        try:
            return _run(values, command, argv, stage)
        except KeyboardInterrupt as interrupt:  # wherever train did not take it
            print(_interrupted_line(stage[0], values["OUTPUT_DIR"]), file=sys.stderr)
            return Outcome(utils.interrupt_status(interrupt))
        except utils.WorkerDied as error:  # the out-of-memory killer's, most often
            print(f"error: {error}, then run again", file=sys.stderr)
            return Outcome(WORKER_DIED)


WORKER_DIED = 4  # the exit status of a run whose worker process died (most often: short of memory)
FINAL_EVALUATION = "evaluating the trained model on the test set"  # report's stage


def _interrupted_line(stage: str, output_dir: str) -> str:
    """The one line for a run interrupted outside the epochs (train and predict say their own)."""
    go_on = shlex.join(["python", "main.py", "--resume", "auto", "--output-dir", output_dir])
    if stage == FINAL_EVALUATION:
        return (f"Interrupted during the final evaluation; training is done and saved. To "
                f"evaluate, run: {go_on}")
    return f"Interrupted while {stage}."


def _run(values: dict[str, typing.Any], command: dict[str, typing.Any], argv: list[str] | None,
         stage: list[str]) -> Outcome:
    """run_main's work; stage[0] says what it is doing."""
    if command["predict"] or command["export"]:
        stage[0] = "predicting" if command["predict"] else "exporting the model"
        return Outcome(_inference(values, command))
    rank, world_size, local_rank = utils.init_distributed()
    global _imports_counted
    account = utils.TimeAccount(STARTED if not _imports_counted else time.perf_counter())
    if not _imports_counted:  # the first run of this process pays for them
        account.add("imports", IMPORTED - STARTED)
        _imports_counted = True
    try:
        try:
            path = _resume_path(values)  # RESUME and OUTPUT_DIR are never the checkpoint's own
            saved = checkpoint_module.read_checkpoint(path) if path else None  # read once, for both
            config = build_config(resumed_config(values, command["given"], saved))
            stage[0] = "loading the data and building the model, before training"
            run = setup(config, rank, world_size, local_rank, account, saved, new_run=not command[
                "find_lr"])
        # bad constants, data, weights or checkpoint: one clear line
        except (ValueError, OSError) as error:
            print(f"error: {as_typed(str(error), command['given'])}", file=sys.stderr)
            return Outcome(3 if isinstance(error, utils.WriteFailed) else 2)
        if command["find_lr"]:
            stage[0] = "finding the LR"
            return Outcome(find_lr(config, run, argv if argv is not None else sys.argv[1:]))
        stage[0] = "training"
        outcome = train(config, run)
        # finished, or stopped by a non-finite loss with the best weights restored
        if outcome.status in (0, 1):
            stage[0] = FINAL_EVALUATION
            try:
                outcome.test = report(config, run)
                outcome.time = account.figures()
                if run.main_process:
                    print(account.line())
                    checkpoint_module.record_time(run.fit.output_dir, outcome.time)
            except OSError as error:
                print(f"error: {error}", file=sys.stderr)
                outcome.status = 3
        return outcome
    finally:
        utils.unlock_folder(values["OUTPUT_DIR"])
        utils.close_distributed()


def _inference(values: dict[str, typing.Any], command: dict[str, typing.Any]) -> int:
    """--predict or --export, with the configs of the constants given."""
    try:
        config = build_config(values)
    except ValueError as error:  # a bad constant: one clear line
        print(f"error: {as_typed(str(error), command['given'])}", file=sys.stderr)
        return 2
    if command["predict"]:
        return inference_module.predict(config.fit.output_dir, config.data.num_workers,
                                        command["predict"])
    return inference_module.export(config.fit.output_dir, config.data, command["export"],
                                   command["given"])


def setup(config: Config, rank: int, world_size: int, local_rank: int, account: utils.TimeAccount,
          saved: dict[str, typing.Any] | None = None, new_run: bool = True) -> Run:
    """Seed, device, data, model and the training state, resumed from saved (RESUME's checkpoint, as
    read_checkpoint read it) when given; for a new run the earlier run's files move to
    OUTPUT_DIR/previous/. Raises ValueError or OSError for anything the user got wrong, before any
    training."""
    options, output_dir = config.run, config.fit.output_dir
    folder_module.check_output_dir(config.data, output_dir)  # before anything is read or written
    utils.check_writable(output_dir)
    checkpoint_module.check_output_dir(output_dir)  # a run file that is a link: refused
    # another run writing there: refused at once
    utils.check_unlocked(output_dir, main_process=rank == 0)
    if saved is None and options.weights is not None and not os.path.isfile(options.weights):
        # as get_model would
        raise utils.CheckpointError(f"WEIGHTS {options.weights} does not exist")
    # downloaded before any decoding
    model_module.fetch_pretrained(options.model, options.pretrained)
    utils.seed_everything(config.data.seed)
    device = utils.get_device(local_rank)
    cuda_graph = step_module.use_cuda_graph(options.cuda_graphs, device, world_size=world_size,
                                            compile=config.fit.compile, main_process=rank == 0,
                                            accumulate_steps=config.fit.accumulate_steps)
    torch.backends.cudnn.benchmark = True
    with account.timed("data"):
        data = data_module.get_data(config.data, device, rank=rank, world_size=world_size)
    with account.timed("model"):
        state = _make_state(config, data, device, lr_device=device if cuda_graph else None,
            rank=rank,
                            fresh=saved is None)
    if world_size > 1:
        utils.seed_everything(config.data.seed + rank)  # same initial weights, other augmentations
    total_steps = config.fit.epochs * len(data.train)
    with account.timed("precision"):
        # rank 0 measures; every rank takes its answer
        precision = utils.broadcast(step_module.choose_precision(
            options.bf16, device, state.model, data.image_size,
            channels_last=config.data.channels_last,
            trial=saved is None and rank == 0 and total_steps >= BF16_TRIAL_STEPS,
            recorded=saved and saved["precision"]))
    state.info = state_module.RunInfo(config.constants, data.classes, list(data.mean),
                                      list(data.std), data.image_size, data.resize_size, precision,
                                      started=saved["started"] if saved
                                      else checkpoint_module.timestamp())
    class_weights = train_module.balanced_class_weights(data.class_counts, data.classes) \
        if options.class_weights == "balanced" else None
    fit = dataclasses.replace(config.fit, autocast_dtype=torch.bfloat16 if precision == "bf16"
        else None,
                              cuda_graph=cuda_graph, world_size=world_size, main_process=rank == 0,
                              class_weights=class_weights)
    if rank == 0:
        checkpoint_module.check_room(output_dir, state, resuming=saved is not None)
    os.makedirs(output_dir, exist_ok=True)  # only now: bad input above leaves nothing behind
    # held until run_main ends (or the process dies)
    utils.lock_folder(output_dir, main_process=rank == 0)
    if rank == 0:
        # what a killed run was writing: never a whole file
        checkpoint_module.remove_partial_writes(output_dir)
    if saved:
        checkpoint_module.resume(saved, options.resume, state, output_dir=output_dir, rank=rank,
                                 world_size=world_size)
        if config.lra.ask_epoch != saved["config"].get("ASK_EPOCH"):  # given anew: it replaces it
            state.lra.ask_anew(config.lra.ask_epoch)
    # the earlier run's files go to OUTPUT_DIR/previous/, so OUTPUT_DIR holds this one's
    elif rank == 0 and new_run:
        checkpoint_module.move_earlier_run(output_dir)
    tensorboard = None
    if options.tensorboard and rank == 0 and new_run:
        folder = os.path.join(output_dir, report_module.TENSORBOARD, state.info.started)
        tensorboard = report_module.TensorBoardLog(folder)
    return Run(device, data, state, fit, rank, account, tensorboard)


def _make_state(config: Config, data: data_module.Data, device: torch.device,
    lr_device: torch.device | None,
                rank: int, fresh: bool) -> state_module.TrainState:
    """A run's model (on the device), optimizer, schedule, Lookahead, EMA and LRA; fresh: a new run,
    which starts from WEIGHTS (a resumed one takes its weights from its checkpoint). The schedule
    and Lookahead count optimizer steps (ACCUMULATE_STEPS batches each)."""
    options = config.run
    model = model_module.get_model(options.model, len(data.classes), freeze=options.freeze,
                                   weights=options.weights if fresh else None,
                                   sample_images=data.train.first_images,
                                   image_size=data.image_size,
                                   pretrained=options.pretrained)
    layout = torch.channels_last if config.data.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    optimizer = optim_module.make_optimizer(model, config.optim, lr_device=lr_device)
    total_steps = config.fit.epochs * step_module.optimizer_steps(len(data.train),
        config.fit.accumulate_steps)
    schedule = optim_module.make_schedule(optimizer, config.optim.schedule, config.optim.lr,
        total_steps)
    lookahead = optim_module.Lookahead(model, total_steps) if config.optim.lookahead else None
    ema = optim_module.EMA(model,
        config.optim.ema_decay) if config.optim.ema_decay is not None else None
    lra = LRA(config.lra, frozen=bool(model_module.frozen_parameters(model)), main_process=rank
        == 0,
              share=utils.broadcast)
    return state_module.TrainState(model, optimizer, lra, schedule=schedule, lookahead=lookahead,
        ema=ema)


def train(config: Config, run: Run) -> Outcome:
    """fit, with Ctrl-C, SIGTERM, a non-finite loss and a failed write turned into a message and a
    status; then the training curves, whatever ended it."""
    output_dir, accumulate = run.fit.output_dir, run.fit.accumulate_steps
    go_on = shlex.join(["python", "main.py", "--resume", "auto", "--output-dir", output_dir])
    accumulation = f", {accumulate} to an optimizer step" if accumulate > 1 else ""
    if run.main_process:
        graphed = " (steps replayed from a CUDA graph)" if run.fit.cuda_graph else ""
        print(f"{config.run.model} on {run.device}{graphed} | "
              f"{utils.plural(len(run.data.train), 'batch', 'batches')} of "
              f"{config.data.batch_size} per epoch"
              f"{accumulation} | "
              f"{_data_path(run.data)} | outputs in {utils.printable(os.path.abspath(output_dir))}")
        if run.fit.class_weights is not None:
            print(_class_weights_line(run.fit.class_weights, run.data.classes))
    started, outcome, message = time.perf_counter(), Outcome(0), None
    try:
        outcome.history = train_module.fit(run.state, run.data, run.fit, account=run.account,
                                           on_epoch=run.tensorboard.log_epoch if run.tensorboard
                                           else None)
        outcome.fit_seconds = time.perf_counter() - started
    except KeyboardInterrupt as interrupt:
        outcome.status = utils.interrupt_status(interrupt)
        message = f"Interrupted. The last completed epoch is saved; to go on, run: {go_on}"
    except train_module.NonFiniteLoss as error:
        outcome.status = 1
        message = (f"error: {error}. The best weights so far are in "
                   f"{output_dir}/{checkpoint_module.BEST_MODEL}; "
                   f"try a lower LR.")
    # a full disk, say: the files written whole before it stay as they were
    except OSError as error:
        fix = "free the space" if error.errno == errno.ENOSPC else "fix the disk"
        outcome.status, message = 3, f"error: {error}; {fix}, then go on with: {go_on}"
    except utils.WorkerDied as error:  # a DataLoader worker died (the out-of-memory killer, say)
        outcome.status, message = WORKER_DIED, f"error: {error}, then go on with: {go_on}"
    if run.main_process and run.state.history and outcome.status != 3:
        try:
            with run.account.timed("reports"):
                report_module.plot_training_curves(run.state.history, os.path.join(output_dir,
                    report_module.CURVES))
        except OSError as error:
            # a stop's own message stands; the curves are only a picture of it
            if outcome.status in (0, 1):
                outcome.status, message = 3, f"error: {error}"
    if run.main_process and message:
        print(message, file=sys.stderr)
    return outcome


def _class_weights_line(weights: tuple[float, ...], classes: list[str]) -> str:
    """The line that says the training loss is weighted: the smallest and the largest weight, and
    their classes."""
    low, high = min(range(len(weights)), key=weights.__getitem__), max(range(len(weights)),
        key=weights.__getitem__)
    spread = f"{weights[low]:.3g} for every class (a balanced split)" if weights[low] == weights[
        high] else \
        f"{weights[low]:.3g} ({classes[low]}) to {weights[high]:.3g} ({classes[high]})"
    return f"class weights (CLASS_WEIGHTS balanced, the training loss only): {spread}"


def _data_path(data: data_module.Data) -> str:
    """Where the training batches come from, in words."""
    if data.resident:
        return "data resident on the device"
    return (
        "data streamed from the decoded-image cache"
        if data.cache_file
        else "data streamed by DataLoader workers"
    )


def _resume_path(constants: dict[str, typing.Any]) -> str | None:
    """The checkpoint RESUME points at ("auto": OUTPUT_DIR's, when there), or None."""
    if constants["RESUME"] != "auto":
        return constants["RESUME"]
    path = os.path.join(constants["OUTPUT_DIR"], checkpoint_module.CHECKPOINT)
    return path if os.path.exists(path) else None


def report(config: Config, run: Run) -> dict[str, typing.Any]:
    """Evaluate the (best) model, or its EMA with EMA_DECAY, on the test set, print the accuracy and
    each class's recall (its accuracy: the share of its images called it), write the test report
    (test_report.csv, recall among its columns), the confusion matrix and the most confident
    mistakes; return the figures."""
    data, started, tta = run.data, time.perf_counter(), config.run.tta
    with run.account.timed("final evaluation"):
        result = train_module.evaluate(run.state.evaluated_model, data.test,
            autocast_dtype=run.fit.autocast_dtype,
                                       tta=tta, num_classes=len(data.classes), collect=True)
    result["seconds"] = time.perf_counter() - started
    if not run.main_process:
        return result
    split = "validation" if data.test_is_val else "test"
    which = {"validation": "Validation accuracy (no test/ folder)", "test": "Test accuracy"}[split]
    print(f"{which}: {100 * result['acc']:.2f}% (loss {result['loss']:.4f}"
          f"{', with test-time augmentation' if tta else ''}; {result['seconds']:.1f} s)")
    print("Recall of each class (the share of its images called it):")
    for name, recall in zip(data.classes, result["per_class"]):
        print(f"  {name:>12}: {100 * recall:6.2f}%")
    warning = chance_warning(result, len(data.classes), run.state.history)
    if warning:
        print(warning)
    with run.account.timed("reports"):
        report_module.write_test_outputs(result, data.classes, data.mean, data.std,
            run.fit.output_dir, split)
    if run.tensorboard:
        run.tensorboard.log_confusion(result["confusion"], data.classes, step=len(
            run.state.history))
        run.tensorboard.close()
    return result


def chance_warning(result: dict[str, typing.Any], num_classes: int, history: list[
        dict]) -> str | None:
    """One line when the final evaluation is at chance (accuracy within two standard errors of
    1/classes, loss within 1% of ln classes: the same output for every image), with the likely
    cause; None otherwise."""
    chance, images = 1 / num_classes, int(result["confusion"].sum())
    if abs(result["acc"] - chance) > 2 * math.sqrt(chance * (1 - chance) / images) or \
            abs(result["loss"] - math.log(num_classes)) > 0.01 * math.log(num_classes):
        return None
    trained = max((row["train_acc"] for row in history), default=0.0)
    cause = (f"training accuracy reached {100 * trained:.0f}%, so in eval mode the model gives "
             "every image the same "
             "output (BatchNorm statistics behind the weights, as with few steps an epoch): try "
             "--pretrained "
             f"default, a smaller --batch-size or --model cnn") if trained > 2 * chance else \
        "nothing was learnt: try a lower --lr, or --find-lr's suggestion"
    return (f"warning: the final accuracy {100 * result['acc']:.1f}% is chance (1/{num_classes}) "
            "and the loss "
            f"{result['loss']:.4f} is ln {num_classes}; {cause}")


def find_lr(config: Config, run: Run, argv: list[str]) -> int:
    """The LR range test on the training data, instead of training: lr_finder.png and a suggested
    LR, with the command (argv, the LR finder's own flags and --lr replaced) that trains at it."""
    lrs, losses, suggestion = optim_module.find_lr(
        run.state.model, run.data.train, run.state.optimizer,
        train_module.training_loss(run.fit).to(run.device), autocast_dtype=run.fit.autocast_dtype)
    if run.main_process:
        path = os.path.join(run.fit.output_dir, report_module.LR_FINDER)
        report_module.plot_lr_finder(lrs, losses, suggestion, path)
        print(f"LR finder: {len(lrs)} steps, LR {lrs[0]:.0e} to {lrs[-1]:.1e}. Suggested LR: "
              f"{suggestion:.2g} "
              "(the middle of the longest fall of the smoothed loss, fastai's valley rule; plot: "
              f"{path}). "
              "To train at it: "
              f"{_command_with(argv, {'--find-lr': None, '--lr': f'{suggestion:.2g}'})}")
    return 0


def _command_with(argv: list[str], changes: dict[str, str | None]) -> str:
    """`python main.py` and argv, with each flag in changes dropped (None) or set to its value (at
    the end)."""
    kept, skip = [], False
    for word in argv:
        name = word.split("=")[0]
        if skip and not word.startswith("--"):
            continue
        skip = name in changes
        if not skip:
            kept.append(word)
    kept += [part for name, value in changes.items() if value is not None for part in (name, value)]
    return shlex.join(["python", "main.py", *kept])


if __name__ == "__main__":
    status = main()
    # exit without a last collection of every object torch made: about 1 s (README, Start-up)
    gc.freeze()
    sys.exit(status)
