"""The synthetic generator's multi-hot output and table presets."""

import argparse
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets import cli
from bagpipe.datasets.format import DatasetError, list_parts, read_meta
from bagpipe.datasets.jagged import Bags
from bagpipe.datasets.reader import BatchReader, split_parts
from bagpipe.datasets.synthetic import (CRITEO_TERABYTE_TABLES, MLPERF_BAG_SIZES, bag_sizes, generate_synthetic,
                                        scaled_tables, table_cardinalities)
from bagpipe.metrics import auc

SMALL = [1000, 50, 7, 3, 2000, 1, 2, 300]


def _bags(out, part=0):
    t = pq.read_table(list_parts(out)[part])
    meta = read_meta(out)
    return t, {name: Bags.from_arrow(t.column(name)) for name in meta.multi_hot}


def _has_repeats(bags: Bags) -> bool:
    owner = np.repeat(np.arange(bags.examples), bags.lengths())
    key = owner * (int(bags.values.max(initial=0)) + 1) + bags.values
    return bool((np.diff(np.sort(key)) == 0).any())


def test_bag_sizes_parse():
    assert bag_sizes("mlperf", 26) == [float(v) for v in MLPERF_BAG_SIZES]
    assert MLPERF_BAG_SIZES == (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
    assert bag_sizes("MLPerf", 26)[20] == 100.0
    assert bag_sizes("2.5", 3) == [2.5, 2.5, 2.5]
    assert bag_sizes([1, 2], 2) == [1.0, 2.0]
    with pytest.raises(DatasetError, match="3 multi-hot bag sizes for 2 tables"):
        bag_sizes("1,2,3", 2)
    with pytest.raises(DatasetError, match="positive"):
        bag_sizes("1,0", 2)
    with pytest.raises(DatasetError, match="'mlperf' or comma-separated numbers"):
        bag_sizes("big", 2)
    with pytest.raises(DatasetError, match="26 multi-hot bag sizes for 8 tables"):
        generate_synthetic("/nonexistent/never", 100, tables=SMALL, multi_hot="mlperf")


def test_criteo_terabyte_tables(tmp_path):
    assert table_cardinalities("criteo-terabyte", 1.0) == (list(CRITEO_TERABYTE_TABLES), "criteo-terabyte")
    assert len(CRITEO_TERABYTE_TABLES) == 26 and max(CRITEO_TERABYTE_TABLES) <= 40_000_000
    small, _ = table_cardinalities("criteo-terabyte", 0.001)
    assert small == scaled_tables(0.001, CRITEO_TERABYTE_TABLES)
    assert small[0] == round(39884406 * 0.001) and small[5] == 3 and small[12] == 4 and small[16] == 4
    assert table_cardinalities(None, 0.5)[0] == table_cardinalities("kaggle", 0.5)[0]
    with pytest.raises(DatasetError, match="kaggle, criteo-terabyte"):
        table_cardinalities("avazu", 1.0)
    r = generate_synthetic(str(tmp_path / "tb"), 2000, tables="criteo-terabyte", table_scale=0.0001, progress=False)
    meta = read_meta(r.out)
    assert meta.cardinalities == scaled_tables(0.0001, CRITEO_TERABYTE_TABLES)
    assert meta.preprocessing["table_preset"] == "criteo-terabyte" and meta.multi_hot == []


def test_fixed_bag_lengths_and_layout(tmp_path):
    sizes = [3, 1, 2.4, 2, 5, 1, 1, 6]
    r = generate_synthetic(str(tmp_path / "fx"), 3000, seed=2, tables=SMALL, multi_hot=sizes, bag_lengths="fixed",
                           pooling="mean", progress=False)
    meta = read_meta(r.out)
    assert meta.multi_hot == meta.sparse_features
    assert [t.pooling for t in meta.tables] == ["mean"] * len(SMALL)
    assert meta.preprocessing["multi_hot"]["bag_lengths"] == "fixed"
    t, bags = _bags(r.out)
    assert t.schema.field("C1").type == pa.list_(pa.int64())
    for name, size, card in zip(meta.sparse_features, sizes, SMALL):
        assert (bags[name].lengths() == max(1, int(np.floor(size + 0.5)))).all(), name
        assert bags[name].values.min() >= 0 and bags[name].values.max() < card
    assert (bags["C6"].values == 0).all()  # cardinality 1: the missing id only
    # the reader hands out the same bags
    batch = next(iter(BatchReader(list_parts(r.out)[:1], 500)))
    assert sorted(batch.bags) == list(range(len(SMALL)))
    assert batch.bags[0].to_lists() == bags["C1"].slice(0, 500).to_lists()


def test_poisson_bag_lengths(tmp_path):
    r = generate_synthetic(str(tmp_path / "po"), 20000, seed=3, tables=[5000, 400], multi_hot="1,8", eval_rows=0,
                           progress=False)
    _, bags = _bags(r.out)
    one, eight = bags["C1"].lengths(), bags["C2"].lengths()
    assert abs(one.mean() - 1) < 0.05 and abs(one.var() - 1) < 0.1
    assert abs(eight.mean() - 8) < 0.15 and abs(eight.var() - 8) < 0.6
    assert abs((one == 0).mean() - np.exp(-1)) < 0.02  # empty bags occur
    assert _has_repeats(bags["C2"])  # a hot id repeats in a bag unless asked otherwise
    assert abs(r.ids_per_row - 9) < 0.2 and "ids per row" in r.summary()


def test_distinct_in_bag(tmp_path):
    r = generate_synthetic(str(tmp_path / "di"), 6000, seed=4, tables=[20000, 300, 3], multi_hot="6,20,5",
                           bag_lengths="fixed", distinct_in_bag=True, eval_rows=0, progress=False)
    _, bags = _bags(r.out)
    for b in bags.values():
        assert not _has_repeats(b)
    assert (bags["C1"].lengths() == 6).all()  # a large table finds distinct ids
    assert bags["C2"].lengths().mean() > 19.5  # hot ids of a small one are redrawn, rarely dropped
    assert (bags["C3"].lengths() <= 3).all()  # capped at the cardinality
    again = generate_synthetic(str(tmp_path / "di2"), 6000, seed=4, tables=[20000, 300, 3], multi_hot="6,20,5",
                               bag_lengths="fixed", distinct_in_bag=True, eval_rows=0, progress=False, threads=1)
    assert open(list_parts(r.out)[0], "rb").read() == open(list_parts(again.out)[0], "rb").read()


def test_multi_hot_label_is_learnable(tmp_path):
    """The true logit ranks the labels well, and per-id click rates learned on the
    training part, averaged over each bag, predict the held-out labels."""
    tables = [60] * 8
    r = generate_synthetic(str(tmp_path / "ds"), 30000, seed=12, tables=tables, multi_hot="2,1,3,2,1,4,1,1",
                           eval_rows=10000, progress=False)
    assert r.true_auc > 0.7
    train, ev = split_parts(r.out)
    tr, te = pq.read_table(train[0]), pq.read_table(ev[0])
    y = tr.column("label").to_numpy()
    base = np.log(y.mean() / (1 - y.mean()))
    score = np.zeros(te.num_rows)
    for t in range(len(tables)):
        b = Bags.from_arrow(tr.column(f"C{t + 1}"))
        row_label = np.repeat(y, b.lengths())
        rate = (np.bincount(b.values, weights=row_label, minlength=60) + 1) / (np.bincount(b.values, minlength=60) + 4)
        lift = np.log(rate / (1 - rate)) - base  # an empty bag (score 0) is neutral
        e = Bags.from_arrow(te.column(f"C{t + 1}"))
        owner = np.repeat(np.arange(e.examples), e.lengths())
        score += np.bincount(owner, weights=lift[e.values], minlength=e.examples) / np.maximum(e.lengths(), 1)
    learned = auc(te.column("label").to_numpy(), score)
    assert 0.56 < learned < r.true_auc


def test_one_hot_output_unchanged(tmp_path):
    """Without multi_hot the generator writes exactly the rows it always wrote (digest of
    every column of every part, taken before multi-hot support existed)."""
    r = generate_synthetic(str(tmp_path / "b"), 20000, seed=0, tables=SMALL, progress=False)
    h = hashlib.sha256()
    for part in list_parts(r.out):
        t = pq.read_table(part)
        assert not any(pa.types.is_list(f.type) for f in t.schema)
        for name in t.column_names:
            h.update(name.encode())
            h.update(np.ascontiguousarray(t.column(name).to_numpy()).tobytes())
    assert h.hexdigest() == "e40c779314b2a370014269f905575a8fe3f1892c2edb257f0f38a8fc8d3f19bc"
    info = read_meta(r.out).preprocessing
    assert "multi_hot" not in info and "table_preset" not in info and info["chunk_rows"] == 131072


def test_refusals(tmp_path):
    with pytest.raises(DatasetError, match="one-hot only"):
        generate_synthetic(str(tmp_path / "tsv"), 100, tables=SMALL, multi_hot="2", format="criteo-tsv")
    with pytest.raises(DatasetError, match="bag_lengths must be one of fixed, poisson"):
        generate_synthetic(str(tmp_path / "x"), 100, tables=SMALL, multi_hot="2", bag_lengths="uniform")
    with pytest.raises(DatasetError, match="pooling must be one of sum, mean"):
        generate_synthetic(str(tmp_path / "x"), 100, tables=SMALL, pooling="max")
    assert not os.listdir(tmp_path)


def _run(argv):
    parser = argparse.ArgumentParser(prog="bagpipe")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_multi_hot(tmp_path, capsys):
    out = str(tmp_path / "mh")
    assert _run(["prepare", "synthetic", "--multi-hot", "2", "--rows", "2000", "--table-scale", "0.0001",
                 "--tables", "criteo-terabyte", "--bag-lengths", "fixed", "--distinct-in-bag", "--pooling", "mean",
                 "--out", out, "--no-progress"]) == 0
    assert "multi-hot:" in capsys.readouterr().out
    meta = read_meta(out)
    assert len(meta.multi_hot) == 26 and meta.tables[0].pooling == "mean"
    assert meta.cardinalities == scaled_tables(0.0001, CRITEO_TERABYTE_TABLES)
    assert _run(["prepare", "synthetic", "--multi-hot", "2", "--rows", "100", "--format", "criteo-tsv",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "error: format 'criteo-tsv' is one-hot only" in capsys.readouterr().err
    assert _run(["prepare", "synthetic", "--tables", "5,6", "--table-scale", "0.5", "--rows", "100",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "not both" in capsys.readouterr().err
