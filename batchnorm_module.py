"""The BatchNorm running statistics of a torchvision model trained from scratch: their momentum
raised for small datasets, and their start calibrated on training images."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# training images whose statistics start a fresh torchvision model's BatchNorm running stats
CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 32  # images per forward pass while calibrating (at least)
# the least momentum of a torchvision model's BatchNorm running stats (PyTorch's default)
BATCHNORM_MOMENTUM = 0.1


def quicken_batchnorm(model: nn.Module, momentum: float = BATCHNORM_MOMENTUM) -> None:
    """Raise every BatchNorm's running-statistics momentum to at least `momentum`.

    MobileNetV3, EfficientNet-B5 to B7 and MaxViT use 0.01, MNASNet 0.0003: running stats that
    average over hundreds (thousands) of steps, made for ImageNet's thousands of steps per epoch. A
    small folder trains a step or a few per epoch while the weights change fast, so in eval mode
    each layer is divided by the standard deviation of weights long gone, and validation sees
    another network than training."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, momentum)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, sample_images: Callable[[int], torch.Tensor]) -> None:
    """Start every BatchNorm's running mean and variance as the statistics of the freshly
    initialised model on training images (the average over a few batches in train mode), not at
    PyTorch's 0 and 1.

    The 0 and 1 are far off for torchvision's initialisation: kaiming fan_out counts a depthwise
    conv's fan-out C times over, so a fresh MobileNetV3's depthwise and projection layers see
    variances of 1e-3 to 1e-8, not 1. Eval mode divides each layer by sqrt(running var), so until
    the running stats have forgotten the 1 the signal shrinks layer after layer and every image gets
    the same logits: exactly 1/num_classes, loss ln(num_classes). The momentum, the random state
    (dropout, stochastic depth, the loader's shuffling) and the weights are left as they were; only
    the running statistics change."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return
    momenta, training = [m.momentum for m in norms], model.training
    with torch.random.fork_rng(devices=[]):
        images = sample_images(CALIBRATION_IMAGES).cpu()
        if len(images) < 2:  # one image has no variance
            return
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches below
        model.train()
        # batches of about equal size
        for batch in images.tensor_split(max(1, len(images) // CALIBRATION_BATCH)):
            model(batch)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
        module.num_batches_tracked.zero_()
    model.train(training)
