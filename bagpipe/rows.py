"""The global row space: every (table, id) is one row key.

Key = offset[table] + id. Servers, caches, plans and digests all speak keys, so
one sort/unique/searchsorted handles every table at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bagpipe.hashing import mix, splitmix64, uniform01


@dataclass(frozen=True)
class RowSpace:
    cardinalities: tuple[int, ...]
    row_dim: int
    seed: int

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.cardinalities, dtype=np.int64)[:-1]]).astype(np.int64)

    @property
    def total_rows(self) -> int:
        return int(sum(self.cardinalities))

    def keys_of(self, sparse: np.ndarray) -> np.ndarray:
        """[tables, b] ids -> [b, tables] keys."""
        return (sparse + self.offsets[:, None]).T

    def table_of(self, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, keys, side="right") - 1

    def init_rows(self, keys: np.ndarray) -> np.ndarray:
        """Initial values of rows: uniform(-1/sqrt(n_t), 1/sqrt(n_t)) from a hash of
        (seed, table, id, column), so no value depends on placement or on which
        rows exist yet."""
        keys = np.asarray(keys, dtype=np.int64)
        table = self.table_of(keys)
        ids = keys - self.offsets[table]
        bound = (1.0 / np.sqrt(np.asarray(self.cardinalities, dtype=np.float64)))[table].astype(np.float32)
        row_hash = mix(self.seed, table, ids)
        cols = np.arange(self.row_dim, dtype=np.uint64)
        u = uniform01(splitmix64(row_hash[:, None] ^ (cols[None, :] * np.uint64(0x632BE59BD9B4E019))))
        return ((np.float32(2.0) * u - np.float32(1.0)) * bound[:, None]).astype(np.float32)

    def init_tensor(self, keys: np.ndarray, chunk: int = 1 << 18) -> torch.Tensor:
        """init_rows into one tensor, a chunk at a time: the hash temporaries are 16x
        the rows' size, so whole-table initialisation would multiply peak memory."""
        out = torch.empty((len(keys), self.row_dim), dtype=torch.float32)
        for lo in range(0, len(keys), chunk):
            out[lo : lo + chunk] = torch.from_numpy(self.init_rows(keys[lo : lo + chunk]))
        return out
