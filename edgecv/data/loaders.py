"""Batch iterators. In-memory datasets (Fashion-MNIST, synthetic) are augmented on whole batches of
tensors, which is several times faster on two cores than a per-image DataLoader."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def shard_size(n: int, world_size: int, pad: bool) -> int:
    """Samples per rank when `n` samples are split over `world_size` ranks into equal shards."""
    return -(-n // world_size) if pad else n // world_size


def shard(indices: torch.Tensor, rank: int, world_size: int, pad: bool) -> torch.Tensor:
    """Rank `rank`'s share of `indices`, of the same size on every rank as DistributedSampler makes
    them: the list is padded by repeating its start (`pad`) or cut (not `pad`) to a multiple of the
    world size, then strided. Unequal shards give ranks different step counts, and DDP then waits
    forever for the rank that stopped."""
    if world_size == 1:
        return indices
    n = len(indices)
    total = shard_size(n, world_size, pad) * world_size
    if total > n:
        repeats = -(-total // n)
        indices = indices.repeat(repeats)
    return indices[:total][rank::world_size]


class TensorLoader:
    """Iterate (images, labels) batches of an in-memory uint8 tensor, normalized, optionally augmented
    (random crop with padding + horizontal flip). Shuffling is seeded by (seed, epoch); with
    `world_size > 1` each rank sees its own shard (as DistributedSampler does)."""

    def __init__(
        self,
        images: torch.Tensor,  # N x C x H x W, uint8
        labels: torch.Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        shuffle: bool = False,
        augment: bool = False,
        pad: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        equal_shards: bool = True,  # False: plain [rank::world] shares (evaluation counts each sample once)
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.shuffle, self.augment, self.pad = shuffle, augment, pad
        self.seed, self.epoch = seed, 0
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.equal_shards = equal_shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if not self.equal_shards:
            return idx[self.rank :: self.world_size]
        return shard(idx, self.rank, self.world_size, pad=not self.drop_last)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples of this rank's shard per epoch (the same on every rank with equal shards)."""
        if not self.equal_shards:
            return len(range(self.rank, len(self.labels), self.world_size))
        return shard_size(len(self.labels), self.world_size, pad=not self.drop_last)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
        # gather rows then columns from the padded batch
        idx_rows = (dy.view(n, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)).expand(n, x.shape[1], h, w + 2 * p)
        out = padded.gather(2, idx_rows)
        idx_cols = (dx.view(n, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)).expand(n, x.shape[1], h, w)
        out = out.gather(3, idx_cols)
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(3)
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start : start + self.batch_size]
            if self.drop_last and len(b) < self.batch_size:
                break
            x = self.images[b].float().div_(255.0)
            if self.augment:
                x = self._augment(x, g)
            x = (x - self.mean) / self.std
            yield x, self.labels[b]


class LimitedLoader:
    """The first `limit` samples of a loader (for calibration, quick evaluation)."""

    def __init__(self, loader, limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __iter__(self):
        seen = 0
        for x, y in self.loader:
            if seen >= self.limit:
                break
            take = min(len(y), self.limit - seen)
            seen += take
            yield x[:take], y[:take]

    def __len__(self) -> int:
        bs = getattr(self.loader, "batch_size", None) or 1
        return min(len(self.loader), -(-self.limit // bs))
