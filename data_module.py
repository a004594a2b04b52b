"""Datasets and their loaders: CIFAR-10 (cifar_module), an ImageFolder tree (folder_module) or a
CSV of labelled image files (csv_module) read as sources (source_module), split, measured, handed to
loader_module: on the device when they fit, else read from the memory-mapped cache per batch."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

import augment_module
import csv_module
import messages_module
from augment_module import RESIZE_RATIO, Augmentation, batch_mixer, pil_transform
from cifar_module import read_cifar10
from folder_module import list_tree, read_folder
from image_module import DataError
from loader_module import (Batching, Loader, MappedLoader, MixedLoader, ResidentLoader,
                           StreamingLoader)
from messages_module import flag_named
from source_module import Images, MappedImages, Source

DATASETS = ("cifar10", "folder", "csv")  # csv: read as a folder is (its files, cache, checks)
# alternate: each image flipped every other epoch (airbench)
FLIPS = ("random", "alternate", "none")
# photo: RandomResizedCrop; shift: pad-crops; auto: photo for folders
AUGMENTS = ("auto", "photo", "shift")
# VAL_SPLIT unset, CIFAR-10: validation images held out of its 50,000 training images
CIFAR_VAL_SPLIT = 5000
# VAL_SPLIT unset, a folder without val/: one image in this many held out of train/
FOLDER_VAL_SHARE = 10
# keep data on the device only when it takes at most this share of free memory
RESIDENT_SHARE = 0.25
# pixels: above the largest published weights' crop (efficientnet_b7's 600); a batch of 128 such
# float images takes 1.6 GB already, and 60,000 pixels would ask 43 GB an image
MAX_IMAGE_SIZE = 1024

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
    "csv_columns": (lambda v: csv_module.column_names(v) is not None,
                    "two or three different column names: path,label or path,label,split"),
}


@dataclass(frozen=True)
class DataConfig:
    """What get_data reads and how. Each field but the four from image_size on is main.py's
    constant of that name in upper case (default and meaning there), checked when the config is
    built (ValueError naming it)."""

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
    augmentations: dict[str, Any]  # AUGMENTATIONS' settings by name: "auto_augment": AUTO_AUGMENT
    resident: str
    num_workers: int | None
    download: bool
    seed: int
    channels_last: bool
    cache_dir: str | None
    csv_columns: str

    def __post_init__(self):
        messages_module.check_fields(self, RULES, CHOICES)
        augment_module.check(self.augmentations)
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together or not at all")

    def augmentation(self, mean, std, crop_size: int | None) -> Augmentation:
        """What the loaders do to each image, with these statistics; crop_size None: pad-crops."""
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
    # a folder without test/: the test loader is the val loader (the final evaluation is on val)
    test_is_val: bool
    # photo folders: the size images are stored at and resized to; None for CIFAR
    resize_size: int | None = None
    # photo folders: the decoded-image cache the images come from; None: no cache
    cache_file: str | None = None
    # the training split's images of each class (all ranks' shards, after VAL_SPLIT and
    # TRAIN_SUBSET): what balanced class weights come from
    class_counts: tuple[int, ...] | None = None


# --------------------------------------------------------------------------- sources


class _Transformed(Dataset):
    """A source read as (transform(PIL image), label), for a DataLoader."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source.read(i)), int(self.source.labels[i])


def _read_sources(config: DataConfig, resize_size: int | None, num_workers: int,
                  device: torch.device) -> tuple[dict[str, Source], list[str], int, str | None]:
    """The train, test and (folders, CSVs) val sources, the class names, the stored image size
    (resize_size for a folder, 32 for CIFAR-10) and the cache file (None: no cache)."""
    data_dir = config.data_dir
    if config.dataset == "cifar10":
        train_images, train_labels, test_images, test_labels, classes = read_cifar10(
            data_dir, config.download)
        sources = {"train": Images(train_images, train_labels),
                   "test": Images(test_images, test_labels)}
        return sources, classes, train_images.shape[1], None
    listing = (csv_module.list_csv(data_dir, config.csv_columns) if config.dataset == "csv"
               else list_tree(data_dir))
    sources, cache_file = read_folder(listing, resize_size, config.cache_dir, num_workers, device)
    return sources, listing.classes, resize_size, cache_file


# ------------------------------------------------------------------------- splitting and statistics


def stratified_split(labels: torch.Tensor, n_holdout: int, seed: int, *,
                     every_class: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): n_holdout held out in proportion to each class, chosen by seed.
    every_class: each class holds out one and keeps one at least, the rest shared in proportion to
    what each has beyond those two."""
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
        raise ValueError(f"cannot hold out {n_holdout} of {messages_module.plural(n, 'image')} "
                         "with one of each class held out and one kept")
    shuffled = labels[order]
    held = torch.cat([order[shuffled == c][:q] for c, q in zip(classes.tolist(), quota.tolist())])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return mask.logical_not().nonzero().flatten(), mask.nonzero().flatten()


def _split(sources: dict[str, Source], val_split: int | None, train_subset: int | None, seed: int,
           data_dir: str, dataset: str, classes: list[str]) -> dict[str, Source]:
    """The train, val and test parts: val held out unless there is a val split (VAL_SPLIT images,
    default_val_split's for None; 0: no validation, val None), a stratified TRAIN_SUBSET of the
    training images left, and the test set (the val images where there is none)."""
    train, train_index = sources["train"], torch.arange(len(sources["train"]))
    if "val" in sources:
        val = sources["val"]
    elif val_split != 0:
        n_val = _n_held_out(train.labels, val_split, dataset, classes, data_dir)
        every_class = val_split is None and dataset != "cifar10"
        train_index, val_index = stratified_split(train.labels, n_val, seed,
                                                  every_class=every_class)
        val = train.take(val_index)
    elif "test" in sources:
        # VAL_SPLIT = 0: train on every image and validate on none (never on the test set)
        val = None
    else:
        csv = dataset == "csv"
        raise DataError(f"{data_dir} has no "
                        f"{'val or test rows' if csv else 'val/ or test/ folder'} and "
                        f"{flag_named('VAL_SPLIT')} is 0: nothing to evaluate on; set it above 0, "
                        f"or add {'val rows' if csv else f'{data_dir}/val/<class>/<image>'}")
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_index):
            raise DataError(f"{flag_named('TRAIN_SUBSET')} {train_subset} is out of range: use 1 "
                            f"to {len(train_index)} (the training images left after the validation "
                            "images are held out), or none for all")
        _, keep = stratified_split(train.labels[train_index], train_subset, seed)
        train_index = train_index[keep]
    parts = {"train": train.take(train_index), "val": val, "test": sources.get("test", val)}
    if "test" not in sources:
        print(f"note: {messages_module.printable(data_dir)} has no "
              f"{'test rows' if dataset == 'csv' else 'test/ folder'}; the final evaluation uses "
              "the validation images", file=sys.stderr)
    for name, part in parts.items():
        if part is not None and len(part) == 0:
            raise DataError(f"the {name} split is empty; check {flag_named('TRAIN_SUBSET')}, "
                            f"{flag_named('VAL_SPLIT')} and {data_dir}")
    return parts


def _apportion(counts: torch.Tensor, total: int) -> torch.Tensor:
    """total shared in proportion to counts by largest remainder: int64 shares summing to total."""
    if total == 0:
        return torch.zeros_like(counts)
    exact = counts.double() * total / int(counts.sum())
    quota = exact.floor().long()
    remainder = total - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:remainder]] += 1
    return quota


def default_val_split(dataset: str, labels: torch.Tensor) -> int:
    """VAL_SPLIT when None: CIFAR_VAL_SPLIT for CIFAR-10; for a folder without val/, a tenth of
    train/'s images (rounded half up), at least one of each class held out and one kept."""
    if dataset == "cifar10":
        return CIFAR_VAL_SPLIT
    n, n_classes = len(labels), len(labels.unique())
    return min(max((n + FOLDER_VAL_SHARE // 2) // FOLDER_VAL_SHARE, n_classes), n - n_classes)


def _n_held_out(labels: torch.Tensor, val_split: int | None, dataset: str, classes: list[str],
                data_dir: str) -> int:
    """The training images held out for validation: VAL_SPLIT, or default_val_split's for None.
    DataError when none are left to train on, or (VAL_SPLIT None, a folder or CSV) a class has a
    single image."""
    csv = dataset == "csv"
    if val_split is None and dataset != "cifar10":
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        single = [name for name, count in zip(classes, counts) if count == 1]
        if single:
            place = (f"the class {single[0]!r} of {data_dir}" if csv
                     else os.path.join(data_dir, 'train', single[0]))
            raise DataError(f"{place} has a single image, and an unset {flag_named('VAL_SPLIT')} "
                            "holds out one of each class; "
                            f"add images or {'val rows' if csv else 'val/'}, or set it")
    n_val = default_val_split(dataset, labels) if val_split is None else val_split
    if n_val < len(labels):
        return n_val
    images = messages_module.plural(len(labels), "image")
    if val_split is None:
        raise DataError(f"{flag_named('VAL_SPLIT')} is unset, which holds out {n_val} of "
                        f"CIFAR-10's training images, but there are {images}; set a smaller one")
    if dataset != "cifar10":
        raise DataError(f"{flag_named('VAL_SPLIT')} {n_val} is too large: "
                        f"{'the train rows have' if csv else 'train/ has'} {images}; use fewer, or "
                        "leave it unset for a tenth of them")
    raise DataError(f"{flag_named('VAL_SPLIT')} {n_val} is too large: "
                    f"the training set has {images}; use fewer")


# --------------------------------------------------------------------------- loaders


def fits_on_device(num_bytes: int, device: torch.device) -> bool:
    """Whether data this size may stay on the device (at most RESIDENT_SHARE of its free memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return num_bytes <= RESIDENT_SHARE * free


def _make_loaders(parts: dict[str, Source], batching: Batching, augmentation: Augmentation, *,
                  image_size: int, resident: bool, device: torch.device,
                  num_workers: int) -> dict[str, Loader]:
    """The train, val and test loaders (one when test is val; get_data says which kind); evaluation
    batches are twice as large."""
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

    loaders = {"train": make(parts["train"], True),
               "val": parts["val"] and make(parts["val"], False)}
    loaders["test"] = (loaders["val"] if parts["test"] is parts["val"]
                       else make(parts["test"], False))
    return loaders


def _resize_size(config: DataConfig, photos: bool) -> int | None:
    """A folder's stored square size in pixels: resize_size (None: image_size / RESIZE_RATIO) for
    photos, image_size for small images; None for CIFAR-10 (it stays 32 pixels)."""
    if config.dataset == "cifar10":
        return None
    size = ((config.resize_size or round(config.image_size / RESIZE_RATIO)) if photos
            else config.image_size)
    if size < config.image_size:
        raise DataError(f"the resize size {size} is smaller than {flag_named('IMAGE_SIZE')} "
                        f"{config.image_size}: a centre crop of that size would not fit in "
                        "it; lower --image-size")
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
    test = (val if parts["test"] is parts["val"]
            else parts["test"].decode(num_workers, "decoding test", device))
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------- the entry point


def get_data(config: DataConfig, device: torch.device | str = "cpu", *, rank: int = 0,
             world_size: int = 1) -> Data:
    """Read a dataset, split off validation images, and build the train, val and test loaders (this
    rank's shard of world_size) that yield batches on the device.

    augment "photo" (folders' default): stored as resize_size squares (None: image_size /
    RESIZE_RATIO, 256 for 224), cropped to image_size: RandomResizedCrop for training, the centre
    for evaluation (torchvision's reference). "shift" (CIFAR-10's, small-image folders'): stored at
    image_size, pad-cropped. mean and std (a pretrained model's) replace the training images' own.

    cache_dir (folders): the stored squares, decoded once for later runs ("auto":
    cache_module.default_cache_dir()); on the device when they fit (resident), else read from the
    memory-mapped cache a batch at a time, augmented alike on the device. None: files decoded into
    memory (resident) or by PIL in DataLoader workers every epoch. Mixup or CutMix: the training
    loader is a MixedLoader (mixed on the device after normalisation, soft targets); evaluation
    batches never mix."""
    device = torch.device(device)
    photos = config.augment == "photo" or (config.augment == "auto" and config.dataset != "cifar10")
    resize_size = _resize_size(config, photos)
    num_workers = (os.cpu_count() or 1) if config.num_workers is None else config.num_workers
    sources, classes, size, cache_file = _read_sources(config, resize_size, num_workers, device)
    # files and cache rows are split by their labels: no pixel is read yet
    parts = _split(sources, config.val_split, config.train_subset, config.seed, config.data_dir,
                   config.dataset, classes)
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
    image_size = config.image_size if config.dataset != "cifar10" else size
    augmentation = config.augmentation(mean, std, crop_size=image_size if photos else None)
    batching = Batching(config.batch_size, True, config.seed, rank, world_size,
                        config.channels_last)
    loaders = _make_loaders(parts, batching, augmentation, image_size=image_size, resident=resident,
                            device=device, num_workers=num_workers)
    mix = batch_mixer(config.augmentations, len(classes))
    train = MixedLoader(loaders["train"], mix) if mix is not None else loaders["train"]
    counts = torch.bincount(parts["train"].labels, minlength=len(classes))
    return Data(train, loaders["val"], loaders["test"], list(classes), augmentation.mean,
                augmentation.std, image_size, resident, test_is_val=test_is_val,
                resize_size=resize_size, cache_file=cache_file, class_counts=tuple(counts.tolist()))
