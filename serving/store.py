"""The rows one process holds, and the lookups a request makes on them.

A whole table answers a pooled vector per item; a row range (part of a table split
across shards) answers the rows of the ids it was sent, in the order sent, because
adding partial sums from several shards would regroup the float additions: the main
shard gathers those rows back into bag order and pools them itself (`pooling`), so its
result has the single-process bits.
"""

from __future__ import annotations

import torch

from .placement import TablePart
from .pooling import as_index, pool
from .requests import Bags, RequestError, check_id_ranges
from .spec import PoolingMode


class TableStore:
    def __init__(self, parts: list[TablePart], weights: list[torch.Tensor], cardinalities: tuple[int, ...],
                 mode: PoolingMode) -> None:
        if len({p.table for p in parts}) != len(parts):
            raise ValueError("a store holds at most one part of each table")
        self.parts = {p.table: p for p in parts}
        self.weights = {p.table: w for p, w in zip(parts, weights)}
        self.cardinalities = cardinalities
        self.mode = mode
        self.row_dim = weights[0].shape[1] if weights else 0

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())

    @property
    def rows(self) -> int:
        return sum(w.shape[0] for w in self.weights.values())

    def is_whole(self, table: int) -> bool:
        part = self.parts[table]
        return part.row_lo == 0 and part.row_hi == self.cardinalities[table]

    def check(self, tables: list[int], bags: list[Bags]) -> None:
        """RequestError unless this store holds every table and every id's row."""
        missing = [t for t in tables if t not in self.parts]
        if missing:
            raise RequestError(f"tables {missing} are not held here (held: {sorted(self.parts)})")
        check_id_ranges(bags, [(self.parts[t].row_lo, self.parts[t].row_hi) for t in tables], tables)

    def lookup(self, table: int, bags: Bags) -> torch.Tensor:
        """[items, row_dim] pooled vectors of a whole table, or [ids, row_dim] rows of a part."""
        weight, part = self.weights[table], self.parts[table]
        if self.is_whole(table):
            return pool(weight, as_index(bags.ids), torch.from_numpy(bags.offsets), self.mode)
        return weight.index_select(0, as_index(bags.ids - part.row_lo))

    def lookup_all(self, tables: list[int], bags: list[Bags]) -> list[torch.Tensor]:
        return [self.lookup(t, b) for t, b in zip(tables, bags)]

