"""Augmentation as batched tensor operations on the device (CIFAR-10's pad-crops and flips,
photos' random-resized crops, torchvision's automatic augmentation and random erasing with a draw
for each image, Mixup and CutMix of whole batches), and the PIL pipeline of the streaming
fallback that does the same image by image; AUGMENTATIONS holds each one a constant switches on,
its batched and its PIL version side by side."""

from __future__ import annotations

import functools
import itertools
import math
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn.functional import conv2d, grid_sample
from torchvision import transforms
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import utils

# Photo folders follow torchvision's classification reference
# (references/classification/presets.py):
RESIZE_RATIO = 0.875  # crop size / resize size of its evaluation preset (224 of 256)
# RandomResizedCrop's share of the stored image's area (torchvision's default)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)  # and its width / height range (torchvision's default)
CROP_TRIES = 10  # boxes drawn before the central-crop fallback, as RandomResizedCrop.get_params

# Automatic augmentation, as torchvision's reference recipes use it (--auto-augment ta_wide /
# rand-m9-...):
# TrivialAugmentWide(), RandAugment(num_ops=2, magnitude=9)
AUTO_AUGMENTS = ("trivialaugment", "randaugment")
# their op tables and bins
POLICIES = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}
# magnitude steps of each op's range (both policies' num_magnitude_bins default)
MAGNITUDE_BINS = 31
RANDAUGMENT_OPS = 2  # ops applied one after the other to each image (RandAugment's num_ops default)
# the bin of MAGNITUDE_BINS every RandAugment op takes (its magnitude default)
RANDAUGMENT_MAGNITUDE = 9
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast",
       # both policies' ops, in their order
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC = OPS[1:6]  # the ops that move pixels: one batched resample for them all
# adjust_sharpness' smoothing filter, over its sum (13)
SHARPNESS_KERNEL = ((1, 1, 1), (1, 5, 1), (1, 1, 1))
# Random erasing, as transforms.RandomErasing (its defaults; value 0 in normalised units):
ERASE_SCALE = (0.02, 0.33)  # share of the image's area the box takes
ERASE_RATIO = (0.3, 3.3)  # the box's height / width range, drawn log-uniform
# boxes drawn before giving up on the image (left whole), as RandomErasing.get_params
ERASE_TRIES = 10


def crop_flip(images: torch.Tensor, padding: int, flipped: torch.Tensor | None = None,
              reflect: bool = False) -> torch.Tensor:
    """Random crops (shifts of up to `padding` pixels, black or reflected border) of uint8 (N, H, W,
    C) images, mirrored where `flipped` (N bools) is set, as one gather on the images' device."""
    n, h, w, _ = images.shape
    device = images.device
    dy = torch.randint(-padding, padding + 1, (n, 1), device=device)
    dx = torch.randint(-padding, padding + 1, (n, 1), device=device)
    # (n, h): source row of each output row
    rows = torch.arange(h, device=device) + dy
    cols = torch.arange(w, device=device).expand(n, w)
    if flipped is not None:
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    # (n, w): source column of each output column
    cols = cols + dx
    batch = torch.arange(n, device=device)[:, None, None]
    if reflect:
        return images[batch, _reflect(rows, h)[:, :, None], _reflect(cols, w)[:, None, :]]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    # black border, as RandomCrop(padding=p)
    return out * inside[..., None]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def sample_crop_boxes(n: int, height: int, width: int, *, scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO, device: torch.device
                      | str = "cpu") -> torch.Tensor:
    """n boxes (top, left, height, width) as int64 (n, 4), each drawn as torchvision's
    RandomResizedCrop.get_params draws one: up to CROP_TRIES tries of an area share in `scale` and a
    log-uniform width / height in `ratio` that fit the image, else the central crop of the nearest
    allowed ratio; all n at once on `device`, from its global generator."""
    area = height * width
    target_area = area * torch.empty(n, CROP_TRIES, device=device).uniform_(scale[0], scale[1])
    aspect = torch.empty(n, CROP_TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[
        1])).exp()
    w = (target_area * aspect).sqrt().round().long()
    h = (target_area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # the first try that fits (argmax takes the first maximum)
    first = fits.long().argmax(1, keepdim=True)
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
    """RandomResizedCrop's fallback size (height, width): the whole image, trimmed to the nearest
    allowed ratio."""
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
    """The boxes (top, left, height, width) of uint8 (N, H, W, C) images resized to size x size,
    mirrored where `flipped` is set: float (N, C, size, size) on the 0-255 scale, in one batched
    call.

    roi_align with aligned=True is bilinear resizing of each box; its adaptive sampling (ceil(box /
    size) samples a pixel in each direction, averaged) stands in for the antialiasing of PIL's
    resize when the box is larger than the output. One kernel for the batch, where
    torchvision.transforms.v2 draws one box per call (RandomResizedCrop on a batch crops every image
    alike).
    """
    top, left, height, width = boxes.unbind(1)
    batch = torch.arange(len(images), device=images.device)
    rois = torch.stack([batch, left, top, left + width, top + height], 1).float()
    crops = roi_align(images.permute(0, 3, 1, 2).float(), rois, output_size=size, aligned=True)
    if flipped is not None:
        crops = torch.where(flipped[:, None, None, None], crops.flip(-1), crops)
    return crops


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of uint8 (N, H, W, C) images, placed as transforms.CenterCrop places
    it."""
    _, height, width, _ = images.shape
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[:, top:top + size, left:left + size].contiguous()


# --------------------------------------------------------------------------- automatic augmentation


def auto_augment(images: torch.Tensor, policy: str) -> torch.Tensor:
    """uint8 (N, H, W, C) images, each through ops of its own, drawn as torchvision's `policy`
    (AUTO_AUGMENTS) draws them for one image: "trivialaugment" one op of OPS at a random magnitude
    bin, "randaugment" RANDAUGMENT_OPS ops in turn at bin RANDAUGMENT_MAGNITUDE; a signed op takes
    either sign. Batched: the images are sorted by the op they drew and each op runs once on its
    share (the geometric ones as one resample), never image by image. A new uint8 (N, H, W, C)
    tensor, image i from image i."""
    for _ in range(RANDAUGMENT_OPS if policy == "randaugment" else 1):
        images = _apply_drawn_ops(images, policy)
    return images


def draw_ops(n: int, device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """An op of OPS for each of n images, uniform and independent as torchvision draws one per call,
    as `order`, the images sorted by op (the first counts[0] of order take OPS[0], the next
    counts[1] OPS[1], ...), and `counts`. Independent uniform draws are a multinomial count of each
    op, drawn on the CPU so that the shares' sizes are known without waiting for the device, and a
    uniformly random choice of the images that take them: a permutation, drawn on the device from
    its global generator."""
    counts = torch.randint(len(OPS), (n,)).bincount(minlength=len(OPS)).tolist()
    return torch.randperm(n, device=device), counts


def _apply_drawn_ops(images: torch.Tensor, policy: str) -> torch.Tensor:
    """One round of auto_augment: an op, a magnitude bin and a sign drawn for each image, and
    applied."""
    n, height, width, _ = images.shape
    device = images.device
    order, counts = draw_ops(n, device)
    table, signed = _magnitude_table(policy, height, width, device)
    if policy == "randaugment":
        bins = torch.full((n,), RANDAUGMENT_MAGNITUDE, device=device)
    else:
        bins = torch.randint(MAGNITUDE_BINS, (n,), device=device)
    # as torchvision's `torch.rand(()) <= 0.5` for each image
    negative = torch.rand(n, device=device) <= 0.5
    shuffled = images[order]  # sorted by op: each op's share is a slice; a copy, changed in place
    # (N, C, H, W) views, as torchvision's ops take them
    sorted_images = shuffled.permute(0, 3, 1, 2)
    starts = [0, *itertools.accumulate(counts)]
    matrices = []
    for k, op in enumerate(OPS):
        share = slice(starts[k], starts[k + 1])
        if op == "Identity" or not counts[k]:
            continue
        magnitudes = table[k, bins[share]]
        if signed[k]:
            magnitudes = torch.where(negative[share], -magnitudes, magnitudes)
        if op in GEOMETRIC:
            matrices.append(affine_matrices(op, magnitudes, height, width))
        else:
            sorted_images[share] = apply_op(sorted_images[share], op, magnitudes)
    # the geometric ops' shares are one slice (OPS' order): one resample for all of them
    if matrices:
        share = slice(starts[OPS.index(GEOMETRIC[0])], starts[OPS.index(GEOMETRIC[-1]) + 1])
        sorted_images[share] = resample(sorted_images[share], torch.cat(matrices))
    return torch.empty_like(images).index_copy_(0, order, shuffled)  # back in the images' order


@functools.lru_cache(maxsize=None)
def _magnitude_table(policy: str, height: int, width: int,
                     device: torch.device) -> tuple[torch.Tensor, tuple[bool, ...]]:
    """The policy's magnitudes of each op at each bin, float32 (len(OPS), MAGNITUDE_BINS) on the
    device (zeros for the ops that take none), from torchvision's own op table, and whether each op
    is signed; made once for each image size and device."""
    space = POLICIES[policy]._AUGMENTATION_SPACE
    rows, signed = [], []
    for op in OPS:
        magnitudes, is_signed = space[op]
        values = magnitudes(MAGNITUDE_BINS, height, width)
        rows.append(torch.zeros(MAGNITUDE_BINS) if values is None else values.float())
        signed.append(is_signed)
    return torch.stack(rows).to(device), tuple(signed)


def apply_op(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """OPS' op on uint8 (N, C, H, W) images, image i at magnitudes[i] (signed, as torchvision's
    policies hand it to the op): what their _apply_image_or_video_transform does to one image, for
    the batch at once."""
    if op in GEOMETRIC:
        return resample(images, affine_matrices(op, magnitudes, images.shape[-2], images.shape[-1]))
    return _COLOUR_OPS[op](images, magnitudes.view(-1, 1, 1, 1))


def _blend(images: torch.Tensor, degenerate: torch.Tensor,
        magnitudes: torch.Tensor) -> torch.Tensor:
    """v2.functional's _blend at ratio 1 + magnitude for each image: ratio * image + (1 - ratio) *
    degenerate, clamped and truncated to uint8, in its float32 arithmetic (1 - ratio is -magnitude
    exactly)."""
    # add_'s fused a + alpha * b
    blended = torch.addcmul(images.mul(1 + magnitudes), degenerate.float(), -magnitudes)
    return blended.clamp_(0, 255).to(torch.uint8)


def _mean_grey(images: torch.Tensor) -> torch.Tensor:
    """adjust_contrast's degenerate image: the mean of each image's grey (rgb_to_grayscale's, whose
    uint8 is the floor adjust_contrast takes), unrounded as adjust_contrast blends it.
    F.adjust_contrast(images, 0) would truncate it."""
    return F.rgb_to_grayscale(images).float().mean((-3, -2, -1), keepdim=True)


@functools.lru_cache(maxsize=None)
def _sharpness_kernel(device: torch.device) -> torch.Tensor:
    """adjust_sharpness' smoothing filter, float32 (1, 1, 3, 3) on the device, made once
    (torchvision makes it on every call: on a GPU a copy from the host that waits for the
    device)."""
    return (torch.tensor(SHARPNESS_KERNEL, dtype=torch.float64) / 13).float().view(1, 1, 3, 3).to(
        device)


def _smoothed(images: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness' degenerate image in float, as F.adjust_sharpness(images, 0) gives it: the
    rounded smoothing of SHARPNESS_KERNEL inside a one-pixel frame of the image's own pixels."""
    channels = images.shape[1]
    smoothed = images.float()
    kernel = _sharpness_kernel(images.device).expand(channels, 1, 3, 3)
    smoothed[..., 1:-1, 1:-1] = conv2d(smoothed, kernel, groups=channels).round_()
    return smoothed


def _sharpen(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness at 1 + magnitude for each image, in its own arithmetic: image + (1 - factor)
    * (smoothed - image), clamped and truncated to uint8 (the frame, where the two are equal,
    stays)."""
    original = images.float()
    return torch.addcmul(original, _smoothed(images) - original, -magnitudes).clamp_(0, 255).to(
        torch.uint8)


def _posterize(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """posterize to each image's own bits (its magnitude): the low 8 - bits bits cleared, as
    v2.functional's mask does for one image, in one masking for all of them (no group for each
    number of bits)."""
    cleared = 8 - magnitudes.to(torch.int32)
    mask = torch.full_like(cleared, 255).bitwise_left_shift(cleared).bitwise_and(255)
    return images & mask.to(torch.uint8)


_COLOUR_OPS = {  # (uint8 images, magnitudes (N, 1, 1, 1)) -> uint8 images
    "Identity": lambda images, magnitudes: images,
    "Brightness": lambda images, magnitudes: _blend(images, F.adjust_brightness(images, 0.0),
    magnitudes),
    "Color": lambda images, magnitudes: _blend(images, F.adjust_saturation(images, 0.0),
    magnitudes),
    "Contrast": lambda images, magnitudes: _blend(images, _mean_grey(images), magnitudes),
    "Sharpness": _sharpen,
    "Posterize": _posterize,
    "Solarize": lambda images, magnitudes: torch.where(images >= 255 * magnitudes,
    images.bitwise_not(), images),
    "AutoContrast": lambda images, magnitudes: F.autocontrast(images),
    "Equalize": lambda images, magnitudes: F.equalize(images),
}


def affine_matrices(op: str, magnitudes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 (N, 2, 3): a geometric op's inverse affine matrix at each magnitude, as torchvision's
    auto-augment calls F.affine or F.rotate: shears by atan(magnitude) about the top-left corner
    (its center=[0, 0]), translations by whole pixels (int(magnitude)), rotations by magnitude
    degrees anticlockwise about the centre. Worked out in float64 as torchvision's (in Python
    floats) where the device has it (not Apple's MPS): in float32 a shear's half-pixel ties round
    the other way for a few pixels."""
    magnitudes = magnitudes.to(torch.float32 if magnitudes.device.type == "mps" else torch.float64)
    zero = torch.zeros_like(magnitudes)
    # center=[0, 0] in _get_inverse_affine_matrix's centred pixels
    corner = (-width / 2, -height / 2)
    if op == "ShearX":
        return _inverse_affine(zero, magnitudes.atan(), zero, (zero, zero), corner)
    if op == "ShearY":
        return _inverse_affine(zero, zero, magnitudes.atan(), (zero, zero), corner)
    if op == "TranslateX":
        return _inverse_affine(zero, zero, zero, (magnitudes.trunc(), zero), (0.0, 0.0))
    if op == "TranslateY":
        return _inverse_affine(zero, zero, zero, (zero, magnitudes.trunc()), (0.0, 0.0))
    assert op == "Rotate", op
    return _inverse_affine(-magnitudes.deg2rad(), zero, zero, (zero, zero), (0.0, 0.0))


def _inverse_affine(rotation: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor,
                    translate: tuple[torch.Tensor, torch.Tensor], center: tuple[float,
                    float]) -> torch.Tensor:
    """v2.functional's _get_inverse_affine_matrix (scale 1; angles in radians) for a batch: (N, 2,
    3)."""
    (tx, ty), (cx, cy) = translate, center
    a = torch.cos(rotation - shear_y) / torch.cos(shear_y)
    b = -(a * torch.tan(shear_x) + torch.sin(rotation))
    c = torch.sin(rotation - shear_y) / torch.cos(shear_y)
    d = torch.cos(rotation) - c * torch.tan(shear_x)
    cx_tx, cy_ty = cx + tx, cy + ty
    rows = [d, -b, cx - d * cx_tx + b * cy_ty, -c, a, cy + c * cx_tx - a * cy_ty]
    return torch.stack(rows, -1).view(-1, 2, 3).float()


def resample(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) images, each through its own inverse affine matrix (N, 2, 3): the nearest
    pixel, 0 outside the image, on v2.functional.affine's grid (_affine_grid: pixel centres about
    the image's centre, normalised after the matrix) with its grid_sample, for the batch at once."""
    n, _, height, width = images.shape
    device = images.device
    xs = torch.linspace((1 - width) / 2, (width - 1) / 2, width, device=device)
    ys = torch.linspace((1 - height) / 2, (height - 1) / 2, height, device=device)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, device=device)], -1).view(1, height * width, 3)
    # (N, 3, 2)
    rescaled = torch.stack([matrices[:, 0] / (0.5 * width), matrices[:, 1] / (0.5 * height)], 2)
    grid = base.matmul(rescaled).view(n, height, width, 2)
    resampled = grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
        align_corners=False)
    return resampled.to(torch.uint8)  # nearest: whole numbers already


# --------------------------------------------------------------------------- random erasing


def erase_masks(n: int, height: int, width: int, probability: float, device: torch.device
        | str) -> torch.Tensor:
    """bool (n, 1, height, width): the box RandomErasing(probability) erases in each of n images: an
    image is chosen with that probability, then up to ERASE_TRIES tries of an area share in
    ERASE_SCALE and a log-uniform height / width in ERASE_RATIO, the first smaller than the image
    placed uniformly in it, as RandomErasing.get_params; no box when none fits. All drawn at once on
    the device, from its global generator."""
    area = height * width
    target_area = area * torch.empty(n, ERASE_TRIES, device=device).uniform_(*ERASE_SCALE)
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    aspect = torch.empty(n, ERASE_TRIES, device=device).uniform_(*log_ratio).exp()
    h = (target_area * aspect).sqrt().round().long()
    w = (target_area / aspect).sqrt().round().long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits
    erased = fits.any(1) & (torch.rand(n, device=device) < probability)
    h = torch.where(erased, h.gather(1, first).squeeze(1), 0)  # no box: empty
    w = torch.where(erased, w.gather(1, first).squeeze(1), 0)
    # from the box's top
    rows = torch.arange(height, device=device) - _random_offset(height - h, device)[:, None]
    cols = torch.arange(width, device=device) - _random_offset(width - w, device)[:, None]
    inside_rows = (rows >= 0) & (rows < h[:, None])
    inside_cols = (cols >= 0) & (cols < w[:, None])
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Kind:
    """A training augmentation, on where main.py's constant of its name in upper case is true: the
    settings allowed (choices, or a rule: (test, what is allowed)); its stage ("pixels": uint8
    (N, H, W, C) images; "normalised": float (N, C, H, W) ones; "batch": normalised batches and
    their labels, MixedLoader's); its batched version and its PIL one, for the streaming path."""

    choices: tuple | None
    rule: tuple[Callable[[Any], bool], str] | None
    stage: str
    batched: Callable  # (images, setting) -> images; "batch": (setting, classes) -> mix(x, labels)
    pil: Callable[[Any], list] | None  # setting -> the PIL pipeline's transforms; None for "batch"


def _erase(images: torch.Tensor, probability: float) -> torch.Tensor:
    """Normalised (N, C, H, W) images, erase_masks' boxes at 0 (RandomErasing after Normalize)."""
    masks = erase_masks(len(images), *images.shape[2:], probability, images.device)
    return images.masked_fill_(masks, 0.0)


def _pil_auto_augment(policy: str) -> list:
    if policy == "trivialaugment":
        return [transforms.TrivialAugmentWide(num_magnitude_bins=MAGNITUDE_BINS)]
    return [transforms.RandAugment(RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE, MAGNITUDE_BINS)]


_ALPHA = (lambda alpha: alpha >= 0, "a number >= 0 (0: off)")  # Mixup's and CutMix's Beta parameter
AUGMENTATIONS = {  # each stage's kinds run in this order
    "auto_augment": Kind((None, *AUTO_AUGMENTS), None, "pixels", auto_augment, _pil_auto_augment),
    "random_erasing": Kind(
        None, (lambda p: 0 <= p <= 1, "a probability from 0 to 1"), "normalised", _erase,
        lambda p: [transforms.RandomErasing(p, ERASE_SCALE, ERASE_RATIO, value=0)]),
    "mixup": Kind(None, _ALPHA, "batch",
                  lambda alpha, classes: v2.MixUp(alpha=alpha, num_classes=classes), None),
    "cutmix": Kind(None, _ALPHA, "batch",
                   lambda alpha, classes: v2.CutMix(alpha=alpha, num_classes=classes), None),
}


def check(settings: dict[str, Any]) -> None:
    """ValueError naming (as main.py's constant) the first setting its kind does not allow."""
    utils.check_fields(types.SimpleNamespace(**settings),
                       {name: kind.rule for name, kind in AUGMENTATIONS.items() if kind.rule},
                       {name: kind.choices for name, kind in AUGMENTATIONS.items() if kind.choices})


def switched_on(settings: dict[str, Any], stage: str) -> list[tuple[Kind, Any]]:
    """The kinds of the stage that the settings (by name; a kind not named is off) switch on,
    each with its setting, in order."""
    return [(kind, settings[name]) for name, kind in AUGMENTATIONS.items()
            if kind.stage == stage and settings.get(name)]


def augment(images: torch.Tensor, stage: str, settings: dict[str, Any]) -> torch.Tensor:
    """Training images through the batched version of each kind of the stage switched on."""
    for kind, setting in switched_on(settings, stage):
        images = kind.batched(images, setting)
    return images


def batch_mixer(settings: dict[str, Any], num_classes: int) -> v2.Transform | None:
    """The "batch" kinds the settings switch on (torchvision's v2.MixUp and v2.CutMix of a
    normalised batch and its class indices); with both on, one of the two chosen at random for
    each batch (v2.RandomChoice), as torchvision's references/classification/train.py does.
    Called as mix(images, labels), it returns (mixed images, float (N, num_classes) targets, each
    row summing to 1), each image paired with the one before it in the batch (which the loaders
    shuffle). None when none is on. Its random draws (lambda, the box, the choice) are CPU
    numbers; on the device it only rolls, scales and copies the batch, in its own memory layout,
    so it never waits for the device."""
    mixes = [kind.batched(setting, num_classes) for kind, setting in switched_on(settings, "batch")]
    if len(mixes) > 1:
        return v2.RandomChoice(mixes)
    return mixes[0] if mixes else None


@dataclass(frozen=True)
class Augmentation:
    """What a loader does to each image: training pad-crops (crop_padding pixels, black or
    reflected border) and flips ("random", "alternate" or "none") at the image's own size, or
    with crop_size (photos) random-resized crops of that size and flips, the centre crop for
    evaluation; normalisation by mean and std (0-1 scale, per channel); and for training the
    AUGMENTATIONS that `augmentations` (their settings, by name) switch on, each at its stage."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_size: int | None
    crop_padding: int
    flip: str
    reflect: bool
    augmentations: dict[str, Any]


# --------------------------------------------------------------------------- the streaming path


def pil_transform(train: bool, image_size: int, augmentation: Augmentation) -> transforms.Compose:
    """The streaming path's PIL pipeline, after the source's resizing ("alternate" flips are
    drawn at random): photos (augmentation.crop_size set) get RandomResizedCrop for training,
    CIFAR-10 its pad-crops; then the AUGMENTATIONS' PIL versions around ToTensor and Normalize,
    as torchvision's classification reference. Evaluation: evaluation_transform."""
    if not train:
        return evaluation_transform(augmentation.crop_size, augmentation.mean, augmentation.std)
    steps = []
    if augmentation.crop_size is not None:
        steps.append(transforms.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO))
    elif augmentation.crop_padding:
        mode = "reflect" if augmentation.reflect else "constant"
        steps.append(transforms.RandomCrop(image_size, augmentation.crop_padding,
                                           padding_mode=mode))
    if augmentation.flip != "none":
        steps.append(transforms.RandomHorizontalFlip())

    def pil(stage: str) -> list:
        return [step for kind, setting in switched_on(augmentation.augmentations, stage)
                for step in kind.pil(setting)]
    normalize = transforms.Normalize(augmentation.mean, augmentation.std)
    return transforms.Compose([*steps, *pil("pixels"), transforms.ToTensor(), normalize,
                               *pil("normalised")])


def evaluation_transform(crop_size: int | None, mean, std) -> transforms.Compose:
    """How evaluation prepares a PIL image: its centre crop_size square (None: all of it),
    normalised by mean and std: a float (C, H, W) tensor."""
    crop = [transforms.CenterCrop(crop_size)] if crop_size is not None else []
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(mean, std)])
