"""Data: the CIFAR-10 reader, splits, ImageFolder trees, offline errors, augmentation, the loader paths, the cache."""

import glob
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms
from torchvision.transforms import functional as F

import data_module
from conftest import (CLASSES, PHOTO_CLASSES, PHOTOS_PER_CLASS, write_fake_cifar, write_image_tree,
                      write_photo_tree)
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
    files, _ = data_module._scan_folder(root, size=8)
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


# ----------------------------------------------------------------------------- photo folders


def test_a_photo_folder_loads_alike_on_both_paths(tmp_path, capsys):
    root = write_photo_tree(tmp_path)
    kwargs = dict(batch_size=8, image_size=32, num_workers=0, seed=0)
    resident = data_module.get_data("folder", root, resident=True, **kwargs)
    warnings = capsys.readouterr().err
    streaming = data_module.get_data("folder", root, resident=False, **kwargs)
    assert resident.classes == streaming.classes == PHOTO_CLASSES
    assert resident.resize_size == streaming.resize_size == 37  # round(32 / 0.875)
    n_train = 3 * PHOTOS_PER_CLASS + 1  # and truncated.jpg, which loads
    assert len(resident.train.labels) == n_train and resident.train.images.shape[1:] == (37, 37, 3)
    if ".heic" in data_module.IMAGE_EXTENSIONS:  # a HEIF plugin is installed: the fake .heic is a bad image
        assert "skipped 1 files that are not images (extensions .txt)" in warnings
        assert "skipped 2 unreadable image file(s), e.g. " in warnings
    else:
        assert "skipped 2 files that are not images (extensions .heic, .txt)" in warnings
        assert "skipped 1 unreadable image file(s), e.g. " in warnings and "broken.png" in warnings
    assert warnings.count("not images") == 1
    # evaluation: the same centre crops of the same stored squares, normalised alike
    (rv, rl), (sv, sl) = collect(resident.val), collect(streaming.val)
    assert rv.shape == (3 * PHOTOS_PER_CLASS, 3, 32, 32) and torch.equal(rl, sl)
    assert rl.tolist() == sorted(rl.tolist()) and torch.bincount(rl).tolist() == [PHOTOS_PER_CLASS] * 3
    assert resident.mean == streaming.mean and torch.allclose(rv, sv, atol=1e-5)
    # training: random-resized crops of the model's size, a batch at a time, on both paths
    torch.manual_seed(0)
    (rt, rtl), (st, stl) = collect(resident.train), collect(streaming.train)
    assert rt.shape == st.shape == (n_train // 8 * 8, 3, 32, 32) and len(resident.train) == len(streaming.train)
    assert sorted(rtl.tolist()) != rtl.tolist()  # shuffled
    assert abs(rt.mean() - st.mean()) < 0.1 and abs(rt.std() - st.std()) < 0.1
    train_crop = streaming.train.loader.dataset.transform.transforms[0]
    assert isinstance(train_crop, transforms.RandomResizedCrop) and train_crop.size == (32, 32)
    assert train_crop.scale == (0.08, 1.0) and train_crop.ratio == (3 / 4, 4 / 3)
    assert isinstance(streaming.val.loader.dataset.transform.transforms[0], transforms.CenterCrop)


def test_a_photo_folder_keeps_its_class_colours(tmp_path):
    """Labels follow the folders: class 0's RGB photos are the least red (see conftest.photo_pixels)."""
    root = write_photo_tree(tmp_path, splits=("train",))
    data = data_module.get_data("folder", root, batch_size=8, image_size=16, val_split=9, resident=True,
                                num_workers=0, mean=(0,) * 3, std=(1,) * 3)
    images, labels = data.train.images, data.train.labels
    is_colour = images.float().std(-1).mean((1, 2)) > 20  # grey photos have equal channels
    red = images[..., 0].float().mean((1, 2))
    per_class = [red[(labels == c) & is_colour].mean() for c in range(3)]
    assert per_class[0] + 40 < per_class[1] < per_class[2] - 40


def test_every_image_mode_reads_as_rgb():
    def pixel(image):
        return data_module.to_rgb(image).getpixel((0, 0))

    def row(image):
        return [tuple(p) for p in np.asarray(data_module.to_rgb(image))[0].tolist()]

    assert pixel(Image.new("L", (2, 2), 90)) == (90, 90, 90)
    assert pixel(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)
    # 16-bit greyscale scaled to 8 bits (Pillow's own convert clips every value above 255 to white)
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    for image in (Image.fromarray(sixteen), Image.fromarray(sixteen.astype(np.int32), "I")):
        assert image.mode in ("I;16", "I")
        assert np.array_equal(np.asarray(data_module.to_rgb(image))[0, :, 0], [0, 100, 255])
    # transparency is composited on white: opaque keeps its colour, clear is white, half is halfway
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 0, 0, 255), (200, 0, 0, 0), (0, 0, 0, 128)])
    assert row(rgba) == [(200, 0, 0), (255, 255, 255), (127, 127, 127)]
    assert pixel(Image.new("LA", (2, 2), (10, 0))) == (255, 255, 255)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putdata([0, 1])
    assert row(palette) == [(255, 0, 0), (0, 0, 255)]
    palette.info["transparency"] = 0  # index 0 is clear
    assert row(palette) == [(255, 255, 255), (0, 0, 255)]
    for image in (rgba, palette, Image.new("I;16", (2, 2))):
        assert data_module.to_rgb(image).mode == "RGB"


def test_exif_orientation_turns_a_sideways_photo_upright(tmp_path):
    stored = np.zeros((100, 200, 3), dtype=np.uint8)  # 200 wide, 100 high: left half red, right half blue
    stored[:, :100, 0] = 255
    stored[:, 100:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn 90 degrees clockwise to view, so the left half ends on top
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.asarray(data_module.open_rgb(path)).astype(int)
    assert upright.shape == (200, 100, 3)
    assert (upright[:90, :, 0] > 200).all() and (upright[:90, :, 2] < 50).all()   # top: red
    assert (upright[110:, :, 2] > 200).all() and (upright[110:, :, 0] < 50).all()  # bottom: blue
    square = data_module.load_image(path, 16, (0,) * 3, (1,) * 3)  # the middle of the upright photo
    assert (square[0, :7] > 0.8).all() and (square[2, 9:] > 0.8).all() and (square[0, 9:] < 0.2).all()


def test_a_truncated_jpeg_loads_grey_where_cut_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_module, "_WARNED", set())
    noise = np.random.default_rng(0).integers(-20, 20, size=(80, 120, 3))
    whole = io.BytesIO()  # noisy, so that the data, not the header, fills most of the file
    Image.fromarray((noise + [200, 60, 60]).astype(np.uint8)).save(whole, "JPEG")
    path = str(tmp_path / "cut.jpg")
    with open(path, "wb") as f:
        f.write(whole.getvalue()[:len(whole.getvalue()) * 6 // 10])
    image = np.asarray(data_module.open_rgb(path)).astype(int)
    assert image.shape == (80, 120, 3)
    assert np.abs(image[:8].mean((0, 1)) - [200, 60, 60]).max() < 5 and (image[-1] == 128).all()
    assert "cut.jpg is truncated or damaged" in capsys.readouterr().err
    data_module.open_rgb(path)
    assert capsys.readouterr().err == ""  # named once per process
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow's global switch is left as it was


def test_crop_boxes_fit_and_follow_torchvisions_distribution():
    torch.manual_seed(0)
    for height, width in [(256, 256), (100, 300)]:
        boxes = data_module.sample_crop_boxes(3000, height, width).double()
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        # within scale (0.08, 1) and ratio (3/4, 4/3) up to the rounding of w and h to whole pixels
        area = height * width
        assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
        assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
        image = torch.zeros(3, height, width)
        reference = torch.tensor([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                                  for _ in range(3000)]).double()
        for ours, theirs in [(h * w / area, reference[:, 2] * reference[:, 3] / area),
                             ((w / h).log(), (reference[:, 3] / reference[:, 2]).log()),
                             (top + h / 2, reference[:, 0] + reference[:, 2] / 2)]:
            standard_error = (ours.var() / 3000 + theirs.var() / 3000).sqrt()
            assert (ours.mean() - theirs.mean()).abs() < 4 * standard_error


def test_crop_boxes_fall_back_to_torchvisions_central_crop():
    # no box of 99-100% of a 10 x 100 image has a ratio in (3/4, 4/3): ten misses, then the central crop
    boxes = data_module.sample_crop_boxes(5, 10, 100, scale=(0.99, 1.0))
    expected = transforms.RandomResizedCrop.get_params(torch.zeros(3, 10, 100), [0.99, 1.0], [3 / 4, 4 / 3])
    assert boxes.tolist() == [list(expected)] * 5 == [[0, 43, 10, 13]] * 5


def smooth_photo(size=256, seed=0):
    """A uint8 (size, size, 3) image with a photo's smoothness: bicubic-enlarged noise."""
    noise = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * 255
    big = torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return big.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()


@pytest.mark.parametrize("box, enlarged", [((20, 30, 150, 120), True), ((40, 100, 90, 150), True),
                                           ((0, 0, 256, 256), False), ((10, 5, 240, 200), False)])
def test_the_same_box_gives_the_same_pixels_on_both_paths(box, enlarged):
    """The resident crop (roi_align) against the streaming path's (resized_crop of the PIL image).

    Compared inside a one-pixel frame: at a box's edge the resident crop interpolates with the image's real
    pixels just outside the box, where resized_crop repeats the box's edge. Inside it: a box enlarged to
    224 is plain bilinear on both paths, equal to float precision, and PIL rounds to 8 bits after each of
    its two passes (at most 1 level); a box shrunk to 224 is antialiased by PIL's triangle filter and by
    roi_align's averaged samples, two low-pass filters that differ by under 2.5 levels (1%) on a photo.
    """
    image = smooth_photo()
    ours = data_module.crop_and_resize(image[None], torch.tensor([box]), 224)[0][:, 1:-1, 1:-1]
    streamed = np.array(F.resized_crop(Image.fromarray(image.numpy()), *box, [224, 224]))
    difference = (ours - torch.from_numpy(streamed).permute(2, 0, 1)[:, 1:-1, 1:-1]).abs()
    if enlarged:
        bilinear = F.resized_crop(image.permute(2, 0, 1).float(), *box, [224, 224], antialias=False)
        assert (ours - bilinear[:, 1:-1, 1:-1]).abs().max() < 1e-3
        assert difference.max() <= 1 + 1e-3
    else:
        assert difference.max() < 2.5 and difference.mean() < 0.5


def test_resident_photo_crops_are_each_images_own_box_then_flipped():
    """Channel 0 is the image's label, channels 1 and 2 its column and row: each crop shows its own image,
    and its columns tell its box and its flip."""
    n, size = 32, 64
    columns = torch.arange(size).expand(size, size)
    images = torch.stack([torch.stack([torch.full((size, size), 7 * i), columns, columns.T], -1)
                          for i in range(n)]).to(torch.uint8)
    labels = torch.arange(n)
    loader = data_module.ResidentLoader(images, labels, batch_size=8, mean=(0,) * 3, std=(1 / 255,) * 3,
                                        train=True, flip="random", crop_size=16, channels_last=False)
    torch.manual_seed(0)
    crops, seen = collect(loader)
    assert crops.shape == (n, 3, 16, 16)
    assert torch.allclose(crops[:, 0], 7 * seen.view(-1, 1, 1).float(), atol=1e-3)
    left_to_right = crops[:, 1, :, -1] - crops[:, 1, :, 0]
    assert (left_to_right.abs() > 1).all()  # a ramp: each crop is a resized part of its own image
    flipped = left_to_right[:, 0] < 0
    assert 8 < flipped.sum() < 24  # about half are mirrored
    assert len({round(float(c), 1) for c in crops[:, 1, 8, 0]}) > 20  # the boxes differ from image to image


def test_photo_evaluation_is_the_centre_crop():
    images = torch.stack([smooth_photo(37, seed=i) for i in range(5)])
    loader = data_module.ResidentLoader(images, torch.arange(5), batch_size=4, mean=(0,) * 3, std=(1 / 255,) * 3,
                                        train=False, crop_size=32)
    batch, _ = collect(loader)
    for image, out in zip(images, batch):
        centre = F.center_crop(Image.fromarray(image.numpy()), [32, 32])  # offset round(2.5) = 2, as torchvision
        assert torch.equal(out, torch.from_numpy(np.array(centre)).permute(2, 0, 1).float())
    assert torch.equal(loader.first_images(5), batch)


def test_resize_size_mean_and_std_given_are_used(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path, splits=("train", "val"), size=(40, 30))

    def refuse(*args):
        raise AssertionError("statistics computed although mean and std were given")
    monkeypatch.setattr(data_module.Images, "statistics", refuse)
    monkeypatch.setattr(data_module.ImageFiles, "statistics", refuse)
    for resident in (True, False):
        data = data_module.get_data("folder", root, batch_size=4, image_size=16, resize_size=24, mean=(0.5,) * 3,
                                    std=(0.25,) * 3, resident=resident, num_workers=0)
        assert data.mean == (0.5,) * 3 and data.std == (0.25,) * 3 and data.resize_size == 24 and data.image_size == 16
        files = data_module._scan_folder(root, 24)[0]["val"]
        stored = torch.from_numpy(np.array(files.read(0)))
        assert stored.shape == (24, 24, 3)
        images, _ = collect(data.val)
        expected = (stored[4:20, 4:20].permute(2, 0, 1).float() / 255 - 0.5) / 0.25
        assert torch.allclose(images[0], expected, atol=1e-5)
        path = files.paths[0]
        assert torch.allclose(data_module.load_image(path, 16, data.mean, data.std, resize_size=24), expected,
                              atol=1e-5)
    with pytest.raises(ValueError, match="mean and std"):
        data_module.get_data("folder", root, mean=(0.5,) * 3)
    with pytest.raises(DataError, match="resize size 20 is smaller than IMAGE_SIZE = 24"):
        data_module.get_data("folder", root, image_size=24, resize_size=20)


def test_cifar_ignores_resize_size_but_takes_mean_and_std(fake_cifar):
    data = data_module.get_data("cifar10", fake_cifar, batch_size=8, val_split=20, image_size=224, resize_size=256,
                                mean=(0.1, 0.2, 0.3), std=(0.5,) * 3, download=False)
    assert data.resize_size is None and data.image_size == 32 and data.mean == (0.1, 0.2, 0.3)


# ----------------------------------------------------------------------------- the decoded-image cache


@pytest.fixture
def decoded(monkeypatch):
    """The files data_module decodes (decode_files' calls, flattened), for tests that must see none."""
    seen = []
    decode_files = data_module.decode_files

    def counting(paths, *args, **kwargs):
        seen.extend(paths)
        return decode_files(paths, *args, **kwargs)

    monkeypatch.setattr(data_module, "decode_files", counting)
    return seen


def cached_data(root, cache_dir, **options):
    """get_data on a folder with small batches and images, decoding in this process."""
    defaults = dict(batch_size=8, image_size=32, num_workers=0, seed=0)
    return data_module.get_data("folder", root, cache_dir=cache_dir and str(cache_dir), **{**defaults, **options})


def test_a_cached_folder_is_decoded_once_and_later_runs_open_no_image(tmp_path, decoded, monkeypatch, capsys):
    root = write_photo_tree(tmp_path / "photos")
    first = cached_data(root, tmp_path / "cache")
    n_images = 2 * 3 * PHOTOS_PER_CLASS + 2  # and truncated.jpg and broken.png, which are tried too
    assert len(decoded) == n_images and first.cache_file.startswith(str(tmp_path / "cache"))
    assert not first.resident and isinstance(first.train, data_module.MappedLoader)  # the CPU reads the map
    warnings = capsys.readouterr().err
    written = os.stat(first.cache_file).st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("an image file was opened although the cache is valid")
    monkeypatch.setattr(Image, "open", refuse)
    again = cached_data(root, tmp_path / "cache")
    assert len(decoded) == n_images and os.stat(again.cache_file).st_mtime_ns == written
    later_warnings = capsys.readouterr().err  # the cache remembers what was skipped
    assert "skipped 1 unreadable image file(s)" in later_warnings and "files that are not images" in later_warnings
    assert later_warnings.splitlines()[-3:] == warnings.splitlines()[-3:]
    assert again.mean == first.mean and again.classes == first.classes == PHOTO_CLASSES
    (v1, l1), (v2, l2) = collect(first.val), collect(again.val)
    assert torch.equal(v1, v2) and torch.equal(l1, l2)


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
    assert count == 36 and sum(bool((image == red).all()) for image in data.train.images[data.train.rows]) == 1
    stat = os.stat(cat)
    os.utime(cat, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, a new time
    assert rebuilt()[0] == 36
    Image.new("RGB", (40, 30), (0, 0, 255)).save(os.path.join(root, "train", "cats", "new.png"))  # added
    count, data = rebuilt()
    assert count == 37 and len(data.train.labels) == 19
    os.remove(cat)  # removed
    count, data = rebuilt()
    assert count == 36 and len(data.train.labels) == 18
    count, data = rebuilt(image_size=16)  # another stored size (IMAGE_SIZE 16: 18 px squares)
    assert count == 36 and data.resize_size == 18
    assert rebuilt(image_size=16)[0] == rebuilt()[0] == 0  # both sizes stay cached
    assert len(glob.glob(str(tmp_path / "cache" / "*.npy"))) == 2  # the superseded 37-px caches are gone


def test_a_truncated_cache_file_is_rebuilt_never_trusted(tmp_path, decoded):
    root = write_image_tree(tmp_path, splits=("train", "val"), size=(40, 30))
    first = cached_data(root, tmp_path / "cache", resident=True)
    stored = first.val.images.clone()
    size = os.path.getsize(first.cache_file)
    with open(first.cache_file, "r+b") as f:  # a copy cut short, a full disk
        f.truncate(size // 2)
    again = cached_data(root, tmp_path / "cache", resident=True)
    assert len(decoded) == 2 * 36 and os.path.getsize(again.cache_file) == size
    assert torch.equal(again.val.images, stored)


def test_cached_resident_and_streamed_paths_give_the_same_pixels(tmp_path):
    root = write_photo_tree(tmp_path / "photos")
    cached = cached_data(root, tmp_path / "cache")  # rows of the memory-mapped cache, read a batch at a time
    resident = cached_data(root, tmp_path / "cache", resident=True)  # the same rows, on the device
    streamed = cached_data(root, None, resident=False)  # no cache: PIL in DataLoader workers
    assert isinstance(streamed.train, data_module.StreamingLoader) and streamed.cache_file is None
    assert cached.mean == resident.mean == streamed.mean  # under 2,000 images: all of them, exactly
    # the stored squares: each cache row is the file as the streaming path reads it
    files = data_module._scan_folder(root, 37)[0]["val"]
    rows = cached.val.images[cached.val.rows]
    assert torch.equal(rows, resident.val.images)
    for i in range(len(files)):
        assert torch.equal(rows[i], torch.from_numpy(np.array(files.read(i))))
    # evaluation: the same centre crops, normalised alike, on all three paths
    (cv, cl), (rv, rl), (sv, sl) = collect(cached.val), collect(resident.val), collect(streamed.val)
    assert torch.equal(cv, rv) and torch.equal(cl, rl) and torch.equal(cl, sl) and torch.allclose(cv, sv, atol=1e-5)
    # training: the same seed gives the same shuffle, boxes and flips from the cache and from the device
    for epoch in (1, 2):
        for data in (cached, resident):
            data.train.set_epoch(epoch)
        torch.manual_seed(epoch)
        (ct, ctl) = collect(cached.train)
        torch.manual_seed(epoch)
        (rt, rtl) = collect(resident.train)
        assert torch.equal(ct, rt) and torch.equal(ctl, rtl)
    assert torch.equal(cached.train.first_images(5), resident.train.first_images(5))
    # and a box cut from a cache row matches PIL's crop of the streamed square (see the test of the two paths)
    box = (3, 5, 30, 24)
    ours = data_module.crop_and_resize(rows[:1], torch.tensor([box]), 32)[0][:, 1:-1, 1:-1]
    theirs = np.array(F.resized_crop(files.read(0), *box, [32, 32]))
    assert (ours - torch.from_numpy(theirs).permute(2, 0, 1)[:, 1:-1, 1:-1]).abs().max() <= 1 + 1e-3


def test_an_unwritable_cache_folder_falls_back_or_is_refused(tmp_path, capsys):
    root = write_image_tree(tmp_path / "tree", splits=("train", "val"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="CACHE_DIR = '.*a_file/cache': cannot write.*or None"):
        cached_data(root, tmp_path / "a_file" / "cache", image_size=8)
    (tmp_path / "tree" / ".cache").write_text("")  # "auto" (DATA_DIR/.cache) cannot be made: no cache, a warning
    data = cached_data(root, "auto", image_size=8)
    assert data.cache_file is None and data.resident
    assert "images are decoded without a cache" in capsys.readouterr().err


def test_a_folder_whose_classes_are_wrong_is_refused_before_anything_is_decoded(tmp_path, decoded):
    root = write_image_tree(tmp_path, splits=("train",), classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        cached_data(root, tmp_path / "cache")
    assert decoded == [] and not os.path.exists(tmp_path / "cache")


def test_photos_are_decoded_at_a_reduced_scale_close_to_a_full_decode(tmp_path):
    """JPEG DCT scaling (Image.draft) keeps at least twice the stored size, then PIL resizes as before."""
    path = str(tmp_path / "big.jpg")
    Image.fromarray(smooth_photo(600, seed=3).numpy()).resize((800, 600)).save(path, quality=95)
    assert data_module.open_rgb(path, reduce_to=50).size == (200, 150)  # 1/4: 150 >= 2 x 50
    assert data_module.open_rgb(path, reduce_to=200).size == (800, 600)  # 1/2 would leave 300 < 400
    stored = np.array(data_module.read_stored(path, 50)).astype(int)
    full = np.array(F.center_crop(F.resize(data_module.open_rgb(path), 50), [50, 50])).astype(int)
    assert stored.shape == (50, 50, 3) and np.abs(stored - full).mean() < 1 and np.abs(stored - full).max() <= 6


def test_the_background_reader_raises_its_errors_and_stops_when_left():
    import threading

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(data_module._in_background(failing(), 2))
    threads = threading.active_count()
    items = data_module._in_background(iter(range(1000)), 2)
    assert next(items) == 0
    items.close()  # the consumer leaves early: the thread ends
    assert threading.active_count() == threads
