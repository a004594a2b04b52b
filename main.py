"""Train an image classifier on CIFAR-10 (or any ImageFolder tree) with the LRA callback in charge.

Edit the constants below, or set any for one run on the command line: `--epochs 3` sets EPOCHS,
`--train-subset none` sets TRAIN_SUBSET to None. `python main.py --predict IMAGE [IMAGE ...]`
classifies images with OUTPUT_DIR/best_model.pth."""

import gc
import os
import re
import signal
import sys
import time
import traceback
import typing

# the time account's start: everything below it is counted, the imports first
STARTED = time.perf_counter()
# no cycle collections while torch's modules load: a quarter of the imports' time (README, Start-up)
gc.disable()
# on Apple's MPS, run missing operations on the CPU
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")


def _stop_while_starting(signum, frame) -> None:
    """Ctrl-C or SIGTERM while the modules load or the flags are read (nothing to clean up yet):
    one line, no traceback (under torchrun, rank 0's). Once the run has ended: ignored."""
    if _run_ended:
        return
    if os.environ.get("RANK", "0") == "0":
        os.write(2, b"Interrupted while starting.\n")
    os._exit(130 if signum == signal.SIGINT else 143)


_run_ended: list[bool] = []  # not empty once run_main has ended the run
_SIGNALS_BEFORE = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
for _signum in _SIGNALS_BEFORE:  # where not ignored (nohup, a script's background job: Ctrl-C)
    if _SIGNALS_BEFORE[_signum] != signal.SIG_IGN:
        signal.signal(_signum, _stop_while_starting)

import torch  # noqa: E402, F401 (torch must see the setting above when it loads)

import augment_module
import callback_module
import checkpoint_module
import cli_module
import data_module
import distributed_module
import export_module
import files_module
import inference_module
import messages_module
import model_module
import optim_module
import process_module
import run_module
import train_module
import utils
from messages_module import flag

# the modules' objects, never garbage, leave the collector's sight: later collections skip them
gc.freeze()
gc.enable()
# run_main takes them from here. The script keeps its own, which run_main puts back as it
# returns: a signal while the process exits is no traceback, nor a kill
for _signum, _handler in _SIGNALS_BEFORE.items():
    if __name__ != "__main__":
        signal.signal(_signum, _handler)
IMPORTED = time.perf_counter()
_imports_counted = False  # whether a run's time account has counted them

# Every annotated UPPER_CASE name below is a constant: settable here or as --lower-case-name on the
# command line, recorded in each checkpoint, and checked before anything runs.

# --- Data
DATA_DIR: str = "./data"         # holds cifar-10-batches-py/ (fetched when missing), or train/ val/
                                 # test/ trees; or is the CSV file (DATASET "csv")
DATASET: str = "cifar10"         # "cifar10", "folder" for an ImageFolder tree:
                                 # DATA_DIR/train/<class>/<image>, or "csv": DATA_DIR is a CSV of
                                 # image paths (relative to its folder, or absolute) and labels
CSV_COLUMNS: str = "path,label,split"  # DATASET "csv": its path, label and (optional; train, val
                                 # or test, empty for train) split columns' names
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
MONITOR: str = "val_loss"        # the validation metric that picks the best weights, and that LRA
                                 # watches from THRESHOLD on: "val_loss", "val_acc", or for
                                 # imbalanced classes "macro_f1" or "balanced_acc"
WARMUP_EPOCHS: int = 0           # the LR rises linearly, step by step, to LR over these first
                                 # epochs (step s of S at LR x s / S, under any SCHEDULE); LRA
                                 # neither counts nor cuts during them

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
TRACKER: str | None = None       # also log the run to "tensorboard" (OUTPUT_DIR/tensorboard/) or
                                 # "mlflow" (OUTPUT_DIR/mlruns/, or $MLFLOW_TRACKING_URI); None: off
DIST_TIMEOUT: float = 600        # torchrun: seconds a process waits for the others at a collective
                                 # before it gives up (NCCL's default); a process that fails tells
                                 # the others at once, so this only ends a process that hangs

# a CPU run of at least this many training steps first times bf16 against fp32 (~2 s)
BF16_TRIAL_STEPS = 500

# airbench94's recipe on this pipeline: about 90.5% test accuracy in seconds on a GPU. As airbench,
# it trains on all 50,000 images with no validation (VAL_SPLIT = 0: one-cycle's best epoch is its
# last, so LRA keeps the last weights) and touches the test set once, at the end. 10 epochs keep
# within airbench94's time, a fraction of a point below its accuracy (benchmarks/RESULTS.md,
# time_to_accuracy.py). LR and WEIGHT_DECAY are airbench's 11.5 and 0.0153 (per 1024 images, summed
# loss) in torch.optim.SGD's terms for a mean loss: 11.5 / (1 + 1 / (1 - 0.85)) = 1.5, and
# 0.0153 * 1024 / 7851 / 1.5 = 1.33e-3.
PRESETS = {
    "fast": dict(MODEL="fast", EPOCHS=10, BATCH_SIZE=1024, LR=1.5, MOMENTUM=0.85,
                 WEIGHT_DECAY=1.33e-3, NORM_LR_SCALE=64.0, LABEL_SMOOTHING=0.2,
                 SCHEDULE="onecycle", LOOKAHEAD=True, TTA=True, VAL_SPLIT=0, CROP_PADDING=2,
                 REFLECT=True, FLIP="alternate", ASK_EPOCH=None),
}

# ----------------------------------------------------------------------- constants and command line


def constants() -> dict[str, typing.Any]:
    """The constants of this file, by name."""
    return {name: globals()[name] for name in __annotations__ if name.isupper()}


def parse_config(
        argv: list[str] | None = None) -> tuple[dict[str, typing.Any], dict[str, typing.Any]]:
    """The constants (PRESET, then the flags, applied) and the command asked for instead of training
    (--predict, --export, --find-lr: None or False when not asked), whose "given" holds the
    constants the flags set."""
    parser = cli_module.make_parser(__doc__.splitlines()[0], constants(), __annotations__, __file__)
    commands = parser.add_argument_group("Instead of training")
    commands.add_argument("--predict", nargs="+", metavar="PATH",
                          help="classify image files, and the images in folders, with "
                          "OUTPUT_DIR/best_model.pth; writes OUTPUT_DIR/predictions.csv")
    commands.add_argument("--export", choices=export_module.EXPORT_KINDS,
                          help="write OUTPUT_DIR/best_model.pth as model.onnx or torch.export's "
                          "model.pt2, checked against PyTorch on real test images")
    commands.add_argument("--find-lr", action="store_true",
                          help="run the LR range test: lr_finder.png and a suggested LR")
    args = vars(parser.parse_args(argv))
    command = {name: args.pop(name) for name in ("predict", "export", "find_lr")}
    command["given"] = set(args)
    config = constants()
    preset = args.get("PRESET", config["PRESET"])
    if preset is not None and preset not in PRESETS:
        parser.error(messages_module.not_known("PRESET", preset, (None, *PRESETS)))
    config.update(PRESETS.get(preset, {}))
    config.update(args)
    return config, command


# what a resume may change: how far the run goes, where it is, and where its data is now
RESUME_MAY_CHANGE = ("EPOCHS", "ASK_EPOCH", "RESUME", "OUTPUT_DIR", "DATA_DIR", "CSV_COLUMNS",
                     "DOWNLOAD", "CACHE_DIR", "NUM_WORKERS", "TRACKER", "DIST_TIMEOUT")
# recorded as absolute paths, so a resume finds them from anywhere
PATHS = ("DATA_DIR", "CACHE_DIR", "WEIGHTS")


def resumed_config(values: dict[str, typing.Any], given: set[str],
                   checkpoint: dict[str, typing.Any] | None) -> dict[str, typing.Any]:
    """With a checkpoint to resume (read_checkpoint's), the constants the run started with, so it
    goes on as it began; given flags in RESUME_MAY_CHANGE apply, any other that differs from the
    run's is refused (ValueError naming both values)."""
    if checkpoint is None:
        return values
    path, saved = _resume_path(values), checkpoint["config"]
    mine = {"RESUME", "OUTPUT_DIR"} | (given & set(RESUME_MAY_CHANGE))  # where, how far it goes
    taken = {name: saved[name] for name in values if name in saved and name not in mine}
    for name, value in taken.items():  # the run's own settings, of the types their flags take
        try:
            messages_module.check_type(name, value, __annotations__[name])
        except ValueError as error:
            raise checkpoint_module.damaged(f"RESUME {path}", error,
                                            checkpoint_module.RESUME_FIX) from None
    schedule = optim_module.SCHEDULES.get(saved.get("SCHEDULE"))  # it, Lookahead: sized to EPOCHS
    fixed = ("EPOCHS",) if saved.get("LOOKAHEAD") or schedule and schedule.sized_to_epochs else ()
    for name in sorted(given - set(RESUME_MAY_CHANGE) | (given & set(fixed))):
        if name in saved and saved[name] != values[name]:
            raise ValueError(f"{flag(name)} {values[name]!r} differs from the run in {path}, "
                             f"which has {name} = {saved[name]!r}; leave the flag out to resume, "
                             "or start a new run elsewhere")
    try:  # and in the ranges build_config allows them
        build_config({**values, **taken})
    except ValueError as error:
        named = re.match(r"[A-Z][A-Z0-9_]*", str(error))
        if named and named.group(0) in taken:  # else a flag's error, which build_config gives again
            raise checkpoint_module.damaged(f"RESUME {path}", error,
                                            checkpoint_module.RESUME_FIX) from None
    return {**values, **taken}


def build_config(values: dict[str, typing.Any]) -> run_module.Config:
    """Each config from the constants (the one place that reads them by name); ValueError naming the
    first constant that is out of range."""
    run = run_module.RunConfig(**_lower(values, "MODEL", "PRETRAINED", "FREEZE", "WEIGHTS", "BF16",
                                        "CUDA_GRAPHS", "CLASS_WEIGHTS", "TTA", "TRACKER",
                                        "DIST_TIMEOUT"),
                               resume=_resume_path(values), bf16_trial_steps=BF16_TRIAL_STEPS)
    weights = model_module.preprocessing(run.model, run.pretrained) or {}  # their preparation
    own_size = values["IMAGE_SIZE"] is not None
    data = data_module.DataConfig(
        **_lower(values, "DATASET", "DATA_DIR", "BATCH_SIZE", "VAL_SPLIT", "TRAIN_SUBSET",
                 "AUGMENT", "CROP_PADDING", "FLIP", "REFLECT", "RESIDENT", "NUM_WORKERS",
                 "DOWNLOAD", "SEED", "CHANNELS_LAST", "CACHE_DIR", "CSV_COLUMNS"),
        augmentations=_lower(values, *map(str.upper, augment_module.AUGMENTATIONS)),
        image_size=values["IMAGE_SIZE"] if own_size else weights.get("crop_size", 32),
        resize_size=None if own_size else weights.get("resize_size"),
        mean=weights.get("mean"), std=weights.get("std"))
    optim = optim_module.OptimConfig(**_lower(values, "LR", "MOMENTUM", "WEIGHT_DECAY",
                                              "NORM_LR_SCALE", "BODY_LR_SCALE", "SCHEDULE",
                                              "LOOKAHEAD", "EMA_DECAY", "WARMUP_EPOCHS"))
    lra = callback_module.LRAConfig(**_lower(values, "PATIENCE", "STOP_PATIENCE", "THRESHOLD",
                                             "FACTOR", "DWELL", "ASK_EPOCH", "MIN_LR", "MIN_DELTA",
                                             "UNFREEZE_EPOCH", "MONITOR", "WARMUP_EPOCHS"),
                                    adjust_lr=optim_module.SCHEDULES[optim.schedule].shape is None)
    fit = train_module.FitConfig(**_lower(values, "EPOCHS", "OUTPUT_DIR", "LABEL_SMOOTHING",
                                          "COMPILE", "ACCUMULATE_STEPS", "CLIP_GRAD_NORM"))
    recorded = {**values, **{name: os.path.abspath(values[name]) for name in PATHS
                             if values[name] not in (None, "auto")}}
    return run_module.Config(recorded, data, optim, lra, fit, run)


def _lower(values: dict[str, typing.Any], *names: str) -> dict[str, typing.Any]:
    """The named constants as a config's fields: {"val_split": VAL_SPLIT, ...}."""
    return {name.lower(): values[name] for name in names}


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the test set and report (or predict, export, find the LR); returns the
    exit status."""
    return run_main(argv).status


def run_main(argv: list[str] | None = None) -> run_module.Outcome:
    """main, returning the run's figures too. Ctrl-C or SIGTERM anywhere ends it with one line and
    130 or 143, and a worker process that dies with one line and WORKER_DIED. Under torchrun the
    first process to fail ends every process with its status, and rank 0 prints its line."""
    values, command = parse_config(argv)
    stage = ["starting"]  # what the run is doing: said when an interruption stops it there
    end = distributed_module.end_together  # under torchrun: every process ends, rank 0 says why
    with process_module.signals_interrupt():
        try:
            return _run(values, command, argv, stage)
        except KeyboardInterrupt as interrupt:  # wherever train did not take it
            process_module.ending()  # the first statement of each way out: signals are ignored
            return run_module.Outcome(end(process_module.interrupt_status(interrupt),
                                          run_module.interrupted_line(stage[0],
                                                                      values["OUTPUT_DIR"])))
        except process_module.WorkerDied as error:  # the out-of-memory killer's, most often
            process_module.ending()
            return run_module.Outcome(
                end(run_module.WORKER_DIED, f"error: {error}, then run again"))
        except Exception as error:  # under torchrun: another process's failure, or this one's
            process_module.ending()
            status = distributed_module.failed_collective(error, run_module.WORKER_DIED)
            if status is None and not distributed_module.is_distributed():
                raise
            if status is None:  # a fault of its own: where it happened, and the others end too
                frame = traceback.extract_tb(error.__traceback__)[-1]
                where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
                status = end(1,
                             f"error on rank {distributed_module.rank()}: {type(error).__name__}: "
                             f"{error} (at {where}; one process shows the traceback)")
            return run_module.Outcome(status)
        finally:
            process_module.ending()
            _run_ended.append(True)
            distributed_module.close_distributed()


def _run(values: dict[str, typing.Any], command: dict[str, typing.Any], argv: list[str] | None,
         stage: list[str]) -> run_module.Outcome:
    """run_main's work; stage[0] says what it is doing."""
    if command["predict"] or command["export"]:
        stage[0] = "predicting" if command["predict"] else "exporting the model"
        return run_module.Outcome(_inference(values, command))
    try:
        rank, world_size, local_rank = distributed_module.init_distributed(values["DIST_TIMEOUT"])
    except ValueError as error:  # every process has it: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {cli_module.as_typed(str(error), command['given'])}", file=sys.stderr)
        return run_module.Outcome(2)
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
            run = run_module.setup(config, rank, world_size, local_rank, account, saved,
                                   new_run=not command["find_lr"])
        # bad constants, data, weights or checkpoint: one clear line
        except (ValueError, OSError) as error:
            return run_module.Outcome(distributed_module.end_together(
                3 if isinstance(error, files_module.WriteFailed) else 2,
                f"error: {cli_module.as_typed(str(error), command['given'])}"))
        if command["find_lr"]:
            stage[0] = "finding the LR"
            return run_module.Outcome(
                run_module.find_lr(config, run, argv if argv is not None else sys.argv[1:]))
        stage[0] = "training"
        outcome = run_module.train(config, run)
        # finished, or stopped by a non-finite loss with the best weights restored (under torchrun
        # the other processes end with it: no report)
        if (outcome.status == 0 or outcome.status == 1 and world_size == 1
                and run.state.lra.best_epoch is not None):  # weights to report on
            stage[0] = run_module.FINAL_EVALUATION
            try:
                outcome.test = run_module.report(config, run)
                outcome.time = account.figures()
                if run.main_process:
                    print(account.line())
                    checkpoint_module.record_time(run.fit.output_dir, outcome.time)
            except OSError as error:
                outcome.status = distributed_module.end_together(3, f"error: {error}")
        return outcome
    finally:
        files_module.unlock_folder(values["OUTPUT_DIR"])


def _inference(values: dict[str, typing.Any], command: dict[str, typing.Any]) -> int:
    """--predict or --export, with the configs of the constants given."""
    try:
        config = build_config(values)
    except ValueError as error:  # a bad constant: one clear line
        print(f"error: {cli_module.as_typed(str(error), command['given'])}", file=sys.stderr)
        return 2
    if command["predict"]:
        return inference_module.predict(config.fit.output_dir, config.data.num_workers,
                                        command["predict"])
    return inference_module.export(config.fit.output_dir, config.data, command["export"],
                                   command["given"])


def _resume_path(constants: dict[str, typing.Any]) -> str | None:
    """The checkpoint RESUME points at ("auto": OUTPUT_DIR's, when there), or None."""
    if constants["RESUME"] != "auto":
        return constants["RESUME"]
    path = os.path.join(constants["OUTPUT_DIR"], checkpoint_module.CHECKPOINT)
    return path if os.path.exists(path) else None


if __name__ == "__main__":
    status = main()
    for _signum in _SIGNALS_BEFORE:  # the run has ended: a signal now, even late in the
        signal.signal(_signum, signal.SIG_IGN)  # interpreter's shutdown, cannot change its status
    # exit without a last collection of every object torch made: about 1 s (README, Start-up)
    gc.freeze()
    sys.exit(status)
