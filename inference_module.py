"""After training: --predict classifies images with OUTPUT_DIR/best_model.pth, --export writes it as
ONNX or .pt2, checked against PyTorch on real images of the run's data."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
import typing

import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as F
from tqdm import tqdm

import augment_module
import checkpoint_module
import cifar_module
import csv_module
import data_module
import export_module
import files_module
import image_module
import messages_module
import model_module
import process_module
import train_module
import utils
import walk_module

PREDICT_BATCH = 64  # images per batch for --predict
# --predict prints a line per image up to this many images (all go to predictions.csv)
PREDICT_PRINT = 20
PREDICT_SAVE_SECONDS = 30  # a long --predict rewrites predictions.csv this often: a kill -9 loses
# no more than this, and the rewrites of a growing CSV stay a small share of the time


def find_images(paths: list[str]) -> tuple[list[str], walk_module.Skipped]:
    """The files to classify (each file named, and the images walk_images finds under each folder)
    and what the walk skipped."""
    skipped = walk_module.Skipped()
    folders = [path for path in paths if os.path.isdir(path)]
    listed = iter(walk_module.walk_images(folders, skipped))
    found = []
    for path in paths:
        found += next(listed) if path in folders else [path]
    return found, skipped


class PredictionImages(Dataset):
    """Files prepared as load_image does: item i is (image, "") or, unreadable, (zeros, message)."""

    def __init__(self, paths: list[str], image_size: int, mean, std,
                 resize_size: int | None = None):
        self.paths, self.options = paths, (image_size, mean, std, resize_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return image_module.load_image(self.paths[i], *self.options), ""
        except image_module.DataError as error:
            return torch.zeros(3, self.options[0], self.options[0]), str(error)


def _best_model(output_dir: str) -> tuple[dict[str, typing.Any], nn.Module]:
    """best_model.json and best_model.pth's model in output_dir, on the device, in eval mode."""
    info = checkpoint_module.load_best_model_info(output_dir)  # each field checked
    path, classes = os.path.join(output_dir, checkpoint_module.BEST_MODEL), len(info["classes"])
    state = utils.load_state_dict(path, "the best model")
    heads = [tensor for name, tensor in state.items() if name.startswith("head.") and
             name.endswith("weight") and tensor.dim() >= 1]  # the last one has a row for each class
    if not heads or heads[-1].shape[0] != classes:  # checked before a model of that size is built
        raise utils.CheckpointError(f"{path} does not classify the {classes} classes that "
                                    f"{checkpoint_module.BEST_MODEL_INFO} beside it lists; "
                                    "they are not of one run: train again to rewrite them")
    model = model_module.get_model(info["model"], classes, image_size=info["image_size"])
    model_module.load_weights(model, state, path)
    return info, model.to(utils.get_device()).eval()


def _example_images(data_dir: str, dataset: str, info: dict[str, typing.Any], csv_columns: str,
                    n: int = 5) -> torch.Tensor:
    """n real images of the data's test split (else val, else train), prepared as for --predict."""
    if dataset == "cifar10":
        prepare = augment_module.evaluation_transform(None, info["mean"], info["std"])
        test_images = cifar_module.read_cifar10(data_dir, download=False)[2]
        return torch.stack([prepare(Image.fromarray(image.numpy())) for image in test_images[:n]])
    if dataset == "csv":
        splits = csv_module.list_csv(data_dir, csv_columns).splits
        files = [path for split in ("test", "val", "train") for path, _ in splits.get(split, [])]
    else:
        folders = [os.path.join(data_dir, split) for split in ("test", "val", "train")]
        files, _ = find_images([next((f for f in folders if os.path.isdir(f)), data_dir)])
    dataset = PredictionImages(files[:n], info["image_size"], info["mean"], info["std"],
                               info.get("resize_size"))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def export(output_dir: str, data: data_module.DataConfig, kind: str, given: set[str]) -> int:
    """Export best_model.pth to OUTPUT_DIR and run it on real test images (the run's data unless
    --data-dir/--dataset are `given`). Returns 0 when its logits agree with PyTorch's, 2 for bad
    input, 3 when the export fails or disagrees."""
    path = os.path.join(output_dir, export_module.EXPORT_FILES[kind])
    try:
        export_module.check_export(kind)
        checkpoint_module.check_output_dir(output_dir, (export_module.EXPORT_FILES[kind],))
        info, model = _best_model(output_dir)
        data_dir, dataset = (getattr(data, name) if name.upper() in given or info.get(name) is None
                             else info[name] for name in ("data_dir", "dataset"))
        images = _example_images(data_dir, dataset, info, data.csv_columns)
        files_module.lock_folder(output_dir)  # it writes there: never while a run does
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        difference = export_module.export(
            model.cpu(), path, kind, mean=info["mean"], std=info["std"], classes=info["classes"],
            example_images=images, resize_size=info.get("resize_size"))
    except Exception as error:  # exporters fail many ways on odd models; best_model.pth is intact
        if isinstance(error.__cause__, KeyboardInterrupt):  # amid an extension's import (pybind11's
            raise error.__cause__ from None  # "initialization failed"): a signal, no export error
        print(f"error: could not export {path} "
              f"({str(error).splitlines()[0] if str(error) else type(error).__name__})",
              file=sys.stderr)
        return 3
    finally:
        files_module.unlock_folder(output_dir)
    print(f"Exported {path}; its largest logit difference from PyTorch's on {len(images)} test "
          f"images, at batch sizes 1 and 5: {difference:.1e} (relative)")
    if difference > export_module.EXPORT_TOLERANCE:
        print(f"error: {path} differs from PyTorch by more than "
              f"{export_module.EXPORT_TOLERANCE:g}; do not ship it", file=sys.stderr)
        return 3
    return 0


def predict(output_dir: str, num_workers: int | None, paths: list[str]) -> int:
    """Classify files and folders' images (recursively) with best_model.pth into predictions.csv
    (paths as printable shows them), a line per image when few. Returns 2 when a file named on the
    command line is missing or not an image (the rest is written), a folder holds a link loop, or
    nothing was classified (the old CSV then stays). Ctrl-C, SIGTERM (130, 143) and a dead worker
    (WorkerDied) keep the rows so far."""
    try:
        output = os.path.join(output_dir, checkpoint_module.PREDICTIONS)
        problem = files_module.not_a_plain_file(output)
        if problem:  # what it writes is never written through a link
            raise ValueError(problem)
        info, model = _best_model(output_dir)
        files, skipped = find_images(paths)
    except (ValueError, OSError) as error:  # a bad run file, or a link loop in a folder given
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in skipped.warnings():
        print(f"warning: {line} (in the folders given)", file=sys.stderr)
    images = PredictionImages(files, info["image_size"], info["mean"], info["std"],
                              info.get("resize_size"))
    workers = 0 if len(files) <= PREDICT_BATCH else (num_workers if num_workers is not None
                                                     else os.cpu_count() or 1)
    loader = DataLoader(images, batch_size=PREDICT_BATCH, num_workers=workers,
                        worker_init_fn=functools.partial(process_module.become_worker, os.getpid()))
    rows = []
    try:
        status = _classify(model, loader, files, info["classes"], rows, output)
    except KeyboardInterrupt as interrupt:
        kept = _kept(rows, output)
        print(f"Interrupted with {len(rows)} of {len(files)} images classified; {kept}",
              file=sys.stderr)
        return process_module.interrupt_status(interrupt)
    except (RuntimeError, ConnectionError, EOFError) as error:  # a DataLoader worker died, say
        died = process_module.worker_died(error, "reading the images to classify")
        if died is None:
            raise
        raise process_module.WorkerDied(f"{died} ({_kept(rows, output)})") from None
    if not rows:  # each file given was named in an error line; the last predictions.csv stays
        if not files:
            print(f"error: no image files in {', '.join(map(messages_module.printable, paths))}",
                  file=sys.stderr)
        return 2
    try:
        _write_predictions(rows, output)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(f"Wrote {len(rows)} predictions to {messages_module.printable(output)}",
          file=sys.stderr if len(files) <= PREDICT_PRINT else sys.stdout)
    return status


def _classify(model: nn.Module, loader: DataLoader, files: list[str], classes: list[str],
              rows: list[dict[str, typing.Any]], output: str) -> int:
    """predict's batches, each row appended as it comes (an interruption keeps them), the CSV
    rewritten every PREDICT_SAVE_SECONDS; 2 when a file did not read, else 0."""
    status, done, saved = 0, 0, time.monotonic()
    batches = iter(loader)
    process_module.sigchld_default()  # a worker that dies is reported by the loader
    for batch, errors in tqdm(batches, desc="predicting", unit="batch", total=len(loader),
                              disable=not sys.stderr.isatty()):
        top = train_module.predict_proba(model, batch).topk(min(3, len(classes)))
        for path, error, values, indices in zip(files[done:], errors, top.values.tolist(),
                                                top.indices.tolist()):
            if error:
                print(f"error: {error}", file=sys.stderr)
                status = 2
                continue
            ranked = [(classes[i], p) for p, i in zip(values, indices)]
            # as written and printed: a name that is not UTF-8 shows its bytes
            path = messages_module.printable(path)
            rows.append({"path": path, **{f"{key}{k}": value
                                          for k, (name, p) in enumerate(ranked, start=1)
                                          for key, value in (("top", name), ("p", round(p, 6)))}})
            if len(files) <= PREDICT_PRINT:
                print(f"{path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in ranked))
        done += len(errors)
        if time.monotonic() - saved > PREDICT_SAVE_SECONDS and done < len(files):
            with contextlib.suppress(OSError):  # a failed write is reported by the last one
                _write_predictions(rows, output)
            saved = time.monotonic()
    return status


def _write_predictions(rows: list[dict[str, typing.Any]], output: str) -> None:
    """predictions.csv, atomically, cells spreadsheet-safe (a name "=1+2" is shown, never run)."""
    frame = pd.DataFrame(rows, columns=["path", "top1", "p1", "top2", "p2", "top3", "p3"])
    frame = utils.spreadsheet_safe(frame)
    files_module.atomic_write(output, lambda f: frame.to_csv(f, index=False))


def _kept(rows: list[dict[str, typing.Any]], output: str) -> str:
    """Write the rows so far (an interrupted --predict); say where, or why not."""
    if not rows:
        return f"{messages_module.printable(output)} is left as it was"
    try:
        _write_predictions(rows, output)
    except OSError as error:
        return f"{error}"
    return f"{len(rows)} predictions written to {messages_module.printable(output)}"


# --------------------------------------------------------------------------- the Python API


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's k most probable classes, the most probable first, and their probabilities."""

    classes: list[str]
    probabilities: list[float]


class Predictor:
    """A run's best model on the best device, classifying as --predict does:
    Predictor.load(output_dir).predict(images)."""

    def __init__(self, output_dir: str):
        self.info, self.model = _best_model(output_dir)
        self.classes: list[str] = self.info["classes"]

    def predict(self, images: typing.Any, k: int = 5) -> list[Prediction]:
        """One Prediction per image (top min(k, classes)), in order. images: a path, PIL image, (3,
        H, W) tensor or (N, 3, H, W) batch, or a list of these; tensors uint8 or floats in [0, 1]
        (rounded to 8 bits, as a file holds them); prepared as --predict prepares a file."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"predict takes k, the classes per image, of 1 or more, not {k!r}")
        items, found = _each_image(images), []
        for start in range(0, len(items), PREDICT_BATCH):  # a batch's images at a time in memory
            batch = torch.stack([self._prepare(one) for one in items[start:start + PREDICT_BATCH]])
            top = train_module.predict_proba(self.model, batch).topk(min(k, len(self.classes)))
            found += [Prediction([self.classes[i] for i in indices], values)
                      for values, indices in zip(top.values.tolist(), top.indices.tolist())]
        return found

    def _prepare(self, image: str | os.PathLike | Image.Image | torch.Tensor) -> torch.Tensor:
        options = (self.info["image_size"], self.info["mean"], self.info["std"],
                   self.info.get("resize_size"))
        if isinstance(image, (str, os.PathLike)):
            return image_module.load_image(os.fspath(image), *options)
        size = tuple(image.shape if isinstance(image, torch.Tensor) else image.size)
        if 0 in size:  # nothing to resize
            raise ValueError(f"predict takes images of 1 x 1 pixel or more, not of size {size}")
        if isinstance(image, torch.Tensor):
            if not (image.dtype == torch.uint8 or image.is_floating_point()):
                raise ValueError(f"predict takes uint8 or float tensors, not {image.dtype}: "
                                 "make one of 0-255 values .to(torch.uint8)")
            if image.is_floating_point() and not 0 <= image.min() <= image.max() <= 1:
                raise ValueError("predict takes float tensors of values in [0, 1] (or uint8), "
                                 f"not from {image.min():.3g} to {image.max():.3g}: not normalised")
            image = F.to_pil_image(image.cpu() if image.dtype == torch.uint8
                                   else (image.cpu() * 255).round().to(torch.uint8))
        return image_module.prepare_image(image, *options)


def load(output_dir: str) -> Predictor:
    """The best model of the run in output_dir, ready to classify: load(dir).predict(images)."""
    return Predictor(output_dir)


def _each_image(images: typing.Any) -> list:
    """predict's images as a list of single images (a batch tensor split into its images)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    each = [one for item in items for one in (item if isinstance(item, torch.Tensor)
                                              and item.dim() == 4 else [item])]
    for item in each:
        if not isinstance(item, (str, os.PathLike, Image.Image, torch.Tensor)) or (
                isinstance(item, torch.Tensor) and item.dim() != 3):
            raise ValueError("predict takes image paths, PIL images or (3, H, W) or (N, 3, H, W) "
                             f"tensors, not {messages_module.short_repr(item)}")
    return each
