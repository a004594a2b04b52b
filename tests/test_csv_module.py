"""DATASET "csv": a CSV of image paths and labels, listed and checked as a photo folder is, through
the same cache; a bad row is one line naming its line and exit 2."""

import json
import os
import signal

import pandas as pd
import pytest
import torch
from PIL import Image

import csv_module
import data_module
import image_module
import inference_module
import main
from conftest import collect, configs, write_image_tree
from data_module import DataError

# a CSV's labels for write_image_tree's class folders: a comma, quotes, "NA" (not a missing value)
LABELS = {"cats": "chat noir, grand", "dogs": "NA", "owls": 'a "quoted" owl'}
RUN = ["--dataset", "csv", "--image-size", "16", "--epochs", "1", "--batch-size", "8",
       "--ask-epoch", "none", "--num-workers", "0", "--download", "false"]


def write_csv(path, rows, columns=("path", "label", "split")):
    """A CSV of these rows (tuples, in the columns' order), as pandas quotes it."""
    pd.DataFrame(rows, columns=list(columns)[:len(rows[0])]).to_csv(path, index=False)
    return str(path)


def tree_rows(root, split_of=None, labels=LABELS):
    """(path relative to root's parent, label[, split]) for each image of a write_image_tree tree,
    in its walk order (the order a folder lists them)."""
    rows = []
    for split in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, split))):
            for file in sorted(os.listdir(os.path.join(root, split, name))):
                path = os.path.join(os.path.basename(root), split, name, file)
                rows.append((path, labels[name]) + ((split_of[split],) if split_of else ()))
    return rows


def csv_data(csv_path, **constants):
    """get_data of a CSV (no cache unless CACHE_DIR names one)."""
    values = dict(DATASET="csv", DATA_DIR=csv_path, BATCH_SIZE=8, IMAGE_SIZE=16, CACHE_DIR=None)
    return data_module.get_data(configs(**{**values, **constants}).data)


def test_a_csv_of_labels_with_spaces_commas_and_quotes_trains_end_to_end_then_predicts(
        tmp_path, capsys, one_thread):
    write_image_tree(tmp_path / "images", splits=("train",), per_class=6)
    csv_path = write_csv(tmp_path / "labels.csv", tree_rows(str(tmp_path / "images")),
                         columns=("path", "label"))
    out = str(tmp_path / "out")
    assert main.main(["--data-dir", csv_path, "--output-dir", out, *RUN]) == 0
    captured = capsys.readouterr()
    assert f"{csv_path} has no test rows; the final evaluation uses the validation images" in \
        captured.err and "Validation accuracy (no test split): " in captured.out
    info = json.load(open(os.path.join(out, "best_model.json")))
    assert info["classes"] == sorted(LABELS.values()) and info["dataset"] == "csv"
    owl = str(tmp_path / "images" / "train" / "owls" / "0.png")
    assert main.main(["--output-dir", out, "--predict", owl]) == 0
    predictions = pd.read_csv(os.path.join(out, "predictions.csv"), dtype=str,
                              keep_default_na=False)
    assert sorted(predictions.loc[0, ["top1", "top2", "top3"]]) == sorted(LABELS.values())


def test_export_checks_the_model_on_the_csvs_own_images(tmp_path):
    """--export's example images: a CSV's test rows first, then its val rows, prepared as
    --predict prepares them."""
    write_image_tree(tmp_path / "images", splits=("train",), per_class=4)
    rows = tree_rows(str(tmp_path / "images"))
    splits = ["val" if i % 3 == 0 else "test" if i % 3 == 1 else "" for i in range(len(rows))]
    csv_path = write_csv(tmp_path / "labels.csv", [row + (split,)
                                                   for row, split in zip(rows, splits)])
    info = dict(image_size=12, mean=[0.5] * 3, std=[0.25] * 3, resize_size=14)
    images = inference_module._example_images(csv_path, "csv", info, "path,label,split", n=6)
    firsts = [path for (path, _), split in zip(rows, splits) if split == "test"][:4] + \
        [path for (path, _), split in zip(rows, splits) if split == "val"][:2]
    expected = [image_module.load_image(str(tmp_path / path), 12, [0.5] * 3, [0.25] * 3, 14)
                for path in firsts]
    assert torch.equal(images, torch.stack(expected))


@pytest.mark.parametrize("columns, noted", [(("path", "label", "subset"), True),
                                             (("path", "label"), False)])
def test_a_csv_without_the_split_column_puts_every_row_in_train_and_names_its_other_columns(
        tmp_path, capsys, columns, noted):
    write_image_tree(tmp_path / "images", splits=("train",), per_class=2)
    rows = tree_rows(tmp_path / "images")
    rows = [row + ("test",) for row in rows] if len(columns) == 3 else rows
    listing = csv_module.list_csv(write_csv(tmp_path / "labels.csv", rows, columns),
                                  "path,label,split")
    assert list(listing.splits) == ["train"] and len(listing.splits["train"]) == len(rows)
    err = capsys.readouterr().err
    assert ("has no column 'split', so every row is in the train split; if 'subset' holds the "
            "splits, set --csv-columns (CSV_COLUMNS) to name it" in err) == noted, err


def test_paths_relative_to_the_csvs_folder_or_absolute_and_odd_file_names(tmp_path):
    write_image_tree(tmp_path / "images", splits=("train",), per_class=2)
    odd = tmp_path / "images" / "odd" / 'a, "b" #1 ë.png'
    odd.parent.mkdir()
    Image.new("RGB", (9, 9), "red").save(odd)
    rows = [(os.path.join("..", "images", "train", name, f"{i}.png"), name)
            for name in ("cats", "dogs") for i in range(2)]
    rows += [(str(odd), "cats")]  # absolute
    (tmp_path / "lists").mkdir()
    csv_path = write_csv(tmp_path / "lists" / "labels.csv", rows, columns=("path", "label"))
    listing = csv_module.list_csv(csv_path, "path,label,split")
    expected = [os.path.join(tmp_path, "lists", path) for path, _ in rows[:4]] + [str(odd)]
    assert [path for path, _ in listing.splits["train"]] == expected
    assert [label for _, label in listing.splits["train"]] == [0, 0, 1, 1, 0]
    assert all(os.path.isfile(path) for path in expected) and listing.classes == ["cats", "dogs"]


def test_a_split_column_gives_the_val_and_test_rows_and_an_empty_split_is_train(tmp_path):
    write_image_tree(tmp_path / "images", splits=("train", "val", "test"), per_class=3)
    split_of = {"train": "", "val": "val", "test": "test"}  # "" is train
    csv_path = write_csv(tmp_path / "labels.csv", tree_rows(str(tmp_path / "images"), split_of))
    data = csv_data(csv_path, VAL_SPLIT=5)  # ignored: the CSV has val rows
    assert not data.test_is_val and data.classes == sorted(LABELS.values())
    counts = [len(collect(loader)[1]) for loader in (data.val, data.test)]
    assert data.class_counts == (3, 3, 3) and counts == [9, 9]  # training batches drop the last


def test_without_a_split_column_the_rows_are_split_as_a_folders_train(tmp_path):
    """The same images, listed in the folder's order: the same validation images held out (a
    tenth, one of each class at least) and the same training images left."""
    root = write_image_tree(tmp_path / "images", splits=("train",), per_class=7)
    csv_path = write_csv(tmp_path / "labels.csv", tree_rows(root, labels={
        "cats": "cats", "dogs": "dogs", "owls": "owls"}), columns=("path", "label"))
    from_csv, from_folder = csv_data(csv_path), csv_data(root, DATASET="folder")
    (csv_images, csv_labels), (images, labels) = collect(from_csv.val), collect(from_folder.val)
    assert torch.equal(csv_images, images) and torch.equal(csv_labels, labels)
    assert len(labels) == 3 and from_csv.class_counts == (6, 6, 6)  # 21: 2.1, one of each at least
    assert from_csv.test_is_val and from_csv.mean == from_folder.mean


def test_the_cache_is_built_once_and_a_second_run_opens_no_image(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "images", splits=("train",), per_class=4)
    first_csv = write_csv(tmp_path / "labels.csv", tree_rows(str(tmp_path / "images")),
                          columns=("path", "label"))
    first = csv_data(first_csv, CACHE_DIR=str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("an image file was opened although the cache is valid")
    monkeypatch.setattr(Image, "open", refuse)
    again = csv_data(first_csv, CACHE_DIR=str(tmp_path / "cache"))
    assert again.cache_file == first.cache_file and first.cache_file.startswith(str(tmp_path))
    assert torch.equal(collect(again.val)[0], collect(first.val)[0])


@pytest.mark.parametrize("lines, flags, fragments", [
    (["path,label", "a.png,cat", "missing.png,dog"], None,
     ["labels.csv line 3: ", "missing.png cannot be read (No such file or directory); correct the "
      "path"]),
    (["path,label,split", "a.png,cat,train", "b.png,dog,valid"], None,
     ["labels.csv line 3: the split 'valid' is not known; use train, val or test"]),
    (["file,label", "a.png,cat"], None,
     ["labels.csv line 1: no column 'path' (it has 'file', 'label'); name its columns "
      "path,label,split or set --csv-columns (CSV_COLUMNS) to yours"]),
    (["path,label", "a.png,cat", "", '"b.png",', "c.png,dog"], None,
     ["labels.csv line 4: the label is empty; give the row its label"]),
    (["path,label", "a.png,cat", '"b.png","two', 'lines"'], None,
     ["labels.csv line 3: the label 'two\\nlines' holds a control character"]),
    (["path,label,split", "a.png,cat,train", "b.png,dog,val"], None,
     ["labels.csv line 3: the label 'dog' has no train rows"]),
    (["path,label", "a.png,cat", ",dog"], None, ["labels.csv line 3: the path is empty"]),
    (["path,label"], None, ["labels.csv has no train rows; add some"]),
    (["path, label", "a.png, cat", '"b.png",  " dog"', "", "", "c.png,\tbird"], None,
     ["labels.csv line 6: the label '\\tbird' holds a control character"]),
    (["path,label", "a.png,cat", "sub,dog"], None, ["labels.csv line 3: ", "sub is a folder"]),
    (["path,label", "a.png,cat", "b.png,dog,extra"], None,
     ["cannot read ", "labels.csv as a UTF-8 CSV file (", "fix it"]),
    (["image,class", "a.png,cat"], ["--csv-columns", "image,class,class"],
     ["--csv-columns 'image,class,class' (CSV_COLUMNS) is out of range"]),
    (["path,label", "a.png,cat", "b.png,dog", "c.png,dog"], None,
     ["the class 'cat' of ", "labels.csv has a single image, and an unset --val-split (VAL_SPLIT) "
      "holds out one of each class; add images or val rows, or set it"]),
    (["path,label", "a.png,cat", "b.png,dog"], ["--val-split", "0"],
     ["labels.csv has no val or test rows and --val-split (VAL_SPLIT) is 0"]),
    (["path,label,split", "a.png,cat,train", "b.png,dog,train", "./sub/../a.png,cat,val"], None,
     ["labels.csv line 4: ", "a.png is the image of line 2 too; list each image once"]),
    (["path,label", "a.png,cat", "b.png,dog", "link.png,dog"], None,
     ["labels.csv line 4: ", "link.png is the image of line 3 too; list each image once"]),
])
def test_a_bad_csv_is_one_line_naming_its_line_and_exit_2(tmp_path, capsys, lines, flags,
                                                          fragments):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (9, 9)).save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    os.symlink("b.png", tmp_path / "link.png")  # another path to b.png
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    args = ["--data-dir", str(tmp_path / "labels.csv"), "--output-dir", str(tmp_path / "out"), *RUN]
    capsys.readouterr()
    assert main.main(args + (flags or [])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert all(fragment in err[0] for fragment in fragments), err[0]


def test_named_columns_and_a_label_of_code_stay_text(tmp_path):
    """Nothing in a CSV runs: a label that reads as Python, a formula or "None" is a label."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (9, 9)).save(tmp_path / name)
    labels = ["__import__('os').system('false')", "=cmd|'/c calc'!A1"]
    csv_path = write_csv(tmp_path / "labels.csv", [("a.png", labels[0]), ("b.png", labels[1])],
                         columns=("image", "class"))
    listing = csv_module.list_csv(csv_path, "image, class, fold")
    assert listing.classes == sorted(labels) and list(listing.splits) == ["train"]


def test_links_to_nothing_fifos_and_other_files_are_skipped_as_a_folder_skips_them(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (9, 9)).save(tmp_path / name)
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for ever
    (tmp_path / "notes.txt").write_text("not an image")
    rows = [(name, "cat") for name in ("a.png", "dangling.png", "pipe.png", "notes.txt", "b.png")]
    listing = csv_module.list_csv(write_csv(tmp_path / "labels.csv", rows, ("path", "label")),
                                  "path,label")
    assert [os.path.basename(path) for path, _ in listing.splits["train"]] == ["a.png", "b.png"]
    warnings = listing.skipped.warnings()
    assert len(warnings) == 3 and any("not an image (extension .txt)" in line for line in warnings)
    assert any("link whose target is missing" in line for line in warnings)
    assert any("not a regular file" in line for line in warnings)


def test_a_split_left_without_readable_images_is_said_as_a_folders_is(tmp_path):
    write_image_tree(tmp_path / "images", splits=("train",), per_class=2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = tree_rows(str(tmp_path / "images"), {"train": "train"}) + [("broken.png", "NA", "test")]
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(DataError, match=r"labels.csv's test split holds no readable images"):
        csv_data(csv_path)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_csv_that_is_a_fifo_or_a_device_is_refused_unread_in_one_line(tmp_path, capsys, kind):
    csv_path = tmp_path / "labels.csv"
    if kind == "fifo":
        os.mkfifo(csv_path)  # opening it to read waits for a writer for ever
    else:
        os.symlink(os.devnull, csv_path)  # as /dev/zero would be, which never ends

    def hung(*_):
        raise TimeoutError("still reading the CSV after 20 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        status = main.main(["--data-dir", str(csv_path), "--output-dir", str(tmp_path / "out"),
                            *RUN])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1, err
    assert err[0] == (f"error: --data-dir (DATA_DIR) {csv_path} is not a regular file (a FIFO, "
                      "socket or device); with --dataset (DATASET) csv, point it at a CSV file of "
                      "paths and labels")
