"""Image files: one read as an upright RGB picture at the size a folder's images are stored at, many
decoded in parallel into uint8 arrays (JPEGs in batches on a CUDA device, the rest in worker
processes), and the files a prediction is asked for found."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Iterator

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2
from tqdm import tqdm

import utils
from augment_module import evaluation_transform

# Photo formats a folder tree may hold; the ones this Pillow cannot open (.heic without pillow-heif,
# say) count as files that are not images. Pillow knows more (.mpg, .eps, .h5), but it only
# identifies those.
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib",
    ".gif", ".tif",
                    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k",
                    ".avif", ".heic", ".heif")
IMAGE_EXTENSIONS = tuple(e for e in PHOTO_EXTENSIONS if Image.registered_extensions().get(
    e) in Image.OPEN)
# most files per decoding task: a task's own cost (about 0.1 ms) is under 1% of theirs
DECODE_CHUNK = 16
# most JPEGs per decode_jpeg call on a CUDA device: nvJPEG decodes a list as one batch,
GPU_DECODE_BATCH = 128
# and 128 rows of 256 px are 25 MB of pinned staging, twice
# most decoded pixels in such a batch (134 M: 0.4 GB as uint8 RGB, 1.6 GB as the
GPU_DECODE_PIXELS = 2 ** 27
# resize's float copy), so that large photos come fewer at a time: 11 of 12 MP, 128 of 1 MP
GPU_READ_AHEAD = 3  # batches of file bytes a thread reads ahead of the device's decoding
JPEG_SIGNATURE = b"\xff\xd8\xff"  # the first bytes of every JPEG file (SOI, then a marker)
JPEG_END = b"\xff\xd9"  # the last marker of a whole JPEG (EOI); a file cut short lacks it
# bytes a path may have, its NUL included (Linux: 4,096): a longer one cannot be opened
# (ENAMETOOLONG), so a walk skips it
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 32767
# modes Pillow resizes by their values (a palette it resizes by nearest index; 1-bit stays 1-bit)
RESIZED_EARLY = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16L", "I;16B",
                 "F")
PIXEL_LIMIT_NOTE = "(PIL.Image.MAX_IMAGE_PIXELS)"  # ends the message of an image too large to read
SKIPS = {  # why a walk or a decode passes a file (or folder) over: what one and many are called
    "not an image": ("file that is not an image", "files that are not images"),
    "outside the classes": ("file outside the class folders", "files outside the class folders"),
    "not a regular file": ("file that is not a regular file (a FIFO, socket or device)",
                           "files that are not regular files (FIFOs, sockets or devices)"),
    "dangling link": ("link whose target is missing or unreachable",
                      "links whose targets are missing or unreachable"),
    "folder read already": ("link to a folder read already", "links to folders read already"),
    "cannot list": ("folder that cannot be listed", "folders that cannot be listed"),
    "path too long": (f"path longer than the system allows ({PATH_MAX} bytes)",
                      f"paths longer than the system allows ({PATH_MAX} bytes)"),
    "unreadable": ("unreadable image file", "unreadable image files"),
    "too many pixels": ("image of more pixels than PIL.Image.MAX_IMAGE_PIXELS",
                        "images of more pixels than PIL.Image.MAX_IMAGE_PIXELS"),
}


class DataError(ValueError):
    """Missing or unreadable data, or a split that cannot be made: a message for the user."""


class TooManyPixels(DataError):
    """An image of more pixels than PIL.Image.MAX_IMAGE_PIXELS: skipped like an unreadable one,
    never decoded."""



def open_rgb(path: str, reduce_to: int | None = None) -> Image.Image:
    """An image file as an upright RGB PIL image (EXIF orientation applied, any mode converted by
    to_rgb).

    With reduce_to (pixels), the image is made smaller while it decodes: a JPEG is decoded at 1/2,
    1/4 or 1/8 scale where its sides keep at least twice reduce_to pixels (JPEG DCT scaling, as
    Pillow's thumbnail does: 2 to 7 times faster for photos much larger than that, and within a few
    levels of a full decode once resized to reduce_to); any other image is resized as read_stored
    resizes it (shorter side reduce_to) before its mode is converted, so that a worker holds the
    decoded file and its small copy, not the full-size copies to_rgb makes (a 36-megapixel RGBA PNG
    stored at 256 px: 0.28 GB at its peak, not 0.55 GB; Pillow's resize premultiplies a copy). A
    file whose header opens but whose data is cut short or damaged (an interrupted copy) loads with
    the missing part grey, as Pillow's LOAD_TRUNCATED_IMAGES does, and a warning names it once per
    process; a file that does not open at all raises DataError naming it, and one of more pixels
    than PIL.Image.MAX_IMAGE_PIXELS TooManyPixels (it is never decoded)."""
    # ValueError: a mode RGB cannot come from; the bomb error: an animation's frame, as it loads
    unreadable = (OSError, ValueError, Image.DecompressionBombError)
    try:
        with _open(path) as image:
            return _decoded(image, reduce_to)
    except TooManyPixels:
        raise
    except unreadable as error:
        first_error = error
    try:
        with _truncated_images_allowed(), _open(path) as image:
            rgb = _decoded(image, reduce_to)
    except unreadable:
        raise DataError(f"{utils.printable(path)} is not an image file that Pillow can read "
                        f"({first_error})") from None
    if path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: {utils.printable(path)} is truncated or damaged ({first_error}); the part "
              f"that decodes is used, the rest is grey", file=sys.stderr)
    return rgb


_WARNED: set[str] = set()  # damaged files already named in this process
# Pillow warns of an image over its limit and raises over twice it; _open refuses any over it, so
# the warning would only repeat that (and may come from the GPU decoder's reading thread)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open(path: str) -> Image.Image:
    """Image.open (the header read, no pixel decoded), refusing with TooManyPixels an image of more
    pixels than PIL.Image.MAX_IMAGE_PIXELS (read at each call; None: no limit): a 100-megapixel PNG
    of 2 MB takes over a gigabyte to decode."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:  # over twice the limit: Pillow refuses it itself
        raise TooManyPixels(_too_many_pixels(path, f"more than {2 * limit:,}", limit)) from None
    if limit and image.width * image.height > limit:
        image.close()
        raise TooManyPixels(_too_many_pixels(path, f"{image.width} x {image.height}", limit))
    return image


def _too_many_pixels(path: str, pixels: str, limit: int) -> str:
    """The message of an image refused for its size: it ends with PIXEL_LIMIT_NOTE (skip_reason)."""
    return f"{utils.printable(path)} has {pixels} pixels, over {limit:,} {PIXEL_LIMIT_NOTE}"


def skip_reason(message: str) -> str:
    """Why a file that failed to decode with this message (decode_files') is skipped: "unreadable",
    or "too many pixels" (a key of SKIPS)."""
    return "too many pixels" if message.endswith(PIXEL_LIMIT_NOTE) else "unreadable"


def check_image(path: str) -> str | None:
    """Why Pillow would not decode the file (a key of SKIPS: "unreadable", "too many pixels"), or
    None when it opens and its header is sound (as cheap as a check can be that still catches
    corrupt files, yet 20 times the cost of listing it: a valid cache spares it)."""
    try:
        with _open(path) as image:
            image.verify()
        return None
    except TooManyPixels:
        return "too many pixels"
    except Exception:  # Pillow raises many types for a bad file; every one means "skip it"
        return "unreadable"


@contextlib.contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    """Pillow's switch is global: set it only around one load (loads run one at a time in each
    process)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _decoded(image: Image.Image, reduce_to: int | None) -> Image.Image:
    """An opened image decoded as open_rgb says: upright and RGB; with reduce_to, a JPEG at the
    scale its draft picks, and any other image whose mode allows it (RESIZED_EARLY, and no
    transparent colour, which resizing would blend away) resized as read_stored resizes it, before
    to_rgb rather than after: the same pixels (RGB, greyscale), or within two levels (transparency:
    composited on white before or after)."""
    drafted = bool(reduce_to) and image.draft(None, (2 * reduce_to,) * 2) is not None  # JPEGs only
    image = _upright(image)
    early = image.mode in RESIZED_EARLY and "transparency" not in image.info
    if reduce_to and not drafted and early:
        image = F.resize(image, reduce_to)
    return to_rgb(image)


def _upright(image: Image.Image) -> Image.Image:
    """The image decoded (a JPEG at the scale its draft set) and turned as its EXIF orientation tag
    says (phones store photos sideways)."""
    image.load()  # decoding errors (a truncated file) belong to the caller
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
            return image  # upright as stored: itself, not exif_transpose's copy (3% of a decode)
        return ImageOps.exif_transpose(image)
    # a malformed EXIF block (Pillow raises several types): keep the pixels as stored
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit greyscale scaled to 8 bits (a plain convert clips it at
    255), transparency composited on white (as a viewer shows it; the colour under transparent
    pixels is often black or junk), palette, greyscale and CMYK converted by Pillow."""
    if image.mode == "I" or image.mode.startswith("I;16"):  # "I": 16-bit PNGs in older Pillows
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        # round(v / 257)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
            rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def read_stored(path: str, size: int) -> Image.Image:
    """An image file as a folder's images are stored: upright RGB (open_rgb), shorter side resized
    to size, the centre size x size square."""
    return F.center_crop(F.resize(open_rgb(path, reduce_to=size), size), [size, size])


def decode_files(paths: list[str], size: int, out: torch.Tensor | np.ndarray, num_workers: int,
    desc: str, *,
                 device: torch.device | str | None = None) -> list[tuple[int, str]]:
    """Decode each file as read_stored does into out[i] (uint8 (N, size, size, 3): a tensor in
    memory, or the cache's np.memmap of its .npy file), in num_workers processes (0: in this one)
    with a progress bar; returns (i, message) for each file that could not be read (its row left
    black).

    Workers take DECODE_CHUNK file names at a time and write their rows straight into the .npy file,
    which each opens itself; rows in memory they write into a few shared chunks, which this process
    copies into out. Only the failures come back.

    With a CUDA device, the JPEGs that need no turning are decoded there first, in batches
    (_decode_jpegs: within a level of Pillow's pixels on average, a few at most); the other files,
    and any JPEG the device could not decode, then go to the processes as above."""
    rows = out.numpy() if isinstance(out, torch.Tensor) else out
    assert rows.shape == (len(paths), size, size,
        3) and rows.dtype == np.uint8, "out is not N stored squares"
    with tqdm(total=len(paths), desc=desc, unit="image", disable=not sys.stderr.isatty()) as bar:
        left = list(range(len(paths)))
        jpeg_device = _jpeg_device(device)
        if jpeg_device is not None and paths:
            left = _decode_jpegs(paths, size, rows, jpeg_device, bar)
        return _decode_in_processes(paths, left, rows, num_workers, bar)


def _decode_in_processes(paths: list[str], files: list[int], rows: np.ndarray, num_workers: int,
                         bar: tqdm) -> list[tuple[int, str]]:
    """decode_files' CPU path: the files numbered `files` (ascending) into their rows, as
    decode_files says."""
    size, failures = rows.shape[1], []
    if num_workers == 0 or not files:
        for i in files:
            pixels, message = _stored_bytes(paths[i], size)
            rows[i] = np.frombuffer(pixels, np.uint8).reshape(size, size, 3)
            failures += [(i, message)] if message else []
            bar.update(1)
        return failures
    chunk = max(1, min(DECODE_CHUNK, len(files) // (4 * num_workers)))  # every worker gets several
    processes = min(num_workers, -(-len(files) // chunk))
    context = _worker_context()
    with _shared_rows(rows, 2 * processes * chunk, context) as (target, scratch), \
            _Workers(context, processes, target, paths) as workers:
        for done, slot, failed in _in_turn(workers, paths, files, chunk, scratch is not None):
            if scratch is not None:
                for k, count in _runs(done):
                    first = slot * chunk + k
                    rows[done[k]:done[k] + count] = scratch[first:first + count]
            failures += failed
            bar.update(len(done))
    return sorted(failures)


def _runs(numbers: list[int]) -> Iterator[tuple[int, int]]:
    """(position, length) of each run of consecutive numbers in the list: [4, 5, 6, 9] gives (0, 3),
    (3, 1)."""
    start = 0
    for k in range(1, len(numbers) + 1):
        if k == len(numbers) or numbers[k] != numbers[k - 1] + 1:
            yield start, k - start
            start = k


# --------------------------------------------------------------------------- JPEGs decoded on a
# CUDA device


def _jpeg_device(device: torch.device | str | None) -> torch.device | None:
    """The device decode_files decodes JPEGs on: the device given when it is a CUDA device, else
    None (every file on the CPU). The seam tests replace to run the batched path on the CPU."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return torch.device(device)


def _decode_jpegs(paths: list[str], size: int, rows: np.ndarray, device: torch.device,
        bar: tqdm) -> list[int]:
    """The JPEGs among paths that the device may decode (_device_pixels), decoded there in batches,
    resized and cropped as read_stored does (_stored_squares), into their rows; returns the numbers
    of the other files, ascending, for the CPU: files of other formats, JPEGs to be turned, cut
    short or of other colour spaces, and any JPEG the device failed to decode.

    A thread reads the files ahead (utils.in_background); each batch's squares are copied to the
    host (pinned memory on CUDA, one copy a batch) while the next batch is decoded, then written to
    their rows as _RowFile or _RowArray writes a worker's. Pixels are within a level of Pillow's on
    average, a few at most: the decoder's rounding differs, and the JPEG draft is reproduced from
    the whole image (_squares_of)."""
    pinned = device.type == "cuda"
    staging = [torch.empty((GPU_DECODE_BATCH, size, size, 3), dtype=torch.uint8, pin_memory=pinned)
               for _ in range(2)]  # one for the batch being copied, one for the batch being written
    target = _RowFile(rows.filename, rows.offset, size) if _in_a_file(rows) else _RowArray(rows)
    left, pending = [], None
    batches = utils.in_background(_jpeg_batches(paths), GPU_READ_AHEAD)
    try:
        for turn, (files, encoded, others) in enumerate(batches):
            images = _decode_on(device, encoded)
            left += others + [i for i, image in zip(files, images) if image is None]
            decoded = [(i, image) for i, image in zip(files, images) if image is not None]
            copied = None
            if decoded:
                squares = staging[turn % 2][:len(decoded)]
                squares.copy_(_stored_squares([image for _, image in decoded], size),
                    non_blocking=pinned)
                copied = ([i for i, _ in decoded], squares, _copied_event(device))
            if pending:
                _write_rows(target, *pending)
                bar.update(len(pending[0]))
            pending = copied
        if pending:
            _write_rows(target, *pending)
            bar.update(len(pending[0]))
    finally:
        batches.close()
        target.close()
    if device.type == "cuda":
        # the batches' blocks back to the device: its free memory then decides RESIDENT
        torch.cuda.empty_cache()
    return sorted(left)


def _jpeg_batches(paths: list[str]) -> Iterator[tuple[list[int], list[torch.Tensor], list[int]]]:
    """The files the device may decode, read, in batches: (their numbers, their bytes as uint8
    tensors, the numbers of the files passed over since the last batch, for the CPU). A batch holds
    GPU_DECODE_BATCH files and GPU_DECODE_PIXELS decoded pixels at most."""
    files, encoded, others, pixels = [], [], [], 0
    for i, path in enumerate(paths):
        try:
            data = np.fromfile(path, np.uint8)
        except OSError:  # unreadable: the CPU path names it
            data = np.empty(0, np.uint8)
        count = _device_pixels(data)
        if not count:
            others.append(i)
            continue
        if files and (len(files) == GPU_DECODE_BATCH or pixels + count > GPU_DECODE_PIXELS):
            yield files, encoded, others
            files, encoded, others, pixels = [], [], [], 0
        files.append(i)
        encoded.append(torch.from_numpy(data))
        pixels += count
    if files or others:
        yield files, encoded, others


def _device_pixels(data: np.ndarray) -> int:
    """The pixels a file's bytes decode to when the device may decode them (0 when not): a whole
    JPEG (its signature first, its end marker last), YCbCr (Pillow's mode RGB: greyscale, CMYK and
    Adobe's unconverted RGB go to Pillow, whose conversions the device's decoder need not share),
    upright as stored (an EXIF orientation other than 1 is Pillow's to apply, as read_stored does),
    of no more pixels than PIL.Image.MAX_IMAGE_PIXELS (a larger one is the CPU path's to refuse).
    Pillow reads the header alone."""
    if data[:3].tobytes() != JPEG_SIGNATURE or not data[-64:].tobytes().rstrip(b"\0").endswith(
            JPEG_END):
        return 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            # as _upright turns
            upright = image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9)
            limit = Image.MAX_IMAGE_PIXELS
            small = not limit or image.width * image.height <= limit
            if image.mode == "RGB" and upright and image.info.get("adobe_transform") != 0 and small:
                return image.width * image.height
    # Pillow raises many types for a bad header (or EXIF block): the CPU path reports it
    except Exception:
        pass
    return 0


def _decode_on(device: torch.device, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The JPEGs decoded on the device as uint8 (3, H, W) RGB tensors, in one batch; None for each
    that fails. One bad file fails a batch, which is then decoded a file at a time."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, ImageReadMode.RGB, device)) if encoded else []
        # decoding errors (a corrupt file) are RuntimeErrors, on the CPU and on CUDA
        except RuntimeError:
            pass
        images = []
        for data in encoded:
            try:
                images.append(decode_jpeg([data], ImageReadMode.RGB, device)[0])
            except RuntimeError:
                images.append(None)
        return images


def _stored_squares(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Whole decoded JPEGs, uint8 (3, H, W) (at least one), as read_stored stores them: uint8 (N,
    size, size, 3) (_squares_of). Images of one shape are reduced and resized as one batch (a
    folder's photos mostly share a few; when they share one, its squares come back as they are, no
    copy made)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    if len(groups) == 1:
        return _squares_of(torch.stack(images), size)
    squares = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=images[0].device)
    for positions in groups.values():
        index = torch.tensor(positions, device=squares.device)
        squares.index_copy_(0, index, _squares_of(torch.stack([images[k] for k in positions]),
            size))
    return squares


def _squares_of(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) whole decoded JPEGs as read_stored stores them: uint8 (N, size, size, 3),
    maybe a view. First reduced as read_stored's JPEG draft decodes them (_draft_scale; each s x s
    block's mean, which is what DCT scaling computes, rounded to uint8 as it is), then the shorter
    side resized to size (bilinear, antialiased), the centre square. Without the reduction a
    2000x1500 photo stored at 24 px would differ from Pillow's by 14 levels on average, and an
    801x603 one at 128 px by 9 (its resized width one pixel off, the crop shifted); with it, within
    1 level of Pillow's on average (see the tests)."""
    scale = _draft_scale(images.shape[2], images.shape[3], size)
    if scale > 1:  # ceil_mode: the edge's partial blocks too, averaged over the pixels they have
        images = torch.nn.functional.avg_pool2d(images.float(), scale, ceil_mode=True).round_().to(
            torch.uint8)
    resized = F2.resize(images, [size], interpolation=F2.InterpolationMode.BILINEAR, antialias=True)
    return F2.center_crop(resized, [size, size]).permute(0, 2, 3, 1)


def _draft_scale(height: int, width: int, size: int) -> int:
    """The reduction (1, 2, 4 or 8) Pillow's JpegImageFile.draft picks for read_stored (open_rgb's
    reduce_to size, a square of twice that asked for): the largest that keeps both sides at least 2
    x size."""
    fits = min(width // (2 * size), height // (2 * size))
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _copied_event(device: torch.device) -> torch.cuda.Event | None:
    """An event recorded after the copies queued on the device's current stream (None on the CPU,
    whose copies are done when queued)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _write_rows(target: _RowFile | _RowArray, files: list[int], squares: torch.Tensor,
                copied: torch.cuda.Event | None) -> None:
    """Host squares[k] (once copied) into file files[k]'s row, a run of consecutive rows at a
    time."""
    if copied is not None:
        copied.synchronize()
    pixels = squares.numpy()
    for k, count in _runs(files):
        target.write(files[k], pixels[k:k + count])



# --------------------------------------------------------------------------- files decoded on the
# CPU


def _stored_bytes(path: str, size: int) -> tuple[bytes, str]:
    """read_stored's pixels as bytes (size rows of size RGB pixels) and "", or zeros and the message
    of a file that cannot be read."""
    try:
        return read_stored(path, size).tobytes(), ""
    except DataError as error:
        return bytes(size * size * 3), str(error)


class _RowFile:
    """Rows of a .npy file, for a worker to write in place: written with write(2), which costs this
    2-core VM a third of the system time that storing them through a memory map does (0.12 ms
    against 0.39 ms for a 256-px row), as the map takes a page fault for each of its 48 pages."""

    def __init__(self, filename: str, offset: int, size: int):
        # opened in the worker
        self.filename, self.offset, self.size, self.file = filename, offset, size, None

    def write(self, row: int, pixels: bytes | np.ndarray) -> None:
        """Rows from `row` on: as many as pixels holds (contiguous, whole rows)."""
        if self.file is None:
            self.file = open(self.filename, "r+b", buffering=0)
        self.file.seek(self.offset + row * 3 * self.size ** 2)
        view = memoryview(pixels).cast("B")
        while view:  # a regular file takes it whole, but for a full disk, which raises
            view = view[self.file.write(view):]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _RowArray:
    """Rows of an array in shared memory, which a forked worker inherits."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.size = rows, rows.shape[1]

    def write(self, row: int, pixels: bytes | np.ndarray) -> None:
        """Rows from `row` on: as many as pixels holds (contiguous, whole rows)."""
        rows = np.frombuffer(pixels, np.uint8).reshape(-1, *self.rows.shape[1:])
        self.rows[row:row + len(rows)] = rows

    def close(self) -> None:
        pass


_target: _RowFile | _RowArray | None = None  # in a decoding worker process: where it writes (_work)


def _decode_task(task: tuple[list[int], list[str], int | None, int | None], decoding, worker: int
                 ) -> tuple[list[int], int | None, list[tuple[int, str]]]:
    """In a worker: files numbered `files` (their paths given) decoded into their own rows of the
    target (first None), or into its rows from `first` on; (files, slot, failures). decoding[worker]
    holds the number of the file being decoded, for the parent to name should this process die (-1
    between tasks)."""
    files, paths, first, slot = task
    failures = []
    for k, (i, path) in enumerate(zip(files, paths)):
        decoding[worker] = i
        pixels, message = _stored_bytes(path, _target.size)
        _target.write(i if first is None else first + k, pixels)
        failures += [(i, message)] if message else []
    decoding[worker] = -1
    return files, slot, failures


def _work(connection: Connection, parents_ends: list[Connection], target: _RowFile | _RowArray,
          decoding, worker: int, parent: int) -> None:
    """A decoding worker's life: the tasks sent to it, one at a time, each answered with
    _decode_task's result (or the error it raised) until None comes, or the parent is gone. It
    leaves Ctrl-C to the parent and dies with it. parents_ends: the parent's ends of the pipes so
    far, which a forked worker closes (so that its pipe ends with the parent)."""
    global _target
    for end in parents_ends:
        end.close()
    utils.become_worker(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the run's handler
    if hasattr(signal, "pthread_sigmask"):  # blocked by _Workers while it started this process
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RUN_SIGNALS)
    _target = target
    while True:
        try:
            task = connection.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        try:
            result = _decode_task(task, decoding, worker)
        except Exception as error:  # the parent raises it (a DataError is caught in _stored_bytes)
            result = error
        try:
            connection.send(result)
        except Exception:  # an error that does not pickle: its text
            connection.send(RuntimeError(f"{type(result).__name__}: {result}"))


_RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the run's to handle, never a decoding worker's


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """_RUN_SIGNALS blocked in this thread for the block (held until its end, when Python runs their
    handlers), so that a process started in it begins with them blocked. No masks: nothing."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _RUN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _Workers:
    """Decoding worker processes, each sent tasks of its own through a pipe, with shared memory
    where each notes the file it is decoding. A worker that dies (the out-of-memory killer, a crash
    in a decoder) is noticed at once and raises WorkerDied naming that file, where
    multiprocessing.Pool would start another and wait forever for the lost task. Leaving the block
    stops them all."""

    def __init__(self, context: multiprocessing.context.BaseContext, count: int,
                 target: _RowFile | _RowArray, paths: list[str]):
        self.context, self.count, self.target, self.paths = context, count, target, paths
        self.decoding = context.RawArray("q", [-1] * count)  # the file each worker is on (-1: none)
        self.processes, self.connections, self.held = [], [], [0] * count

    def __enter__(self) -> _Workers:
        try:
            with _signals_blocked():  # until each worker has set its own handling (_work); one that
                for w in range(self.count):  # comes to this process meanwhile waits for the unblock
                    ours, theirs = self.context.Pipe()
                    args = (theirs, self.connections + [ours], self.target, self.decoding, w,
                            os.getpid())
                    process = self.context.Process(target=_work, args=args, name=f"decode-{w}",
                                                   daemon=True)
                    process.start()
                    theirs.close()
                    self.processes.append(process)
                    self.connections.append(ours)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exception) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join()
        for connection in self.connections:
            connection.close()

    def send(self, worker: int, task: tuple) -> None:
        """Queue a task for this worker (it takes its tasks in the order sent)."""
        self.connections[worker].send(task)
        self.held[worker] += 1

    def result(self) -> tuple[int, object]:
        """The next answer of any worker, and which worker gave it; WorkerDied when one died holding
        tasks."""
        while True:
            watched = [w for w in range(self.count) if self.held[w]]
            ready = multiprocessing.connection.wait([self.connections[w] for w in watched] +
                                                    [self.processes[w].sentinel for w in watched])
            for w in watched:
                if self.connections[w] in ready:
                    with contextlib.suppress(EOFError, ConnectionError):  # died: see its sentinel
                        answer = self.connections[w].recv()
                        self.held[w] -= 1
                        return w, answer
            for w in watched:
                process = self.processes[w]
                if process.sentinel in ready:
                    process.join()
                    i = self.decoding[w]
                    doing = f"decoding {self.paths[i]}" if i >= 0 else "decoding images"
                    raise utils.worker_death(process.pid, process.exitcode, doing)


def _in_turn(workers: _Workers, paths: list[str], files: list[int], chunk: int, scratch: bool
             ) -> Iterator[tuple[list[int], int | None, list[tuple[int, str]]]]:
    """What _decode_task returns for each chunk of the files (numbers into paths), as workers finish
    them: into their own rows (slot None), or into scratch slot s (rows s * chunk on). Each worker
    holds two tasks, so that it has the next one when it finishes one; with scratch, each of its
    tasks has a slot of its own, given the worker's next chunk once the caller took its rows."""
    starts = iter(range(0, len(files), chunk))

    def submit(worker: int, slot: int | None) -> int:
        start = next(starts, None)
        if start is None:
            return 0
        numbers = files[start:start + chunk]
        first = None if slot is None else slot * chunk
        workers.send(worker, (numbers, [paths[i] for i in numbers], first, slot))
        return 1

    n = workers.count
    in_flight = sum(submit(w, k * n + w if scratch else None) for k in range(2) for w in range(n))
    while in_flight:
        worker, result = workers.result()
        if isinstance(result, BaseException):  # raised in a worker (a DataError is caught there)
            raise result
        yield result
        in_flight += submit(worker, result[1]) - 1


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers start at once, sharing this process's imports and memory, as
    DataLoader workers do there (they touch no torch tensor, so torch's threads are not missed);
    else the platform's default (spawn), whose workers import this module."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@contextlib.contextmanager
def _shared_rows(rows: np.ndarray, scratch_rows: int, context: multiprocessing.context.BaseContext
                 ) -> Iterator[tuple[_RowFile | _RowArray, np.ndarray | None]]:
    """Where workers write, and the scratch to copy rows from (None: they write rows themselves).

    A .npy file's whole memory map (the cache): the file, which workers open. Rows in private
    memory: a scratch of scratch_rows rows, reused, in shared anonymous memory that forked workers
    inherit, else in a small temporary file. Reused, because the first write to shared memory is
    slow: on a 2-core VM, 150 us for a 256-px row (48 new pages), against 28 us once its pages are
    there."""
    size = rows.shape[1]
    if _in_a_file(rows):
        yield _RowFile(rows.filename, rows.offset, size), None
        return
    shape = (scratch_rows, *rows.shape[1:])
    if context.get_start_method() == "fork":
        # MAP_SHARED
        scratch = np.frombuffer(mmap.mmap(-1, math.prod(shape)), np.uint8).reshape(shape)
        yield _RowArray(scratch), scratch
        return
    with tempfile.TemporaryDirectory(prefix="decode_", ignore_cleanup_errors=True) as folder:
        scratch = np.lib.format.open_memmap(os.path.join(folder, "rows.npy"), "w+", np.uint8, shape)
        yield _RowFile(scratch.filename, scratch.offset, size), scratch
        del scratch  # unmapped before the folder is removed (Windows cannot remove a mapped file)


def _in_a_file(rows: np.ndarray) -> bool:
    """Whether rows are a whole .npy file's memory map (not a view of one), which can be written by
    its name."""
    return isinstance(rows, np.memmap) and isinstance(rows.base, mmap.mmap) and bool(rows.filename)


# --------------------------------------------------------------------------- folders walked


@dataclass
class Skipped:
    """What a walk of folders or a decode passed over: for each reason (a key of SKIPS), the paths,
    in the order met."""

    paths: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        assert reason in SKIPS, f"no such reason to skip a file: {reason}"
        self.paths.setdefault(reason, []).append(path)

    def every_path(self) -> set[str]:
        """The paths skipped, for every reason."""
        return {path for paths in self.paths.values() for path in paths}

    def warnings(self) -> list[str]:
        """A line for each reason: how many were skipped, and the first of them (names shown as
        utils.printable shows them): "skipped 2 unreadable image files, e.g. train/cat/broken.png".
        """
        lines = []
        for reason, (one, many) in SKIPS.items():
            paths = self.paths.get(reason, [])
            if not paths:
                continue
            detail = ""
            if reason == "not an image":
                extensions = sorted({os.path.splitext(path)[1].lower() or "(none)"
                                     for path in paths})
                kind = "extension" if len(extensions) == 1 else "extensions"
                detail = f" ({kind} {', '.join(extensions)})"
            elif reason == "too many pixels":
                detail = f" ({Image.MAX_IMAGE_PIXELS:,})"
            example = ": " if len(paths) == 1 else ", e.g. "
            lines.append(f"skipped {utils.plural(len(paths), one, many)}{detail}{example}"
                         f"{utils.printable(paths[0])}")
        return lines


def walk_images(roots: list[str], skipped: Skipped) -> list[list[str]]:
    """The image files under each root folder, searched recursively: its folders in the order of
    their paths (as sorted(os.walk(root)) gives them), each one's files by name. Only regular files
    with an image extension are listed; the rest (SKIPS: other files, FIFOs, sockets, devices,
    dangling links, paths too long to open, folders that cannot be listed) are counted in skipped,
    never opened.

    Links to folders are followed, and each real folder is read once, for one root: every root's own
    folders first, then the folders that only links reach, each for the root of the folder that
    holds the first link to it; a link to a folder read already is counted in skipped. So a link to
    a folder elsewhere (another disk) adds its images, and a link into the tree's own folders adds
    nothing twice. A link to a folder on its own path (itself, a parent, or one that links led the
    walk through to reach it) would make the walk endless: DataError, naming it."""
    walk = _Walk(skipped, [[] for _ in roots])
    tops = [walk.read(root, r) for r, root in enumerate(roots)]
    if walk.links:
        walk.follow_links(roots, tops)
    return [[os.path.join(folder, name) for folder, names in sorted(folders, key=lambda f: f[0])
             for name in names] for folders in walk.found]


Identity = tuple[int, int]  # a folder's (device, inode): the same whatever path or link leads to it


@dataclass
class _Listing:
    """A folder's entries that a walk goes on with (names, sorted): image files, subfolders, links
    to folders."""

    files: list[str]
    folders: list[str]
    links: list[str]


@dataclass
class _Walk:
    """walk_images' state: what it skipped, each root's folders (path, image file names), and for
    each folder read, its root, its listing and its subfolders' identities by name."""

    skipped: Skipped
    found: list[list[tuple[str, list[str]]]]
    root_of: dict[Identity, int] = field(default_factory=dict)
    listings: dict[Identity, _Listing] = field(default_factory=dict)
    below: dict[Identity, dict[str, Identity]] = field(default_factory=dict)
    links: bool = False  # whether a folder read holds a link to a folder

    def read(self, top: str, root: int) -> Identity | None:
        """The folder top and its subfolders (links not followed) read for the root numbered root,
        but those read already (a root given twice, or a link to a folder read; a bind mount):
        counted in skipped. Returns top's identity (None when it cannot be listed)."""
        stack: list[tuple[str, Identity | None]] = [(top, None)]  # a folder, and the one above it
        first = None
        while stack:
            path, above = stack.pop()
            listed = _list_folder(path, self.skipped)
            if listed is None:
                continue
            identity, listing = listed
            first = first or identity
            if identity in self.root_of:
                self.skipped.add("folder read already", path)
                continue
            self.root_of[identity], self.listings[identity] = root, listing
            self.below[identity] = {}
            if above is not None:
                self.below[above][os.path.basename(path)] = identity
            self.found[root].append((path, listing.files))
            stack += [(os.path.join(path, name), identity) for name in reversed(listing.folders)]
            self.links |= bool(listing.links)
        return first

    def follow_links(self, roots: list[str], tops: list[Identity | None]) -> None:
        """A depth-first walk from each root through subfolders and links alike, each folder once,
        that reads the folders only links reach and refuses a link to a folder on its own path (the
        loop it closes would be walked for ever)."""
        finished: set[Identity] = set()  # folders whose walk is over: all below them was seen
        for root, top in zip(roots, tops):
            way: list[tuple[Identity, str]] = []  # the folders walked through to here; real paths
            stack: list[tuple[str, Identity | None, str] | None] = [
                (root, top, os.path.realpath(root))]
            while stack:
                entry = stack.pop()
                if entry is None:  # all below way[-1] seen
                    finished.add(way.pop()[0])
                    continue
                path, identity, real = entry
                if identity is None or identity in finished or any(identity == i for i, _ in way):
                    continue
                way.append((identity, real))
                stack.append(None)
                listing, below = self.listings[identity], self.below[identity]
                for name in reversed(listing.links):
                    stack += self._follow(os.path.join(path, name), self.root_of[identity], way)
                stack += [(os.path.join(path, name), below.get(name), os.path.join(real, name))
                          for name in reversed(listing.folders)]

    def _follow(self, link: str, root: int,
                way: list[tuple[Identity, str]]) -> list[tuple[str, Identity, str]]:
        """A link to a folder, met on the way given in a folder read for root: DataError when it
        leads to a folder on that way or above one; else its target read for that root unless read
        already (counted in skipped), and what the walk enters next, itself."""
        target = os.path.realpath(link)
        if any(real == target or real.startswith(os.path.join(target, "")) for _, real in way):
            raise DataError(f"{utils.printable(link)} is a link to {utils.printable(target)}, a "
                            f"folder on its own path, so a walk through it would never end; remove "
                            f"the link, or point it at a folder outside that path")
        identity = self.read(link, root)  # or counted as read already: walked still, for loops
        return [] if identity is None else [(link, identity, target)]


def _list_folder(path: str, skipped: Skipped) -> tuple[Identity, _Listing] | None:
    """A folder's identity (device, inode) and listing, or None (counted in skipped) when it cannot
    be listed; the entries that are not image files or folders are counted in skipped as _Walk.read
    says."""
    try:
        status = os.stat(path)
        with os.scandir(path) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        skipped.add("path too long" if error.errno == errno.ENAMETOOLONG else "cannot list", path)
        return None
    listing = _Listing([], [], [])
    for entry in entries:
        try:
            if len(os.fsencode(entry.path)) >= PATH_MAX:
                skipped.add("path too long", entry.path)
            elif entry.is_dir():  # a link to a folder too
                (listing.links if entry.is_symlink() else listing.folders).append(entry.name)
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.add("not an image", entry.path)
            elif entry.is_file():  # a regular file, or a link to one
                listing.files.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                skipped.add("dangling link", entry.path)
            else:  # opening a FIFO would wait for a writer for ever; a device may never end
                skipped.add("not a regular file", entry.path)
        except OSError:  # a link whose target cannot be looked at (a loop of links, no permission)
            skipped.add("dangling link", entry.path)
    return (status.st_dev, status.st_ino), listing


def load_image(path: str, image_size: int, mean, std, resize_size: int
        | None = None) -> torch.Tensor:
    """One image file as a normalised (C, S, S) tensor, prepared as a folder's evaluation images
    are: stored as read_stored does at resize_size (None: image_size) and centre-cropped to
    image_size."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise DataError(f"image {utils.printable(path)} {what}")
    return evaluation_transform(image_size, mean, std)(read_stored(path, resize_size or image_size))


def find_images(paths: list[str]) -> tuple[list[str], Skipped]:
    """The files to classify: each file as named, and the image files under each folder
    (walk_images: recursively, in sorted order, links to folders followed). Returns them and what
    the walk skipped."""
    skipped = Skipped()
    folders = [path for path in paths if os.path.isdir(path)]
    listed = iter(walk_images(folders, skipped))
    found = []
    for path in paths:
        found += next(listed) if path in folders else [path]
    return found, skipped


class PredictionImages(Dataset):
    """Image files prepared as load_image does, for batched prediction in DataLoader workers: item i
    is (image, "") or, for a file that cannot be read, (zeros, the error message)."""

    def __init__(self, paths: list[str], image_size: int, mean, std, resize_size: int
            | None = None):
        self.paths, self.options = paths, (image_size, mean, std, resize_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return load_image(self.paths[i], *self.options), ""
        except DataError as error:
            return torch.zeros(3, self.options[0], self.options[0]), str(error)
