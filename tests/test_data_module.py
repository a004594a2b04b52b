"""Data: the CIFAR-10 reader, splits, ImageFolder trees, offline errors, augmentation, both loader paths."""

import os

import numpy as np
import pytest
import torch

import data_module
from conftest import CLASSES, write_fake_cifar, write_image_tree
from data_module import DataError


def collect(loader, limit=None):
    images, labels = [], []
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_reader_on_a_fake_batch_folder(fake_cifar):
    data = data_module.get_data("cifar10", fake_cifar, batch_size=8, val_split=20, download=False)
    assert data.classes == CLASSES and data.resident and not data.val_is_test
    assert len(data.train.labels) == 80 and len(data.val.labels) == 20 and len(data.test.labels) == 20
    assert torch.bincount(data.val.labels).tolist() == [2] * 10  # stratified
    images, labels = next(iter(data.train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64


def test_cifar_images_are_read_in_the_python_version_layout(tmp_path):
    root = write_fake_cifar(tmp_path, per_batch=10)
    import pickle
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"][0]
    train_images = data_module.read_cifar10(root, download=False)[0]
    # row: 1,024 red values, then green, then blue, each row-major; the reader gives H x W x C
    expected = raw.reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(train_images[0].numpy(), expected)


def test_val_split_zero_validates_on_the_test_set(fake_cifar):
    data = data_module.get_data("cifar10", fake_cifar, batch_size=8, val_split=0, download=False)
    assert data.val_is_test and data.val is data.test and len(data.train.labels) == 100


def test_train_subset_is_stratified_and_counted_after_the_split(fake_cifar):
    data = data_module.get_data("cifar10", fake_cifar, batch_size=8, val_split=20, train_subset=30,
                                download=False)
    assert len(data.train.labels) == 30 and torch.bincount(data.train.labels).tolist() == [3] * 10
    with pytest.raises(DataError, match="TRAIN_SUBSET = 81"):
        data_module.get_data("cifar10", fake_cifar, val_split=20, train_subset=81, download=False)


def test_val_split_larger_than_the_training_set_is_refused(fake_cifar):
    with pytest.raises(DataError, match="VAL_SPLIT = 100 is too large"):
        data_module.get_data("cifar10", fake_cifar, val_split=100, download=False)


def test_missing_folder_offline_gives_one_clear_message(tmp_path):
    with pytest.raises(DataError) as error:
        data_module.get_data("cifar10", str(tmp_path / "nowhere"), download=True)
    message = str(error.value)
    assert "download failed" in message and "cifar-10-batches-py" in message and "DATA_DIR" in message
    assert "\n" not in message


def test_missing_folder_without_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError, match="DOWNLOAD is off.*data_batch_1..5"):
        data_module.get_data("cifar10", str(tmp_path), download=False)


def test_truncated_batch_file_is_named(fake_cifar):
    path = os.path.join(fake_cifar, "cifar-10-batches-py", "data_batch_3")
    with open(path, "rb") as f:
        head = f.read(500)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        data_module.get_data("cifar10", fake_cifar, download=False)


def test_a_file_that_is_not_a_pickle_is_named(fake_cifar):
    with open(os.path.join(fake_cifar, "cifar-10-batches-py", "test_batch"), "w") as f:
        f.write("this is not a pickle")
    with pytest.raises(DataError, match="test_batch is not a readable"):
        data_module.get_data("cifar10", fake_cifar, download=False)


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


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (50, 6, 5, 3), dtype=torch.uint8)
    mean, std = data_module.channel_stats(images)
    values = images.numpy().reshape(-1, 3) / 255
    assert np.allclose(mean, values.mean(0)) and np.allclose(std, values.std(0))


# ----------------------------------------------------------------------------- ImageFolder trees


@pytest.mark.parametrize("resident", [True, False])
def test_an_image_folder_tree_loads_resized(tmp_path, resident):
    root = write_image_tree(tmp_path, splits=("train", "val", "test"))
    data = data_module.get_data("folder", root, batch_size=4, image_size=12, resident=resident, num_workers=0)
    assert data.classes == ["cats", "dogs", "owls"] and data.image_size == 12 and data.resident == resident
    images, labels = collect(data.val)
    assert images.shape == (18, 3, 12, 12) and sorted(labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6


def test_a_tree_without_val_holds_out_val_split(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), per_class=10)
    data = data_module.get_data("folder", root, batch_size=4, image_size=8, val_split=6, resident=True,
                                num_workers=0)
    assert len(data.val.labels) == 6 and len(data.train.labels) == 24 and data.test is data.val


def test_files_and_their_decoded_images_split_and_measure_alike(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), per_class=10)
    files, _ = data_module._scan_folder(root, image_size=8)
    images = {"train": files["train"].decode(num_workers=0, desc="decoding")}
    from_files = data_module._split(files, val_split=6, train_subset=12, seed=3, data_dir=root)
    from_images = data_module._split(images, val_split=6, train_subset=12, seed=3, data_dir=root)
    for name in ("train", "val"):
        decoded = from_files[name].decode(num_workers=0, desc=name)
        assert torch.equal(decoded.images, from_images[name].images)
        assert torch.equal(decoded.labels, from_images[name].labels)
    assert len(from_images["train"]) == 12 and torch.bincount(from_images["val"].labels).tolist() == [2, 2, 2]
    # under 2,000 files the sample is all of them, so the estimate is the exact value
    assert from_files["train"].statistics(seed=0, num_workers=0) == from_images["train"].statistics(0, 0)


def test_a_tree_with_one_class_is_refused(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",), classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        data_module.get_data("folder", root, num_workers=0)


def test_a_missing_tree_is_refused(tmp_path):
    with pytest.raises(DataError, match="no ImageFolder tree"):
        data_module.get_data("folder", str(tmp_path), num_workers=0)


def test_unreadable_images_are_skipped_with_a_count(tmp_path, capsys):
    root = write_image_tree(tmp_path, splits=("train", "val"))
    with open(os.path.join(root, "train", "cats", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    with open(os.path.join(root, "train", "dogs", "empty.jpg"), "wb"):
        pass
    data = data_module.get_data("folder", root, batch_size=4, image_size=8, resident=True, num_workers=0)
    assert len(data.train.labels) == 18
    assert "skipped 2 unreadable image file(s)" in capsys.readouterr().err


def test_an_empty_val_folder_is_refused(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",))
    os.makedirs(os.path.join(root, "val", "cats"))
    with pytest.raises(DataError, match="no readable images"):
        data_module.get_data("folder", root, num_workers=0)


# ----------------------------------------------------------------------------- augmentation


def test_flip_alone_mirrors_exactly():
    images = torch.randint(0, 256, (6, 5, 7, 3), dtype=torch.uint8)
    flipped = torch.tensor([True, False, True, False, True, True])
    out = data_module.crop_flip(images, 0, flipped)
    assert torch.equal(out[flipped], images[flipped].flip(2))
    assert torch.equal(out[~flipped], images[~flipped])


@pytest.mark.parametrize("reflect", [False, True])
def test_crops_are_shifts_within_the_padding(reflect):
    torch.manual_seed(0)
    padding = 2
    images = torch.randint(1, 256, (40, 8, 8, 3), dtype=torch.uint8)  # no zeros: a zero is padding
    out = data_module.crop_flip(images, padding, None, reflect=reflect)
    mode = "reflect" if reflect else "constant"
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (padding,) * 4, mode=mode)
    shifts_seen = set()
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], out[i].permute(2, 0, 1).float())]
        assert matches, f"image {i} is not a crop of its padded self"
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 5  # the shifts really vary


def test_alternate_flip_mirrors_every_image_every_other_epoch():
    images = torch.randint(0, 256, (10, 4, 4, 3), dtype=torch.uint8)
    labels = torch.arange(10)
    loader = data_module.ResidentLoader(images, labels, batch_size=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                                        train=True, crop_padding=0, flip="alternate")
    epochs = []
    for epoch in (1, 2, 3):
        loader.set_epoch(epoch)
        x, y = collect(loader)
        epochs.append(x[torch.argsort(y)])
    assert torch.allclose(epochs[1], epochs[0].flip(-1)) and torch.allclose(epochs[2], epochs[0])
    assert not torch.allclose(epochs[0], loader.normalize(images))  # about half start flipped


def test_normalisation_uses_the_training_statistics(fake_cifar):
    data = data_module.get_data("cifar10", fake_cifar, batch_size=100, val_split=0, crop_padding=0, flip="none",
                                download=False)
    images, _ = collect(data.train)
    per_channel = images.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-2)


# ----------------------------------------------------------------------------- the two loader paths


def test_resident_and_streaming_paths_agree(fake_cifar):
    kwargs = dict(batch_size=16, val_split=20, download=False, num_workers=0, seed=1)
    resident = data_module.get_data("cifar10", fake_cifar, resident=True, **kwargs)
    streaming = data_module.get_data("cifar10", fake_cifar, resident=False, **kwargs)
    assert not streaming.resident and resident.mean == streaming.mean
    # without augmentation (validation) the batches are the same images, normalised the same way
    (rv, rl), (sv, sl) = collect(resident.val), collect(streaming.val)
    assert rv.shape == sv.shape and torch.equal(rl, sl) and torch.allclose(rv, sv, atol=1e-5)
    # with augmentation: same shapes, batch counts and statistics
    torch.manual_seed(0)
    (rt, _), (st, _) = collect(resident.train), collect(streaming.train)
    assert rt.shape == st.shape == (80, 3, 32, 32) and len(resident.train) == len(streaming.train) == 5
    assert abs(rt.mean() - st.mean()) < 0.05 and abs(rt.std() - st.std()) < 0.05


def test_the_same_seed_gives_the_same_first_batches(fake_cifar):
    def first_batches(seed):
        torch.manual_seed(seed)
        data = data_module.get_data("cifar10", fake_cifar, batch_size=16, val_split=20, seed=seed, download=False)
        data.train.set_epoch(1)
        return collect(data.train, limit=2)

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_epochs_shuffle_differently_and_shards_do_not_overlap():
    images = torch.zeros(20, 4, 4, 3, dtype=torch.uint8)
    labels = torch.arange(20)
    shards = [data_module.ResidentLoader(images, labels, batch_size=5, mean=(0,) * 3, std=(1,) * 3, train=True,
                                         rank=r, world_size=2) for r in (0, 1)]
    seen = [collect(s)[1] for s in shards]
    assert len(seen[0]) == len(seen[1]) == 10 and not set(seen[0].tolist()) & set(seen[1].tolist())
    shards[0].set_epoch(2)
    assert not torch.equal(collect(shards[0])[1], seen[0])


def test_a_training_set_smaller_than_a_batch_still_gives_one_batch():
    images = torch.zeros(5, 4, 4, 3, dtype=torch.uint8)
    loader = data_module.ResidentLoader(images, torch.arange(5), batch_size=8, mean=(0,) * 3, std=(1,) * 3,
                                        train=True)
    assert len(loader) == 1 and len(collect(loader)[1]) == 5


def test_load_image_for_prediction(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",))
    image = data_module.load_image(os.path.join(root, "train", "cats", "0.png"), 16, (0.5,) * 3, (0.5,) * 3)
    assert image.shape == (3, 16, 16)
    with pytest.raises(DataError, match="does not exist"):
        data_module.load_image(str(tmp_path / "missing.png"), 16, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not an image"):
        data_module.load_image(str(tmp_path / "notes.txt"), 16, (0.5,) * 3, (0.5,) * 3)
