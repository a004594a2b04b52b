"""Augmentation as batched tensor ops on the device (CIFAR-10's pad-crops and flips, photos'
random-resized crops, per-image random erasing, batch Mixup and CutMix; torchvision's automatic
augmentation is autoaugment_module's) and as the streaming fallback's PIL pipeline, side by side in
AUGMENTATIONS."""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torchvision import transforms
from torchvision.ops import roi_align
from torchvision.transforms import v2

import autoaugment_module
import messages_module

# Photo folders follow torchvision's classification reference
# (references/classification/presets.py):
RESIZE_RATIO = 0.875  # crop size / resize size of its evaluation preset (224 of 256)
# RandomResizedCrop's share of the stored image's area (torchvision's default)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)  # and its width / height range (torchvision's default)
CROP_TRIES = 10  # boxes drawn before the central-crop fallback, as RandomResizedCrop.get_params

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
    rows = torch.arange(h, device=device) + dy  # (n, h): source row of each output row
    cols = torch.arange(w, device=device).expand(n, w)
    if flipped is not None:
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    cols = cols + dx  # (n, w): source column of each output column
    batch = torch.arange(n, device=device)[:, None, None]
    if reflect:
        return images[batch, _reflect(rows, h)[:, :, None], _reflect(cols, w)[:, None, :]]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return out * inside[..., None]  # black border, as RandomCrop(padding=p)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def sample_crop_boxes(n: int, height: int, width: int, *, scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """n boxes (top, left, height, width), int64 (n, 4), drawn as RandomResizedCrop.get_params: up
    to CROP_TRIES tries of an area share in `scale` and log-uniform width / height in `ratio` that
    fit, else the central crop of the nearest ratio allowed; all at once, from device's RNG."""
    area = height * width
    target_area = area * torch.empty(n, CROP_TRIES, device=device).uniform_(scale[0], scale[1])
    aspect = torch.empty(n, CROP_TRIES, device=device).uniform_(math.log(ratio[0]),
                                                                math.log(ratio[1])).exp()
    w = (target_area * aspect).sqrt().round().long()
    h = (target_area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # first fitting try (argmax: the first maximum)
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
    """RandomResizedCrop's fallback (h, w): the whole image trimmed to the nearest ratio allowed."""
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
    """The boxes of uint8 NHWC images resized to size x size, mirrored where `flipped`: float NCHW,
    0-255 scale. roi_align(aligned=True) resizes each box bilinearly; its adaptive sampling
    (ceil(box / size) samples a pixel each way, averaged) stands in for PIL's antialiasing on larger
    boxes. One kernel per batch, where v2's RandomResizedCrop crops a batch's images alike."""
    top, left, height, width = boxes.unbind(1)
    batch = torch.arange(len(images), device=images.device)
    rois = torch.stack([batch, left, top, left + width, top + height], 1).float()
    crops = roi_align(images.permute(0, 3, 1, 2).float(), rois, output_size=size, aligned=True)
    if flipped is not None:
        crops = torch.where(flipped[:, None, None, None], crops.flip(-1), crops)
    return crops


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of uint8 (N, H, W, C) images, placed as transforms.CenterCrop does."""
    _, height, width, _ = images.shape
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[:, top:top + size, left:left + size].contiguous()


# --------------------------------------------------------------------------- random erasing


def erase_masks(n: int, height: int, width: int, probability: float,
                device: torch.device | str) -> torch.Tensor:
    """bool (n, 1, height, width): the box RandomErasing(probability) erases in each image, as its
    get_params: up to ERASE_TRIES tries of an area share in ERASE_SCALE and log-uniform height /
    width in ERASE_RATIO, the first smaller than the image placed uniformly; no box if none fits."""
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
    """A training augmentation, on where main.py's constant of its name in upper case is true:
    settings allowed (choices, or a rule: (test, what is allowed)); stage ("pixels": uint8 NHWC;
    "normalised": float NCHW; "batch": MixedLoader's batches and labels); its batched and its PIL
    version."""

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
        return [transforms.TrivialAugmentWide(num_magnitude_bins=autoaugment_module.MAGNITUDE_BINS)]
    return [transforms.RandAugment(autoaugment_module.RANDAUGMENT_OPS,
                                   autoaugment_module.RANDAUGMENT_MAGNITUDE,
                                   autoaugment_module.MAGNITUDE_BINS)]


_ALPHA = (lambda alpha: alpha >= 0, "a number >= 0 (0: off)")  # Mixup's and CutMix's Beta parameter
AUGMENTATIONS = {  # each stage's kinds run in this order
    "auto_augment": Kind((None, *autoaugment_module.AUTO_AUGMENTS), None, "pixels",
                         autoaugment_module.auto_augment, _pil_auto_augment),
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
    messages_module.check_fields(
        types.SimpleNamespace(**settings),
        {name: kind.rule for name, kind in AUGMENTATIONS.items() if kind.rule},
        {name: kind.choices for name, kind in AUGMENTATIONS.items() if kind.choices})


def switched_on(settings: dict[str, Any], stage: str) -> list[tuple[Kind, Any]]:
    """The stage's kinds the settings switch on (one not named is off), with settings, in order."""
    return [(kind, settings[name]) for name, kind in AUGMENTATIONS.items()
            if kind.stage == stage and settings.get(name)]


def augment(images: torch.Tensor, stage: str, settings: dict[str, Any]) -> torch.Tensor:
    """Training images through the batched version of each kind of the stage switched on."""
    for kind, setting in switched_on(settings, stage):
        images = kind.batched(images, setting)
    return images


def batch_mixer(settings: dict[str, Any], num_classes: int) -> v2.Transform | None:
    """The "batch" kinds switched on (v2.MixUp, v2.CutMix; both: one at random per batch, as
    torchvision's classification train.py), or None. mix(images, labels) gives (mixed images, float
    (N, num_classes) targets summing to 1), each image paired with the one before it (loaders
    shuffle). Draws are CPU numbers; on the device it only rolls, scales and copies: no waits."""
    mixes = [kind.batched(setting, num_classes) for kind, setting in switched_on(settings, "batch")]
    if len(mixes) > 1:
        return v2.RandomChoice(mixes)
    return mixes[0] if mixes else None


@dataclass(frozen=True)
class Augmentation:
    """What a loader does to each image: training pad-crops (crop_padding pixels, black or reflected
    border) and flips ("random", "alternate", "none"), or with crop_size (photos) random-resized
    crops, flips, evaluation's centre crops; normalisation by mean and std (per channel, 0-1 scale);
    for training, the AUGMENTATIONS that `augmentations` switch on."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_size: int | None
    crop_padding: int
    flip: str
    reflect: bool
    augmentations: dict[str, Any]


# --------------------------------------------------------------------------- the streaming path


def pil_transform(train: bool, image_size: int, augmentation: Augmentation) -> transforms.Compose:
    """The streaming PIL pipeline after the source's resize ("alternate" flips are drawn at random):
    photos' RandomResizedCrop or CIFAR's pad-crops, then PIL AUGMENTATIONS around ToTensor,
    Normalize."""
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
    """A PIL image for evaluation: its centre crop_size square (None: all), normalised, CHW."""
    crop = [transforms.CenterCrop(crop_size)] if crop_size is not None else []
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(mean, std)])
