"""Datasets and their loaders: CIFAR-10 or an ImageFolder tree read (folders through the
decoded-image cache, cache_module), split, measured, and handed to the loaders of loader_module:
kept on the device when they fit, else read from the memory-mapped cache a batch at a time, with the
same batched augmentation."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

import augment_module
import cache_module
import files_module
import messages_module
from augment_module import RESIZE_RATIO, Augmentation, batch_mixer, pil_transform
from decode_module import decode_files
from image_module import IMAGE_EXTENSIONS, DataError, check_image, read_stored, skip_reason
from loader_module import (Batching, Loader, MappedLoader, MixedLoader, ResidentLoader,
                           StreamingLoader)
from walk_module import Skipped, walk_images

DATASETS = ("cifar10", "folder")
# alternate: each image flipped every other epoch (airbench)
FLIPS = ("random", "alternate", "none")
# photo: RandomResizedCrop; shift: pad-crops; auto: photo for folders
AUGMENTS = ("auto", "photo", "shift")
SPLITS = ("train", "val", "test")  # a folder tree's split folders: DATA_DIR/<split>/<class>/<image>
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
# VAL_SPLIT unset, CIFAR-10: validation images held out of its 50,000 training images
CIFAR_VAL_SPLIT = 5000
# VAL_SPLIT unset, a folder without val/: one image in this many held out of train/
FOLDER_VAL_SHARE = 10
# keep data on the device only when it takes at most this share of free memory
RESIDENT_SHARE = 0.25
MAX_IMAGE_SIZE = 1024  # pixels: above the largest published weights' crop (efficientnet_b7's 600);
# a batch of 128 such float images takes 1.6 GB already, and 60,000 pixels would ask 43 GB an image
STATISTICS_SAMPLE = 2000  # images that estimate a folder's mean and std (decoding all is slow)

CHOICES = {"dataset": DATASETS, "augment": AUGMENTS, "flip": FLIPS,
           "resident": ("auto", "yes", "no")}
RULES: messages_module.Rules = {  # a field: (test, what is allowed)
    "batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "val_split": (lambda v: v is None or v >= 0, "a whole number >= 0, or None"),
    "train_subset": (lambda v: v is None or v >= 1, "a whole number >= 1, or None"),
    "image_size": (lambda v: 8 <= v <= MAX_IMAGE_SIZE,
                   f"a whole number of pixels from 8 to {MAX_IMAGE_SIZE}"),
    "crop_padding": (lambda v: v >= 0, "a whole number of pixels >= 0"),
    "num_workers": (lambda v: v is None or v >= 0, "a whole number >= 0, or None"),
}


@dataclass(frozen=True)
class DataConfig:
    """What get_data reads and how it loads it. Each field but the four from image_size on is
    main.py's constant of the same name in upper case (its default and meaning are there), and is
    checked when the config is built (ValueError naming that constant)."""

    dataset: str
    data_dir: str
    batch_size: int
    val_split: int | None
    train_subset: int | None
    image_size: int  # IMAGE_SIZE, or the pretrained weights' crop size, else 32; CIFAR-10 stays 32
    resize_size: int | None  # photo folders: pixels stored at; None: image_size / RESIZE_RATIO
    mean: tuple[float, ...] | None  # a pretrained model's normalisation; None: the training images'
    std: tuple[float, ...] | None  # given with mean
    augment: str
    crop_padding: int
    flip: str
    reflect: bool
    augmentations: dict[str, Any]  # augment_module.AUGMENTATIONS' settings by name: AUTO_AUGMENT's
    # as "auto_augment", ...
    resident: str
    num_workers: int | None
    download: bool
    seed: int
    channels_last: bool
    cache_dir: str | None

    def __post_init__(self):
        messages_module.check_fields(self, RULES, CHOICES)
        augment_module.check(self.augmentations)
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together or not at all")

    def augmentation(self, mean, std, crop_size: int | None) -> Augmentation:
        """What the loaders do to each image, with these statistics; crop_size: photos' (None:
        pad-crops)."""
        return Augmentation(tuple(map(float, mean)), tuple(map(float, std)), crop_size,
                            self.crop_padding, self.flip, self.reflect, self.augmentations)


@dataclass
class Data:
    """The loaders of one run and what the rest of the pipeline needs to know about them."""

    train: Loader
    val: Loader | None  # None: VAL_SPLIT = 0, no validation (the test set is never used for it)
    test: Loader
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    resident: bool
    # a folder without test/: the test loader is the validation loader, the final evaluation
    test_is_val: bool
    # is on the validation images
    # photo folders: the size images are stored at and resized to; None for CIFAR
    resize_size: int | None = None
    # photo folders: the decoded-image cache the images come from; None: no cache
    cache_file: str | None = None
    # the training split's images of each class (every rank's shard
    class_counts: tuple[int, ...] | None = None
    # together), after VAL_SPLIT and TRAIN_SUBSET: what balanced class weights come from


def _flag(name: str) -> str:
    """A constant of main.py as the user types it, with its name beside it: "--val-split
    (VAL_SPLIT)"."""
    return f"{messages_module.flag(name)} ({name})"


# --------------------------------------------------------------------------- sources
# A source is one split's images and labels, wherever they live: `labels`, `len` and `take(index)`
# for splitting, `decode` for the resident loader (uint8 images in memory), `statistics`, and
# `read(i)` (a PIL image) for the streaming loader, the fallback for what has no cache.


@dataclass
class Images:
    """uint8 images and their labels in memory: the main kind of source."""

    images: torch.Tensor  # uint8 (N, H, W, C)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> Images:
        """The images at these indices."""
        return Images(self.images[index], self.labels[index])

    def read(self, i: int) -> Image.Image:
        """Image i as a PIL image, for the streaming loader's transforms."""
        return Image.fromarray(self.images[i].numpy())

    def decode(self, num_workers: int, desc: str, device: torch.device | None = None) -> Images:
        """Already decoded: itself."""
        return self

    def statistics(self, seed: int, num_workers: int) -> tuple[tuple[float, ...], tuple[float,
            ...]]:
        """Exact per-channel mean and std of all the images."""
        return channel_stats(self.images)


@dataclass
class MappedImages:
    """Rows of the decoded-image cache (uint8, memory-mapped) and their labels: splitting picks
    rows, and pixels are read only when a batch (or decode) asks for them."""

    images: torch.Tensor  # uint8 (M, S, S, C): the whole cache, memory-mapped
    rows: torch.Tensor  # int64 (N,): this source's rows of it
    labels: torch.Tensor  # int64 (N,)
    cache_file: str  # the cache's .npy: its statistics are remembered beside it

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> MappedImages:
        """The rows at these indices (no pixels read)."""
        return MappedImages(self.images, self.rows[index], self.labels[index], self.cache_file)

    def decode(self, num_workers: int, desc: str, device: torch.device | None = None) -> Images:
        """The rows read into memory."""
        return Images(self.images[self.rows], self.labels)

    def statistics(self, seed: int, num_workers: int) -> tuple[tuple[float, ...], tuple[float,
            ...]]:
        """Per-channel mean and std of _sampled rows, as ImageFiles estimates them; remembered
        beside the cache, so a later run of the same split reads no pixels for them."""
        sample = _sampled(self, seed)
        return cache_module.remembered(self.cache_file, sample.rows,
                                       lambda: channel_stats(sample.decode(num_workers,
                                       "statistics").images))


class ImageFiles:
    """Image files decoded when read (upright, RGB), stored as read_stored does: the source without
    a cache."""

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: torch.Tensor) -> ImageFiles:
        """The files at these indices."""
        return ImageFiles([self.paths[i] for i in index.tolist()], self.labels[index], self.size)

    def read(self, i: int) -> Image.Image:
        """File i as a PIL image of the stored size."""
        return read_stored(self.paths[i], self.size)

    def decode(self, num_workers: int, desc: str, device: torch.device | None = None) -> Images:
        """Every file decoded into uint8 (N, S, S, 3) images in memory, in parallel, with a progress
        bar (the JPEGs on the device when it is a CUDA device: decode_files)."""
        # filled in place
        images = torch.empty((len(self), self.size, self.size, 3), dtype=torch.uint8)
        failures = decode_files(self.paths, self.size, images, num_workers, desc, device=device)
        if failures:  # the scan opened every file, so only a file changed since then gets here
            raise DataError(failures[0][1])
        return Images(images, self.labels)

    def statistics(self, seed: int, num_workers: int) -> tuple[tuple[float, ...], tuple[float,
            ...]]:
        """Per-channel mean and std estimated from _sampled files."""
        return channel_stats(_sampled(self, seed).decode(num_workers, "statistics").images)


Source = Images | MappedImages | ImageFiles


def _sampled(source: MappedImages | ImageFiles, seed: int) -> MappedImages | ImageFiles:
    """A seeded sample of STATISTICS_SAMPLE of the source's images (all when it has fewer)."""
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    return source.take(order[:STATISTICS_SAMPLE])


class _Transformed(Dataset):
    """A source read as (transform(PIL image), label), for a DataLoader."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source.read(i)), int(self.source.labels[i])


# --------------------------------------------------------------------------- CIFAR-10


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10, its batch files read by _read_batch (which runs no code a file names)
    and not checked against their sums: copies rebuilt from other sources (from JPEGs, say) have
    other sums. The downloaded archive's checksum is still checked (_download_cifar10)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}

    def __init__(self, root: str, train: bool = True, transform=None, target_transform=None):
        datasets.VisionDataset.__init__(self, root, transform=transform,
                                        target_transform=target_transform)
        self.train = train
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _ in (self.train_list if train else self.test_list)]
        batches = [_read_batch(os.path.join(folder, name)) for name in names]
        rows = np.vstack([batch["data"] for batch in batches])
        self.data = rows.reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # (N, H, W, C)
        self.targets = [label for batch in batches for label in batch["labels"]]
        self.classes = _read_batch(os.path.join(folder, self.meta["filename"]))["label_names"]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


CIFAR_BATCH_BYTES = 64 * 2**20  # the most a batch file may take: one of 10,000 images takes 31 MB,
# and a file is read whole into memory before it can be looked at


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's batch files, which hold dicts, lists, text, numbers and numpy
    arrays. A pickle may name any function to call as it loads (os.system, say): find_class admits
    only those that rebuild a numpy array, so a crafted file is refused before its code runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),  # numpy 1 (the official files)
               ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               # (pickle protocol 5)
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # bytes in a protocol-2 pickle written by Python 3

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _Crafted(f"{module}.{name}")
        return super().find_class(module, name)


class _Crafted(pickle.UnpicklingError):
    """A pickle names a function CIFAR-10's batch files never call."""


def _read_batch(path: str) -> dict:
    """A CIFAR-10 batch file (the python version's pickle), read with _BatchUnpickler and checked:
    "data" uint8 rows of 3,072 with one of "labels" (0-9) each, or batches.meta's "label_names".
    DataError naming the file otherwise; a crafted file's code never runs."""
    fix = f"replace it, or delete {os.path.dirname(path)} to download CIFAR-10 again"
    size = os.path.getsize(path)
    if size > CIFAR_BATCH_BYTES:
        raise DataError(
            f"{path} is not a CIFAR-10 batch file: it takes {files_module.megabytes(size)}, "
                        f"and one never takes over {files_module.megabytes(CIFAR_BATCH_BYTES)}; "
                        f"{fix}")
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
        if os.path.basename(path) == CIFAR10.meta["filename"]:
            names = entry["label_names"]
            if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
                raise ValueError("its label_names are not a list of names")
            return entry
        data, labels = entry["data"], entry["labels"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and
                data.shape[1] == 3 * 32 * 32):
            raise ValueError("its data is not uint8 rows of 3,072 values")
        if not (isinstance(labels, list) and len(labels) == len(data) and
                all(type(label) is int and 0 <= label < 10 for label in labels)):
            raise ValueError("its labels are not a class from 0 to 9 for each image")
        return entry
    except _Crafted as error:
        raise DataError(f"{path} is not a CIFAR-10 batch file: it calls {error} as it loads, "
                        f"which CIFAR-10's never do (it may be crafted to run code), so it was "
                        f"refused and nothing in it ran; {fix}") from None
    # a pickle that is cut short or foreign fails in any of these ways
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, MemoryError, RecursionError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        message = f"{path} is not a readable CIFAR-10 batch file ({detail}); {fix}"
        raise DataError(message) from None


def read_cifar10(data_dir: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
                                                          list[str]]:
    """CIFAR-10 as (train images, train labels, test images, test labels, class names): uint8
    (N, 32, 32, 3) images and int64 labels, downloaded first when missing."""
    if os.path.isfile(data_dir):
        raise DataError(_file_message(data_dir, "cifar-10-batches-py/"))
    folder = os.path.join(data_dir, CIFAR10.base_folder)
    missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing and any(os.path.isfile(os.path.join(data_dir, name)) for name in CIFAR_FILES):
        raise DataError(
            f"{_flag('DATA_DIR')} {data_dir} holds CIFAR-10's files itself: use its parent, "
                        f"--data-dir {_parent(data_dir)}")
    if missing and download:
        try:
            _download_cifar10(data_dir)
        except (OSError, RuntimeError) as error:  # no network, refused, bad archive
            raise DataError(_missing_message(folder, missing,
                f"the download failed: {error}")) from None
        missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        reason = (
            f"{_flag('DOWNLOAD')} is false"
            if not download
            else "the downloaded archive lacked them"
        )
        raise DataError(_missing_message(folder, missing, reason))
    train, test = CIFAR10(data_dir, train=True), CIFAR10(data_dir, train=False)  # or DataError
    if len(train.classes) != 10 or len(train.data) != len(train.targets) or len(test.data) != len(
            test.targets):
        raise DataError(
            f"{folder} does not hold CIFAR-10: expected 10 classes and one label per image")
    return (torch.from_numpy(train.data), torch.tensor(train.targets), torch.from_numpy(test.data),
            torch.tensor(test.targets), list(train.classes))


def _download_cifar10(data_dir: str) -> None:
    """Download and unpack CIFAR-10 into data_dir. When that fails (or is interrupted), what the
    attempt made is removed: data_dir and the parents it lacked, or in a data_dir that was there,
    the archive and the folder that were not, so a mistyped DATA_DIR leaves nothing behind."""
    missing = _outermost_missing(data_dir)
    made = [os.path.join(data_dir, name) for name in (CIFAR10.filename, CIFAR10.base_folder)]
    made = [missing] if missing else [path for path in made if not os.path.lexists(path)]
    try:  # torchvision's download: the archive's checksum checked, then unpacked
        datasets.cifar.download_and_extract_archive(CIFAR10.url, data_dir,
                                                    filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except BaseException:
        for path in made:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        raise


def _outermost_missing(path: str) -> str | None:
    """The outermost folder of path that does not exist (path itself when only it is missing); None
    when path exists."""
    missing, path = None, os.path.abspath(path)
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _missing_message(folder: str, missing: list[str], reason: str) -> str:
    lacks = "" if len(missing) == len(CIFAR_FILES) else f" (missing {', '.join(missing)})"
    return (f"CIFAR-10 is not in {folder}{lacks} and {reason}; unpack {CIFAR10.url} in "
            f"{os.path.dirname(folder)}, "
            f"or point {_flag('DATA_DIR')} at the folder that holds cifar-10-batches-py/")


def _file_message(data_dir: str, holder_of: str) -> str:
    """The message for a DATA_DIR that is a file, not a folder."""
    archive = data_dir.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip"))
    return (f"{_flag('DATA_DIR')} {data_dir} is {'an archive' if archive else 'a file'}, not a "
            "folder; "
            f"{'unpack it and ' if archive else ''}point it at the folder that holds {holder_of}")


def _parent(path: str) -> str:
    """The folder that holds path, as the user would type it ("." for a bare name)."""
    return os.path.dirname(os.path.normpath(path)) or "."


# --------------------------------------------------------------------------- folders


def _list_tree(data_dir: str) -> tuple[list[str], dict[str, list[tuple[str, int]]], Skipped]:
    """The classes of DATA_DIR/train (their names as messages_module.printable shows them), and for
    each split (train, and val and test when there) its image files with their labels, in
    ImageFolder's order (walk_images: regular files only, each real folder once, folder links
    followed, a link loop refused); and what was skipped. Opens no file."""
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        raise DataError(_no_tree_message(data_dir))
    listings = {split: _entries(os.path.join(data_dir, split)) for split in SPLITS
                if os.path.isdir(os.path.join(data_dir, split))}
    classes = [entry.name for entry in listings["train"] if _is_folder(entry)]  # sorted by name
    if not classes:
        raise DataError(f"no readable images in {train_dir}: it has no class folders "
                        f"(train/<class>/<image>)")
    shown = [messages_module.printable(name) for name in classes]
    twins = sorted({name for name in shown if shown.count(name) > 1})
    if twins:
        raise DataError(f"{train_dir} has class folders whose names read alike once their bytes "
                        f"that are not UTF-8 are shown as \\xNN: {', '.join(twins)}; rename one")
    skipped, roots, labels, split_of = Skipped(), [], [], []
    for split, entries in listings.items():
        folder = os.path.join(data_dir, split)
        folders = {entry.name for entry in entries if _is_folder(entry)}
        extra = sorted(messages_module.printable(name) for name in folders - set(classes))
        if extra:
            raise DataError(f"{folder} has class folders that train/ lacks: {', '.join(extra)}")
        for entry in entries:
            if entry.name not in folders:
                missing = entry.is_symlink() and not os.path.exists(entry.path)
                skipped.add("dangling link" if missing else "outside the classes", entry.path)
        present = [label for label, name in enumerate(classes) if name in folders]
        roots += [os.path.join(folder, classes[label]) for label in present]
        labels += present
        split_of += [split] * len(present)
    splits = {split: [] for split in listings}
    for split, label, paths in zip(split_of, labels, walk_images(roots, skipped)):
        splits[split] += [(path, label) for path in paths]
    return shown, splits, skipped


def _entries(folder: str) -> list[os.DirEntry]:
    """A folder's entries, sorted by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        raise DataError(f"cannot list {folder} ({error.strerror}); check its permissions") from None


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder or a link to one (not a link to nothing, or in a loop)."""
    try:
        return entry.is_dir()
    except OSError:  # a loop of links, a target without permission
        return False


def _no_tree_message(data_dir: str) -> str:
    """Why DATA_DIR holds no train/: it is a file, missing, a split folder given for the folder
    above it, or a folder of class folders with no train/ around them; else where the tree is
    expected."""
    if os.path.isfile(data_dir):
        return _file_message(data_dir, "train/<class>/<image>")
    if not os.path.isdir(data_dir):
        return (f"{_flag('DATA_DIR')} {data_dir} does not exist; point it at the folder that "
                f"holds train/<class>/<image>")
    parent, class_folders = _parent(data_dir), _holds_class_folders(data_dir)
    split_name = os.path.basename(os.path.normpath(data_dir)) in SPLITS
    if os.path.isdir(os.path.join(parent, "train")) and (split_name or class_folders):
        return (
            f"{_flag('DATA_DIR')} {data_dir} is a split folder; use its parent, --data-dir {parent}"
        )
    if class_folders:
        return (f"{_flag('DATA_DIR')} {data_dir} holds class folders but no train/: move them into "
                f"{os.path.join(data_dir, 'train')}/, or point --data-dir at the folder that holds "
                "train/")
    return (f"no ImageFolder tree in {data_dir}: expected "
            f"{os.path.join(data_dir, 'train')}/<class>/<image> "
            f"(val/ and test/ beside it optional); point {_flag('DATA_DIR')} at the folder that "
            "holds train/")


def _holds_class_folders(folder: str) -> bool:
    """Whether a subfolder of folder holds an image file: folder is one split's class folders."""
    try:
        with os.scandir(folder) as entries:
            return any(entry.is_dir() and any(name.lower().endswith(IMAGE_EXTENSIONS)
                                              for name in os.listdir(entry.path))
                                              for entry in entries)
    except OSError:  # unreadable: nothing to say about it here
        return False


def _check_splits(data_dir: str, classes: list[str], splits: dict[str, list[tuple[str,
        int]]]) -> None:
    """Raise DataError unless every class of train/ has an image, there are two classes or more, and
    val/ and test/ (when there) hold images."""
    train_dir = os.path.join(data_dir, "train")
    found = {label for _, label in splits["train"]}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise DataError(f"no readable images in {train_dir}: none in the class "
                        f"{'folder' if len(empty) == 1 else 'folders'} {', '.join(empty)}")
    if len(classes) < 2:
        raise DataError(
            f"{train_dir} has {messages_module.plural(len(classes), 'class folder')} with images; "
            "a "
            "classifier needs "
                        f"at least two (train/<class>/<image>)")
    for split in ("val", "test"):
        if split in splits and not splits[split]:
            raise DataError(
                f"{os.path.join(data_dir, split)} holds no readable images; fill it or remove it")


def _readable(data_dir: str, classes: list[str], splits: dict[str, list[tuple[str, int]]],
              skipped: Skipped) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Each split's images but those skipped, as (paths, labels), after one line on stderr for each
    reason a file was skipped for (Skipped.warnings); DataError when a class or a split is left
    without images."""
    for line in skipped.warnings():
        print(f"warning: {line}", file=sys.stderr)
    skip = skipped.every_path()
    splits = {name: [(path, label) for path, label in samples if path not in skip] for name,
        samples in splits.items()}
    _check_splits(data_dir, classes, splits)
    return {name: ([path for path, _ in samples], torch.tensor([label for _, label in samples],
        dtype=torch.int64))
            for name, samples in splits.items()}


def _scan_folder(data_dir: str, size: int) -> tuple[dict[str, ImageFiles], list[str]]:
    """The train, val and (optional) test files of DATA_DIR that Pillow opens (check_image: no more
    pixels than its limit either), labelled by train/'s class folders, and the classes; the files
    are read at `size` (pixels, a square)."""
    classes, splits, skipped = _list_tree(data_dir)
    for samples in splits.values():
        for path, _ in samples:
            reason = check_image(path)
            if reason:
                skipped.add(reason, path)
    splits = _readable(data_dir, classes, splits, skipped)
    return {name: ImageFiles(paths, labels, size) for name, (paths,
        labels) in splits.items()}, classes


def _cached_folder(data_dir: str, size: int, cache_dir: str, num_workers: int,
                   device: torch.device) -> tuple[dict[str, MappedImages], list[str], str]:
    """The splits, labels and warnings of _scan_folder as rows of the decoded-image cache in
    cache_dir, built first when missing or stale (files that fail to decode are the skipped ones,
    for the reason their message gives, which the cache keeps; JPEGs decoded on the device when it
    is a CUDA device); a valid cache opens no image file. Also the cache file."""
    classes, splits, skipped = _list_tree(data_dir)
    _check_splits(data_dir, classes, splits)  # before anything is decoded
    paths = [path for samples in splits.values() for path, _ in samples]
    cache = cache_module.open_or_build(
        paths, size, cache_dir, root=data_dir,
        fill=lambda out: decode_files(paths, size, out, num_workers, "decoding", device=device))
    for i, message in cache.failed:
        skipped.add(skip_reason(message), paths[i])
    row = {path: i for i, path in enumerate(paths)}
    splits = _readable(data_dir, classes, splits, skipped)
    return {name: MappedImages(cache.images, torch.tensor([row[path] for path in paths]), labels,
        cache.path)
            for name, (paths, labels) in splits.items()}, classes, cache.path


def _read_sources(config: DataConfig, resize_size: int | None, num_workers: int,
                  device: torch.device) -> tuple[dict[str, Source], list[str], int, str | None]:
    """The train, test and (ImageFolder trees only) val sources, the class names, the stored image
    size (resize_size for a folder, 32 for CIFAR-10) and the cache file (None without one); a cache
    is built with the device's help (decode_files)."""
    data_dir, cache_dir = config.data_dir, config.cache_dir
    if config.dataset == "cifar10":
        train_images, train_labels, test_images, test_labels, classes = read_cifar10(data_dir,
            config.download)
        sources = {"train": Images(train_images, train_labels), "test": Images(test_images,
            test_labels)}
        return sources, classes, train_images.shape[1], None
    if cache_dir is not None:
        folder = cache_module.default_cache_dir() if cache_dir == "auto" else cache_dir
        try:
            sources, classes, cache_file = _cached_folder(data_dir, resize_size, folder,
                num_workers, device)
            return sources, classes, resize_size, cache_file
        except cache_module.CacheError as error:
            if cache_dir != "auto":
                raise DataError(
                    f"{_flag('CACHE_DIR')} {cache_dir}: {error}; set it to a writable folder with "
                                f"room, or to none to decode the images without a cache") from None
            print(f"warning: {error}; the images are decoded without a cache (set "
                  f"{_flag('CACHE_DIR')} to a "
                  f"writable folder to keep them)", file=sys.stderr)
    return *_scan_folder(data_dir, resize_size), resize_size, None


def check_output_dir(config: DataConfig, output_dir: str) -> None:
    """DataError when a folder's images would include OUTPUT_DIR's files (its figures read as photos
    by the next run): OUTPUT_DIR is, or is inside, DATA_DIR's train/, val/ or test/, or a class
    folder (wherever its link leads). Reads nothing but those folders' names."""
    if config.dataset != "folder":
        return
    output = os.path.realpath(output_dir)
    for split in SPLITS:
        folder = os.path.join(config.data_dir, split)
        if not os.path.isdir(folder):
            continue
        for inside in [folder] + [entry.path for entry in _entries(folder) if _is_folder(entry)]:
            real = os.path.realpath(inside)
            if output == real or output.startswith(os.path.join(real, "")):
                shown = messages_module.printable(output_dir)
                raise DataError(f"{_flag('OUTPUT_DIR')} {shown} is inside the data folder "
                                f"{messages_module.printable(inside)}, whose images the next run "
                                "would read "
                                f"with its figures among them; choose an output folder outside "
                                f"{_flag('DATA_DIR')}'s train/, val/ and test/")


# --------------------------------------------------------------------------- splitting and
# statistics


def stratified_split(labels: torch.Tensor, n_holdout: int, seed: int, *,
                     every_class: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): n_holdout held out in proportion to each class, chosen by seed.
    With every_class, each class holds out one image and keeps one at least, and the rest are shared
    in proportion to what each class has beyond those two."""
    n = len(labels)
    if not 0 <= n_holdout <= n:
        raise ValueError(f"cannot hold out {n_holdout} of {messages_module.plural(n, 'image')}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    classes, counts = labels.unique(return_counts=True)
    if not every_class:
        quota = _apportion(counts, n_holdout)
    elif (counts >= 2).all() and len(classes) <= n_holdout <= n - len(classes):
        quota = 1 + _apportion(counts - 2, n_holdout - len(classes))
    else:
        raise ValueError(
            f"cannot hold out {n_holdout} of {messages_module.plural(n, 'image')} with one of each "
            "class "
                         f"held out and one kept")
    shuffled = labels[order]
    held = torch.cat([order[shuffled == c][:q] for c, q in zip(classes.tolist(), quota.tolist())])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return mask.logical_not().nonzero().flatten(), mask.nonzero().flatten()


def _split(sources: dict[str, Source], val_split: int | None, train_subset: int | None, seed: int,
    data_dir: str,
           dataset: str, classes: list[str]) -> dict[str, Source]:
    """The train, val and test parts: validation held out unless the tree has val/ (VAL_SPLIT
    images, or default_val_split's when None; VAL_SPLIT 0: no validation, val None), a stratified
    TRAIN_SUBSET of the training images left, and the test set, or the validation images when there
    is none."""
    train, train_index = sources["train"], torch.arange(len(sources["train"]))
    if "val" in sources:
        val = sources["val"]
    elif val_split != 0:
        n_val = _n_held_out(train.labels, val_split, dataset, classes, data_dir)
        every_class = val_split is None and dataset == "folder"
        train_index, val_index = stratified_split(train.labels, n_val, seed,
            every_class=every_class)
        val = train.take(val_index)
    elif "test" in sources:
        # VAL_SPLIT = 0: train on every image and validate on none (never on the test set)
        val = None
    else:
        raise DataError(
            f"{data_dir} has no val/ or test/ folder and {_flag('VAL_SPLIT')} is 0: nothing to "
                        f"evaluate on; set it above 0, or add {data_dir}/val/<class>/<image>")
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_index):
            raise DataError(
                f"{_flag('TRAIN_SUBSET')} {train_subset} is out of range: use 1 to "
                f"{len(train_index)} "
                            "(the training images left after the validation images are held out), "
                            "or none for all")
        _, keep = stratified_split(train.labels[train_index], train_subset, seed)
        train_index = train_index[keep]
    parts = {"train": train.take(train_index), "val": val, "test": sources.get("test", val)}
    if "test" not in sources:
        print(f"note: {messages_module.printable(data_dir)} has no test/ folder; the final "
              "evaluation uses "
              f"the validation images", file=sys.stderr)
    for name, part in parts.items():
        if part is not None and len(part) == 0:
            raise DataError(
                f"the {name} split is empty; check {_flag('TRAIN_SUBSET')}, {_flag('VAL_SPLIT')} "
                            f"and {data_dir}")
    return parts


def _apportion(counts: torch.Tensor, total: int) -> torch.Tensor:
    """total shared out in proportion to counts, by largest remainder: int64 shares that sum to
    total."""
    if total == 0:
        return torch.zeros_like(counts)
    exact = counts.double() * total / int(counts.sum())
    quota = exact.floor().long()
    remainder = total - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:remainder]] += 1
    return quota


def default_val_split(dataset: str, labels: torch.Tensor) -> int:
    """VAL_SPLIT when it is None: CIFAR_VAL_SPLIT for CIFAR-10; for a folder without val/, a tenth
    of train/'s images (rounded half up), at least one image of each class and leaving at least one
    of each to train on."""
    if dataset == "cifar10":
        return CIFAR_VAL_SPLIT
    n, n_classes = len(labels), len(labels.unique())
    return min(max((n + FOLDER_VAL_SHARE // 2) // FOLDER_VAL_SHARE, n_classes), n - n_classes)


def _n_held_out(labels: torch.Tensor, val_split: int | None, dataset: str, classes: list[str],
                data_dir: str) -> int:
    """The training images to hold out for validation: VAL_SPLIT, or default_val_split's when None.
    DataError when that leaves none to train on, or (None, a folder) a class has a single image to
    split."""
    if val_split is None and dataset == "folder":
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        single = [name for name, count in zip(classes, counts) if count == 1]
        if single:
            raise DataError(
                f"{os.path.join(data_dir, 'train', single[0])} has a single image, and an unset "
                            f"{_flag('VAL_SPLIT')} holds out one of each class; add images or "
                            "val/, or set it")
    n_val = default_val_split(dataset, labels) if val_split is None else val_split
    if n_val < len(labels):
        return n_val
    images = messages_module.plural(len(labels), "image")
    if val_split is None:
        raise DataError(
            f"{_flag('VAL_SPLIT')} is unset, which holds out {n_val} of CIFAR-10's training "
            "images, "
                        f"but there are {images}; set a smaller one")
    if dataset == "folder":
        raise DataError(
            f"{_flag('VAL_SPLIT')} {n_val} is too large: train/ has {images}; use fewer, or leave "
                        f"it unset for a tenth of them")
    raise DataError(
        f"{_flag('VAL_SPLIT')} {n_val} is too large: the training set has {images}; use fewer")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (0-1 scale) of uint8 (N, H, W, C) images, from histograms."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = torch.bincount(images[..., c].flatten(), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * values.square()).sum() / total - mean.square()
        means.append(float(mean) / 255)
        stds.append(max(float(var.clamp(min=0).sqrt()) / 255, cache_module.MIN_STD))
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------- loaders


def fits_on_device(num_bytes: int, device: torch.device) -> bool:
    """Whether data of this size may be kept on the device (a quarter of its free memory at
    most)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return num_bytes <= RESIDENT_SHARE * free


def _make_loaders(parts: dict[str, Source], batching: Batching, augmentation: Augmentation, *,
    image_size: int,
                  resident: bool, device: torch.device, num_workers: int) -> dict[str, Loader]:
    """The train, val and test loaders (one loader when test is val); evaluation batches are twice
    as large. Photos (augmentation.crop_size set) are cropped to image_size from their stored
    squares; CIFAR-10 is pad-cropped. Resident parts (decoded into Images) go to the device; the
    cache's rows stay mapped and are read a batch at a time, augmented alike on the device; files
    (no cache) go through PIL in DataLoader workers."""
    evaluation = replace(batching, batch_size=2 * batching.batch_size, train=False)

    def make(part: Source, train: bool) -> Loader:
        batches = batching if train else evaluation
        if resident:
            return ResidentLoader(part.images.to(device), part.labels.to(device), batches,
                augmentation)
        if isinstance(part, MappedImages):
            return MappedLoader(part.images, part.rows, part.labels, device, batches, augmentation)
        transform = pil_transform(train, image_size, augmentation)
        return StreamingLoader(_Transformed(part, transform), batches, device, num_workers)

    loaders = {"train": make(parts["train"], True), "val": parts["val"] and make(parts["val"],
        False)}
    loaders["test"] = loaders["val"] if parts["test"] is parts["val"] else make(parts["test"],
        False)
    return loaders


def _resize_size(config: DataConfig, photos: bool) -> int | None:
    """The size a folder's images are stored at (pixels, a square): resize_size, or image_size /
    RESIZE_RATIO when None, for photos; image_size for small images. None for CIFAR-10, which stays
    32 pixels."""
    if config.dataset != "folder":
        return None
    size = (config.resize_size or round(config.image_size
        / RESIZE_RATIO)) if photos else config.image_size
    if size < config.image_size:
        raise DataError(
            f"the resize size {size} is smaller than {_flag('IMAGE_SIZE')} {config.image_size}: "
                        f"a centre crop of that size would not fit in it; lower --image-size")
    return size


def _keeps_resident(resident: str, sources: dict[str, Source], size: int, cache_file: str | None,
                    device: torch.device) -> bool:
    """RESIDENT "yes" or "no", or for "auto" whether the images (as uint8: 3 bytes a pixel) fit on
    the device; on the CPU a mapped cache is in memory already, so "auto" leaves it mapped."""
    if resident != "auto":
        return resident == "yes"
    num_bytes = sum(map(len, sources.values())) * 3 * size * size
    return fits_on_device(num_bytes, device) and not (cache_file and device.type == "cpu")


def _decode(parts: dict[str, Source], num_workers: int, device: torch.device) -> dict[str, Images]:
    """The parts read into memory (files' JPEGs on the device when it is a CUDA device); a test part
    that is the val part is read once."""
    train, val = (parts[name] and parts[name].decode(num_workers, f"decoding {name}", device)
                  for name in ("train", "val"))
    test = val if parts["test"] is parts["val"] else parts["test"].decode(num_workers,
        "decoding test", device)
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------- the entry point


def get_data(config: DataConfig, device: torch.device | str = "cpu", *, rank: int = 0,
        world_size: int = 1) -> Data:
    """Read a dataset, split off validation images, and build the train, val and test loaders (this
    rank's shard of world_size) that yield batches on the device.

    augment "photo" (the default for folders): images are stored as resize_size squares (None:
    image_size / RESIZE_RATIO, 256 for 224) and cropped to image_size: RandomResizedCrop for
    training, the centre for evaluation, as torchvision's classification reference does. "shift"
    (the default for CIFAR-10, and for folders of small images): stored at image_size, with
    pad-crops (crop_padding, reflect). CIFAR-10 stays 32 pixels. mean and std (a pretrained model's)
    replace the training images' own statistics.

    cache_dir (folders): where the stored squares are kept, decoded once, for later runs ("auto":
    the user's cache folder, cache_module.default_cache_dir()); they go to the device when they fit
    (resident), else are read from the memory-mapped cache a batch at a time. None: no cache; the
    files are decoded into memory (resident) or by PIL in DataLoader workers every epoch.

    augmentations that mix batches (Mixup, CutMix): the training loader is a MixedLoader, whose
    batches are mixed on the device after normalisation and come with soft targets
    (augment_module.batch_mixer); evaluation batches are never mixed.
    """
    device = torch.device(device)
    photos = config.augment == "photo" or (config.augment == "auto" and config.dataset == "folder")
    resize_size = _resize_size(config, photos)
    num_workers = (os.cpu_count() or 1) if config.num_workers is None else config.num_workers
    sources, classes, size, cache_file = _read_sources(config, resize_size, num_workers, device)
    # files and cache rows are split by their labels: no pixel is read yet
    parts = _split(sources, config.val_split, config.train_subset, config.seed, config.data_dir,
        config.dataset,
                   classes)
    test_is_val = "test" not in sources
    mean, std = config.mean, config.std
    # a sample's, remembered beside the cache: read before decoding
    if mean is None and cache_file is not None:
        mean, std = parts["train"].statistics(config.seed, num_workers)
    resident = _keeps_resident(config.resident, sources, size, cache_file, device)
    if resident:
        parts = _decode(parts, num_workers, device)
    if mean is None:
        mean, std = parts["train"].statistics(config.seed, num_workers)
    image_size = config.image_size if config.dataset == "folder" else size
    augmentation = config.augmentation(mean, std, crop_size=image_size if photos else None)
    batching = Batching(config.batch_size, True, config.seed, rank, world_size,
        config.channels_last)
    loaders = _make_loaders(parts, batching, augmentation, image_size=image_size, resident=resident,
        device=device,
                            num_workers=num_workers)
    mix = batch_mixer(config.augmentations, len(classes))
    train = MixedLoader(loaders["train"], mix) if mix is not None else loaders["train"]
    counts = torch.bincount(parts["train"].labels, minlength=len(classes))
    return Data(train, loaders["val"], loaders["test"], list(classes), augmentation.mean,
                augmentation.std, image_size, resident, test_is_val=test_is_val,
                resize_size=resize_size, cache_file=cache_file, class_counts=tuple(counts.tolist()))
