"""Data end to end: the CIFAR-10 reader, splits, ImageFolder trees, offline errors, normalisation,
the two loader paths, the cache."""

import glob
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import functional as F

import augment_module
import cifar_module
import data_module
import decode_module
import folder_module
import image_module
import loader_module
import source_module
import cache_module
from conftest import (CLASSES, PHOTO_CLASSES, PHOTOS_PER_CLASS, REAL_DEFAULT_CACHE_DIR, collect,
                      configs, plant_crafted_batch, write_fake_cifar, write_image_tree,
                      write_photo_tree)
from data_module import DataError


# ----------------------------------------------------------------------------- the config


def data_config(dataset, data_dir, **constants):
    """main.py's DataConfig for the dataset in data_dir (no cache unless CACHE_DIR names one), the
    constants named changed."""
    return configs(DATASET=dataset, DATA_DIR=data_dir, **{"CACHE_DIR": None, **constants}).data


def get_data(dataset, data_dir, **constants):
    return data_module.get_data(data_config(dataset, data_dir, **constants))


@pytest.mark.parametrize("bad, message", [
    (dict(VAL_SPLIT=-1), "VAL_SPLIT = -1 is out of range: use a whole number >= 0, or None"),
    (dict(TRAIN_SUBSET=0), "TRAIN_SUBSET = 0 is out of range: use a whole number >= 1, or None"),
    (dict(IMAGE_SIZE=4), "IMAGE_SIZE = 4 is out of range: use a whole number of pixels from 8 to "
                         "1024"),
    (dict(IMAGE_SIZE=60000), "IMAGE_SIZE = 60000 is out of range: use a whole number of pixels "
                             "from 8 to 1024"),
    (dict(DATASET="mnist"), "DATASET = 'mnist' is not known; choose one of 'cifar10', 'folder', "
                            "'csv'"),
    (dict(CSV_COLUMNS="path,path"), "CSV_COLUMNS = 'path,path' is out of range: use two or three "
                                    "different column names: path,label or path,label,split"),
    (dict(RESIDENT=True), "RESIDENT = True is not known; choose one of 'auto', 'yes', 'no'"),
    (dict(MIXUP=-0.2), "MIXUP = -0.2 is out of range: use a number >= 0 (0: off)"),
    (dict(CUTMIX=-1.0), "CUTMIX = -1.0 is out of range: use a number >= 0 (0: off)"),
])
def test_a_config_out_of_range_names_the_constant_and_what_is_allowed(bad, message):
    with pytest.raises(ValueError) as error:
        configs(**bad)
    assert str(error.value) == message


@pytest.mark.parametrize("bad, message", [
    (dict(AUTO_AUGMENT="autoaugment"),
     "AUTO_AUGMENT = 'autoaugment' is not known; choose one of None, 'trivialaugment', "
     "'randaugment'"),
    (dict(RANDOM_ERASING=1.5),
     "RANDOM_ERASING = 1.5 is out of range: use a probability from 0 to 1"),
])
def test_a_bad_auto_augment_or_random_erasing_names_the_constant_and_what_is_allowed(bad, message):
    with pytest.raises(ValueError) as error:
        configs(**bad)
    assert str(error.value) == message


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_reader_on_a_fake_batch_folder(fake_cifar):
    data = get_data("cifar10", fake_cifar, BATCH_SIZE=8, VAL_SPLIT=20, DOWNLOAD=False)
    assert data.classes == CLASSES and data.resident and not data.test_is_val
    assert len(data.train.labels) == 80 and len(data.val.labels) == 20 and len(
        data.test.labels) == 20
    assert torch.bincount(data.val.labels).tolist() == [2] * 10  # stratified
    images, labels = next(iter(data.train))
    assert images.shape == (8, 3, 32,
        32) and images.dtype == torch.float32 and labels.dtype == torch.int64


def test_cifar_images_are_read_in_the_python_version_layout(tmp_path):
    root = write_fake_cifar(tmp_path, per_batch=10)
    import pickle
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"][0]
    train_images = cifar_module.read_cifar10(root, download=False)[0]
    # row: 1,024 red values, then green, then blue, each row-major; the reader gives H x W x C
    expected = raw.reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(train_images[0].numpy(), expected)


@pytest.mark.parametrize("name", cifar_module.CIFAR_FILES)
@pytest.mark.parametrize("call, named", [("system", "posix.system"), ("exec", "__builtin__.exec")])
def test_a_crafted_batch_file_is_refused_naming_it_and_its_code_never_runs(
        tmp_path, name, call, named):
    root = write_fake_cifar(tmp_path / "data", per_batch=10)
    marker = tmp_path / "marker"
    path = plant_crafted_batch(root, marker, name, call)
    with pytest.raises(DataError) as error:
        cifar_module.read_cifar10(root, download=False)
    line = str(error.value)
    assert line.startswith(f"{path} is not a CIFAR-10 batch file: it calls {named} as it loads")
    assert "it was refused and nothing in it ran" in line and "\n" not in line
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is real: a plain unpickler runs it
        pickle.load(f, encoding="latin1")
    assert marker.read_text().strip() == "ran"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batch_files_written_at_any_pickle_protocol_read_alike(tmp_path, protocol):
    root = write_fake_cifar(tmp_path / "data", per_batch=10)
    expected = cifar_module.read_cifar10(root, download=False)
    for name in cifar_module.CIFAR_FILES:  # as numpy 2 writes them at that protocol
        path = os.path.join(root, "cifar-10-batches-py", name)
        with open(path, "rb") as f:
            entry = pickle.load(f)
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    for got, want in zip(cifar_module.read_cifar10(root, download=False), expected):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want


@pytest.mark.parametrize("change, fragment", [
    (dict(labels=[10] * 10), "its labels are not a class from 0 to 9 for each image"),
    (dict(labels=[0] * 9), "its labels are not a class from 0 to 9 for each image"),
    (dict(data=np.zeros((10, 3072), np.float32)), "its data is not uint8 rows of 3,072 values"),
    (dict(data=np.zeros((10, 100), np.uint8)), "its data is not uint8 rows of 3,072 values"),
    (dict(data=b"\0" * 30720), "its data is not uint8 rows of 3,072 values")])
def test_a_batch_file_is_checked_field_by_field(tmp_path, change, fragment):
    root = write_fake_cifar(tmp_path / "data", per_batch=10)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_4")
    with open(path, "rb") as f:
        entry = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({**entry, **change}, f, protocol=2)
    expected = f"^{path} is not a readable CIFAR-10 batch file \\({fragment}\\)"
    with pytest.raises(DataError, match=expected):
        cifar_module.read_cifar10(root, download=False)


def test_a_batch_file_larger_than_cifar_s_is_refused_before_it_is_read(tmp_path):
    root = write_fake_cifar(tmp_path / "data", per_batch=10)
    path = os.path.join(root, "cifar-10-batches-py", "test_batch")
    with open(path, "r+b") as f:
        f.truncate(cifar_module.CIFAR_BATCH_BYTES + 1)  # sparse: reading it would take 64 MB
    expected = f"^{path} is not a CIFAR-10 batch file: it takes 64 MB, and one never takes over 64"
    with pytest.raises(DataError, match=expected):
        cifar_module.read_cifar10(root, download=False)


def test_the_real_batch_files_read_as_a_plain_unpickler_reads_them(cifar_dir):
    folder = os.path.join(cifar_dir, "cifar-10-batches-py")

    def plain(name):  # pickle.load: trusted here, on the real files
        with open(os.path.join(folder, name), "rb") as f:
            return pickle.load(f, encoding="latin1")
    images, labels, test_images, test_labels, classes = cifar_module.read_cifar10(cifar_dir, False)
    for names, got_images, got_labels in ((cifar_module.CIFAR_FILES[:5], images, labels),
                                          (["test_batch"], test_images, test_labels)):
        batches = [plain(name) for name in names]
        rows = np.concatenate([batch["data"] for batch in batches])
        assert np.array_equal(got_images.numpy(), rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        assert got_labels.tolist() == [label for batch in batches for label in batch["labels"]]
    assert classes == plain("batches.meta")["label_names"] == CLASSES


def test_mixup_and_cutmix_mix_the_training_batches_only(fake_cifar):
    data = get_data("cifar10", fake_cifar, BATCH_SIZE=8, VAL_SPLIT=20, DOWNLOAD=False, MIXUP=0.2,
                    CUTMIX=1.0)
    assert isinstance(data.train, loader_module.MixedLoader)
    images, targets = next(iter(data.train))
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8,
        10) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(8))
    # evaluation is never mixed: class indices, as without mixing
    for loader in (data.val, data.test):
        assert isinstance(loader, loader_module.ResidentLoader)
        assert next(iter(loader))[1].dtype == torch.int64
    plain = get_data("cifar10", fake_cifar, BATCH_SIZE=8, VAL_SPLIT=20, DOWNLOAD=False)
    assert isinstance(plain.train, loader_module.ResidentLoader)  # off by default


def test_the_class_counts_are_the_training_splits_after_the_validation_images_and_the_subset(
        tmp_path):
    root = write_image_tree(tmp_path / "tree", splits=("train", "test"), classes=("cats", "dogs"),
                            per_class=12, size=(8, 8))
    for i in range(9):  # 12 cats, 3 dogs
        os.remove(os.path.join(root, "train", "dogs", f"{i}.png"))
    config = data_config("folder", root, BATCH_SIZE=4, IMAGE_SIZE=8, AUGMENT="shift")
    assert data_module.get_data(replace(config, val_split=0)).class_counts == (12, 3)
    data = data_module.get_data(config)  # a tenth held out, one of each class at least
    assert data.class_counts == (11, 2) == tuple(torch.bincount(data.train.labels).tolist())
    # stratified
    assert data_module.get_data(replace(config, train_subset=5)).class_counts == (4, 1)


def test_val_split_zero_trains_on_every_image_and_validates_on_none(fake_cifar):
    data = get_data("cifar10", fake_cifar, BATCH_SIZE=8, VAL_SPLIT=0, DOWNLOAD=False)
    assert data.val is None and len(data.train.labels) == 100  # every training image, none held out
    assert len(data.test.labels) == 20 and not data.test_is_val  # the test set, for the end only


def test_train_subset_is_stratified_and_counted_after_the_split(fake_cifar):
    data = get_data("cifar10", fake_cifar, BATCH_SIZE=8, VAL_SPLIT=20, TRAIN_SUBSET=30,
                    DOWNLOAD=False)
    assert len(data.train.labels) == 30 and torch.bincount(data.train.labels).tolist() == [3] * 10
    with pytest.raises(DataError,
                       match=r"^--train-subset \(TRAIN_SUBSET\) 81 is out of range: use 1 to 80 "):
        get_data("cifar10", fake_cifar, VAL_SPLIT=20, TRAIN_SUBSET=81, DOWNLOAD=False)


def test_val_split_larger_than_the_training_set_is_refused(fake_cifar):
    with pytest.raises(DataError,
            match=r"^--val-split \(VAL_SPLIT\) 100 is too large: the training set has 100 "):
        get_data("cifar10", fake_cifar, VAL_SPLIT=100, DOWNLOAD=False)


def test_missing_folder_offline_gives_one_clear_message(tmp_path):
    with pytest.raises(DataError) as error:
        get_data("cifar10", str(tmp_path / "nowhere"), DOWNLOAD=True)
    message = str(error.value)
    assert ("download failed" in message and "cifar-10-batches-py" in message
            and "--data-dir (DATA_DIR)" in message)
    assert "\n" not in message


def test_a_failed_download_leaves_no_folder_behind(tmp_path):
    for data_dir in (tmp_path / "nowhere", tmp_path / "deeper" / "still"):
        with pytest.raises(DataError, match="the download failed"):
            data_module.get_data(configs(DATA_DIR=str(data_dir), DOWNLOAD=True).data)
    assert os.listdir(tmp_path) == []


def test_a_failed_download_removes_only_what_it_made_in_a_folder_that_was_there(
        tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other.tar.gz").write_bytes(b"mine")

    def cut_short(url, root, filename, md5):  # as a download that stops half way through unpacking
        (tmp_path / filename).write_bytes(b"half an archive")
        os.makedirs(tmp_path / "cifar-10-batches-py")
        (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half a batch")
        raise OSError("connection reset")

    monkeypatch.setattr(datasets.cifar, "download_and_extract_archive", cut_short)
    with pytest.raises(DataError, match="the download failed: connection reset"):
        data_module.get_data(configs(DATA_DIR=str(tmp_path), DOWNLOAD=True).data)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "other.tar.gz"]


def test_missing_folder_without_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError,
            match=r"--download \(DOWNLOAD\) is false; unpack https://.*-python.tar.gz in "):
        get_data("cifar10", str(tmp_path), DOWNLOAD=False)


def test_a_data_dir_one_level_too_deep_for_cifar_names_its_parent(fake_cifar):
    folder = os.path.join(fake_cifar, "cifar-10-batches-py")
    with pytest.raises(DataError) as error:
        get_data("cifar10", folder, DOWNLOAD=True)
    assert str(error.value) == (f"--data-dir (DATA_DIR) {folder} holds CIFAR-10's files itself: "
                                f"use its parent, --data-dir {fake_cifar}")
    assert sorted(os.listdir(folder)) == sorted(cifar_module.CIFAR_FILES)  # no download into it


@pytest.mark.parametrize("name, kind", [("data_batch_1", "a file, not a folder; point"),
                                        ("cifar-10-python.tar.gz",
                                        "an archive, not a folder; unpack it and point")])
def test_a_cifar_data_dir_that_is_a_file_is_called_one(tmp_path, name, kind):
    path = tmp_path / name
    path.write_bytes(b"not a folder")
    with pytest.raises(DataError) as error:
        get_data("cifar10", str(path), DOWNLOAD=True)
    expected = (f"--data-dir (DATA_DIR) {path} is {kind} it at the folder that holds "
                "cifar-10-batches-py/")
    assert str(error.value) == expected


def test_truncated_batch_file_is_named(fake_cifar):
    path = os.path.join(fake_cifar, "cifar-10-batches-py", "data_batch_3")
    with open(path, "rb") as f:
        head = f.read(500)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        get_data("cifar10", fake_cifar, DOWNLOAD=False)


def test_a_file_that_is_not_a_pickle_is_named(fake_cifar):
    with open(os.path.join(fake_cifar, "cifar-10-batches-py", "test_batch"), "w") as f:
        f.write("this is not a pickle")
    with pytest.raises(DataError, match="test_batch is not a readable"):
        get_data("cifar10", fake_cifar, DOWNLOAD=False)


# ----------------------------------------------------------------------------- splitting


def test_stratified_split_is_stratified_seeded_and_complete():
    labels = torch.arange(1000) % 10
    labels[:100] = 0  # an uneven class
    kept, held = data_module.stratified_split(labels, 100, seed=3)
    assert len(held) == 100 and len(kept) == 900
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(1000))
    counts = torch.bincount(labels[held], minlength=10)
    expected = torch.bincount(labels, minlength=10) * 100 / 1000
    assert (counts - expected).abs().max() < 1
    again, _ = data_module.stratified_split(labels, 100, seed=3)
    other, _ = data_module.stratified_split(labels, 100, seed=4)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_stratified_split_of_every_class_holds_one_of_each_out_and_keeps_one():
    labels = torch.tensor([0] * 100 + [1] * 2 + [2] * 2)
    _, held = data_module.stratified_split(labels, 10, seed=0)
    # in proportion, the small ones lose
    assert torch.bincount(labels[held], minlength=3).tolist() == [10, 0, 0]
    kept, held = data_module.stratified_split(labels, 10, seed=0, every_class=True)
    # one of each held out, one of each kept, and the other 7 shared as the classes' 98, 0 and 0
    # spare images
    assert torch.bincount(labels[held]).tolist() == [8, 1, 1] and torch.bincount(labels[
        kept]).tolist() == [92, 1, 1]
    with pytest.raises(ValueError, match="one of each class"):
        data_module.stratified_split(labels, 2, seed=0, every_class=True)


def test_an_unset_val_split_is_5000_for_cifar_and_a_tenth_with_every_class_for_a_folder():
    assert configs().data.val_split is None
    assert data_module.default_val_split("cifar10", torch.arange(50000) % 10) == 5000
    assert data_module.default_val_split("folder", torch.arange(90) % 3) == 9
    assert data_module.default_val_split("folder", torch.arange(95) % 3) == 10  # 9.5 rounds up
    # a tenth is 1; one per class
    assert data_module.default_val_split("folder", torch.arange(12) % 4) == 4
    # and one of each left to train on
    assert data_module.default_val_split("folder", torch.arange(6) % 3) == 3


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (50, 6, 5, 3), dtype=torch.uint8)
    mean, std = source_module.channel_stats(images)
    values = images.numpy().reshape(-1, 3) / 255
    assert np.allclose(mean, values.mean(0)) and np.allclose(std, values.std(0))


# ----------------------------------------------------------------------------- ImageFolder trees


@pytest.mark.parametrize("resident", ["yes", "no"])
def test_an_image_folder_tree_loads_resized(tmp_path, resident):
    root = write_image_tree(tmp_path, splits=("train", "val", "test"))
    data = get_data("folder", root, BATCH_SIZE=4, IMAGE_SIZE=12, RESIDENT=resident, NUM_WORKERS=0)
    assert data.classes == ["cats", "dogs", "owls"] and data.image_size == 12
    assert data.resident == (resident == "yes") and not data.test_is_val
    images, labels = collect(data.val)
    assert images.shape == (18, 3, 12, 12) and sorted(labels.tolist()) == [0] * 6 + [1] * 6 + [
        2] * 6


def test_a_tree_without_val_holds_out_val_split(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), per_class=10)
    data = get_data("folder", root, BATCH_SIZE=4, IMAGE_SIZE=8, VAL_SPLIT=6, RESIDENT="yes",
                    NUM_WORKERS=0)
    assert len(data.val.labels) == 6 and len(
        data.train.labels) == 24 and data.test is data.val and data.test_is_val


def test_a_tree_without_val_or_test_and_val_split_zero_names_the_flag(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",))
    with pytest.raises(DataError,
            match=r"no val/ or test/ folder and --val-split \(VAL_SPLIT\) is 0: nothing"):
        get_data("folder", root, VAL_SPLIT=0, NUM_WORKERS=0)


def test_a_train_only_folder_holds_out_a_tenth_of_it_with_every_class_by_default(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), per_class=30)
    data = get_data("folder", root, NUM_WORKERS=0)
    assert torch.bincount(data.val.labels).tolist() == [3, 3, 3] and len(data.train.labels) == 81
    assert data.test_is_val and data.test is data.val  # no test/
    with pytest.raises(DataError) as error:
        get_data("folder", root, VAL_SPLIT=5000, NUM_WORKERS=0)
    assert str(error.value) == ("--val-split (VAL_SPLIT) 5000 is too large: train/ has 90 images; "
                                "use fewer, or leave it unset for a tenth of them")


def test_an_uneven_folder_validates_on_every_class_by_default(tmp_path):
    for name, count in [("many", 40), ("few", 3), ("two", 2)]:
        write_image_tree(tmp_path, splits=("train",), classes=(name,), per_class=count)
    data = get_data("folder", str(tmp_path), IMAGE_SIZE=8, RESIDENT="yes", NUM_WORKERS=0)
    assert data.classes == ["few", "many", "two"]
    # 5 of 45: a tenth, rounded half up
    assert torch.bincount(data.val.labels).tolist() == [1, 3, 1]
    assert torch.bincount(data.train.labels).tolist() == [2, 37, 1]
    write_image_tree(tmp_path, splits=("train",), classes=("one",), per_class=1)
    with pytest.raises(DataError,
            match=r"train/one has a single image, and an unset --val-split \(VAL_SPLIT\)"):
        get_data("folder", str(tmp_path), NUM_WORKERS=0)
    data = get_data("folder", str(tmp_path), VAL_SPLIT=4, NUM_WORKERS=0)
    assert len(data.val.labels) == 4  # a value given is held out in proportion, as before


def test_an_unset_val_split_on_a_cifar_folder_too_small_for_5000_says_so(fake_cifar):
    with pytest.raises(DataError,
                       match=r"^--val-split \(VAL_SPLIT\) is unset, which holds out 5000 of "
                             r"CIFAR-10's training images, but there are 100 images; "
                             r"set a smaller one$"):
        get_data("cifar10", fake_cifar, DOWNLOAD=False)


def test_files_and_their_decoded_images_split_and_measure_alike(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), per_class=10)
    listing = folder_module.list_tree(root)
    files, classes = folder_module._scan_folder(listing, size=8), listing.classes
    images = {"train": files["train"].decode(num_workers=0, desc="decoding")}
    options = dict(val_split=6, train_subset=12, seed=3, data_dir=root, dataset="folder",
                   classes=classes)
    from_files = data_module._split(files, **options)
    from_images = data_module._split(images, **options)
    for name in ("train", "val"):
        decoded = from_files[name].decode(num_workers=0, desc=name)
        assert torch.equal(decoded.images, from_images[name].images)
        assert torch.equal(decoded.labels, from_images[name].labels)
    assert len(from_images["train"]) == 12 and torch.bincount(from_images[
        "val"].labels).tolist() == [2, 2, 2]
    # under 2,000 files the sample is all of them, so the estimate is the exact value
    assert from_files["train"].statistics(seed=0, num_workers=0) == from_images["train"].statistics(
        0, 0)


def test_a_tree_with_one_class_is_refused(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        get_data("folder", root, NUM_WORKERS=0)


def test_a_missing_tree_is_refused(tmp_path):
    with pytest.raises(DataError,
            match=r"no ImageFolder tree .*; point --data-dir \(DATA_DIR\) at the folder"):
        get_data("folder", str(tmp_path), NUM_WORKERS=0)


def test_a_split_folder_given_for_its_tree_names_the_tree(tmp_path):
    root = write_image_tree(tmp_path / "photos", splits=("train", "val"))
    for split in ("train", "val", "train/"):
        with pytest.raises(DataError) as error:
            get_data("folder", os.path.join(root, split), NUM_WORKERS=0)
        assert str(error.value) == (f"--data-dir (DATA_DIR) {os.path.join(root, split)} is a split "
                                    f"folder; use its parent, --data-dir {root}")
    assert sorted(os.listdir(root)) == ["train", "val"] and "train" not in os.listdir(os.path.join(
        root, "train"))


def test_class_folders_without_train_a_file_or_no_folder_are_each_named(tmp_path):
    classes_only = tmp_path / "pets"
    write_image_tree(tmp_path / "tree", splits=("train",))
    os.rename(tmp_path / "tree" / "train", classes_only)
    with pytest.raises(DataError,
                       match=rf"^--data-dir \(DATA_DIR\) {classes_only} holds class folders but no "
                             rf"train/: move them into {classes_only}/train/, or point"):
        get_data("folder", str(classes_only), NUM_WORKERS=0)
    (tmp_path / "photos.zip").write_bytes(b"PK")
    with pytest.raises(DataError,
            match=r"^--data-dir \(DATA_DIR\) .*photos.zip is an archive, not a folder; unpack"):
        get_data("folder", str(tmp_path / "photos.zip"), NUM_WORKERS=0)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError,
            match=r"^--data-dir \(DATA_DIR\) .*notes.txt is a file, not a folder; point it"):
        get_data("folder", str(tmp_path / "notes.txt"), NUM_WORKERS=0)
    with pytest.raises(DataError,
            match=r"^--data-dir \(DATA_DIR\) .*nowhere does not exist; point it at the folder"):
        get_data("folder", str(tmp_path / "nowhere"), NUM_WORKERS=0)


def test_unreadable_images_are_skipped_with_a_count(tmp_path, capsys):
    root = write_image_tree(tmp_path, splits=("train", "val"))
    with open(os.path.join(root, "train", "cats", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    with open(os.path.join(root, "train", "dogs", "empty.jpg"), "wb"):
        pass
    data = get_data("folder", root, BATCH_SIZE=4, IMAGE_SIZE=8, RESIDENT="yes", NUM_WORKERS=0)
    assert len(data.train.labels) == 18
    assert "skipped 2 unreadable image files, e.g. " in capsys.readouterr().err


def test_counts_of_one_read_in_the_singular(tmp_path, capsys):
    root = write_image_tree(tmp_path / "tree", splits=("train", "val"))
    (tmp_path / "tree" / "train" / "cats" / "notes.txt").write_text("not a picture")
    broken = tmp_path / "tree" / "train" / "dogs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    get_data("folder", root, BATCH_SIZE=4, IMAGE_SIZE=8, RESIDENT="yes", NUM_WORKERS=0)
    warnings = capsys.readouterr().err
    assert "skipped 1 file that is not an image (extension .txt)" in warnings
    assert f"skipped 1 unreadable image file: {broken}" in warnings
    one_class = write_image_tree(tmp_path / "one", splits=("train",), classes=("only",))
    with pytest.raises(DataError, match="has 1 class folder with images"):
        get_data("folder", one_class, NUM_WORKERS=0)
    os.makedirs(tmp_path / "tree" / "train" / "owls2")
    with pytest.raises(DataError, match="none in the class folder owls2$"):
        get_data("folder", root, NUM_WORKERS=0)


def test_an_empty_val_folder_is_refused(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",))
    os.makedirs(os.path.join(root, "val", "cats"))
    with pytest.raises(DataError, match="no readable images"):
        get_data("folder", root, NUM_WORKERS=0)


# ----------------------------------------------------------------------------- normalisation


def test_normalisation_uses_the_training_statistics(fake_cifar):
    data = get_data("cifar10", fake_cifar, BATCH_SIZE=100, VAL_SPLIT=0, CROP_PADDING=0,
                    FLIP="none", DOWNLOAD=False)
    images, _ = collect(data.train)
    per_channel = images.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-2)


# ----------------------------------------------------------------------------- the two loader paths


def test_resident_and_streaming_paths_agree(fake_cifar):
    kwargs = dict(BATCH_SIZE=16, VAL_SPLIT=20, DOWNLOAD=False, NUM_WORKERS=0, SEED=1)
    resident = get_data("cifar10", fake_cifar, RESIDENT="yes", **kwargs)
    streaming = get_data("cifar10", fake_cifar, RESIDENT="no", **kwargs)
    assert not streaming.resident and resident.mean == streaming.mean
    # without augmentation (validation) the batches are the same images, normalised the same way
    (rv, rl), (sv, sl) = collect(resident.val), collect(streaming.val)
    assert rv.shape == sv.shape and torch.equal(rl, sl) and torch.allclose(rv, sv, atol=1e-5)
    # with augmentation: same shapes, batch counts and statistics
    torch.manual_seed(0)
    (rt, _), (st, _) = collect(resident.train), collect(streaming.train)
    assert rt.shape == st.shape == (80, 3, 32, 32) and len(resident.train) == len(
        streaming.train) == 5
    assert abs(rt.mean() - st.mean()) < 0.05 and abs(rt.std() - st.std()) < 0.05


def test_the_same_seed_gives_the_same_first_batches(fake_cifar):
    def first_batches(seed):
        torch.manual_seed(seed)
        data = get_data("cifar10", fake_cifar, BATCH_SIZE=16, VAL_SPLIT=20, SEED=seed,
                        DOWNLOAD=False)
        data.train.set_epoch(1)
        return collect(data.train, limit=2)

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ----------------------------------------------------------------------------- photo folders


def test_a_photo_folder_loads_alike_on_both_paths(tmp_path, capsys):
    root = write_photo_tree(tmp_path)
    kwargs = dict(BATCH_SIZE=8, IMAGE_SIZE=32, NUM_WORKERS=0, SEED=0)
    resident = get_data("folder", root, RESIDENT="yes", **kwargs)
    warnings = capsys.readouterr().err
    streaming = get_data("folder", root, RESIDENT="no", **kwargs)
    assert resident.classes == streaming.classes == PHOTO_CLASSES
    assert resident.test_is_val and resident.test is resident.val  # val/ but no test/
    assert resident.resize_size == streaming.resize_size == 37  # round(32 / 0.875)
    n_train = 3 * PHOTOS_PER_CLASS + 1  # and truncated.jpg, which loads
    assert len(resident.train.labels) == n_train and resident.train.images.shape[1:] == (37, 37, 3)
    # a HEIF plugin is installed: the fake .heic is a bad image
    if ".heic" in image_module.IMAGE_EXTENSIONS:
        assert "skipped 1 file that is not an image (extension .txt)" in warnings
        assert "skipped 2 unreadable image files, e.g. " in warnings
    else:
        assert "skipped 2 files that are not images (extensions .heic, .txt)" in warnings
        assert "skipped 1 unreadable image file: " in warnings and "broken.png" in warnings
    assert warnings.count("that are not images") + warnings.count("that is not an image") == 1
    # evaluation: the same centre crops of the same stored squares, normalised alike
    (rv, rl), (sv, sl) = collect(resident.val), collect(streaming.val)
    assert rv.shape == (3 * PHOTOS_PER_CLASS, 3, 32, 32) and torch.equal(rl, sl)
    assert rl.tolist() == sorted(rl.tolist()) and torch.bincount(rl).tolist() == [
        PHOTOS_PER_CLASS] * 3
    assert resident.mean == streaming.mean and torch.allclose(rv, sv, atol=1e-5)
    # training: random-resized crops of the model's size, a batch at a time, on both paths
    torch.manual_seed(0)
    (rt, rtl), (st, stl) = collect(resident.train), collect(streaming.train)
    assert rt.shape == st.shape == (n_train // 8 * 8, 3, 32, 32) and len(resident.train) == len(
        streaming.train)
    # both shuffled
    assert sorted(rtl.tolist()) != rtl.tolist() and sorted(stl.tolist()) != stl.tolist()
    assert abs(rt.mean() - st.mean()) < 0.1 and abs(rt.std() - st.std()) < 0.1
    train_crop = streaming.train.loader.dataset.transform.transforms[0]
    assert isinstance(train_crop, transforms.RandomResizedCrop) and train_crop.size == (32, 32)
    assert train_crop.scale == (0.08, 1.0) and train_crop.ratio == (3 / 4, 4 / 3)
    assert isinstance(streaming.val.loader.dataset.transform.transforms[0], transforms.CenterCrop)


def test_a_photo_folder_keeps_its_class_colours(tmp_path):
    """Labels follow the folders: class 0's RGB photos are the least red (see
    conftest.photo_pixels)."""
    root = write_photo_tree(tmp_path, splits=("train",))
    config = data_config("folder", root, BATCH_SIZE=8, IMAGE_SIZE=16, VAL_SPLIT=9, RESIDENT="yes",
                         NUM_WORKERS=0)
    data = data_module.get_data(replace(config, mean=(0,) * 3, std=(1,) * 3))
    images, labels = data.train.images, data.train.labels
    is_colour = images.float().std(-1).mean((1, 2)) > 20  # grey photos have equal channels
    red = images[..., 0].float().mean((1, 2))
    per_class = [red[(labels == c) & is_colour].mean() for c in range(3)]
    assert per_class[0] + 40 < per_class[1] < per_class[2] - 40


def test_resize_size_mean_and_std_given_are_used(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path, splits=("train", "val"), size=(40, 30))

    def refuse(*args):
        raise AssertionError("statistics computed although mean and std were given")
    monkeypatch.setattr(source_module.Images, "statistics", refuse)
    monkeypatch.setattr(source_module.ImageFiles, "statistics", refuse)
    for resident in ("yes", "no"):
        config = data_config("folder", root, BATCH_SIZE=4, IMAGE_SIZE=16, RESIDENT=resident,
                             NUM_WORKERS=0)
        data = data_module.get_data(replace(config, resize_size=24, mean=(0.5,) * 3,
                                            std=(0.25,) * 3))
        assert data.mean == (0.5,) * 3 and data.std == (0.25,
            ) * 3 and data.resize_size == 24 and data.image_size == 16
        files = folder_module._scan_folder(folder_module.list_tree(root), 24)["val"]
        stored = torch.from_numpy(np.array(files.read(0)))
        assert stored.shape == (24, 24, 3)
        images, _ = collect(data.val)
        expected = (stored[4:20, 4:20].permute(2, 0, 1).float() / 255 - 0.5) / 0.25
        assert torch.allclose(images[0], expected, atol=1e-5)
        path = files.paths[0]
        assert torch.allclose(image_module.load_image(path, 16, data.mean, data.std,
                                                      resize_size=24), expected, atol=1e-5)
    with pytest.raises(ValueError, match="mean and std"):
        replace(data_config("folder", root), mean=(0.5,) * 3)
    with pytest.raises(DataError,
            match=r"resize size 20 is smaller than --image-size \(IMAGE_SIZE\) 24: .*; lower"):
        data_module.get_data(replace(data_config("folder", root, IMAGE_SIZE=24), resize_size=20))


def test_cifar_ignores_resize_size_but_takes_mean_and_std(fake_cifar):
    config = data_config("cifar10", fake_cifar, BATCH_SIZE=8, VAL_SPLIT=20, IMAGE_SIZE=224,
                         DOWNLOAD=False)
    data = data_module.get_data(replace(config, resize_size=256, mean=(0.1, 0.2, 0.3),
                                        std=(0.5,) * 3))
    assert data.resize_size is None and data.image_size == 32 and data.mean == (0.1, 0.2, 0.3)


# -------------------------------------------------------------------------- the decoded-image cache


@pytest.fixture
def decoded(monkeypatch):
    """The files data_module decodes (decode_files' calls, flattened), for tests that must see
    none."""
    seen = []
    decode_files = decode_module.decode_files

    def counting(paths, *args, **kwargs):
        seen.extend(paths)
        return decode_files(paths, *args, **kwargs)

    for module in (source_module, folder_module):  # files read, and the cache built
        monkeypatch.setattr(module, "decode_files", counting)
    return seen


def cached_data(root, cache_dir, **constants):
    """get_data on a folder with small batches and images, decoding in this process."""
    defaults = dict(BATCH_SIZE=8, IMAGE_SIZE=32, NUM_WORKERS=0, SEED=0)
    return get_data("folder", root, CACHE_DIR=cache_dir and str(cache_dir), **defaults | constants)


def test_a_cached_folder_is_decoded_once_and_later_runs_open_no_image(
        tmp_path, decoded, monkeypatch, capsys):
    root = write_photo_tree(tmp_path / "photos")
    first = cached_data(root, tmp_path / "cache")
    n_images = 2 * 3 * PHOTOS_PER_CLASS + 2  # and truncated.jpg and broken.png, which are tried too
    assert len(decoded) == n_images and first.cache_file.startswith(str(tmp_path / "cache"))
    # the CPU reads the map
    assert not first.resident and isinstance(first.train, loader_module.MappedLoader)
    warnings = capsys.readouterr().err
    written = os.stat(first.cache_file).st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("an image file was opened although the cache is valid")
    monkeypatch.setattr(Image, "open", refuse)
    again = cached_data(root, tmp_path / "cache")
    assert len(decoded) == n_images and os.stat(again.cache_file).st_mtime_ns == written
    later_warnings = capsys.readouterr().err  # the cache remembers what was skipped
    assert ("skipped 1 unreadable image file: " in later_warnings
            and "files that are not images" in later_warnings)
    assert later_warnings.splitlines()[-3:] == warnings.splitlines()[-3:]
    assert again.mean == first.mean and again.classes == first.classes == PHOTO_CLASSES
    (v1, l1), (v2, l2) = collect(first.val), collect(again.val)
    assert torch.equal(v1, v2) and torch.equal(l1, l2)


def test_a_cached_folders_statistics_are_a_samples_remembered_and_the_same_resident_or_not(
        tmp_path, monkeypatch):
    root = write_photo_tree(tmp_path / "photos")
    streamed = cached_data(root, tmp_path / "cache", RESIDENT="no")
    # under 2,000: all of them
    exact = source_module.channel_stats(streamed.train.images[streamed.train.rows])

    def refuse(images):
        raise AssertionError("statistics computed again although the cache remembers them")
    monkeypatch.setattr(source_module, "channel_stats", refuse)
    resident = cached_data(root, tmp_path / "cache", RESIDENT="yes")
    assert resident.resident and not streamed.resident
    assert (resident.mean, resident.std) == (streamed.mean, streamed.std) == exact


def test_the_cache_is_rebuilt_when_a_file_or_the_image_size_changes(tmp_path, decoded):
    root = write_image_tree(tmp_path, splits=("train", "val"), size=(40, 30))
    assert len(cached_data(root, tmp_path / "cache").train.labels) == 18 and len(decoded) == 36
    cat = os.path.join(root, "train", "cats", "0.png")

    def rebuilt(**options):
        """The number of files the next get_data decodes, and its Data."""
        before = len(decoded)
        data = cached_data(root, tmp_path / "cache", **options)
        return len(decoded) - before, data

    assert rebuilt()[0] == 0
    Image.new("RGB", (40, 30), (255, 0, 0)).save(cat)  # changed: another size on disk
    count, data = rebuilt()
    red = torch.tensor([255, 0, 0], dtype=torch.uint8)
    assert count == 36 and sum(bool((image == red).all()) for image in data.train.images[
        data.train.rows]) == 1
    stat = os.stat(cat)
    # touched: same bytes, a new time
    os.utime(cat, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert rebuilt()[0] == 36
    # added
    Image.new("RGB", (40, 30), (0, 0, 255)).save(os.path.join(root, "train", "cats", "new.png"))
    count, data = rebuilt()
    assert count == 37 and len(data.train.labels) == 19
    os.remove(cat)  # removed
    count, data = rebuilt()
    assert count == 36 and len(data.train.labels) == 18
    count, data = rebuilt(IMAGE_SIZE=16)  # another stored size (IMAGE_SIZE 16: 18 px squares)
    assert count == 36 and data.resize_size == 18
    assert rebuilt(IMAGE_SIZE=16)[0] == rebuilt()[0] == 0  # both sizes stay cached
    # the superseded 37-px caches are gone
    assert len(glob.glob(str(tmp_path / "cache" / "*.npy"))) == 2


def test_a_truncated_cache_file_is_rebuilt_never_trusted(tmp_path, decoded):
    root = write_image_tree(tmp_path, splits=("train", "val"), size=(40, 30))
    first = cached_data(root, tmp_path / "cache", RESIDENT="yes")
    stored = first.val.images.clone()
    size = os.path.getsize(first.cache_file)
    with open(first.cache_file, "r+b") as f:  # a copy cut short, a full disk
        f.truncate(size // 2)
    again = cached_data(root, tmp_path / "cache", RESIDENT="yes")
    assert len(decoded) == 2 * 36 and os.path.getsize(again.cache_file) == size
    assert torch.equal(again.val.images, stored)


def test_cached_resident_and_streamed_paths_give_the_same_pixels(tmp_path):
    root = write_photo_tree(tmp_path / "photos")
    # rows of the memory-mapped cache, read a batch at a time
    cached = cached_data(root, tmp_path / "cache")
    resident = cached_data(root, tmp_path / "cache", RESIDENT="yes")  # the same rows, on the device
    streamed = cached_data(root, None, RESIDENT="no")  # no cache: PIL in DataLoader workers
    assert isinstance(streamed.train, loader_module.StreamingLoader) and streamed.cache_file is None
    assert cached.mean == resident.mean == streamed.mean  # under 2,000 images: all of them, exactly
    # the stored squares: each cache row is the file as the streaming path reads it
    files = folder_module._scan_folder(folder_module.list_tree(root), 37)["val"]
    rows = cached.val.images[cached.val.rows]
    assert torch.equal(rows, resident.val.images)
    for i in range(len(files)):
        assert torch.equal(rows[i], torch.from_numpy(np.array(files.read(i))))
    # evaluation: the same centre crops, normalised alike, on all three paths
    (cv, cl), (rv, rl), (sv, sl) = collect(cached.val), collect(resident.val), collect(streamed.val)
    assert torch.equal(cv, rv) and torch.equal(cl, rl) and torch.equal(cl, sl) and torch.allclose(
        cv, sv, atol=1e-5)
    # training: the same seed gives the same shuffle, boxes and flips from the cache and from the
    # device
    for epoch in (1, 2):
        for data in (cached, resident):
            data.train.set_epoch(epoch)
        torch.manual_seed(epoch)
        (ct, ctl) = collect(cached.train)
        torch.manual_seed(epoch)
        (rt, rtl) = collect(resident.train)
        assert torch.equal(ct, rt) and torch.equal(ctl, rtl)
    assert torch.equal(cached.train.first_images(5), resident.train.first_images(5))
    # and a box cut from a cache row matches PIL's crop of the streamed square (see the test of the
    # two paths)
    box = (3, 5, 30, 24)
    ours = augment_module.crop_and_resize(rows[:1], torch.tensor([box]), 32)[0][:, 1:-1, 1:-1]
    theirs = np.array(F.resized_crop(files.read(0), *box, [32, 32]))
    assert (ours - torch.from_numpy(theirs).permute(2, 0, 1)[:, 1:-1, 1:-1]).abs().max() <= 1 + 1e-3


def test_the_runs_device_reaches_the_decode_when_the_cache_is_built_and_files_are_read(
        tmp_path, monkeypatch):
    """decode_files decodes JPEGs on a CUDA device: get_data hands it the run's device at both
    places it decodes a folder (here the CPU, which decode_files keeps to its worker processes)."""
    calls = []
    decode_files = decode_module.decode_files

    def recording(paths, size, out, num_workers, desc, *, device=None):
        calls.append((desc, device))
        return decode_files(paths, size, out, num_workers, desc, device=device)
    for module in (source_module, folder_module):  # files read, and the cache built
        monkeypatch.setattr(module, "decode_files", recording)
    root = write_image_tree(tmp_path / "photos")
    config = data_config("folder", root, BATCH_SIZE=8, IMAGE_SIZE=16, NUM_WORKERS=0,
                         CACHE_DIR=str(tmp_path / "c"))
    data_module.get_data(config, "cpu")
    data_module.get_data(replace(config, cache_dir=None, resident="yes"), torch.device("cpu"))
    assert calls == [("decoding", torch.device("cpu")), ("decoding train", torch.device("cpu")),
                     ("decoding val", torch.device("cpu"))]


def test_an_unwritable_cache_folder_falls_back_or_is_refused(tmp_path, capsys, monkeypatch):
    root = write_image_tree(tmp_path / "tree", splits=("train", "val"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError,
            match=r"^--cache-dir \(CACHE_DIR\) .*a_file/cache: cannot write.*or to none "):
        cached_data(root, tmp_path / "a_file" / "cache", IMAGE_SIZE=8)
    monkeypatch.setattr(cache_module, "default_cache_dir", REAL_DEFAULT_CACHE_DIR)
    # "auto" cannot be made: no cache, a warning
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))
    data = cached_data(root, "auto", IMAGE_SIZE=8)
    assert data.cache_file is None and data.resident
    assert (
        "images are decoded without a cache (set --cache-dir (CACHE_DIR) to"
        in capsys.readouterr().err
    )


def test_a_folder_whose_classes_are_wrong_is_refused_before_anything_is_decoded(tmp_path, decoded):
    root = write_image_tree(tmp_path, splits=("train",), classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        cached_data(root, tmp_path / "cache")
    assert decoded == [] and not os.path.exists(tmp_path / "cache")




def test_auto_caches_in_the_users_cache_folder_one_file_per_data_folder(
        tmp_path, monkeypatch, decoded):
    monkeypatch.setattr(cache_module, "default_cache_dir", REAL_DEFAULT_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    one = write_image_tree(tmp_path / "one", splits=("train", "val"), seed=1)
    two = write_image_tree(tmp_path / "two", splits=("train", "val"), seed=2)  # the same file names
    first, second = (cached_data(folder, "auto", RESIDENT="yes") for folder in (one, two))
    folder = str(tmp_path / "xdg" / "lra-pipeline")
    assert os.path.dirname(first.cache_file) == os.path.dirname(second.cache_file) == folder
    assert first.cache_file != second.cache_file and not torch.equal(
        first.val.images, second.val.images)
    # nothing written beside them
    assert sorted(os.listdir(one)) == sorted(os.listdir(two)) == ["train", "val"]
    assert len(decoded) == 2 * 36 and cached_data(one, "auto").cache_file == first.cache_file
    assert len(decoded) == 2 * 36  # the first folder's cache is still there, and opened


def test_a_folder_run_with_a_mistyped_data_dir_creates_nothing(tmp_path, user_cache):
    for cache_dir in ("auto", str(tmp_path / "cache"), None):
        with pytest.raises(DataError, match="does not exist"):
            cached_data(str(tmp_path / "nowhere"), cache_dir)
    assert os.listdir(tmp_path) == [] and not os.path.exists(user_cache)
