"""The oracle's lookahead window: per-iteration read sets and an incremental next-use index.

Each global batch entering the window is reduced once, vectorised, to

- ``keys``: U_i, the sorted unique row keys the whole global batch reads;
- ``read_pos[k]``: positions in U_i of trainer k's reads (so ``keys[read_pos[k]]``
  is ``reads[k][i]``, the sorted unique keys of trainer k's contiguous slice);
- ``readers``: how many trainers read each key of U_i;
- ``first_reader``: a deterministic choice among a key's readers (the one picked
  by a hash of the key), the natural owner of a row first used at i.

Next uses are linked as batches enter, never by re-scanning the window: a dense
per-key array ``last_gidx[key]`` remembers where in a ring buffer the key's latest
occurrence lives; when U_j enters, the previous occurrences of its keys (if still in
the window) get ``next = j`` written at those ring positions. So once the window
holds iterations up to ``i + h``, ``next_use(i)`` is exact for every next use
``<= i + h`` and ``NO_USE`` for anything later (or none).

All work is numpy over whole batches; Python loops run over trainers only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from bagpipe.embedding import ExampleKeys
from bagpipe.hashing import splitmix64

NO_USE = np.iinfo(np.int32).max  # "no next use known within the window"


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for int arrays via sort + mask (numpy 2.x's np.unique is hash based
    and several times slower for batch-sized arrays)."""
    s = np.sort(np.asarray(values).ravel())
    if s.size == 0:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def key_hash(keys: np.ndarray) -> np.ndarray:
    """Deterministic per-key hash (uint64) used to break ownership ties."""
    return splitmix64(np.asarray(keys, dtype=np.int64).astype(np.uint64) ^ np.uint64(0xA5A5_5A5A_0F0F_F0F0))


@dataclass
class WindowEntry:
    iteration: int
    keys: np.ndarray  # int64 [n] sorted unique keys of the global batch (U_i)
    read_pos: list[np.ndarray]  # T x int64: positions in `keys` of trainer k's reads
    readers: np.ndarray  # int16 [n]: number of trainers reading each key
    first_reader: np.ndarray  # int16 [n]: hash-chosen reader of each key
    gbase: int  # absolute ring index of keys[0]

    def reads(self, k: int) -> np.ndarray:
        return self.keys[self.read_pos[k]]

    @property
    def total_reads(self) -> int:
        return int(sum(p.size for p in self.read_pos))


def trainer_keys(batch, trainers: int) -> list[np.ndarray]:
    """Each trainer's row keys (with repeats) of one global batch, given either as an int
    [B, features] key array (one-hot data: trainer k has the k-th block of B/T rows) or,
    for multi-hot data, as `ExampleKeys`."""
    if isinstance(batch, ExampleKeys):
        return batch.per_trainer(trainers)
    arr = np.asarray(batch)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"expected an int64 [B, features] key array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] % trainers:
        raise ValueError(f"global batch of {arr.shape[0]} examples does not split over {trainers} trainers "
                         f"(B % T must be 0)")
    per = arr.shape[0] // trainers
    return [arr[k * per:(k + 1) * per].astype(np.int64, copy=False).ravel() for k in range(trainers)]


class LookaheadWindow:
    """Streams global batches (an int64 [B, features] key array, or `ExampleKeys` for
    multi-hot data) into per-iteration entries.

    ``ensure(i)`` pulls batches lazily until iteration i is loaded (False when the
    stream ends first); ``release(i)`` forgets entries below i. After the stream is
    exhausted, ``length`` is the number of (full) iterations N.
    """

    def __init__(self, batches: Iterator[np.ndarray], trainers: int, total_rows: int):
        if trainers < 1:
            raise ValueError(f"trainers must be >= 1, got {trainers}")
        self._it = iter(batches)
        self.trainers = trainers
        self.total_rows = int(total_rows)
        self._entries: deque[WindowEntry] = deque()
        self._first = 0  # iteration of _entries[0]
        self._next = 0  # next iteration to load
        self.exhausted = False
        self._batch_shape: tuple[int, int] | None = None
        # dense per-key state
        self._last_gidx = np.full(self.total_rows, -1, dtype=np.int64)
        self._scratch = np.zeros(self.total_rows, dtype=np.int32)
        # ring of next-use values, addressed by absolute index % capacity (a power of two)
        self._ring = np.full(1 << 16, NO_USE, dtype=np.int32)
        self._gcursor = 0

    # -- loading -----------------------------------------------------------------
    @property
    def loaded_through(self) -> int:
        """Last loaded iteration (-1 if none)."""
        return self._next - 1

    @property
    def length(self) -> int | None:
        return self._next if self.exhausted else None

    def ensure(self, iteration: int) -> bool:
        while self._next <= iteration:
            if self.exhausted:
                return False
            try:
                batch = next(self._it)
            except StopIteration:
                self.exhausted = True
                return False
            self._push(batch)
        return True

    def is_last(self, iteration: int) -> bool:
        """True if `iteration` is the final iteration of the stream."""
        return not self.ensure(iteration + 1) and self._next == iteration + 1

    def _check_batch(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(flat keys, trainer bounds into them), range-checked."""
        if isinstance(batch, ExampleKeys):
            try:
                parts = trainer_keys(batch, self.trainers)
            except ValueError as err:
                raise ValueError(f"batch {self._next}: {err}") from None
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            bounds = np.cumsum([0] + [p.size for p in parts])
            self._check_range(flat)
            return flat, bounds
        arr = np.asarray(batch)
        if arr.ndim != 2:
            raise ValueError(f"batch {self._next}: expected an int64 [B, tables] key array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"batch {self._next}: keys must be integers, got {arr.dtype}")
        if self._batch_shape is None:
            self._batch_shape = arr.shape
            if arr.shape[0] % self.trainers:
                raise ValueError(
                    f"global batch of {arr.shape[0]} examples does not split over {self.trainers} trainers "
                    f"(B % T must be 0)"
                )
        elif arr.shape != self._batch_shape:
            raise ValueError(f"batch {self._next}: shape {arr.shape} differs from the first batch's {self._batch_shape}")
        flat = np.ascontiguousarray(arr, dtype=np.int64).ravel()
        self._check_range(flat)
        per = flat.size // self.trainers  # trainer k's ids are the k-th block of rows
        return flat, per * np.arange(self.trainers + 1)

    def _check_range(self, flat: np.ndarray) -> None:
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.total_rows:
                raise ValueError(f"batch {self._next}: key out of range [0, {self.total_rows}): min {lo}, max {hi}")

    def _push(self, batch) -> None:
        flat, bounds = self._check_batch(batch)
        j = self._next
        T = self.trainers
        if self.total_rows <= np.iinfo(np.int32).max:  # (keys checked in range above)
            flat = flat.astype(np.int32)  # sorts ~1.5x faster
        keys = sorted_unique(flat).astype(np.int64)
        n = keys.size
        # inverse indices through a dense scratch array (no argsort)
        self._scratch[keys] = np.arange(n, dtype=np.int32)
        inv = self._scratch[flat]
        readers = np.zeros(n, dtype=np.int16)
        masks = []
        read_pos = []
        for k in range(T):
            m = np.zeros(n, dtype=bool)
            m[inv[bounds[k]:bounds[k + 1]]] = True
            masks.append(m)
            read_pos.append(np.flatnonzero(m))
            readers += m
        if T == 1:
            first_reader = np.zeros(n, dtype=np.int16)
        else:
            # single reader: that reader; several: the h-th of them, h = hash(key) % readers
            first_reader = np.zeros(n, dtype=np.int16)
            for k in range(1, T):
                first_reader[masks[k]] = k  # the last (for single readers: the only) reader
            multi = np.flatnonzero(readers > 1)
            if multi.size:
                pick = (key_hash(keys[multi]) % readers[multi].astype(np.uint64)).astype(np.int16)
                choice = np.full(multi.size, -1, dtype=np.int16)
                seen = np.zeros(multi.size, dtype=np.int16)
                for k in range(T):
                    m = masks[k][multi]
                    choice[m & (seen == pick)] = k
                    seen += m
                first_reader[multi] = choice
        gbase = self._gcursor
        self._reserve(n)
        # link previous occurrences still in the window to this one
        prev = self._last_gidx[keys]
        alive = prev >= self._alive_start()
        mask = self._ring.size - 1  # the ring size is a power of two
        self._ring[prev[alive] & mask] = j
        gidx = gbase + np.arange(n, dtype=np.int64)
        self._ring[gidx & mask] = NO_USE
        self._last_gidx[keys] = gidx
        self._gcursor += n
        self._entries.append(WindowEntry(j, keys, read_pos, readers, first_reader, gbase))
        self._next += 1

    def _alive_start(self) -> int:
        return self._entries[0].gbase if self._entries else self._gcursor

    def _reserve(self, n: int) -> None:
        start = self._alive_start()
        need = self._gcursor + n - start
        cap = self._ring.size
        if need <= cap:
            return
        new_cap = cap
        while new_cap < need:
            new_cap *= 2
        live = np.arange(start, self._gcursor, dtype=np.int64)
        ring = np.full(new_cap, NO_USE, dtype=np.int32)
        ring[live % new_cap] = self._ring[live % cap]
        self._ring = ring

    # -- access ------------------------------------------------------------------
    def entry(self, iteration: int) -> WindowEntry:
        if not self._first <= iteration < self._next:
            raise KeyError(f"iteration {iteration} is not in the window [{self._first}, {self._next})")
        return self._entries[iteration - self._first]

    def next_use(self, iteration: int) -> np.ndarray:
        """int32 [n]: for each key of U_iteration, its next use (NO_USE if none known)."""
        e = self.entry(iteration)
        idx = (e.gbase + np.arange(e.keys.size, dtype=np.int64)) & (self._ring.size - 1)
        return self._ring[idx]

    def release(self, below: int) -> None:
        """Forget entries of iterations < below."""
        while self._entries and self._first < below:
            self._entries.popleft()
            self._first += 1
