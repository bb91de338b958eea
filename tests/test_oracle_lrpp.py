"""LRPP planner: safety (verified by the reference replay), policy, capacity, streaming."""

from __future__ import annotations

import itertools
import math
from dataclasses import fields

import numpy as np
import pytest

from bagpipe.oracle.lrpp import PlanError, PlannerConfig, default_prefetch_distance, plan_lrpp
from bagpipe.oracle.nocache import plan_none
from bagpipe.plan import IterationPlan, PlanMessage
from bagpipe.oracle.simulate import zipf_key_batches
from bagpipe.oracle.verify import verify_plans

CARDS = [50, 200, 1000, 20, 3000, 8]
TOTAL = sum(CARDS)
B = 48  # divisible by 1, 2, 3
N = 40


@pytest.fixture(scope="module")
def batches():
    return zipf_key_batches(CARDS, B, N, exponent=1.05, seed=3)


def pair_bound(batches) -> int:
    """max |U_i u U_{i+1}|: the rows every stage i must hold at once."""
    U = [np.unique(b) for b in batches]
    return max(np.union1d(U[i], U[i + 1]).size for i in range(len(U) - 1))


def matrix():
    for T in (1, 2, 3):
        for L in (1, 2, 7, 64):
            for D in (range(1, L + 1) if L <= 7 else (1, 2, 8, 33, 64)):
                yield T, L, D


@pytest.mark.parametrize("capacity", ["unlimited", "tight"])
@pytest.mark.parametrize("T,L,D", list(matrix()))
def test_plans_verify(batches, T, L, D, capacity):
    R = None if capacity == "unlimited" else math.ceil(pair_bound(batches) / T)
    cfg = PlannerConfig(T, 2, L, D, R, TOTAL)
    plans = list(plan_lrpp(cfg, batches))
    assert [p.iteration for p in plans] == list(range(-1, N))
    report = verify_plans(cfg, batches, plans)
    assert report["iterations"] == N
    # each resident row has one owner: owned rows summed over trainers == distinct resident rows
    for occ, distinct, plan in zip(report["occupancy"], report["distinct_resident"], plans):
        assert sum(occ) == distinct
        assert plan.stats.occupancy == occ
    if R is not None:
        assert max(report["peak_occupancy"]) <= R
        ev = [p.stats.capacity_evictions for p in plans]
        if L >= 7:  # tight: capacity pressure shows up in (almost) every iteration
            assert sum(e > 0 for e in ev) >= 0.75 * N
            assert max(report["peak_occupancy"]) == R
    # the plan stats agree with the replay
    assert sum(p.stats.fetched for p in plans) == report["fetched"]
    assert sum(p.stats.written_back for p in plans) == report["written_back"]
    assert report["fetched"] == report["written_back"]  # everything fetched is flushed at the end


@pytest.mark.parametrize("T", [1, 2, 3])
def test_none_plans_verify(batches, T):
    cfg = PlannerConfig(T, 3, 1, 1, None, TOTAL)
    plans = list(plan_none(T, 3, batches))
    assert [p.iteration for p in plans] == list(range(-1, N))
    report = verify_plans(cfg, batches, plans, mode="none")
    assert report["fetched"] == report["reads"]
    for p in plans:
        for tp in p.trainers:
            assert tp.wait_through_stage == (p.iteration - 1 if p.iteration >= 0 else -2)


def test_policy_unlimited(batches):
    """With unlimited capacity the plan follows the rules exactly: reuse within L,
    fetch at max(u - D, -1, w + 1), owner among the readers at first use."""
    T, L, D = 3, 5, 2
    cfg = PlannerConfig(T, 2, L, D, None, TOTAL)
    plans = list(plan_lrpp(cfg, batches))
    per = B // T
    reads = [[np.unique(b[k * per:(k + 1) * per]) for k in range(T)] for b in batches]
    U = [np.unique(b) for b in batches]
    uses: dict[int, list[int]] = {}
    for i, u in enumerate(U):
        for key in u.tolist():
            uses.setdefault(key, []).append(i)
    last_wb: dict[int, int] = {}
    for p in plans:
        s = p.iteration
        for t, tp in enumerate(p.trainers):
            for key in tp.writeback_keys.tolist():
                us = uses[key]
                prev = max(i for i in us if i <= s)
                nxt = [i for i in us if i > s]
                assert prev == s or s == N - 1
                if s < N - 1:
                    assert not nxt or nxt[0] > s + L, (key, s, nxt)
                last_wb[key] = s
            for key in tp.fetch_keys.tolist():
                u = min(i for i in uses[key] if i > s)
                w = last_wb.get(key, -10)
                assert s == max(u - D, -1, w + 1), (key, s, u, w)
                readers = [k for k in range(T) if np.isin(key, reads[u][k])]
                assert t in readers
        if 0 <= s < N - 1:  # rows used at s with a next use within L are not written back
            wb = np.concatenate([tp.writeback_keys for tp in p.trainers])
            for key in U[s].tolist():
                nxt = [i for i in uses[key] if i > s]
                if nxt and nxt[0] <= s + L:
                    assert key not in wb


def test_wait_through_stage(batches):
    T, L, D = 2, 8, 2
    cfg = PlannerConfig(T, 2, L, D, None, TOTAL)
    fetched_at: dict[tuple[int, int], int] = {}
    for p in plan_lrpp(cfg, batches):
        s = p.iteration
        for t, tp in enumerate(p.trainers):
            if s >= 0:
                first = [fetched_at.pop((t, int(k))) for k in tp.update_keys if (t, int(k)) in fetched_at]
                assert tp.wait_through_stage == (max(first) if first else -2)
                assert tp.wait_through_stage <= s - 1
                if s >= 1:  # D = 2 without capacity pressure: fetch latency hidden
                    assert tp.wait_through_stage <= s - 2
            for k in tp.fetch_keys:
                fetched_at[(t, int(k))] = s


def test_fetch_reduction_skewed():
    """Skewed (Zipf 1.05) workload, 10% capacity: far fewer rows fetched than `none`."""
    cards = [100, 2000, 20000, 5000, 10, 500, 30000, 1000]
    total = sum(cards)
    bs = zipf_key_batches(cards, 512, 120, exponent=1.05, seed=11)
    T = 2
    cfg = PlannerConfig(T, 2, 32, 2, math.ceil(0.10 * total / T), total)
    plans = list(plan_lrpp(cfg, bs))
    fetched = sum(p.stats.fetched for p in plans)
    none = sum(p.stats.fetched for p in plan_none(T, 2, bs))
    assert none == sum(p.stats.reads for p in plans)
    assert none / fetched >= 5.0, (none, fetched)
    assert max(max(p.stats.occupancy) for p in plans) <= cfg.cache_rows


def test_capacity_too_small_at_start(batches):
    T = 2
    R = math.ceil(pair_bound(batches[:6]) / T) - 5
    with pytest.raises(PlanError, match="cache capacity too small") as err:
        plan_lrpp(PlannerConfig(T, 1, 4, 2, R, TOTAL), batches)  # rejected when called, before any plan
    assert "cache_rows must be at least" in str(err.value)
    with pytest.raises(PlanError, match="cache capacity too small"):
        plan_lrpp(PlannerConfig(1, 1, 4, 2, 3, TOTAL), batches)


def test_capacity_too_small_mid_stream():
    """Detected when the heavy part of the stream comes, after plans were streamed."""
    rng = np.random.default_rng(0)
    calm = [rng.integers(0, 10, size=(16, 2)) for _ in range(20)]
    storm = [rng.integers(0, 1000, size=(16, 2)) for _ in range(10)]
    cfg = PlannerConfig(2, 1, 4, 2, 12, 1000)
    got = []
    with pytest.raises(PlanError, match="cache capacity too small"):
        for p in plan_lrpp(cfg, calm + storm):
            got.append(p.iteration)
    assert len(got) >= 10


def test_plan_error_is_clear_when_capacity_cannot_be_freed():
    """Startup and pair checks pass, but rows needed soon fill the cache: PlanError."""
    # every iteration reads 4 fresh keys plus the 4 keys it will read again 2 iterations later
    bs = []
    for i in range(30):
        a = 100 + 4 * i + np.arange(4)
        b = 100 + 4 * (i - 2) + np.arange(4) if i >= 2 else 500 + np.arange(4)
        bs.append(np.stack([a, b], axis=1).astype(np.int64))
    T, L = 1, 8
    bound = pair_bound(bs)
    for R in range(bound, bound + 12):
        try:
            plans = list(plan_lrpp(PlannerConfig(T, 1, L, 2, R, 1000), bs))
        except PlanError as err:
            assert "cache capacity too small" in str(err)
            continue
        verify_plans(PlannerConfig(T, 1, L, 2, R, 1000), bs, plans)


def test_deterministic(batches):
    cfg = PlannerConfig(3, 2, 7, 3, math.ceil(pair_bound(batches) / 3), TOTAL)
    a = [PlanMessage.from_plan(tp, 3, TOTAL).encode() for p in plan_lrpp(cfg, batches) for tp in p.trainers]
    b = [PlanMessage.from_plan(tp, 3, TOTAL).encode() for p in plan_lrpp(cfg, batches) for tp in p.trainers]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_lazy_streaming():
    cards = [30, 300]
    src = zipf_key_batches(cards, 8, 50, seed=1)
    pulled = [0]

    def infinite():
        for i in itertools.count():
            pulled[0] += 1
            yield src[i % len(src)]

    cfg = PlannerConfig(2, 1, 6, 2, None, sum(cards))
    gen = plan_lrpp(cfg, infinite())
    for i, plan in enumerate(itertools.islice(gen, 30)):
        assert plan.iteration == i - 1
        # consumed at most horizon (+1 to know whether an iteration is the last) ahead
        assert pulled[0] <= max(plan.iteration, 0) + cfg.horizon + 2


def test_small_streams():
    assert [p.iteration for p in plan_lrpp(PlannerConfig(2, 1, 4, 2, 10, 100), [])] == [-1]
    one = [np.array([[1, 2], [3, 2]], dtype=np.int64)]
    cfg = PlannerConfig(2, 2, 4, 2, 10, 100)
    plans = list(plan_lrpp(cfg, one))
    assert [p.iteration for p in plans] == [-1, 0]
    verify_plans(cfg, one, plans)
    assert sorted(np.concatenate([tp.fetch_keys for tp in plans[0].trainers]).tolist()) == [1, 2, 3]
    assert sorted(np.concatenate([tp.writeback_keys for tp in plans[1].trainers]).tolist()) == [1, 2, 3]
    verify_plans(cfg, [], list(plan_lrpp(cfg, [])))
    verify_plans(cfg, one, list(plan_none(2, 2, one)), mode="none")


def test_config_validation():
    assert default_prefetch_distance(1) == 1 and default_prefetch_distance(8) == 2
    assert PlannerConfig(1, 1, 8, None, None, 10).prefetch_distance == 2
    with pytest.raises(PlanError, match="prefetch distance"):
        PlannerConfig(1, 1, 4, 5, None, 10)
    with pytest.raises(PlanError, match="prefetch distance"):
        PlannerConfig(1, 1, 4, 0, None, 10)
    with pytest.raises(PlanError):
        PlannerConfig(0, 1, 4, 2, None, 10)
    with pytest.raises(PlanError):
        PlannerConfig(1, 1, 4, 2, 0, 10)
    with pytest.raises(ValueError, match="split"):
        list(plan_lrpp(PlannerConfig(2, 1, 4, 2, None, 10), [np.zeros((3, 2), np.int64)]))
    with pytest.raises(ValueError, match="out of range"):
        list(plan_lrpp(PlannerConfig(1, 1, 4, 2, None, 10), [np.full((2, 2), 10, np.int64)]))


def test_server_plans_and_stats(batches):
    T, S = 2, 3
    cfg = PlannerConfig(T, S, 4, 2, None, TOTAL)
    plans = list(plan_lrpp(cfg, batches))
    for p in plans:
        assert isinstance(p, IterationPlan) and len(p.servers) == S
        for j, sp in enumerate(p.servers):
            assert sp.stage == p.iteration and sp.server == j
            assert not sp.grad_counts.any()
        assert sum(int(sp.fetch_counts.sum()) for sp in p.servers) == p.stats.fetched
        assert sum(int(sp.writeback_counts.sum()) for sp in p.servers) == p.stats.written_back
    # exchange volume: reads served by another owner
    for p in plans[1:]:
        assert p.stats.exchange_rows == sum(sum(r.size for r in tp.recv_pos) for tp in p.trainers)


@pytest.mark.parametrize("evict_ahead", [1, 2])
@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_at_the_capacity_bound(seed, evict_ahead):
    """Property: with T*R >= max |U_i u U_{i+1}| planning succeeds and the replay
    finds no violation, for random skews, sizes, T, L and D."""
    rng = np.random.default_rng(seed)
    nkeys = int(rng.integers(20, 300))
    b = int(rng.choice([6, 12, 24]))
    n = int(rng.integers(5, 40))
    p = 1.0 / np.arange(1, nkeys + 1) ** rng.uniform(0.6, 1.6)
    tables = int(rng.integers(1, 4))
    bs = [rng.choice(nkeys, size=(b, tables), p=p / p.sum()) for _ in range(n)]
    U = [np.unique(x) for x in bs]
    bound = max([U[0].size] + [np.union1d(U[i], U[i + 1]).size for i in range(n - 1)])
    for T in (1, 2, 3):
        L = int(rng.choice([1, 3, 8, 30]))
        D = int(rng.integers(1, L + 1))
        cfg = PlannerConfig(T, 2, L, D, math.ceil(bound / T), nkeys, evict_ahead=evict_ahead)
        plans = list(plan_lrpp(cfg, bs))
        report = verify_plans(cfg, bs, plans)
        assert max(report["peak_occupancy"]) <= cfg.cache_rows


def test_plan_arrays_are_int64(batches):
    cfg = PlannerConfig(3, 2, 4, 2, math.ceil(pair_bound(batches) / 3), TOTAL)
    for plan in itertools.chain(plan_lrpp(cfg, batches), plan_none(3, 2, batches)):
        for tp in plan.trainers:
            for f in fields(tp):
                v = getattr(tp, f.name)
                for arr in (v if isinstance(v, list) else [v]):
                    if isinstance(arr, np.ndarray):
                        assert arr.dtype == np.int64 and arr.ndim == 1, f.name
        for sp in plan.servers:
            for name in ("grad_counts", "writeback_counts", "fetch_counts"):
                assert getattr(sp, name).dtype == np.int64 and getattr(sp, name).shape == (3,)


@pytest.mark.parametrize("T,R", [(1, None), (2, "tight"), (3, None)])
def test_checkpoint_stages_flush_every_changed_row(batches, T, R):
    cap = None if R is None else math.ceil(pair_bound(batches) / T)
    cfg = PlannerConfig(T, 2, 7, 2, cap, TOTAL, checkpoint_every=5, first_iteration=3)
    plans = list(plan_lrpp(cfg, batches))
    verify_plans(cfg, batches, plans)  # every changed resident row is flushed at each checkpoint stage
    flushing = [p.iteration for p in plans if p.stats.flushed]
    assert flushing and all((3 + i + 1) % 5 == 0 for i in flushing)
    for p in plans:
        for sp in p.servers:
            assert int(sp.flush_counts.sum()) == sum(
                int(np.count_nonzero(tp.flush_keys % 2 == sp.server)) for tp in p.trainers)
    # the flushed plan stream is otherwise the plain one: same reads, fetches and write-backs
    plain = list(plan_lrpp(PlannerConfig(T, 2, 7, 2, cap, TOTAL), batches))
    for a, b in zip(plans, plain):
        for x, y in zip(a.trainers, b.trainers):
            np.testing.assert_array_equal(x.fetch_keys, y.fetch_keys)
            np.testing.assert_array_equal(x.writeback_keys, y.writeback_keys)


def test_a_missed_flush_is_caught(batches):
    cfg = PlannerConfig(2, 1, 7, 2, None, TOTAL, checkpoint_every=4)
    plans = list(plan_lrpp(cfg, batches))
    victim = next(p for p in plans if p.stats.flushed)
    tp = next(t for t in victim.trainers if t.flush_keys.size)
    tp.flush_keys, tp.flush_slots = tp.flush_keys[1:], tp.flush_slots[1:]
    with pytest.raises(AssertionError, match="neither written back nor flushed"):
        verify_plans(cfg, batches, plans)
