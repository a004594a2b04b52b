"""A split's images wherever they live (a source): uint8 in memory, decoded-image cache rows, or
files decoded when read; and their per-channel mean and std."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

import cache_module
from decode_module import decode_files
from image_module import DataError, read_stored

STATISTICS_SAMPLE = 2000  # images that estimate a folder's mean and std (decoding all is slow)


# A source's interface: `labels`, `len`, `take(index)` for splitting; `decode` (uint8 in memory) for
# the resident loader; `statistics`; `read(i)` (PIL) for the streaming loader, the no-cache path.


@dataclass
class Images:
    """uint8 images and their labels in memory: the main kind of source."""

    images: torch.Tensor  # uint8 (N, H, W, C)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> Images:
        """The images at these indices."""
        return Images(self.images[index], self.labels[index])

    def read(self, i: int) -> Image.Image:
        """Image i as a PIL image, for the streaming loader's transforms."""
        return Image.fromarray(self.images[i].numpy())

    def decode(self, num_workers: int, desc: str, device: torch.device | None = None) -> Images:
        """Already decoded: itself."""
        return self

    def statistics(self, seed: int,
                   num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Exact per-channel mean and std of all the images."""
        return channel_stats(self.images)


@dataclass
class MappedImages:
    """Rows of the memory-mapped decoded-image cache and their labels: splitting picks rows; pixels
    are read only when a batch (or decode) asks."""

    images: torch.Tensor  # uint8 (M, S, S, C): the whole cache, memory-mapped
    rows: torch.Tensor  # int64 (N,): this source's rows of it
    labels: torch.Tensor  # int64 (N,)
    cache_file: str  # the cache's .npy: its statistics are remembered beside it

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> MappedImages:
        """The rows at these indices (no pixels read)."""
        return MappedImages(self.images, self.rows[index], self.labels[index], self.cache_file)

    def decode(self, num_workers: int, desc: str, device: torch.device | None = None) -> Images:
        """The rows read into memory."""
        return Images(self.images[self.rows], self.labels)

    def statistics(self, seed: int,
                   num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of _sampled rows (as ImageFiles estimates them), remembered
        beside the cache, so a later run of the same split reads no pixels for them."""
        sample = _sampled(self, seed)
        return cache_module.remembered(
            self.cache_file, sample.rows,
            lambda: channel_stats(sample.decode(num_workers, "statistics").images))


class ImageFiles:
    """Image files decoded when read (upright, RGB), stored as read_stored does; no cache."""

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: torch.Tensor) -> ImageFiles:
        """The files at these indices."""
        return ImageFiles([self.paths[i] for i in index.tolist()], self.labels[index], self.size)

    def read(self, i: int) -> Image.Image:
        """File i as a PIL image of the stored size."""
        return read_stored(self.paths[i], self.size)

    def decode(self, num_workers: int, desc: str, device: torch.device | None = None) -> Images:
        """Every file decoded into uint8 (N, S, S, 3) in memory, in parallel, with a progress bar
        (the JPEGs on the device when it is a CUDA device)."""
        images = torch.empty((len(self), self.size, self.size, 3), dtype=torch.uint8)
        failures = decode_files(self.paths, self.size, images, num_workers, desc, device=device)
        if failures:  # the scan opened every file, so only a file changed since then gets here
            raise DataError(failures[0][1])
        return Images(images, self.labels)

    def statistics(self, seed: int,
                   num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std estimated from _sampled files."""
        return channel_stats(_sampled(self, seed).decode(num_workers, "statistics").images)


Source = Images | MappedImages | ImageFiles


def _sampled(source: MappedImages | ImageFiles, seed: int) -> MappedImages | ImageFiles:
    """A seeded sample of STATISTICS_SAMPLE of the source's images (all when it has fewer)."""
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    return source.take(order[:STATISTICS_SAMPLE])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (0-1 scale) of uint8 (N, H, W, C) images, from histograms."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = torch.bincount(images[..., c].flatten(), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * values.square()).sum() / total - mean.square()
        means.append(float(mean) / 255)
        stds.append(max(float(var.clamp(min=0).sqrt()) / 255, cache_module.MIN_STD))
    return tuple(means), tuple(stds)
