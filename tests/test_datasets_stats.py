import math

import numpy as np
import pytest

from bagpipe.datasets.format import DatasetMeta
from bagpipe.datasets.stats import _pooled_hot_share, dataset_stats, format_stats, hot_share
from bagpipe.datasets.writer import DatasetWriter


def make(out, parts):
    meta = DatasetMeta(["I1", "I2"], ["C1", "C2"], [200, 3], "test")
    with DatasetWriter(out, row_group_size=7) as w:
        for i, (labels, dense, sparse) in enumerate(parts):
            p = w.open_part(i, meta)
            p.write(np.asarray(labels, np.float32), np.asarray(dense, np.float32), np.asarray(sparse, np.int64))
    return out


def test_stats_small_dataset(tmp_path):
    ids = np.array([5] * 40 + [6] * 10 + list(range(100, 150)))  # 100 accesses
    small = np.array([0, 1, 2, 1] * 25)
    labels = np.array([1, 0, 0, 0] * 25)
    dense = np.stack([np.full(100, 2.0), np.arange(100)], 1)
    out = make(str(tmp_path / "ds"), [(labels[:60], dense[:60], np.stack([ids, small])[:, :60]),
                                      (labels[60:], dense[60:], np.stack([ids, small])[:, 60:])])
    st = dataset_stats(out)
    assert st["rows"] == 100 and st["parts"] == 2 and st["part_rows"] == [60, 40] and st["eval_rows"] == 40
    assert st["click_rate"] == pytest.approx(0.25)
    assert st["dense_means"] == {"I1": pytest.approx(2.0), "I2": pytest.approx(49.5)}
    c1, c2 = st["tables"]
    assert c1["cardinality"] == 200 and c1["distinct"] == 52
    assert c1["hot_share"] == pytest.approx(0.5)  # top ceil(2) ids: 40 + 10 of 100
    assert c1["missing_share"] == 0.0
    assert c2["distinct"] == 3 and c2["hot_share"] == pytest.approx(0.5)  # top 1 id (1) of 3
    assert c2["missing_share"] == pytest.approx(0.25)
    # overall: hottest ceil(1% of 203) = 3 rows pooled: 50 (id 1 of C2), 40, 25
    assert st["hot_share_overall"] == pytest.approx((50 + 40 + 25) / 200)
    text = format_stats(st)
    assert "C1" in text and "hottest 1%" in text and "50.0%" in text


def test_pooled_hot_share_matches_sorting():
    rng = np.random.default_rng(0)
    counts = [rng.zipf(1.5, n).clip(max=10**6) * (rng.random(n) < 0.7) for n in (10, 1000, 37)]
    allc = np.sort(np.concatenate(counts))[::-1]
    total = sum(len(c) for c in counts)
    for frac in (0.01, 0.1, 0.5, 1.0):
        k = math.ceil(frac * total)
        expect = allc[:k].sum() / allc.sum()
        got = _pooled_hot_share([np.bincount(c) for c in counts], total, frac)
        assert got == pytest.approx(expect)
    assert hot_share(np.array([0, 0, 5, 1]), 0.5) == pytest.approx(1.0)
