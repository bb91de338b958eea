"""The compact plan channel: encode/decode, and what a trainer derives from it.

`PlanMessage` leaves out everything a trainer can work out from its own reads and
cache. The replay below runs real LRPP plans through one `OwnedCache` per trainer
(fetches landing when the plan says they may) and checks that `OwnedCache.resolve`
rebuilds exactly the planner's full decisions, so the light channel loses nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bagpipe.cache import OwnedCache
from bagpipe.config import OptimizerKind
from bagpipe.errors import PeerError
from bagpipe.optim import SparseOptimizer
from bagpipe.oracle.lrpp import PlannerConfig, plan_lrpp
from bagpipe.oracle.nocache import plan_none
from bagpipe.oracle.simulate import zipf_key_batches
from bagpipe.plan import PlanFormatError, PlanMessage, ServerPlan, key_dtype

CARDS = [50, 200, 1000, 20, 3000, 8]
TOTAL = sum(CARDS)


def _batches(T, n=30):
    return zipf_key_batches(CARDS, 12 * T, n, exponent=1.05, seed=T)


def _pair_bound(batches) -> int:
    U = [np.unique(b) for b in batches]
    return max(np.union1d(U[i], U[i + 1]).size for i in range(len(U) - 1))


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_message_roundtrip(T):
    batches = _batches(T)
    cfg = PlannerConfig(T, 2, 7, 2, math.ceil(_pair_bound(batches) / T) + 3, TOTAL)
    for plan in list(plan_lrpp(cfg, batches)) + list(plan_none(T, 2, batches)):
        for tp in plan.trainers:
            msg = PlanMessage.from_plan(tp, T, TOTAL)
            back = PlanMessage.decode(msg.encode())
            assert back == msg
            assert back.fetch_keys.dtype == np.int32 and back.iteration == tp.iteration
            np.testing.assert_array_equal(back.fetch_keys, tp.fetch_keys)
            assert (back.recv_owner.size > 0) == (T > 2 and any(p.size for p in tp.recv_pos))
        for sp in plan.servers:
            back = ServerPlan.decode(sp.encode())
            assert (back.stage, back.server, back.read_only) == (sp.stage, sp.server, sp.read_only)
            for name in ("grad_counts", "writeback_counts", "fetch_counts"):
                np.testing.assert_array_equal(getattr(back, name), getattr(sp, name))


def test_an_evaluation_is_one_message_per_server():
    from bagpipe.placement import Placement
    from bagpipe.plan import EvalPlan, decode_server_message, eval_plans, eval_stage

    reads = [[np.array([0, 1, 2, 5]), np.array([3])], [np.array([], dtype=np.int64), np.arange(10)]]
    plans = eval_plans(7, Placement(2), 2, iter(reads))
    assert [p.fetch_counts.shape for p in plans] == [(2, 2), (2, 2)]
    assert sum(p.fetch_counts for p in plans).tolist() == [[4, 1], [0, 10]]
    for plan in plans:
        back = decode_server_message(plan.encode())
        assert isinstance(back, EvalPlan) and back.after_iteration == 7
        np.testing.assert_array_equal(back.fetch_counts, plan.fetch_counts)
        stages = back.stages()
        assert [s.stage for s in stages] == [eval_stage(7, 0), eval_stage(7, 1)]
        assert all(s.read_only and not s.grad_counts.any() for s in stages)
    assert eval_stage(7, 0) != eval_stage(6, 1) and eval_stage(0, 0) > 10**12  # far from training stages
    sp = next(iter(plan_none(2, 1, _batches(2)))).servers[0]
    assert isinstance(decode_server_message(sp.encode()), ServerPlan)
    with pytest.raises(PlanFormatError, match="trailing"):
        EvalPlan.decode(np.concatenate([plans[0].encode(), np.zeros(8, np.uint8)]))


def test_wide_keys_travel_as_int64():
    plan = next(iter(plan_none(1, 1, [np.array([[5], [3_000_000_000]])])))
    msg = PlanMessage.from_plan(plan.trainers[0], 1, 4_000_000_000)
    assert key_dtype(4_000_000_000) == np.int64
    back = PlanMessage.decode(msg.encode())
    assert back.fetch_keys.dtype == np.int64 and back.fetch_keys.tolist() == [5, 3_000_000_000]


def test_corrupt_messages_are_refused():
    plan = next(iter(plan_none(2, 1, _batches(2))))
    raw = PlanMessage.from_plan(plan.trainers[0], 2, TOTAL).encode()
    with pytest.raises(PlanFormatError, match="truncated"):
        PlanMessage.decode(raw[:-4])
    with pytest.raises(PlanFormatError, match="trailing"):
        PlanMessage.decode(np.concatenate([raw, np.zeros(4, np.uint8)]))
    with pytest.raises(PlanFormatError, match="not a trainer plan"):
        PlanMessage.decode(plan.servers[0].encode())
    with pytest.raises(PlanFormatError, match="not a server plan"):
        ServerPlan.decode(raw)


def test_plan_channel_is_light():
    """No reads, no update list, int32 fields: well under the old all-int64 format."""
    T = 2
    batches = _batches(T, 20)
    cfg = PlannerConfig(T, 1, 8, 2, None, TOTAL)
    new, old = 0, 0
    for plan in plan_lrpp(cfg, batches):
        for tp in plan.trainers:
            new += PlanMessage.from_plan(tp, T, TOTAL).encode().nbytes
            old += 8 * (len(tp.reads) + 2 * len(tp.owned_pos) + sum(map(len, tp.recv_pos))
                        + sum(map(len, tp.send_slots)) + 2 * len(tp.update_keys) + 2 * len(tp.writeback_keys)
                        + 2 * len(tp.fetch_keys))
    assert new < old / 4


def _replay(T, cfg, batches, check=True, early=False):
    """Run plans through one cache per trainer the way trainers/cached.py does."""
    opt = SparseOptimizer(OptimizerKind.ADAGRAD, 2)
    caches = [OwnedCache(cfg.cache_rows or 8, opt, f"trainer {k}", k, T) for k in range(T)]
    pending = [[] for _ in range(T)]
    per = batches[0].shape[0] // T
    for plan in plan_lrpp(cfg, batches):
        i = plan.iteration
        for k, (tp, cache) in enumerate(zip(plan.trainers, caches)):
            msg = PlanMessage.decode(PlanMessage.from_plan(tp, T, TOTAL).encode())
            wait_through = msg.wait_through_stage - (1 if early and i >= 1 else 0)
            while pending[k] and pending[k][0][0] <= wait_through:
                _, keys, slots = pending[k].pop(0)
                vals = torch.from_numpy(np.repeat(keys[:, None].astype(np.float32), 2, axis=1))
                cache.land(keys, slots, vals, torch.zeros((len(keys), 2)))
            if i >= 0:
                reads = np.unique(batches[i][k * per:(k + 1) * per])
                got = cache.resolve(msg, reads)
                if check:
                    for name in ("owned_pos", "owned_slots", "update_slots", "update_keys", "writeback_keys",
                                 "writeback_slots", "fetch_keys", "fetch_slots", "flush_slots", "flush_keys"):
                        np.testing.assert_array_equal(getattr(got, name), getattr(tp, name), err_msg=name)
                    for o in range(T):
                        np.testing.assert_array_equal(got.recv_pos[o], tp.recv_pos[o])
                        np.testing.assert_array_equal(got.send_slots[o], tp.send_slots[o])
                    # the rows landed are the ones planned: values carry their keys
                    assert np.array_equal(cache.values[torch.from_numpy(got.owned_slots)][:, 0].numpy(),
                                          reads[got.owned_pos].astype(np.float32))
                cache.evict(got.writeback_keys, got.writeback_slots)
            else:
                assert msg.fetch_keys.size == len(tp.fetch_keys)
            if len(tp.fetch_keys):
                pending[k].append((i, np.asarray(tp.fetch_keys, np.int64), np.asarray(tp.fetch_slots, np.int64)))
    assert all(c.occupancy == 0 for c in caches)


@pytest.mark.parametrize("T,L,D,tight,every", [(1, 4, 2, False, None), (2, 7, 2, True, 4), (3, 7, 3, True, None),
                                               (4, 3, 1, False, 3), (3, 64, 64, False, 7)])
def test_resolve_rebuilds_the_full_plan(T, L, D, tight, every):
    batches = _batches(T)
    R = math.ceil(_pair_bound(batches) / T) if tight else None
    _replay(T, PlannerConfig(T, 2, L, D, R, TOTAL, checkpoint_every=every), batches)


def test_reading_before_a_fetch_lands_is_caught():
    T = 2
    batches = _batches(T)
    cfg = PlannerConfig(T, 1, 2, 2, None, TOTAL)
    with pytest.raises(PeerError, match="not resident"):
        _replay(T, cfg, batches, check=False, early=True)


def test_reads_that_differ_from_the_plan_are_caught():
    T = 2
    batches = _batches(T)
    plan = list(plan_lrpp(PlannerConfig(T, 1, 4, 2, None, TOTAL), batches))[1]
    msg = PlanMessage.from_plan(plan.trainers[0], T, TOTAL)
    with pytest.raises(PeerError, match="data out of step"):
        msg.check_reads(plan.trainers[0].reads[1:], "trainer 0")
