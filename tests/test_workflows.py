"""Workflows beyond one run: torchrun data-parallel training, transfer learning, plots, predictions."""

import os
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data_module
import main
import utils
from conftest import CLASSES, ROOT, run_main, write_fake_cifar

TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "16"]


def torchrun(args, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "main.py"), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------- torchrun


def test_two_processes_train_in_step_and_resume(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=40)
    out = tmp_path / "out"
    args = ["--data-dir", data, "--output-dir", out, *TINY, "--threshold", "0", "--patience", "1",
            "--stop-patience", "10", "--freeze", "true", "--unfreeze-epoch", "2"]
    first = torchrun(args + ["--epochs", "3"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("Epoch |") == 1  # only rank 0 prints the table
    assert "LR decisions and weights agreed on all 2 processes" in first.stdout
    frame = pd.read_csv(out / "training_metrics.csv")
    assert list(frame["epoch"]) == [1, 2, 3]
    assert frame["event"].fillna("").str.contains("LR cut").any()  # decisions to agree on
    assert "unfroze the body" in frame["event"].iloc[1]  # and the unfrozen body trains in step too
    checkpoint = utils.load_torch(str(out / "last_checkpoint.pth"))
    assert len(checkpoint["rng"]) == 2  # each process's random state

    resumed = torchrun(args + ["--epochs", "5", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout and "LR decisions and weights agreed on all 2 processes" in resumed.stdout
    frame = pd.read_csv(out / "training_metrics.csv")
    assert list(frame["epoch"]) == [1, 2, 3, 4, 5]
    assert frame["lr"].iloc[3] == pytest.approx(frame["next_lr"].iloc[2])  # the LR carried over


# ----------------------------------------------------------------------------- plots


def test_training_curves_are_a_png_of_the_expected_size(tmp_path):
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "train_acc": 0.1 * e, "val_acc": 0.09 * e,
                "lr": 0.1 if e < 3 else 0.05, "event": "restored epoch 2, LR cut" if e == 3 else "best"}
               for e in range(1, 6)]
    path = tmp_path / "training_curves.png"
    utils.plot_training_curves(history, str(path))
    assert png_size(path) == (1200, 450)
    Image.open(path).verify()


def test_a_run_draws_its_curves(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    status = main.main(["--data-dir", data, "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "2"])
    assert status == 0 and png_size(tmp_path / "out" / "training_curves.png") == (1200, 450)


# ----------------------------------------------------------------------------- predictions


def test_predict_prints_the_top_three_classes(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", data, "--output-dir", out, *TINY, "--epochs", "1"]) == 0
    images = []
    for i, size in enumerate([(32, 32), (50, 20)]):
        path = tmp_path / f"picture{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    capsys.readouterr()
    assert main.main(["--output-dir", out, "--predict", *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images):
        assert line.startswith(image + ": ")
        ranked = line.split(": ", 1)[1].split(", ")
        assert len(ranked) == 3 and all(entry.split()[0] in CLASSES for entry in ranked)
        percents = [float(entry.split()[1].rstrip("%")) for entry in ranked]
        assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.05


def test_predict_refuses_bad_images_clearly(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", data, "--output-dir", out, *TINY, "--epochs", "1"]) == 0
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    result = run_main(["--output-dir", out, "--predict", tmp_path / "missing.png", text])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing.png does not exist" in result.stderr and "notes.txt is not an image" in result.stderr


def test_predict_without_a_trained_model_says_so(tmp_path, capsys):
    assert main.main(["--output-dir", str(tmp_path), "--predict", "x.png"]) == 2
    assert "train first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- transfer learning


def test_unfreeze_epoch_unfreezes_the_body(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = tmp_path / "out"
    assert main.main(["--data-dir", data, "--output-dir", str(out), *TINY, "--epochs", "1"]) == 0
    status = main.main(["--data-dir", data, "--output-dir", str(tmp_path / "tuned"), *TINY, "--epochs", "3",
                        "--weights", str(out / "best_model.pth"), "--freeze", "true", "--unfreeze-epoch", "1"])
    assert status == 0
    frame = pd.read_csv(tmp_path / "tuned" / "training_metrics.csv")
    assert "unfroze the body" in frame["event"].iloc[0]
    checkpoint = utils.load_torch(str(tmp_path / "tuned" / "last_checkpoint.pth"))
    assert not checkpoint["lra"]["frozen"] and len(checkpoint["optimizer"]["param_groups"]) == 2


def write_cifar_tree(root, images, labels, classes, keep, per_class, split):
    """PNGs of the chosen CIFAR-10 classes, per_class of each, as root/split/<class>/<i>.png."""
    for c in keep:
        folder = os.path.join(root, split, classes[c])
        os.makedirs(folder, exist_ok=True)
        for i, index in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
            Image.fromarray(images[index].numpy()).save(os.path.join(folder, f"{i}.png"))


def test_transfer_beats_training_from_scratch_on_small_data(cifar_dir, tmp_path):
    """Train the CNN briefly on CIFAR-10's first five classes, then fine-tune it, frozen, on a small tree of
    the other five written from the test set; it must beat the same small data trained from scratch."""
    train_images, train_labels, test_images, test_labels, classes = data_module.read_cifar10(cifar_dir, False)
    source, target = tmp_path / "source", tmp_path / "target"
    write_cifar_tree(source, train_images, train_labels, classes, range(5), 400, "train")
    write_cifar_tree(source, test_images, test_labels, classes, range(5), 100, "val")
    write_cifar_tree(target, test_images[:5000], test_labels[:5000], classes, range(5, 10), 40, "train")
    write_cifar_tree(target, test_images[5000:], test_labels[5000:], classes, range(5, 10), 100, "val")
    common = ["--dataset", "folder", "--ask-epoch", "none", "--num-workers", "0", "--batch-size", "64"]
    assert main.main(common + ["--data-dir", str(source), "--output-dir", str(tmp_path / "a"), "--epochs", "3"]) == 0

    budget = ["--data-dir", str(target), "--epochs", "8", "--lr", "0.02", "--stop-patience", "8"]
    assert main.main(common + budget + ["--output-dir", str(tmp_path / "scratch")]) == 0
    assert main.main(common + budget + ["--output-dir", str(tmp_path / "transfer"), "--freeze", "true",
                                        "--weights", str(tmp_path / "a" / "best_model.pth")]) == 0
    scratch = pd.read_csv(tmp_path / "scratch" / "training_metrics.csv")["val_acc"].max()
    transfer = pd.read_csv(tmp_path / "transfer" / "training_metrics.csv")["val_acc"].max()
    print(f"transfer {transfer:.3f} vs scratch {scratch:.3f}")
    assert transfer > scratch + 0.03
