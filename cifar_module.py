"""CIFAR-10 (the python version): downloaded when missing, read with an unpickler that runs no code
a file names, checked, handed over as uint8 tensors."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil

import numpy as np
import torch
from torchvision import datasets

import files_module
from folder_module import _file_message, _parent
from image_module import DataError
from messages_module import flag_named

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10, its batch files read by _read_batch and not checked against their
    sums: copies rebuilt elsewhere (from JPEGs, say) have other sums. The downloaded archive's
    checksum is still checked."""

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
    """An unpickler for CIFAR-10's batch files (dicts, lists, text, numbers, numpy arrays). A pickle
    may call any function as it loads (os.system, say): find_class admits only numpy's rebuilders,
    so a crafted file is refused before its code runs."""

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
    """A CIFAR-10 batch file read with _BatchUnpickler and checked: "data" uint8 rows of 3,072, one
    of "labels" (0-9) each, or batches.meta's "label_names"; else DataError naming it."""
    fix = f"replace it, or delete {os.path.dirname(path)} to download CIFAR-10 again"
    size = os.path.getsize(path)
    if size > CIFAR_BATCH_BYTES:
        raise DataError(
            f"{path} is not a CIFAR-10 batch file: it takes {files_module.megabytes(size)}, "
            f"and one never takes over {files_module.megabytes(CIFAR_BATCH_BYTES)}; {fix}")
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
        if os.path.basename(path) == CIFAR10.meta["filename"]:
            names = entry["label_names"]
            if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
                raise ValueError("its label_names are not a list of names")
            return entry
        data, labels = entry["data"], entry["labels"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise ValueError("its data is not uint8 rows of 3,072 values")
        if not (isinstance(labels, list) and len(labels) == len(data)
                and all(type(label) is int and 0 <= label < 10 for label in labels)):
            raise ValueError("its labels are not a class from 0 to 9 for each image")
        return entry
    except _Crafted as error:
        raise DataError(f"{path} is not a CIFAR-10 batch file: it calls {error} as it loads, "
                        "which CIFAR-10's never do (it may be crafted to run code), "
                        f"so it was refused and nothing in it ran; {fix}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, MemoryError, RecursionError) as error:  # how a cut or foreign pickle fails
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        message = f"{path} is not a readable CIFAR-10 batch file ({detail}); {fix}"
        raise DataError(message) from None


def read_cifar10(data_dir: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor, list[str]]:
    """CIFAR-10 as (train images, train labels, test images, test labels, class names): uint8
    (N, 32, 32, 3) images and int64 labels, downloaded first when missing."""
    if os.path.isfile(data_dir):
        raise DataError(_file_message(data_dir, "cifar-10-batches-py/"))
    folder = os.path.join(data_dir, CIFAR10.base_folder)
    missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing and any(os.path.isfile(os.path.join(data_dir, name)) for name in CIFAR_FILES):
        raise DataError(f"{flag_named('DATA_DIR')} {data_dir} holds CIFAR-10's files itself: "
                        f"use its parent, --data-dir {_parent(data_dir)}")
    if missing and download:
        try:
            _download_cifar10(data_dir)
        except (OSError, RuntimeError) as error:  # no network, refused, bad archive
            raise DataError(
                _missing_message(folder, missing, f"the download failed: {error}")) from None
        missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        reason = (f"{flag_named('DOWNLOAD')} is false" if not download
                  else "the downloaded archive lacked them")
        raise DataError(_missing_message(folder, missing, reason))
    train, test = CIFAR10(data_dir, train=True), CIFAR10(data_dir, train=False)  # or DataError
    if (len(train.classes) != 10 or len(train.data) != len(train.targets)
            or len(test.data) != len(test.targets)):
        raise DataError(f"{folder} does not hold CIFAR-10: "
                        "expected 10 classes and one label per image")
    return (torch.from_numpy(train.data), torch.tensor(train.targets), torch.from_numpy(test.data),
            torch.tensor(test.targets), list(train.classes))


def _download_cifar10(data_dir: str) -> None:
    """Download and unpack CIFAR-10 into data_dir. If that fails or is interrupted, what it made is
    removed (data_dir and the parents it lacked, or in a data_dir already there the new archive and
    folder), so a mistyped DATA_DIR leaves nothing behind."""
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
    """The outermost missing folder of path (path if only it is missing); None when path exists."""
    missing, path = None, os.path.abspath(path)
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _missing_message(folder: str, missing: list[str], reason: str) -> str:
    lacks = "" if len(missing) == len(CIFAR_FILES) else f" (missing {', '.join(missing)})"
    return (f"CIFAR-10 is not in {folder}{lacks} and {reason}; "
            f"unpack {CIFAR10.url} in {os.path.dirname(folder)}, "
            f"or point {flag_named('DATA_DIR')} at the folder that holds cifar-10-batches-py/")
