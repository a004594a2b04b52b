"""Architectures, freezing and weight loading: every model is a body of features and a classifier head."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18

import utils


class Classifier(nn.Module):
    """A feature body followed by a classifier head; frozen BatchNorm layers stay in eval mode."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))

    def train(self, mode: bool = True) -> "Classifier":
        """Switch modes, keeping frozen BatchNorm layers on their running statistics."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and _is_frozen(module):
                module.eval()
        return self


def _is_frozen(module: nn.Module) -> bool:
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


# --------------------------------------------------------------------------- architectures


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def cnn(num_classes: int, widths: tuple[int, ...] = (48, 96, 192)) -> Classifier:
    """The custom CNN: blocks of two 3x3 conv-BN-ReLU layers and a 2x2 max pool, then a linear head."""
    layers, in_channels = [], 3
    for width in widths:
        layers += _conv_bn(in_channels, width) + _conv_bn(width, width) + [nn.MaxPool2d(2)]
        in_channels = width
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(body, nn.Sequential(nn.Dropout(0.2), nn.Linear(in_channels, num_classes)))


def resnet18_small(num_classes: int) -> Classifier:
    """torchvision's ResNet-18 adapted to 32x32 inputs: a 3x3 stride-1 stem and no stem max pool."""
    body = resnet18(num_classes=num_classes)
    body.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    body.maxpool = nn.Identity()
    head, body.fc = body.fc, nn.Identity()
    return Classifier(body, head)


class _FastBatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: a learned shift but a fixed scale, fast-moving running statistics."""

    def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _DiracConv(nn.Conv2d):
    """A 3x3 conv whose first input-many filters start as the identity (airbench's init)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        weight = self.weight.data
        nn.init.dirac_(weight[:weight.size(1)])


def _fast_group(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(_DiracConv(in_channels, out_channels), nn.MaxPool2d(2), _FastBatchNorm(out_channels),
                         nn.GELU(), _DiracConv(out_channels, out_channels), _FastBatchNorm(out_channels), nn.GELU())


class Whitening(nn.Conv2d):
    """A 2x2 conv fixed to whiten image patches (airbench94): set from data by `init_from_data`."""

    def __init__(self, in_channels: int = 3, kernel_size: int = 2):
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size, padding=0, bias=True)
        self.weight.requires_grad = False

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters to the eigenvectors of the patch covariance of normalised images, scaled to
        unit variance, in +/- pairs."""
        c, (h, w) = images.shape[1], self.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.reshape(-1, c, h, w).flip(0)
        scaled = eigenvectors / torch.sqrt(eigenvalues + eps).view(-1, 1, 1, 1)
        self.weight.copy_(torch.cat((scaled, -scaled)))


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def fast(num_classes: int, widths: tuple[int, int, int] = (64, 256, 256)) -> Classifier:
    """The airbench94 network: a whitening layer, three conv groups, max pooling and a scaled linear head."""
    whitening = Whitening()
    body = nn.Sequential(whitening, nn.GELU(), _fast_group(whitening.out_channels, widths[0]),
                         _fast_group(widths[0], widths[1]), _fast_group(widths[1], widths[2]),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return Classifier(body, nn.Sequential(nn.Linear(widths[2], num_classes, bias=False), _Scale(1 / 9)))


MODELS: dict[str, Callable[[int], Classifier]] = {"cnn": cnn, "resnet18": resnet18_small, "fast": fast}


# --------------------------------------------------------------------------- freezing and weights


def freeze_body(model: Classifier) -> None:
    """Freeze everything but the classifier head; frozen BatchNorm layers keep their statistics."""
    for parameter in model.body.parameters():
        parameter.requires_grad = False
    model.train(model.training)


def frozen_parameters(model: Classifier) -> list[nn.Parameter]:
    """Body parameters that are frozen but that the architecture means to train (so not the whitening
    filters or the fast model's fixed BatchNorm scales)."""
    fixed = {id(m.weight) for m in model.modules() if isinstance(m, (Whitening, _FastBatchNorm))}
    return [p for p in model.body.parameters() if not p.requires_grad and id(p) not in fixed]


def unfreeze_body(model: Classifier) -> list[nn.Parameter]:
    """Make the frozen body trainable again and return the parameters that changed."""
    thawed = frozen_parameters(model)
    for parameter in thawed:
        parameter.requires_grad = True
    model.train(model.training)
    return thawed


def load_weights(model: Classifier, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> list[str]:
    """Load a state dict, keeping the model's own head where the saved head has another shape
    (transfer to a new class count); returns the names skipped. Raises ValueError for another architecture."""
    own = model.state_dict()
    skipped = [k for k in state if k.startswith("head.") and k in own and state[k].shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("other shapes", mismatched)) if keys)
        raise ValueError(f"{source} does not fit this model ({detail}); was it saved from another MODEL?")
    model.load_state_dict(state, strict=False)
    return skipped


def get_model(name: str, num_classes: int, freeze: bool = False, weights: str | None = None,
              sample_images: Callable[[], torch.Tensor] | None = None) -> Classifier:
    """Build a model by name, optionally start from saved weights, and optionally freeze its body.

    sample_images returns normalised (N, C, H, W) training images, asked for only by architectures with
    data-dependent layers (the fast model's whitening filters); saved weights, when given, override them.
    """
    if name not in MODELS:
        raise ValueError(f"MODEL = {name!r} is not known; choose one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least two classes, got {num_classes}")
    model = MODELS[name](num_classes)
    whitening = [m for m in model.modules() if isinstance(m, Whitening)]
    if whitening and sample_images is not None:
        images = sample_images()
        for module in whitening:
            module.init_from_data(images.cpu())
    if weights is not None:
        skipped = load_weights(model, utils.load_state_dict(weights, "WEIGHTS"), f"WEIGHTS {weights}")
        if skipped:
            print(f"WEIGHTS {weights}: new head for {num_classes} classes (the saved head had another size)")
    if freeze:
        freeze_body(model)
    return model
