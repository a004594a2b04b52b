"""Models: architectures by name, freezing that really freezes, weights and transfer to a new
head."""

import os

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm_module
import model_module
import optim_module
import step_module
import train_module
import utils
from conftest import configs, make_tiny_data


@pytest.mark.parametrize("name", list(model_module.MODELS))
def test_each_architecture_classifies_32x32_images(name):
    torch.manual_seed(0)
    model = model_module.get_model(name, 7,
                                   sample_images=lambda n: torch.randn(min(n, 64), 3, 32, 32))
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_an_unknown_name_offers_the_closest_names():
    with pytest.raises(ValueError,
                       match="MODEL = 'resnet5O' is not known; the closest are resnet50, "):
        model_module.get_model("resnet5O", 10)


def test_the_fast_model_whitens_from_data():
    torch.manual_seed(0)
    images = torch.randn(256, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    model = model_module.get_model("fast", 10, sample_images=lambda n: images[:n])
    whitening = model.body[0]
    out = nn.functional.conv2d(images, whitening.weight[:12])  # the + half of the filters
    flat = out.transpose(0, 1).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)  # whitened: unit, uncorrelated
    assert not whitening.weight.requires_grad


def _fast_with_adaptive_pool(seed):
    """The fast model as it was built before it pooled with max_pool2d: AdaptiveMaxPool2d(1) after
    the last group."""
    torch.manual_seed(seed)
    model = model_module.get_model("fast", 10,
                                   sample_images=lambda n: torch.randn(min(n, 256), 3, 32, 32))
    model.body[-2] = nn.AdaptiveMaxPool2d(1)
    return model


class _RecordedOps(TorchDispatchMode):
    """The names of the aten operations run inside it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_the_fast_model_pools_with_max_pool2d_not_the_adaptive_kernel():
    model = model_module.get_model("fast", 10)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with _RecordedOps() as ops:
        model(images).sum().backward()
    pools = sorted(name for name in ops.names if "pool" in name)
    assert pools == ["aten.max_pool2d_with_indices", "aten.max_pool2d_with_indices_backward"]


# last maps 3x3, 4x4 and 3x5
@pytest.mark.parametrize("height, width", [(32, 32), (40, 40), (32, 48)])
def test_the_fast_model_gives_the_logits_and_gradients_of_its_adaptive_pooling_form(height, width):
    old = _fast_with_adaptive_pool(seed=1)
    torch.manual_seed(0)
    model = model_module.get_model("fast", 10,
                                   sample_images=lambda n: torch.randn(min(n, 256), 3, 32, 32))
    # strict: the pools hold no state, so the keys are the same
    old.load_state_dict(model.state_dict())
    images = torch.randn(8, 3, height, width).contiguous(memory_format=torch.channels_last)
    for net in (model, old):  # training mode: batch statistics, and the gradients through the pool
        net(images).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), old.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.allclose(p.grad, q.grad, rtol=0, atol=1e-6), name
    with torch.no_grad():
        logits, expected = model.eval()(images), old.eval()(images)
    # logits, not zeros that agree trivially
    assert logits.shape == (8, 10) and logits.abs().max() > 1e-3
    assert torch.allclose(logits, expected, rtol=0, atol=1e-6)


def test_a_fast_model_saved_with_adaptive_pooling_loads_and_gives_its_logits(tmp_path):
    old = _fast_with_adaptive_pool(seed=2)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        old.train()(torch.randn(64, 3, 32, 32))
    utils.save_torch(old.state_dict(), str(tmp_path / "best_model.pth"))
    model = model_module.get_model("fast", 10, weights=str(tmp_path / "best_model.pth"))
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), old.eval()(images), rtol=0, atol=1e-6)


def test_freeze_leaves_only_the_head_trainable_and_batchnorm_in_eval():
    model = model_module.get_model("cnn", 10, freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head." + n for n, _ in model.head.named_parameters()}
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.head.training
    # the optimizer holds the frozen body too, for unfreezing later
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]
               if p.requires_grad}
    assert trained == {id(p) for p in model.head.parameters()}


def test_an_epoch_with_freeze_changes_only_the_head(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4, freeze=True)
    body_before = {k: v.clone() for k, v in model.body.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    optimizer = optim_module.make_optimizer(model, configs(LR=0.1).optim)
    train_module.train_one_epoch(step_module.TrainStep(model, optimizer, nn.CrossEntropyLoss()),
                                 data.train)
    for key, value in model.body.state_dict().items():  # parameters and BatchNorm buffers alike
        assert torch.equal(value, body_before[key]), key
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())


def test_unfreeze_makes_the_body_trainable_but_keeps_fixed_layers_fixed():
    model = model_module.get_model("fast", 10, freeze=True)
    thawed = model_module.unfreeze_body(model)
    assert thawed and all(p.requires_grad for p in thawed)
    assert not model.body[0].weight.requires_grad  # the whitening filters never train
    assert not model_module.frozen_parameters(model)


def test_transfer_a_ten_class_model_into_five_classes(tmp_path):
    torch.manual_seed(0)
    source = model_module.get_model("cnn", 10)
    path = str(tmp_path / "best_model.pth")
    utils.save_torch(source.state_dict(), path)
    torch.manual_seed(1)
    target = model_module.get_model("cnn", 5, weights=path, freeze=True)
    for key, value in source.body.state_dict().items():
        assert torch.equal(target.body.state_dict()[key], value), key
    assert target.head[-1].out_features == 5
    assert target(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_weights_of_the_same_shape_load_fully(tmp_path):
    source = model_module.get_model("cnn", 10)
    path = str(tmp_path / "w.pth")
    utils.save_torch(source.state_dict(), path)
    target = model_module.get_model("cnn", 10, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_weights_from_another_architecture_are_refused(tmp_path):
    path = str(tmp_path / "resnet.pth")
    utils.save_torch(model_module.get_model("resnet18_cifar", 10).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this model.*another MODEL"):
        model_module.get_model("cnn", 10, weights=path)


# --------------------------------------------------------------------- torchvision's models by name


def test_every_torchvision_classifier_and_our_own_models_are_names():
    names = model_module.model_names()
    assert names[:3] == ["cnn", "resnet18_cifar", "fast"]
    assert sorted(names[3:]) == sorted(torchvision.models.list_models(module=torchvision.models))
    assert len(names) == len(set(names))
    assert {"vit_b_16", "swin_t", "convnext_tiny", "squeezenet1_0", "regnet_y_400mf"} <= set(names)


# CNNs of several families, squeezenet's conv head, googlenet's side heads, LayerNorm (convnext),
# two transformers (swin; ViT with its position embedding sized for 64 pixels), and MNASNet, which
# checks module versions when loading a plain dict
ARCHITECTURES = [("resnet18", None), ("mobilenet_v3_small", None), ("efficientnet_b0", None),
                 ("regnet_y_400mf", None), ("squeezenet1_0", None), ("googlenet", None),
                 ("mnasnet0_5", None), ("convnext_tiny", None), ("swin_t", None), ("vit_b_16", 64)]


def _copy(state):
    return {key: value.clone() for key, value in state.items()}


def _calibrate_batchnorm(model, images):
    """Give BatchNorm the statistics of these images, as a trained body has: a fresh one's (mean 0,
    variance 1) shrink a deep random network's features towards zero, and into slow denormal
    floats."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(images)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum


def _train_steps(model, steps=1, classes=3):
    """Real training steps on random 64-pixel images: model.train(), SGD on what requires grad."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                momentum=0.9)
    for _ in range(steps):
        images, targets = torch.randn(4, 3, 64, 64), torch.arange(4) % classes
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("name, image_size", ARCHITECTURES)
def test_a_frozen_torchvision_model_trains_only_its_head_and_reloads_from_a_file(
        name, image_size, tmp_path, one_thread):
    torch.manual_seed(0)
    model = model_module.get_model(name, 3, image_size=image_size)
    _calibrate_batchnorm(model, torch.randn(8, 3, 64, 64))
    model_module.freeze_body(model)
    assert {id(p) for p in model.parameters()
            if p.requires_grad} == {id(p) for p in model.head.parameters()}
    body, head = _copy(model.body.state_dict()), _copy(model.head.state_dict())
    _train_steps(model)
    for key, value in model.body.state_dict().items():  # parameters and BatchNorm statistics alike
        assert torch.equal(value, body[key]), key
    for key, value in model.head.state_dict().items():
        assert not torch.equal(value, head[key]), key
    thawed = model_module.unfreeze_body(model)
    assert {id(p) for p in thawed} == {id(p) for p in model.body.parameters()} and thawed
    assert all(p.requires_grad for p in model.parameters())

    path = str(tmp_path / "best_model.pth")
    utils.save_torch(dict(model.state_dict()), path)  # a plain dict, as best_model.pth holds
    torch.manual_seed(1)
    reloaded = model_module.get_model(name, 3, weights=path, image_size=image_size)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(images)
        assert expected.shape == (2, 3)
        assert torch.equal(reloaded.eval()(images), expected)


def test_a_torchvision_model_from_scratch_tells_images_apart_in_eval_mode(one_thread):
    # torchvision's init leaves a fresh MobileNetV3's depthwise layers with variances of 1e-3 to
    # 1e-8: BatchNorm's running statistics at PyTorch's 0 and 1 shrank its eval-mode features to
    # ~1e-10, every image got the same logits, and a small folder (one step per epoch, momentum
    # 0.01) validated at exactly 1/3, loss ln 3
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    model = model_module.get_model("mobilenet_v3_small", 3, sample_images=lambda n: images[:n])
    assert all(m.momentum >= batchnorm_module.BATCHNORM_MOMENTUM for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        spread = {mode: model.train(mode == "train").body(images).std(0).mean().item() for mode in (
            "eval", "train")}
    # eval mode sees the network that training sees
    assert 0.5 < spread["eval"] / spread["train"] < 2


def test_batchnorm_calibration_changes_only_the_running_statistics():
    torch.manual_seed(0)
    plain = model_module.get_model("mobilenet_v3_small", 3)
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    calibrated = model_module.get_model("mobilenet_v3_small", 3,
                                        sample_images=lambda n: torch.randn(n, 3, 32, 32))
    # the run's shuffling and augmentation stay as they were
    assert torch.equal(torch.get_rng_state(), after_plain)
    buffers = dict(calibrated.named_buffers())
    for key, value in plain.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(value, buffers[key]), key
        else:
            # weights, num_batches_tracked: 0
            assert torch.equal(value, calibrated.state_dict()[key]), key
    assert all(m.momentum == 0.1 for m in calibrated.modules() if isinstance(m, nn.BatchNorm2d))
    assert calibrated.training


def test_mobilenet_v3_small_learns_in_two_steps_of_one_batch_each(one_thread):
    # the user's folder: fewer images than BATCH_SIZE, so each epoch is one step; LR 0.05, as
    # main.py's default
    torch.manual_seed(0)
    data = make_tiny_data(n_train=60, n_val=30, classes=3, size=32, batch_size=64)
    assert len(data.train) == 1
    model = model_module.get_model("mobilenet_v3_small", 3, sample_images=data.train.first_images)
    step = step_module.TrainStep(model, optim_module.make_optimizer(model, configs(LR=0.05).optim),
                                 nn.CrossEntropyLoss())
    for _ in range(2):
        model.train()
        for images, targets in data.train:
            step(images, targets)
    result = train_module.evaluate(model, data.val)
    assert result["acc"] > 0.5  # 1/3 and loss ln 3 before BatchNorm's statistics were calibrated


def test_models_built_for_one_size_refuse_a_size_they_cannot_take():
    with pytest.raises(ValueError, match="MODEL = 'vit_b_16' cannot be built for IMAGE_SIZE = 60"):
        # not a multiple of its 16-pixel patches
        model_module.get_model("vit_b_16", 3, image_size=60)
    with pytest.raises(ValueError, match="MODEL = 'maxvit_t' cannot be built for IMAGE_SIZE = 64"):
        model_module.get_model("maxvit_t", 3, image_size=64)
    with pytest.raises(ValueError, match="IMAGENET1K_V1 weights are for 224-pixel images"):
        model_module.get_model("vit_b_16", 3, image_size=64, pretrained="IMAGENET1K_V1")


# --------------------------------------------------------------------------- published weights


def _publish(name, state, torch_home):
    """Put a state dict where torch's hub cache keeps the published file of `name`'s default
    weights."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / os.path.basename(url))


def test_pretrained_weights_fill_the_body_and_stay_put_while_the_head_trains(
        tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    published = torchvision.models.mobilenet_v3_small()
    # statistics unlike a fresh model's, so that equal ones can only come from the file
    with torch.no_grad():
        for module in published.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    state = published.state_dict()
    _publish("mobilenet_v3_small", state, tmp_path)
    # all but the last Linear
    expected = {k: v for k, v in state.items() if not k.startswith("classifier.3.")}

    torch.manual_seed(1)
    model = model_module.get_model("mobilenet_v3_small", 5, pretrained="default", freeze=True)
    assert model.head.weight.shape == (5, 1024)
    head = _copy(model.head.state_dict())
    _train_steps(model, steps=2, classes=5)
    body = model.body.state_dict()
    assert body.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(body[key], value), key
    for key, value in model.head.state_dict().items():
        assert not torch.equal(value, head[key]), key


def test_pretrained_weights_offline_and_not_cached_name_the_file_and_the_folder(
        tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError) as error:
        model_module.get_model("resnet18", 5, pretrained="default")
    message, folder = str(error.value), os.path.join(str(tmp_path), "hub", "checkpoints")
    assert message.startswith(f"PRETRAINED weights resnet18-f37072fd.pth are not in {folder} and "
                              "could not be downloaded (")
    assert message.endswith(
        "; download https://download.pytorch.org/models/resnet18-f37072fd.pth into that folder")
    assert "\n" not in message
    assert [name for _, _, names in os.walk(tmp_path) for name in names] == []


@pytest.mark.parametrize(
    "content, fragment", [(b"not a checkpoint", "PRETRAINED weights .*resnet18-f37072fd.pth"),
                          ("squeezenet", "resnet18-f37072fd.pth does not fit ResNet")])
def test_a_bad_cached_file_is_refused_cleanly(tmp_path, monkeypatch, content, fragment):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if content == "squeezenet":
        _publish("resnet18", torchvision.models.squeezenet1_1().state_dict(), tmp_path)
    else:
        _publish("resnet18", {}, tmp_path)
        (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(content)
    with pytest.raises(ValueError, match=fragment):
        model_module.get_model("resnet18", 5, pretrained="default")


def test_pretrained_names_that_do_not_exist_list_the_allowed_ones():
    with pytest.raises(ValueError,
                       match="PRETRAINED = 'IMAGENET1K_V3' is not known; choose one of 'default', "
                             "'IMAGENET1K_V1', 'IMAGENET1K_V2'"):
        model_module.get_model("resnet50", 5, pretrained="IMAGENET1K_V3")
    for name in ("cnn", "fast", "resnet18_cifar"):
        with pytest.raises(ValueError,
                           match=f"choose one of None .{name} has no published weights"):
            model_module.get_model(name, 5, pretrained="default")


def test_pretrained_and_saved_weights_cannot_both_be_given(tmp_path):
    with pytest.raises(ValueError, match="PRETRAINED and WEIGHTS cannot both be set"):
        model_module.get_model("resnet18", 5, pretrained="default",
                               weights=str(tmp_path / "best_model.pth"))


def test_preprocessing_is_the_published_weights_own():
    # torchvision's documented values
    imagenet = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert model_module.preprocessing("resnet50", "IMAGENET1K_V2") == dict(
        resize_size=232, crop_size=224, interpolation="bilinear", **imagenet)
    assert model_module.preprocessing("resnet50", "IMAGENET1K_V1")["resize_size"] == 256
    assert model_module.preprocessing("efficientnet_b0", "default") == dict(
        resize_size=256, crop_size=224, interpolation="bicubic", **imagenet)
    assert model_module.preprocessing("resnet18", None) is None and model_module.preprocessing(
        "cnn", None) is None
