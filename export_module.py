"""Export for inference elsewhere: a trained model as ONNX or .pt2 with its preprocessing and class
names, checked by running the file against PyTorch."""

from __future__ import annotations

import copy
import importlib.util
import json
from typing import Any, Callable, Sequence

import torch
from torch import nn

import files_module
import messages_module


# ------------------------------------------------------------------- export for inference elsewhere

EXPORT_KINDS = ("onnx", "pt2")
EXPORT_FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}  # in OUTPUT_DIR
# the largest relative difference from PyTorch's logits an exported file may show
EXPORT_TOLERANCE = 1e-4
_EXPORT_PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "pt2": ()}


def check_export(kind: str) -> None:
    """ValueError, before any training, when EXPORT names no kind or its packages are missing."""
    if kind not in EXPORT_KINDS:
        raise ValueError(messages_module.not_known("EXPORT", kind, EXPORT_KINDS))
    missing = [name for name in _EXPORT_PACKAGES[kind] if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"EXPORT = {kind!r} needs {', '.join(missing)}: "
                         "pip install -r requirements.txt")


def export(model: nn.Module, path: str, kind: str, *, mean: Sequence[float], std: Sequence[float],
           classes: Sequence[str], example_images: torch.Tensor,
           resize_size: int | None = None) -> float:
    """Write the model in eval mode for inference elsewhere, and check the file by running it. Both
    kinds take normalised float32 NCHW images ((pixels / 255 - mean) / std) at example_images' size,
    any batch, and return logits; both carry normalisation, sizes and class names (ONNX in its
    metadata_props, each value JSON; pt2 in its extra file "metadata.json"). Exported and compared
    as a float32 CPU copy. Returns the largest relative difference of the file's logits at batch
    sizes 1 and 5: max |file - model| / max |model|, the divisor taken over all five images, so an
    image whose logits are all near 0 makes no rounding difference look large."""
    check_export(kind)
    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    images = example_images.detach().cpu().float().contiguous()
    images = images.repeat(-(-5 // len(images)), 1, 1, 1)[:5]  # five real images, repeated if fewer
    metadata = {"input": "normalised float32 NCHW images: (pixels / 255 - mean) / std",
                "output": "logits", "mean": list(mean), "std": list(std), "classes": list(classes),
                "image_size": images.shape[-1], "resize_size": resize_size}
    batch = {0: torch.export.Dim("batch")}  # traced at batch 2: export specialises sizes 0 and 1
    if kind == "onnx":
        run = _export_onnx(model, path, images[:2], batch, metadata)
    else:
        run = _export_pt2(model, path, images[:2], batch, metadata)
    with torch.no_grad():
        expected = model(images)
        scale = expected.abs().max().clamp_min(1e-12)
        return max(float((run(images[:n]).float() - expected[:n]).abs().max() / scale)
                   for n in (1, 5))


def _export_onnx(model: nn.Module, path: str, images: torch.Tensor, batch: dict,
                 metadata: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Write model.onnx (one file, metadata added); return a function running it in onnxruntime."""
    # only export needs these (check_export names them): python main.py runs without them
    import onnx
    import onnxruntime

    program = torch.onnx.export(model, (images,), None, dynamo=True, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=(batch,), verbose=False)
    proto = program.model_proto  # serialised here: export(f=path) puts weights in a second file
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    files_module.atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def _export_pt2(model: nn.Module, path: str, images: torch.Tensor, batch: dict,
                metadata: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Write model.pt2 (torch.export.save, metadata as an extra file); return its loaded module."""
    program = torch.export.export(model, (images,), dynamic_shapes=(batch,))
    files_module.atomic_write(path, lambda f: torch.export.save(
        program, f, extra_files={"metadata.json": json.dumps(metadata)}))
    return torch.export.load(path).module()
