"""OwnedCache: slots, the resident-key index, and the errors a wrong plan produces."""

import numpy as np
import pytest
import torch

from bagpipe.cache import OwnedCache
from bagpipe.config import OptimizerKind
from bagpipe.errors import PeerError
from bagpipe.optim import SparseOptimizer
from bagpipe.plan import PlanMessage, reads_checksum

OPT = SparseOptimizer(OptimizerKind.ADAGRAD, 2, initial_accumulator=0.5)


def _cache(capacity=6, trainer=0, trainers=2):
    return OwnedCache(capacity, OPT, f"trainer {trainer}", trainer, trainers)


def _rows(keys):
    keys = np.asarray(keys, np.int64)
    return torch.from_numpy(np.stack([keys, -keys], 1).astype(np.float32)), torch.ones((len(keys), 2))


def _msg(reads, owned, send=None, writeback=(), trainers=2, recv_owner=()):
    return PlanMessage(iteration=3, trainer=0, wait_through_stage=2, reads_count=len(reads),
                       reads_checksum=reads_checksum(np.asarray(reads)), owned_count=owned,
                       recv_owner=np.asarray(recv_owner, np.uint8),
                       send_slots=send or [np.zeros(0, np.int32) for _ in range(trainers)],
                       writeback_slots=np.asarray(writeback, np.int32), fetch_keys=np.zeros(0, np.int32),
                       fetch_slots=np.zeros(0, np.int32))


def test_land_lookup_evict():
    cache = _cache()
    cache.land(np.array([4, 10, 30]), np.array([5, 0, 2]), *_rows([4, 10, 30]))
    cache.land(np.array([7]), np.array([1]), *_rows([7]))
    assert cache.occupancy == 4 and cache.resident_keys().tolist() == [4, 7, 10, 30]
    hit, slots = cache.lookup(np.array([3, 4, 10, 31, 30]))
    assert hit.tolist() == [False, True, True, False, True] and slots.tolist() == [5, 0, 2]
    values, state = cache.evict(np.array([10]), np.array([0]))
    assert values.tolist() == [[10.0, -10.0]] and state.tolist() == [[1.0, 1.0]]
    assert cache.resident_keys().tolist() == [4, 7, 30] and cache.held(np.array([0, 1, 99])).tolist() == [-1, 7, -1]


def test_landing_errors():
    cache = _cache()
    cache.land(np.array([4]), np.array([1]), *_rows([4]))
    with pytest.raises(PeerError, match="still occupied"):
        cache.land(np.array([5]), np.array([1]), *_rows([5]))
    with pytest.raises(PeerError, match="already resident"):
        cache.land(np.array([4]), np.array([2]), *_rows([4]))
    with pytest.raises(PeerError, match="out of key order"):
        cache.land(np.array([9, 8]), np.array([2, 3]), *_rows([9, 8]))


def test_unlimited_capacity_grows_with_initial_state():
    cache = _cache(capacity=2)
    cache.land(np.array([1, 2]), np.array([0, 9]), *_rows([1, 2]))
    assert cache.values.shape[0] >= 10 and torch.all(cache.state[2:9] == 0.5)


def test_resolve_derives_owned_reads_updates_and_writebacks():
    cache = _cache()
    cache.land(np.array([4, 7, 10, 30]), np.array([3, 1, 0, 2]), *_rows([4, 7, 10, 30]))
    reads = np.array([2, 4, 10, 12])
    msg = _msg(reads, owned=2, send=[np.zeros(0, np.int32), np.array([2, 3], np.int32)], writeback=[1])
    plan = cache.resolve(msg, reads)
    assert plan.owned_pos.tolist() == [1, 2] and plan.owned_slots.tolist() == [3, 0]
    assert plan.recv_pos[1].tolist() == [0, 3] and plan.recv_pos[0].size == 0
    assert plan.update_keys.tolist() == [4, 10, 30] and plan.update_slots.tolist() == [3, 0, 2]
    assert plan.writeback_keys.tolist() == [7]


def test_resolve_errors_name_the_problem():
    cache = _cache()
    cache.land(np.array([4, 10]), np.array([3, 0]), *_rows([4, 10]))
    reads = np.array([4, 10, 12])
    with pytest.raises(PeerError, match="not resident"):
        cache.resolve(_msg(reads, owned=3), reads)
    with pytest.raises(PeerError, match="data out of step"):
        cache.resolve(_msg(reads, owned=2), reads[:2])
    with pytest.raises(PeerError, match="slot 5 holds no row"):
        cache.resolve(_msg(reads, owned=2, send=[np.zeros(0, np.int32), np.array([5], np.int32)]), reads)
    with pytest.raises(PeerError, match="write-back: slot 1 holds no row"):
        cache.resolve(_msg(reads, owned=2, writeback=[1]), reads)
    three = OwnedCache(6, OPT, "trainer 0", 0, 3)
    three.land(np.array([4, 10]), np.array([3, 0]), *_rows([4, 10]))
    with pytest.raises(PeerError, match="remote owners"):
        three.resolve(_msg(reads, owned=2, trainers=3, recv_owner=[0]), reads)
    plan = three.resolve(_msg(reads, owned=2, trainers=3, recv_owner=[2]), reads)
    assert plan.recv_pos[2].tolist() == [2]


def test_owner_update_uses_the_shared_optimizer():
    cache = _cache()
    cache.land(np.array([4, 10]), np.array([3, 0]), *_rows([4, 10]))
    grads = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    values, state = cache.update(np.array([3, 0]), grads, 0.1)
    expect_v, expect_s = _rows([4, 10])
    OPT.apply(expect_v, expect_s, grads, 0.1)
    assert torch.equal(values, expect_v) and torch.equal(cache.values[[3, 0]], expect_v)
    assert torch.equal(state, expect_s)
