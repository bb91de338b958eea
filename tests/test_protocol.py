"""Trainer <-> server frames: layouts, round trips and header checks (no processes)."""

import numpy as np
import pytest
import torch

from bagpipe.errors import PeerError
from bagpipe.protocol import Answer, FrameLayout, StageMessage


def _stage(rng, layout, counts):
    n_grad, n_wb, n_flush, n_fetch = counts
    keys = lambda n: np.sort(rng.choice(layout.total_rows, n, replace=False)).astype(np.int64)  # noqa: E731
    rows = lambda n, w: rng.standard_normal((n, w), dtype=np.float32)  # noqa: E731
    d, s = layout.row_dim, layout.state_dim
    return StageMessage(keys(n_grad), rows(n_grad, d), keys(n_wb), rows(n_wb, d), rows(n_wb, s), keys(n_flush),
                        rows(n_flush, d), rows(n_flush, s), keys(n_fetch))


@pytest.mark.parametrize("total_rows", [10_000, 5_000_000_000])
@pytest.mark.parametrize("state_dim", [0, 1, 4])
def test_stage_and_answer_roundtrip(total_rows, state_dim):
    rng = np.random.default_rng(0)
    layout = FrameLayout(row_dim=4, state_dim=state_dim, total_rows=total_rows)
    assert layout.key_dtype == (np.int32 if total_rows < 2**31 else np.int64)
    for counts in [(0, 0, 0, 0), (3, 0, 0, 5), (0, 7, 1, 2), (2, 2, 2, 2)]:
        msg = _stage(rng, layout, counts)
        frame = layout.pack_stage(5, 1, msg)
        assert frame.numel() == layout.stage_bytes(counts)
        back = layout.unpack_stage(frame, 5, 1, counts, "test")
        for name in ("grad_keys", "grads", "writeback_keys", "writeback_values", "writeback_state", "flush_keys",
                     "flush_values", "flush_state", "fetch_keys"):
            np.testing.assert_array_equal(getattr(back, name), getattr(msg, name), err_msg=name)
        for with_state in (False, True):
            n = counts[3]
            answer = Answer(msg.fetch_keys, rng.standard_normal((n, 4), dtype=np.float32),
                            rng.standard_normal((n, state_dim), dtype=np.float32) if with_state else None)
            frame = layout.pack_answer(5, 0, answer)
            assert frame.numel() == layout.answer_bytes(n, with_state)
            got = layout.unpack_answer(frame, 5, 0, n, with_state, "test")
            np.testing.assert_array_equal(got.keys, answer.keys)
            np.testing.assert_array_equal(got.values, answer.values)
            assert (got.state is None) == (not with_state)
            if with_state:
                np.testing.assert_array_equal(got.state, answer.state)


def test_int32_keys_halve_the_key_bytes():
    small, large = FrameLayout(4, 0, 1000), FrameLayout(4, 0, 2**40)
    assert large.stage_bytes((0, 0, 0, 100)) - small.stage_bytes((0, 0, 0, 100)) == 400


@pytest.mark.parametrize("field,value", [("stage", 6), ("src", 2), ("counts", (2, 2, 2, 3))])
def test_header_mismatch_names_both_sides(field, value):
    rng = np.random.default_rng(1)
    layout = FrameLayout(4, 1, 10_000)
    frame = layout.pack_stage(5, 1, _stage(rng, layout, (2, 2, 2, 2)))
    expect = {"stage": 5, "src": 1, "counts": (2, 2, 2, 2)}
    expect[field] = value
    buf = torch.zeros(max(frame.numel(), layout.stage_bytes(expect["counts"])), dtype=torch.uint8)
    buf[: frame.numel()] = frame
    with pytest.raises(PeerError, match="sender and plan disagree"):
        layout.unpack_stage(buf, expect["stage"], expect["src"], expect["counts"], "server 0")


def test_an_answer_is_not_a_stage_message():
    layout = FrameLayout(4, 0, 100)
    frame = layout.pack_answer(3, 0, Answer(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), None))
    with pytest.raises(PeerError, match="unexpected message header"):
        layout.unpack_stage(frame, 3, 0, (0, 0, 0, 0), "server 0")
    frame[:8] = 0  # magic
    with pytest.raises(PeerError, match="magic bad"):
        layout.unpack_answer(frame, 3, 0, 0, False, "trainer 0")
