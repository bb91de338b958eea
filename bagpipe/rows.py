"""The global row space: every (table, id) is one row key.

Key = offset[table] + id. Servers, caches, plans and digests all speak keys, so
one sort/unique/searchsorted handles every table at once. A sparse feature reads one
table (several features may share one), so a feature's ids become keys through its
table's offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bagpipe.hashing import mix, splitmix64, uniform01


@dataclass(frozen=True)
class RowSpace:
    cardinalities: tuple[int, ...]  # per table
    row_dim: int
    seed: int
    feature_tables: tuple[int, ...] = ()  # the table of each sparse feature; empty: one table per feature

    @classmethod
    def for_model(cls, model, seed: int, row_dim: int | None = None) -> "RowSpace":
        """The row space of a `ModelConfig` (row_dim: the model's unless given)."""
        return cls(tuple(model.cardinalities), model.row_dim if row_dim is None else row_dim, seed,
                   tuple(model.feature_tables))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.cardinalities, dtype=np.int64)[:-1]]).astype(np.int64)

    @property
    def feature_offsets(self) -> np.ndarray:
        """Key offset of each sparse feature's ids: its table's offset."""
        offsets = self.offsets
        return offsets[list(self.feature_tables)] if self.feature_tables else offsets

    @property
    def total_rows(self) -> int:
        return int(sum(self.cardinalities))

    def keys_of(self, sparse: np.ndarray) -> np.ndarray:
        """[features, b] ids -> [b, features] keys."""
        return (sparse + self.feature_offsets[:, None]).T

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
