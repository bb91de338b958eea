"""Row initialisation, digests, the working-set lookup and contribution order."""

import numpy as np
import pytest
import torch

from bagpipe.embedding import slice_keys, sum_contributions, union_of, unique_with_inverse
from bagpipe.digest import bytes_digest, rows_digest
from bagpipe.rows import RowSpace
from bagpipe.trainers.reduction import ordered_sum


def test_row_init_independent_of_which_rows_are_asked():
    rows = RowSpace((100, 7, 3000), 6, seed=3)
    all_rows = rows.init_rows(np.arange(rows.total_rows))
    pick = np.array([5, 106, 2000, 0])
    assert np.array_equal(rows.init_rows(pick), all_rows[pick])
    bound = 1 / np.sqrt(7)
    assert np.all(np.abs(all_rows[100:107]) <= bound)
    assert not np.array_equal(RowSpace((100, 7, 3000), 6, seed=4).init_rows(pick), rows.init_rows(pick))


def test_rows_digest_is_a_sum_over_any_partition():
    rows = RowSpace((50, 50), 4, seed=0)
    keys = np.arange(100)
    values = rows.init_rows(keys)
    state = np.abs(values[:, :1])
    whole = rows_digest(keys, values, state)
    parts = (rows_digest(keys[::2], values[::2], state[::2]) + rows_digest(keys[1::2], values[1::2], state[1::2]))
    assert whole == parts % (1 << 64)
    flipped = values.copy()
    flipped[3, 2] = -flipped[3, 2]
    assert rows_digest(keys, flipped, state) != whole
    zero = values.copy()
    zero[0, 0] = 0.0
    neg_zero = values.copy()
    neg_zero[0, 0] = -0.0
    assert rows_digest(keys, zero) != rows_digest(keys, neg_zero)  # bits, not values
    state_only = state.copy()
    state_only[7, 0] = np.nextafter(state_only[7, 0], np.float32(1))  # one ulp of one row's optimizer state
    assert rows_digest(keys, values, state_only) != whole
    moved = keys.copy()
    moved[[4, 5]] = moved[[5, 4]]  # the same values under swapped keys
    assert rows_digest(moved, values, state) != whole


def test_bytes_digest_is_order_sensitive():
    a, b = np.arange(5, dtype=np.float32), np.arange(5, dtype=np.float32)[::-1].copy()
    assert bytes_digest(a) != bytes_digest(b)
    assert bytes_digest(a, b) != bytes_digest(b, a)


def test_slice_keys_inverse_reconstructs():
    keys_bt = np.array([[5, 9], [3, 9], [5, 12]])
    sk = slice_keys(keys_bt)
    assert list(sk.keys) == [3, 5, 9, 12]
    assert np.array_equal(sk.keys[sk.inverse.numpy()], keys_bt)


@pytest.mark.parametrize("bound,n", [(50, 4000), (5000, 26000), (10_000, 400), (1 << 40, 300), (7, 0)])
def test_unique_with_inverse_is_np_unique(bound, n):
    """The marking path (a small key space) and the sorting one give np.unique's arrays."""
    rng = np.random.default_rng(bound + n)
    ids = (rng.zipf(1.2, n) % bound).astype(np.int64)
    expected_keys, expected_inverse = np.unique(ids, return_inverse=True)
    keys, inverse = unique_with_inverse(ids, bound)
    assert keys.dtype == ids.dtype and np.array_equal(keys, expected_keys)
    assert np.array_equal(inverse, expected_inverse.ravel())


def test_unique_with_inverse_outside_the_bound_sorts():
    ids = np.array([3, -1, 3, 9])
    for bound in (4, 10):  # an id at or past the bound, a negative id: never a wrapped mark
        keys, inverse = unique_with_inverse(ids, bound)
        assert list(keys) == [-1, 3, 9] and list(keys[inverse]) == list(ids)


def test_sum_contributions_starts_from_zero_in_rank_order():
    union = union_of([np.array([1, 4]), np.array([4, 8])])
    c1 = torch.tensor([[-0.0], [1.0]])
    c2 = torch.tensor([[3.0], [2.0]])
    total = sum_contributions(union, [(np.array([1, 4]), c1), (np.array([4, 8]), c2)], 1)
    assert list(union) == [1, 4, 8]
    assert torch.equal(total, torch.tensor([[0.0], [4.0], [2.0]]))
    # a single reader's -0.0 becomes +0.0: 0 + c, never "take c"
    assert not torch.signbit(total[0, 0])


def test_ordered_sum_order_matters_for_floats():
    parts = [torch.tensor([1.0]), torch.tensor([1e8]), torch.tensor([-1e8])]
    assert not torch.equal(ordered_sum(parts), ordered_sum(parts[::-1]))


def test_read_ahead_keeps_order_and_raises_errors_in_place():
    """A trainer's slices are read ahead on a thread: the same items in the same
    order, and a reader's error reaches the consumer at the item that failed."""
    from bagpipe.trainers.common import ReadAhead

    assert list(ReadAhead(range(50), lambda x: x * x, depth=3)) == [x * x for x in range(50)]

    def broken():
        yield 1
        yield 2
        raise ValueError("part-00001.parquet: row group 3: bad id")

    ahead = ReadAhead(broken())
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(ValueError, match="row group 3"):
        next(ahead)
    done = ReadAhead([])
    assert next(done, None) is None and next(done, None) is None


def test_an_iteration_takes_the_slowest_trainers_clock_and_the_compute_spread():
    from bagpipe.oracle.process import TIME_FIELDS, iteration_timings

    def report(compute, total):
        return {**dict.fromkeys(TIME_FIELDS, 0.001), "time_compute": compute, "time_iter": total}

    out = iteration_timings([report(0.085, 0.100), report(0.070, 0.102), report(0.060, 0.099)])
    assert out["time_iter"] == 0.102 and out["time_compute"] == 0.070  # the slowest trainer's split
    assert out["time_compute_spread"] == 0.025  # every trainer's compute, not the slowest's against the rest
    assert iteration_timings([report(0.07, 0.1)])["time_compute_spread"] == 0
