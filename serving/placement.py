"""Table placement for scale-out inference: which sparse shard holds which tables or row ranges.

Every strategy is a pure function of the table sizes, the access statistics sampled
from requests (`AccessStats`: which tables each sampled request touched, pooling
factors) and a per-shard memory capacity; it returns a `ShardPlacement`. All are
greedy:

- ``capacity``: tables by size, largest first, each onto the shard holding the fewest
  bytes so far (LPT): when capacity does not bind, the fullest shard holds at most
  (4/3 - 1/(3K)) times the optimum (Graham's bound for LPT).
- ``load``: the same LPT greedy on expected lookup work per request (coverage x pooling
  x dim: the floats a shard adds up), among the shards with room; same bound on the
  most loaded shard while capacity does not bind.
- ``coaccess``: shards filled one at a time; each next table is the one that the sampled
  requests most often touch together with the tables already on the shard, so that a
  request contacts few shards. A heuristic for a graph-partitioning problem (NP-hard);
  no approximation bound, its measured shards per request is what it is judged by.
- ``single``: every table whole on one remote shard, capacity ignored (isolates the
  cost of the remote call); ``local``: every table inside the main shard, no remote
  call (the single-process baseline).

A table that does not fit whole on any shard (larger than the capacity, or than any
shard's room left) is split by rows over the shards with the most room, largest room
first. A placement that cannot fit is a `PlacementError` naming the table and the
per-shard capacity at which this strategy would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from bagpipe.config import ConfigError

FLOAT_BYTES = 4


class Strategy(str, Enum):
    LOCAL = "local"
    SINGLE = "single"
    CAPACITY = "capacity"
    LOAD = "load"
    COACCESS = "coaccess"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: str) -> "Strategy":
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(f"--placement {text!r} unknown; expected one of "
                              f"{', '.join(s.value for s in cls)}") from None


class PlacementError(ValueError):
    """No placement of this strategy fits the tables into the shards' capacity."""


@dataclass(frozen=True)
class AccessStats:
    """What placement knows about requests: a sample of which tables each touched."""

    touched: np.ndarray  # bool [R, T]: sampled request r touches table t
    pooling: np.ndarray  # float [T]: mean ids per item when touched
    items: float = 1.0  # mean candidate items per request

    @property
    def coverage(self) -> np.ndarray:
        return self.touched.mean(axis=0)

    @classmethod
    def uniform(cls, num_tables: int) -> "AccessStats":
        """Every request touches every table once per item (one-hot training data)."""
        return cls(np.ones((1, num_tables), dtype=bool), np.ones(num_tables))


@dataclass(frozen=True)
class TablePart:
    table: int
    shard: int
    row_lo: int
    row_hi: int

    @property
    def rows(self) -> int:
        return self.row_hi - self.row_lo


@dataclass(frozen=True)
class ShardPlacement:
    strategy: Strategy
    shards: int
    capacity_bytes: int | None
    cardinalities: tuple[int, ...]
    row_dim: int
    parts: tuple[TablePart, ...]  # sorted by (table, row_lo)

    @property
    def remote(self) -> bool:
        return self.strategy is not Strategy.LOCAL

    @property
    def row_bytes(self) -> int:
        return self.row_dim * FLOAT_BYTES

    def parts_of(self, table: int) -> list[TablePart]:
        return [p for p in self.parts if p.table == table]

    def parts_on(self, shard: int) -> list[TablePart]:
        return [p for p in self.parts if p.shard == shard]

    def tables_on(self, shard: int) -> list[int]:
        return sorted({p.table for p in self.parts if p.shard == shard})

    def is_whole(self, part: TablePart) -> bool:
        return part.row_lo == 0 and part.row_hi == self.cardinalities[part.table]

    @property
    def split_tables(self) -> list[int]:
        return sorted({p.table for p in self.parts if not self.is_whole(p)})

    def shard_bytes(self) -> np.ndarray:
        out = np.zeros(self.shards, dtype=np.int64)
        for p in self.parts:
            out[p.shard] += p.rows * self.row_bytes
        return out

    def shard_load(self, stats: AccessStats) -> np.ndarray:
        """Expected floats added up per request on each shard (coverage x pooling x dim, a split
        table's share by rows)."""
        work = table_work(stats, self.row_dim)
        out = np.zeros(self.shards)
        for p in self.parts:
            out[p.shard] += work[p.table] * p.rows / self.cardinalities[p.table]
        return out

    def shards_per_request(self, stats: AccessStats) -> float:
        """Mean number of shards the sampled requests contact (0 for local)."""
        if not self.remote:
            return 0.0
        holds = np.zeros((len(self.cardinalities), self.shards), dtype=np.int64)
        for p in self.parts:
            holds[p.table, p.shard] = 1
        return float(((stats.touched.astype(np.int64) @ holds) > 0).sum(axis=1).mean())

    def to_dict(self) -> dict:
        return {"strategy": self.strategy.value, "shards": self.shards, "capacity_bytes": self.capacity_bytes,
                "cardinalities": list(self.cardinalities), "row_dim": self.row_dim,
                "parts": [[p.table, p.shard, p.row_lo, p.row_hi] for p in self.parts]}

    @classmethod
    def from_dict(cls, data: dict) -> "ShardPlacement":
        return cls(Strategy(data["strategy"]), int(data["shards"]), data["capacity_bytes"],
                   tuple(int(c) for c in data["cardinalities"]), int(data["row_dim"]),
                   tuple(TablePart(*map(int, p)) for p in data["parts"]))


def imbalance(values: np.ndarray) -> float:
    """max / mean over shards (1.0 is perfect balance)."""
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean() if values.size else 0.0
    return float(values.max() / mean) if mean > 0 else 1.0


def table_work(stats: AccessStats, row_dim: int) -> np.ndarray:
    """[T] expected floats pooled per request: coverage x pooling x items x dim."""
    return stats.coverage * stats.pooling * stats.items * row_dim


class _Packer:
    """Free room per shard and the parts placed so far."""

    def __init__(self, cardinalities: Sequence[int], row_bytes: int, shards: int, capacity: int) -> None:
        self.cards, self.row_bytes = list(cardinalities), row_bytes
        self.free = np.full(shards, capacity, dtype=np.int64)
        self.parts: list[TablePart] = []

    def nbytes(self, table: int) -> int:
        return self.cards[table] * self.row_bytes

    def fitting(self, table: int) -> np.ndarray:
        return np.flatnonzero(self.free >= self.nbytes(table))

    def put(self, table: int, shard: int) -> None:
        self.parts.append(TablePart(table, int(shard), 0, self.cards[table]))
        self.free[shard] -= self.nbytes(table)

    def place(self, table: int, choose: Callable[[np.ndarray], int]) -> None:
        """Whole on the shard `choose` picks among those with room, else split by rows."""
        fits = self.fitting(table)
        if fits.size:
            self.put(table, choose(fits))
            return
        room_rows = self.free // self.row_bytes
        if room_rows.sum() < self.cards[table]:
            raise _NoFit(table)
        lo = 0
        for shard in np.argsort(-room_rows, kind="stable"):
            take = int(min(room_rows[shard], self.cards[table] - lo))
            if take <= 0:
                break
            self.parts.append(TablePart(table, int(shard), lo, lo + take))
            self.free[shard] -= take * self.row_bytes
            lo += take


class _NoFit(Exception):
    def __init__(self, table: int) -> None:
        self.table = table


def _greedy_lpt(packer: _Packer, weight: np.ndarray, tie_break: np.ndarray) -> None:
    """Heaviest first (ties: larger `tie_break`, then lower index) onto the least weighted shard
    with room; a split adds weight by rows."""
    shard_weight = np.zeros(len(packer.free))
    for t in np.lexsort((np.arange(len(weight)), -tie_break, -weight)):
        before = len(packer.parts)
        packer.place(int(t), lambda fits: int(fits[np.argmin(shard_weight[fits])]))
        for p in packer.parts[before:]:
            shard_weight[p.shard] += weight[t] * p.rows / packer.cards[t]


def _coaccess(packer: _Packer, touched: np.ndarray, shards: int) -> None:
    """Fill shard after shard with the tables most often touched together with it."""
    unplaced = set(range(len(packer.cards)))
    together = np.zeros(touched.shape[0], dtype=bool)  # sampled requests touching the open shard
    hits = touched.sum(axis=0)
    shard = 0
    while unplaced and shard < shards:
        candidates = [t for t in sorted(unplaced) if packer.free[shard] >= packer.nbytes(t)]
        if not candidates:
            shard += 1
            together[:] = False
            continue
        cand = np.array(candidates)
        if together.any():
            score = touched[together][:, cand].sum(axis=0)  # requests that touch t and the shard
        else:
            score = hits[cand]
        t = int(cand[np.lexsort((cand, -hits[cand], -score))[0]])
        packer.put(t, shard)
        together |= touched[:, t]
        unplaced.discard(t)
    for t in sorted(unplaced, key=lambda t: (-packer.nbytes(t), t)):  # what no shard took whole: split
        packer.place(t, lambda fits: int(fits[np.argmax(packer.free[fits])]))


def place(strategy: Strategy, cardinalities: Sequence[int], row_dim: int, stats: AccessStats, shards: int,
          capacity_bytes: int | None = None) -> ShardPlacement:
    """The placement `strategy` makes of tables with these sizes on `shards` shards of
    `capacity_bytes` each (None: unlimited)."""
    cards = tuple(int(c) for c in cardinalities)
    if stats.touched.shape[1] != len(cards) or stats.pooling.shape != (len(cards),):
        raise ConfigError(f"access statistics cover {stats.touched.shape[1]} tables, the model has {len(cards)}")
    row_bytes = row_dim * FLOAT_BYTES
    if strategy in (Strategy.LOCAL, Strategy.SINGLE):
        parts = tuple(TablePart(t, 0, 0, c) for t, c in enumerate(cards))
        return ShardPlacement(strategy, 1, None, cards, row_dim, parts)
    if shards < 1:
        raise ConfigError(f"--shards must be >= 1 for placement {strategy}, got {shards}")
    total = sum(cards) * row_bytes
    capacity = total if capacity_bytes is None else int(capacity_bytes)
    if capacity < row_bytes:
        raise ConfigError(f"shard capacity {capacity} bytes is smaller than one row ({row_bytes} bytes)")
    try:
        parts = _pack(strategy, cards, row_bytes, stats, shards, capacity)
    except _NoFit as err:
        needed = _min_capacity(strategy, cards, row_bytes, stats, shards, lo=capacity, hi=max(total, capacity))
        t = err.table
        raise PlacementError(
            f"placement {strategy} cannot fit table {t} ({cards[t]} rows, {_size(cards[t] * row_bytes)}) on "
            f"{shards} shards of {_size(capacity)} each ({_size(total)} of tables in all); it needs a capacity of at "
            f"least {_size(needed)} per shard") from None
    return ShardPlacement(strategy, shards, capacity_bytes, cards, row_dim,
                          tuple(sorted(parts, key=lambda p: (p.table, p.row_lo))))


def _pack(strategy: Strategy, cards: tuple[int, ...], row_bytes: int, stats: AccessStats, shards: int,
          capacity: int) -> list[TablePart]:
    packer = _Packer(cards, row_bytes, shards, capacity)
    sizes = np.array(cards, dtype=np.float64) * row_bytes
    if strategy is Strategy.CAPACITY:
        _greedy_lpt(packer, sizes, sizes)
    elif strategy is Strategy.LOAD:
        _greedy_lpt(packer, table_work(stats, row_bytes // FLOAT_BYTES), sizes)
    elif strategy is Strategy.COACCESS:
        _coaccess(packer, stats.touched, shards)
    else:
        raise ConfigError(f"placement {strategy} is not a packing strategy")
    return packer.parts


def _min_capacity(strategy, cards, row_bytes, stats, shards, lo: int, hi: int) -> int:
    """The smallest per-shard capacity (to a row) at which this strategy fits, by bisection."""
    def fits(capacity: int) -> bool:
        try:
            _pack(strategy, cards, row_bytes, stats, shards, capacity)
            return True
        except _NoFit:
            return False

    lo_rows, hi_rows = lo // row_bytes, math.ceil(hi / row_bytes)
    while not fits(hi_rows * row_bytes):
        hi_rows *= 2
    while lo_rows + 1 < hi_rows:
        mid = (lo_rows + hi_rows) // 2
        if fits(mid * row_bytes):
            hi_rows = mid
        else:
            lo_rows = mid
    return hi_rows * row_bytes


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def default_capacity(cardinalities: Sequence[int], row_dim: int, shards: int, slack: float) -> int:
    """Per-shard capacity when none is given: the tables' bytes / K times `slack`
    (memory-bound serving: the model fills 1/slack of the shards' memory)."""
    if not slack >= 1:
        raise ConfigError(f"--capacity-slack must be >= 1, got {slack}")
    return int(math.ceil(sum(cardinalities) * row_dim * FLOAT_BYTES * slack / max(1, shards)))
