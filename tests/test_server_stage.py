"""The embedding server's stage logic, driven in-process with hand-made messages."""

import numpy as np
import pytest
import torch

from bagpipe.config import Mode, OptimizerKind
from bagpipe.embedding import sum_contributions
from bagpipe.errors import PeerError
from bagpipe.optim import SparseOptimizer
from bagpipe.placement import Placement
from bagpipe.plan import ServerPlan
from bagpipe.protocol import StageMessage
from bagpipe.rows import RowSpace
from bagpipe.server import Shard, StageServer

ROWS = RowSpace((40, 25), row_dim=3, seed=7)
T = 3


def _server(mode=Mode.NONE, kind=OptimizerKind.ADAGRAD, servers=2, index=1, acc=0.1):
    opt = SparseOptimizer(kind, ROWS.row_dim, initial_accumulator=acc)
    shard = Shard(ROWS, Placement(servers), index, opt)
    return StageServer(shard, mode, T, lambda s: 0.5 / (s + 2), "server 1"), shard


def _msg(grad_keys=(), grads=None, wb_keys=(), wb_values=None, wb_state=None, fetch=(), flush_keys=(),
         flush_values=None, flush_state=None):
    d, s = ROWS.row_dim, 3
    gk, wk, lk, fk = (np.asarray(x, np.int64) for x in (grad_keys, wb_keys, flush_keys, fetch))
    return StageMessage(gk, grads if grads is not None else np.zeros((0, d), np.float32), wk,
                        wb_values if wb_values is not None else np.zeros((len(wk), d), np.float32),
                        wb_state if wb_state is not None else np.zeros((len(wk), s), np.float32), lk,
                        flush_values if flush_values is not None else np.zeros((len(lk), d), np.float32),
                        flush_state if flush_state is not None else np.zeros((len(lk), s), np.float32), fk)


def _plan(stage, messages, read_only=False):
    counts = np.array([m.counts for m in messages]).T
    return ServerPlan(stage, 1, counts[0], counts[1], counts[3], read_only, counts[2])


def test_none_mode_applies_rank_ordered_sums_then_answers():
    server, shard = _server()
    keys = [np.array([1, 3, 9]), np.array([3, 9, 11]), np.array([9])]
    msgs = [_msg(fetch=k) for k in keys]
    answers, _ = server.apply(_plan(-1, msgs), msgs)
    before = [a.values.copy() for a in answers]
    assert all(a.state is None for a in answers)  # none mode: values only
    np.testing.assert_array_equal(before[0], ROWS.init_rows(keys[0]))
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((len(k), 3), dtype=np.float32) for k in keys]
    msgs = [_msg(k, g, fetch=k) for k, g in zip(keys, grads)]
    answers, report = server.apply(_plan(0, msgs), msgs)
    # the reference: 0 + c_0 + c_1 + c_2 per row, then the shared optimizer at stage 0's rate
    union = np.array([1, 3, 9, 11])
    total = sum_contributions(union, [(k, torch.from_numpy(g)) for k, g in zip(keys, grads)], 3)
    values = torch.from_numpy(ROWS.init_rows(union))
    state = shard.optimizer.initial_state(len(union))
    shard.optimizer.apply(values, state, total, 0.5 / 2)
    np.testing.assert_array_equal(answers[1].values, values.numpy()[[1, 2, 3]])
    assert report.rows_updated == 4 and report.rows_fetched == 7 and report.rows_digest != 0


def test_none_mode_gradients_must_be_for_rows_served():
    server, _ = _server()
    msgs = [_msg(fetch=[1, 3]), _msg(), _msg()]
    server.apply(_plan(-1, msgs), msgs)
    bad = [_msg([1, 5], np.ones((2, 3), np.float32)), _msg(), _msg()]
    with pytest.raises(PeerError, match="trainer 0 sent gradients for rows it was not served at stage -1"):
        server.apply(_plan(0, bad), bad)


def test_rows_outside_the_shard_are_refused():
    server, _ = _server()
    msgs = [_msg(fetch=[2]), _msg(), _msg()]  # key 2 lives on server 0 of 2
    with pytest.raises(PeerError, match="keys not held by server 1"):
        server.apply(_plan(-1, msgs), msgs)


def test_bagpipe_mode_checks_out_rows_and_takes_them_back():
    server, shard = _server(Mode.BAGPIPE, OptimizerKind.ROWWISE_ADAGRAD)
    msgs = [_msg(fetch=[1, 5]), _msg(fetch=[7]), _msg()]
    answers, _ = server.apply(_plan(-1, msgs), msgs)
    assert answers[0].state.shape == (2, 1) and np.all(answers[0].state == np.float32(0.1))
    assert shard.checked_out.sum() == 3
    stale = [_msg(), _msg(), _msg(fetch=[5])]
    with pytest.raises(PeerError, match="trainer 2 fetches rows already checked out"):
        server.apply(_plan(0, stale), stale)
    server, shard = _server(Mode.BAGPIPE, OptimizerKind.ROWWISE_ADAGRAD)
    server.apply(_plan(-1, msgs), msgs)
    new_values = np.full((1, 3), 4.0, np.float32)
    back = [_msg(), _msg(wb_keys=[7], wb_values=new_values, wb_state=np.full((1, 1), 2.0, np.float32)), _msg()]
    back[1].writeback_state = np.full((1, 1), 2.0, np.float32)
    server.apply(_plan(0, back), back)
    again = [_msg(fetch=[7]), _msg(), _msg()]
    answers, _ = server.apply(_plan(1, again), again)  # a write-back is seen by a fetch of the same stage
    np.testing.assert_array_equal(answers[0].values, new_values)
    np.testing.assert_array_equal(answers[0].state, [[2.0]])
    twice = [_msg(), _msg(wb_keys=[3], wb_values=new_values, wb_state=np.zeros((1, 1), np.float32)), _msg()]
    with pytest.raises(PeerError, match="write-back of rows not checked out to trainer 1"):
        server.apply(_plan(2, twice), twice)


def test_read_only_stages_check_nothing_out():
    server, shard = _server(Mode.BAGPIPE)
    msgs = [_msg(fetch=[1, 5]), _msg(fetch=[1]), _msg()]
    answers, _ = server.apply(_plan(10, msgs, read_only=True), msgs)
    assert shard.checked_out.sum() == 0 and answers[0].state is None


def test_reversed_contribution_order_changes_the_bits(monkeypatch):
    rng = np.random.default_rng(3)
    keys = [np.array([1, 3]), np.array([1, 3]), np.array([1, 3])]
    grads = [rng.standard_normal((2, 3), dtype=np.float32) * 10 ** k for k in range(3)]
    results = []
    for fault in ("", "reverse_contributions"):
        monkeypatch.setenv("BAGPIPE_FAULTS", fault)
        server, shard = _server(kind=OptimizerKind.SGD)
        msgs = [_msg(fetch=k) for k in keys]
        server.apply(_plan(-1, msgs), msgs)
        msgs = [_msg(k, g) for k, g in zip(keys, grads)]
        server.apply(_plan(0, msgs), msgs)
        results.append(shard.values.clone())
    assert not torch.equal(results[0], results[1])


def test_a_checkpoint_flush_updates_rows_that_stay_checked_out():
    server, shard = _server(Mode.BAGPIPE, OptimizerKind.ROWWISE_ADAGRAD)
    msgs = [_msg(fetch=[1, 5]), _msg(), _msg()]
    server.apply(_plan(-1, msgs), msgs)
    flushed = np.full((1, 3), 9.0, np.float32)
    flush = [_msg(flush_keys=[5], flush_values=flushed, flush_state=np.full((1, 1), 3.0, np.float32)), _msg(), _msg()]
    flush[0].flush_state = np.full((1, 1), 3.0, np.float32)
    _, report = server.apply(_plan(0, flush), flush)
    local = 5 // 2
    assert report.rows_flushed == 1 and shard.checked_out[local]
    assert torch.equal(shard.values[local], torch.tensor([9.0, 9.0, 9.0])) and shard.state[local].item() == 3.0
    stale = [_msg(), _msg(fetch=[5]), _msg()]
    with pytest.raises(PeerError, match="already checked out"):  # still cached: nobody else may fetch it
        server.apply(_plan(1, stale), stale)
    bad = [_msg(), _msg(flush_keys=[7], flush_state=np.zeros((1, 1), np.float32)), _msg()]
    bad[1].flush_state = np.zeros((1, 1), np.float32)
    with pytest.raises(PeerError, match="checkpoint flush of rows not checked out to trainer 1"):
        server.apply(_plan(2, bad), bad)
