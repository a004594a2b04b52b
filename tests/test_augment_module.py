"""Batched augmentation: pad-crops and flips, torchvision's RandomResizedCrop boxes, and crops that match PIL's."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

import augment_module
from conftest import smooth_photo


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
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], out[i].permute(2, 0, 1).float())]
        assert matches, f"image {i} is not a crop of its padded self"
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 5  # the shifts really vary


def test_crop_boxes_fit_and_follow_torchvisions_distribution():
    torch.manual_seed(0)
    for height, width in [(256, 256), (100, 300)]:
        boxes = augment_module.sample_crop_boxes(3000, height, width).double()
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        # within scale (0.08, 1) and ratio (3/4, 4/3) up to the rounding of w and h to whole pixels
        area = height * width
        assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
        assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
        image = torch.zeros(3, height, width)
        reference = torch.tensor([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                                  for _ in range(3000)]).double()
        for ours, theirs in [(h * w / area, reference[:, 2] * reference[:, 3] / area),
                             ((w / h).log(), (reference[:, 3] / reference[:, 2]).log()),
                             (top + h / 2, reference[:, 0] + reference[:, 2] / 2)]:
            standard_error = (ours.var() / 3000 + theirs.var() / 3000).sqrt()
            assert (ours.mean() - theirs.mean()).abs() < 4 * standard_error


def test_crop_boxes_fall_back_to_torchvisions_central_crop():
    # no box of 99-100% of a 10 x 100 image has a ratio in (3/4, 4/3): ten misses, then the central crop
    boxes = augment_module.sample_crop_boxes(5, 10, 100, scale=(0.99, 1.0))
    expected = transforms.RandomResizedCrop.get_params(torch.zeros(3, 10, 100), [0.99, 1.0], [3 / 4, 4 / 3])
    assert boxes.tolist() == [list(expected)] * 5 == [[0, 43, 10, 13]] * 5


@pytest.mark.parametrize("box, enlarged", [((20, 30, 150, 120), True), ((40, 100, 90, 150), True),
                                           ((0, 0, 256, 256), False), ((10, 5, 240, 200), False)])
def test_the_same_box_gives_the_same_pixels_on_both_paths(box, enlarged):
    """The resident crop (roi_align) against the streaming path's (resized_crop of the PIL image).

    Compared inside a one-pixel frame: at a box's edge the resident crop interpolates with the image's real
    pixels just outside the box, where resized_crop repeats the box's edge. Inside it: a box enlarged to
    224 is plain bilinear on both paths, equal to float precision, and PIL rounds to 8 bits after each of
    its two passes (at most 1 level); a box shrunk to 224 is antialiased by PIL's triangle filter and by
    roi_align's averaged samples, two low-pass filters that differ by under 2.5 levels (1%) on a photo.
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


# ----------------------------------------------------------------------------- Mixup and CutMix


def labelled_batch(n=6, classes=10, size=8):
    """A channels_last batch of n images, image i filled with the value i (so a pixel tells its source image),
    and labels that differ from the one before each (so a target row tells both of its classes)."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size)
    return images.contiguous(memory_format=torch.channels_last), torch.arange(n) % classes


def test_mixup_targets_sum_to_one_and_each_image_is_blended_with_the_one_before_by_its_targets_share():
    images, labels = labelled_batch()
    mix = augment_module.batch_mixer(mixup=0.2, cutmix=0.0, num_classes=10)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        assert targets.shape == (6, 10) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(6))
        lam = targets[0, labels[0]].item()  # the image's own share; the rest goes to the class of the one before
        assert 0 <= lam <= 1 and targets[0, labels[-1]].item() == pytest.approx(1 - lam)
        assert torch.allclose(targets[:, labels], lam * torch.eye(6) + (1 - lam) * torch.eye(6).roll(-1, 1))
        assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
        assert mixed.is_contiguous(memory_format=torch.channels_last)  # the loaders' layout is kept


def test_cutmix_pastes_a_box_of_the_image_before_whose_area_share_is_that_classes_target_weight():
    images, labels = labelled_batch(size=16)
    mix = augment_module.batch_mixer(mixup=0.0, cutmix=1.0, num_classes=10)
    pasted_somewhere = False
    for seed in range(8):
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        assert torch.allclose(targets.sum(1), torch.ones(6))
        for i in range(6):
            from_before = mixed[i] == images[i - 1]
            assert torch.equal(from_before | (mixed[i] == images[i]), torch.ones_like(from_before))  # no blending
            share = from_before.float().mean().item()
            assert targets[i, labels[i - 1]].item() == pytest.approx(share, abs=1e-6)
            assert targets[i, labels[i]].item() == pytest.approx(1 - share, abs=1e-6)
            pasted_somewhere |= share > 0
        assert mixed.is_contiguous(memory_format=torch.channels_last)
    assert pasted_somewhere


def test_with_both_on_each_batch_gets_mixup_or_cutmix_and_with_both_off_there_is_no_mixer():
    images, labels = labelled_batch(size=16)
    mix = augment_module.batch_mixer(mixup=0.2, cutmix=1.0, num_classes=10)
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        lam = targets[1, labels[1]].item()
        if lam in (0.0, 1.0):
            continue  # nothing mixed: either could have done it
        blended = torch.allclose(mixed[1], lam * images[1] + (1 - lam) * images[0], atol=1e-6)
        pasted = bool(((mixed[1] == images[0]) | (mixed[1] == images[1])).all())  # every pixel one image's own
        assert blended != pasted  # one or the other
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}
    assert augment_module.batch_mixer(0.0, 0.0, 10) is None
