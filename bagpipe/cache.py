"""A trainer's share of the logically replicated, physically partitioned cache.

Each cached row has one owner trainer, which keeps its value and optimizer state
in a slot the oracle chose (DESIGN.md section 4). The cache decides nothing; it
executes the plan and checks it: `resolve` turns the compact `PlanMessage` plus
the trainer's own reads into the full list of what to do, deriving what the
message leaves out (which reads this trainer owns, in which slots; the rows it
updates; the keys it writes back) from what the cache holds. A plan that reads a
row that is not resident, or slots that hold nothing, is an error naming the row
or slot instead of a silently wrong value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bagpipe.errors import PeerError
from bagpipe.optim import SparseOptimizer
from bagpipe.plan import PlanMessage


@dataclass
class ResolvedPlan:
    """Everything trainer k does at iteration i, in terms of its slots and reads."""

    owned_pos: np.ndarray  # int64 positions in reads of rows this trainer owns
    owned_slots: np.ndarray  # int64 their slots
    recv_pos: list[np.ndarray]  # T x int64: positions of reads each other owner sends
    send_slots: list[np.ndarray]  # T x int64: slots whose values go to each reader
    update_slots: np.ndarray  # int64 owned rows read by anyone, ascending key
    update_keys: np.ndarray  # int64
    writeback_slots: np.ndarray  # int64
    writeback_keys: np.ndarray  # int64
    fetch_keys: np.ndarray  # int64, ascending
    fetch_slots: np.ndarray  # int64
    flush_slots: np.ndarray  # int64: rows sent to the servers for a checkpoint, staying here
    flush_keys: np.ndarray  # int64


class OwnedCache:
    """Owned rows with their optimizer state in preallocated slots, and a sorted
    index of the resident keys (key -> slot) so reads can be matched to slots
    without a per-key map the size of the tables."""

    def __init__(self, capacity: int, optimizer: SparseOptimizer, who: str, trainer: int = 0, trainers: int = 1):
        self.who, self.trainer, self.trainers = who, trainer, trainers
        self.optimizer = optimizer
        self.values = torch.zeros((capacity, optimizer.row_dim), dtype=torch.float32)
        self.state = optimizer.initial_state(capacity)
        self.slot_keys = np.full(capacity, -1, dtype=np.int64)
        self._keys = np.zeros(0, dtype=np.int64)  # resident keys, ascending
        self._slots = np.zeros(0, dtype=np.int64)  # their slots

    @property
    def occupancy(self) -> int:
        return int(self._keys.size)

    def resident_keys(self) -> np.ndarray:
        return self._keys

    # --- slots -----------------------------------------------------------------------
    def _grow(self, slots: np.ndarray) -> None:
        """Grow (unlimited capacity only: a bounded cache is allocated at full size)."""
        need = int(slots.max()) + 1 if len(slots) else 0
        if need > len(self.slot_keys):
            grow = max(need, 2 * len(self.slot_keys)) - len(self.slot_keys)
            self.values = torch.cat([self.values, torch.zeros((grow, self.values.shape[1]))])
            self.state = torch.cat([self.state, self.optimizer.initial_state(grow)])
            self.slot_keys = np.concatenate([self.slot_keys, np.full(grow, -1, dtype=np.int64)])

    def held(self, slots: np.ndarray) -> np.ndarray:
        """Key in each slot; -1 for an empty slot or one outside the cache."""
        slots = np.asarray(slots, dtype=np.int64)
        inside = (slots >= 0) & (slots < len(self.slot_keys))
        return np.where(inside, self.slot_keys[np.where(inside, slots, 0)], -1)

    def occupied(self, slots: np.ndarray, what: str) -> np.ndarray:
        """The plan says these slots hold rows: they must. Returns the keys."""
        held = self.held(slots)
        if np.any(held < 0):
            slot = int(np.asarray(slots)[np.flatnonzero(held < 0)[0]])
            raise PeerError(f"{self.who}: {what}: slot {slot} holds no row: the plan uses a row that is not resident")
        return held

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of keys resident here, their slots) for a sorted or unsorted key array."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self._keys, keys)
        inside = pos < self._keys.size
        hit = np.zeros(keys.size, dtype=bool)
        hit[inside] = self._keys[pos[inside]] == keys[inside]
        return hit, self._slots[pos[hit]]

    # --- plan ------------------------------------------------------------------------
    def resolve(self, msg: PlanMessage, reads: np.ndarray) -> ResolvedPlan:
        """The full plan of this iteration from the message and this slice's reads
        (sorted unique keys), checked against what the cache holds."""
        where = f"{self.who}: iteration {msg.iteration}"
        if msg.trainer != self.trainer:
            raise PeerError(f"{where}: got trainer {msg.trainer}'s plan")
        msg.check_reads(reads, self.who)
        hit, owned_slots = self.lookup(reads)
        owned_pos = np.flatnonzero(hit)
        if owned_pos.size != msg.owned_count:
            raise PeerError(
                f"{where}: the plan serves {msg.owned_count} reads from this trainer's cache but "
                f"{owned_pos.size} of them are resident: the plan reads a row that is not resident "
                f"(its fetch has not landed, or it was written back)")
        T, k = self.trainers, self.trainer
        other = np.flatnonzero(~hit)
        recv_pos = [np.zeros(0, dtype=np.int64) for _ in range(T)]
        if other.size:
            if T == 1:
                raise PeerError(f"{where}: row {int(reads[other[0]])} is not resident in the only cache")
            if T == 2:
                recv_pos[1 - k] = other
            else:
                owner = np.asarray(msg.recv_owner, dtype=np.int64)
                if owner.size != other.size or np.any(owner == k) or np.any(owner >= T):
                    raise PeerError(f"{where}: the plan names {owner.size} remote owners for {other.size} reads "
                                    f"not resident here: plan and cache disagree")
                order = np.argsort(owner, kind="stable")
                bounds = np.cumsum(np.bincount(owner, minlength=T))[:-1]
                recv_pos = [other[g] for g in np.split(order, bounds)]
        send_slots = [np.asarray(s, dtype=np.int64) for s in msg.send_slots]
        if len(send_slots) != T or send_slots[k].size:
            raise PeerError(f"{where}: send lists malformed ({len(send_slots)} lists for {T} trainers)")
        for j in range(T):
            self.occupied(send_slots[j], "value exchange")
        touched = np.zeros(len(self.slot_keys), dtype=bool)  # owned rows read by anyone (sends can overlap)
        touched[owned_slots] = True
        for slots in send_slots:
            touched[slots] = True
        upd = np.flatnonzero(touched)
        upd_keys = self.slot_keys[upd]
        order = np.argsort(upd_keys, kind="stable")
        wb_slots = np.asarray(msg.writeback_slots, dtype=np.int64)
        wb_keys = self.occupied(wb_slots, "write-back")
        flush_slots = np.asarray(msg.flush_slots, dtype=np.int64)
        flush_keys = self.occupied(flush_slots, "checkpoint flush")
        return ResolvedPlan(owned_pos, owned_slots, recv_pos, send_slots, upd[order], upd_keys[order], wb_slots,
                            wb_keys, np.asarray(msg.fetch_keys, dtype=np.int64),
                            np.asarray(msg.fetch_slots, dtype=np.int64), flush_slots, flush_keys)

    # --- rows in and out ---------------------------------------------------------------
    def land(self, keys: np.ndarray, slots: np.ndarray, values: torch.Tensor, state: torch.Tensor | None) -> None:
        """Fetched rows (keys ascending) arrive in their slots."""
        if len(keys) == 0:
            return
        if keys.size > 1 and np.any(keys[1:] <= keys[:-1]):
            raise PeerError(f"{self.who}: fetched rows arrive out of key order")
        self._grow(slots)
        if np.any(self.held(slots) >= 0):
            raise PeerError(f"{self.who}: a fetched row lands in a slot that is still occupied")
        pos = np.searchsorted(self._keys, keys)
        inside = pos < self._keys.size
        if np.any(self._keys[pos[inside]] == keys[inside]):
            raise PeerError(f"{self.who}: a fetched row is already resident")
        idx = torch.from_numpy(slots)
        self.values.index_copy_(0, idx, values)
        if state is not None and self.state.shape[1]:
            self.state.index_copy_(0, idx, state)
        self.slot_keys[slots] = keys
        self._keys = np.insert(self._keys, pos, keys)
        self._slots = np.insert(self._slots, pos, slots)

    def snapshot(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of rows' values and state (a checkpoint flush: the rows stay)."""
        idx = torch.from_numpy(slots)
        return self.values.index_select(0, idx), self.state.index_select(0, idx)

    def evict(self, keys: np.ndarray, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows leave (write-back): their value and state, and the slots free up."""
        idx = torch.from_numpy(slots)
        values = self.values.index_select(0, idx)
        state = self.state.index_select(0, idx)
        self.slot_keys[slots] = -1
        keep = np.ones(self._keys.size, dtype=bool)
        keep[np.searchsorted(self._keys, keys)] = False
        self._keys, self._slots = self._keys[keep], self._slots[keep]
        return values, state

    def update(self, slots: np.ndarray, grads: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The owner's optimizer step on its rows; returns the updated rows and state."""
        return self.optimizer.update_rows(self.values, self.state, torch.from_numpy(slots), grads, lr)
