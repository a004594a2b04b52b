"""Export: ONNX and torch.export files that give the model's logits and carry its preprocessing,
the packages each kind needs, and a pipeline that loads without them."""

import importlib.util
import json
import os
import sys

import pytest
import torch

import export_module
import model_module
from conftest import ROOT
from test_model_module import _calibrate_batchnorm


# --------------------------------------------------------------------------- export


def _export_model(name, image_size):
    """A model with trained-looking BatchNorm statistics, in training mode (export must switch it to
    eval)."""
    torch.manual_seed(0)
    model = model_module.get_model(name, 3, image_size=image_size)
    _calibrate_batchnorm(model, torch.randn(8, 3, image_size, image_size))
    return model.train(), torch.randn(9, 3, image_size, image_size)


def _relative(logits, expected, scale):
    """max |logits - expected| / scale (the largest logit over all the images, as export measures
    it)."""
    return float((torch.as_tensor(logits) - expected).abs().max() / scale)


EXPORT_INFO = dict(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], classes=["cat", "dog", "owl"])


@pytest.mark.parametrize("name, image_size", [("cnn", 32)])
def test_onnx_export_gives_the_models_logits_at_any_batch_size_and_carries_the_preprocessing(
        name, image_size, tmp_path, one_thread):
    onnxruntime = pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed (requirements.txt has it)")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (requirements.txt has it)")
    pytest.importorskip("onnxscript",
                        reason="onnxscript is not installed (requirements.txt has it)")
    model, images = _export_model(name, image_size)
    path = str(tmp_path / "model.onnx")
    difference = export_module.export(model, path, "onnx", example_images=images[:5], **EXPORT_INFO)
    assert difference <= export_module.EXPORT_TOLERANCE
    assert model.training  # the caller's model is left as it was
    # by hand, on other images
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.eval()(images)
        for batch in (1, 5, 4):
            logits = session.run(None, {"images": images[-batch:].numpy()})[0]
            assert logits.shape == (batch, 3)
            assert _relative(logits, expected[-batch:],
                             expected.abs().max()) <= export_module.EXPORT_TOLERANCE
    proto = onnx.load(path)
    metadata = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert {k: metadata[k] for k in EXPORT_INFO} == EXPORT_INFO and metadata[
        "image_size"] == image_size
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:] == [
        3, image_size, image_size]
    assert os.listdir(tmp_path) == ["model.onnx"]  # one file: the weights are inside it


@pytest.mark.parametrize("name, image_size", [("cnn", 32), ("mobilenet_v3_small", 64)])
def test_pt2_export_loads_back_with_the_same_logits_and_the_preprocessing(
        name, image_size, tmp_path, one_thread):
    model, images = _export_model(name, image_size)
    path = str(tmp_path / "model.pt2")
    difference = export_module.export(model, path, "pt2", example_images=images[:5], resize_size=73,
                                      **EXPORT_INFO)
    assert difference <= export_module.EXPORT_TOLERANCE
    extra = {"metadata.json": ""}
    loaded = torch.export.load(path, extra_files=extra).module()
    with torch.no_grad():
        expected = model.eval()(images)
        for batch in (1, 5, 4):
            assert _relative(loaded(images[-batch:]), expected[-batch:],
                             expected.abs().max()) <= export_module.EXPORT_TOLERANCE
    metadata = json.loads(extra["metadata.json"])
    assert {k: metadata[k] for k in EXPORT_INFO} == EXPORT_INFO
    assert (metadata["image_size"], metadata["resize_size"]) == (image_size, 73)


def test_export_refuses_an_unknown_kind_before_writing():
    with pytest.raises(ValueError,
                       match="EXPORT = 'torchscript' is not known; choose one of 'onnx', 'pt2'"):
        export_module.check_export("torchscript")


def test_export_names_the_packages_it_lacks(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ValueError,
                       match="EXPORT = 'onnx' needs onnxruntime: pip install -r requirements.txt"):
        export_module.check_export("onnx")


@pytest.mark.parametrize("module", ["model_module", "report_module", "train_module", "main"])
def test_the_pipeline_loads_without_the_export_and_tracker_packages(module, monkeypatch):
    for name in ("onnx", "onnxruntime", "onnxscript", "tensorboard", "torch.utils.tensorboard",
                 "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now raises ImportError
    spec = importlib.util.spec_from_file_location(f"fresh_{module}",
                                                  os.path.join(ROOT, f"{module}.py"))
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses look their module up there
    spec.loader.exec_module(fresh)  # a fresh copy, run from the top
