"""Image files: one read as an upright RGB picture at the size a folder's images are stored at, many decoded in
parallel into uint8 arrays, and the files a prediction is asked for found."""

from __future__ import annotations

import contextlib
import math
import mmap
import multiprocessing
import multiprocessing.pool
import os
import queue
import sys
import tempfile
from typing import Iterator

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as F
from tqdm import tqdm

# Photo formats a folder tree may hold; the ones this Pillow cannot open (.heic without pillow-heif, say)
# count as files that are not images. Pillow knows more (.mpg, .eps, .h5), but it only identifies those.
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif",
                    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".avif", ".heic", ".heif")
IMAGE_EXTENSIONS = tuple(e for e in PHOTO_EXTENSIONS if Image.registered_extensions().get(e) in Image.OPEN)
DECODE_CHUNK = 16  # most files per decoding task: a task's own cost (about 0.1 ms) is under 1% of theirs


class DataError(ValueError):
    """Missing or unreadable data, or a split that cannot be made: a message for the user."""



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
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
            return image  # upright as stored: itself, not exif_transpose's copy (3% of a decode)
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block (Pillow raises several types): keep the pixels as stored
        return image


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
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def read_stored(path: str, size: int) -> Image.Image:
    """An image file as a folder's images are stored: upright RGB (open_rgb), shorter side resized to size,
    the centre size x size square."""
    return F.center_crop(F.resize(open_rgb(path, reduce_to=size), size), [size, size])


def decode_files(paths: list[str], size: int, out: torch.Tensor | np.ndarray, num_workers: int,
                 desc: str) -> list[tuple[int, str]]:
    """Decode each file as read_stored does into out[i] (uint8 (N, size, size, 3): a tensor in memory, or the
    cache's np.memmap of its .npy file), in num_workers processes (0: in this one) with a progress bar; returns
    (i, message) for each file that could not be read (its row left black).

    Workers take DECODE_CHUNK file names at a time and write their rows straight into the .npy file, which
    each opens itself; rows in memory they write into a few shared chunks, which this process copies into
    out. Only the failures come back."""
    rows = out.numpy() if isinstance(out, torch.Tensor) else out
    assert rows.shape == (len(paths), size, size, 3) and rows.dtype == np.uint8, "out is not N stored squares"
    failures = []
    with tqdm(total=len(paths), desc=desc, unit="image", disable=not sys.stderr.isatty()) as bar:
        if num_workers == 0 or not paths:
            for i, path in enumerate(paths):
                pixels, message = _stored_bytes(path, size)
                rows[i] = np.frombuffer(pixels, np.uint8).reshape(size, size, 3)
                failures += [(i, message)] if message else []
                bar.update(1)
            return failures
        chunk = max(1, min(DECODE_CHUNK, len(paths) // (4 * num_workers)))  # every worker gets several
        processes = min(num_workers, -(-len(paths) // chunk))
        context = _worker_context()
        with _shared_rows(rows, 2 * processes * chunk, context) as (target, scratch):
            pool = context.Pool(processes, _set_target, (target,))
            try:
                tasks = -(-len(paths) // chunk)  # a slot each when workers write rows themselves
                slots = [None] * tasks if scratch is None else range(2 * processes)
                for start, count, slot, failed in _in_turn(pool, paths, chunk, slots):
                    if scratch is not None:
                        rows[start:start + count] = scratch[slot * chunk:slot * chunk + count]
                    failures += failed
                    bar.update(count)
                pool.close()
            finally:
                pool.terminate()
                pool.join()
    return sorted(failures)


def _stored_bytes(path: str, size: int) -> tuple[bytes, str]:
    """read_stored's pixels as bytes (size rows of size RGB pixels) and "", or zeros and the message of a file
    that cannot be read."""
    try:
        return read_stored(path, size).tobytes(), ""
    except DataError as error:
        return bytes(size * size * 3), str(error)


class _RowFile:
    """Rows of a .npy file, for a worker to write in place: written with write(2), which costs this 2-core VM
    a third of the system time that storing them through a memory map does (0.12 ms against 0.39 ms for a
    256-px row), as the map takes a page fault for each of its 48 pages."""

    def __init__(self, filename: str, offset: int, size: int):
        self.filename, self.offset, self.size, self.file = filename, offset, size, None  # opened in the worker

    def write(self, row: int, pixels: bytes) -> None:
        if self.file is None:
            self.file = open(self.filename, "r+b", buffering=0)
        self.file.seek(self.offset + row * len(pixels))
        view = memoryview(pixels)
        while view:  # a regular file takes it whole, but for a full disk, which raises
            view = view[self.file.write(view):]


class _RowArray:
    """Rows of an array in shared memory, which a forked worker inherits."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.size = rows, rows.shape[1]

    def write(self, row: int, pixels: bytes) -> None:
        self.rows[row] = np.frombuffer(pixels, np.uint8).reshape(self.rows.shape[1:])


_target: _RowFile | _RowArray | None = None  # in a decoding worker process: where it writes (_set_target)


def _set_target(target: _RowFile | _RowArray) -> None:
    """A worker's initializer: where its rows go."""
    global _target
    _target = target


def _decode_task(task: tuple[int, list[str], int, int | None]) -> tuple[int, int, int | None, list[tuple[int, str]]]:
    """In a worker: the files of rows start on decoded into the target's rows from `first` on; (start, count,
    slot, failures)."""
    start, paths, first, slot = task
    failures = []
    for k, path in enumerate(paths):
        pixels, message = _stored_bytes(path, _target.size)
        _target.write(first + k, pixels)
        failures += [(start + k, message)] if message else []
    return start, len(paths), slot, failures


def _in_turn(pool: multiprocessing.pool.Pool, paths: list[str], chunk: int,
             slots: list[int | None] | range) -> Iterator[tuple[int, int, int | None, list[tuple[int, str]]]]:
    """What _decode_task returns for each chunk of paths, as workers finish them: into their own rows (slot
    None), or into scratch slot s (rows s * chunk on). A slot holds one task at a time and is given the next
    chunk once the caller has taken the last one's rows (with two slots for each worker, each has the next
    task in its queue)."""
    results = queue.SimpleQueue()
    starts = iter(range(0, len(paths), chunk))

    def submit(slot: int | None) -> int:
        start = next(starts, None)
        if start is None:
            return 0
        task = (start, paths[start:start + chunk], start if slot is None else slot * chunk, slot)
        pool.apply_async(_decode_task, (task,), callback=results.put, error_callback=results.put)
        return 1

    in_flight = sum(submit(slot) for slot in slots)
    while in_flight:
        result = results.get()
        if isinstance(result, BaseException):  # raised in a worker (a DataError is caught there)
            raise result
        yield result
        in_flight += submit(result[2]) - 1


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers start at once, sharing this process's imports and memory, as DataLoader workers
    do there (they touch no torch tensor, so torch's threads are not missed); else the platform's default
    (spawn), whose workers import this module."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@contextlib.contextmanager
def _shared_rows(rows: np.ndarray, scratch_rows: int, context: multiprocessing.context.BaseContext
                 ) -> Iterator[tuple[_RowFile | _RowArray, np.ndarray | None]]:
    """Where workers write, and the scratch to copy rows from (None: they write rows themselves).

    A .npy file's whole memory map (the cache): the file, which workers open. Rows in private memory: a
    scratch of scratch_rows rows, reused, in shared anonymous memory that forked workers inherit, else in a
    small temporary file. Reused, because the first write to shared memory is slow: on a 2-core VM, 150 us
    for a 256-px row (48 new pages), against 28 us once its pages are there."""
    size = rows.shape[1]
    if isinstance(rows, np.memmap) and isinstance(rows.base, mmap.mmap) and rows.filename:  # not a view
        yield _RowFile(rows.filename, rows.offset, size), None
        return
    shape = (scratch_rows, *rows.shape[1:])
    if context.get_start_method() == "fork":
        scratch = np.frombuffer(mmap.mmap(-1, math.prod(shape)), np.uint8).reshape(shape)  # MAP_SHARED
        yield _RowArray(scratch), scratch
        return
    with tempfile.TemporaryDirectory(prefix="decode_", ignore_cleanup_errors=True) as folder:
        scratch = np.lib.format.open_memmap(os.path.join(folder, "rows.npy"), "w+", np.uint8, shape)
        yield _RowFile(scratch.filename, scratch.offset, size), scratch
        del scratch  # unmapped before the folder is removed (Windows cannot remove a mapped file)


def opens(path: str) -> bool:
    """Whether Pillow opens the file and finds its header sound (as cheap as a check can be that still catches
    corrupt files, yet 20 times the cost of listing it: a valid cache spares it)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # Pillow raises many types for a bad file; every one means "skip it"
        return False


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
