"""BatchNorm running stats of a torchvision model trained from scratch: momentum raised for small
datasets, start calibrated on training images."""

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
    """Raise every BatchNorm's running-statistics momentum to at least `momentum`. MobileNetV3,
    EfficientNet-B5 to B7 and MaxViT use 0.01, MNASNet 0.0003: averages over hundreds (thousands) of
    steps, made for ImageNet's long epochs. A small folder trains a few steps an epoch while the
    weights change fast, so eval mode divides by the std of weights long gone, and validation sees
    another network than training."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, momentum)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, sample_images: Callable[[int], torch.Tensor]) -> None:
    """Start each BatchNorm's running mean and var at the fresh model's statistics on training
    images (averaged over a few train-mode batches), not PyTorch's 0 and 1, far off for
    torchvision's init: kaiming fan_out counts a depthwise conv's fan-out C times over, so a fresh
    MobileNetV3's depthwise and projection layers see variances of 1e-3 to 1e-8. Eval mode divides
    by sqrt(running var), so until the running var forgets the 1 the signal shrinks layer by layer
    and every image gets the same logits (each class 1/num_classes, loss ln(num_classes)).
    Momentum, random state (dropout, stochastic depth, shuffling) and weights stay as they were."""
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
        for batch in images.tensor_split(max(1, len(images) // CALIBRATION_BATCH)):
            model(batch)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
        module.num_batches_tracked.zero_()
    model.train(training)
