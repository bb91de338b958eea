"""The reference replay must catch deliberately corrupted plans (a test that the test can fail)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest

from bagpipe.oracle.lrpp import PlannerConfig, plan_lrpp
from bagpipe.oracle.nocache import plan_none
from bagpipe.oracle.simulate import zipf_key_batches
from bagpipe.oracle.verify import verify_plans

CARDS = [40, 300, 900, 12, 2500]
TOTAL = sum(CARDS)
T, S, N = 3, 2, 30


@pytest.fixture(scope="module")
def data():
    bs = zipf_key_batches(CARDS, 36, N, exponent=1.05, seed=5)
    U = [np.unique(b) for b in bs]
    bound = max(np.union1d(U[i], U[i + 1]).size for i in range(N - 1))
    cfg = PlannerConfig(T, S, 7, 2, math.ceil(bound / T), TOTAL)
    plans = list(plan_lrpp(cfg, bs))
    verify_plans(cfg, bs, plans)  # the uncorrupted plans pass
    assert sum(p.stats.capacity_evictions for p in plans) > 0
    return cfg, bs, plans


def recount(plan) -> None:
    """Keep the server messages consistent with edited trainer lists, so the
    semantic checks (not the count checks) must catch the corruption."""
    for j, sp in enumerate(plan.servers):
        sp.writeback_counts = np.array([np.count_nonzero(tp.writeback_keys % S == j) for tp in plan.trainers])
        sp.fetch_counts = np.array([np.count_nonzero(tp.fetch_keys % S == j) for tp in plan.trainers])


def at(plans, iteration):
    return plans[iteration + 1]


def reads_at(plans, i) -> np.ndarray:
    return np.unique(np.concatenate([tp.reads for tp in at(plans, i).trainers]))


def expect_caught(cfg, bs, plans, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        verify_plans(cfg, bs, plans)


def test_shift_fetch_one_stage_later(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    for s in range(-1, N - 2):
        nxt = reads_at(plans, s + 1)
        for tp in at(plans, s).trainers:
            hit = np.flatnonzero(np.isin(tp.fetch_keys, nxt))
            if hit.size:
                i = hit[0]
                key, slot = tp.fetch_keys[i], tp.fetch_slots[i]
                tp.fetch_keys, tp.fetch_slots = np.delete(tp.fetch_keys, i), np.delete(tp.fetch_slots, i)
                later = at(plans, s + 1).trainers[tp.trainer]
                later.fetch_keys = np.append(later.fetch_keys, key)
                later.fetch_slots = np.append(later.fetch_slots, slot)
                recount(at(plans, s))
                recount(at(plans, s + 1))
                expect_caught(cfg, bs, plans, r"not resident|owned by trainer|wait_through|slot")
                return
    pytest.fail("no fetch to shift")


def test_shift_fetch_after_its_wait(data):
    """A fetch moved one stage later but still before use: caught by the wait rule."""
    _, bs, _ = data
    cfg = PlannerConfig(T, S, 7, 2, None, TOTAL)  # unlimited: fetches two stages ahead
    plans = list(plan_lrpp(cfg, bs))
    for u in range(2, N):
        for t in range(T):
            w = at(plans, u).trainers[t].wait_through_stage
            if w < 0 or w + 1 > u - 1:
                continue
            tp = at(plans, w).trainers[t]
            used = np.unique(np.concatenate([x.reads for x in at(plans, u).trainers]))
            hit = np.flatnonzero(np.isin(tp.fetch_keys, used))
            later_reads = [reads_at(plans, i) for i in range(w + 1, u)]
            hit = [i for i in hit if not any(np.isin(tp.fetch_keys[i], r) for r in later_reads)]
            if not hit:
                continue
            i = hit[0]
            key, slot = tp.fetch_keys[i], tp.fetch_slots[i]
            tp.fetch_keys, tp.fetch_slots = np.delete(tp.fetch_keys, i), np.delete(tp.fetch_slots, i)
            later = at(plans, w + 1).trainers[t]
            later.fetch_keys = np.append(later.fetch_keys, key)
            later.fetch_slots = np.append(later.fetch_slots, slot)
            recount(at(plans, w))
            recount(at(plans, w + 1))
            expect_caught(cfg, bs, plans, r"wait_through_stage too small")
            return
    pytest.fail("no candidate")


def test_swap_two_owners(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    for p in plans[:-1]:
        a, b = p.trainers[0], p.trainers[1]
        if a.fetch_keys.size and b.fetch_keys.size:
            a.fetch_keys[0], b.fetch_keys[0] = b.fetch_keys[0], a.fetch_keys[0]
            recount(p)
            expect_caught(cfg, bs, plans, r"owned by trainer|owner is|holds row")
            return
    pytest.fail("no stage where two trainers fetch")


def test_drop_a_writeback(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    for p in plans[1:-1]:
        for tp in p.trainers:
            if tp.writeback_keys.size:
                tp.writeback_keys, tp.writeback_slots = tp.writeback_keys[1:], tp.writeback_slots[1:]
                recount(p)
                expect_caught(cfg, bs, plans, r"resident|still holds|owned by")
                return
    pytest.fail("no write-back")


def test_drop_a_row_from_the_final_flush(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    tp = next(tp for tp in plans[-1].trainers if tp.writeback_keys.size)
    tp.writeback_keys, tp.writeback_slots = tp.writeback_keys[:-1], tp.writeback_slots[:-1]
    recount(plans[-1])
    expect_caught(cfg, bs, plans, r"still resident after the final flush")


def test_fetch_at_the_stage_of_its_writeback(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    wb_at = {}
    for p in plans:
        for tp in p.trainers:
            for i, key in enumerate(tp.fetch_keys.tolist()):
                if key in wb_at:
                    w = wb_at[key]
                    tp.fetch_keys, tp.fetch_slots = np.delete(tp.fetch_keys, i), np.delete(tp.fetch_slots, i)
                    early = plans[w + 1].trainers[tp.trainer]
                    early.fetch_keys = np.append(early.fetch_keys, key)
                    early.fetch_slots = np.append(early.fetch_slots, 0)
                    recount(p)
                    recount(plans[w + 1])
                    expect_caught(cfg, bs, plans, r"not after its write-back")
                    return
        for tp in p.trainers:
            for key in tp.writeback_keys.tolist():
                wb_at[key] = p.iteration
    pytest.fail("no re-fetch")


def test_row_owned_by_two_trainers(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    p = plans[3]
    key = int(p.trainers[0].reads[p.trainers[0].owned_pos[0]])  # resident on trainer 0
    tp = p.trainers[1]
    tp.fetch_keys = np.append(tp.fetch_keys, key)
    tp.fetch_slots = np.append(tp.fetch_slots, cfg.cache_rows - 1)
    recount(p)
    expect_caught(cfg, bs, plans, r"owned by trainer 0: a row owned by two trainers|slot")


def test_send_order_swapped(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    for p in plans[1:]:
        for tp in p.trainers:
            for j, ss in enumerate(tp.send_slots):
                if ss.size >= 2:
                    ss[[0, 1]] = ss[[1, 0]]
                    expect_caught(cfg, bs, plans, r"lists inconsistent between sender and receiver")
                    return
    pytest.fail("no exchange")


def test_update_keys_missing_a_row(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    tp = plans[5].trainers[2]
    tp.update_keys, tp.update_slots = tp.update_keys[1:], tp.update_slots[1:]
    expect_caught(cfg, bs, plans, r"update_keys")


def test_wait_through_too_small(data):
    cfg, bs, plans = data
    plans = copy.deepcopy(plans)
    best = [-2] * T
    for p in plans:
        for t, tp in enumerate(p.trainers):
            if tp.wait_through_stage > best[t] and tp.wait_through_stage >= 0:
                tp.wait_through_stage -= 1
                expect_caught(cfg, bs, plans, r"wait_through_stage too small|before its fetch answer")
                return
            best[t] = max(best[t], tp.wait_through_stage)
    pytest.fail("no wait")


def test_occupancy_above_capacity(data):
    cfg, bs, plans = data
    report = verify_plans(cfg, bs, plans)
    smaller = dataclasses.replace(cfg, cache_rows=max(report["peak_occupancy"]) - 1)
    expect_caught(smaller, bs, plans, r"exceeds cache_rows|slot out of range")


def test_reads_and_partition_corrupted(data):
    cfg, bs, plans = data
    bad = copy.deepcopy(plans)
    bad[4].trainers[1].reads = bad[4].trainers[1].reads[:-1]
    expect_caught(cfg, bs, bad, r"reads")
    bad = copy.deepcopy(plans)
    tp = next(tp for tp in bad[6].trainers if tp.recv_pos[(tp.trainer + 1) % T].size)
    o = (tp.trainer + 1) % T
    tp.recv_pos[o] = tp.recv_pos[o][1:]  # a read nobody serves
    expect_caught(cfg, bs, bad, r"served 0 times|expects")


def test_truncated_stream_and_server_counts(data):
    cfg, bs, plans = data
    expect_caught(cfg, bs, copy.deepcopy(plans[:-1]), r"plans end before the data")
    bad = copy.deepcopy(plans)
    bad[3].servers[1].fetch_counts = bad[3].servers[1].fetch_counts + 1
    expect_caught(cfg, bs, bad, r"fetch_counts")


def test_none_mode_corruptions(data):
    cfg, bs, _ = data
    plans = list(plan_none(T, S, bs))
    verify_plans(cfg, bs, plans, mode="none")
    bad = copy.deepcopy(plans)
    bad[3].trainers[0].fetch_keys = bad[3].trainers[0].fetch_keys[1:]
    with pytest.raises(AssertionError, match="fetch_keys"):
        verify_plans(cfg, bs, bad, mode="none")
    bad = copy.deepcopy(plans)
    bad[5].trainers[2].wait_through_stage = 2
    with pytest.raises(AssertionError, match="wait_through_stage"):
        verify_plans(cfg, bs, bad, mode="none")
    bad = copy.deepcopy(plans)
    bad[5].servers[0].grad_counts = bad[5].servers[0].grad_counts * 0
    with pytest.raises(AssertionError, match="grad_counts"):
        verify_plans(cfg, bs, bad, mode="none")
