"""Plan messages: what the oracle tells trainers and servers per iteration.

Plans are pure data (numpy arrays in typed dataclasses) so they can be computed,
tested and replayed without processes, and serialised to one flat int64 array
for the wire (`encode` / `decode`).

Stage s: after iteration s's update, each trainer sends each server one message
with the rows it writes back at s (and, in `none` mode, its gradients of
iteration s) and the keys it fetches at s. A server applies stage s from every
trainer in rank order, then answers the fetches, so a fetch at s sees every
update of iterations <= s. Stage -1 is the bootstrap before iteration 0.

Keys are global row keys (bagpipe.rows.RowSpace); the server of a key is
`key % servers`. Positions index the trainer's own sorted unique keys of its
slice (`reads`), which it computes itself from the data; the plan carries them
too so every trainer can check that it and the oracle agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

EMPTY_I64 = np.zeros(0, dtype=np.int64)


def server_of(keys: np.ndarray, servers: int) -> np.ndarray:
    """Placement of rows on servers: key modulo S spreads hot rows of every table."""
    return np.asarray(keys, dtype=np.int64) % servers


@dataclass
class TrainerPlan:
    """Trainer k's part of iteration i (DESIGN.md section 4).

    `none` mode uses only `iteration`, `reads` and `fetch_keys`/`fetch_slots`
    with fetch_slots unused; `bagpipe` mode uses all of it.
    """

    iteration: int
    trainer: int
    reads: np.ndarray  # int64 [u] sorted unique keys of the slice at `iteration`
    # reads served from the trainer's own cache: positions in `reads` and slots
    owned_pos: np.ndarray  # int64 [a]
    owned_slots: np.ndarray  # int64 [a]
    # reads served by other owners, one list per owner trainer (empty for self):
    # positions in `reads`, ascending; their gradient contributions go back the same way
    recv_pos: list[np.ndarray]  # T x int64
    # owned rows other trainers read at `iteration`: slots per reader, in the
    # reader's ascending key order; contributions come back in the same order
    send_slots: list[np.ndarray]  # T x int64
    # owned rows updated at `iteration` (read by anyone), ascending key, and
    # their keys (used to sum contributions and for digests)
    update_slots: np.ndarray  # int64 [n]
    update_keys: np.ndarray  # int64 [n]
    # stage `iteration`: rows written back after this iteration's update
    writeback_slots: np.ndarray  # int64 [w]
    writeback_keys: np.ndarray  # int64 [w]
    # stage `iteration`: rows fetched (landing in these slots when they arrive)
    fetch_keys: np.ndarray  # int64 [f]
    fetch_slots: np.ndarray  # int64 [f]
    # before `iteration` starts, wait for fetch answers of every stage <= this
    wait_through_stage: int = -2

    def encode(self) -> np.ndarray:
        return _encode(self)

    @classmethod
    def decode(cls, flat: np.ndarray) -> "TrainerPlan":
        return _decode(cls, flat)


@dataclass
class ServerPlan:
    """Server j's part of stage s: per trainer, how many rows each message holds."""

    stage: int
    server: int
    grad_counts: np.ndarray  # int64 [T]: gradient rows (none mode)
    writeback_counts: np.ndarray  # int64 [T]: rows written back with state (bagpipe mode)
    fetch_counts: np.ndarray  # int64 [T]: rows to fetch for later iterations
    read_only: int = 0  # 1: evaluation reads; fetched rows are not checked out to a cache

    def encode(self) -> np.ndarray:
        return _encode(self)

    @classmethod
    def decode(cls, flat: np.ndarray) -> "ServerPlan":
        return _decode(cls, flat)


# --- wire format: [n_fields, then per field: kind, length, data...] -----------------
# kind 0: int scalar, 1: int64 array, 2: list of int64 arrays (length = items)


def _encode(plan) -> np.ndarray:
    out: list[np.ndarray] = []
    for f in fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, (int, np.integer)):
            out.append(np.array([0, 1, int(value)], dtype=np.int64))
        elif isinstance(value, np.ndarray):
            out.append(np.array([1, value.size], dtype=np.int64))
            out.append(value.astype(np.int64, copy=False).ravel())
        else:
            out.append(np.array([2, len(value)], dtype=np.int64))
            for arr in value:
                out.append(np.array([arr.size], dtype=np.int64))
                out.append(arr.astype(np.int64, copy=False).ravel())
    return np.concatenate(out)


def _decode(cls, flat: np.ndarray):
    values = {}
    pos = 0
    for f in fields(cls):
        kind, length = int(flat[pos]), int(flat[pos + 1])
        pos += 2
        if kind == 0:
            values[f.name] = int(flat[pos])
            pos += 1
        elif kind == 1:
            values[f.name] = flat[pos : pos + length].copy()
            pos += length
        elif kind == 2:
            items = []
            for _ in range(length):
                n = int(flat[pos])
                items.append(flat[pos + 1 : pos + 1 + n].copy())
                pos += 1 + n
            values[f.name] = items
        else:
            raise ValueError(f"corrupt plan message: field {f.name} has kind {kind}")
    if pos != flat.size:
        raise ValueError(f"corrupt plan message: {flat.size - pos} trailing values")
    return cls(**values)
