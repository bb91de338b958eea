"""Reference replay of plans: an independent check that a plan stream is safe.

`verify_plans(cfg, batches, plans)` simulates every trainer's cache (slot -> key
maps per trainer, owner / fetch stage / write-back stage per row) and the timing of
fetch answers (a trainer has the answers of stage f in its slots once it waited
through f, i.e. once a plan with ``wait_through_stage >= f`` was reached), following
the trainer loop (bagpipe/plan.py, trainers/cached.py) step by step, and raises AssertionError naming
the stage, trainer, key and rule on the first violation:

- reads / positions that disagree with the data (sorted unique keys of the slice);
- a read of a row that is not resident on its claimed owner in the claimed slot,
  or whose fetch answer the owner has not waited for;
- ownership: a row owned by two trainers, an owned/received partition of the reads
  that is not exact, receive lists not ascending;
- exchange lists inconsistent between sender and receiver (send_slots[j] on owner
  o must hold the keys at recv_pos[o] on j, in the same order);
- update_keys not the sorted set of owned rows read by anyone, update_slots wrong;
- write-back of a row not owned there, not in that slot, or not yet arrived;
- fetch of a resident row, a fetch at a stage <= the row's last write-back, into an
  occupied slot, into a slot freed at the same stage, or out of range;
- occupancy (fetch stage through write-back stage inclusive) above cache_rows;
- server message counts that disagree with the trainer lists;
- wait_through_stage >= the iteration, fetches at the last stage, a row still
  resident after the final flush, too few or too many plans.

With ``mode="none"`` it checks `plan_none` plans instead (fetches = next reads,
gradient counts, empty cache lists). Returns a report dict of totals.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from bagpipe.placement import Placement
from bagpipe.plan import IterationPlan

from .lrpp import PlannerConfig
from .window import trainer_keys


def _fail(where: str, msg: str) -> None:
    raise AssertionError(f"{where}: {msg}")


def _ints(where: str, name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        _fail(where, f"{name} must be a 1-d integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _expect_equal(where: str, what: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.array_equal(got, want):
        n = min(got.size, want.size)
        diff = np.flatnonzero(got[:n] != want[:n])
        at = int(diff[0]) if diff.size else n
        _fail(where, f"{what}: got {got.size} values, expected {want.size}; first difference at index {at} "
                     f"(got {got[at:at + 3].tolist()}, expected {want[at:at + 3].tolist()})")


class _Trainer:
    def __init__(self, cap: int | None):
        self.cap = cap
        size = cap if cap is not None else 64
        self.slot_key = np.full(size, -1, dtype=np.int64)
        self.free_from = np.full(size, -(10**9), dtype=np.int64)
        self.count = 0
        self.waited = -2

    def ensure(self, slots: np.ndarray) -> None:
        if slots.size == 0 or self.cap is not None:
            return
        need = int(slots.max()) + 1
        if need > self.slot_key.size:
            n = max(need, 2 * self.slot_key.size)
            sk = np.full(n, -1, dtype=np.int64)
            ff = np.full(n, -(10**9), dtype=np.int64)
            sk[: self.slot_key.size] = self.slot_key
            ff[: self.free_from.size] = self.free_from
            self.slot_key, self.free_from = sk, ff


def verify_plans(cfg: PlannerConfig, batches: Iterable[np.ndarray], plans: Iterable[IterationPlan],
                 mode: str = "lrpp") -> dict:
    if mode not in ("lrpp", "none"):
        raise ValueError(f"mode must be 'lrpp' or 'none', got {mode!r}")
    T, S, R = cfg.trainers, cfg.servers, cfg.cache_rows
    placement = Placement(S)
    if mode == "none":
        R = None
    n_rows = cfg.total_rows
    owner = np.full(n_rows, -1, dtype=np.int64)
    changed = np.zeros(n_rows, dtype=bool)  # read (so updated) since its fetch or the last flush
    fetch_stage = np.full(n_rows, -(10**9), dtype=np.int64)
    wb_stage = np.full(n_rows, -(10**9), dtype=np.int64)
    trainers = [_Trainer(R) for _ in range(T)]
    resident = 0

    batch_it = iter(batches)
    loaded: dict[int, list[np.ndarray]] = {}  # iteration -> reads of every trainer
    state = {"next": 0, "exhausted": False}

    def reads_of(i: int) -> list[np.ndarray] | None:
        while state["next"] <= i and not state["exhausted"]:
            try:
                b = next(batch_it)
            except StopIteration:
                state["exhausted"] = True
                break
            j = state["next"]
            try:
                loaded[j] = [np.unique(keys) for keys in trainer_keys(b, T)]
            except ValueError as err:
                _fail(f"batch {j}", str(err))
            state["next"] = j + 1
        return loaded.get(i)

    report = {
        "iterations": 0, "reads": 0, "fetched": 0, "written_back": 0, "exchange_rows": 0,
        "peak_occupancy": [0] * T, "occupancy_sum": [0] * T, "occupancy": [], "distinct_resident": [],
    }
    expected = -1
    last_done = False
    for plan in plans:
        s = expected
        where = f"stage/iteration {s}"
        if last_done:
            _fail(where, "plan after the last iteration's stage")
        if plan.iteration != s:
            _fail(where, f"plan for iteration {plan.iteration}, expected {s}")
        if len(plan.trainers) != T or len(plan.servers) != S:
            _fail(where, f"{len(plan.trainers)} trainer plans and {len(plan.servers)} server plans, expected {T}, {S}")
        cur = reads_of(s) if s >= 0 else None
        if s >= 0 and cur is None:
            _fail(where, "plan for an iteration beyond the data")
        nxt = reads_of(s + 1)
        is_last = nxt is None
        tps = plan.trainers
        for k, tp in enumerate(tps):
            w = f"{where}, trainer {k}"
            if tp.trainer != k or tp.iteration != s:
                _fail(w, f"plan labelled trainer {tp.trainer}, iteration {tp.iteration}")
            if len(tp.recv_pos) != T or len(tp.send_slots) != T:
                _fail(w, f"recv_pos/send_slots must have {T} lists, got {len(tp.recv_pos)}/{len(tp.send_slots)}")
            wt = int(tp.wait_through_stage)
            if s < 0 and wt != -2:
                _fail(w, f"bootstrap plan waits through stage {wt}, expected -2")
            if wt > s - 1 and s >= 0:
                _fail(w, f"wait_through_stage {wt} must be <= {s - 1} (fetches for iteration {s} happen at stages < {s})")
            # step 5 of iteration s-1: wait for the fetch answers of stages <= wt
            trainers[k].waited = max(trainers[k].waited, wt)
            reads = _ints(w, "reads", tp.reads)
            if s < 0:
                if reads.size:
                    _fail(w, "bootstrap plan must not read")
            else:
                _expect_equal(w, "reads (sorted unique keys of the slice)", reads, cur[k])
        if mode == "none":
            _check_none(where, s, tps, plan, cur, nxt, placement, T)
            report["fetched"] += int(sum(np.asarray(tp.fetch_keys).size for tp in tps))
            if s >= 0:
                report["reads"] += int(sum(c.size for c in cur))
                report["iterations"] += 1
        else:
            if s < 0:
                for k, tp in enumerate(tps):
                    lists = [tp.owned_pos, tp.owned_slots, tp.update_keys, tp.update_slots, *tp.recv_pos, *tp.send_slots]
                    if any(np.asarray(a).size for a in lists):
                        _fail(f"{where}, trainer {k}", "the bootstrap plan must have empty read/exchange/update lists")
            if s >= 0:
                report["exchange_rows"] += _check_iteration(where, s, tps, cur, owner, fetch_stage, trainers, T)
                report["reads"] += int(sum(c.size for c in cur))
                report["iterations"] += 1
            # stage s: write-backs of every trainer, then fetches
            occ = np.array([tr.count for tr in trainers], dtype=np.int64)
            n_wb = 0
            wb_keys_all, fetch_keys_all = [], []
            for k, tp in enumerate(tps):
                w = f"{where}, trainer {k}, write-back"
                keys = _ints(w, "writeback_keys", tp.writeback_keys)
                slots = _ints(w, "writeback_slots", tp.writeback_slots)
                wb_keys_all.append(keys)
                if keys.size != slots.size:
                    _fail(w, f"{keys.size} keys but {slots.size} slots")
                if np.unique(keys).size != keys.size:
                    _fail(w, "a row written back twice")
                if keys.size == 0:
                    continue
                if keys.min() < 0 or keys.max() >= n_rows:
                    _fail(w, "key out of range")
                tr = trainers[k]
                bad = np.flatnonzero(owner[keys] != k)
                if bad.size:
                    key = int(keys[bad[0]])
                    _fail(w, f"row {key} is not owned by trainer {k} (owner {int(owner[key])})")
                tr.ensure(slots)
                if slots.min() < 0 or slots.max() >= tr.slot_key.size:
                    _fail(w, "slot out of range")
                bad = np.flatnonzero(tr.slot_key[slots] != keys)
                if bad.size:
                    _fail(w, f"row {int(keys[bad[0]])} is not in slot {int(slots[bad[0]])} "
                             f"(slot holds {int(tr.slot_key[slots[bad[0]]])})")
                bad = np.flatnonzero(fetch_stage[keys] > tr.waited)
                if bad.size:
                    key = int(keys[bad[0]])
                    _fail(w, f"row {key} written back before its fetch answer (stage {int(fetch_stage[key])}) "
                             f"was waited for (waited through {tr.waited})")
                tr.slot_key[slots] = -1
                tr.free_from[slots] = s + 1
                tr.count -= keys.size
                owner[keys] = -1
                wb_stage[keys] = s
                resident -= keys.size
                n_wb += keys.size
            # a checkpoint stage flushes every resident row changed since its fetch (or the
            # last flush), after the stage's write-backs: the servers then hold a consistent cut
            if s >= 0:
                changed[np.unique(np.concatenate(cur))] = True
            changed[np.concatenate(wb_keys_all)] = False
            checkpoint = cfg.flushes_at(s) and not is_last
            for k, tp in enumerate(tps):
                w = f"{where}, trainer {k}, checkpoint flush"
                keys = _ints(w, "flush_keys", tp.flush_keys)
                slots = _ints(w, "flush_slots", tp.flush_slots)
                if keys.size and not checkpoint:
                    _fail(w, f"{keys.size} rows flushed at a stage that is neither a checkpoint nor an evaluation")
                if keys.size != slots.size or np.unique(keys).size != keys.size:
                    _fail(w, "flush keys and slots differ in number, or a row is flushed twice")
                if keys.size == 0:
                    continue
                bad = np.flatnonzero(owner[keys] != k)
                if bad.size:
                    _fail(w, f"row {int(keys[bad[0]])} is not resident on trainer {k}")
                bad = np.flatnonzero(trainers[k].slot_key[slots] != keys)
                if bad.size:
                    _fail(w, f"row {int(keys[bad[0]])} is not in slot {int(slots[bad[0]])}")
                changed[keys] = False
            if checkpoint:
                missed = np.flatnonzero((owner >= 0) & changed)
                if missed.size:
                    _fail(where, f"checkpoint stage: row {int(missed[0])} changed since its fetch but is neither "
                                 f"written back nor flushed ({missed.size} rows)")
            n_f = 0
            for k, tp in enumerate(tps):
                w = f"{where}, trainer {k}, fetch"
                keys = _ints(w, "fetch_keys", tp.fetch_keys)
                slots = _ints(w, "fetch_slots", tp.fetch_slots)
                fetch_keys_all.append(keys)
                if keys.size != slots.size:
                    _fail(w, f"{keys.size} keys but {slots.size} slots")
                if keys.size == 0:
                    continue
                if is_last:
                    _fail(w, f"the last iteration's stage must not fetch ({keys.size} rows)")
                if np.unique(keys).size != keys.size:
                    _fail(w, "a row fetched twice")
                if np.unique(slots).size != slots.size:
                    _fail(w, "two rows fetched into one slot")
                if keys.min() < 0 or keys.max() >= n_rows:
                    _fail(w, "key out of range")
                tr = trainers[k]
                own = owner[keys]
                bad = np.flatnonzero(own >= 0)
                if bad.size:
                    key = int(keys[bad[0]])
                    other = int(own[bad[0]])
                    what = "already resident on it" if other == k else f"owned by trainer {other}: a row owned by two trainers"
                    _fail(w, f"fetch of row {key}, {what}")
                bad = np.flatnonzero(wb_stage[keys] >= s)
                if bad.size:
                    key = int(keys[bad[0]])
                    _fail(w, f"row {key} fetched at stage {s}, not after its write-back at stage {int(wb_stage[key])}")
                if slots.min() < 0 or (R is not None and slots.max() >= R):
                    _fail(w, f"slot out of range [0, {R})")
                tr.ensure(slots)
                bad = np.flatnonzero(tr.slot_key[slots] >= 0)
                if bad.size:
                    _fail(w, f"slot {int(slots[bad[0]])} still holds row {int(tr.slot_key[slots[bad[0]]])}")
                bad = np.flatnonzero(tr.free_from[slots] > s)
                if bad.size:
                    _fail(w, f"slot {int(slots[bad[0]])} reused at the stage of its write-back")
                tr.slot_key[slots] = keys
                owner[keys] = k
                fetch_stage[keys] = s
                tr.count += keys.size
                occ[k] += keys.size
                resident += keys.size
                n_f += keys.size
            if R is not None and (occ > R).any():
                k = int(np.argmax(occ))
                _fail(f"{where}, trainer {k}", f"occupancy {int(occ[k])} owned rows exceeds cache_rows={R}")
            for j, sp in enumerate(plan.servers):
                w = f"{where}, server {j}"
                if sp.stage != s or sp.server != j:
                    _fail(w, f"server plan labelled stage {sp.stage}, server {sp.server}")
                want_wb = np.array([placement.counts(k_)[j] for k_ in wb_keys_all])
                want_f = np.array([placement.counts(k_)[j] for k_ in fetch_keys_all])
                _expect_equal(w, "writeback_counts", _ints(w, "writeback_counts", sp.writeback_counts), want_wb)
                _expect_equal(w, "fetch_counts", _ints(w, "fetch_counts", sp.fetch_counts), want_f)
                _expect_equal(w, "grad_counts", _ints(w, "grad_counts", sp.grad_counts), np.zeros(T, np.int64))
            report["fetched"] += n_f
            report["written_back"] += n_wb
            report["occupancy"].append(occ.tolist())
            report["distinct_resident"].append(resident + n_wb)
            for k in range(T):
                report["peak_occupancy"][k] = max(report["peak_occupancy"][k], int(occ[k]))
                report["occupancy_sum"][k] += int(occ[k])
            if is_last and resident:
                key = int(np.flatnonzero(owner >= 0)[0])
                _fail(where, f"{resident} row(s) still resident after the final flush, e.g. row {key} "
                             f"on trainer {int(owner[key])}")
        if is_last:
            last_done = True
        expected += 1
        loaded.pop(s, None)
    if not last_done:
        _fail(f"stage/iteration {expected}", f"plans end before the data does (missing the plan for iteration {expected})")
    stages = max(1, len(report["occupancy"]))
    report["mean_occupancy"] = [v / stages for v in report["occupancy_sum"]]
    return report


def _check_iteration(where, s, tps, cur, owner, fetch_stage, trainers, T) -> int:
    """Steps 1-3 of iteration s: reads served from owned slots or received copies,
    the two exchanges, and the owners' update lists. Returns rows exchanged."""
    exchanged = 0
    recv_keys = [[None] * T for _ in range(T)]  # recv_keys[j][o]: keys j receives from o
    for k, tp in enumerate(tps):
        w = f"{where}, trainer {k}"
        reads = cur[k]
        n = reads.size
        seen = np.zeros(n, dtype=np.int64)
        pos = _ints(w, "owned_pos", tp.owned_pos)
        slots = _ints(w, "owned_slots", tp.owned_slots)
        if pos.size != slots.size:
            _fail(w, f"{pos.size} owned positions but {slots.size} slots")
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            _fail(w, "owned position out of range")
        seen[pos] += 1
        keys = reads[pos]
        tr = trainers[k]
        bad = np.flatnonzero(owner[keys] != k)
        if bad.size:
            key = int(keys[bad[0]])
            where_ = "is not resident" if owner[key] < 0 else f"is owned by trainer {int(owner[key])}"
            _fail(w, f"reads row {key} from its own cache, but the row {where_}")
        if slots.size and (slots.min() < 0 or slots.max() >= tr.slot_key.size):
            _fail(w, "owned slot out of range")
        bad = np.flatnonzero(tr.slot_key[slots] != keys)
        if bad.size:
            _fail(w, f"reads row {int(keys[bad[0]])} from slot {int(slots[bad[0]])}, which holds "
                     f"row {int(tr.slot_key[slots[bad[0]]])}")
        for o in range(T):
            rp = _ints(w, f"recv_pos[{o}]", tp.recv_pos[o])
            if o == k:
                if rp.size:
                    _fail(w, "recv_pos from itself must be empty")
                continue
            if rp.size and (rp.min() < 0 or rp.max() >= n):
                _fail(w, f"recv_pos[{o}] out of range")
            if rp.size > 1 and not (np.diff(rp) > 0).all():
                _fail(w, f"recv_pos[{o}] not strictly ascending")
            seen[rp] += 1
            rk = reads[rp]
            bad = np.flatnonzero(owner[rk] != o)
            if bad.size:
                key = int(rk[bad[0]])
                where_ = "the row is not resident" if owner[key] < 0 else f"its owner is {int(owner[key])}"
                _fail(w, f"receives row {key} from trainer {o}, but {where_}")
            recv_keys[k][o] = rk
            exchanged += rk.size
        if n and not (seen == 1).all():
            p = int(np.flatnonzero(seen != 1)[0])
            _fail(w, f"read position {p} (row {int(reads[p])}) is served {int(seen[p])} times "
                     f"(owned + received must partition the reads)")
    union = np.unique(np.concatenate(cur))
    for k, tp in enumerate(tps):  # owners
        w = f"{where}, owner {k}"
        tr = trainers[k]
        for j in range(T):
            ss = _ints(w, f"send_slots[{j}]", tp.send_slots[j])
            if j == k:
                if ss.size:
                    _fail(w, "send_slots to itself must be empty")
                continue
            want = recv_keys[j][k]
            if ss.size != want.size:
                _fail(w, f"sends {ss.size} rows to trainer {j}, which expects {want.size}")
            if ss.size and (ss.min() < 0 or ss.max() >= tr.slot_key.size):
                _fail(w, f"send_slots[{j}] out of range")
            got = tr.slot_key[ss]
            if not np.array_equal(got, want):
                i = int(np.flatnonzero(got != want)[0])
                _fail(w, f"send_slots[{j}][{i}] holds row {int(got[i])}, trainer {j} expects row {int(want[i])} "
                         f"(lists inconsistent between sender and receiver)")
        mine = union[owner[union] == k]
        uk = _ints(w, "update_keys", tp.update_keys)
        _expect_equal(w, "update_keys (owned rows read by anyone, ascending)", uk, mine)
        us = _ints(w, "update_slots", tp.update_slots)
        if us.size != uk.size or (us.size and (us.min() < 0 or us.max() >= tr.slot_key.size)):
            _fail(w, "update_slots wrong size or out of range")
        _expect_equal(w, "rows in update_slots", tr.slot_key[us], uk)
        # every row the owner serves at s (own reads or sends) must have arrived
        bad = np.flatnonzero(fetch_stage[mine] > tr.waited)
        if bad.size:
            key = int(mine[bad[0]])
            _fail(w, f"row {key} is used at iteration {s} but its fetch (stage {int(fetch_stage[key])}) is after "
                     f"the owner's wait_through_stage {tr.waited}: wait_through_stage too small")
    return exchanged


def _check_none(where, s, tps, plan, cur, nxt, placement: Placement, T) -> None:
    for k, tp in enumerate(tps):
        w = f"{where}, trainer {k} (none mode)"
        for name in ("owned_pos", "owned_slots", "update_slots", "update_keys", "writeback_slots", "writeback_keys"):
            if np.asarray(getattr(tp, name)).size:
                _fail(w, f"{name} must be empty")
        if any(np.asarray(a).size for a in tp.recv_pos) or any(np.asarray(a).size for a in tp.send_slots):
            _fail(w, "exchange lists must be empty")
        want = nxt[k] if nxt is not None else np.zeros(0, np.int64)
        _expect_equal(w, f"fetch_keys (reads of iteration {s + 1})", _ints(w, "fetch_keys", tp.fetch_keys), want)
        _expect_equal(w, "fetch_slots", _ints(w, "fetch_slots", tp.fetch_slots), np.arange(want.size))
        if s >= 0 and tp.wait_through_stage != s - 1:
            _fail(w, f"wait_through_stage {tp.wait_through_stage}, expected {s - 1}")
    for j, sp in enumerate(plan.servers):
        w = f"{where}, server {j} (none mode)"
        if sp.stage != s or sp.server != j:
            _fail(w, f"server plan labelled stage {sp.stage}, server {sp.server}")
        grads = [c for c in cur] if cur is not None else [np.zeros(0, np.int64)] * T
        fetch = [n_ for n_ in nxt] if nxt is not None else [np.zeros(0, np.int64)] * T
        _expect_equal(w, "grad_counts", np.asarray(sp.grad_counts, np.int64),
                      np.array([placement.counts(g)[j] for g in grads], np.int64))
        _expect_equal(w, "fetch_counts", np.asarray(sp.fetch_counts, np.int64),
                      np.array([placement.counts(f)[j] for f in fetch], np.int64))
        _expect_equal(w, "writeback_counts", np.asarray(sp.writeback_counts, np.int64), np.zeros(T, np.int64))
