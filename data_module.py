"""Datasets, augmentation and loaders: CIFAR-10 or an ImageFolder tree, kept on the device when it fits, else
streamed from the decoded-image cache (cache_module) with the same batched augmentation."""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.ops import roi_align
from torchvision.transforms import functional as F
from tqdm import tqdm

import cache_module
import utils

DATASETS = ("cifar10", "folder")
FLIPS = ("random", "alternate", "none")  # alternate: each image flipped every other epoch (airbench)
AUGMENTS = ("auto", "photo", "shift")  # photo: RandomResizedCrop; shift: pad-crops; auto: photo for folders
# Photo formats a folder tree may hold; the ones this Pillow cannot open (.heic without pillow-heif, say)
# count as files that are not images. Pillow knows more (.mpg, .eps, .h5), but it only identifies those.
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif",
                    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".avif", ".heic", ".heif")
IMAGE_EXTENSIONS = tuple(e for e in PHOTO_EXTENSIONS if Image.registered_extensions().get(e) in Image.OPEN)
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
RESIDENT_SHARE = 0.25  # keep data on the device only when it takes at most this share of free memory
AUGMENT_CHUNK = 16384  # CIFAR images augmented together: few kernel launches per epoch, bounded memory
PREFETCH = 3  # batches read from the cache ahead of the one training: covers a slow read, bounded memory
DECODE_BATCH = 32  # files per DataLoader batch when decoding: little pixel data in flight with many workers
# Photo folders follow torchvision's classification reference (references/classification/presets.py):
RESIZE_RATIO = 0.875  # crop size / resize size of its evaluation preset (224 of 256)
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's share of the stored image's area (torchvision's default)
CROP_RATIO = (3 / 4, 4 / 3)  # and its width / height range (torchvision's default)
CROP_TRIES = 10  # boxes drawn before the central-crop fallback, as RandomResizedCrop.get_params


class DataError(ValueError):
    """Missing or unreadable data, or a split that cannot be made: a message for the user."""


@dataclass
class Data:
    """The loaders of one run and what the rest of the pipeline needs to know about them."""

    train: "ResidentLoader | MappedLoader | StreamingLoader"
    val: "ResidentLoader | MappedLoader | StreamingLoader"
    test: "ResidentLoader | MappedLoader | StreamingLoader"
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    resident: bool
    val_is_test: bool  # VAL_SPLIT = 0: the test set doubles as the per-epoch validation set
    resize_size: int | None = None  # photo folders: the size images are stored at and resized to; None for CIFAR
    cache_file: str | None = None  # photo folders: the decoded-image cache the images come from; None: no cache


# --------------------------------------------------------------------------- sources
# A source is one split's images and labels, wherever they live: `labels`, `len` and `take(index)` for
# splitting, `decode` for the resident loader (uint8 images in memory), `statistics`, and `read(i)` (a PIL
# image) for the streaming loader, the fallback for what has no cache.


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

    def decode(self, num_workers: int, desc: str) -> Images:
        """Already decoded: itself."""
        return self

    def statistics(self, seed: int, num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Exact per-channel mean and std of all the images."""
        return channel_stats(self.images)


@dataclass
class MappedImages:
    """Rows of the decoded-image cache (uint8, memory-mapped) and their labels: splitting picks rows, and
    pixels are read only when a batch (or decode) asks for them."""

    images: torch.Tensor  # uint8 (M, S, S, C): the whole cache, memory-mapped
    rows: torch.Tensor  # int64 (N,): this source's rows of it
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> MappedImages:
        """The rows at these indices (no pixels read)."""
        return MappedImages(self.images, self.rows[index], self.labels[index])

    def decode(self, num_workers: int, desc: str) -> Images:
        """The rows read into memory."""
        return Images(self.images[self.rows], self.labels)

    def statistics(self, seed: int, num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of a seeded sample of at most 2,000 rows, as ImageFiles estimates them."""
        sample = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:2000]
        return channel_stats(self.take(sample).decode(num_workers, "statistics").images)


class ImageFiles:
    """Image files decoded when read (upright, RGB), stored as read_stored does: the source without a cache."""

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

    def decode(self, num_workers: int, desc: str) -> Images:
        """Every file decoded into uint8 (N, S, S, 3) images in memory, in parallel, with a progress bar."""
        images = torch.empty((len(self), self.size, self.size, 3), dtype=torch.uint8)  # filled in place
        failures = decode_files(self.paths, self.size, images, num_workers, desc)
        if failures:  # the scan opened every file, so only a file changed since then gets here
            raise DataError(failures[0][1])
        return Images(images, self.labels)

    def statistics(self, seed: int, num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std estimated from a seeded sample of at most 2,000 files (decoding all is slow)."""
        sample = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:2000]
        return channel_stats(self.take(sample).decode(num_workers, "statistics").images)


Source = Images | MappedImages | ImageFiles


class _Transformed(Dataset):
    """A source read as (transform(PIL image), label), for a DataLoader."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source.read(i)), int(self.source.labels[i])


# --------------------------------------------------------------------------- reading


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 that checks the official archive but not the extracted files' sums.

    Copies rebuilt from other sources (the JPEG copy in ../shared/data) have other checksums,
    so an extracted file only has to exist; the downloaded archive is still checked.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


def read_cifar10(data_dir: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          list[str]]:
    """CIFAR-10 as (train images, train labels, test images, test labels, class names): uint8
    (N, 32, 32, 3) images and int64 labels, downloaded first when missing."""
    folder = os.path.join(data_dir, CIFAR10.base_folder)
    missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing and download:
        try:
            CIFAR10(data_dir, train=True, download=True)
        except (OSError, RuntimeError) as error:  # no network, refused, bad archive
            raise DataError(_missing_message(folder, missing, f"the download failed: {error}")) from None
        missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        reason = "DOWNLOAD is off" if not download else "the downloaded archive lacked them"
        raise DataError(_missing_message(folder, missing, reason))
    try:
        train, test = CIFAR10(data_dir, train=True), CIFAR10(data_dir, train=False)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise DataError(f"{_bad_cifar_file(folder)} is not a readable CIFAR-10 batch file ({error}); "
                        f"replace it, or delete {folder} to download CIFAR-10 again") from None
    if len(train.classes) != 10 or len(train.data) != len(train.targets) or len(test.data) != len(test.targets):
        raise DataError(f"{folder} does not hold CIFAR-10: expected 10 classes and one label per image")
    return (torch.from_numpy(train.data), torch.tensor(train.targets), torch.from_numpy(test.data),
            torch.tensor(test.targets), list(train.classes))


def _missing_message(folder: str, missing: list[str], reason: str) -> str:
    return (f"CIFAR-10 is not in {folder} (missing {', '.join(missing)}) and {reason}. "
            f"Put the python-version files there (data_batch_1..5, test_batch, batches.meta, as "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz unpacks), or set DATA_DIR to the "
            f"folder that holds cifar-10-batches-py/")


def _bad_cifar_file(folder: str) -> str:
    """The first batch file that does not unpickle into a batch dict (only called after a failure)."""
    for name in CIFAR_FILES:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            key = "label_names" if name == "batches.meta" else "data"
            entry[key]
            if key == "data":
                np.asarray(entry["data"]).reshape(-1, 3, 32, 32)
        except Exception:  # any failure marks the culprit; this runs only to name it
            return path
    return folder


def open_rgb(path: str, reduce_to: int | None = None) -> Image.Image:
    """An image file as an upright RGB PIL image (EXIF orientation applied, any mode converted by to_rgb).

    With reduce_to (pixels), a JPEG is decoded at 1/2, 1/4 or 1/8 scale where its sides keep at least twice
    reduce_to pixels (JPEG DCT scaling, as Pillow's thumbnail does): 2 to 7 times faster for photos much
    larger than that, and within a few levels of a full decode once resized to reduce_to.
    A file whose header opens but whose data is cut short or damaged (an interrupted copy) loads with the
    missing part grey, as Pillow's LOAD_TRUNCATED_IMAGES does, and a warning names it once per process;
    a file that does not open at all raises DataError naming it.
    """
    unreadable = (OSError, ValueError, Image.DecompressionBombError)  # ValueError: a mode RGB cannot come from
    try:
        with Image.open(path) as image:
            return to_rgb(_upright(image, reduce_to))
    except unreadable as error:
        first_error = error
    try:
        with _truncated_images_allowed(), Image.open(path) as image:
            rgb = to_rgb(_upright(image, reduce_to))
    except unreadable:
        raise DataError(f"{path} is not an image file that Pillow can read ({first_error})") from None
    if path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: {path} is truncated or damaged ({first_error}); the part that decodes is used, "
              f"the rest is grey", file=sys.stderr)
    return rgb


_WARNED: set[str] = set()  # damaged files already named in this process


@contextlib.contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    """Pillow's switch is global: set it only around one load (loads run one at a time in each process)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _upright(image: Image.Image, reduce_to: int | None = None) -> Image.Image:
    """The image decoded (a JPEG scaled down while decoding, see open_rgb) and turned as its EXIF orientation
    tag says (phones store photos sideways)."""
    if reduce_to:
        image.draft(None, (2 * reduce_to, 2 * reduce_to))  # a no-op but for JPEGs; square: any orientation
    image.load()  # decoding errors (a truncated file) belong to the caller
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block (Pillow raises several types): keep the pixels as stored
        return image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit greyscale scaled to 8 bits (a plain convert clips it at 255),
    transparency composited on white (as a viewer shows it; the colour under transparent pixels is
    often black or junk), palette, greyscale and CMYK converted by Pillow."""
    if image.mode == "I" or image.mode.startswith("I;16"):  # "I": 16-bit PNGs in older Pillows
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L").convert("RGB")  # round(v / 257)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_stored(path: str, size: int) -> Image.Image:
    """An image file as a folder's images are stored: upright RGB (open_rgb), shorter side resized to size,
    the centre size x size square."""
    return F.center_crop(F.resize(open_rgb(path, reduce_to=size), size), [size, size])


class _Stored(Dataset):
    """Files read as read_stored does, for decoding in DataLoader workers: item i is (uint8 (S, S, 3) pixels,
    "") or, for a file that cannot be read, (zeros, the error message)."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return torch.from_numpy(np.array(read_stored(self.paths[i], self.size))), ""
        except DataError as error:
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), str(error)


def decode_files(paths: list[str], size: int, out: torch.Tensor, num_workers: int,
                 desc: str) -> list[tuple[int, str]]:
    """Decode each file as read_stored does into out[i] (uint8 (N, size, size, 3): in memory, or the cache's
    memory map), in num_workers processes with a progress bar; returns (i, message) for each file that
    could not be read (its row left black)."""
    loader = DataLoader(_Stored(paths, size), batch_size=DECODE_BATCH, num_workers=num_workers)
    failures, start = [], 0
    with tqdm(total=len(paths), desc=desc, unit="image", disable=not sys.stderr.isatty()) as bar:
        for images, errors in loader:
            out[start:start + len(images)] = images
            failures += [(start + i, error) for i, error in enumerate(errors) if error]
            start += len(images)
            bar.update(len(images))
    return failures


# --------------------------------------------------------------------------- folders


def _list_tree(data_dir: str) -> tuple[list[str], dict[str, list[tuple[str, int]]], list[str]]:
    """The classes of DATA_DIR/train, and for each split (train, and val and test when there) its image files
    with their labels, in ImageFolder's order; and the files that are not images. Opens no file."""
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"no ImageFolder tree in {data_dir}: expected {train_dir}/<class>/<image> "
                        f"(and optionally val/ and test/ beside it); set DATA_DIR")
    try:
        classes, class_to_idx = datasets.folder.find_classes(train_dir)
    except FileNotFoundError as error:  # no class folders
        raise DataError(f"no readable images in {train_dir}: {error}") from None
    splits, not_images = {}, []
    for split in ("train", "val", "test"):
        folder = os.path.join(data_dir, split)
        if not os.path.isdir(folder):
            continue
        extra = sorted(name for name in set(os.listdir(folder)) - set(classes)
                       if os.path.isdir(os.path.join(folder, name)))
        if extra:
            raise DataError(f"{folder} has class folders that train/ lacks: {', '.join(extra)}")
        samples = datasets.folder.make_dataset(folder, class_to_idx, is_valid_file=lambda path: True,
                                               allow_empty=True)
        splits[split] = [(path, label) for path, label in samples if path.lower().endswith(IMAGE_EXTENSIONS)]
        not_images += [path for path, _ in samples if not path.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, splits, not_images


def _check_splits(data_dir: str, classes: list[str], splits: dict[str, list[tuple[str, int]]]) -> None:
    """Raise DataError unless every class of train/ has an image, there are two classes or more, and val/ and
    test/ (when there) hold images."""
    train_dir = os.path.join(data_dir, "train")
    found = {label for _, label in splits["train"]}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise DataError(f"no readable images in {train_dir}: none in the class folder(s) {', '.join(empty)}")
    if len(classes) < 2:
        raise DataError(f"{train_dir} has {len(classes)} class folder(s) with images; a classifier needs "
                        f"at least two (train/<class>/<image>)")
    for split in ("val", "test"):
        if split in splits and not splits[split]:
            raise DataError(f"{os.path.join(data_dir, split)} holds no readable images; fill it or remove it")


def _readable(data_dir: str, classes: list[str], splits: dict[str, list[tuple[str, int]]], not_images: list[str],
              unreadable: list[str]) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Each split's images but the unreadable ones, as (paths, labels), after one line on stderr for each kind
    of file skipped; DataError when a class or a split is left without images."""
    if not_images:
        extensions = sorted({os.path.splitext(path)[1].lower() or "(none)" for path in not_images})
        print(f"warning: skipped {len(not_images)} files that are not images "
              f"(extensions {', '.join(extensions)})", file=sys.stderr)
    if unreadable:
        print(f"warning: skipped {len(unreadable)} unreadable image file(s), e.g. {unreadable[0]}",
              file=sys.stderr)
    skip = set(unreadable)
    splits = {name: [(path, label) for path, label in samples if path not in skip] for name, samples in splits.items()}
    _check_splits(data_dir, classes, splits)
    return {name: ([path for path, _ in samples], torch.tensor([label for _, label in samples], dtype=torch.int64))
            for name, samples in splits.items()}


def _opens(path: str) -> bool:
    """Whether Pillow opens the file and finds its header sound (as cheap as a check can be that still catches
    corrupt files, yet 20 times the cost of listing it: a valid cache spares it)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # Pillow raises many types for a bad file; every one means "skip it"
        return False


def _scan_folder(data_dir: str, size: int) -> tuple[dict[str, ImageFiles], list[str]]:
    """The train, val and (optional) test files of DATA_DIR that Pillow opens, labelled by train/'s class
    folders, and the classes; the files are read at `size` (pixels, a square)."""
    classes, splits, not_images = _list_tree(data_dir)
    unreadable = [path for samples in splits.values() for path, _ in samples if not _opens(path)]
    splits = _readable(data_dir, classes, splits, not_images, unreadable)
    return {name: ImageFiles(paths, labels, size) for name, (paths, labels) in splits.items()}, classes


def _cached_folder(data_dir: str, size: int, cache_dir: str,
                   num_workers: int) -> tuple[dict[str, MappedImages], list[str], str]:
    """The splits, labels and warnings of _scan_folder as rows of the decoded-image cache in cache_dir, built
    first when missing or stale (files that fail to decode are the unreadable ones); a valid cache opens no
    image file. Also the cache file."""
    classes, splits, not_images = _list_tree(data_dir)
    _check_splits(data_dir, classes, splits)  # before anything is decoded
    paths = [path for samples in splits.values() for path, _ in samples]
    cache = cache_module.open_or_build(
        paths, size, cache_dir, root=data_dir,
        fill=lambda out: [i for i, _ in decode_files(paths, size, out, num_workers, "decoding")])
    row = {path: i for i, path in enumerate(paths)}
    splits = _readable(data_dir, classes, splits, not_images, [paths[i] for i in cache.failed])
    return {name: MappedImages(cache.images, torch.tensor([row[path] for path in paths]), labels)
            for name, (paths, labels) in splits.items()}, classes, cache.path


def _read_sources(dataset: str, data_dir: str, resize_size: int, download: bool, cache_dir: str | None,
                  num_workers: int) -> tuple[dict[str, Source], list[str], int, str | None]:
    """The train, test and (ImageFolder trees only) val sources, the class names, the stored image size
    (resize_size for a folder, 32 for CIFAR-10) and the cache file (None without one)."""
    if dataset == "cifar10":
        train_images, train_labels, test_images, test_labels, classes = read_cifar10(data_dir, download)
        sources = {"train": Images(train_images, train_labels), "test": Images(test_images, test_labels)}
        return sources, classes, train_images.shape[1], None
    if cache_dir is not None:
        folder = os.path.join(data_dir, ".cache") if cache_dir == "auto" else cache_dir
        try:
            sources, classes, cache_file = _cached_folder(data_dir, resize_size, folder, num_workers)
            return sources, classes, resize_size, cache_file
        except cache_module.CacheError as error:
            if cache_dir != "auto":
                raise DataError(f"CACHE_DIR = {cache_dir!r}: {error}; choose a writable folder with room, or "
                                f"None to decode the images without a cache") from None
            print(f"warning: {error}; the images are decoded without a cache (set CACHE_DIR to a writable "
                  f"folder to keep them)", file=sys.stderr)
    return *_scan_folder(data_dir, resize_size), resize_size, None


# --------------------------------------------------------------------------- splitting and statistics


def stratified_split(labels: torch.Tensor, n_holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): n_holdout held out in proportion to each class, chosen by seed."""
    n = len(labels)
    if not 0 <= n_holdout <= n:
        raise ValueError(f"cannot hold out {n_holdout} of {n} images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n_holdout / n
    quota = exact.floor().long()
    remainder = n_holdout - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:remainder]] += 1
    shuffled = labels[order]
    held = torch.cat([order[shuffled == c][:q] for c, q in zip(classes.tolist(), quota.tolist())])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return mask.logical_not().nonzero().flatten(), mask.nonzero().flatten()


def _split(sources: dict[str, Source], val_split: int, train_subset: int | None, seed: int,
           data_dir: str) -> dict[str, Source]:
    """The train, val and test parts: validation held out unless the tree has val/, a stratified TRAIN_SUBSET
    of the training images left, and the test set, or the validation images when there is none."""
    train, train_index = sources["train"], torch.arange(len(sources["train"]))
    if "val" in sources:
        val = sources["val"]
    elif val_split:
        if val_split >= len(train):
            raise DataError(f"VAL_SPLIT = {val_split} is too large: the training set has {len(train)} images")
        train_index, val_index = stratified_split(train.labels, val_split, seed)
        val = train.take(val_index)
    elif "test" in sources:
        val = sources["test"]  # VAL_SPLIT = 0: validate on the test set, as airbench does
    else:
        raise DataError(f"{data_dir} has no val/ or test/ folder and VAL_SPLIT = 0: nothing to validate on; "
                        f"set VAL_SPLIT > 0 or add {data_dir}/val/<class>/<image>")
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_index):
            raise DataError(f"TRAIN_SUBSET = {train_subset} is out of range: use 1 to {len(train_index)} "
                            f"(the training images left after VAL_SPLIT), or None for all")
        _, keep = stratified_split(train.labels[train_index], train_subset, seed)
        train_index = train_index[keep]
    parts = {"train": train.take(train_index), "val": val, "test": sources.get("test", val)}
    if "test" not in sources:
        print(f"note: {data_dir} has no test/ folder; the final evaluation uses the validation images",
              file=sys.stderr)
    for name, part in parts.items():
        if len(part) == 0:
            raise DataError(f"the {name} split is empty; check TRAIN_SUBSET, VAL_SPLIT and {data_dir}")
    return parts


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
        stds.append(max(float(var.clamp(min=0).sqrt()) / 255, 1e-3))
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------- augmentation


def crop_flip(images: torch.Tensor, padding: int, flipped: torch.Tensor | None = None,
              reflect: bool = False) -> torch.Tensor:
    """Random crops (shifts of up to `padding` pixels, black or reflected border) of uint8 (N, H, W, C)
    images, mirrored where `flipped` (N bools) is set, as one gather on the images' device."""
    n, h, w, _ = images.shape
    device = images.device
    dy = torch.randint(-padding, padding + 1, (n, 1), device=device)
    dx = torch.randint(-padding, padding + 1, (n, 1), device=device)
    rows = torch.arange(h, device=device) + dy                      # (n, h): source row of each output row
    cols = torch.arange(w, device=device).expand(n, w)
    if flipped is not None:
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    cols = cols + dx                                                # (n, w): source column of each output column
    batch = torch.arange(n, device=device)[:, None, None]
    if reflect:
        return images[batch, _reflect(rows, h)[:, :, None], _reflect(cols, w)[:, None, :]]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return out * inside[..., None]                                  # black border, as RandomCrop(padding=p)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def sample_crop_boxes(n: int, height: int, width: int, *, scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO, device: torch.device | str = "cpu") -> torch.Tensor:
    """n boxes (top, left, height, width) as int64 (n, 4), each drawn as torchvision's
    RandomResizedCrop.get_params draws one: up to CROP_TRIES tries of an area share in `scale` and a
    log-uniform width / height in `ratio` that fit the image, else the central crop of the nearest allowed
    ratio; all n at once on `device`, from its global generator."""
    area = height * width
    target_area = area * torch.empty(n, CROP_TRIES, device=device).uniform_(scale[0], scale[1])
    aspect = torch.empty(n, CROP_TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (target_area * aspect).sqrt().round().long()
    h = (target_area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (argmax takes the first maximum)
    found = fits.any(1)
    fallback_h, fallback_w = _central_box(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    top = _random_offset(height - h, device)
    left = _random_offset(width - w, device)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's fallback size (height, width): the whole image, trimmed to the nearest allowed ratio."""
    if width / height < min(ratio):
        return int(round(width / min(ratio))), width
    if width / height > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def _random_offset(room: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A uniform integer in 0..room for each entry (randint with a per-entry bound)."""
    offset = (torch.rand(room.shape, device=device) * (room + 1)).floor().long()
    return torch.minimum(offset, room)  # float rounding can reach room + 1


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: int,
                    flipped: torch.Tensor | None = None) -> torch.Tensor:
    """The boxes (top, left, height, width) of uint8 (N, H, W, C) images resized to size x size, mirrored
    where `flipped` is set: float (N, C, size, size) on the 0-255 scale, in one batched call.

    roi_align with aligned=True is bilinear resizing of each box; its adaptive sampling (ceil(box / size)
    samples a pixel in each direction, averaged) stands in for the antialiasing of PIL's resize when the box
    is larger than the output. One kernel for the batch, where torchvision.transforms.v2 draws one box per
    call (RandomResizedCrop on a batch crops every image alike).
    """
    top, left, height, width = boxes.unbind(1)
    batch = torch.arange(len(images), device=images.device)
    rois = torch.stack([batch, left, top, left + width, top + height], 1).float()
    crops = roi_align(images.permute(0, 3, 1, 2).float(), rois, output_size=size, aligned=True)
    if flipped is not None:
        crops = torch.where(flipped[:, None, None, None], crops.flip(-1), crops)
    return crops


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of uint8 (N, H, W, C) images, placed as transforms.CenterCrop places it."""
    _, height, width, _ = images.shape
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[:, top:top + size, left:left + size].contiguous()


# --------------------------------------------------------------------------- loaders


class ResidentLoader:
    """Batches from uint8 images held on the device; crop, flip and normalisation are batched tensor ops.

    Without crop_size (CIFAR-10), training images get pad-crops (crop_padding, reflect) and flips at their
    own size. With crop_size (photo folders, stored as squares larger than crop_size), training images get
    RandomResizedCrop boxes of their own, resized to crop_size, and flips; evaluation takes the centre crop.
    Shuffling is seeded by (seed, epoch) as in DistributedSampler, so every rank draws the same order
    and takes its own shard; augmentation draws from the device's global generator.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, mean, std,
                 train: bool, crop_padding: int = 4, flip: str = "random", reflect: bool = False,
                 crop_size: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = True):
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.crop_padding, self.flip, self.reflect, self.crop_size = crop_padding, flip, reflect, crop_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.index_device = labels.device  # where the shuffled indices are made
        self.chunk = AUGMENT_CHUNK  # CIFAR-size images gathered and augmented together
        if flip == "alternate":  # a fixed random half starts flipped; every other epoch flips them all
            self.flip_base = (torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < 0.5) \
                .to(labels.device)
        mean = torch.tensor(mean, device=labels.device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=labels.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the same on every rank)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        """This rank's share of the images, shuffled for training."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size, device=self.index_device)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        per_rank = n // self.world_size  # equal shards: every rank must take the same number of steps
        return order[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.index_device)

    def __len__(self) -> int:
        n = len(self.labels)
        shard = n // self.world_size if self.train else len(range(self.rank, n, self.world_size))
        return _num_batches(shard, self.batch_size, self.train)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()[:len(self) * self.batch_size]
        if self.crop_size is None:  # CIFAR-10's pad-crops and flips, drawn for a chunk of batches at once
            step = max(self.batch_size, self.chunk // self.batch_size * self.batch_size)
            for chosen, images in self._gather(indices, step):
                yield from self._padded_batches(chosen, images)
        else:  # photos a batch at a time: their float 256-px copies are big
            for chosen, images in self._gather(indices, self.batch_size):
                yield self._photos(chosen, images), self.labels[chosen]

    def _gather(self, indices: torch.Tensor, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, their uint8 images) on the device, `step` images at a time."""
        for start in range(0, len(indices), step):
            chosen = indices[start:start + step]
            yield chosen, self.images[chosen]

    def _padded_batches(self, chosen: torch.Tensor,
                        images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of a chunk of CIFAR-size images: pad-crops and flips in one gather, then normalised."""
        if self.train and (self.crop_padding or self.flip != "none"):
            images = crop_flip(images, self.crop_padding, self._flips(chosen), self.reflect)
        labels = self.labels[chosen]
        for i in range(0, len(chosen), self.batch_size):
            yield self.normalize(images[i:i + self.batch_size]), labels[i:i + self.batch_size]

    def _photos(self, chosen: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """A photo batch: random-resized crops and flips for training, centre crops for evaluation."""
        if not self.train:
            return self.normalize(center_crop(images, self.crop_size))
        boxes = sample_crop_boxes(len(chosen), images.shape[1], images.shape[2], device=images.device)
        crops = torch.addcmul(self.shift, crop_and_resize(images, boxes, self.crop_size, self._flips(chosen)),
                              self.scale)
        return crops.contiguous(memory_format=torch.channels_last) if self.channels_last else crops

    def _flips(self, batch: torch.Tensor) -> torch.Tensor | None:
        if self.flip == "random":
            return torch.rand(len(batch), device=batch.device) < 0.5
        if self.flip == "alternate":
            return self.flip_base[batch] ^ bool(self.epoch % 2 == 0)
        return None

    def first_images(self, n: int) -> torch.Tensor:
        """The first n images, normalised, as evaluation sees them (for data-dependent initialisation)."""
        first = torch.arange(min(n, len(self.labels)), device=self.index_device)
        _, images = next(self._gather(first, len(first)))
        return self.normalize(images if self.crop_size is None else center_crop(images, self.crop_size))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) to normalised float (N, C, H, W), channels_last in memory when asked."""
        images = images.permute(0, 3, 1, 2)  # a view: NHWC memory is channels_last NCHW
        if not self.channels_last:
            images = images.contiguous()
        return torch.addcmul(self.shift, images.float(), self.scale)


class MappedLoader(ResidentLoader):
    """ResidentLoader's batches (the same order, augmentation and normalisation, on the device) from uint8
    images that stay in host memory, such as the memory-mapped cache: a background thread gathers each batch's
    rows, PREFETCH batches ahead (on a GPU into pinned memory, copied on a CUDA stream of its own), while the
    device works on the batch before."""

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                 **options):
        super().__init__(images, labels.to(device), **options)
        self.rows = rows  # int64 (N,): row of images of each of the N labelled images
        self.index_device = torch.device("cpu")  # the thread picks rows with them
        self.chunk = self.batch_size  # a batch at a time: little host memory, and the first batch comes soon

    def _gather(self, indices: torch.Tensor, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        def read() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]]:  # in the thread
            if copy_stream is not None:
                torch.cuda.set_device(device)  # a new thread starts on GPU 0: pinned memory would make a context there
            for start in range(0, len(indices), step):
                chosen = indices[start:start + step]
                host = torch.empty((len(chosen), *self.images.shape[1:]), dtype=torch.uint8,
                                   pin_memory=copy_stream is not None)
                torch.index_select(self.images, 0, self.rows[chosen], out=host)
                if copy_stream is None:
                    yield chosen.to(device), host.to(device), None
                    continue
                with torch.cuda.stream(copy_stream):
                    chosen, images = chosen.to(device, non_blocking=True), host.to(device, non_blocking=True)
                yield chosen, images, copy_stream.record_event()

        for chosen, images, copied in _in_background(read(), PREFETCH):
            if copied is not None:  # the training stream waits for the copy, and keeps the memory until used
                stream = torch.cuda.current_stream(device)
                stream.wait_event(copied)
                chosen.record_stream(stream)
                images.record_stream(stream)
            yield chosen, images


def _in_background(items: Iterable, depth: int) -> Iterator:
    """The items, made in a background thread at most `depth` ahead of the consumer, so that making them
    (reading a file, copying to the device) overlaps using them. An exception there is raised here; a
    consumer that stops early stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as error:  # any failure belongs to the consumer, which raises it
            put(error)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class StreamingLoader:
    """A DataLoader with PIL transforms in worker processes, for data that does not fit on the device;
    yields batches on the device, in the same layout as ResidentLoader."""

    def __init__(self, dataset: Dataset, *, batch_size: int, train: bool, device: torch.device,
                 num_workers: int, seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = True):
        self.train, self.device, self.channels_last = train, device, channels_last
        if train:
            self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                               shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = range(rank, len(dataset), world_size)
        n = len(self.sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", drop_last=train and n >= batch_size,
                                 persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the same on every rank)."""
        if self.train:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def first_images(self, n: int) -> torch.Tensor:
        """About n images as the loader yields them (for data-dependent initialisation)."""
        images = []
        for batch, _ in self:
            images.append(batch)
            if sum(map(len, images)) >= n:
                break
        return torch.cat(images)[:n]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            yield images, labels.to(self.device, non_blocking=True)


def _num_batches(n: int, batch_size: int, train: bool) -> int:
    """Training drops a last partial batch, unless it is the only one; evaluation keeps it."""
    if train and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)


def _pil_transform(train: bool, image_size: int, crop_padding: int, flip: str, reflect: bool,
                   mean, std, photos: bool) -> transforms.Compose:
    """The streaming path's PIL pipeline, after the source's resizing ("alternate" flips are drawn at random):
    photos get RandomResizedCrop (training) or the centre crop (evaluation), CIFAR-10 its pad-crops."""
    steps = []
    if photos:
        steps.append(transforms.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO) if train
                     else transforms.CenterCrop(image_size))
    elif train and crop_padding:
        steps.append(transforms.RandomCrop(image_size, padding=crop_padding,
                                           padding_mode="reflect" if reflect else "constant"))
    if train and flip != "none":
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def fits_on_device(num_bytes: int, device: torch.device) -> bool:
    """Whether data of this size may be kept on the device (a quarter of its free memory at most)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return num_bytes <= RESIDENT_SHARE * free


def _make_loaders(parts: dict[str, Source], resident: bool, image_size: int, mean, std, *, photos: bool,
                  batch_size: int, crop_padding: int, flip: str, reflect: bool, device: torch.device,
                  num_workers: int, seed: int, rank: int, world_size: int,
                  channels_last: bool) -> dict[str, ResidentLoader | MappedLoader | StreamingLoader]:
    """The train, val and test loaders (one loader when test is val); evaluation batches are twice as large.
    Photos (a folder's images) are cropped to image_size from their stored squares; CIFAR-10 is pad-cropped.
    Resident parts (decoded into Images) go to the device; the cache's rows stay mapped and are read a batch
    at a time, augmented alike on the device; files (no cache) go through PIL in DataLoader workers."""
    def make(part: Source, train: bool) -> ResidentLoader | MappedLoader | StreamingLoader:
        common = dict(batch_size=batch_size if train else 2 * batch_size, train=train, seed=seed, rank=rank,
                      world_size=world_size, channels_last=channels_last)
        on_device = dict(mean=mean, std=std, crop_padding=crop_padding, flip=flip, reflect=reflect,
                         crop_size=image_size if photos else None, **common)
        if resident:
            return ResidentLoader(part.images.to(device), part.labels.to(device), **on_device)
        if isinstance(part, MappedImages):
            return MappedLoader(part.images, part.rows, part.labels, device=device, **on_device)
        transform = _pil_transform(train, image_size, crop_padding, flip, reflect, mean, std, photos)
        return StreamingLoader(_Transformed(part, transform), device=device, num_workers=num_workers, **common)

    loaders = {"train": make(parts["train"], True), "val": make(parts["val"], False)}
    loaders["test"] = loaders["val"] if parts["test"] is parts["val"] else make(parts["test"], False)
    return loaders


# --------------------------------------------------------------------------- the entry point


def get_data(dataset: str = "cifar10", data_dir: str = "./data", *, batch_size: int = 256, val_split: int = 5000,
             train_subset: int | None = None, image_size: int = 32, resize_size: int | None = None,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, augment: str = "auto",
             crop_padding: int = 4, flip: str = "random", reflect: bool = False, resident: bool | str = "auto",
             num_workers: int | None = None, download: bool = True, device: torch.device | str = "cpu",
             seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = True,
             cache_dir: str | None = None) -> Data:
    """Read a dataset, split off validation images, and build the train, val and test loaders.

    augment "photo" (the default for folders): images are stored as resize_size squares (None: image_size /
    RESIZE_RATIO, 256 for 224) and cropped to image_size: RandomResizedCrop for training, the centre for
    evaluation, as torchvision's classification reference does. "shift" (the default for CIFAR-10, and for
    folders of small images): stored at image_size, with pad-crops (crop_padding, reflect). CIFAR-10 stays
    32 pixels. mean and std (a pretrained model's) replace the training images' own statistics.

    cache_dir (folders): where the stored squares are kept, decoded once, for later runs ("auto":
    DATA_DIR/.cache); they go to the device when they fit (resident), else are read from the memory-mapped
    cache a batch at a time. None: no cache; the files are decoded into memory (resident) or by PIL in
    DataLoader workers every epoch.
    """
    if dataset not in DATASETS:
        raise DataError(utils.not_known("DATASET", dataset, DATASETS))
    if flip not in FLIPS:
        raise DataError(utils.not_known("FLIP", flip, FLIPS))
    if augment not in AUGMENTS:
        raise DataError(utils.not_known("AUGMENT", augment, AUGMENTS))
    if (mean is None) != (std is None):
        raise ValueError("mean and std are given together or not at all")
    photos = augment == "photo" or (augment == "auto" and dataset == "folder")
    if dataset == "folder":
        resize_size = (resize_size or round(image_size / RESIZE_RATIO)) if photos else image_size
        if resize_size < image_size:
            raise DataError(f"the resize size {resize_size} is smaller than IMAGE_SIZE = {image_size}: "
                            f"a centre crop of IMAGE_SIZE would not fit in it")
    device = torch.device(device)
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    sources, classes, size, cache_file = _read_sources(dataset, data_dir, resize_size, download, cache_dir,
                                                       num_workers)
    parts = _split(sources, val_split, train_subset, seed, data_dir)  # files and cache rows: nothing read yet
    val_is_test = parts["val"] is sources.get("test")
    if resident == "auto":  # as uint8 images: 3 bytes a pixel; for the CPU the mapped cache is in memory already
        resident = fits_on_device(sum(map(len, sources.values())) * 3 * size * size, device) and not (
            cache_file and device.type == "cpu")
    if resident:
        train, val = (parts[name].decode(num_workers, f"decoding {name}") for name in ("train", "val"))
        test = val if parts["test"] is parts["val"] else parts["test"].decode(num_workers, "decoding test")
        parts = {"train": train, "val": val, "test": test}
    if mean is None:
        mean, std = parts["train"].statistics(seed, num_workers)
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    image_size = image_size if dataset == "folder" else size
    loaders = _make_loaders(parts, bool(resident), image_size, mean, std, photos=photos, batch_size=batch_size,
                            crop_padding=crop_padding, flip=flip, reflect=reflect, device=device,
                            num_workers=num_workers, seed=seed, rank=rank, world_size=world_size,
                            channels_last=channels_last)
    return Data(loaders["train"], loaders["val"], loaders["test"], list(classes), mean, std, image_size,
                bool(resident), val_is_test=val_is_test, resize_size=resize_size if dataset == "folder" else None,
                cache_file=cache_file)


def load_image(path: str, image_size: int, mean, std, resize_size: int | None = None) -> torch.Tensor:
    """One image file as a normalised (C, S, S) tensor, prepared as a folder's evaluation images are: stored
    as read_stored does at resize_size (None: image_size) and centre-cropped to image_size."""
    if not os.path.isfile(path):
        raise DataError(f"image {path} does not exist")
    to_tensor = transforms.Compose([transforms.CenterCrop(image_size), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    return to_tensor(read_stored(path, resize_size or image_size))


def find_images(paths: list[str]) -> tuple[list[str], int]:
    """The files to classify: each file as named, and the image files under each folder (searched
    recursively, in sorted order). Returns them and how many files under the folders were not images."""
    found, skipped = [], 0
    for path in paths:
        if not os.path.isdir(path):
            found.append(path)
            continue
        for folder, subfolders, names in os.walk(path):
            subfolders.sort()
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(folder, name))
                else:
                    skipped += 1
    return found, skipped


class PredictionImages(Dataset):
    """Image files prepared as load_image does, for batched prediction in DataLoader workers: item i is
    (image, "") or, for a file that cannot be read, (zeros, the error message)."""

    def __init__(self, paths: list[str], image_size: int, mean, std, resize_size: int | None = None):
        self.paths, self.options = paths, (image_size, mean, std, resize_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return load_image(self.paths[i], *self.options), ""
        except DataError as error:
            return torch.zeros(3, self.options[0], self.options[0]), str(error)
