"""The fan-out: which shard gets which bags of a request, and the pooled tensor from their answers.

Pure logic, shared by every placement (``local`` runs it against the main shard's own
store): `Router.route` sends each touched whole table's bags to the one shard holding
it and, for a table split by rows, each part's ids (bags restricted to the part's
range) to that part's shard; `Router.assemble` puts pooled vectors into
``emb[b, T, row_dim]`` and pools a split table's rows, gathered back into bag order,
with the same function the single process uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .placement import ShardPlacement
from .pooling import pool_gathered
from .requests import Bags, Request
from .spec import PoolingMode


@dataclass
class ShardQuery:
    """What one shard is asked for one request: bags per table, in this order."""

    shard: int
    tables: list[int] = field(default_factory=list)
    bags: list[Bags] = field(default_factory=list)
    whole: list[bool] = field(default_factory=list)  # pooled answer (True) or the rows of each id

    @property
    def ids(self) -> int:
        return sum(b.count for b in self.bags)

    def answer_sizes(self) -> list[int]:
        """Vectors the shard answers per table: one per item (whole) or one per id (part)."""
        return [b.items if whole else b.count for b, whole in zip(self.bags, self.whole)]


@dataclass
class SplitTable:
    """A split table of one request: its full bags and where each part's ids sit in them."""

    table: int
    offsets: np.ndarray
    count: int
    pieces: list[tuple[int, int, np.ndarray]]  # (shard, slot in that shard's query, positions)


@dataclass
class Route:
    items: int
    queries: dict[int, ShardQuery]
    splits: list[SplitTable]


class Router:
    def __init__(self, placement: ShardPlacement, mode: PoolingMode) -> None:
        self.placement, self.mode = placement, mode
        self.row_dim = placement.row_dim
        self.num_tables = len(placement.cardinalities)
        self.whole_on: dict[int, int] = {}
        self.split_parts: dict[int, tuple[np.ndarray, list[int]]] = {}  # table -> (row_lo bounds, shards)
        for t in range(self.num_tables):
            parts = placement.parts_of(t)
            if len(parts) == 1 and placement.is_whole(parts[0]):
                self.whole_on[t] = parts[0].shard
            else:
                self.split_parts[t] = (np.array([p.row_lo for p in parts], dtype=np.int64), [p.shard for p in parts])

    def shards_of(self, tables) -> set[int]:
        out = set()
        for t in tables:
            out |= {self.whole_on[t]} if t in self.whole_on else set(self.split_parts[t][1])
        return out

    def route(self, request: Request) -> Route:
        queries: dict[int, ShardQuery] = {}
        splits: list[SplitTable] = []
        items = request.items

        def add(shard: int, table: int, bags: Bags, whole: bool) -> int:
            q = queries.setdefault(shard, ShardQuery(shard))
            q.tables.append(table)
            q.bags.append(bags)
            q.whole.append(whole)
            return len(q.tables) - 1

        for t, bags in enumerate(request.bags):
            if bags.count == 0:
                continue
            if t in self.whole_on:
                add(self.whole_on[t], t, bags, True)
                continue
            lows, shards = self.split_parts[t]
            part_of_id = np.searchsorted(lows, bags.ids, side="right") - 1
            item_of_id = bags.item_of_id()
            split = SplitTable(t, bags.offsets, bags.count, [])
            for k in np.unique(part_of_id):
                positions = np.flatnonzero(part_of_id == k)
                lengths = np.bincount(item_of_id[positions], minlength=items)
                slot = add(shards[k], t, Bags.from_lengths(lengths, bags.ids[positions]), False)
                split.pieces.append((shards[k], slot, positions))
            splits.append(split)
        return Route(items, queries, splits)

    def assemble(self, route: Route, answers: dict[int, list]) -> np.ndarray:
        """emb [b, T, row_dim] float32 from each shard's answers (arrays or tensors, one per query slot)."""
        emb = np.zeros((route.items, self.num_tables, self.row_dim), dtype=np.float32)
        for shard, query in route.queries.items():
            for t, whole, vectors in zip(query.tables, query.whole, answers[shard]):
                if whole:
                    emb[:, t, :] = vectors
        for split in route.splits:
            rows = np.empty((split.count, self.row_dim), dtype=np.float32)
            for shard, slot, positions in split.pieces:
                rows[positions] = answers[shard][slot]
            emb[:, split.table, :] = pool_gathered(torch.from_numpy(rows), torch.from_numpy(split.offsets), self.mode)
        return emb


def split_answer(vectors: np.ndarray, query: ShardQuery) -> list[np.ndarray]:
    """A shard's flat answer [N, row_dim] cut into one array per query slot."""
    sizes = query.answer_sizes()
    if vectors.shape[0] != sum(sizes):
        raise ValueError(f"shard {query.shard} answered {vectors.shape[0]} vectors, expected {sum(sizes)}")
    return np.split(vectors, np.cumsum(sizes)[:-1])
