"""Per-rank reads: a trainer's reader yields exactly its slice of every global batch."""

import numpy as np
import pytest

from bagpipe.datasets.format import list_parts
from bagpipe.datasets.reader import BatchReader
from bagpipe.datasets.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("slices") / "ds"
    generate_synthetic(str(out), 3000, seed=4, tables=[50, 7, 900], rows_per_part=1100, eval_rows=300,
                       row_group_size=170, progress=False)
    return list_parts(str(out))[:-1]


@pytest.mark.parametrize("trainers", [1, 2, 3, 4])
@pytest.mark.parametrize("columns", ["all", "sparse"])
def test_rank_slices_equal_slices_of_full_batches(parts, trainers, columns):
    B = 240  # straddles row groups (170) and files (1100)
    for kwargs in ({}, {"shuffle_seed": 5, "start_batch": 2, "max_batches": 4}):
        full = list(BatchReader(parts, B, columns=columns, **kwargs))
        for k in range(trainers):
            mine = list(BatchReader(parts, B, columns=columns, slice_of=(k, trainers), **kwargs))
            assert [b.index for b in mine] == [b.index for b in full]
            for got, batch in zip(mine, full):
                want = batch.slice(k, trainers)
                assert got.sparse.flags.c_contiguous and got.dense.flags.c_contiguous
                assert np.array_equal(got.sparse, want.sparse)
                assert np.array_equal(got.dense, want.dense) and np.array_equal(got.labels, want.labels)


def test_bad_slice_arguments(parts):
    with pytest.raises(ValueError, match="does not split evenly"):
        BatchReader(parts, 100, slice_of=(0, 3))
    with pytest.raises(ValueError, match="out of range"):
        BatchReader(parts, 100, slice_of=(2, 2))
