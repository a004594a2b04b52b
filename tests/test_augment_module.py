"""Batched augmentation: pad-crops and flips, torchvision's RandomResizedCrop boxes, crops that
match PIL's, random erasing, and the streaming path's PIL transforms."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from torch.utils._python_dispatch import TorchDispatchMode

import augment_module
import autoaugment_module
from conftest import augmentation, smooth_photo


def test_flip_alone_mirrors_exactly():
    images = torch.randint(0, 256, (6, 5, 7, 3), dtype=torch.uint8)
    flipped = torch.tensor([True, False, True, False, True, True])
    out = augment_module.crop_flip(images, 0, flipped)
    assert torch.equal(out[flipped], images[flipped].flip(2))
    assert torch.equal(out[~flipped], images[~flipped])


@pytest.mark.parametrize("reflect", [False, True])
def test_crops_are_shifts_within_the_padding(reflect):
    torch.manual_seed(0)
    padding = 2
    images = torch.randint(1, 256, (40, 8, 8, 3), dtype=torch.uint8)  # no zeros: a zero is padding
    out = augment_module.crop_flip(images, padding, None, reflect=reflect)
    mode = "reflect" if reflect else "constant"
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (padding,) * 4, mode=mode)
    shifts_seen = set()
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8],
                                  out[i].permute(2, 0, 1).float())]
        assert matches, f"image {i} is not a crop of its padded self"
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 5  # the shifts really vary


def test_crop_boxes_fit_and_follow_torchvisions_distribution():
    torch.manual_seed(0)
    for height, width in [(256, 256), (100, 300)]:
        boxes = augment_module.sample_crop_boxes(3000, height, width).double()
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w
            <= width).all()
        # within scale (0.08, 1) and ratio (3/4, 4/3) up to the rounding of w and h to whole pixels
        area = height * width
        assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5)
            <= area).all()
        assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
        image = torch.zeros(3, height, width)
        reference = torch.tensor([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0],
                                                                          [3 / 4, 4 / 3])
                                  for _ in range(3000)]).double()
        for ours, theirs in [(h * w / area, reference[:, 2] * reference[:, 3] / area),
                             ((w / h).log(), (reference[:, 3] / reference[:, 2]).log()),
                             (top + h / 2, reference[:, 0] + reference[:, 2] / 2)]:
            standard_error = (ours.var() / 3000 + theirs.var() / 3000).sqrt()
            assert (ours.mean() - theirs.mean()).abs() < 4 * standard_error


def test_crop_boxes_fall_back_to_torchvisions_central_crop():
    # no box of 99-100% of a 10 x 100 image has a ratio in (3/4, 4/3): ten misses, then the central
    # crop
    boxes = augment_module.sample_crop_boxes(5, 10, 100, scale=(0.99, 1.0))
    expected = transforms.RandomResizedCrop.get_params(torch.zeros(3, 10, 100), [0.99, 1.0],
                                                       [3 / 4, 4 / 3])
    assert boxes.tolist() == [list(expected)] * 5 == [[0, 43, 10, 13]] * 5


@pytest.mark.parametrize("box, enlarged", [((20, 30, 150, 120), True), ((40, 100, 90, 150), True),
                                           ((0, 0, 256, 256), False), ((10, 5, 240, 200), False)])
def test_the_same_box_gives_the_same_pixels_on_both_paths(box, enlarged):
    """The resident crop (roi_align) against the streaming path's (resized_crop of the PIL image).

    Compared inside a one-pixel frame: at a box's edge the resident crop interpolates with the
    image's real pixels just outside the box, where resized_crop repeats the box's edge. Inside it:
    a box enlarged to 224 is plain bilinear on both paths, equal to float precision, and PIL rounds
    to 8 bits after each of its two passes (at most 1 level); a box shrunk to 224 is antialiased by
    PIL's triangle filter and by roi_align's averaged samples, two low-pass filters that differ by
    under 2.5 levels (1%) on a photo.
    """
    image = smooth_photo()
    ours = augment_module.crop_and_resize(image[None], torch.tensor([box]), 224)[0][:, 1:-1, 1:-1]
    streamed = np.array(F.resized_crop(Image.fromarray(image.numpy()), *box, [224, 224]))
    difference = (ours - torch.from_numpy(streamed).permute(2, 0, 1)[:, 1:-1, 1:-1]).abs()
    if enlarged:
        bilinear = F.resized_crop(image.permute(2, 0, 1).float(), *box, [224, 224], antialias=False)
        assert (ours - bilinear[:, 1:-1, 1:-1]).abs().max() < 1e-3
        assert difference.max() <= 1 + 1e-3
    else:
        assert difference.max() < 2.5 and difference.mean() < 0.5


class HostReads(TorchDispatchMode):
    """The operators run inside it that, on a GPU, would make the host wait for the device: a value
    read back (_local_scalar_dense: .item(), bool()), a result sized by the data (nonzero,
    masked_select, a boolean-mask read), a boolean-mask write other than ATen's masked_fill_ path (a
    one-element CPU value), or an explicit copy to another device. Seen on the CPU, since they are
    properties of the operators (.tolist() and .numpy() bypass the dispatcher: not seen)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        indexing = name in ("index", "index_put", "index_put_", "_index_put_impl_")
        masks = indexing and any(isinstance(i, torch.Tensor)
                                 and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        masked_fill = masks and name != "index" and args[2].numel() == 1 and args[
            2].device.type == "cpu"
        if name in ("_local_scalar_dense", "nonzero",
                    "masked_select") or (masks and not masked_fill) or (name == "_to_copy"
                                                                        and "device" in kwargs):
            self.found.append(str(func))
        return func(*args, **kwargs)


def test_the_batched_augmentation_never_makes_the_device_wait_for_the_host():
    images = torch.randint(0, 256, (64, 16, 16, 3), dtype=torch.uint8)
    for policy in autoaugment_module.AUTO_AUGMENTS:
        # the first call makes the tables it keeps on the device
        autoaugment_module.auto_augment(images, policy)
    with HostReads() as watch:
        for policy in autoaugment_module.AUTO_AUGMENTS:
            autoaugment_module.auto_augment(images, policy)
        augment_module.erase_masks(64, 16, 16, 0.5, "cpu")
    assert watch.found == []
    with HostReads() as watch:  # the watch sees them
        images[images > 100] = images[images > 100] // 2
        torch.zeros(3).sum().item()
    assert watch.found == ["aten.index.Tensor", "aten.index_put_.default",
                           "aten._local_scalar_dense.default"]


# ----------------------------------------------------------------------------- random erasing


def test_erased_boxes_follow_torchvisions_distribution():
    torch.manual_seed(0)
    n, size = 4000, 32
    masks = augment_module.erase_masks(n, size, size, 1.0, "cpu")[:, 0]
    rows, cols = masks.any(2), masks.any(1)
    assert torch.equal(masks, rows[:, :, None] & cols[:, None, :])  # each a box
    h, w = rows.sum(1).double(), cols.sum(1).double()
    top = rows.double().argmax(1)
    erasing = transforms.RandomErasing(1.0)
    reference = torch.tensor([erasing.get_params(torch.zeros(3, size, size), erasing.scale,
                                                 erasing.ratio, [0.0])[:4]
                              for _ in range(n)]).double()
    # nearly all fit
    assert (h > 0).float().mean() > 0.99 and (reference[:, 2] < size).float().mean() > 0.99
    kept = (h > 0) & (h < size)
    h, w, top = h[kept], w[kept], top[kept]
    ref_h, ref_w, ref_top = reference[:, 2], reference[:, 3], reference[:, 0]
    for ours, theirs in [(h * w, ref_h * ref_w), ((h / w).log(), (ref_h / ref_w).log()),
                         (top + h / 2, ref_top + ref_h / 2)]:
        standard_error = (ours.var() / len(ours) + theirs.var() / len(theirs)).sqrt()
        assert (ours.mean() - theirs.mean()).abs() < 4 * standard_error
    erased = augment_module.erase_masks(n, size, size, 0.25, "cpu").flatten(1).any(
        1).double().mean()
    assert abs(erased - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


def test_random_erasing_gives_two_identical_images_boxes_of_their_own():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 32, 32).add(5).expand(2, 3, 32, 32)  # normalised, and never 0
    masks = augment_module.erase_masks(2, 32, 32, 1.0, "cpu")
    erased = images.masked_fill(masks, 0.0)
    assert not torch.equal(erased[0], erased[1])
    assert torch.equal(erased == 0, masks.expand(2, 3, 32, 32)) and masks.any()


# ----------------------------------------------------------------------------- the streaming path


def test_the_streaming_path_trains_with_torchvisions_own_transforms():
    mean, std = (0.5,) * 3, (0.25,) * 3
    for policy, kind in [("trivialaugment", transforms.TrivialAugmentWide),
                         ("randaugment", transforms.RandAugment)]:
        augmented = augmentation(mean, std, AUTO_AUGMENT=policy, RANDOM_ERASING=0.25)
        steps = augment_module.pil_transform(True, 32, augmented).transforms
        assert [type(step) for step in steps] == [
            transforms.RandomCrop, transforms.RandomHorizontalFlip, kind, transforms.ToTensor,
            transforms.Normalize, transforms.RandomErasing]
        assert steps[2].num_magnitude_bins == 31 and (
            policy == "trivialaugment" or (steps[2].num_ops, steps[2].magnitude) == (2, 9))
        assert (steps[-1].p, steps[-1].scale, steps[-1].ratio,
                steps[-1].value) == (0.25, (0.02, 0.33), (0.3, 3.3), 0)
        evaluation = augment_module.pil_transform(False, 32, augmented).transforms
        assert [type(step) for step in evaluation] == [transforms.ToTensor, transforms.Normalize]
    plain = augment_module.pil_transform(True, 32, augmentation(mean, std)).transforms
    assert [type(step) for step in plain] == [transforms.RandomCrop,
                                              transforms.RandomHorizontalFlip, transforms.ToTensor,
                                              transforms.Normalize]


# ----------------------------------------------------------------------------- Mixup and CutMix


def labelled_batch(n=6, classes=10, size=8):
    """A channels_last batch of n images, image i filled with the value i (so a pixel tells its
    source image), and labels that differ from the one before each (so a target row tells both of
    its classes)."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size)
    return images.contiguous(memory_format=torch.channels_last), torch.arange(n) % classes


def test_mixup_targets_sum_to_one_and_each_image_is_blended_with_the_one_before_by_its_share():
    images, labels = labelled_batch()
    mix = augment_module.batch_mixer(dict(mixup=0.2, cutmix=0.0), num_classes=10)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        assert targets.shape == (6, 10) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(6))
        # the image's own share; the rest goes to the class of the one before
        lam = targets[0, labels[0]].item()
        assert 0 <= lam <= 1 and targets[0, labels[-1]].item() == pytest.approx(1 - lam)
        assert torch.allclose(targets[:, labels], lam * torch.eye(6) + (1 - lam) * torch.eye(
            6).roll(-1, 1))
        assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
        assert mixed.is_contiguous(memory_format=torch.channels_last)  # the loaders' layout is kept


def test_cutmix_pastes_a_box_of_the_image_before_whose_area_share_is_that_classes_target_weight():
    images, labels = labelled_batch(size=16)
    mix = augment_module.batch_mixer(dict(mixup=0.0, cutmix=1.0), num_classes=10)
    pasted_somewhere = False
    for seed in range(8):
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        assert torch.allclose(targets.sum(1), torch.ones(6))
        for i in range(6):
            from_before = mixed[i] == images[i - 1]
            # no blending
            assert torch.equal(from_before | (mixed[i] == images[i]), torch.ones_like(from_before))
            share = from_before.float().mean().item()
            assert targets[i, labels[i - 1]].item() == pytest.approx(share, abs=1e-6)
            assert targets[i, labels[i]].item() == pytest.approx(1 - share, abs=1e-6)
            pasted_somewhere |= share > 0
        assert mixed.is_contiguous(memory_format=torch.channels_last)
    assert pasted_somewhere


def test_with_both_on_each_batch_gets_mixup_or_cutmix_and_with_both_off_there_is_no_mixer():
    images, labels = labelled_batch(size=16)
    mix = augment_module.batch_mixer(dict(mixup=0.2, cutmix=1.0), num_classes=10)
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        lam = targets[1, labels[1]].item()
        if lam in (0.0, 1.0):
            continue  # nothing mixed: either could have done it
        blended = torch.allclose(mixed[1], lam * images[1] + (1 - lam) * images[0], atol=1e-6)
        # every pixel one image's own
        pasted = bool(((mixed[1] == images[0]) | (mixed[1] == images[1])).all())
        assert blended != pasted  # one or the other
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}
    assert augment_module.batch_mixer(dict(mixup=0.0, cutmix=0.0), 10) is None
