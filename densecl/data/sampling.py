"""The order and the augmentation of pre-training samples, both drawn from seeds alone.

Resume is exact because nothing here depends on history: each sample's augmentation is seeded from
(seed, epoch, index) and each epoch's order from (seed, epoch), so a run restarted at any step sees what an
uninterrupted run would have seen. With data.augment_on=gpu the per-sample seed draws the crops and flips, and
the device-side draws of a step's batch are seeded from (seed, step, rank).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from densecl.data.augment import TwoViewAugmentation
from densecl.data.gpu_augment import DeviceTwoViewAugmentation, RawBatch
from densecl.data.sources import UnlabeledImageFolder, load_rgb_image

SAMPLE_STREAM, ORDER_STREAM, BATCH_STREAM = 0, 1, 2


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (stream id, seed, epoch, index...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededViews(Dataset):
    """Indexed by (epoch, index): the sample's augmentation RNG depends on nothing else."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(SAMPLE_STREAM, self.seed, epoch, index))
            return self.base[index]


class ResumableSampler(Sampler):
    """Yields (epoch, index) for this rank from a given global step to the end of training.

    Each epoch is a permutation drawn from (seed, epoch), cut into global batches (the tail that does not
    fill one is dropped); rank r takes the r-th slice of each.
    """

    def __init__(self, num_samples, batch_size, rank, world_size, seed, start_step, total_steps):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.total_steps = total_steps
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(ORDER_STREAM, self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm, perm_epoch = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, batch = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            start = batch * self.global_batch + self.rank * self.batch_size
            for index in perm[start : start + self.batch_size].tolist():
                yield epoch, index


class SeededBatchAugmentation:
    """augment_on=gpu, on the training device: a step's batch augmented with its random draws seeded from
    (seed, step, rank) alone, in a forked RNG, so that the training's own streams never see them."""

    def __init__(self, augment: DeviceTwoViewAugmentation, seed: int, rank: int = 0):
        self.augment, self.seed, self.rank = augment, seed, rank

    def __call__(self, batch: RawBatch, device: torch.device, step: int):
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(BATCH_STREAM, self.seed, step, self.rank))
            return self.augment(batch, device)


def with_view_size(dataset: SeededViews, crop_size: int) -> SeededViews:
    """The same images with views of another size, sharing the file list: no second walk of a large folder."""
    base = copy.copy(dataset.base)
    base.transform = TwoViewAugmentation(crop_size)  # the PIL path, whatever the training's augment_on
    if isinstance(base, UnlabeledImageFolder):
        base.read = load_rgb_image
    return SeededViews(base, dataset.seed)
