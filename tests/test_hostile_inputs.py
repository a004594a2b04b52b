"""Photo folders off the happy path: names that are not UTF-8, FIFOs, sockets and devices, dangling
links, link loops, links to folders elsewhere, images over Pillow's pixel limit, paths too long to
open, and an OUTPUT_DIR inside the tree. Each is read the same with and without the decoded-image
cache, and every file skipped is counted with an example."""

import contextlib
import json
import os
import signal
import socket

import pandas as pd
import pytest
import torch
from PIL import Image

import data_module
import folder_module
import main
import messages_module
import walk_module
from conftest import configs, write_image_tree
from data_module import DataError

LATIN1 = b"caf\xe9"  # "café" in Latin-1, not UTF-8: os.fsdecode keeps its \xe9 as a surrogate


@contextlib.contextmanager
def within(seconds):
    """Fail instead of hanging (a FIFO opened for reading waits for a writer for ever)."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tree(tmp_path, per_class=4):
    """train/ and val/ with the classes cats and dogs, per_class small PNGs each (each image its own
    noise)."""
    return write_image_tree(tmp_path / "data", splits=("train", "val"), classes=("cats", "dogs"),
                            per_class=per_class)


def folder_config(root):
    return configs(DATASET="folder", DATA_DIR=str(root)).data


def png(path, size=(20, 14), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path, "PNG")


def read(root, cache_dir):
    """get_data's images in memory: {split: (images, labels)}, and the classes."""
    config = configs(DATASET="folder", DATA_DIR=str(root), BATCH_SIZE=4, IMAGE_SIZE=8,
                     RESIDENT="yes", NUM_WORKERS=0, CACHE_DIR=cache_dir and str(cache_dir)).data
    data = data_module.get_data(config)
    return {name: (loader.images, loader.labels) for name, loader in
            (("train", data.train), ("val", data.val))}, data.classes


def read_every_way(root, tmp_path, capsys):
    """The tree read without a cache, then building one, then opening it: the same images (so the
    same files, in the same order), labels, classes and warnings each time. Returns them, and the
    warnings' lines."""
    results = []
    for cache_dir in (None, tmp_path / "cache", tmp_path / "cache"):
        with within(60):
            splits, classes = read(root, cache_dir)
        results.append((splits, classes, capsys.readouterr().err))
    splits, classes, warnings = results[0]
    for other, other_classes, other_warnings in results[1:]:
        assert other_classes == classes and other_warnings == warnings
        for name, (images, labels) in splits.items():
            assert torch.equal(other[name][0], images) and torch.equal(other[name][1], labels)
    return splits, classes, warnings.splitlines()


def counts(splits):
    """Each split's images of each class."""
    return {name: torch.bincount(labels, minlength=2).tolist()
            for name, (_, labels) in splits.items()}


def warning(lines, start):
    """The one warning line that starts with `warning: skipped ` + start."""
    found = [line for line in lines if line.startswith("warning: skipped " + start)]
    assert len(found) == 1, lines
    return found[0]


# ------------------------------------------------------------------------- names that are not UTF-8


def test_names_not_in_utf8_are_read_alike_with_or_without_a_cache_and_shown_as_bytes(
        tmp_path, capsys):
    root = tree(tmp_path)
    raw = os.fsencode(root)
    png(os.path.join(raw, b"train", b"cats", LATIN1 + b".png"))
    for split in (b"train", b"val"):
        os.rename(os.path.join(raw, split, b"dogs"), os.path.join(raw, split, LATIN1))
    splits, classes, lines = read_every_way(root, tmp_path, capsys)
    assert classes == ["caf\\xe9", "cats"]  # sorted by the real names: "caf\udce9" before "cats"
    assert counts(splits) == {"train": [4, 5], "val": [4, 4]}
    assert not any("skipped" in line for line in lines)
    index = [name for name in os.listdir(tmp_path / "cache")  # the cache's index, read back
             if name.endswith(".json") and not name.endswith(".statistics.json")]
    assert len(index) == 1
    assert json.loads((tmp_path / "cache" / index[0]).read_text())["count"] == 17


def test_utils_printable_shows_the_bytes_of_a_name_that_is_not_utf8():
    assert messages_module.printable(os.fsdecode(b"caf\xe9 \xff.png")) == "caf\\xe9 \\xff.png"
    assert messages_module.printable("zèbre.png") == "zèbre.png"  # UTF-8 names stay as they are
    assert messages_module.printable(messages_module.printable(os.fsdecode(b"\xe9"))) == "\\xe9"
    assert messages_module.printable("\ud800") == "\\ud800"  # a lone surrogate no byte stands for


def test_a_run_on_names_not_in_utf8_writes_its_report_and_predicts_them(
        tmp_path, capsys, one_thread):
    """A class folder, a file, and the folder that holds the data and the outputs named in Latin-1:
    the run trains, its report, figures and best_model.json name the class as its bytes, what it
    prints takes no stdout that refuses them (capsys's), and --predict (on the file, and on a folder
    holding it, a FIFO and a dangling link) writes predictions.csv with the path shown alike."""
    base = tmp_path / os.fsdecode(LATIN1)
    root = tree(base)
    raw = os.fsencode(root)
    for split in (b"train", b"val"):
        os.rename(os.path.join(raw, split, b"dogs"), os.path.join(raw, split, LATIN1))
    picture = os.fsdecode(os.path.join(raw, b"val", LATIN1, LATIN1 + b".png"))
    png(picture, colour=(40, 200, 90))
    out = str(base / "out")
    assert main.main(["--dataset", "folder", "--data-dir", root, "--output-dir", out,
                      "--epochs", "1", "--image-size", "16", "--ask-epoch", "none",
                      "--num-workers", "0", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "caf\\xe9:" in printed  # the recall of each class
    assert f"outputs in {messages_module.printable(out)}" in printed
    report = pd.read_csv(os.path.join(out, "test_report.csv"))
    assert list(report["class"])[:2] == ["caf\\xe9", "cats"]
    assert json.load(open(os.path.join(out, "best_model.json")))["classes"] == ["caf\\xe9", "cats"]
    for name in ("confusion_matrix.png", "misclassified.png"):
        Image.open(os.path.join(out, name)).verify()

    folder = tmp_path / "new"
    folder.mkdir()
    png(os.path.join(os.fsencode(str(folder)), LATIN1 + b".png"))
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("nowhere.png", folder / "gone.png")
    with within(60):
        assert main.main(["--output-dir", out, "--predict", picture, str(folder)]) == 0
    captured = capsys.readouterr()
    shown = [messages_module.printable(picture), os.path.join(str(folder), "caf\\xe9.png")]
    assert [line.split(": ")[0] for line in captured.out.splitlines()] == shown
    assert "skipped 1 file that is not a regular file" in captured.err
    assert "skipped 1 link whose target is missing" in captured.err
    predictions = pd.read_csv(os.path.join(out, "predictions.csv"))
    assert list(predictions["path"]) == shown and set(predictions["top1"]) <= {"caf\\xe9", "cats"}

    os.symlink(".", folder / "loop")  # a folder given that holds a loop: one line, exit 2
    assert main.main(["--output-dir", out, "--predict", str(folder)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder / 'loop'} is a link to")


# ------------------------------------------------------------------------- not regular files


def test_fifos_sockets_and_devices_are_skipped_unopened_with_a_count(tmp_path, capsys, monkeypatch):
    root = tree(tmp_path)
    cats = os.path.join(root, "train", "cats")
    os.mkfifo(os.path.join(cats, "pipe.jpg"))
    monkeypatch.chdir(cats)  # a socket's path is limited to about 100 bytes: bind it by its name
    server = socket.socket(socket.AF_UNIX)
    server.bind("socket.png")
    monkeypatch.chdir(tmp_path)
    os.symlink(os.devnull, os.path.join(root, "val", "dogs", "null.jpg"))  # a device, by a link
    try:
        splits, _, lines = read_every_way(root, tmp_path, capsys)
    finally:
        server.close()
    assert counts(splits) == {"train": [4, 4], "val": [4, 4]}
    line = warning(lines, "3 files that are not regular files (FIFOs, sockets or devices), e.g. ")
    assert line.endswith(os.path.join(cats, "pipe.jpg"))


def test_dangling_links_and_loops_of_file_links_are_skipped_alike_with_or_without_a_cache(
        tmp_path, capsys):
    root = tree(tmp_path)
    cats = os.path.join(root, "train", "cats")
    os.symlink("nowhere.png", os.path.join(cats, "gone.png"))
    os.symlink("b.png", os.path.join(cats, "a.png"))  # a -> b -> a: no file at the end
    os.symlink("a.png", os.path.join(cats, "b.png"))
    os.symlink("missing", os.path.join(root, "train", "birds"))  # a class folder that leads nowhere
    os.symlink("0.png", os.path.join(cats, "again.png"))  # a link to a file: read, as the file is
    splits, classes, lines = read_every_way(root, tmp_path, capsys)
    assert classes == ["cats", "dogs"] and counts(splits) == {"train": [5, 4], "val": [4, 4]}
    line = warning(lines, "4 links whose targets are missing or unreachable, e.g. ")
    assert line.endswith(os.path.join(root, "train", "birds"))


def test_every_kind_of_file_skipped_is_counted_with_an_example(tmp_path, capsys):
    root = tree(tmp_path)
    (tmp_path / "data" / "train" / "cats" / "notes.txt").write_text("not a picture")
    (tmp_path / "data" / "train" / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "data" / "train" / "labels.csv").write_text("outside the class folders")
    _, _, lines = read_every_way(root, tmp_path, capsys)
    assert warning(lines, "1 file that is not an image (extension .txt): ").endswith("notes.txt")
    assert warning(lines, "1 unreadable image file: ").endswith("broken.png")
    outside = warning(lines, "1 file outside the class folders: ")
    assert outside.endswith(os.path.join("train", "labels.csv"))


# ------------------------------------------------------------------------- links to folders


@pytest.mark.parametrize("links", [
    {"train/cats/loop": "."},  # itself
    {"train/cats/up": ".."},  # its parent: every dog would be a cat
    {"train/cats/top": "../../.."},  # above the data folder
    {"train/cats/one": ".", "train/cats/two": "."},  # two: the walk doubled at each level
    {"train/cats/sub1/to2": "../sub2", "train/cats/sub2/to1": "../sub1"},  # two, to each other
    {"train/cats/x": "../dogs", "train/dogs/y": "../cats"},  # two class folders, each to the other
])
def test_a_link_to_a_folder_on_its_own_path_is_refused_in_one_line_naming_it(tmp_path, links):
    root = tree(tmp_path)
    for sub in ("sub1", "sub2"):
        os.makedirs(os.path.join(root, "train", "cats", sub))
    for link, target in links.items():
        os.symlink(target, os.path.join(root, link))
    for cache_dir in (None, tmp_path / "cache"):
        with within(30), pytest.raises(DataError) as error:
            read(root, cache_dir)
        message = str(error.value)
        assert "\n" not in message and "is a link to" in message and "remove the link" in message
        named = message.split(" is a link to ")[0]
        assert os.path.islink(named)
        assert os.path.basename(named) in {os.path.basename(link) for link in links}
    assert not os.path.exists(tmp_path / "cache")  # refused before anything was decoded


def test_a_loop_refused_exits_2_with_one_line(tmp_path, capsys):
    root = tree(tmp_path)
    os.symlink("..", os.path.join(root, "train", "cats", "up"))
    out = tmp_path / "out"
    with within(60):
        status = main.main(["--dataset", "folder", "--data-dir", root, "--output-dir", str(out)])
    assert status == 2 and not out.exists()
    link, train = os.path.join(root, "train", "cats", "up"), os.path.join(root, "train")
    assert capsys.readouterr().err.splitlines() == [
        f"error: {link} is a link to {train}, a folder on its own path, so a walk through it would "
        f"never end; remove the link, or point it at a folder outside that path"]


def test_links_into_the_tree_add_nothing_twice_and_are_counted(tmp_path, capsys):
    """A link to another class folder, one from val/ to train/'s folder of the same class, and one
    to a subfolder read already: each real folder is read once, for its own class and split."""
    plain = tree(tmp_path / "plain")
    expected, _, _ = read_every_way(plain, tmp_path / "plain", capsys)
    root = tree(tmp_path)
    os.makedirs(os.path.join(root, "train", "dogs", "more"))
    png(os.path.join(root, "train", "dogs", "more", "extra.png"))
    os.symlink("../dogs", os.path.join(root, "train", "cats", "dogs"))
    os.symlink("../../train/cats", os.path.join(root, "val", "cats", "train"))
    os.symlink("more", os.path.join(root, "train", "dogs", "again"))
    splits, _, lines = read_every_way(root, tmp_path, capsys)
    assert counts(splits) == {"train": [4, 5], "val": [4, 4]}
    line = warning(lines, "3 links to folders read already, e.g. ")
    assert line.endswith(os.path.join("cats", "dogs"))
    assert torch.equal(splits["val"][0], expected["val"][0])  # val/ as it was without the links


def test_links_to_folders_outside_the_tree_add_their_images_once(tmp_path, capsys):
    """Photos on another disk, linked from a class folder (its subfolders too), and linked a second
    time from the other class (counted, not read twice); a class folder that is itself a link works
    as well."""
    root = tree(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deeper").mkdir(parents=True)
    for name in ("a.png", "b.png", "deeper/c.png"):
        png(elsewhere / name, colour=(30, 30, 220))
    os.symlink(elsewhere, os.path.join(root, "train", "cats", "elsewhere"))
    os.symlink(elsewhere, os.path.join(root, "train", "dogs", "elsewhere"))
    moved = tmp_path / "dogs_val"
    os.rename(os.path.join(root, "val", "dogs"), moved)
    os.symlink(moved, os.path.join(root, "val", "dogs"))
    splits, _, lines = read_every_way(root, tmp_path, capsys)
    assert counts(splits) == {"train": [7, 4], "val": [4, 4]}
    line = warning(lines, "1 link to a folder read already: ")
    assert line.endswith(os.path.join("train", "dogs", "elsewhere"))


# ------------------------------------------------------------------------- sizes and lengths


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, as it opens
def test_an_image_over_the_pixel_limit_is_skipped_with_a_count_the_cache_keeps(
        tmp_path, capsys, monkeypatch):
    root = tree(tmp_path)  # 20 x 14 = 280 pixels each
    png(os.path.join(root, "train", "cats", "big.png"), size=(40, 30))  # over the limit
    png(os.path.join(root, "train", "dogs", "huge.png"), size=(60, 50))  # twice over it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    splits, _, lines = read_every_way(root, tmp_path, capsys)
    assert counts(splits) == {"train": [4, 4], "val": [4, 4]}
    line = warning(lines, "2 images of more pixels than PIL.Image.MAX_IMAGE_PIXELS (1,000), e.g. ")
    assert line.endswith(os.path.join("cats", "big.png"))
    assert not any("unreadable" in line for line in lines)


def test_a_path_longer_than_the_system_allows_is_skipped_with_a_count(tmp_path, capsys):
    """Folders nested deeper than PATH_MAX bytes (made through folder descriptors, as no path
    reaches them): counted where the walk meets the first path it cannot open."""
    root = tree(tmp_path)
    fd = os.open(os.path.join(root, "train", "cats"), os.O_RDONLY)
    name, depth = "d" * 200, walk_module.PATH_MAX // 200 + 1
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            deeper = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        image = os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        with os.fdopen(image, "wb") as f:
            Image.new("RGB", (20, 14)).save(f, "PNG")
    finally:
        os.close(fd)
    splits, _, lines = read_every_way(root, tmp_path, capsys)
    assert counts(splits) == {"train": [4, 4], "val": [4, 4]}
    line = warning(lines, f"1 path longer than the system allows ({walk_module.PATH_MAX} bytes): ")
    path = line.split(": ", 1)[1]
    assert len(os.fsencode(path)) >= walk_module.PATH_MAX and path.endswith(name)


# ------------------------------------------------------------------------- where the outputs go


@pytest.mark.parametrize("inside", ["train/cats", "train/cats/run", "train", "val/dogs/1",
                                    "linked/run"])
def test_an_output_dir_inside_the_data_tree_is_refused_before_anything_is_read(
        tmp_path, inside, monkeypatch):
    root = tree(tmp_path)
    linked = tmp_path / "linked"  # a class folder that is a link: its target is in the tree too
    os.rename(os.path.join(root, "train", "dogs"), linked)
    os.symlink(linked, os.path.join(root, "train", "dogs"))
    output_dir = str(linked / "run") if inside == "linked/run" else os.path.join(root, inside)
    with pytest.raises(DataError, match=r"^--output-dir \(OUTPUT_DIR\) .* is inside the data "):
        folder_module.check_outside_data(folder_config(root), output_dir)
    for beside in (tmp_path / "out", tmp_path / "data", tmp_path / "data" / "runs"):  # never read
        folder_module.check_outside_data(folder_config(root), str(beside))
    # reads batch files only
    folder_module.check_outside_data(configs(DATASET="cifar10", DATA_DIR=str(root)).data,
                                     output_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read")
    monkeypatch.setattr(folder_module, "walk_images", refuse)
    before = sorted(os.walk(tmp_path))
    assert main.main(["--dataset", "folder", "--data-dir", root, "--output-dir", output_dir]) == 2
    assert sorted(os.walk(tmp_path)) == before  # nothing written either
