"""Architectures, freezing and weight loading: every model is a feature body and a classifier head.
Our own models (cnn, fast, resnet18_cifar) and every torchvision classification model by name, the
latter optionally starting from torchvision's published ImageNet weights (PRETRAINED)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import urllib.parse
from collections import OrderedDict
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torchvision.models import resnet18

import batchnorm_module
import messages_module
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
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def cnn(num_classes: int, widths: tuple[int, ...] = (48, 96, 192)) -> Classifier:
    """The custom CNN: blocks of two 3x3 conv-BN-ReLU layers and a 2x2 max pool, a linear head."""
    layers, in_channels = [], 3
    for width in widths:
        layers += _conv_bn(in_channels, width) + _conv_bn(width, width) + [nn.MaxPool2d(2)]
        in_channels = width
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(body, nn.Sequential(nn.Dropout(0.2), nn.Linear(in_channels, num_classes)))


def resnet18_cifar(num_classes: int) -> Classifier:
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
    return nn.Sequential(
        _DiracConv(in_channels, out_channels), nn.MaxPool2d(2), _FastBatchNorm(out_channels),
        nn.GELU(), _DiracConv(out_channels, out_channels), _FastBatchNorm(out_channels), nn.GELU())


class Whitening(nn.Conv2d):
    """A 2x2 conv fixed to whiten image patches (airbench94): set from data by `init_from_data`."""

    def __init__(self, in_channels: int = 3, kernel_size: int = 2):
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size, padding=0,
                         bias=True)
        self.weight.requires_grad = False

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters to the eigenvectors of the patch covariance of normalised images, scaled
        to unit variance, in +/- pairs."""
        c, (h, w) = images.shape[1], self.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(
            -1, c * h * w)
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


class _WholeMapMaxPool(nn.Module):
    """The max over each channel's whole map, (N, C, H, W) to (N, C, 1, 1), as airbench94's
    MaxPool2d(3) on a 32-pixel image's 3x3 map. AdaptiveMaxPool2d(1) gives the same values, but its
    CUDA kernels (for any output size) are slow (atomic adds backward; benchmarks/RESULTS.md). The
    kernel is the map's size, read at each call, not fixed at build: the fast model takes any
    IMAGE_SIZE and is built without it; the map's size is the same in every CUDA-graph replay and
    fixed in an export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, kernel_size=x.shape[-2:])


def fast(num_classes: int, widths: tuple[int, int, int] = (64, 256, 256)) -> Classifier:
    """airbench94's network: a whitening layer, three conv groups, max pool, scaled linear head."""
    whitening = Whitening()
    body = nn.Sequential(whitening, nn.GELU(), _fast_group(whitening.out_channels, widths[0]),
                         _fast_group(widths[0], widths[1]), _fast_group(widths[1], widths[2]),
                         _WholeMapMaxPool(), nn.Flatten())
    return Classifier(body,
                      nn.Sequential(nn.Linear(widths[2], num_classes, bias=False), _Scale(1 / 9)))


MODELS: dict[str, Callable[[int], Classifier]] = {
    "cnn": cnn, "resnet18_cifar": resnet18_cifar, "fast": fast}
TORCHVISION_MODELS: tuple[str, ...] = tuple(
    torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """Every accepted MODEL: our own, then torchvision's classification models."""
    return [*MODELS, *TORCHVISION_MODELS]


def check_name(name: str) -> None:
    """ValueError unless MODEL `name` is one of model_names()."""
    if name not in MODELS and name not in TORCHVISION_MODELS:
        raise ValueError(messages_module.not_known("MODEL", name, model_names(), closest=True))


# ---------------------------------------------------------------------- torchvision's architectures

# where torchvision's families keep their classifier
_HEAD_HOLDERS = ("fc", "classifier", "heads", "head")
# inception_v3's and googlenet's side classifiers, built off here
_AUXILIARY = ("AuxLogits.", "aux1.", "aux2.")


def _build_torchvision(name: str, num_classes: int, image_size: int | None,
                       weights: torchvision.models.WeightsEnum | None) -> nn.Module:
    """torchvision's architecture with a num_classes classifier; image_size sizes models made for
    one size (ViT's position embedding, MaxViT's attention windows), which then take only it."""
    options: dict[str, Any] = {"num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        # Plain logits from forward, and always the input transform that the ported Google weights
        # expect, so that a saved model means the same whether it started from them or not.
        options.update(aux_logits=False, transform_input=True, init_weights=True)
    size = image_size
    if name.startswith(("vit_", "maxvit_")):
        native = weights.meta["min_size"][0] if weights is not None else None
        if native is not None and image_size not in (None, native):
            raise ValueError(f"{name}'s {weights.name} weights are for {native}-pixel images, "
                             f"so IMAGE_SIZE must be {native} with PRETRAINED = {weights.name!r}, "
                             f"not {image_size}")
        size = image_size or native
        if size is not None:
            options.update({"image_size": size} if name.startswith("vit_")
                           else {"input_size": (size, size)})
    try:
        return torchvision.models.get_model(name, **options)
    # ViT asserts the patch size divides it, MaxViT checks its windows
    except (ValueError, AssertionError) as error:
        if size is None:
            raise
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"MODEL = {name!r} cannot be built for IMAGE_SIZE = {size} ({detail}); it "
                         "takes one image size, fixed when it is built, and 224 fits it") from None


def _final_layer_name(model: nn.Module) -> str:
    """The qualified name of torchvision's last classification layer: the last Linear (squeezenet:
    the 1x1 Conv2d) inside the model's fc, classifier, heads or head."""
    holder = next(h for h in _HEAD_HOLDERS if isinstance(getattr(model, h, None), nn.Module))
    layers = [n for n, m in getattr(model, holder).named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))]
    return ".".join(filter(None, (holder, layers[-1])))


def _split_head(model: nn.Module, final: str) -> Classifier:
    """Classifier(body, head): torchvision's model with its final layer made an identity (returning
    the features that layer took), and that layer (sized for our classes) as the head."""
    if isinstance(model, torchvision.models.SqueezeNet):
        # squeezenet classifies with a 1x1 conv, a ReLU and global pooling, then flattens: all head,
        # so the body ends with the feature maps (and the dropout before the conv).
        dropout, conv, relu, pool = model.classifier
        body = nn.Sequential(OrderedDict(features=model.features, dropout=dropout))
        return Classifier(body, nn.Sequential(conv, relu, pool, nn.Flatten()))
    parent_name, _, child = final.rpartition(".")
    parent = model.get_submodule(parent_name)
    head = parent.get_submodule(child)
    setattr(parent, child, nn.Identity())
    return Classifier(model, head)


# densenet's published files predate its layer names: "denselayer1.norm.1.weight" for
# "denselayer1.norm1.weight"
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_\w+))$")


def _load_body(model: nn.Module, state: dict[str, torch.Tensor], final: str, source: str) -> None:
    """Load ImageNet weights into torchvision's model, all but its final layer (kept fresh for
    num_classes) and the auxiliary classifiers (built off); ValueError for another model."""
    # deleted in place: the dict's module versions (_metadata) must stay with it
    for key in list(state):
        old = _OLD_DENSENET_KEY.match(key)
        if old:
            state[old.group(1) + old.group(2)] = state.pop(key)
        elif key.startswith((final + ".", *_AUXILIARY)):
            del state[key]
    try:
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(final + ".")]
        problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", result.unexpected_keys))
                    if keys]
    except RuntimeError as error:  # tensors of other shapes
        problems = [(str(error).splitlines() or ["other shapes"])[-1].strip()]
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__} ({'; '.join(problems)}); "
                         "delete it so that the published file is downloaded again")


def _torchvision_classifier(name: str, num_classes: int, image_size: int | None,
                            weights: torchvision.models.WeightsEnum | None) -> Classifier:
    """torchvision's model `name` as Classifier(body, head), the body from `weights` if given."""
    model = _build_torchvision(name, num_classes, image_size, weights)
    final = _final_layer_name(model)
    if weights is not None:
        state, path = _load_pretrained(weights)
        _load_body(model, state, final, f"PRETRAINED weights {path}")
    return _split_head(model, final)


# --------------------------------------------------------------------- published (ImageNet) weights


def weight_names(name: str) -> list[str]:
    """MODEL `name`'s PRETRAINED values: "default" and its published weights (none for ours)."""
    if name not in TORCHVISION_MODELS:
        return []
    return ["default", *(w.name for w in torchvision.models.get_model_weights(name))]


def _find_weights(name: str, pretrained: str) -> torchvision.models.WeightsEnum:
    """The weights PRETRAINED names for MODEL `name` ("default" or a member name, any case)."""
    allowed = weight_names(name)
    if str(pretrained).upper() not in {a.upper() for a in allowed}:
        what = (f"the weights published for {name}" if allowed else f"{name} has no published "
                "weights; torchvision's models have, such as resnet18")
        raise ValueError(f"{messages_module.not_known('PRETRAINED', pretrained, allowed or [None])}"
                         f" ({what})")
    return torchvision.models.get_model_weights(name)[pretrained.upper()]


def _load_pretrained(
        weights: torchvision.models.WeightsEnum) -> tuple[dict[str, torch.Tensor], str]:
    """Published weights' state dict and path, from torch's hub cache ($TORCH_HOME/hub/checkpoints),
    downloaded first if missing; only tensors load (weights_only)."""
    path = _fetch_pretrained(weights)  # read by the safe loader, with its messages for a bad file
    return utils.load_state_dict(path, "PRETRAINED weights"), path


def fetch_pretrained(name: str, pretrained: str | None) -> None:
    """Make sure MODEL `name`'s PRETRAINED weights are in torch's hub cache, downloading them if
    need be (ValueError naming file and folder if not). A run asks before it reads any data."""
    if pretrained is not None:
        _fetch_pretrained(_find_weights(name, pretrained))


def _fetch_pretrained(weights: torchvision.models.WeightsEnum) -> str:
    """The path of published weights in $TORCH_HOME/hub/checkpoints, downloaded there first when
    missing, as torch.hub.load_state_dict_from_url does (the hash in the file's name checked)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    file_name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    path = os.path.join(folder, file_name)
    if os.path.isfile(path):
        return path
    made, missing = [], folder  # the folders makedirs makes, removed again on failure
    while not os.path.isdir(missing):
        made, missing = [missing, *made], os.path.dirname(missing)
    try:
        os.makedirs(folder, exist_ok=True)
        digest = torch.hub.HASH_REGEX.search(file_name)
        torch.hub.download_url_to_file(weights.url, path, digest.group(1) if digest else None,
                                       progress=False)
        return path
    # offline, refused, cut short, a bad hash
    except (OSError, http.client.HTTPException, RuntimeError) as error:
        for empty in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(empty)
        detail = (str(getattr(error, "reason", error)).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"PRETRAINED weights {file_name} are not in {folder} and could not be "
                         f"downloaded ({detail}); "
                         f"download {weights.url} into that folder") from None


def preprocessing(name: str, pretrained: str | None) -> dict[str, Any] | None:
    """How images must be prepared for MODEL `name`'s PRETRAINED weights (None without): resize size
    (shorter side), crop size, mean, std, interpolation, from the weights' own transforms."""
    check_name(name)
    if pretrained is None:
        return None
    transforms = _find_weights(name, pretrained).transforms()
    return {"resize_size": transforms.resize_size[0], "crop_size": transforms.crop_size[0],
            "mean": list(transforms.mean), "std": list(transforms.std),
            "interpolation": transforms.interpolation.value}


# --------------------------------------------------------------------------- freezing and weights


def freeze_body(model: Classifier) -> None:
    """Freeze everything but the classifier head; frozen BatchNorm layers keep their statistics."""
    for parameter in model.body.parameters():
        parameter.requires_grad = False
    model.train(model.training)


def frozen_parameters(model: Classifier) -> list[nn.Parameter]:
    """Body parameters that are frozen but that the architecture means to train (so not the
    whitening filters or the fast model's fixed BatchNorm scales)."""
    fixed = {id(m.weight) for m in model.modules() if isinstance(m, (Whitening, _FastBatchNorm))}
    return [p for p in model.body.parameters() if not p.requires_grad and id(p) not in fixed]


def unfreeze_body(model: Classifier) -> list[nn.Parameter]:
    """Make the frozen body trainable again and return the parameters that changed."""
    thawed = frozen_parameters(model)
    for parameter in thawed:
        parameter.requires_grad = True
    model.train(model.training)
    return thawed


def load_weights(model: Classifier, state: dict[str, torch.Tensor],
                 source: str = "the checkpoint") -> list[str]:
    """Load a state dict, keeping the model's own head where the saved one has another shape (a new
    class count); returns the names skipped. ValueError for another architecture."""
    own = model.state_dict()
    skipped = [
        k for k in state if k.startswith("head.") and k in own and state[k].shape != own[k].shape]
    kept = OrderedDict((k, v) for k, v in state.items() if k not in skipped)
    missing = sorted(set(own) - set(kept) - set(skipped))
    unexpected = sorted(set(kept) - set(own))
    mismatched = sorted(k for k in kept if k in own and kept[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("other shapes", mismatched)) if keys)
        raise ValueError(f"{source} does not fit this model ({detail}); "
                         "was it saved from another MODEL?")
    # Module versions travel in a state dict's _metadata, and MNASNet refuses a state without them;
    # a plain dict (best_model.pth) was saved from this code's models, with this model's versions.
    kept._metadata = getattr(state, "_metadata", None) or own._metadata
    model.load_state_dict(kept, strict=False)
    return skipped


WHITENING_IMAGES = 5000  # training images the fast model's whitening filters are computed from


def get_model(name: str, num_classes: int, freeze: bool = False, weights: str | None = None,
              sample_images: Callable[[int], torch.Tensor] | None = None, *,
              image_size: int | None = None, pretrained: str | None = None) -> Classifier:
    """Build a model by name, optionally from saved or published weights, optionally body-frozen.

    sample_images(n): up to n normalised (N, C, H, W) training images, asked for only by what
    depends on data: the fast model's whitening filters, and a from-scratch torchvision model's
    BatchNorm running statistics (batchnorm_module.calibrate_batchnorm); saved weights override
    both. Without PRETRAINED, a torchvision model's BatchNorm momentum is at least
    batchnorm_module.BATCHNORM_MOMENTUM (quicken_batchnorm). image_size (pixels) matters only to
    models built for one size (vit_*, maxvit_t; None: their pretrained weights' size, else 224).
    pretrained ("default" or a weights name such as "IMAGENET1K_V2") starts a torchvision body from
    published ImageNet weights; weights (a best_model.pth) the whole model from our own."""
    check_name(name)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least two classes, got {num_classes}")
    if pretrained is not None and weights is not None:
        raise ValueError("PRETRAINED and WEIGHTS cannot both be set: WEIGHTS (a best_model.pth) "
                         "holds the whole model already; set PRETRAINED to start from published "
                         "weights, or WEIGHTS, not both")
    published = _find_weights(name, pretrained) if pretrained is not None else None
    if name in MODELS:
        model = MODELS[name](num_classes)
    else:
        model = _torchvision_classifier(name, num_classes, image_size, published)
    whitening = [m for m in model.modules() if isinstance(m, Whitening)]
    if whitening and sample_images is not None:
        images = sample_images(WHITENING_IMAGES)
        for module in whitening:
            module.init_from_data(images.cpu())
    # from scratch (or from our own WEIGHTS, trained so)
    if name in TORCHVISION_MODELS and published is None:
        batchnorm_module.quicken_batchnorm(model)
        if weights is None and sample_images is not None:
            batchnorm_module.calibrate_batchnorm(model, sample_images)
    if weights is not None:
        skipped = load_weights(model, utils.load_state_dict(weights, "WEIGHTS"),
                               f"WEIGHTS {weights}")
        if skipped:
            print(f"WEIGHTS {weights}: new head for {num_classes} classes (the saved "
                  "head had another size)")
    if freeze:
        freeze_body(model)
    return model
