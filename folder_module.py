"""DATA_DIR's folder tree (<split>/<class>/<image>) or a CSV's listing, checked and read (file by
file or via the decoded-image cache); what is wrong with DATA_DIR said; OUTPUT_DIR kept out."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

import cache_module
import distributed_module
import messages_module
from decode_module import decode_files
from image_module import IMAGE_EXTENSIONS, DataError, check_image, skip_reason
from messages_module import flag_named
from source_module import ImageFiles, MappedImages, Source
from walk_module import Skipped, walk_images

SPLITS = ("train", "val", "test")  # a folder tree's split folders: DATA_DIR/<split>/<class>/<image>


@dataclass
class Listing:
    """A dataset's image files, none opened: classes (as printable shows them), each split's (path,
    label) pairs, what was skipped, the root the cache keys paths by, and how messages name a
    split's place and a class (DATA_DIR/val, "class folder"; "labels.csv's val split", "class")."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    skipped: Skipped
    root: str
    places: dict[str, str]
    unit: str


def _file_message(data_dir: str, holder_of: str) -> str:
    """The message for a DATA_DIR that is a file, not a folder."""
    archive = data_dir.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip"))
    return (f"{flag_named('DATA_DIR')} {data_dir} is {'an archive' if archive else 'a file'}, "
            "not a folder; "
            f"{'unpack it and ' if archive else ''}point it at the folder that holds {holder_of}")


def _parent(path: str) -> str:
    """The folder that holds path, as the user would type it ("." for a bare name)."""
    return os.path.dirname(os.path.normpath(path)) or "."


def list_tree(data_dir: str) -> Listing:
    """The classes of DATA_DIR/train, each split's image files and labels in ImageFolder's order
    (walk_images), and what was skipped; opens no file."""
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        raise DataError(_no_tree_message(data_dir))
    listings = {split: _entries(os.path.join(data_dir, split)) for split in SPLITS
                if os.path.isdir(os.path.join(data_dir, split))}
    classes = [entry.name for entry in listings["train"] if _is_folder(entry)]  # sorted by name
    if not classes:
        raise DataError(f"no readable images in {train_dir}: it has no class folders "
                        "(train/<class>/<image>)")
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
    places = {split: os.path.join(data_dir, split) for split in SPLITS}
    return Listing(shown, splits, skipped, data_dir, places, "class folder")


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
    """Why DATA_DIR has no train/ (a file, missing, a split or class folder); else where the tree
    is expected."""
    if os.path.isfile(data_dir):
        return _file_message(data_dir, "train/<class>/<image>")
    if not os.path.isdir(data_dir):
        return (f"{flag_named('DATA_DIR')} {data_dir} does not exist; "
                "point it at the folder that holds train/<class>/<image>")
    parent, class_folders = _parent(data_dir), _holds_class_folders(data_dir)
    split_name = os.path.basename(os.path.normpath(data_dir)) in SPLITS
    if os.path.isdir(os.path.join(parent, "train")) and (split_name or class_folders):
        return (f"{flag_named('DATA_DIR')} {data_dir} is a split folder; use its parent, "
                f"--data-dir {parent}")
    if class_folders:
        return (f"{flag_named('DATA_DIR')} {data_dir} holds class folders but no train/: "
                f"move them into {os.path.join(data_dir, 'train')}/, "
                "or point --data-dir at the folder that holds train/")
    return (f"no ImageFolder tree in {data_dir}: expected "
            f"{os.path.join(data_dir, 'train')}/<class>/<image> (val/ and test/ beside it "
            f"optional); point {flag_named('DATA_DIR')} at the folder that holds train/")


def _holds_class_folders(folder: str) -> bool:
    """Whether a subfolder of folder holds an image file: folder is one split's class folders."""
    try:
        with os.scandir(folder) as entries:
            return any(entry.is_dir() and any(name.lower().endswith(IMAGE_EXTENSIONS)
                                              for name in os.listdir(entry.path))
                       for entry in entries)
    except OSError:  # unreadable: nothing to say about it here
        return False


def _check_splits(listing: Listing, splits: dict[str, list[tuple[str, int]]]) -> None:
    """DataError unless each class has a training image, 2+ classes, and val/test hold images."""
    classes, train, unit = listing.classes, listing.places["train"], listing.unit
    found = {label for _, label in splits["train"]}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise DataError(f"no readable images in {train}: "
                        f"none in the {unit}{'' if len(empty) == 1 else 's'} {', '.join(empty)}")
    if len(classes) < 2:
        layout = " (train/<class>/<image>)" if unit == "class folder" else ""
        raise DataError(f"{train} has {messages_module.plural(len(classes), unit)} with images; "
                        f"a classifier needs at least two{layout}")
    for split in ("val", "test"):
        if split in splits and not splits[split]:
            raise DataError(f"{listing.places[split]} holds no readable images; "
                            "fill it or remove it")


def _readable(listing: Listing) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Each split's (paths, labels) but the skipped (warned about); DataError when a class or split
    is left empty."""
    for line in listing.skipped.warnings():
        print(f"warning: {line}", file=sys.stderr)
    skip = listing.skipped.every_path()
    splits = {name: [(path, label) for path, label in samples if path not in skip]
              for name, samples in listing.splits.items()}
    _check_splits(listing, splits)
    return {name: ([path for path, _ in samples],
                   torch.tensor([label for _, label in samples], dtype=torch.int64))
            for name, samples in splits.items()}


def _scan_folder(listing: Listing, size: int) -> dict[str, ImageFiles]:
    """Splits of files Pillow opens under its pixel limit (others skipped), as size-px squares."""
    for samples in listing.splits.values():
        for path, _ in samples:
            reason = check_image(path)
            if reason:
                listing.skipped.add(reason, path)
    return {name: ImageFiles(paths, labels, size)
            for name, (paths, labels) in _readable(listing).items()}


def _cached_folder(listing: Listing, size: int, cache_dir: str, num_workers: int,
                   device: torch.device) -> tuple[dict[str, MappedImages], str]:
    """_scan_folder's splits as rows of the cache in cache_dir (built when missing or stale; its
    decode failures skipped), and the cache file. A valid cache opens no image."""
    _check_splits(listing, listing.splits)  # before anything is decoded
    paths = [path for samples in listing.splits.values() for path, _ in samples]
    cache = cache_module.open_or_build(
        paths, size, cache_dir, root=listing.root,
        fill=lambda out: decode_files(paths, size, out, num_workers, "decoding", device=device))
    for i, message in cache.failed:
        listing.skipped.add(skip_reason(message), paths[i])
    row = {path: i for i, path in enumerate(paths)}
    return {name: MappedImages(cache.images, torch.tensor([row[path] for path in paths]), labels,
                               cache.path)
            for name, (paths, labels) in _readable(listing).items()}, cache.path


def read_folder(listing: Listing, size: int, cache_dir: str | None, num_workers: int,
                device: torch.device) -> tuple[dict[str, Source], str | None]:
    """A listing's split sources and the cache file (None without one): via the cache in cache_dir
    ("auto": the user's cache folder, skipped if unusable) unless cache_dir is None."""
    if cache_dir is not None:
        folder = cache_module.default_cache_dir() if cache_dir == "auto" else cache_dir
        try:
            return distributed_module.node_first(  # under torchrun: once on each node
                lambda: _cached_folder(listing, size, folder, num_workers, device),
                "opening (or first building) the decoded-image cache")
        except cache_module.CacheError as error:
            if cache_dir != "auto":
                raise DataError(f"{flag_named('CACHE_DIR')} {cache_dir}: {error}; "
                                "set it to a writable folder with room, "
                                "or to none to decode the images without a cache") from None
            print(f"warning: {error}; the images are decoded without a cache (set "
                  f"{flag_named('CACHE_DIR')} to a writable folder to keep them)", file=sys.stderr)
    return _scan_folder(listing, size), None


def check_outside_data(config: Any, output_dir: str) -> None:
    """DataError when OUTPUT_DIR is or is inside DATA_DIR's split or class folders (links followed):
    the next run would read its figures as photos. Reads only folder names. config: a DataConfig."""
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
                raise DataError(f"{flag_named('OUTPUT_DIR')} {shown} is inside the data folder "
                                f"{messages_module.printable(inside)}, whose images the next run "
                                "would read with its figures among them; choose an output folder "
                                f"outside {flag_named('DATA_DIR')}'s train/, val/ and test/")
