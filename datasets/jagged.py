"""Multi-hot features: a bag of ids per example, as values + offsets (Arrow's list layout,
TorchRec's jagged tensors).

One `Bags` holds one feature over consecutive examples: example e's ids are
``values[offsets[e]:offsets[e + 1]]``; an empty bag is two equal offsets. Readers,
writers, slicing and the working-set lookup all go through these few vectorised
operations, so a trainer's slice of a batch is exactly the same arrays whether it was
read on its own or cut from the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class Bags:
    values: np.ndarray  # int64 [n_ids]
    offsets: np.ndarray  # int64 [examples + 1], offsets[0] == 0

    @property
    def examples(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def slice(self, lo: int, hi: int) -> "Bags":
        """Examples [lo, hi) as fresh arrays, offsets rebased to 0."""
        start, stop = int(self.offsets[lo]), int(self.offsets[hi])
        return Bags(self.values[start:stop].copy(), self.offsets[lo:hi + 1] - start)

    @staticmethod
    def concat(parts: Sequence["Bags"]) -> "Bags":
        if len(parts) == 1:
            return parts[0]
        values = np.concatenate([p.values for p in parts]) if parts else np.zeros(0, np.int64)
        ends = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, ends)]).astype(np.int64)
        return Bags(values.astype(np.int64, copy=False), offsets)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "Bags":
        lengths = np.array([len(x) for x in lists], dtype=np.int64)
        values = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(lengths.sum()))
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def to_lists(self) -> list[list[int]]:
        return [self.values[a:b].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @classmethod
    def from_arrow(cls, column) -> "Bags":
        """A list<int64> column (chunked or not; a null is an empty bag)."""
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if array.null_count:
            array = pc.if_else(pc.is_null(array), pa.scalar([], type=array.type), array)
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return cls(values[offsets[0]:offsets[-1]], offsets - offsets[0])

    def to_arrow(self) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32) if self.offsets[-1] < 2**31
                                                 else self.offsets), pa.array(self.values, type=pa.int64()))
