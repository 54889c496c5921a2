"""The order of an epoch: entries grouped into same-size batches per dataset, shuffled by (seed, epoch), and split
evenly over the processes."""

from __future__ import annotations

import math

from .buckets import bucket_batches
from .draws import seeded_rng
from .entries import Entry, Group


class EpochSampler:
    def __init__(self, entries: list[Entry], groups: list[Group], seed: int):
        self.entries = entries
        self.groups = groups
        self.seed = seed

    def group_batch_size(self, group: int, batch_size: int) -> int:
        return self.groups[group].batch_size or batch_size

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch (before splitting over processes): per dataset and bucket, ceil(samples / batch size)."""
        counts: dict[tuple, int] = {}
        for e in self.entries:
            counts[(e.group, e.size)] = counts.get((e.group, e.size), 0) + 1
        return sum(math.ceil(n / self.group_batch_size(k[0], batch_size)) for k, n in counts.items())

    def batches_for_epoch(self, epoch: int, batch_size: int, *, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
        rng = seeded_rng(self.seed, "order", epoch)
        if len(self.groups) == 1:
            batches = bucket_batches([e.size for e in self.entries], self.group_batch_size(0, batch_size), rng=rng)
        else:
            batches = []
            for g in range(len(self.groups)):
                idx = [i for i, e in enumerate(self.entries) if e.group == g]
                part = bucket_batches([self.entries[i].size for i in idx], self.group_batch_size(g, batch_size), rng=rng)
                batches += [[idx[j] for j in b] for b in part]
            rng.shuffle(batches)
        if num_processes > 1:
            # Every process gets the same number of batches so DDP steps stay in lock-step.
            usable = len(batches) - len(batches) % num_processes
            batches = batches[:usable][process_index::num_processes]
        return batches
