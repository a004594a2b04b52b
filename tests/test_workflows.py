"""Workflows beyond one run: torchrun data-parallel training, transfer learning, plots,
predictions."""

import copy
import json
import math
import os
import shlex
import struct
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cifar_module
import main
import optim_module
import report_module
import train_module
import utils
from conftest import (CLASSES, PHOTO_CLASSES, ROOT, run_main, write_fake_cifar, write_image_tree,
                      write_photo_tree)
from test_report_module import laid_out, pixel_rows_columns, read_pixels

TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "16"]


def torchrun(args, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "main.py"), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


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
    assert ("Resuming" in resumed.stdout
            and "LR decisions and weights agreed on all 2 processes" in resumed.stdout)
    frame = pd.read_csv(out / "training_metrics.csv")
    assert list(frame["epoch"]) == [1, 2, 3, 4, 5]
    assert frame["lr"].iloc[3] == pytest.approx(frame["next_lr"].iloc[2])  # the LR carried over


# ----------------------------------------------------------------------------- plots


def test_training_curves_are_the_same_for_the_same_history_and_change_only_where_it_changes(
        tmp_path):
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "train_acc": 0.1 * e,
                "val_acc": 0.09 * e, "lr": 0.1 if e < 3 else 0.05,
                "event": "restored epoch 2, LR cut" if e == 3 else "best"} for e in range(1, 6)]
    path = tmp_path / "training_curves.png"
    report_module.plot_training_curves(history, str(path))
    assert png_size(path) == (1200, 450)
    Image.open(path).verify()
    report_module.plot_training_curves(copy.deepcopy(history), str(tmp_path / "again.png"))
    assert np.array_equal(read_pixels(tmp_path / "again.png"), read_pixels(path))
    panels = {axes.get_title(): axes
              for axes in laid_out(report_module._curves_figure(history)).axes}
    for key, value, title in (("val_acc", 0.3, "Accuracy (%)"), ("train_loss", 0.45, "Loss")):
        changed = copy.deepcopy(history)
        changed[3][key] = value  # epoch 4's, within the range plotted: the axes keep their limits
        report_module.plot_training_curves(changed, str(tmp_path / "changed.png"))
        # more than 8 levels: the antialiasing of the untouched segments moves by a level or two
        rows, columns = np.nonzero(
            np.abs(read_pixels(tmp_path / "changed.png") - read_pixels(path)).max(2) > 8)
        assert len(rows), key
        # only the segments to and from epoch 4 move
        left = panels[title].transData.transform((3, 0))[0]
        right = panels[title].transData.transform((5, 0))[0]
        assert left - 1 <= columns.min() and columns.max() <= right + 1, key


def test_a_run_draws_the_curves_of_its_metrics(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    status = main.main(["--data-dir", data, "--output-dir", str(tmp_path / "out"),
                        *TINY, "--epochs", "2"])
    assert status == 0 and png_size(tmp_path / "out" / "training_curves.png") == (1200, 450)
    history = pd.read_csv(tmp_path / "out" / "training_metrics.csv")
    assert list(history["epoch"]) == [1, 2]
    report_module.plot_training_curves(history.to_dict("records"), str(tmp_path / "from_csv.png"))
    assert np.array_equal(read_pixels(tmp_path / "out" / "training_curves.png"),
                          read_pixels(tmp_path / "from_csv.png"))


# ----------------------------------------------------------------------------- predictions


def test_predict_prints_the_top_three_classes(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", data, "--output-dir", out, *TINY, "--epochs", "1"]) == 0
    images = []
    for i, size in enumerate([(32, 32), (50, 20)]):
        path = tmp_path / f"picture{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3),
                                                          dtype=np.uint8)).save(path)
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
    assert ("missing.png does not exist" in result.stderr
            and "notes.txt is not an image" in result.stderr)


def test_predict_without_a_trained_model_says_so(tmp_path, capsys):
    assert main.main(["--output-dir", str(tmp_path), "--predict", "x.png"]) == 2
    assert "train first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- transfer learning


def test_unfreeze_epoch_unfreezes_the_body(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = tmp_path / "out"
    assert main.main(["--data-dir", data, "--output-dir", str(out), *TINY, "--epochs", "1"]) == 0
    status = main.main(["--data-dir", data, "--output-dir", str(tmp_path / "tuned"), *TINY,
                        "--epochs", "3", "--weights", str(out / "best_model.pth"),
                        "--freeze", "true", "--unfreeze-epoch", "1"])
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
    """Train the CNN briefly on CIFAR-10's first five classes, then fine-tune it, frozen, on a small
    tree of the other five written from the test set; it must beat the same small data trained from
    scratch."""
    train_images, train_labels, test_images, test_labels, classes = cifar_module.read_cifar10(
        cifar_dir, False)
    source, target = tmp_path / "source", tmp_path / "target"
    write_cifar_tree(source, train_images, train_labels, classes, range(5), 400, "train")
    write_cifar_tree(source, test_images, test_labels, classes, range(5), 100, "val")
    write_cifar_tree(target, test_images[:5000], test_labels[:5000], classes, range(5, 10),
                     40, "train")
    write_cifar_tree(target, test_images[5000:], test_labels[5000:], classes, range(5, 10),
                     100, "val")
    # 32-pixel images: CIFAR's pad-crops, not the photo recipe
    common = ["--dataset", "folder", "--ask-epoch", "none", "--num-workers", "0",
              "--batch-size", "64", "--augment", "shift"]
    assert main.main(common + ["--data-dir", str(source), "--output-dir", str(tmp_path / "a"),
                               "--epochs", "3"]) == 0

    budget = ["--data-dir", str(target), "--epochs", "8", "--lr", "0.02", "--stop-patience", "8"]
    assert main.main(common + budget + ["--output-dir", str(tmp_path / "scratch")]) == 0
    assert main.main(common + budget + ["--output-dir", str(tmp_path / "transfer"),
                                        "--freeze", "true",
                                        "--weights", str(tmp_path / "a" / "best_model.pth")]) == 0
    scratch = pd.read_csv(tmp_path / "scratch" / "training_metrics.csv")["val_acc"].max()
    transfer = pd.read_csv(tmp_path / "transfer" / "training_metrics.csv")["val_acc"].max()
    print(f"transfer {transfer:.3f} vs scratch {scratch:.3f}")
    assert transfer > scratch + 0.03


# ----------------------------------------------------------------------------- pretrained backbones


def fake_published_weights(torch_home, name):
    """torchvision's model `name`, seeded, saved where its default weights are cached
    ($TORCH_HOME/hub/ checkpoints/<file of the weights' URL>), as a download would leave them;
    returns the state dict."""
    import torch
    import torchvision
    torch.manual_seed(1)
    state = torchvision.models.get_model(name).state_dict()
    # random BatchNorm statistics, so a frozen body's buffers are checked too
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand_like(value) + 0.5)
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, os.path.basename(url)))
    return state


def test_pretrained_weights_offline_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = tmp_path / "out"
    status = main.main(["--data-dir", data, "--output-dir", str(out),
                        *TINY, "--model", "mobilenet_v3_small", "--pretrained", "default"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err
    assert "mobilenet_v3_small-047dcff4.pth" in lines[0]
    assert os.path.join(str(tmp_path / "torch_home"), "hub", "checkpoints") in lines[0]
    assert not out.exists()


def test_a_frozen_pretrained_backbone_keeps_its_weights_and_predicts(tmp_path, monkeypatch, capsys):
    import torch
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    published = fake_published_weights(str(tmp_path / "torch_home"), "mobilenet_v3_small")
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", data, "--output-dir", out, *TINY, "--epochs", "2", "--model",
                      "mobilenet_v3_small", "--pretrained", "default", "--freeze", "true"]) == 0
    best = torch.load(os.path.join(out, "best_model.pth"), weights_only=True)
    body = {k[len("body."):]: v for k, v in best.items() if k.startswith("body.")
            and "num_batches" not in k}
    # weights and statistics
    assert body and all(torch.equal(value, published[key]) for key, value in body.items())
    info = json.load(open(os.path.join(out, "best_model.json")))
    assert (info["mean"] == pytest.approx([0.485, 0.456, 0.406])
            and info["std"] == pytest.approx([0.229, 0.224, 0.225]))
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(picture)
    capsys.readouterr()
    assert main.main(["--output-dir", out, "--predict", str(picture)]) == 0
    assert capsys.readouterr().out.startswith(f"{picture}: ")


def test_unfreezing_under_onecycle_trains_the_body_at_its_scale_and_resumes(tmp_path):
    """--schedule onecycle --freeze true --unfreeze-epoch 1: the unfrozen body joins OneCycle's
    schedule at
    --body-lr-scale times the head's LR, and the run resumes from its checkpoint."""
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = tmp_path / "out"
    args = ["--data-dir", data, "--output-dir", str(out), *TINY, "--schedule", "onecycle",
            "--freeze", "true", "--unfreeze-epoch", "1", "--body-lr-scale", "0.25"]
    assert main.main(args + ["--epochs", "2"]) == 0
    assert "unfroze the body" in pd.read_csv(out / "training_metrics.csv")["event"].iloc[0]
    checkpoint = utils.load_torch(str(out / "last_checkpoint.pth"))
    groups = checkpoint["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [0.25, 1.0]
    head, body = sorted(groups, key=lambda g: -g["lr_scale"])
    assert body["lr"] == pytest.approx(0.25 * head["lr"])
    # its one-cycle is sized to 2 epochs
    assert main.main(args + ["--epochs", "3", "--resume", "auto"]) == 2
    # resumes, after its last epoch
    assert main.main(args + ["--epochs", "2", "--resume", "auto"]) == 0
    assert list(pd.read_csv(out / "training_metrics.csv")["epoch"]) == [1, 2]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                  "regnet_y_400mf", "squeezenet1_1", "densenet121",
                                  "convnext_tiny", "swin_t"])
def test_a_torchvision_architecture_trains_frozen_then_predicts(name, tmp_path, capsys, one_thread):
    """CNNs, one with LayerNorm (convnext), one transformer (swin): a step at 64 px, best_model.pth,
    --predict."""
    data = write_image_tree(tmp_path / "photos", per_class=4, size=(80, 60))
    out = str(tmp_path / "out")
    assert main.main(["--dataset", "folder", "--data-dir", data, "--output-dir", out,
                      "--model", name, "--image-size", "64", "--freeze", "true", "--epochs", "1",
                      "--batch-size", "6", "--ask-epoch", "none", "--num-workers", "0"]) == 0
    info = json.load(open(os.path.join(out, "best_model.json")))
    assert info["model"] == name and info["image_size"] == 64
    capsys.readouterr()
    picture = os.path.join(data, "val", "owls", "0.png")
    assert main.main(["--output-dir", out, "--predict", picture]) == 0
    ranked = capsys.readouterr().out.strip().split(": ", 1)[1].split(", ")
    assert ([entry.split()[0] for entry in ranked]
            and {entry.split()[0] for entry in ranked} == {"cats", "dogs", "owls"})


@pytest.mark.parametrize("resident", ["yes", "no"])
def test_a_folder_of_real_world_photos_trains_and_predicts(tmp_path, resident, capsys, one_thread):
    """Mixed sizes, modes and formats, EXIF-rotated JPEGs, accented class names, a truncated JPEG, a
    text file: the run trains on every image, says what it skipped, and predicts the odd ones."""
    photos = write_photo_tree(tmp_path / "photos")
    out = str(tmp_path / "out")
    status = main.main(["--dataset", "folder", "--data-dir", photos, "--output-dir", out,
                        "--image-size", "48", "--epochs", "1", "--batch-size", "8",
                        "--ask-epoch", "none", "--num-workers", "0", "--resident", resident])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert ("skipped 2 files that are not images" in captured.err
            and "skipped 1 unreadable" in captured.err)
    info = json.load(open(os.path.join(out, "best_model.json")))
    assert (info["classes"] == PHOTO_CLASSES and info["image_size"] == 48
            and info["resize_size"] == 55)
    odd = [os.path.join(photos, "val", "zèbre", name)
           for name in ("sideways.jpg", "sixteen_bit.png", "cmyk.jpg")]
    assert main.main(["--output-dir", out, "--predict", *odd]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == odd
    for line in lines:  # "path: class p%, class p%, class p%", class names with spaces included
        assert sorted(entry.rsplit(" ", 1)[0]
                      for entry in line.split(": ", 1)[1].split(", ")) == sorted(PHOTO_CLASSES)


# ----------------------------------------------------------------------------- after training


def test_a_run_ends_with_a_test_report_that_agrees_with_the_printed_accuracy_and_with_its_figures(
        tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = tmp_path / "out"
    assert main.main(["--data-dir", data, "--output-dir", str(out), *TINY, "--epochs", "1"]) == 0
    printed = float(next(line for line in capsys.readouterr().out.splitlines()
                         if line.startswith("Test accuracy")).split(": ")[1].split("%")[0])
    frame = pd.read_csv(out / "test_report.csv")
    assert list(frame.columns) == ["class", "precision", "recall", "f1", "support"]
    assert list(frame["class"]) == CLASSES + ["macro avg", "weighted avg"]
    per_class = frame.iloc[:10]
    # the test batch: the confusion matrix counts every test image once
    assert per_class["support"].sum() == 20
    assert (100 * frame.set_index("class").loc["weighted avg", "recall"]
            == pytest.approx(printed, abs=0.005))
    for name in ("confusion_matrix.png", "misclassified.png"):
        Image.open(out / name).verify()
    rows = frame.set_index("class").loc[CLASSES]
    support = rows["support"].to_numpy()
    # recall: each class's share right
    hits = np.round(rows["recall"].fillna(0).to_numpy() * support).astype(int)
    # the report gives the diagonal and the row sums, so a matrix with them has the run's title and
    # layout
    stand_in = np.diag(hits)
    stand_in[np.arange(10), (np.arange(10) + 1) % 10] += support - hits
    axes = laid_out(report_module.confusion_figure(torch.from_numpy(stand_in), CLASSES)).axes[0]
    pixels = read_pixels(out / "confusion_matrix.png")
    diagonal = pixels[pixel_rows_columns(pixels, axes, [(i - 0.33, i - 0.33) for i in range(10)])]
    shares = np.divide(hits, support, out=np.zeros(10), where=support > 0)
    assert np.abs(diagonal - 255 * matplotlib.colormaps["Blues"](shares)[:, :3]).max() <= 2
    # the gallery: the mistakes, as many as it holds
    shown = min(train_module.MISTAKES, support.sum() - hits.sum())
    assert png_size(out / "misclassified.png")[0] == (210 * math.ceil(math.sqrt(shown)) if shown
                                                      else 400)


def test_predict_classifies_a_nested_folder_into_a_table(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", data, "--output-dir", out, *TINY, "--epochs", "1"]) == 0
    folder = tmp_path / "new"
    paths = []
    for i, sub in enumerate(["", "a", "a/b", "c"]):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        path = folder / sub / f"image{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 40, 3),
                                                          dtype=np.uint8)).save(path)
        paths.append(str(path))
    (folder / "a" / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert main.main(["--output-dir", out, "--predict", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 file " in captured.err
    frame = pd.read_csv(os.path.join(out, "predictions.csv"))
    assert list(frame.columns) == ["path", "top1", "p1", "top2", "p2", "top3", "p3"]
    assert sorted(frame["path"]) == sorted(paths) and frame["top1"].isin(CLASSES).all()
    assert (frame["p1"] >= frame["p2"]).all() and (frame["p2"] >= frame["p3"]).all()
    assert len(captured.out.strip().splitlines()) == 4


def test_a_named_file_that_is_not_an_image_exits_2_and_the_good_rows_are_written(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", data, "--output-dir", out, *TINY, "--epochs", "1"]) == 0
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(good)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert main.main(["--output-dir", out, "--predict", str(text), str(good)]) == 2
    assert "notes.txt is not an image" in capsys.readouterr().err
    assert list(pd.read_csv(os.path.join(out, "predictions.csv"))["path"]) == [str(good)]


def test_export_onnx_after_a_folder_run_needs_only_the_output_dir(tmp_path, capsys, monkeypatch):
    pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed (pip install -r requirements.txt)")
    data = write_image_tree(tmp_path / "photos", splits=("train",), per_class=8)
    out = str(tmp_path / "out")
    assert main.main(["--dataset", "folder", "--data-dir", data, "--output-dir", out,
                      "--val-split", "6", "--image-size", "16", "--cache-dir", "none",
                      "--num-workers", "0", "--ask-epoch", "none", "--epochs", "1"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the run's data folder is found from anywhere
    assert main.main(["--output-dir", out, "--export", "onnx"]) == 0
    assert ("Exported" in capsys.readouterr().out
            and os.path.getsize(os.path.join(out, "model.onnx")) > 0)


def test_find_lr_draws_its_plot_suggests_an_lr_and_writes_no_run(tmp_path, capsys):
    # classes of different colours: a curve that falls clearly (random pixels' would not)
    data = str(tmp_path / "data")
    write_image_tree(data, per_class=12)
    out = tmp_path / "out"
    assert main.main(["--dataset", "folder", "--data-dir", data, "--output-dir", str(out),
                      *TINY, "--cache-dir", "none", "--find-lr", "--label-smoothing", "0.1"]) == 0
    text = capsys.readouterr().out
    suggested = float(text.split("Suggested LR: ")[1].split()[0])
    assert 1e-7 <= suggested <= 10
    assert sorted(os.listdir(out)) == [".lock", "lr_finder.png"]
    command = shlex.split(text.split("To train at it: ")[1].splitlines()[0])
    assert command[:2] == ["python", "main.py"] and "--find-lr" not in command
    # the command trains on this data, with these flags, at the LR
    config, _ = main.parse_config(command[2:])
    assert (config["LR"] == float(f"{suggested:.2g}") and config["LABEL_SMOOTHING"] == 0.1
            and config["DATA_DIR"] == data)
    rule = optim_module.LR_RULES[optim_module.LR_RULE][1]  # the line names the rule it applied
    assert f"Suggested LR: {suggested:.2g} ({rule}; plot:" in text


def test_find_lr_says_when_the_curve_is_flat_and_suggests_nothing(tmp_path, capsys, monkeypatch):
    data = write_fake_cifar(tmp_path / "data", per_batch=20)
    torch.manual_seed(0)
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    flat = (2.3 + 0.03 * torch.randn(100)).tolist()  # noise about a loss that never falls
    monkeypatch.setattr(optim_module, "find_lr", lambda *args, **kwargs: (
        lrs, flat, optim_module.suggest_lr(lrs, flat)))
    out = tmp_path / "out"
    assert main.main(["--data-dir", data, "--output-dir", str(out), *TINY, "--find-lr"]) == 0
    text = capsys.readouterr().out
    assert "No clear suggestion: the smoothed loss never fell clearly" in text
    assert "Suggested LR" not in text and "To train at it" not in text and "Keep --lr 0.05" in text
    assert sorted(os.listdir(out)) == [".lock", "lr_finder.png"]  # the plot, to read by eye
