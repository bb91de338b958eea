"""Where rows live: the one rule mapping a row key to an embedding server.

Row key modulo S spreads the hot rows of every table over all servers (keys of one
table are contiguous, so a range split would put a table's hot head on one server).
Planners, servers, the plan verifier and the oracle all ask this object; nothing
else writes the rule out. Placement changes no result (DESIGN.md section 2): rows
are initialised from their key, and every update is the same optimizer on the
same rows in the same order wherever they live.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    servers: int

    def __post_init__(self) -> None:
        if self.servers < 1:
            raise ValueError(f"servers must be >= 1, got {self.servers}")

    def server_of(self, keys: np.ndarray) -> np.ndarray:
        return np.asarray(keys, dtype=np.int64) % self.servers

    def local_index(self, keys: np.ndarray) -> np.ndarray:
        """Index of each key in its server's shard (the shard holds keys j, j+S, ...)."""
        return np.asarray(keys, dtype=np.int64) // self.servers

    def shard_keys(self, server: int, total_rows: int) -> np.ndarray:
        """Every key server `server` holds, ascending."""
        return np.arange(server, total_rows, self.servers, dtype=np.int64)

    def holds(self, server: int, keys: np.ndarray, total_rows: int) -> bool:
        keys = np.asarray(keys)
        if keys.size == 0:
            return True
        return bool(keys.min() >= 0 and keys.max() < total_rows and np.all(self.server_of(keys) == server))

    def counts(self, keys: np.ndarray) -> np.ndarray:
        """Rows per server (int64 [S])."""
        return np.bincount(self.server_of(keys), minlength=self.servers).astype(np.int64)

    def split(self, keys: np.ndarray) -> list[np.ndarray]:
        """Positions in `keys` of each server's rows, each ascending (so a sorted
        key list stays sorted per server)."""
        if self.servers == 1:
            return [np.arange(len(keys), dtype=np.int64)]
        srv = self.server_of(keys)
        order = np.argsort(srv, kind="stable")
        bounds = np.cumsum(np.bincount(srv, minlength=self.servers))[:-1]
        return np.split(order.astype(np.int64), bounds)
