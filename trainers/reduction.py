"""The dense reduction every distributed mode shares (DESIGN.md section 2, rule 2).

The summed dense gradient must be exactly `0 + g_0 + g_1 + ...` in trainer-rank
order, the arithmetic `local` does over its simulated slices, so the modes agree
bit for bit at any T (gloo's all_reduce sums in an order of its own). An
all_gather of every full gradient gives that order but moves T x P floats per
trainer. Instead, as a reduce-scatter + all-gather: trainer r owns a contiguous
shard of the flat gradient, receives every trainer's piece of that shard (one
all_to_all), sums the pieces in rank order, and the summed shards are
all-gathered. Elementwise the sum is the same sequence of additions, so the bits
are the same; bytes per trainer are about 2P, independent of T.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from bagpipe import faults
from bagpipe.transport import posted, wait


def ordered_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """0 + p_1 + p_2 + ... in the given (rank) order: the one dense reduction's arithmetic."""
    total = torch.zeros_like(parts[0])
    for part in parts:
        total += part
    return total


class ShardedOrderedSum:
    """Rank-order sum of one flat fp32 vector per trainer, on its own process group.

    `start` launches the all_to_all (async, so row traffic can go out meanwhile);
    `reduce` sums this trainer's shard and launches the all-gather of the shards;
    `finish` waits for it. Buffers are allocated once and reused every iteration."""

    def __init__(self, numel: int, trainers: int, rank: int, group, who: str):
        self.numel, self.trainers, self.rank, self.group, self.who = numel, trainers, rank, group, who
        self.shard = max(1, math.ceil(numel / trainers))
        padded = self.shard * trainers
        self._send = torch.zeros(padded, dtype=torch.float32)
        self._pieces = torch.empty(padded, dtype=torch.float32)
        self._mine = torch.empty(self.shard, dtype=torch.float32)
        self._out = torch.empty(padded, dtype=torch.float32)
        self._work = None
        self._reduced = False

    @property
    def bytes_per_call(self) -> int:
        """Bytes this trainer sends plus receives per reduction (own pieces excluded)."""
        return 2 * 2 * 4 * self.shard * (self.trainers - 1)

    def start(self, flat: torch.Tensor) -> None:
        if flat.numel() != self.numel:
            raise ValueError(f"{self.who}: dense reduction of {flat.numel()} values, expected {self.numel}")
        self._send[: self.numel].copy_(flat)
        self._work = posted(f"{self.who}: dense gradient exchange", dist.all_to_all_single, self._pieces, self._send,
                            group=self.group, async_op=True)

    def reduce(self) -> None:
        """Sum this trainer's shard in rank order and post the all-gather of the shards
        (async: the caller may do other work, the sparse update, before `finish`)."""
        wait(self._work, f"{self.who}: dense gradient exchange")
        pieces = self._pieces.view(self.trainers, self.shard)
        self._mine.zero_()
        order = range(self.trainers - 1, -1, -1) if faults.active("reverse_dense") else range(self.trainers)
        for r in order:
            self._mine += pieces[r]
        outs = list(self._out.view(self.trainers, self.shard))
        self._work = posted(f"{self.who}: dense gradient gather", dist.all_gather, outs, self._mine,
                            group=self.group, async_op=True)
        self._reduced = True

    def finish(self) -> torch.Tensor:
        """The rank-order sum (a view of a reused buffer: use or copy it before the next call)."""
        if not self._reduced:
            self.reduce()
        wait(self._work, f"{self.who}: dense gradient gather")
        self._work, self._reduced = None, False
        return self._out[: self.numel]
