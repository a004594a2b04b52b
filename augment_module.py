"""Augmentation as batched tensor operations on the device (CIFAR-10's pad-crops and flips, photos'
random-resized crops, Mixup and CutMix of whole batches), and the PIL pipeline of the streaming fallback that does
the same image by image."""

from __future__ import annotations

import math

import torch
from torchvision import transforms
from torchvision.transforms import v2
from torchvision.ops import roi_align

# Photo folders follow torchvision's classification reference (references/classification/presets.py):
RESIZE_RATIO = 0.875  # crop size / resize size of its evaluation preset (224 of 256)
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's share of the stored image's area (torchvision's default)
CROP_RATIO = (3 / 4, 4 / 3)  # and its width / height range (torchvision's default)
CROP_TRIES = 10  # boxes drawn before the central-crop fallback, as RandomResizedCrop.get_params


def crop_flip(images: torch.Tensor, padding: int, flipped: torch.Tensor | None = None,
              reflect: bool = False) -> torch.Tensor:
    """Random crops (shifts of up to `padding` pixels, black or reflected border) of uint8 (N, H, W, C)
    images, mirrored where `flipped` (N bools) is set, as one gather on the images' device."""
    n, h, w, _ = images.shape
    device = images.device
    dy = torch.randint(-padding, padding + 1, (n, 1), device=device)
    dx = torch.randint(-padding, padding + 1, (n, 1), device=device)
    rows = torch.arange(h, device=device) + dy                      # (n, h): source row of each output row
    cols = torch.arange(w, device=device).expand(n, w)
    if flipped is not None:
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    cols = cols + dx                                                # (n, w): source column of each output column
    batch = torch.arange(n, device=device)[:, None, None]
    if reflect:
        return images[batch, _reflect(rows, h)[:, :, None], _reflect(cols, w)[:, None, :]]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return out * inside[..., None]                                  # black border, as RandomCrop(padding=p)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def sample_crop_boxes(n: int, height: int, width: int, *, scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO, device: torch.device | str = "cpu") -> torch.Tensor:
    """n boxes (top, left, height, width) as int64 (n, 4), each drawn as torchvision's
    RandomResizedCrop.get_params draws one: up to CROP_TRIES tries of an area share in `scale` and a
    log-uniform width / height in `ratio` that fit the image, else the central crop of the nearest allowed
    ratio; all n at once on `device`, from its global generator."""
    area = height * width
    target_area = area * torch.empty(n, CROP_TRIES, device=device).uniform_(scale[0], scale[1])
    aspect = torch.empty(n, CROP_TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (target_area * aspect).sqrt().round().long()
    h = (target_area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (argmax takes the first maximum)
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
    """RandomResizedCrop's fallback size (height, width): the whole image, trimmed to the nearest allowed ratio."""
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
    """The boxes (top, left, height, width) of uint8 (N, H, W, C) images resized to size x size, mirrored
    where `flipped` is set: float (N, C, size, size) on the 0-255 scale, in one batched call.

    roi_align with aligned=True is bilinear resizing of each box; its adaptive sampling (ceil(box / size)
    samples a pixel in each direction, averaged) stands in for the antialiasing of PIL's resize when the box
    is larger than the output. One kernel for the batch, where torchvision.transforms.v2 draws one box per
    call (RandomResizedCrop on a batch crops every image alike).
    """
    top, left, height, width = boxes.unbind(1)
    batch = torch.arange(len(images), device=images.device)
    rois = torch.stack([batch, left, top, left + width, top + height], 1).float()
    crops = roi_align(images.permute(0, 3, 1, 2).float(), rois, output_size=size, aligned=True)
    if flipped is not None:
        crops = torch.where(flipped[:, None, None, None], crops.flip(-1), crops)
    return crops


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of uint8 (N, H, W, C) images, placed as transforms.CenterCrop places it."""
    _, height, width, _ = images.shape
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[:, top:top + size, left:left + size].contiguous()


def batch_mixer(mixup: float, cutmix: float, num_classes: int) -> v2.Transform | None:
    """torchvision's v2.MixUp (Beta(mixup, mixup)) and v2.CutMix (alpha cutmix) of a normalised batch and its
    class indices, each off at 0; with both on, one of the two chosen at random for each batch (v2.RandomChoice),
    as torchvision's references/classification/train.py does. Called as mix(images, labels), it returns (mixed
    images, float (N, num_classes) targets, each row summing to 1), each image paired with the one before it in
    the batch (which the loaders shuffle). None when both are off. Its random draws (lambda, the box, the choice)
    are CPU numbers; on the device it only rolls, scales and copies the batch, in its own memory layout, so it
    never waits for the device."""
    mixes = [kind(alpha=alpha, num_classes=num_classes) for kind, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix))
             if alpha > 0]
    if len(mixes) > 1:
        return v2.RandomChoice(mixes)
    return mixes[0] if mixes else None


def pil_transform(train: bool, image_size: int, crop_padding: int, flip: str, reflect: bool,
                   mean, std, photos: bool) -> transforms.Compose:
    """The streaming path's PIL pipeline, after the source's resizing ("alternate" flips are drawn at random):
    photos get RandomResizedCrop (training) or the centre crop (evaluation), CIFAR-10 its pad-crops."""
    steps = []
    if photos:
        steps.append(transforms.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO) if train
                     else transforms.CenterCrop(image_size))
    elif train and crop_padding:
        steps.append(transforms.RandomCrop(image_size, padding=crop_padding,
                                           padding_mode="reflect" if reflect else "constant"))
    if train and flip != "none":
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])
