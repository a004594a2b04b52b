"""Image files: one read as an upright RGB picture at the size a folder's images are stored at, many decoded in
parallel into uint8 arrays, and the files a prediction is asked for found."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as F
from tqdm import tqdm

# Photo formats a folder tree may hold; the ones this Pillow cannot open (.heic without pillow-heif, say)
# count as files that are not images. Pillow knows more (.mpg, .eps, .h5), but it only identifies those.
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif",
                    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".avif", ".heic", ".heif")
IMAGE_EXTENSIONS = tuple(e for e in PHOTO_EXTENSIONS if Image.registered_extensions().get(e) in Image.OPEN)
DECODE_BATCH = 32  # files per DataLoader batch when decoding: little pixel data in flight with many workers


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
