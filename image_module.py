"""Image files, one at a time: read as an upright RGB picture at the size a folder's images are
stored at (pixel limits and damaged files handled), or as a normalised tensor a model classifies."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torchvision.transforms import functional as F

import messages_module
from augment_module import evaluation_transform

# Photo formats a folder tree may hold; the ones this Pillow cannot open (.heic without pillow-heif,
# say) count as files that are not images. Pillow knows more (.mpg, .eps, .h5), but it only
# identifies those.
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib",
                    ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2",
                    ".j2k", ".avif", ".heic", ".heif")
IMAGE_EXTENSIONS = tuple(e for e in PHOTO_EXTENSIONS
                         if Image.registered_extensions().get(e) in Image.OPEN)
# modes Pillow resizes by their values (a palette it resizes by nearest index; 1-bit stays 1-bit)
RESIZED_EARLY = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16L",
                 "I;16B", "F")
PIXEL_LIMIT_NOTE = "(PIL.Image.MAX_IMAGE_PIXELS)"  # ends the message of an image too large to read


class DataError(ValueError):
    """Missing or unreadable data, or a split that cannot be made: a message for the user."""


class TooManyPixels(DataError):
    """An image over PIL.Image.MAX_IMAGE_PIXELS: skipped like an unreadable one, never decoded."""


def open_rgb(path: str, reduce_to: int | None = None) -> Image.Image:
    """An image file as an upright RGB PIL image (EXIF-rotated, to_rgb-converted). With reduce_to it
    shrinks as it decodes: a JPEG at 1/2, 1/4 or 1/8 scale keeping sides of at least twice reduce_to
    (DCT scaling, as Pillow's thumbnail: 2 to 7 times faster for much larger photos, within a few
    levels once resized); any other image resized as read_stored does before its mode is converted,
    so a worker holds the file and its small copy, not to_rgb's full-size copies (half the peak for
    a big RGBA PNG; Pillow's resize premultiplies a copy). A file cut short or damaged loads with
    the missing part grey (LOAD_TRUNCATED_IMAGES), warned once per process; one that does not open
    raises DataError, one over MAX_IMAGE_PIXELS TooManyPixels (never decoded)."""
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
        raise DataError(f"{messages_module.printable(path)} is not an image file "
                        f"that Pillow can read ({first_error})") from None
    if path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: {messages_module.printable(path)} is truncated or damaged "
              f"({first_error}); the part that decodes is used, the rest is grey", file=sys.stderr)
    return rgb


_WARNED: set[str] = set()  # damaged files already named in this process
# Pillow warns of an image over its limit and raises over twice it; _open refuses any over it, so
# the warning would only repeat that (and may come from the GPU decoder's reading thread)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open(path: str) -> Image.Image:
    """Image.open (header only), refusing (TooManyPixels) an image over Image.MAX_IMAGE_PIXELS (read
    each call; None: no limit): a 100-megapixel PNG of 2 MB takes over a gigabyte to decode."""
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
    return (f"{messages_module.printable(path)} has {pixels} pixels, "
            f"over {limit:,} {PIXEL_LIMIT_NOTE}")


def skip_reason(message: str) -> str:
    """Why a file that failed to decode with this message (decode_files') is skipped: "unreadable"
    or "too many pixels" (a key of SKIPS)."""
    return "too many pixels" if message.endswith(PIXEL_LIMIT_NOTE) else "unreadable"


def check_image(path: str) -> str | None:
    """Why Pillow would not decode the file (a SKIPS key), or None when it opens with a sound header
    (the cheapest check that catches corrupt files, yet 20 times the cost of listing the file: a
    valid cache spares it)."""
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
    """Pillow's switch is global: set only around one load (one load at a time per process)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _decoded(image: Image.Image, reduce_to: int | None) -> Image.Image:
    """An opened image decoded as open_rgb says: upright RGB; with reduce_to, a JPEG at its draft's
    scale, and any other whose mode allows (RESIZED_EARLY, no transparent colour, which resizing
    would blend away) resized as read_stored does, before to_rgb: the same pixels (RGB, greyscale),
    or within two levels (transparency: composited on white before or after)."""
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
    except Exception:  # a malformed EXIF block (Pillow raises several types): pixels as stored
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
    """An image file as a folder's are stored: upright RGB, shorter side to size, centre square."""
    return _stored(open_rgb(path, reduce_to=size), size)


def _stored(image: Image.Image, size: int) -> Image.Image:
    return F.center_crop(F.resize(image, size), [size, size])


def prepare_image(image: Image.Image, image_size: int, mean, std,
                  resize_size: int | None = None) -> torch.Tensor:
    """A PIL image as load_image prepares files: upright RGB, stored at resize_size (None:
    image_size), centre-cropped to image_size, normalised."""
    stored = _stored(_decoded(image, None), resize_size or image_size)
    return evaluation_transform(image_size, mean, std)(stored)


def load_image(path: str, image_size: int, mean, std,
               resize_size: int | None = None) -> torch.Tensor:
    """An image file as a normalised (C, S, S) tensor, as a folder's evaluation images: stored as
    read_stored does at resize_size (None: image_size), centre-cropped to image_size."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise DataError(f"image {messages_module.printable(path)} {what}")
    return evaluation_transform(image_size, mean, std)(read_stored(path, resize_size or image_size))
