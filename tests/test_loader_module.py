"""The loaders: shuffling and shards, alternate flips, photo crops and centre crops, the background
reader, mixed training batches."""

import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

import augment_module
import loader_module
import process_module
from augment_module import erase_masks
from autoaugment_module import auto_augment
from conftest import augmentation, collect, smooth_photo
from loader_module import Batching


def test_alternate_flip_mirrors_every_image_every_other_epoch():
    images = torch.randint(0, 256, (10, 4, 4, 3), dtype=torch.uint8)
    labels = torch.arange(10)
    loader = loader_module.ResidentLoader(images, labels, Batching(10, train=True),
                                          augmentation((0.5,) * 3, (0.25,) * 3, CROP_PADDING=0,
                                                       FLIP="alternate"))
    epochs = []
    for epoch in (1, 2, 3):
        loader.set_epoch(epoch)
        x, y = collect(loader)
        epochs.append(x[torch.argsort(y)])
    assert torch.allclose(epochs[1], epochs[0].flip(-1)) and torch.allclose(epochs[2], epochs[0])
    assert not torch.allclose(epochs[0], loader.normalize(images))  # about half start flipped


def test_epochs_shuffle_differently_and_shards_do_not_overlap():
    images = torch.zeros(20, 4, 4, 3, dtype=torch.uint8)
    labels = torch.arange(20)
    shards = [loader_module.ResidentLoader(images, labels,
                                           Batching(5, train=True, rank=r, world_size=2),
                                           augmentation((0,) * 3, (1,) * 3)) for r in (0, 1)]
    seen = [collect(s)[1] for s in shards]
    assert len(seen[0]) == len(seen[1]) == 10 and not set(seen[0].tolist()) & set(seen[1].tolist())
    shards[0].set_epoch(2)
    assert not torch.equal(collect(shards[0])[1], seen[0])


def test_a_training_set_smaller_than_a_batch_still_gives_one_batch():
    images = torch.zeros(5, 4, 4, 3, dtype=torch.uint8)
    loader = loader_module.ResidentLoader(images, torch.arange(5), Batching(8, train=True),
                                          augmentation((0,) * 3, (1,) * 3))
    assert len(loader) == 1 and len(collect(loader)[1]) == 5


def test_resident_photo_crops_are_each_images_own_box_then_flipped():
    """Channel 0 is the image's label, channels 1 and 2 its column and row: each crop shows its own
    image, and its columns tell its box and its flip."""
    n, size = 32, 64
    columns = torch.arange(size).expand(size, size)
    images = torch.stack([torch.stack([torch.full((size, size), 7 * i), columns, columns.T], -1)
                          for i in range(n)]).to(torch.uint8)
    labels = torch.arange(n)
    loader = loader_module.ResidentLoader(
        images, labels, Batching(8, train=True, channels_last=False),
        augmentation((0,) * 3, (1 / 255,) * 3, crop_size=16, FLIP="random"))
    torch.manual_seed(0)
    crops, seen = collect(loader)
    assert crops.shape == (n, 3, 16, 16)
    assert torch.allclose(crops[:, 0], 7 * seen.view(-1, 1, 1).float(), atol=1e-3)
    left_to_right = crops[:, 1, :, -1] - crops[:, 1, :, 0]
    assert (left_to_right.abs() > 1).all()  # a ramp: each crop is a resized part of its own image
    flipped = left_to_right[:, 0] < 0
    assert 8 < flipped.sum() < 24  # about half are mirrored
    # the boxes differ from image to image
    assert len({round(float(c), 1) for c in crops[:, 1, 8, 0]}) > 20


def test_photo_evaluation_is_the_centre_crop():
    images = torch.stack([smooth_photo(37, seed=i) for i in range(5)])
    loader = loader_module.ResidentLoader(images, torch.arange(5), Batching(4, train=False),
                                          augmentation((0,) * 3, (1 / 255,) * 3, crop_size=32))
    batch, _ = collect(loader)
    for image, out in zip(images, batch):
        # offset round(2.5) = 2, as torchvision
        centre = F.center_crop(Image.fromarray(image.numpy()), [32, 32])
        assert torch.equal(out, torch.from_numpy(np.array(centre)).permute(2, 0, 1).float())
    assert torch.equal(loader.first_images(5), batch)


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_training_chunks_get_each_images_own_ops_then_normalisation_then_erased_boxes(policy):
    """Replayed from the same seed: the loader's batches are auto_augment of the chunk in its
    shuffled order, then each batch normalised, with erase_masks' boxes at 0, each image beside its
    own label."""
    images = torch.randint(0, 256, (48, 8, 8, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    augmented = augmentation((0.5,) * 3, (0.25,) * 3, CROP_PADDING=0, FLIP="none",
                             AUTO_AUGMENT=policy, RANDOM_ERASING=0.5)
    loader = loader_module.ResidentLoader(images, torch.arange(48), Batching(16, train=True),
                                          augmented)
    torch.manual_seed(3)
    batches, labels = collect(loader)
    torch.manual_seed(3)
    chunk = loader.normalize(auto_augment(images[labels], policy))
    expected = torch.cat([batch.masked_fill(erase_masks(16, 8, 8, 0.5, "cpu"), 0.0)
                          for batch in chunk.split(16)])
    assert torch.equal(batches, expected)
    assert not torch.equal(batches, loader.normalize(images[labels]))


def test_evaluation_batches_are_untouched_by_auto_augment_and_erasing():
    images = torch.randint(0, 256, (20, 8, 8, 3), dtype=torch.uint8)
    augmented = augmentation((0.5,) * 3, (0.25,) * 3, AUTO_AUGMENT="trivialaugment",
                             RANDOM_ERASING=1.0)
    loader = loader_module.ResidentLoader(images, torch.arange(20), Batching(8, train=False),
                                          augmented)
    assert torch.equal(collect(loader)[0], loader.normalize(images))
    photos = torch.stack([smooth_photo(37, seed=i) for i in range(5)])
    augmented = augmentation((0,) * 3, (1 / 255,) * 3, crop_size=32, AUTO_AUGMENT="randaugment",
                             RANDOM_ERASING=1.0)
    loader = loader_module.ResidentLoader(photos, torch.arange(5), Batching(4, False), augmented)
    assert torch.equal(collect(loader)[0], loader.normalize(photos[:, 2:34, 2:34]))


def test_photo_crops_are_rounded_to_grey_levels_augmented_normalised_then_erased():
    """mean 0.5 and std 1/255 make a normalised grey level v - 127.5: never 0, and never a whole
    number."""
    photos = torch.stack([smooth_photo(48, seed=i) for i in range(16)])
    augmented = augmentation((0.5,) * 3, (1 / 255,) * 3, crop_size=24,
                             AUTO_AUGMENT="trivialaugment", RANDOM_ERASING=1.0)
    loader = loader_module.ResidentLoader(photos, torch.arange(16), Batching(8, train=True),
                                          augmented)
    torch.manual_seed(0)
    crops, _ = collect(loader)
    erased = crops == 0
    assert crops.shape == (16, 3, 24, 24) and erased.flatten(1).any(1).all()  # a box in every crop
    grey_levels = crops[~erased] + 127.5
    assert torch.allclose(grey_levels, grey_levels.round(), atol=1e-3) and grey_levels.min() >= 0
    assert grey_levels.max() <= 255


def test_a_mixed_loader_mixes_each_batch_of_its_loader_and_passes_the_rest_through_unmixed():
    images = torch.randint(0, 256, (20, 4, 4, 3), dtype=torch.uint8)
    plain = loader_module.ResidentLoader(images, torch.arange(20) % 5, Batching(8, train=True),
                                         augmentation((0.5,) * 3, (0.25,) * 3, CROP_PADDING=0,
                                                      FLIP="none"))
    seen = []

    def mix(x, y):  # a stand-in that records what it was given
        seen.append((x, y))
        return x.flip(0), torch.nn.functional.one_hot(y, 5).float()
    mixed = loader_module.MixedLoader(plain, mix)
    mixed.set_epoch(3)
    assert plain.epoch == 3 and len(mixed) == len(plain) == 2 and mixed.batching is plain.batching
    batches, expected = list(mixed), list(plain)  # the same epoch, so the same shuffle
    assert [torch.equal(x, e) and torch.equal(y, f) for (x, y), (e, f) in zip(seen, expected)] == [
        True, True]
    for (x, targets), (e, f) in zip(batches, expected):
        assert torch.equal(x, e.flip(0)) and torch.equal(targets.argmax(1), f)
    # as evaluation sees them: never mixed
    assert torch.equal(mixed.first_images(6), plain.first_images(6))


def test_a_mixed_loader_with_torchvisions_mixup_and_cutmix_yields_soft_targets_that_sum_to_one():
    images = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8)
    plain = loader_module.ResidentLoader(images, torch.arange(32) % 4, Batching(8, train=True),
                                         augmentation((0.5,) * 3, (0.25,) * 3))
    mix = augment_module.batch_mixer(dict(mixup=0.2, cutmix=1.0), num_classes=4)
    mixed = loader_module.MixedLoader(plain, mix)
    torch.manual_seed(0)
    for x, targets in mixed:
        assert x.shape == (8, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
        assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))


def test_a_new_augmentation_is_one_registry_entry_and_its_constant(monkeypatch):
    """An entry of AUGMENTATIONS and a constant of its name reach the config, its check, the device
    loader (at the entry's stage) and the PIL pipeline, alike."""
    invert = augment_module.Kind((None, True), None, "pixels", lambda images, on: 255 - images,
                                 lambda on: [transforms.RandomInvert(p=1.0)])
    monkeypatch.setitem(augment_module.AUGMENTATIONS, "invert", invert)
    images = torch.randint(0, 256, (8, 4, 4, 3), dtype=torch.uint8)
    augmented = augmentation((0.5,) * 3, (0.25,) * 3, CROP_PADDING=0, FLIP="none", INVERT=True)
    loader = loader_module.ResidentLoader(images, torch.arange(8), Batching(8, True), augmented)
    batch, labels = collect(loader)
    assert torch.equal(batch, loader.normalize(255 - images[labels]))
    streamed = augment_module.pil_transform(True, 4, augmented)(Image.fromarray(images[0].numpy()))
    assert torch.allclose(streamed, loader.normalize(255 - images[:1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="^INVERT = 'yes' is not known; choose one of None, True"):
        augmentation((0.5,) * 3, (0.25,) * 3, INVERT="yes")


class Killing(torch.utils.data.Dataset):
    """Items that are zeros, but item `victim` kills the worker process that reads it (as the
    out-of-memory killer does); each worker writes whether it ignores SIGINT to a file."""

    def __init__(self, victim, folder):
        self.victim, self.folder = victim, folder

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        path = os.path.join(self.folder, f"{os.getpid()}")
        with open(f"{path}.tmp", "w") as f:
            f.write(f"{ignored}")
        os.replace(f"{path}.tmp", path)  # whole: the other worker may still be at it below
        if i == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3, 4, 4), 0


@pytest.mark.skipif(sys.platform != "linux", reason="forked workers")
def test_a_streaming_worker_that_dies_raises_worker_died_and_workers_leave_ctrl_c_to_the_run(
        tmp_path):
    loader = loader_module.StreamingLoader(Killing(40, str(tmp_path)), Batching(8, train=False),
                                           torch.device("cpu"), num_workers=2)
    began = time.monotonic()
    died = r"^a worker process( \(process \d+\))? .*while reading evaluation images: most likely"
    with pytest.raises(process_module.WorkerDied, match=died):
        collect(loader)
    assert time.monotonic() - began < 10
    assert {path.read_text() for path in tmp_path.glob("[0-9]*[0-9]")} == {"True"}
