"""Specs, request sources, the request wire format and its validation (no processes)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from bagpipe.config import ConfigError
from bagpipe.serving.requests import (Bags, ItemCount, Request, RequestError, RequestLimits, RequestShape,
                                      SpecRequests, access_stats)
from bagpipe.serving.spec import SHIPPED, ModelSpec, PoolingMode, load_spec

TINY_SPEC = {"name": "tiny", "embedding_dim": 8, "num_dense": 3, "bottom_mlp": [8], "top_mlp": [8], "seed": 5,
             "tables": [{"rows": 50, "pooling": 3, "coverage": 1.0}, {"rows": 400, "pooling": 1, "coverage": 0.5},
                        {"rows": 30, "pooling": 2, "coverage": 0.3}]}


def test_shipped_specs_have_their_shapes():
    drm1, drm2, drm3 = (load_spec(n) for n in ("drm1", "drm2", "drm3"))
    assert set(SHIPPED) == {"drm1", "drm2", "drm3"}
    assert drm1.num_tables < 10 and min(t.pooling for t in drm1.tables) >= 20  # few, large, high pooling
    assert drm2.num_tables >= 100 and np.mean([t.coverage for t in drm2.tables]) < 0.4  # many, sparse
    assert sum(t.pooling >= 20 for t in drm3.tables) == 4 and drm3.num_tables == 44  # a mix
    sizes = np.sort(drm2.cardinalities)[::-1]
    assert sizes[:10].sum() > 0.5 * sizes.sum()  # heavy-tailed: a few tables hold most rows
    for spec in (drm1, drm2, drm3):
        assert sum(spec.cardinalities) * spec.model_config().row_dim * 4 < 100e6  # small by default
        assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert abs(load_spec("drm1", 0.02).cardinalities[0] - 2 * load_spec("drm1", 0.01).cardinalities[0]) <= 1


def test_spec_files_and_their_errors(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_SPEC))
    spec = load_spec(str(path), 1.0)
    assert spec.cardinalities == (50, 400, 30) and spec.pooling_mode is PoolingMode.SUM
    generated = ModelSpec.from_dict({"name": "g", "generate": {"count": 5, "largest": 1000, "exponent": 1.0,
                                                               "pooling": [1, 2], "coverage": [0.5, 1.0]}})
    assert sorted(generated.cardinalities) == [200, 250, 333, 500, 1000]
    with pytest.raises(ConfigError, match="neither a shipped spec"):
        load_spec("drm9")
    bad = dict(TINY_SPEC, tables=[{"rows": 10, "pooling": 0.5, "coverage": 1}])
    with pytest.raises(ConfigError, match="pooling factor must be >= 1"):
        ModelSpec.from_dict(bad)
    with pytest.raises(ConfigError, match=r"unknown spec fields \['colour'\]"):
        ModelSpec.from_dict(dict(TINY_SPEC, colour="red"))
    with pytest.raises(ConfigError, match="bottom MLP must end in embedding_dim"):
        ModelSpec.from_dict(dict(TINY_SPEC, bottom_mlp=[16]))


def test_item_counts():
    rng = np.random.default_rng(0)
    assert ItemCount.parse("7").draw(rng, 100) == 7
    assert 3 <= ItemCount.parse("uniform:3:9").draw(rng, 100) <= 9
    assert ItemCount.parse("lognormal:64:2").draw(rng, 10) <= 10
    with pytest.raises(ConfigError, match="--items"):
        ItemCount.parse("uniform:9:3")


def test_spec_requests_follow_coverage_and_pooling_and_are_reproducible():
    spec = ModelSpec.from_dict(TINY_SPEC)
    source = SpecRequests(spec, ItemCount.parse("20"), seed=3)
    requests = source.take(0, 400)
    stats = access_stats(requests)
    assert stats.coverage[0] == 1.0 and 0.4 < stats.coverage[1] < 0.6 and 0.2 < stats.coverage[2] < 0.4
    assert abs(stats.pooling[0] - 3) < 0.2 and stats.pooling[1] == 1.0
    again = source.request(123)
    assert np.array_equal(again.bags[0].ids, requests[123].bags[0].ids)
    assert np.array_equal(again.dense, requests[123].dense)
    assert all(b.ids.max(initial=0) < c for r in requests for b, c in zip(r.bags, spec.cardinalities))


def _shape() -> RequestShape:
    return RequestShape(3, (50, 400, 30))


def _request(items: int = 4) -> Request:
    return SpecRequests(ModelSpec.from_dict(TINY_SPEC), ItemCount.parse(str(items)), seed=1).request(0)


def test_requests_round_trip_through_arrow():
    request = _request()
    batch = request.to_arrow()
    assert batch.schema.names == ["dense", "t0", "t1", "t2"]
    back = _shape().decode(batch, RequestLimits())
    assert np.array_equal(back.dense, request.dense)
    for a, b in zip(back.bags, request.bags):
        assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids)
    sliced = pa.Table.from_batches([batch, batch]).slice(2, 4).combine_chunks().to_batches()[0]
    assert _shape().decode(sliced, RequestLimits()).items == 4  # offsets need not start at 0


def _with_column(batch: pa.RecordBatch, name: str, column: pa.Array) -> pa.RecordBatch:
    index = batch.schema.get_field_index(name)
    return pa.RecordBatch.from_arrays([column if i == index else batch.column(i) for i in range(batch.num_columns)],
                                      names=batch.schema.names)


def test_bad_requests_get_errors_naming_the_field():
    shape, limits, batch = _shape(), RequestLimits(max_items=8, max_ids=60), _request().to_arrow()
    cases = {
        r"columns \['dense', 't0', 't1'\] \(2 tables\), the model expects": batch.select([0, 1, 2]),
        r"column 'dense': expected fixed_size_list<float32>\[3\]": _with_column(
            batch, "dense", pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8, np.float32)), 2)),
        "column 't1': id 400 outside \\[0, 400\\) of table 1": _with_column(
            batch, "t1", Bags.from_lengths(np.ones(4, np.int64), np.full(4, 400)).to_arrow()),
        "column 't0': id -1 outside": _with_column(
            batch, "t0", Bags.from_lengths(np.ones(4, np.int64), np.full(4, -1)).to_arrow()),
        "column 't2': expected list<int64>": _with_column(batch, "t2", pa.array(np.zeros(4, np.int64))),
        "column 't0': null bags": _with_column(batch, "t0", pa.array([[1], None, [2], [3]], pa.list_(pa.int64()))),
        "12 items; allowed 1..8 \\(--max-items\\)": _request(12).to_arrow(),
        "ids; at most 60 allowed \\(--max-ids-per-request\\)": _with_column(
            batch, "t0", Bags.from_lengths(np.full(4, 20), np.zeros(80, np.int64)).to_arrow()),
    }
    for message, bad in cases.items():
        with pytest.raises(RequestError, match=message):
            shape.decode(bad, limits)
    assert shape.decode(batch, limits).items == 4
