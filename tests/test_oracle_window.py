"""Lookahead window: per-iteration reads and the incremental next-use index."""

from __future__ import annotations

import numpy as np
import pytest

from bagpipe.oracle.window import NO_USE, LookaheadWindow, sorted_unique


def brute_next_use(batches, i, h):
    """Next use of each key of U_i among iterations i+1 .. i+h (NO_USE if none)."""
    U = np.unique(batches[i])
    out = np.full(U.size, NO_USE, dtype=np.int64)
    for j in range(min(len(batches) - 1, i + h), i, -1):
        out[np.isin(U, batches[j])] = j
    return out


@pytest.mark.parametrize("T", [1, 2, 4])
def test_entries_and_next_use(T):
    rng = np.random.default_rng(T)
    total = 500
    batches = [rng.integers(0, total, size=(8, 3)) ** 1 for _ in range(40)]
    batches = [np.minimum(b, rng.integers(0, total, size=b.shape)) for b in batches]  # skewed
    h = 6
    win = LookaheadWindow(iter(batches), T, total)
    for i in range(len(batches)):
        win.ensure(i + h)
        e = win.entry(i)
        np.testing.assert_array_equal(e.keys, np.unique(batches[i]))
        per = 8 // T
        for k in range(T):
            np.testing.assert_array_equal(e.reads(k), np.unique(batches[i][k * per:(k + 1) * per]))
            assert (e.first_reader[e.read_pos[k]] >= 0).all()
        # the chosen reader really reads the key; readers counts
        for k in range(T):
            mine = e.keys[e.first_reader == k]
            assert np.isin(mine, e.reads(k)).all()
        counts = sum(np.isin(e.keys, e.reads(k)).astype(int) for k in range(T))
        np.testing.assert_array_equal(e.readers, counts)
        np.testing.assert_array_equal(win.next_use(i), brute_next_use(batches, i, h))
        win.release(i + 1)
    assert win.exhausted and win.length == len(batches)


def test_ring_growth_and_long_horizon():
    """Windows larger than the initial ring keep exact next uses."""
    rng = np.random.default_rng(0)
    total = 200_000
    batches = [rng.integers(0, total, size=(4096, 8)) for _ in range(12)]
    batches[9][:50, 0] = batches[0][:50, 0]  # known reuse 9 iterations later
    win = LookaheadWindow(iter(batches), 2, total)
    assert win.ensure(11)
    got = win.next_use(0)
    np.testing.assert_array_equal(got, brute_next_use(batches, 0, 11))
    e = win.entry(0)
    assert (got[np.isin(e.keys, batches[0][:50, 0])] <= 9).all()


def test_lazy_and_last():
    pulled = []

    def gen():
        for i in range(5):
            pulled.append(i)
            yield np.full((2, 1), i, dtype=np.int64)

    win = LookaheadWindow(gen(), 1, 10)
    assert win.ensure(1) and pulled == [0, 1]
    assert not win.is_last(1) and pulled == [0, 1, 2]
    assert win.is_last(4) and win.length == 5
    assert not win.ensure(5)
    with pytest.raises(KeyError):
        win.entry(7)


def test_input_checks():
    with pytest.raises(ValueError, match="split"):
        LookaheadWindow(iter([np.zeros((3, 2), np.int64)]), 2, 10).ensure(0)
    with pytest.raises(ValueError, match="out of range"):
        LookaheadWindow(iter([np.full((2, 2), -1, np.int64)]), 1, 10).ensure(0)
    with pytest.raises(ValueError, match="shape"):
        LookaheadWindow(iter([np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64)]), 1, 10).ensure(1)


def test_sorted_unique():
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 1000):
        x = rng.integers(-5, 50, size=n)
        np.testing.assert_array_equal(sorted_unique(x), np.unique(x))
