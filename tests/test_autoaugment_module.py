"""Automatic augmentation: each op against torchvision's on one image, a draw for each image."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

import autoaugment_module
from autoaugment_module import GEOMETRIC, OPS
from conftest import smooth_photo


# --------------------------------------------------------------------------- automatic augmentation


def torchvisions_op(image, op, magnitude):
    """What torchvision's auto-augment policies do to one (C, H, W) uint8 image for an op at a
    magnitude (as their _apply_image_or_video_transform calls v2.functional)."""
    nearest = InterpolationMode.NEAREST
    shear = math.degrees(math.atan(magnitude))
    calls = {
        "Identity": lambda: image,
        "ShearX": lambda: F2.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                                    shear=[shear, 0.0], interpolation=nearest, center=[0, 0]),
        "ShearY": lambda: F2.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                                    shear=[0.0, shear], interpolation=nearest, center=[0, 0]),
        "TranslateX": lambda: F2.affine(image, angle=0.0, translate=[int(magnitude), 0], scale=1.0,
                                        shear=[0.0, 0.0], interpolation=nearest),
        "TranslateY": lambda: F2.affine(image, angle=0.0, translate=[0, int(magnitude)], scale=1.0,
                                        shear=[0.0, 0.0], interpolation=nearest),
        "Rotate": lambda: F2.rotate(image, angle=magnitude, interpolation=nearest),
        "Brightness": lambda: F2.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: F2.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: F2.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: F2.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: F2.posterize(image, int(magnitude)),
        "Solarize": lambda: F2.solarize(image, 255 * magnitude),
        "AutoContrast": lambda: F2.autocontrast(image),
        "Equalize": lambda: F2.equalize(image),
    }
    return calls[op]()


def every_magnitude(policy, op, size):
    """The policy's magnitudes of an op at each bin, and their negatives where the op is signed
    (torchvision's own table), as float32."""
    magnitudes, signed = autoaugment_module.POLICIES[policy]._AUGMENTATION_SPACE[op]
    values = magnitudes(autoaugment_module.MAGNITUDE_BINS, size, size)
    if values is None:
        return torch.zeros(4)
    return torch.cat([values, -values]).float() if signed else values.float()


def test_the_ops_are_torchvisions_in_its_order_for_both_policies():
    for policy in autoaugment_module.POLICIES.values():
        assert tuple(policy._AUGMENTATION_SPACE) == OPS
    assert GEOMETRIC == ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@pytest.mark.parametrize("policy", autoaugment_module.AUTO_AUGMENTS)
@pytest.mark.parametrize("op", OPS)
def test_each_op_on_a_batch_equals_torchvisions_on_each_image_alone(policy, op, one_thread):
    """At every magnitude bin and sign, on photo-like images (of grey levels 40-200, so that
    AutoContrast has work) and on noise: the colour ops within one grey level (on this CPU they are
    exact), the geometric ones on at least 99% of each image's pixels (a shear's half-pixel ties may
    round the other way)."""
    magnitudes = every_magnitude(policy, op, 32)
    n = len(magnitudes)
    photos = torch.stack([smooth_photo(32, seed=i) for i in range(n // 2)]).mul(0.625).add(40).to(
        torch.uint8)
    noise = torch.randint(0, 256, (n - n // 2, 32, 32, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    # channels_last (N, C, H, W), as the loader's
    images = torch.cat([photos, noise]).permute(0, 3, 1, 2)
    batched = autoaugment_module.apply_op(images, op, magnitudes)
    for image, out, magnitude in zip(images, batched, magnitudes.tolist()):
        expected = torchvisions_op(image.contiguous(), op, magnitude)
        difference = (out.int() - expected.int()).abs()
        if op in GEOMETRIC:
            assert (difference == 0).float().mean() >= 0.99, (op, magnitude)
        else:
            assert difference.max() <= 1, (op, magnitude)
    assert (batched[:n // 2] != images[:n // 2]).any() or op == "Identity"  # the op changes photos


def test_two_identical_images_in_one_batch_come_out_different():
    torch.manual_seed(0)
    image = smooth_photo(32)
    for policy in autoaugment_module.AUTO_AUGMENTS:
        out = autoaugment_module.auto_augment(image.expand(64, 32, 32, 3), policy)
        assert not torch.equal(out[0], out[1])
        distinct = {o.numpy().tobytes() for o in out}
        # unchanged outputs (Identity, magnitude 0, a full-range image's AutoContrast) are alike,
        # few others are; one draw for the whole batch (transforms.v2 on a batch tensor) would give
        # 1
        assert len(distinct) >= 40, (policy, len(distinct))


def test_each_output_is_torchvisions_op_on_its_own_image_and_every_op_is_drawn():
    """1,400 copies of one image through TrivialAugmentWide: each output is one op of OPS at one of
    its magnitudes applied to the image, and every op comes up (about 100 times each)."""
    torch.manual_seed(0)
    # grey levels 40-200: AutoContrast works
    image = smooth_photo(32, seed=3).mul(0.625).add(40).to(torch.uint8)
    outcomes = {}  # an output's pixels: the ops that give it
    for op in OPS:
        magnitudes = every_magnitude("trivialaugment", op, 32)
        for out in autoaugment_module.apply_op(
                image.permute(2, 0, 1).expand(len(magnitudes), 3, 32, 32), op, magnitudes):
            outcomes.setdefault(out.permute(1, 2, 0).numpy().tobytes(), set()).add(op)
    outputs = autoaugment_module.auto_augment(image.expand(1400, 32, 32, 3), "trivialaugment")
    drawn = [outcomes.get(out.numpy().tobytes()) for out in outputs]
    assert all(drawn)
    counts = {op: sum(op in ops and len(ops) == 1 for ops in drawn) for op in OPS
              if op != "Identity"}
    # told apart by their output: most of ~100 each
    assert all(count > 30 for count in counts.values()), counts


def test_each_output_depends_only_on_its_own_image():
    images = torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    changed = images.clone()
    changed[7] = 255 - changed[7]
    for policy in autoaugment_module.AUTO_AUGMENTS:
        torch.manual_seed(5)
        out = autoaugment_module.auto_augment(images, policy)
        torch.manual_seed(5)
        out_changed = autoaugment_module.auto_augment(changed, policy)
        same = (out == out_changed).flatten(1).all(1)
        assert not same[7] and same[torch.arange(40) != 7].all()


def test_ops_are_drawn_uniformly_and_independently_for_each_image():
    torch.manual_seed(0)
    order, counts = autoaugment_module.draw_ops(14000, "cpu")
    assert sorted(order.tolist()) == list(range(14000)) and sum(counts) == 14000
    # multinomial(14000, 1/14 each)
    assert all(abs(count - 1000) < 5 * math.sqrt(1000) for count in counts)
    ops_of_image_0 = set()
    for _ in range(300):
        order, counts = autoaugment_module.draw_ops(20, "cpu")
        place = order.tolist().index(0)
        ops_of_image_0.add(int(np.searchsorted(np.cumsum(counts), place, side="right")))
    assert ops_of_image_0 == set(range(len(OPS)))
