"""JPEGs decoded on a CUDA device (nvJPEG) in batches, stored as image_module.read_stored does."""

from __future__ import annotations

import io
import warnings
from typing import Iterator

import numpy as np
import torch
from PIL import ExifTags, Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F2
from tqdm import tqdm

import process_module
from rows_module import _in_a_file, _RowArray, _RowFile, _runs

# most JPEGs per decode_jpeg call on a CUDA device: nvJPEG decodes a list as one batch,
GPU_DECODE_BATCH = 128
# and 128 rows of 256 px are 25 MB of pinned staging, twice
# most decoded pixels in such a batch (134 M: 0.4 GB as uint8 RGB, 1.6 GB as the
GPU_DECODE_PIXELS = 2 ** 27
# resize's float copy), so that large photos come fewer at a time: 11 of 12 MP, 128 of 1 MP
GPU_READ_AHEAD = 3  # batches of file bytes a thread reads ahead of the device's decoding
JPEG_SIGNATURE = b"\xff\xd8\xff"  # the first bytes of every JPEG file (SOI, then a marker)
JPEG_END = b"\xff\xd9"  # the last marker of a whole JPEG (EOI); a file cut short lacks it


def _jpeg_device(device: torch.device | str | None) -> torch.device | None:
    """The device decode_files decodes JPEGs on: device if CUDA, else None (every file on the CPU).
    Tests replace it to run the batched path on the CPU."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return torch.device(device)


def _decode_jpegs(paths: list[str], size: int, rows: np.ndarray, device: torch.device,
                  bar: tqdm) -> list[int]:
    """Decode the JPEGs the device may take into their rows as read_stored would; return the other
    files' numbers, ascending, for the CPU (with any JPEG the device failed on). A thread reads
    ahead; each batch's copy to pinned host memory overlaps the next decode. Pixels are within a
    level of Pillow's on average, a few at most: the decoder's rounding differs, and the JPEG draft
    reduction is redone from the whole image."""
    pinned = device.type == "cuda"
    staging = [torch.empty((GPU_DECODE_BATCH, size, size, 3), dtype=torch.uint8, pin_memory=pinned)
               for _ in range(2)]  # one for the batch being copied, one for the batch being written
    target = _RowFile(rows.filename, rows.offset, size) if _in_a_file(rows) else _RowArray(rows)
    left, pending = [], None
    batches = process_module.in_background(_jpeg_batches(paths), GPU_READ_AHEAD)
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
    # the batches' cached blocks go back to the device: its free memory then decides RESIDENT
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(left)


def _jpeg_batches(paths: list[str]) -> Iterator[tuple[list[int], list[torch.Tensor], list[int]]]:
    """Batches of device-decodable files, read: (numbers, bytes as uint8 tensors, numbers passed
    over since the last batch, for the CPU); a batch holds at most GPU_DECODE_BATCH files and
    GPU_DECODE_PIXELS decoded pixels."""
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
    """A file's pixel count if the device may decode it, else 0: a whole JPEG (signature first, end
    marker last), YCbCr (greyscale, CMYK, Adobe's unconverted RGB go to Pillow, whose conversions
    nvJPEG need not share), EXIF-upright (turning is Pillow's), within PIL.Image.MAX_IMAGE_PIXELS
    (the CPU path refuses larger). Pillow reads the header alone."""
    if (data[:3].tobytes() != JPEG_SIGNATURE
            or not data[-64:].tobytes().rstrip(b"\0").endswith(JPEG_END)):
        return 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            # as _upright turns
            upright = image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9)
            limit = Image.MAX_IMAGE_PIXELS
            small = not limit or image.width * image.height <= limit
            if image.mode == "RGB" and upright and image.info.get("adobe_transform") != 0 and small:
                return image.width * image.height
    except Exception:  # Pillow raises many types for a bad header or EXIF: the CPU path reports it
        pass
    return 0


def _decode_on(device: torch.device, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """JPEGs as uint8 (3, H, W) RGB on device, None per failure. One bad file fails a batch, which
    is then decoded a file at a time."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, ImageReadMode.RGB, device)) if encoded else []
        except RuntimeError:  # what a corrupt file raises, on the CPU and on CUDA
            pass
        images = []
        for data in encoded:
            try:
                images.append(decode_jpeg([data], ImageReadMode.RGB, device)[0])
            except RuntimeError:
                images.append(None)
        return images


def _stored_squares(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Decoded JPEGs (uint8 (3, H, W), at least one) as uint8 (N, size, size, 3) stored squares.
    Images of one shape go as one batch (a folder's photos mostly share a few; when all share one,
    no copy is made)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    if len(groups) == 1:
        return _squares_of(torch.stack(images), size)
    squares = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=images[0].device)
    for positions in groups.values():
        index = torch.tensor(positions, device=squares.device)
        squares.index_copy_(0, index,
                            _squares_of(torch.stack([images[k] for k in positions]), size))
    return squares


def _squares_of(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) JPEGs as read_stored stores them: (N, size, size, 3), maybe a view. First
    reduced as the JPEG draft does (each s x s block's mean, as DCT scaling computes, rounded to
    uint8), then the shorter side resized (bilinear, antialiased) and the centre square cut.
    Unreduced, a 2000x1500 photo at 24 px is 14 levels off Pillow's on average, an 801x603 one at
    128 px 9 (width 1 px off); reduced, within 1 (tests)."""
    scale = _draft_scale(images.shape[2], images.shape[3], size)
    if scale > 1:  # ceil_mode: the edge's partial blocks too, averaged over the pixels they have
        images = torch.nn.functional.avg_pool2d(images.float(), scale,
                                                ceil_mode=True).round_().to(torch.uint8)
    resized = F2.resize(images, [size], interpolation=F2.InterpolationMode.BILINEAR, antialias=True)
    return F2.center_crop(resized, [size, size]).permute(0, 2, 3, 1)


def _draft_scale(height: int, width: int, size: int) -> int:
    """Pillow's JPEG draft reduction (1, 2, 4, 8) for read_stored, which asks for a square of twice
    size: the largest keeping both sides >= 2 x size."""
    fits = min(width // (2 * size), height // (2 * size))
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _copied_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after the copies queued on the current stream (None on CPU: done when queued)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _write_rows(target: _RowFile | _RowArray, files: list[int], squares: torch.Tensor,
                copied: torch.cuda.Event | None) -> None:
    """Host squares[k] (once copied) into file files[k]'s row, a run of consecutive rows at once."""
    if copied is not None:
        copied.synchronize()
    pixels = squares.numpy()
    for k, count in _runs(files):
        target.write(files[k], pixels[k:k + count])
