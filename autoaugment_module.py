"""Automatic augmentation as batched tensor operations on the device: torchvision's
TrivialAugmentWide and RandAugment with an op, a magnitude and a sign drawn for each image."""

from __future__ import annotations

import functools
import itertools

import torch
from torch.nn.functional import conv2d, grid_sample
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# Automatic augmentation, as torchvision's reference recipes use it (--auto-augment ta_wide /
# rand-m9-...): TrivialAugmentWide(), RandAugment(num_ops=2, magnitude=9)
AUTO_AUGMENTS = ("trivialaugment", "randaugment")
# their op tables and bins
POLICIES = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}
# magnitude steps of each op's range (both policies' num_magnitude_bins default)
MAGNITUDE_BINS = 31
RANDAUGMENT_OPS = 2  # ops applied one after the other to each image (RandAugment's num_ops default)
# the bin of MAGNITUDE_BINS every RandAugment op takes (its magnitude default)
RANDAUGMENT_MAGNITUDE = 9
# both policies' ops, in their order
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC = OPS[1:6]  # the ops that move pixels: one batched resample for them all
# adjust_sharpness' smoothing filter, over its sum (13)
SHARPNESS_KERNEL = ((1, 1, 1), (1, 5, 1), (1, 1, 1))


# --------------------------------------------------------------------------- automatic augmentation


def auto_augment(images: torch.Tensor, policy: str) -> torch.Tensor:
    """uint8 NHWC images, each through its own ops, drawn as torchvision's `policy` draws them for
    one image (trivialaugment: one op at a random magnitude bin; randaugment: RANDAUGMENT_OPS ops in
    turn at bin RANDAUGMENT_MAGNITUDE); a signed op takes either sign. Batched: each op runs once on
    its share (the geometric ones as one resample). A new tensor, image i from image i."""
    for _ in range(RANDAUGMENT_OPS if policy == "randaugment" else 1):
        images = _apply_drawn_ops(images, policy)
    return images


def draw_ops(n: int, device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """An op of OPS per image, uniform and independent as torchvision draws them: returns `order`
    (the images sorted by op: the first counts[0] take OPS[0], the next counts[1] OPS[1], ...) and
    `counts`. The counts are multinomial, drawn on the CPU so the shares' sizes are known without a
    device wait; `order` is a permutation drawn on the device."""
    counts = torch.randint(len(OPS), (n,)).bincount(minlength=len(OPS)).tolist()
    return torch.randperm(n, device=device), counts


def _apply_drawn_ops(images: torch.Tensor, policy: str) -> torch.Tensor:
    """One round of auto_augment: an op, a magnitude bin and a sign drawn per image, and applied."""
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
    sorted_images = shuffled.permute(0, 3, 1, 2)  # NCHW views, as torchvision's ops take them
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
    if matrices:  # the geometric ops' shares are one slice (OPS' order): one resample for all
        share = slice(starts[OPS.index(GEOMETRIC[0])], starts[OPS.index(GEOMETRIC[-1]) + 1])
        sorted_images[share] = resample(sorted_images[share], torch.cat(matrices))
    return torch.empty_like(images).index_copy_(0, order, shuffled)  # back in the images' order


@functools.lru_cache(maxsize=None)
def _magnitude_table(policy: str, height: int, width: int,
                     device: torch.device) -> tuple[torch.Tensor, tuple[bool, ...]]:
    """The policy's float32 (len(OPS), MAGNITUDE_BINS) magnitudes (zeros: an op taking none) from
    torchvision's own table, and whether each op is signed; made once per image size and device."""
    space = POLICIES[policy]._AUGMENTATION_SPACE
    rows, signed = [], []
    for op in OPS:
        magnitudes, is_signed = space[op]
        values = magnitudes(MAGNITUDE_BINS, height, width)
        rows.append(torch.zeros(MAGNITUDE_BINS) if values is None else values.float())
        signed.append(is_signed)
    return torch.stack(rows).to(device), tuple(signed)


def apply_op(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """OPS' op on uint8 (N, C, H, W) images, image i at magnitudes[i] (signed, as the policies pass
    it): what their _apply_image_or_video_transform does to one image, for the batch at once."""
    if op in GEOMETRIC:
        return resample(images, affine_matrices(op, magnitudes, images.shape[-2], images.shape[-1]))
    return _COLOUR_OPS[op](images, magnitudes.view(-1, 1, 1, 1))


def _blend(images: torch.Tensor, degenerate: torch.Tensor,
           magnitudes: torch.Tensor) -> torch.Tensor:
    """v2.functional's _blend at ratio 1 + magnitude per image: ratio * image + (1 - ratio) *
    degenerate, clamped, truncated to uint8, in its float32 (1 - ratio is -magnitude exactly)."""
    # add_'s fused a + alpha * b
    blended = torch.addcmul(images.mul(1 + magnitudes), degenerate.float(), -magnitudes)
    return blended.clamp_(0, 255).to(torch.uint8)


def _mean_grey(images: torch.Tensor) -> torch.Tensor:
    """adjust_contrast's degenerate image: each image's mean grey, from rgb_to_grayscale's floored
    uint8 as adjust_contrast takes it, unrounded as it blends it (F.adjust_contrast(images, 0) would
    truncate it)."""
    return F.rgb_to_grayscale(images).float().mean((-3, -2, -1), keepdim=True)


@functools.lru_cache(maxsize=None)
def _sharpness_kernel(device: torch.device) -> torch.Tensor:
    """adjust_sharpness' smoothing filter, float32 (1, 1, 3, 3) on the device, made once
    (torchvision makes it each call: on a GPU a host copy that waits for the device)."""
    return (torch.tensor(SHARPNESS_KERNEL, dtype=torch.float64) / 13).float().view(
        1, 1, 3, 3).to(device)


def _smoothed(images: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness' degenerate image in float, as F.adjust_sharpness(images, 0) gives it: the
    rounded smoothing of SHARPNESS_KERNEL inside a one-pixel frame of the image's own pixels."""
    channels = images.shape[1]
    smoothed = images.float()
    kernel = _sharpness_kernel(images.device).expand(channels, 1, 3, 3)
    smoothed[..., 1:-1, 1:-1] = conv2d(smoothed, kernel, groups=channels).round_()
    return smoothed


def _sharpen(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness at 1 + magnitude per image, in its arithmetic: image + (1 - factor) *
    (smoothed - image), clamped, truncated to uint8 (the frame, where the two are equal, stays)."""
    original = images.float()
    return torch.addcmul(
        original, _smoothed(images) - original, -magnitudes).clamp_(0, 255).to(torch.uint8)


def _posterize(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """posterize to each image's own bits (its magnitude): the low 8 - bits bits cleared as
    v2.functional's mask does, in one masking for all (no group per number of bits)."""
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
    (center=[0, 0]), translations by int(magnitude) pixels, rotations by magnitude degrees
    anticlockwise about the centre. In float64 like torchvision's Python floats where the device has
    it (not MPS): in float32 a shear's half-pixel ties round the other way for a few pixels."""
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


def _inverse_affine(
        rotation: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor,
        translate: tuple[torch.Tensor, torch.Tensor], center: tuple[float, float]) -> torch.Tensor:
    """v2.functional's _get_inverse_affine_matrix (scale 1, radians) for a batch: (N, 2, 3)."""
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
