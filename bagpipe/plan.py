"""Plans: what the oracle decides per iteration, and the compact form it ships.

Stage s: after iteration s's update, each trainer sends each server one message
with the rows it writes back at s (and, in `none` mode, its gradients of
iteration s) and the keys it fetches at s. A server applies stage s from every
trainer in rank order, then answers the fetches, so a fetch at s sees every
update of iterations <= s. Stage -1 is the bootstrap before iteration 0.
Evaluations read (read-only) between two stages, in stages of their own (`eval_stage`).

Two forms of a trainer's plan:

- `TrainerPlan`, the planner's full decisions (reads, who owns each read, slots,
  updates, write-backs, fetches). Pure data: planners make it, the verifier replays
  it, tests compare it.
- `PlanMessage`, what actually travels: only what the trainer cannot work out
  itself. A trainer knows its own reads (it reads its slice) and which rows its
  cache holds, so it derives which reads it owns (and their slots), the rows it
  updates and the keys it writes back (`bagpipe.cache.OwnedCache.resolve`). The
  message keeps the owner of each read served by another trainer (implied when
  T <= 2), the slots each reader gets values from, the write-back slots and the
  fetches, in int32 where they fit, plus a count and checksum of the reads and the
  owned count so trainer and oracle can prove they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from bagpipe.errors import PeerError
from bagpipe.hashing import splitmix64
from bagpipe.placement import Placement

EMPTY_I64 = np.zeros(0, dtype=np.int64)
STOP_STAGE = -1000  # a ServerPlan with this stage ends the server's loop
# Read-only evaluation stages sit between stage i and stage i + 1 (after iteration i's
# updates are applied, or flushed from the caches); their numbers are far from any
# training stage's, so a mix-up fails the frame checks instead of passing.
_EVAL_STAGE_BASE = 1 << 50
_EVAL_BATCHES_MAX = 1 << 24


def eval_stage(after_iteration: int, batch: int) -> int:
    """The stage number of eval batch `batch` of the evaluation after `after_iteration`."""
    if not 0 <= batch < _EVAL_BATCHES_MAX:
        raise ValueError(f"eval batch {batch} out of range (at most {_EVAL_BATCHES_MAX} eval batches)")
    return _EVAL_STAGE_BASE + after_iteration * _EVAL_BATCHES_MAX + batch
_PLAN_MAGIC = 0x504C_414E  # "PLAN"
_SERVER_MAGIC = 0x5352_5650  # "SRVP"
_EVAL_MAGIC = 0x4556_414C  # "EVAL"


class PlanFormatError(ValueError):
    """A plan message that does not decode: truncated, corrupt, or of another kind."""


def key_dtype(total_rows: int) -> np.dtype:
    """Row keys travel as int32 when every key fits."""
    return np.dtype(np.int32) if total_rows <= np.iinfo(np.int32).max else np.dtype(np.int64)


def reads_checksum(keys: np.ndarray) -> int:
    """Order-free checksum of a set of keys (sum mod 2^64 of their hashes)."""
    keys = np.asarray(keys, dtype=np.int64)
    with np.errstate(over="ignore"):
        return int(splitmix64(keys.astype(np.uint64) ^ np.uint64(0x7EAD5)).sum(dtype=np.uint64))


@dataclass
class TrainerPlan:
    """Trainer k's part of iteration i (DESIGN.md section 4): the planner's full decisions.

    `none` mode uses only `iteration`, `reads` and `fetch_keys` (its reads of i+1);
    `bagpipe` mode uses all of it.
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
    # owned rows updated at `iteration` (read by anyone), ascending key, and their keys
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
    # stage `iteration` is a checkpoint: rows changed since their fetch (or the last
    # flush) go to the servers with their state and stay resident
    flush_slots: np.ndarray = field(default_factory=lambda: EMPTY_I64)
    flush_keys: np.ndarray = field(default_factory=lambda: EMPTY_I64)


@dataclass
class ServerPlan:
    """Server j's part of stage s: per trainer, how many rows each message holds."""

    stage: int
    server: int
    grad_counts: np.ndarray  # int [T]: gradient rows (none mode)
    writeback_counts: np.ndarray  # int [T]: rows written back with state (bagpipe mode)
    fetch_counts: np.ndarray  # int [T]: rows to fetch for later iterations
    read_only: bool = False  # evaluation reads: fetched rows are not checked out to a cache
    flush_counts: np.ndarray | None = None  # int [T]: rows flushed at a checkpoint (stay cached)
    checkpoint: int = 0  # > 0: after this stage, write the shard as the checkpoint of this many iterations

    def __post_init__(self) -> None:
        if self.flush_counts is None:
            self.flush_counts = np.zeros(len(self.grad_counts), dtype=np.int64)

    @classmethod
    def stop(cls, server: int, trainers: int) -> "ServerPlan":
        zeros = np.zeros(trainers, dtype=np.int64)
        return cls(STOP_STAGE, server, zeros, zeros, zeros)

    @property
    def is_stop(self) -> bool:
        return self.stage == STOP_STAGE

    def counts(self, trainer: int) -> tuple[int, int, int, int]:
        """Rows of each section of trainer `trainer`'s stage frame: gradients, write-backs, flushes, fetches."""
        return (int(self.grad_counts[trainer]), int(self.writeback_counts[trainer]), int(self.flush_counts[trainer]),
                int(self.fetch_counts[trainer]))

    def encode(self) -> np.ndarray:
        header = np.array([_SERVER_MAGIC, self.stage, self.server, int(self.read_only), self.checkpoint,
                           len(self.grad_counts)], dtype=np.int64)
        counts = np.concatenate([self.grad_counts, self.writeback_counts, self.flush_counts,
                                 self.fetch_counts]).astype(np.int32)
        return np.concatenate([header.view(np.uint8), counts.view(np.uint8)])

    @classmethod
    def decode(cls, buf: np.ndarray) -> "ServerPlan":
        reader = _Reader(buf, "server plan")
        reader.expect_magic(_SERVER_MAGIC)
        stage, server, read_only, checkpoint, trainers = (int(x) for x in reader.take(np.int64, 5))
        counts = reader.take(np.int32, 4 * trainers).astype(np.int64).reshape(4, -1)
        reader.done()
        return cls(stage, server, counts[0], counts[1], counts[3], bool(read_only), counts[2], checkpoint)


def server_plans(stage: int, placement: Placement, writeback_keys: list[np.ndarray], fetch_keys: list[np.ndarray],
                 grad_keys: list[np.ndarray] | None = None, flush_keys: list[np.ndarray] | None = None) -> list[ServerPlan]:
    """Each server's message counts at `stage`, from every trainer's key lists."""
    S, T = placement.servers, len(fetch_keys)

    def per_server(lists: list[np.ndarray] | None) -> np.ndarray:
        out = np.zeros((S, T), dtype=np.int64)
        if lists is not None:
            for t in range(T):
                out[:, t] = placement.counts(lists[t])
        return out

    wb, fe, gr, fl = per_server(writeback_keys), per_server(fetch_keys), per_server(grad_keys), per_server(flush_keys)
    return [ServerPlan(stage, j, gr[j].copy(), wb[j].copy(), fe[j].copy(), flush_counts=fl[j].copy()) for j in range(S)]


@dataclass
class EvalPlan:
    """Server j's part of one evaluation: its read-only stages, one per eval batch, in
    one message, so an evaluation of any length is one message of the oracle's bounded
    plan stream (as many messages as eval batches could fill the stream while the
    trainers still wait for the plan held behind them)."""

    after_iteration: int
    server: int
    fetch_counts: np.ndarray  # int [batches, T]: rows each trainer fetches per eval batch

    def stages(self) -> list[ServerPlan]:
        zeros = np.zeros(self.fetch_counts.shape[1], dtype=np.int64)
        return [ServerPlan(eval_stage(self.after_iteration, b), self.server, zeros, zeros, counts.astype(np.int64),
                           read_only=True) for b, counts in enumerate(self.fetch_counts)]

    def encode(self) -> np.ndarray:
        batches, trainers = self.fetch_counts.shape
        header = np.array([_EVAL_MAGIC, self.after_iteration, self.server, batches, trainers], dtype=np.int64)
        return np.concatenate([header.view(np.uint8), self.fetch_counts.astype(np.int64).ravel().view(np.uint8)])

    @classmethod
    def decode(cls, buf: np.ndarray) -> "EvalPlan":
        reader = _Reader(buf, "evaluation plan")
        reader.expect_magic(_EVAL_MAGIC)
        after, server, batches, trainers = (int(x) for x in reader.take(np.int64, 4))
        counts = reader.take(np.int64, batches * trainers).reshape(batches, trainers).copy()
        reader.done()
        return cls(after, server, counts)


def eval_plans(after_iteration: int, placement: Placement, trainers: int, reads_per_batch) -> list[EvalPlan]:
    """Every server's `EvalPlan` from each eval batch's per-trainer read keys (an
    iterable, consumed batch by batch: only the counts are kept)."""
    S = placement.servers
    counts = []
    for reads in reads_per_batch:
        c = np.zeros((S, trainers), dtype=np.int64)
        for t, keys in enumerate(reads):
            c[:, t] = placement.counts(keys)
        counts.append(c)
    table = np.stack(counts, axis=1) if counts else np.zeros((S, 0, trainers), dtype=np.int64)
    return [EvalPlan(after_iteration, j, table[j]) for j in range(S)]


def decode_server_message(buf: np.ndarray) -> ServerPlan | EvalPlan:
    """A server's plan-stream message: one training stage (or stop), or an evaluation."""
    buf = np.asarray(buf, dtype=np.uint8)
    if buf.size >= 8 and int(buf[:8].view(np.int64)[0]) == _EVAL_MAGIC:
        return EvalPlan.decode(buf)
    return ServerPlan.decode(buf)


@dataclass
class PlanStats:
    """What a stage's plan does, for metrics and `bagpipe simulate` (all counts are rows)."""

    stage: int
    reads: int = 0  # sum over trainers of |reads[k]| (what `none` fetches)
    unique_rows: int = 0  # |U_i|: distinct rows the global batch reads
    fetched: int = 0
    fetched_per_trainer: list[int] = field(default_factory=list)
    written_back: int = 0
    written_back_per_trainer: list[int] = field(default_factory=list)
    writeback_reuse: int = 0  # write-backs by the lookahead rule (the rest are capacity evictions)
    capacity_evictions: int = 0
    postponed: int = 0  # fetches that did not fit at their stage
    fetched_one_ahead: int = 0  # fetches landing only one iteration before their use
    flushed: int = 0  # rows flushed to the servers for a checkpoint (they stay cached)
    fetched_for_use: int = 0  # rows of this iteration that had to be fetched for it
    gradients: int = 0  # gradient rows sent to servers (`none`)
    exchange_rows: int = 0  # values sent owner -> reader (= contributions back)
    exchange_sent_per_trainer: list[int] = field(default_factory=list)
    occupancy: list[int] = field(default_factory=list)  # owned rows per trainer at this stage
    resident_after: int = 0
    pending: int = 0
    wait_through: list[int] = field(default_factory=list)


@dataclass
class IterationPlan:
    iteration: int
    trainers: list[TrainerPlan]
    servers: list[ServerPlan]  # for stage == iteration
    stats: PlanStats

    def shift(self, offset: int) -> None:
        """Renumber iterations and stages by `offset` (a resumed run plans from 0 internally)."""
        if not offset:
            return
        self.iteration += offset
        for tp in self.trainers:
            tp.iteration += offset
            tp.wait_through_stage += offset
        for sp in self.servers:
            sp.stage += offset
        self.stats.stage += offset


@dataclass
class PlanMessage:
    """What trainer k receives for iteration i (see the module docstring)."""

    iteration: int
    trainer: int
    wait_through_stage: int
    reads_count: int
    reads_checksum: int
    owned_count: int
    recv_owner: np.ndarray  # owner of each read served by another trainer, ascending position; empty if T <= 2
    send_slots: list[np.ndarray]  # T x int32
    writeback_slots: np.ndarray  # int32 [w]
    fetch_keys: np.ndarray  # key dtype [f], ascending
    fetch_slots: np.ndarray  # int32 [f]
    flush_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32: checkpoint flush

    @classmethod
    def from_plan(cls, plan: TrainerPlan, trainers: int, total_rows: int) -> "PlanMessage":
        recv_owner = np.zeros(0, dtype=_owner_dtype(trainers))
        if trainers > 2:
            owner = np.full(len(plan.reads), -1, dtype=np.int64)
            for o, pos in enumerate(plan.recv_pos):
                owner[pos] = o
            recv_owner = owner[owner >= 0].astype(_owner_dtype(trainers))
        return cls(
            iteration=plan.iteration, trainer=plan.trainer, wait_through_stage=plan.wait_through_stage,
            reads_count=len(plan.reads), reads_checksum=reads_checksum(plan.reads), owned_count=len(plan.owned_pos),
            recv_owner=recv_owner,
            send_slots=[np.asarray(s, dtype=np.int32) for s in (plan.send_slots or [EMPTY_I64] * trainers)],
            writeback_slots=np.asarray(plan.writeback_slots, dtype=np.int32),
            fetch_keys=np.asarray(plan.fetch_keys).astype(key_dtype(total_rows)),
            fetch_slots=np.asarray(plan.fetch_slots, dtype=np.int32),
            flush_slots=np.asarray(plan.flush_slots, dtype=np.int32),
        )

    def check_reads(self, reads: np.ndarray, who: str) -> None:
        """The trainer's own reads (sorted unique keys of its slice) must be the planned ones."""
        if len(reads) != self.reads_count or reads_checksum(reads) != self.reads_checksum:
            raise PeerError(f"{who}: iteration {self.iteration}: the oracle planned different rows than this "
                            f"trainer's slice reads ({self.reads_count} vs {len(reads)} rows): data out of step")

    def encode(self) -> np.ndarray:
        """One uint8 array: an int64 header, then the arrays in falling alignment (every
        view the receiver takes is aligned)."""
        T = len(self.send_slots)
        kd = self.fetch_keys.dtype.itemsize
        header = np.array([_PLAN_MAGIC, self.iteration, self.trainer, self.wait_through_stage, self.reads_count,
                           _as_i64(self.reads_checksum), self.owned_count, T, kd, len(self.recv_owner),
                           len(self.writeback_slots), len(self.fetch_keys), len(self.flush_slots)], dtype=np.int64)
        lengths = np.array([len(s) for s in self.send_slots], dtype=np.int32)
        parts = [header, self.fetch_keys, lengths, *self.send_slots, self.writeback_slots.astype(np.int32),
                 self.fetch_slots.astype(np.int32), self.flush_slots.astype(np.int32),
                 self.recv_owner.astype(_owner_dtype(T))]
        return np.concatenate([np.ascontiguousarray(p).view(np.uint8).ravel() for p in parts])

    @classmethod
    def decode(cls, buf: np.ndarray) -> "PlanMessage":
        reader = _Reader(buf, "trainer plan")
        reader.expect_magic(_PLAN_MAGIC)
        (iteration, trainer, wait_through, reads_count, checksum, owned, T, kd, n_owner, n_wb, n_fetch,
         n_flush) = (int(x) for x in reader.take(np.int64, 12))
        if kd not in (4, 8) or T < 1:
            raise PlanFormatError(f"trainer plan: corrupt header (key width {kd}, trainers {T})")
        fetch_keys = reader.take(np.int32 if kd == 4 else np.int64, n_fetch)
        lengths = reader.take(np.int32, T)
        send_slots = [reader.take(np.int32, int(n)) for n in lengths]
        writeback_slots = reader.take(np.int32, n_wb)
        fetch_slots = reader.take(np.int32, n_fetch)
        flush_slots = reader.take(np.int32, n_flush)
        recv_owner = reader.take(_owner_dtype(T), n_owner)
        reader.done()
        return cls(iteration, trainer, wait_through, reads_count, checksum % (1 << 64), owned, recv_owner,
                   send_slots, writeback_slots, fetch_keys, fetch_slots, flush_slots)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlanMessage):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, list):
                if len(a) != len(b) or not all(np.array_equal(x, y) for x, y in zip(a, b)):
                    return False
            elif isinstance(a, np.ndarray):
                if not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


def _owner_dtype(trainers: int) -> np.dtype:
    return np.dtype(np.uint8) if trainers <= 256 else np.dtype(np.int16)


def _as_i64(value: int) -> int:
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


class _Reader:
    """Sequential typed views into a received byte buffer, with exact-size checks."""

    def __init__(self, buf: np.ndarray, what: str):
        self.buf, self.pos, self.what = np.asarray(buf, dtype=np.uint8), 0, what

    def take(self, dtype, n: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        end = self.pos + dtype.itemsize * int(n)
        if n < 0 or end > self.buf.size:
            raise PlanFormatError(f"{self.what}: truncated ({self.buf.size} bytes, needs at least {end})")
        out = self.buf[self.pos:end].view(dtype)
        self.pos = end
        return out

    def expect_magic(self, magic: int) -> None:
        if self.buf.size < 8 or int(self.take(np.int64, 1)[0]) != magic:
            raise PlanFormatError(f"{self.what}: bad magic (not a {self.what})")

    def done(self) -> None:
        if self.pos != self.buf.size:
            raise PlanFormatError(f"{self.what}: {self.buf.size - self.pos} trailing bytes")
