"""Loaders that yield normalised batches on the device: from uint8 images kept there
(ResidentLoader), from host memory such as the memory-mapped cache (MappedLoader), or from a PIL
Dataset in DataLoader workers (StreamingLoader, without a cache); and MixedLoader, which mixes any
one's training batches (Mixup, CutMix)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

import process_module
from augment_module import (Augmentation, augment, center_crop, crop_and_resize, crop_flip,
                            sample_crop_boxes, switched_on)

# CIFAR images augmented together: few kernel launches per epoch, bounded memory
AUGMENT_CHUNK = 16384
# batches read from the cache ahead of the one training: covers a slow read, bounded memory
PREFETCH = 3


@dataclass(frozen=True)
class Batching:
    """How a loader batches: the size; training (shuffled by (seed, epoch), a last partial batch
    dropped) or evaluation (in order, all kept); this rank's shard of world_size; whether batches
    are channels_last."""

    batch_size: int
    train: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    channels_last: bool = True


class ResidentLoader:
    """Batches from uint8 images on the device, augmented and normalised by batched ops. Without
    crop_size (CIFAR-10), training gets pad-crops and flips at the images' size; with it (photos,
    stored as larger squares), RandomResizedCrop boxes of their own resized to crop_size, and flips,
    evaluation the centre crop; then the AUGMENTATIONS. Shuffles are seeded by (seed, epoch) as in
    DistributedSampler, so ranks draw one order and take their shards; augmentation draws from the
    device's generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batching: Batching,
                 augmentation: Augmentation):
        self.images, self.labels = images, labels
        self.batching, self.augmentation = batching, augmentation
        self.epoch = 0
        self.index_device = labels.device  # where the shuffled indices are made
        self.chunk = AUGMENT_CHUNK  # CIFAR-size images gathered and augmented together
        # a fixed random half starts flipped; every other epoch flips them all
        if augmentation.flip == "alternate":
            flipped = torch.rand(len(labels),
                                 generator=torch.Generator().manual_seed(batching.seed)) < 0.5
            self.flip_base = flipped.to(labels.device)
        mean = torch.tensor(augmentation.mean, device=labels.device).view(1, -1, 1, 1)
        std = torch.tensor(augmentation.std, device=labels.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the same on every rank)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        """This rank's share of the images, shuffled for training."""
        n, rank, world_size = len(self.labels), self.batching.rank, self.batching.world_size
        if not self.batching.train:
            return torch.arange(rank, n, world_size, device=self.index_device)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(self.batching.seed + self.epoch))
        per_rank = n // world_size  # equal shards: every rank must take the same number of steps
        return order[rank * per_rank:(rank + 1) * per_rank].to(self.index_device)

    def __len__(self) -> int:
        n, rank, world_size = len(self.labels), self.batching.rank, self.batching.world_size
        shard = n // world_size if self.batching.train else len(range(rank, n, world_size))
        return _num_batches(shard, self.batching.batch_size, self.batching.train)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch_size = self.batching.batch_size
        indices = self._indices()[:len(self) * batch_size]
        # CIFAR-10's pad-crops and flips, drawn for a chunk of batches at once
        if self.augmentation.crop_size is None:
            step = max(batch_size, self.chunk // batch_size * batch_size)
            for chosen, images in self._gather(indices, step):
                yield from self._padded_batches(chosen, images)
        else:  # photos a batch at a time: their float 256-px copies are big
            for chosen, images in self._gather(indices, batch_size):
                yield self._photos(chosen, images), self.labels[chosen]

    def _gather(self, indices: torch.Tensor,
                step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, their uint8 images) on the device, `step` images at a time."""
        for start in range(0, len(indices), step):
            chosen = indices[start:start + step]
            yield chosen, self.images[chosen]

    def _padded_batches(self, chosen: torch.Tensor,
                        images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A chunk of CIFAR-size images as batches: pad-crops and flips in one gather, "pixels"
        augmentations for the chunk, then each batch normalised and through "normalised" ones."""
        augmentation, batch_size, train = (self.augmentation, self.batching.batch_size,
                                           self.batching.train)
        if train and (augmentation.crop_padding or augmentation.flip != "none"):
            images = crop_flip(images, augmentation.crop_padding, self._flips(chosen),
                               augmentation.reflect)
        if train:
            images = augment(images, "pixels", augmentation.augmentations)
        labels = self.labels[chosen]
        for i in range(0, len(chosen), batch_size):
            batch = self.normalize(images[i:i + batch_size])
            if train:
                batch = augment(batch, "normalised", augmentation.augmentations)
            yield batch, labels[i:i + batch_size]

    def _photos(self, chosen: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """A photo batch: training's random-resized crops, flips and augmentations ("pixels" ones on
        crops rounded to whole grey levels, as torchvision's take them); else centre crops."""
        if not self.batching.train:
            return self.evaluated(images)
        settings = self.augmentation.augmentations
        boxes = sample_crop_boxes(len(chosen), images.shape[1], images.shape[2],
                                  device=images.device)
        crops = crop_and_resize(images, boxes, self.augmentation.crop_size, self._flips(chosen))
        crops = crops.permute(0, 2, 3, 1)  # float (N, S, S, C) on the 0-255 scale
        if switched_on(settings, "pixels"):
            crops = augment(crops.round().clamp_(0, 255).to(torch.uint8), "pixels", settings)
        return augment(self.normalize(crops), "normalised", settings)

    def _flips(self, batch: torch.Tensor) -> torch.Tensor | None:
        if self.augmentation.flip == "random":
            return torch.rand(len(batch), device=batch.device) < 0.5
        if self.augmentation.flip == "alternate":
            return self.flip_base[batch] ^ bool(self.epoch % 2 == 0)
        return None

    def first_images(self, n: int) -> torch.Tensor:
        """The first n images, as evaluation sees them (for data-dependent initialisation)."""
        first = torch.arange(min(n, len(self.labels)), device=self.index_device)
        return self.evaluated(next(self._gather(first, len(first)))[1])

    def evaluated(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) images as evaluation sees them: normalised, photos' centre crops."""
        crop_size = self.augmentation.crop_size
        return self.normalize(images if crop_size is None else center_crop(images, crop_size))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) images on the 0-255 scale (uint8, or float crops) to normalised float
        (N, C, H, W), channels_last in memory when asked (NHWC memory is channels_last NCHW)."""
        layout = torch.channels_last if self.batching.channels_last else torch.contiguous_format
        images = images.permute(0, 3, 1, 2).contiguous(memory_format=layout)
        return torch.addcmul(self.shift, images.float(), self.scale)


class MappedLoader(ResidentLoader):
    """ResidentLoader's batches (same order, augmentation, normalisation, on the device) from uint8
    images in host memory, such as the memory-mapped cache: a thread gathers each batch's rows,
    PREFETCH ahead (on a GPU into pinned memory, copied on its own stream), as the device works."""

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                 device: torch.device, batching: Batching, augmentation: Augmentation):
        super().__init__(images, labels.to(device), batching, augmentation)
        self.rows = rows  # int64 (N,): row of images of each of the N labelled images
        self.index_device = torch.device("cpu")  # the thread picks rows with them
        self.chunk = batching.batch_size  # one batch: little host memory, and the first comes soon

    def _gather(self, indices: torch.Tensor,
                step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        # in the thread
        def read() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]]:
            if copy_stream is not None:
                # a new thread starts on GPU 0: pinned memory would make a context there
                torch.cuda.set_device(device)
            for start in range(0, len(indices), step):
                chosen = indices[start:start + step]
                host = torch.empty((len(chosen), *self.images.shape[1:]), dtype=torch.uint8,
                                   pin_memory=copy_stream is not None)
                torch.index_select(self.images, 0, self.rows[chosen], out=host)
                if copy_stream is None:
                    yield chosen.to(device), host.to(device), None
                    continue
                with torch.cuda.stream(copy_stream):
                    chosen, images = (chosen.to(device, non_blocking=True),
                                      host.to(device, non_blocking=True))
                yield chosen, images, copy_stream.record_event()

        for chosen, images, copied in process_module.in_background(read(), PREFETCH):
            if copied is not None:  # training waits for the copy and keeps its memory until used
                stream = torch.cuda.current_stream(device)
                stream.wait_event(copied)
                chosen.record_stream(stream)
                images.record_stream(stream)
            yield chosen, images



class StreamingLoader:
    """A DataLoader with PIL transforms in worker processes, for data that does not fit on the
    device; yields batches on the device, in the same layout as ResidentLoader."""

    def __init__(self, dataset: Dataset, batching: Batching, device: torch.device,
                 num_workers: int):
        self.batching, self.device = batching, device
        rank, world_size, batch_size = batching.rank, batching.world_size, batching.batch_size
        if batching.train:
            self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size,
                                                               rank=rank, shuffle=True,
                                                               seed=batching.seed, drop_last=True)
        else:
            self.sampler = range(rank, len(dataset), world_size)
        n = len(self.sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 drop_last=batching.train and n >= batch_size,
                                 persistent_workers=False,  # workers leave Ctrl-C to the run:
                                 worker_init_fn=functools.partial(process_module.become_worker,
                                                                  os.getpid()))

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the same on every rank)."""
        if self.batching.train:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def first_images(self, n: int) -> torch.Tensor:
        """About n images as the loader yields them (for data-dependent initialisation)."""
        images = []
        for batch, _ in self:
            images.append(batch)
            if sum(map(len, images)) >= n:
                break
        return torch.cat(images)[:n]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches; a worker that dies (the out-of-memory killer) raises WorkerDied here."""
        memory_format = (torch.channels_last if self.batching.channels_last
                         else torch.contiguous_format)
        try:
            batches = iter(self.loader)
            process_module.sigchld_default()
            for images, labels in batches:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                yield images.contiguous(memory_format=memory_format), labels
        except (RuntimeError, ConnectionError, EOFError) as error:
            which = "training" if self.batching.train else "evaluation"
            died = process_module.worker_died(error, f"reading {which} images")
            if died is None:
                raise
            raise died from None


class MixedLoader:
    """Training batches mixed on the device as they come (batch_mixer): mixed images, float (N,
    classes) targets summing to 1. Its len, batching, set_epoch and first_images are the wrapped
    loader's, unmixed; only training loaders are wrapped (evaluation never mixes)."""

    def __init__(self, loader: ResidentLoader | MappedLoader | StreamingLoader,
                 mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.loader, self.mix = loader, mix
        self.batching = loader.batching

    def set_epoch(self, epoch: int) -> None:
        """The loader's own: choose the shuffle of this epoch."""
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def first_images(self, n: int) -> torch.Tensor:
        """The loader's first n images, unmixed (for data-dependent initialisation)."""
        return self.loader.first_images(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield self.mix(images, labels)


def _num_batches(n: int, batch_size: int, train: bool) -> int:
    """Training drops a last partial batch, unless it is the only one; evaluation keeps it."""
    if train and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)


Loader = ResidentLoader | MappedLoader | StreamingLoader | MixedLoader
