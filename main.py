"""Train an image classifier on CIFAR-10 (or any ImageFolder tree) with the LRA callback in charge.

Edit the constants below, or set any of them for one run from the command line: `--epochs 3` sets
EPOCHS, `--data-dir DIR` sets DATA_DIR, `--train-subset none` sets TRAIN_SUBSET to None.
`python main.py --predict IMAGE [IMAGE ...]` classifies images with OUTPUT_DIR/best_model.pth.
"""

import argparse
import os
import signal
import sys
import time
import types
import typing

import torch
from torch import nn

import data_module
import model_module
import train_module
import utils
from callback_module import LRA

# Every annotated UPPER_CASE name below is a constant: settable here or as --lower-case-name on the
# command line, recorded in each checkpoint, and checked before anything runs.

# --- Data
DATA_DIR: str = "./data"         # holds cifar-10-batches-py/ (fetched when missing), or train/ val/ test/ trees
DATASET: str = "cifar10"         # "cifar10", or "folder" for an ImageFolder tree: DATA_DIR/train/<class>/<image>
DOWNLOAD: bool = True            # fetch CIFAR-10 (and check the archive's checksum) when DATA_DIR lacks it
IMAGE_SIZE: int = 32             # pixels; folder images are resized and centre-cropped to it
VAL_SPLIT: int = 5000            # training images held out for validation, stratified; 0 = validate on the test set
TRAIN_SUBSET: int | None = None  # train on only this many images (stratified), for quick runs; None = all
CROP_PADDING: int = 4            # random-crop shift in pixels (0 = no crop)
REFLECT: bool = False            # crops pad by reflecting the border instead of with black
FLIP: str = "random"             # "random" flips, "alternate" (each image every other epoch, as airbench) or "none"
RESIDENT: str = "auto"           # keep the data on the device as uint8: "auto" (when it fits), "yes" or "no"
NUM_WORKERS: int | None = None   # DataLoader worker processes when not resident; None = one per CPU core

# --- Model
MODEL: str = "cnn"               # "cnn" (three conv blocks), "resnet18" (adapted to 32x32) or "fast" (airbench94's)
FREEZE: bool = False             # train only the classifier head (answer F at the prompt to unfreeze the rest)
UNFREEZE_EPOCH: int | None = None  # with FREEZE: unfreeze the body after this epoch, as F at the prompt does
WEIGHTS: str | None = None       # start from a saved best_model.pth; a new head when the class count differs

# --- Optimisation
EPOCHS: int = 40                 # the epoch limit (the prompt can extend it)
BATCH_SIZE: int = 128            # images per step, per process under torchrun (128 keeps a CPU run under 1.5 GB)
LR: float = 0.05                 # SGD learning rate (not scaled with BATCH_SIZE or the number of processes)
MOMENTUM: float = 0.9            # SGD Nesterov momentum
WEIGHT_DECAY: float = 5e-4       # L2 penalty, coupled to the LR as in torch.optim.SGD
NORM_LR_SCALE: float = 1.0       # BatchNorm parameters train at this many times LR (decay divided by it)
LABEL_SMOOTHING: float = 0.0     # share of each target spread over the other classes
SCHEDULE: str = "lra"            # "lra": LRA cuts the LR on plateaus; "onecycle": fixed per-step warm-up and decay
LOOKAHEAD: bool = False          # airbench's lookahead: every 5 steps pull the weights towards a slow average
TTA: bool = False                # final test evaluation averages flipped and shifted views

# --- LRA (../shared/docs/LRA.md)
PATIENCE: int = 1                # bad epochs in a row that cut the LR
STOP_PATIENCE: int = 3           # cuts in a row with no improvement that stop training
THRESHOLD: float = 0.9           # training accuracy below which LRA watches it; above, validation loss
FACTOR: float = 0.5              # a cut multiplies the LR by this
DWELL: bool = True               # a cut first goes back to the best weights and optimizer state
ASK_EPOCH: int | None = 5        # ask whether to go on after this epoch; None never asks
MIN_LR: float = 0.0              # cuts never go below this LR
MIN_DELTA: float = 0.0           # smallest change that counts as an improvement

# --- Speed
BF16: bool = True                # bf16 autocast on CUDA (ignored on the CPU)
CHANNELS_LAST: bool = True       # NHWC memory layout: faster convolutions on GPUs and CPUs
COMPILE: bool = False            # torch.compile the model (a slower start, faster steps)

# --- Run
SEED: int = 0                    # seeds the split, initialisation, shuffling and augmentation
OUTPUT_DIR: str = "."            # where best_model.pth, training_metrics.csv and last_checkpoint.pth go
RESUME: str | None = None        # a last_checkpoint.pth to continue from, or "auto" (OUTPUT_DIR's, when there)
PRESET: str | None = None        # "fast": PRESETS["fast"] replaces the constants it names

# airbench94's recipe on this pipeline: >= 90.6% test accuracy in seconds on a GPU. It trains on all
# 50,000 images and validates on the test set each epoch (VAL_SPLIT = 0), as airbench does.
# LR and WEIGHT_DECAY are airbench's 11.5 and 0.0153 (per 1024 images, summed loss) in torch.optim.SGD's
# terms for a mean loss: 11.5 / (1 + 1 / (1 - 0.85)) = 1.5, and 0.0153 * 1024 / 7851 / 1.5 = 1.33e-3.
PRESETS = {
    "fast": dict(MODEL="fast", EPOCHS=12, BATCH_SIZE=1024, LR=1.5, MOMENTUM=0.85, WEIGHT_DECAY=1.33e-3,
                 NORM_LR_SCALE=64.0, LABEL_SMOOTHING=0.2, SCHEDULE="onecycle", LOOKAHEAD=True, TTA=True,
                 VAL_SPLIT=0, CROP_PADDING=2, REFLECT=True, FLIP="alternate", ASK_EPOCH=None),
}

CHOICES = {"DATASET": data_module.DATASETS, "MODEL": tuple(model_module.MODELS), "SCHEDULE": train_module.SCHEDULES,
           "FLIP": data_module.FLIPS, "RESIDENT": ("auto", "yes", "no"), "PRESET": (None, *PRESETS)}
CHECKS = {  # constant: (test, what is allowed)
    "EPOCHS": (lambda v: v >= 1, "a whole number >= 1"),
    "BATCH_SIZE": (lambda v: v >= 1, "a whole number >= 1"),
    "LR": (lambda v: v > 0, "a number > 0"),
    "MOMENTUM": (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "WEIGHT_DECAY": (lambda v: v >= 0, "a number >= 0"),
    "NORM_LR_SCALE": (lambda v: v > 0, "a number > 0"),
    "LABEL_SMOOTHING": (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "FACTOR": (lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
    "PATIENCE": (lambda v: v >= 1, "a whole number >= 1"),
    "STOP_PATIENCE": (lambda v: v >= 1, "a whole number >= 1"),
    "THRESHOLD": (lambda v: 0 <= v <= 1, "a fraction from 0 to 1"),
    "ASK_EPOCH": (lambda v: v is None or v >= 1, "a whole number >= 1, or None"),
    "MIN_LR": (lambda v: v >= 0, "a number >= 0"),
    "MIN_DELTA": (lambda v: v >= 0, "a number >= 0"),
    "VAL_SPLIT": (lambda v: v >= 0, "a whole number >= 0"),
    "TRAIN_SUBSET": (lambda v: v is None or v >= 1, "a whole number >= 1, or None"),
    "IMAGE_SIZE": (lambda v: v >= 8, "a whole number of pixels >= 8"),
    "CROP_PADDING": (lambda v: 0 <= v, "a whole number of pixels >= 0"),
    "NUM_WORKERS": (lambda v: v is None or v >= 0, "a whole number >= 0, or None"),
    "UNFREEZE_EPOCH": (lambda v: v is None or v >= 1, "a whole number >= 1, or None"),
}


# --------------------------------------------------------------------------- constants and command line


def constants() -> dict[str, typing.Any]:
    """The constants of this file, by name."""
    return {name: globals()[name] for name in __annotations__ if name.isupper()}


def _parse_value(name: str, annotation) -> typing.Callable[[str], typing.Any]:
    """A command-line parser for a constant of the given type (int | None, bool, str, ...)."""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
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
        allowed = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[kind]
        raise argparse.ArgumentTypeError(f"{name} takes {allowed}{' or none' if optional else ''}, not {text!r}")
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        flags = ", ".join(sorted(a.option_strings[0] for a in self._actions if a.option_strings))
        self.exit(2, f"{self.prog}: error: {message}\nvalid options: {flags}\n")


def parse_config(argv: list[str] | None = None) -> tuple[dict[str, typing.Any], list[str] | None]:
    """The constants, with the chosen PRESET and then the command line applied; and --predict's images."""
    parser = _Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    for name, value in constants().items():
        parser.add_argument("--" + name.lower().replace("_", "-"), dest=name, metavar=type(value).__name__.upper(),
                            type=_parse_value(name, __annotations__[name]), default=argparse.SUPPRESS,
                            help=f"sets {name} (now {value!r})")
    parser.add_argument("--predict", nargs="+", metavar="IMAGE", help="classify images with best_model.pth")
    args = vars(parser.parse_args(argv))
    predict = args.pop("predict", None)
    config = constants()
    preset = args.get("PRESET", config["PRESET"])
    if preset is not None and preset not in PRESETS:
        parser.error(f"PRESET = {preset!r} is not known; choose one of {', '.join(PRESETS)}, or none")
    config.update(PRESETS.get(preset, {}))
    config.update(args)
    return config, predict


def check_config(config: dict[str, typing.Any]) -> None:
    """Raise ValueError naming the first constant that is out of range."""
    for name, allowed in CHOICES.items():
        if config[name] not in allowed:
            raise ValueError(f"{name} = {config[name]!r} is not known; choose one of "
                             f"{', '.join(map(repr, allowed))}")
    for name, (test, allowed) in CHECKS.items():
        if not test(config[name]):
            raise ValueError(f"{name} = {config[name]!r} is out of range: use {allowed}")


# --------------------------------------------------------------------------- the run


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the test set and report; returns the exit status."""
    config, predict_images = parse_config(argv)
    c = types.SimpleNamespace(**config)
    if predict_images:
        return predict(c, predict_images)
    rank, world_size, local_rank = utils.init_distributed()
    try:
        try:
            check_config(config)
            run = setup(c, rank, world_size, local_rank)
        except (ValueError, OSError) as error:  # bad constants, data, weights or checkpoint: one clear line
            print(f"error: {error}", file=sys.stderr)
            return 2
        status = train(c, run)
        if status in (0, 1):  # finished, or stopped by a non-finite loss with the best weights restored
            report(run.model, run.data, run.autocast_dtype, c.TTA, run.main_process)
        return status
    finally:
        utils.close_distributed()


def setup(c, rank: int, world_size: int, local_rank: int) -> types.SimpleNamespace:
    """Seed, device, data, model, optimizer, schedule and LRA, resumed when asked. Raises ValueError or
    OSError for anything the user got wrong, before any training."""
    utils.check_writable(c.OUTPUT_DIR)
    utils.seed_everything(c.SEED)
    device = utils.get_device(local_rank)
    torch.backends.cudnn.benchmark = True
    data = data_module.get_data(
        c.DATASET, c.DATA_DIR, batch_size=c.BATCH_SIZE, val_split=c.VAL_SPLIT, train_subset=c.TRAIN_SUBSET,
        image_size=c.IMAGE_SIZE, crop_padding=c.CROP_PADDING, flip=c.FLIP, reflect=c.REFLECT,
        resident={"auto": "auto", "yes": True, "no": False}[c.RESIDENT], num_workers=c.NUM_WORKERS,
        download=c.DOWNLOAD, device=device, seed=c.SEED, rank=rank, world_size=world_size,
        channels_last=c.CHANNELS_LAST)
    model = model_module.get_model(c.MODEL, len(data.classes), freeze=c.FREEZE, weights=c.WEIGHTS,
                                   sample_images=lambda: data.train.first_images(5000))
    model = model.to(device, memory_format=torch.channels_last if c.CHANNELS_LAST else torch.preserve_format)
    if world_size > 1:
        utils.seed_everything(c.SEED + rank)  # same initial weights everywhere, different augmentations
    optimizer = train_module.make_optimizer(model, c.LR, c.MOMENTUM, c.WEIGHT_DECAY, nesterov=True,
                                            norm_lr_scale=c.NORM_LR_SCALE)
    total_steps = c.EPOCHS * len(data.train)
    scheduler = train_module.make_scheduler(optimizer, c.SCHEDULE, total_steps)
    lookahead = train_module.Lookahead(model, total_steps) if c.LOOKAHEAD else None
    lra = LRA(model, optimizer, patience=c.PATIENCE, stop_patience=c.STOP_PATIENCE, threshold=c.THRESHOLD,
              factor=c.FACTOR, dwell=c.DWELL, ask_epoch=c.ASK_EPOCH, min_lr=c.MIN_LR, min_delta=c.MIN_DELTA,
              adjust_lr=c.SCHEDULE == "lra", unfreeze_epoch=c.UNFREEZE_EPOCH, main_process=rank == 0,
              share=utils.broadcast)
    run_info = {"config": vars(c), "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
                "image_size": data.image_size}
    start_epoch, history = 1, []
    checkpoint = _resume_path(c)
    if checkpoint:
        start_epoch, history = resume(checkpoint, model, optimizer, lra, scheduler, lookahead, run_info,
                                      c.OUTPUT_DIR, rank, world_size)
    return types.SimpleNamespace(
        device=device, data=data, model=model, optimizer=optimizer, scheduler=scheduler, lookahead=lookahead,
        lra=lra, run_info=run_info, start_epoch=start_epoch, history=history, main_process=rank == 0,
        world_size=world_size, local_rank=local_rank,
        autocast_dtype=torch.bfloat16 if c.BF16 and device.type == "cuda" else None)


def train(c, run: types.SimpleNamespace) -> int:
    """fit, with Ctrl-C, SIGTERM, a non-finite loss and a full disk turned into a message and a status."""
    def wrap(model: nn.Module) -> nn.Module:
        """What runs the training batches: the model, compiled and/or data-parallel as asked."""
        if c.COMPILE:
            model = torch.compile(model)
        if run.world_size > 1:
            devices = [run.local_rank] if run.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=devices)
        return model

    if run.main_process:
        print(f"{c.MODEL} on {run.device} | {len(run.data.train)} batches of {c.BATCH_SIZE} per epoch | data "
              f"{'resident on the device' if run.data.resident else 'streamed by DataLoader workers'} | "
              f"outputs in {os.path.abspath(c.OUTPUT_DIR)}")
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        train_module.fit(run.model, run.data, run.optimizer, run.lra, epochs=c.EPOCHS,
                         loss_fn=nn.CrossEntropyLoss(label_smoothing=c.LABEL_SMOOTHING), output_dir=c.OUTPUT_DIR,
                         wrap=wrap, scheduler=run.scheduler, lookahead=run.lookahead,
                         autocast_dtype=run.autocast_dtype, start_epoch=run.start_epoch, history=run.history,
                         run_info=run.run_info, main_process=run.main_process)
    except KeyboardInterrupt as interrupt:
        if run.main_process:
            print(f"Interrupted. The last completed epoch is saved; to go on, run: python main.py --resume auto "
                  f"--output-dir {c.OUTPUT_DIR}", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except train_module.NonFiniteLoss as error:
        if run.main_process:
            print(f"error: {error}. The best weights so far are in {c.OUTPUT_DIR}/best_model.pth; try a lower "
                  f"LR.", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, say: the files of the last completed epoch stay as they were
        print(f"error: could not write the run's files ({error}); free the space and resume with "
              f"--resume auto", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


def _resume_path(c) -> str | None:
    """The checkpoint RESUME points at ("auto": OUTPUT_DIR's, when there), or None."""
    if c.RESUME != "auto":
        return c.RESUME
    path = os.path.join(c.OUTPUT_DIR, utils.CHECKPOINT)
    return path if os.path.exists(path) else None


def resume(path: str, model, optimizer, lra, scheduler, lookahead, run_info, output_dir: str,
           rank: int = 0, world_size: int = 1) -> tuple[int, list[dict]]:
    """Load a last_checkpoint.pth so the run continues exactly where it stopped; returns the next epoch
    and the history so far. Rewrites best_model.pth and the CSV from the checkpoint, its authority."""
    checkpoint = utils.load_torch(path, "RESUME")
    keys = ("epoch", "model", "optimizer", "lra", "rng", "history", "config")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in keys):
        raise utils.CheckpointError(f"RESUME {path} is not a last_checkpoint.pth of this pipeline")
    saved, current = checkpoint["config"], run_info["config"]
    for name in ("MODEL", "DATASET"):
        if saved.get(name) != current[name]:
            raise utils.CheckpointError(f"RESUME {path} was saved with {name} = {saved.get(name)!r}, but this "
                                        f"run has {current[name]!r}; set {name} to match or start afresh")
    if checkpoint.get("classes") != run_info["classes"]:
        raise utils.CheckpointError(f"RESUME {path} was trained on other classes ({checkpoint.get('classes')})")
    try:
        model.load_state_dict(checkpoint["model"])
        lra.load_state_dict(checkpoint["lra"])  # before the optimizer: fine-tuning adds a parameter group
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler"):
            scheduler.load_state_dict(checkpoint["scheduler"])
        if lookahead is not None and checkpoint.get("lookahead"):
            lookahead.load_state_dict(checkpoint["lookahead"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise utils.CheckpointError(f"RESUME {path} does not fit this run's model or optimizer "
                                    f"({str(error).splitlines()[0]})") from None
    states = checkpoint["rng"]  # one per process of the saved run
    utils.set_rng_state(states[rank] if len(states) == world_size else states[0])
    history = checkpoint["history"]
    if rank == 0:
        if lra.best_weights is not None:
            utils.save_best_model(lra.best_weights, output_dir, run_info, epoch=lra.best_epoch,
                                  val_loss=lra.best_val_loss, val_acc=lra.best_val_acc)
        utils.write_metrics(history, os.path.join(output_dir, utils.METRICS_CSV))
        print(f"Resuming {path} after epoch {checkpoint['epoch']} (best so far: epoch {lra.best_epoch}).")
    return checkpoint["epoch"] + 1, history


def report(model, data, autocast_dtype, tta: bool, main_process: bool) -> None:
    """Evaluate the (best) model on the test set and print overall and per-class accuracy."""
    started = time.perf_counter()
    result = train_module.evaluate(model, data.test, autocast_dtype=autocast_dtype, tta=tta,
                                   num_classes=len(data.classes))
    if not main_process:
        return
    which = "validation (test) set" if data.val_is_test else "test set"
    print(f"Test accuracy on the {which}: {100 * result['acc']:.2f}% (loss {result['loss']:.4f}"
          f"{', with test-time augmentation' if tta else ''}; {time.perf_counter() - started:.1f} s)")
    for name, acc in zip(data.classes, result["per_class"]):
        print(f"  {name:>12}: {100 * acc:6.2f}%")


def predict(c, paths: list[str]) -> int:
    """Print the top-3 classes of each image with OUTPUT_DIR/best_model.pth; 2 if any image failed."""
    try:
        info = utils.load_best_model_info(c.OUTPUT_DIR)
        model = model_module.get_model(info["model"], len(info["classes"]),
                                       weights=os.path.join(c.OUTPUT_DIR, utils.BEST_MODEL))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        try:
            image = data_module.load_image(path, info["image_size"], info["mean"], info["std"])
        except data_module.DataError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        probabilities = train_module.predict_proba(model, image[None])[0]
        top = probabilities.topk(min(3, len(probabilities)))
        ranked = ", ".join(f"{info['classes'][i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(),
                                                                                     top.indices.tolist()))
        print(f"{path}: {ranked}")
    return status


if __name__ == "__main__":
    sys.exit(main())
