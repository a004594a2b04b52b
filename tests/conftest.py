"""Shared fixtures: no network, tiny synthetic datasets, and the real-data folder from CIFAR10_DIR."""

import os
import pickle
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never download: any connection attempt fails as it would offline."""
    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def cifar_dir():
    """The real CIFAR-10 folder (CIFAR10_DIR holds cifar-10-batches-py/); skips without it."""
    path = os.environ.get("CIFAR10_DIR")
    if not path:
        pytest.skip("CIFAR10_DIR is not set: it names the folder that holds cifar-10-batches-py/ "
                    "(.ci/run sets it to ../shared/data)")
    if not os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        pytest.fail(f"CIFAR10_DIR={path} has no cifar-10-batches-py/")
    return path


def write_fake_cifar(root, per_batch=20, seed=0):
    """A CIFAR-10 python-version folder with per_batch images in each of the six batch files."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return str(root)


@pytest.fixture
def fake_cifar(tmp_path):
    return write_fake_cifar(tmp_path / "data")


def write_image_tree(root, splits=("train", "val"), classes=("cats", "dogs", "owls"), per_class=6, size=(20, 14),
                     seed=0):
    """An ImageFolder tree of small PNGs, each class a different mean colour."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def make_tiny_data(n_train=64, n_val=32, classes=4, size=8, batch_size=16, seed=0, device="cpu"):
    """A Data of random uint8 images whose class sets the mean brightness, so a model can learn it."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % classes
        noise = torch.randint(0, 60, (n, size, size, 3), generator=g)
        images = (labels.view(-1, 1, 1, 1) * (190 // max(classes - 1, 1)) + noise).clamp(0, 255).to(torch.uint8)
        return images, labels

    (train_images, train_labels), (val_images, val_labels) = split(n_train), split(n_val)
    mean, std = data_module.channel_stats(train_images)
    common = dict(mean=mean, std=std, seed=seed)
    train = data_module.ResidentLoader(train_images.to(device), train_labels.to(device), batch_size=batch_size,
                                       train=True, crop_padding=1, **common)
    val = data_module.ResidentLoader(val_images.to(device), val_labels.to(device), batch_size=2 * batch_size,
                                     train=False, **common)
    return data_module.Data(train, val, val, [f"c{i}" for i in range(classes)], mean, std, size, True,
                            val_is_test=False)


def run_main(args, cwd=ROOT, timeout=300, env=None, **kwargs):
    """python main.py ARGS as a subprocess; returns the CompletedProcess (text output)."""
    import subprocess
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)
