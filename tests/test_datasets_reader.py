import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets.format import DatasetError, DatasetMeta, list_parts, read_meta
from bagpipe.datasets.reader import Batch, BatchReader, check_compatible, num_batches, split_parts
from bagpipe.datasets.synthetic import generate_synthetic
from bagpipe.datasets.writer import DatasetWriter

TABLES = [100, 7, 1, 3000]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "ds"
    # parts of 1700, 1700, 600 train rows + 450 eval rows; row groups of 500
    generate_synthetic(str(out), 4000, seed=2, tables=TABLES, rows_per_part=1700, eval_rows=450,
                       row_group_size=500)
    return str(out)


def concat(parts):
    tabs = [pq.read_table(p) for p in parts]
    meta = read_meta(parts[0])
    labels = np.concatenate([t.column("label").to_numpy() for t in tabs])
    dense = np.stack([np.concatenate([t.column(n).to_numpy() for t in tabs]) for n in meta.dense_features], 1)
    sparse = np.stack([np.concatenate([t.column(n).to_numpy() for t in tabs]) for n in meta.sparse_features])
    return labels, dense, sparse


def test_batches_equal_concatenated_rows(dataset):
    parts = list_parts(dataset)
    assert len(parts) == 4
    labels, dense, sparse = concat(parts)
    B = 384  # straddles row groups and files; 4450 % 384 != 0
    r = BatchReader(parts, B)
    assert len(r) == num_batches(parts, B) == 4450 // B
    got = list(r)
    assert [b.index for b in got] == list(range(len(got)))
    for b in got:
        lo = b.index * B
        assert b.dense.dtype == np.float32 and b.dense.shape == (B, 13) and b.dense.flags.c_contiguous
        assert b.labels.dtype == np.float32 and b.labels.shape == (B,)
        assert b.sparse.dtype == np.int64 and b.sparse.shape == (4, B) and b.sparse.flags.c_contiguous
        assert np.array_equal(b.labels, labels[lo : lo + B])
        assert np.array_equal(b.dense, dense[lo : lo + B])
        assert np.array_equal(b.sparse, sparse[:, lo : lo + B])
    # batches are fresh arrays, safe to keep
    assert not np.shares_memory(got[0].sparse, got[1].sparse)


def test_slices_concatenate_to_batch(dataset):
    b = next(iter(BatchReader(list_parts(dataset), 300)))
    for T in (1, 2, 3, 4):
        slices = [b.slice(k, T) for k in range(T)]
        assert all(s.sparse.flags.c_contiguous and s.index == b.index for s in slices)
        assert np.array_equal(np.concatenate([s.sparse for s in slices], axis=1), b.sparse)
        assert np.array_equal(np.concatenate([s.dense for s in slices]), b.dense)
        assert np.array_equal(np.concatenate([s.labels for s in slices]), b.labels)
    with pytest.raises(ValueError, match="does not split evenly"):
        b.slice(0, 7)
    with pytest.raises(ValueError):
        b.slice(3, 3)


def test_start_batch_and_max_batches(dataset):
    parts = list_parts(dataset)
    full = list(BatchReader(parts, 256))
    for start in (0, 1, 6, 7, len(full) - 1, len(full)):
        got = list(BatchReader(parts, 256, start_batch=start))
        assert [b.index for b in got] == list(range(start, len(full)))
        for a, b in zip(got, full[start:]):
            assert np.array_equal(a.sparse, b.sparse) and np.array_equal(a.dense, b.dense)
    got = list(BatchReader(parts, 256, start_batch=3, max_batches=2))
    assert [b.index for b in got] == [3, 4]
    assert np.array_equal(got[1].labels, full[4].labels)
    assert list(BatchReader(parts, 10**6)) == []


def test_shuffle_is_deterministic_permutation_of_units(dataset):
    parts = list_parts(dataset)
    B = 50  # divides every row group of 500 and the 450-row part
    plain = np.concatenate([b.sparse for b in BatchReader(parts, B)], axis=1)
    a = [b.sparse for b in BatchReader(parts, B, shuffle_seed=1)]
    b = [b.sparse for b in BatchReader(parts, B, shuffle_seed=1)]
    c = [b.sparse for b in BatchReader(parts, B, shuffle_seed=2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    a, c = np.concatenate(a, axis=1), np.concatenate(c, axis=1)
    assert not np.array_equal(a, plain) and not np.array_equal(a, c)
    key = lambda m: sorted(map(tuple, m.T.tolist()))  # noqa: E731
    assert key(a) == key(plain) == key(c)
    # start_batch works in shuffled order too
    skipped = list(BatchReader(parts, B, shuffle_seed=1, start_batch=13))
    assert np.array_equal(skipped[0].sparse, a[:, 13 * B : 14 * B])


def test_sparse_columns_only(dataset):
    parts = list_parts(dataset)
    full = list(BatchReader(parts, 512))
    sp = list(BatchReader(parts, 512, columns="sparse"))
    assert len(sp) == len(full)
    for x, y in zip(sp, full):
        assert np.array_equal(x.sparse, y.sparse)
        assert x.labels.shape == (0,) and x.dense.shape == (0, 13)
    s = sp[0].slice(1, 2)
    assert s.sparse.shape == (4, 256) and s.labels.shape == (0,)


def test_split_parts(dataset, tmp_path):
    parts = list_parts(dataset)
    assert split_parts(dataset) == (parts[:-1], parts[-1:])
    assert split_parts(dataset, eval_path=parts[0]) == (parts, parts[:1])
    assert split_parts(dataset, eval_path=dataset) == (parts, parts)
    assert split_parts(parts[1]) == ([parts[1]], [])
    with pytest.raises(DatasetError, match="dataset does not exist"):
        split_parts(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no part-"):
        split_parts(str(tmp_path / "empty"))


def _write_dataset(out, cards, sparse, num_dense=0, names=None):
    meta = DatasetMeta([f"I{j + 1}" for j in range(num_dense)], names or [f"C{t + 1}" for t in range(len(cards))],
                       list(cards), "test")
    n = sparse.shape[1]
    with DatasetWriter(out, row_group_size=64) as w:
        p = w.open_part(0, meta)
        p.write(np.zeros(n, np.float32), np.zeros((n, num_dense), np.float32), sparse)
    return list_parts(out)


def test_id_out_of_range_names_file_column_value(tmp_path):
    sparse = np.zeros((2, 200), np.int64)
    sparse[1, 150] = 9
    parts = _write_dataset(str(tmp_path / "d"), [5, 9], sparse)
    r = BatchReader(parts, 100)
    it = iter(r)
    next(it)
    with pytest.raises(DatasetError) as err:
        next(it)
    msg = str(err.value)
    assert "part-00000.parquet" in msg and "'C2'" in msg and "id 9" in msg and "[0, 9)" in msg
    assert "row 150" in msg
    sparse[1, 150] = -1
    parts = _write_dataset(str(tmp_path / "e"), [5, 9], sparse)
    with pytest.raises(DatasetError, match="id -1"):
        list(BatchReader(parts, 100))
    assert len(list(BatchReader(parts, 100, check_ids=False))) == 2


def test_mismatched_parts_refused(tmp_path):
    a = _write_dataset(str(tmp_path / "a"), [5, 9], np.zeros((2, 10), np.int64))
    b = _write_dataset(str(tmp_path / "b"), [5, 10], np.zeros((2, 10), np.int64))
    with pytest.raises(DatasetError, match="differ"):
        BatchReader(a + b, 4)


def test_check_compatible_messages(dataset):
    meta = read_meta(dataset)
    check_compatible(meta, 13, TABLES, "train data")
    with pytest.raises(DatasetError, match=r"train data: .*13 dense features, the model expects 12"):
        check_compatible(meta, 12, TABLES, "train data")
    with pytest.raises(DatasetError, match=r"4 tables, the model expects 3"):
        check_compatible(meta, 13, TABLES[:3], "x")
    with pytest.raises(DatasetError, match=r"C2: dataset 7, model 8"):
        check_compatible(meta, 13, [100, 8, 1, 3000], "x")


def test_batch_slice_of_plain_batch():
    b = Batch(index=5, dense=np.arange(12, dtype=np.float32).reshape(6, 2),
              labels=np.arange(6, dtype=np.float32), sparse=np.arange(18).reshape(3, 6))
    s = b.slice(2, 3)
    assert s.index == 5 and s.labels.tolist() == [4, 5] and s.sparse.tolist() == [[4, 5], [10, 11], [16, 17]]
    assert s.dense.tolist() == [[8, 9], [10, 11]]
    assert os.path.basename(__file__).startswith("test_datasets_")
