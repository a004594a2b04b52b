"""Models: architectures by name, freezing that really freezes, weights and transfer to a new head."""

import pytest
import torch
from torch import nn

import model_module
import train_module
import utils
from conftest import make_tiny_data


@pytest.mark.parametrize("name", list(model_module.MODELS))
def test_each_architecture_classifies_32x32_images(name):
    torch.manual_seed(0)
    model = model_module.get_model(name, 7, sample_images=lambda: torch.randn(64, 3, 32, 32))
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="MODEL = 'vgg99' is not known; choose one of cnn, resnet18, fast"):
        model_module.get_model("vgg99", 10)


def test_the_fast_model_whitens_from_data():
    torch.manual_seed(0)
    images = torch.randn(256, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    model = model_module.get_model("fast", 10, sample_images=lambda: images)
    whitening = model.body[0]
    out = nn.functional.conv2d(images, whitening.weight[:12])  # the + half of the filters
    flat = out.transpose(0, 1).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)  # whitened: unit, uncorrelated
    assert not whitening.weight.requires_grad


def test_freeze_leaves_only_the_head_trainable_and_batchnorm_in_eval():
    model = model_module.get_model("cnn", 10, freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head." + n for n, _ in model.head.named_parameters()}
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.head.training
    optimizer = train_module.make_optimizer(model, 0.1)
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert given == {id(p) for p in model.head.parameters()}


def test_an_epoch_with_freeze_changes_only_the_head(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    model = model_module.get_model("cnn", 4, freeze=True)
    body_before = {k: v.clone() for k, v in model.body.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    optimizer = train_module.make_optimizer(model, 0.1)
    train_module.train_one_epoch(model, data.train, optimizer, nn.CrossEntropyLoss())
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
    utils.save_torch(model_module.get_model("resnet18", 10).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this model.*another MODEL"):
        model_module.get_model("cnn", 10, weights=path)
