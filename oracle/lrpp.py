"""LRPP planning: the oracle's prefetch / ownership / eviction decisions.

`plan_lrpp(cfg, batches)` turns the stream of global batches (each an int64
[B, tables] array of global row keys, bagpipe.rows.RowSpace) into one
`IterationPlan` per stage: first the bootstrap stage -1, then iterations
0 .. N-1. Each holds one `TrainerPlan` per trainer (what it reads, from whom, what
it updates, writes back and fetches; see bagpipe/plan.py) and
one `ServerPlan` per server for the stage of the same number.

Policy (DESIGN.md section 4)
----------------------------
- **Residency** of a row on its owner runs from the stage of its fetch through the
  stage of its write-back, inclusive; that is what `cache_rows` (R, per trainer)
  bounds at every stage.
- **Reuse (lookahead L)**: after a use at iteration j a row stays resident if its
  next use is <= j + L, otherwise it is written back at stage j.
- **Timing (prefetch distance D)**: a row that is not resident when it is needed at
  u is fetched at stage max(u - D, -1, w + 1), w its last write-back stage.
- **Ownership**: the trainer reading the row at u (several readers: picked among
  them by a hash of the key), or, if that trainer is full at the fetch stage, the
  least-loaded trainer with room (water-filling, ties to the lower rank).
- **Capacity**: an eviction at stage s only makes room from stage s + 1 (the row
  still counts at s, and its slot is reusable from s + 1). So a fetch that does
  not fit at its stage is postponed (never past u - 1), and stage s evicts for
  the rows wanted at stage s + 1 that will not fit there: resident rows that have
  been read since their fetch, with next use >= s + 3 (write-back at s and a
  re-fetch at s + 1 .. u - 1 still arrive in time; a victim needed at s + 2 would
  only take its own room back), farthest next use first, each paired with the
  most urgent row that does not fit and only while the victim's next use is later
  than that row's use (Belady; the "do no harm" rule of integrated prefetching and
  caching). `evict_ahead` (default 1) bounds the rows evictions are made for to
  uses <= s + 1 + evict_ahead: with 1, only rows that must be fetched at s + 1;
  others wait for room the reuse rule frees (fewest fetches; under pressure some
  fetches land one iteration ahead of use). Fetches are placed in order of use, so
  prefetches for far uses only take room nearer uses do not need.
- **Feasibility**: every stage i holds U_i and U_{i+1} at once (rows read at i
  until their write-back at >= i, rows read at i+1 from their fetch at <= i), so
  T * R >= max_i |U_i u U_{i+1}| is necessary; it is checked over the first
  window before anything is planned and then at every stage, with a `PlanError`
  naming the iterations and the minimum cache_rows. (Randomised tests plan at
  exactly that bound without failing; if mandatory rows ever cannot be placed,
  a `PlanError` says so too.)
- The L rule ensures an evicted row's next use u satisfies u - D >= w + 1;
  capacity victims have next use >= s + 3, so a re-fetch at s + 1 .. u - 1 exists.
- Slots: trainer t uses slots 0 .. R-1 (a growing range when R is None); a slot
  freed by a write-back at stage w is reused only by fetches at stages >= w + 1.
- The last iteration's stage writes back every resident row and fetches nothing.

Everything is vectorised numpy per stage over whole batches, with dense per-key
arrays (owner, slot, last write-back stage, next use); Python loops run over
trainers, servers and the few iterations a stage touches, never over keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from bagpipe.embedding import ExampleKeys
from bagpipe.placement import Placement
from bagpipe.plan import EMPTY_I64, IterationPlan, PlanStats, TrainerPlan, server_plans

from .window import NO_USE, LookaheadWindow, sorted_unique


ABSENT = -1  # owner[key] of a row neither resident nor queued for a fetch
PENDING = -2  # owner[key] of a row queued for a fetch (postponed or not yet due)


class PlanError(RuntimeError):
    """The plan cannot be made (capacity too small, bad configuration or input)."""


def default_prefetch_distance(lookahead: int) -> int:
    """min(2, L).

    D = 1 fetches a row at stage u-1, which a server can only answer after it
    applied stage u-1, i.e. after iteration u-1's update: the trainer then waits a
    full round trip plus the server update before iteration u. D = 2 gives the
    fetch a whole iteration (tens of ms against a few ms of transfer) to land while
    iteration u-1 computes, and costs only one extra iteration of new rows in
    occupancy. Larger D inflates occupancy (rows sit fetched but unused) for no
    gain unless the link is slower than an iteration per stage.
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    return min(2, lookahead)


@dataclass(frozen=True)
class PlannerConfig:
    trainers: int
    servers: int
    lookahead: int
    prefetch_distance: int | None  # None: default_prefetch_distance(lookahead)
    cache_rows: int | None  # owned rows per trainer; None: unlimited
    total_rows: int
    # Capacity evictions at stage s make room for rows used by iteration
    # s + 1 + evict_ahead at the latest. 1 (default): only for rows that must be
    # fetched at s + 1 (used at s + 2), the fewest server fetches; rows wanted
    # earlier wait for room the reuse rule frees, so under pressure some fetches
    # land one iteration ahead of use. 2: also evict to keep fetches two iterations
    # ahead (latency hidden) at the price of re-fetches. Zipf-1.05 Criteo-like
    # workload, T=2, D=2: at 10% capacity and L=64, 2.6% more rows fetched and no
    # late fetch (instead of 88% of fetches one iteration ahead); at 4% and L=8,
    # 22% more. Rows prefetched further ahead (D > 2) only ever use free room.
    evict_ahead: int = 1
    # checkpoints and evaluations: after every iteration i with (first_iteration + i + 1) a
    # multiple of checkpoint_every or eval_every, that stage flushes every row changed since
    # its fetch (or the last flush) to the servers, which then hold the whole model;
    # first_iteration is the absolute number of the planner's iteration 0 (a resumed run)
    checkpoint_every: int | None = None
    eval_every: int | None = None
    first_iteration: int = 0

    def __post_init__(self) -> None:
        if self.trainers < 1:
            raise PlanError(f"trainers must be >= 1, got {self.trainers}")
        if self.servers < 1:
            raise PlanError(f"servers must be >= 1, got {self.servers}")
        if self.lookahead < 1:
            raise PlanError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.prefetch_distance is None:
            object.__setattr__(self, "prefetch_distance", default_prefetch_distance(self.lookahead))
        if not 1 <= self.prefetch_distance <= self.lookahead:
            raise PlanError(
                f"prefetch distance must be in [1, lookahead={self.lookahead}], got {self.prefetch_distance}"
            )
        if self.cache_rows is not None and self.cache_rows < 1:
            raise PlanError(f"cache_rows must be >= 1 (or None for unlimited), got {self.cache_rows}")
        if self.total_rows < 1:
            raise PlanError(f"total_rows must be >= 1, got {self.total_rows}")
        if self.evict_ahead < 1:
            raise PlanError(f"evict_ahead must be >= 1, got {self.evict_ahead}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise PlanError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.eval_every is not None and self.eval_every < 1:
            raise PlanError(f"eval_every must be >= 1, got {self.eval_every}")

    def flushes_at(self, s: int) -> bool:
        """Stage s (relative) ends an iteration a checkpoint or an evaluation follows."""
        n = self.first_iteration + s + 1
        return s >= 0 and any(every is not None and n % every == 0
                              for every in (self.checkpoint_every, self.eval_every))

    @property
    def horizon(self) -> int:
        """How many iterations past the current stage the window must hold."""
        return max(self.lookahead, self.prefetch_distance + 1)


def _group(labels: np.ndarray, groups: int) -> list[np.ndarray]:
    """Indices of `labels` (ints in [0, groups)) per label, each ascending."""
    if groups == 1:
        return [np.arange(labels.size, dtype=np.int64)]
    if groups <= 8:
        return [np.flatnonzero(labels == g) for g in range(groups)]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=groups)
    return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])


def _waterfill(load: np.ndarray, room: np.ndarray, m: int) -> np.ndarray:
    """Quotas q (sum m, q <= room) as if each of m rows went, one by one, to the
    least-loaded trainer with room left (ties to the lower rank)."""
    load = load.astype(np.int64)
    room = room.astype(np.int64)
    if m <= 0:
        return np.zeros_like(load)
    if m > int(room.sum()):
        raise AssertionError("waterfill: not enough room")

    def filled(level: int) -> np.ndarray:
        return np.clip(level - load, 0, room)

    lo, hi = int(load.min()), int((load + room).max())
    while lo < hi:  # smallest level whose fill holds m rows
        mid = (lo + hi) // 2
        if int(filled(mid).sum()) >= m:
            hi = mid
        else:
            lo = mid + 1
    q = filled(lo - 1)
    rest = m - int(q.sum())
    can = np.flatnonzero((load + q == lo - 1) & (q < room))
    q[can[:rest]] += 1
    return q


class _LRPPPlanner:
    def __init__(self, cfg: PlannerConfig, batches: Iterable[np.ndarray]):
        self.cfg = cfg
        self.T = cfg.trainers
        self.S = cfg.servers
        self.placement = Placement(cfg.servers)
        self.L = cfg.lookahead
        self.D = cfg.prefetch_distance
        self.R = cfg.cache_rows
        self.H = cfg.horizon
        n = cfg.total_rows
        self.win = LookaheadWindow(iter(batches), self.T, n)
        self.owner = np.full(n, ABSENT, dtype=np.int16)  # trainer, ABSENT or PENDING
        self.slot = np.zeros(n, dtype=np.int32)
        self.wb_stage = np.full(n, -2, dtype=np.int32)
        self.nu = np.full(n, NO_USE, dtype=np.int32)  # next use of resident rows
        self.unused = np.zeros(n, dtype=bool)  # resident, fetched, not read yet
        self.dirty = np.zeros(n, dtype=bool)  # resident, read (so updated) since its fetch or the last flush
        self.p_keys = EMPTY_I64
        self.p_u = np.zeros(0, dtype=np.int64)
        self.p_early = np.zeros(0, dtype=np.int64)
        self.p_pref = np.zeros(0, dtype=np.int64)
        T = self.T
        cap = self.R if self.R is not None else 1024
        self.slot_key = [np.full(cap, -1, dtype=np.int64) for _ in range(T)]
        self.free = [np.arange(self.R, dtype=np.int64) if self.R is not None else EMPTY_I64 for _ in range(T)]
        self.next_new = [0] * T  # unlimited capacity: next never-used slot
        self.occ = np.zeros(T, dtype=np.int64)  # resident rows entering the current stage
        self.wait: dict[int, np.ndarray] = {}
        self.fetched_for: dict[int, int] = {}

    # -- helpers -----------------------------------------------------------------
    def _capacity_error(self, what: str) -> PlanError:
        T, R = self.T, self.R
        return PlanError(
            f"cache capacity too small: {what}. Capacity is cache_rows={R} per trainer x {T} trainer(s) = "
            f"{T * R} owned rows (lookahead {self.L}, prefetch distance {self.D}); raise --cache-rows "
            f"(or lower --prefetch-distance)"
        )

    def _check_pair(self, i: int, need: int) -> None:
        if self.R is not None and need > self.T * self.R:
            raise self._capacity_error(
                f"iterations {i} and {i + 1} read {need} distinct rows, all of which must be resident at stage {i} "
                f"(rows read at {i} until their write-back at stage >= {i}, rows read at {i + 1} from their fetch "
                f"at stage <= {i}), so cache_rows must be at least {math.ceil(need / self.T)}"
            )

    def _startup_check(self) -> None:
        """Reject a capacity obviously too small before planning anything: every
        stage i holds U_i and U_{i+1} at once (see _check_pair); checked here over
        the first window of iterations and then at every stage as planning goes."""
        win = self.win
        win.ensure(self.H)
        last = win.loaded_through
        if last >= 0 and self.R is not None and win.entry(0).keys.size > self.T * self.R:
            raise self._capacity_error(
                f"iteration 0 alone reads {win.entry(0).keys.size} distinct rows, all fetched at the bootstrap stage"
            )
        for i in range(0, last):
            e, f = win.entry(i), win.entry(i + 1)
            both = int(np.count_nonzero(win.next_use(i) == i + 1))
            self._check_pair(i, e.keys.size + f.keys.size - both)

    def _alloc_slots(self, t: int, n: int) -> np.ndarray:
        free = self.free[t]
        if n <= free.size:
            out, self.free[t] = free[:n], free[n:]
            return out
        if self.R is not None:
            raise AssertionError(f"trainer {t}: {n} slots wanted, {free.size} free")
        extra = n - free.size
        new = np.arange(self.next_new[t], self.next_new[t] + extra, dtype=np.int64)
        self.next_new[t] += extra
        need = self.next_new[t]
        if need > self.slot_key[t].size:
            grown = np.full(max(need, 2 * self.slot_key[t].size), -1, dtype=np.int64)
            grown[: self.slot_key[t].size] = self.slot_key[t]
            self.slot_key[t] = grown
        self.free[t] = EMPTY_I64
        return np.concatenate([free, new])

    def _resident_keys(self, t: int) -> np.ndarray:
        sk = self.slot_key[t]
        return sk[sk >= 0]

    def _writeback(self, s: int, keys: np.ndarray, wb_keys: list[list[np.ndarray]], wb_slots: list[list[np.ndarray]]) -> None:
        if keys.size == 0:
            return
        own = self.owner[keys].astype(np.int64)
        for t, idx in enumerate(_group(own, self.T)):
            if idx.size == 0:
                continue
            k = keys[idx]
            sl = self.slot[k].astype(np.int64)
            self.slot_key[t][sl] = -1
            wb_keys[t].append(k)
            wb_slots[t].append(sl)
        self.owner[keys] = ABSENT
        self.wb_stage[keys] = s
        self.unused[keys] = False
        self.dirty[keys] = False

    def _add_pending(self, keys: np.ndarray, u: np.ndarray, early: np.ndarray, pref: np.ndarray) -> None:
        if keys.size == 0:
            return
        self.owner[keys] = PENDING
        self.p_keys = np.concatenate([self.p_keys, keys.astype(np.int64)])
        self.p_u = np.concatenate([self.p_u, u.astype(np.int64)])
        self.p_early = np.concatenate([self.p_early, early.astype(np.int64)])
        self.p_pref = np.concatenate([self.p_pref, pref.astype(np.int64)])

    def _demand_of(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys of U_u neither resident nor pending, and their preferred owners."""
        e = self.win.entry(u)
        m = self.owner[e.keys] == ABSENT
        return e.keys[m], e.first_reader[m].astype(np.int64)

    # -- the stages --------------------------------------------------------------
    def run(self) -> Iterator[IterationPlan]:
        s = -1
        while True:
            plan, last = self._stage(s)
            yield plan
            if last:
                return
            s += 1

    def _stage(self, s: int) -> tuple[IterationPlan, bool]:
        win, T, L, D, R = self.win, self.T, self.L, self.D, self.R
        win.ensure(s + self.H)
        last = (not win.ensure(0)) if s < 0 else win.is_last(s)
        stats = PlanStats(stage=s)
        wb_keys: list[list[np.ndarray]] = [[] for _ in range(T)]
        wb_slots: list[list[np.ndarray]] = [[] for _ in range(T)]

        # --- iteration s: reads, exchanges, updates -------------------------------
        tplans = self._iteration_parts(s, stats)

        # --- stage s write-backs by the reuse rule (or the final flush) ----------
        if last:
            for t in range(T):
                self._writeback(s, self._resident_keys(t), wb_keys, wb_slots)
            stats.writeback_reuse = int(sum(sum(a.size for a in w) for w in wb_keys))
        elif s >= 0:
            e = win.entry(s)
            nxt = win.next_use(s)
            self._check_pair(s, e.keys.size + win.entry(s + 1).keys.size - int(np.count_nonzero(nxt == s + 1)))
            go = nxt > s + L
            stay = ~go
            self.nu[e.keys[stay]] = nxt[stay]
            self._writeback(s, e.keys[go], wb_keys, wb_slots)
            stats.writeback_reuse = int(np.count_nonzero(go))
        else:
            stats.writeback_reuse = 0

        # --- stage s fetches --------------------------------------------------------
        fetch_keys: list[np.ndarray] = [EMPTY_I64] * T
        fetch_slots: list[np.ndarray] = [EMPTY_I64] * T
        stats.postponed = 0
        stats.capacity_evictions = 0
        stats.fetched_one_ahead = 0
        if not last:
            for u in (range(0, D) if s < 0 else (s + D,)):
                if win.ensure(u):
                    keys, pref = self._demand_of(u)
                    early = np.maximum(np.maximum(u - D, -1), self.wb_stage[keys].astype(np.int64) + 1)
                    self._add_pending(keys, np.full(keys.size, u), early, pref)
            fetch_keys, fetch_slots = self._place(s, stats)
            if R is not None and not win.is_last(s + 1):
                self._make_room(s, wb_keys, wb_slots, fetch_keys, stats)

        # --- a checkpoint or evaluation flushes what changed (rows stay resident) ---------------------
        flush_keys: list[np.ndarray] = [EMPTY_I64] * T
        flush_slots: list[np.ndarray] = [EMPTY_I64] * T
        if not last and self.cfg.flushes_at(s):  # (the last stage writes everything back anyway)
            for t in range(T):
                resident = np.sort(self._resident_keys(t))
                keys = resident[self.dirty[resident]]
                flush_keys[t], flush_slots[t] = keys, self.slot[keys].astype(np.int64)
                self.dirty[keys] = False
            stats.flushed = int(sum(k.size for k in flush_keys))

        # --- finalize the stage -----------------------------------------------------
        wbk = [np.concatenate(w) if w else EMPTY_I64 for w in wb_keys]
        wbs = [np.concatenate(w) if w else EMPTY_I64 for w in wb_slots]
        for t in range(T):
            o = np.argsort(wbk[t], kind="stable")
            wbk[t], wbs[t] = wbk[t][o], wbs[t][o]
            o = np.argsort(fetch_keys[t], kind="stable")
            fetch_keys[t], fetch_slots[t] = fetch_keys[t][o], fetch_slots[t][o]
        nf = np.array([f.size for f in fetch_keys], dtype=np.int64)
        nw = np.array([w.size for w in wbk], dtype=np.int64)
        occupancy = self.occ + nf
        if R is not None and (occupancy > R).any():
            raise AssertionError(f"stage {s}: occupancy {occupancy.tolist()} exceeds {R}")
        self.occ = occupancy - nw
        for t in range(T):
            if wbs[t].size:
                self.free[t] = np.concatenate([self.free[t], wbs[t]])
        stats.fetched = int(nf.sum())
        stats.fetched_per_trainer = nf.tolist()
        stats.written_back = int(nw.sum())
        stats.written_back_per_trainer = nw.tolist()
        stats.occupancy = occupancy.tolist()  # owned rows per trainer at stage s
        stats.resident_after = int(self.occ.sum())
        stats.pending = int(self.p_keys.size)

        for t in range(T):
            tp = tplans[t]
            tp.writeback_keys, tp.writeback_slots = wbk[t], wbs[t]
            tp.fetch_keys, tp.fetch_slots = fetch_keys[t], fetch_slots[t]
            tp.flush_keys, tp.flush_slots = flush_keys[t], flush_slots[t]
        splans = server_plans(s, self.placement, wbk, fetch_keys, flush_keys=flush_keys)
        win.release(s + 1)
        return IterationPlan(s, tplans, splans, stats), last

    def _iteration_parts(self, s: int, stats: PlanStats) -> list[TrainerPlan]:
        T = self.T
        empties = [EMPTY_I64] * T
        if s < 0:
            stats.exchange_sent_per_trainer, stats.wait_through = [0] * T, [-2] * T
            return [
                TrainerPlan(s, k, EMPTY_I64, EMPTY_I64, EMPTY_I64, list(empties), list(empties),
                            EMPTY_I64, EMPTY_I64, EMPTY_I64, EMPTY_I64, EMPTY_I64, EMPTY_I64, -2)
                for k in range(T)
            ]
        e = self.win.entry(s)
        U = e.keys
        own = self.owner[U].astype(np.int64)
        if U.size and own.min() < 0:
            bad = U[own < 0][:5]
            raise AssertionError(f"planner bug: iteration {s} reads non-resident rows {bad.tolist()}")
        self.unused[U] = False
        self.dirty[U] = True
        sl = self.slot[U].astype(np.int64)
        wait = self.wait.pop(s, None)
        if wait is None:
            wait = np.full(T, -2, dtype=np.int64)
        send = [[EMPTY_I64] * T for _ in range(T)]  # send[o][j]
        plans = []
        sent = np.zeros(T, dtype=np.int64)
        for k in range(T):
            rp = e.read_pos[k]
            by_owner = _group(own[rp], T)
            recv = [EMPTY_I64] * T
            for o in range(T):
                if o != k and by_owner[o].size:
                    recv[o] = by_owner[o]
                    send[o][k] = sl[rp[by_owner[o]]]
                    sent[o] += by_owner[o].size
            mine = by_owner[k]
            plans.append(TrainerPlan(
                iteration=s, trainer=k, reads=U[rp], owned_pos=mine, owned_slots=sl[rp[mine]],
                recv_pos=recv, send_slots=[], update_slots=EMPTY_I64, update_keys=EMPTY_I64,
                writeback_slots=EMPTY_I64, writeback_keys=EMPTY_I64, fetch_keys=EMPTY_I64,
                fetch_slots=EMPTY_I64, wait_through_stage=int(wait[k]),
            ))
        for o, idx in enumerate(_group(own, T)):
            plans[o].send_slots = send[o]
            plans[o].update_keys = U[idx]
            plans[o].update_slots = sl[idx]
        stats.reads, stats.unique_rows = e.total_reads, int(U.size)
        stats.exchange_rows, stats.exchange_sent_per_trainer = int(sent.sum()), sent.tolist()
        stats.fetched_for_use, stats.wait_through = self.fetched_for.pop(s, 0), wait.tolist()
        return plans

    def _place(self, s: int, stats: PlanStats) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Fetch pending rows at stage s, most urgent first, as far as room allows."""
        T, R = self.T, self.R
        out_k = [EMPTY_I64] * T
        out_s = [EMPTY_I64] * T
        ready = self.p_early <= s
        if not ready.any():
            return out_k, out_s
        idx = np.flatnonzero(ready)
        idx = idx[np.lexsort((self.p_keys[idx], self.p_u[idx]))]
        keys, u, pref = self.p_keys[idx], self.p_u[idx], self.p_pref[idx]
        if R is None:
            n = idx.size
            owners = pref
        else:
            room = R - self.occ
            n = int(min(idx.size, room.sum()))
            p = pref[:n]
            order = np.argsort(p, kind="stable")
            counts = np.bincount(p, minlength=T)
            starts = np.cumsum(counts) - counts
            rank = np.empty(n, dtype=np.int64)
            rank[order] = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)
            keep = rank < room[p]
            owners = np.where(keep, p, -1)
            kept = np.bincount(p[keep], minlength=T)
            over = np.flatnonzero(~keep)
            if over.size:
                q = _waterfill(self.occ + kept, room - kept, over.size)
                owners[over] = np.repeat(np.arange(T, dtype=np.int64), q)
        placed_keys, placed_u = keys[:n], u[:n]
        for t, g in enumerate(_group(owners, T)):
            if g.size == 0:
                continue
            k = placed_keys[g]
            sl = self._alloc_slots(t, g.size)
            self.slot_key[t][sl] = k
            self.slot[k] = sl
            self.owner[k] = t
            out_k[t], out_s[t] = k, sl
            for d in np.flatnonzero(np.bincount(placed_u[g] - s)).tolist():
                w = self.wait.setdefault(s + d, np.full(T, -2, dtype=np.int64))
                w[t] = s
        self.unused[placed_keys] = True
        self.dirty[placed_keys] = False
        self.nu[placed_keys] = placed_u
        if placed_u.size:
            counts = np.bincount(placed_u - s)
            for d in np.flatnonzero(counts).tolist():
                self.fetched_for[s + d] = self.fetched_for.get(s + d, 0) + int(counts[d])
        if s >= 0:  # (the bootstrap necessarily fetches iteration 0's rows one stage ahead)
            stats.fetched_one_ahead = int(np.count_nonzero(placed_u == s + 1))
        rest = np.ones(self.p_keys.size, dtype=bool)
        rest[idx[:n]] = False
        self.p_keys, self.p_u = self.p_keys[rest], self.p_u[rest]
        self.p_early, self.p_pref = self.p_early[rest], self.p_pref[rest]
        left = idx.size - n
        stats.postponed = int(left)
        if left and int(u[n:].min()) <= s + 1:
            late = int(np.count_nonzero(u[n:] <= s + 1))
            raise self._capacity_error(
                f"at stage {s}, {late} row(s) needed by iteration {s + 1} cannot be fetched: every trainer's "
                f"cache is full of rows needed sooner or not yet evictable (occupancy {self.occ.tolist()})"
            )
        return out_k, out_s

    def _make_room(self, s: int, wb_keys, wb_slots, fetch_keys, stats: PlanStats) -> None:
        """Evict at stage s so the rows wanted at stage s+1 fit (see module docstring)."""
        T, R, D = self.T, self.R, self.D
        nf = np.array([f.size for f in fetch_keys], dtype=np.int64)
        nw = np.array([sum(a.size for a in w) for w in wb_keys], dtype=np.int64)
        room_next = int((R - (self.occ + nf) + nw).sum())
        want = [self.p_u]
        if self.win.ensure(s + 1 + D):
            keys, _ = self._demand_of(s + 1 + D)
            want.append(np.full(keys.size, s + 1 + D, dtype=np.int64))
        u_want = np.sort(np.concatenate(want))
        over = u_want[room_next:]
        over = over[over <= s + 1 + self.cfg.evict_ahead]
        if over.size == 0:
            return
        cand = np.concatenate([self._resident_keys(t) for t in range(T)])
        nu = self.nu[cand].astype(np.int64)
        ok = ~self.unused[cand] & (nu >= s + 3)
        cand, nu = cand[ok], nu[ok]
        if cand.size == 0:
            return
        m = min(over.size, cand.size)
        score = nu * np.int64(self.cfg.total_rows) + cand  # unique: deterministic order
        if m < cand.size:
            top = np.argpartition(-score, m - 1)[:m]
        else:
            top = np.arange(cand.size)
        top = top[np.argsort(-score[top])]
        vk, vnu = cand[top], nu[top]
        n_ev = int(np.count_nonzero(vnu > over[:m]))  # a prefix: vnu falls, over rises
        if n_ev == 0:
            return
        vk, vnu = vk[:n_ev], vnu[:n_ev]
        self._writeback(s, vk, wb_keys, wb_slots)
        stats.capacity_evictions = n_ev
        # victims whose next use has already entered the demand window are re-queued
        again = vnu - D <= s
        if again.any():
            rk, ru = vk[again], vnu[again]
            pref = np.empty(rk.size, dtype=np.int64)
            for uu in sorted_unique(ru).tolist():
                g = ru == uu
                e = self.win.entry(uu)
                pref[g] = e.first_reader[np.searchsorted(e.keys, rk[g])]
            self._add_pending(rk, ru, np.full(rk.size, s + 1), pref)


def plan_lrpp(cfg: PlannerConfig, batches: Iterable[np.ndarray]) -> Iterator[IterationPlan]:
    """Plans for the bootstrap stage -1 and every iteration of `batches` (lazily:
    the input is consumed at most `cfg.horizon` + 1 iterations ahead of the output).

    The first window of batches is read and checked right away, so a capacity
    obviously too small raises `PlanError` here, before any plan is made."""
    planner = _LRPPPlanner(cfg, batches)
    planner._startup_check()
    return planner.run()


@dataclass
class CapacityScan:
    checked: int  # iterations whose pair with the next one was checked
    cut_short: bool  # the time budget ran out before the end of the data


def check_capacity(batches: Iterable[np.ndarray], trainers: int, cache_rows: int, budget_s: float) -> CapacityScan:
    """Before training: every stage i holds U_i and U_{i+1} at once, so T x R must cover
    |U_i u U_{i+1}| for every i (a necessary condition, the one the planner would hit
    mid-run). Scans the run's read sets until `budget_s` runs out; raises PlanError
    naming the first pair that does not fit and the capacity it needs."""
    import time

    deadline = time.monotonic() + budget_s
    previous, checked = None, 0
    for i, batch in enumerate(batches):
        keys = sorted_unique(batch.keys if isinstance(batch, ExampleKeys) else np.asarray(batch))
        if previous is not None:
            need = previous.size + keys.size - np.intersect1d(previous, keys, assume_unique=True).size
            if need > trainers * cache_rows:
                raise PlanError(
                    f"cache capacity too small: iterations {i - 1} and {i} read {need} distinct rows, all of which "
                    f"must be resident at stage {i - 1}, so --cache-rows must be at least {math.ceil(need / trainers)} "
                    f"per trainer (it is {cache_rows} x {trainers} trainer(s)); found before training")
            checked = i
        previous = keys
        if time.monotonic() > deadline:
            return CapacityScan(checked, True)
    return CapacityScan(checked, False)
