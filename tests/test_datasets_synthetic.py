import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets import synthetic
from bagpipe.datasets.format import DatasetError, list_parts, read_meta
from bagpipe.datasets.reader import split_parts
from bagpipe.datasets.stats import dataset_stats
from bagpipe.datasets.synthetic import CRITEO_KAGGLE_TABLES, generate_synthetic, scaled_tables
from bagpipe.datasets.zipf import ZipfSampler
from bagpipe.metrics import auc

SMALL = [1000, 50, 7, 3, 2000, 1, 2, 300]


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def _read_all(path):
    return [pq.read_table(p) for p in list_parts(path)]


def test_scaled_tables_floor_and_default():
    assert scaled_tables(1.0) == list(CRITEO_KAGGLE_TABLES)
    small = scaled_tables(0.001)
    for n, s in zip(CRITEO_KAGGLE_TABLES, small):
        assert s >= min(n, 4)
    assert small[2] == round(10131227 * 0.001)
    assert small[8] == 3 and small[19] == 4 and small[16] == 4


def test_deterministic_bytes_and_seed_sensitive(tmp_path):
    kw = dict(tables=SMALL, eval_rows=700, rows_per_part=2000, row_group_size=1000)
    a = generate_synthetic(str(tmp_path / "a"), 5000, seed=7, **kw)
    b = generate_synthetic(str(tmp_path / "b"), 5000, seed=7, **kw)
    c = generate_synthetic(str(tmp_path / "c"), 5000, seed=8, **kw)
    fa, fb, fc = _files(a.out), _files(b.out), _files(c.out)
    assert list(fa) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert fa == fb
    assert all(fa[k] != fc[k] for k in fa)
    # the stream does not depend on the thread count
    d = generate_synthetic(str(tmp_path / "d"), 5000, seed=7, threads=1, **kw)
    assert _files(d.out) == fa


def test_parts_layout_eval_last_and_meta(tmp_path):
    r = generate_synthetic(str(tmp_path / "ds"), 5000, seed=1, tables=SMALL, rows_per_part=2000, eval_rows=900)
    parts = list_parts(r.out)
    rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    assert rows == [2000, 2000, 1000, 900]
    train, ev = split_parts(r.out)
    assert ev == parts[-1:] and train == parts[:-1]
    meta = read_meta(r.out)
    assert meta.source == "synthetic"
    assert meta.cardinalities == SMALL
    assert meta.num_dense == 13 and meta.num_tables == len(SMALL)
    pre = meta.preprocessing
    for key in ("zipf", "table_scale", "seed", "click_rate_target", "true_auc", "bias", "missing_prob"):
        assert key in pre
    assert pre["seed"] == 1 and pre["zipf"] == 1.05 and pre["click_rate_target"] == 0.256
    assert 0.6 < pre["true_auc"] < 0.95
    # default eval rows: 10% of rows; eval_rows=0 gives no eval part
    r2 = generate_synthetic(str(tmp_path / "ds2"), 3000, seed=1, tables=SMALL)
    assert r2.eval_rows == 300 and len(list_parts(r2.out)) == 2
    r3 = generate_synthetic(str(tmp_path / "ds3"), 3000, seed=1, tables=SMALL, eval_rows=0)
    assert len(list_parts(r3.out)) == 1 and split_parts(r3.out)[1] == []


def test_click_rate_ids_and_dense(tmp_path):
    r = generate_synthetic(str(tmp_path / "ds"), 20000, seed=3, tables=SMALL, eval_rows=0)
    t = pq.read_table(list_parts(r.out)[0])
    labels = t.column("label").to_numpy()
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert abs(labels.mean() - 0.256) < 0.02
    assert abs(r.click_rate - labels.mean()) < 1e-9
    for name, n in zip([f"C{i + 1}" for i in range(len(SMALL))], SMALL):
        ids = t.column(name).to_numpy()
        assert ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < n
    assert (t.column("C6").to_numpy() == 0).all()  # cardinality 1: only the missing id
    assert (t.column("C1").to_numpy() == 0).any()  # the missing id exists
    for j in range(13):
        d = t.column(f"I{j + 1}").to_numpy()
        assert d.dtype == np.float32 and d.min() >= 0.0 and np.isfinite(d).all()
    assert (t.column("I1").to_numpy() == 0).mean() > 0.0


def test_skew_of_large_table(tmp_path):
    r = generate_synthetic(str(tmp_path / "ds"), 20000, seed=5, tables=[100000, 10], eval_rows=0)
    st = dataset_stats(r.out)
    big = st["tables"][0]
    # top 1% of ranks of a Zipf(1.05) over 100k ids hold ~69% of the mass (plus the missing id)
    assert big["hot_share"] > 0.6
    assert st["hot_share_overall"] > 0.6


def test_labels_are_learnable_from_effects(tmp_path):
    """The true logit's AUC is far above chance, and per-id click-rate tables
    learned on the training part predict the held-out labels (below the true AUC)."""
    tables = [50] * 8
    r = generate_synthetic(str(tmp_path / "ds"), 40000, seed=11, tables=tables, eval_rows=10000)
    train, ev = split_parts(r.out)
    tr = pq.read_table(train[0])
    te = pq.read_table(ev[0])
    y = tr.column("label").to_numpy()
    score = np.zeros(te.num_rows)
    for t in range(len(tables)):
        ids = tr.column(f"C{t + 1}").to_numpy()
        rate = (np.bincount(ids, weights=y, minlength=50) + 1) / (np.bincount(ids, minlength=50) + 4)
        score += np.log(rate / (1 - rate))[te.column(f"C{t + 1}").to_numpy()]
    learned = auc(te.column("label").to_numpy(), score)
    assert 0.6 < learned < r.true_auc
    assert r.true_auc > 0.7


def test_no_temp_leftovers_and_interrupted_run(tmp_path, monkeypatch):
    r = generate_synthetic(str(tmp_path / "ok"), 3000, seed=1, tables=SMALL, rows_per_part=1000)
    assert not [n for n in os.listdir(r.out) if "tmp" in n]
    assert sorted(os.listdir(tmp_path)) == ["ok"]

    real = synthetic._Model.chunk
    seen_tmp = []

    def failing(self, entropy, n):
        if list(entropy) == [1, 2]:  # the third chunk: two parts are already written
            seen_tmp.extend(d for d in os.listdir(tmp_path) if ".tmp-" in d)
            raise RuntimeError("boom")
        return real(self, entropy, n)

    monkeypatch.setattr(synthetic, "TRUE_AUC_ROWS", 1000)
    monkeypatch.setattr(synthetic._Model, "chunk", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate_synthetic(str(tmp_path / "bad"), 300000, seed=1, tables=SMALL, rows_per_part=100000, threads=1)
    assert seen_tmp and seen_tmp[0].startswith(".bad.tmp-")
    assert sorted(os.listdir(tmp_path)) == ["ok"]


def test_existing_output_refused(tmp_path):
    out = tmp_path / "ds"
    generate_synthetic(str(out), 1000, seed=1, tables=SMALL)
    with pytest.raises(DatasetError, match="already exists"):
        generate_synthetic(str(out), 1000, seed=2, tables=SMALL)
    r = generate_synthetic(str(out), 1000, seed=2, tables=SMALL, overwrite=True)
    assert read_meta(r.out).preprocessing["seed"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_synthetic(str(empty), 1000, seed=2, tables=SMALL)
    assert len(list_parts(str(empty))) == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(DatasetError):
        generate_synthetic(str(tmp_path / "x"), 0, tables=SMALL)
    with pytest.raises(DatasetError):
        generate_synthetic(str(tmp_path / "x"), 10, tables=SMALL, table_scale=0.5)
    with pytest.raises(DatasetError):
        generate_synthetic(str(tmp_path / "x"), 10, tables=[0, 3])
    with pytest.raises(DatasetError):
        generate_synthetic(str(tmp_path / "x"), 10, tables=SMALL, format="csv")
    assert not os.path.exists(tmp_path / "x")


def test_zipf_sampler_matches_searchsorted():
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 1023, 1024, 5000, 200000):
        for a in (0.6, 1.05, 1.8):
            s = ZipfSampler(m, a)
            u = rng.random(50000)
            u[:3] = [0.0, np.nextafter(1.0, 0.0), s.cdf[0]]
            ref = np.minimum(np.searchsorted(s.cdf, u, side="right"), m - 1)
            assert np.array_equal(s.ranks(u), ref)


def test_table_key_is_pinned():
    """Generated datasets must not change with the hash code's home: these keys were
    computed by the generator's own splitmix64 before it used `bagpipe.hashing`."""
    assert synthetic.table_key(0, 0, 1) == 15204172177749531820
    assert synthetic.table_key(3, 25, 3) == 15695764592413435254
    assert synthetic.table_key(2**64 - 1, 7, 2) == 5888844666613448412


def test_hash_functions_pure_and_bijective():
    ids = np.arange(100000, dtype=np.int64)
    a = synthetic.hashed_normal(123, ids)
    assert np.array_equal(a, synthetic.hashed_normal(123, ids))
    assert not np.array_equal(a, synthetic.hashed_normal(124, ids))
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02
    # effects do not depend on which other ids are in the batch
    assert np.array_equal(synthetic.hashed_normal(123, ids[5000:5010]), a[5000:5010])
    hexv = synthetic.criteo_hex_value(3, 2, ids[1:])
    assert len(np.unique(hexv)) == len(ids) - 1


def test_criteo_tsv_output(tmp_path):
    r = generate_synthetic(str(tmp_path / "tsv"), 3000, seed=4, tables=SMALL, rows_per_part=2000,
                           format="criteo-tsv", num_dense=13)
    names = sorted(os.listdir(r.out))
    assert names == ["day_0.txt", "day_1.txt", "day_2.txt", "synthetic.json"]
    info = json.load(open(os.path.join(r.out, "synthetic.json")))
    assert info["cardinalities"] == SMALL and info["files"] == names[:3]
    lines = open(os.path.join(r.out, "day_0.txt"), "rb").read().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2001
    fields = lines[0].split(b"\t")
    assert len(fields) == 1 + 13 + len(SMALL)
    assert fields[0] in (b"0", b"1")
    hexes = [f for line in lines[:200] for f in line.split(b"\t")[14:] if f]
    assert hexes and all(len(h) == 8 and h == h.lower() and int(h, 16) >= 0 for h in hexes)
    dense = [f for line in lines[:2000] for f in line.split(b"\t")[1:14]]
    assert b"" in dense and any(f.startswith(b"-") for f in dense)
    # table 6 has cardinality 1: always missing
    assert all(line.split(b"\t")[14 + 5] == b"" for line in lines[:-1])


def test_true_auc_metric_matches_pairwise():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=300), 1)  # many ties
    y = rng.random(300) < 0.3
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auc(y, s) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert np.isnan(auc(np.zeros(300), s))
