"""`bagpipe simulate`: plans a Parquet dataset without training."""

from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets.format import PART_PATTERN, DatasetMeta
from bagpipe.oracle import cli as oracle_cli
from bagpipe.oracle.lrpp import PlannerConfig
from bagpipe.oracle.simulate import load_keys, run_plans, zipf_key_batches

CARDS = [20, 300, 1500, 7]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three parts (the last is the held-out split) of Zipf-skewed ids."""
    root = tmp_path_factory.mktemp("tiny")
    meta = DatasetMeta(dense_features=["I1", "I2"], sparse_features=[f"C{i + 1}" for i in range(len(CARDS))],
                       cardinalities=list(CARDS), source="test")
    schema = meta.schema()
    rng = np.random.default_rng(0)
    for part, rows in enumerate((640, 640, 200)):
        keys = zipf_key_batches(CARDS, rows, 1, seed=part)[0]
        offsets = np.concatenate([[0], np.cumsum(CARDS)[:-1]])
        cols = {"label": rng.integers(0, 2, rows).astype(np.float32),
                "I1": rng.random(rows, dtype=np.float32), "I2": rng.random(rows, dtype=np.float32)}
        for t, name in enumerate(meta.sparse_features):
            cols[name] = (keys[:, t] - offsets[t]).astype(np.int64)
        table = pa.Table.from_pydict(cols, schema=schema)
        pq.write_table(table, os.path.join(root, PART_PATTERN.format(part)), row_group_size=256)
    return str(root)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="bagpipe")
    sub = parser.add_subparsers(dest="command", required=True)
    oracle_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_load_keys_uses_training_parts(dataset):
    keys, total, cards = load_keys(dataset, 64, None)
    assert total == sum(CARDS) and cards == CARDS
    assert len(keys) == 1280 // 64  # the last part is held out
    assert keys[0].shape == (64, len(CARDS))
    offsets = np.concatenate([[0], np.cumsum(CARDS)[:-1]])
    for t in range(len(CARDS)):
        assert ((keys[0][:, t] >= offsets[t]) & (keys[0][:, t] < offsets[t] + CARDS[t])).all()


def test_simulate_single(dataset, capsys):
    assert run_cli(["simulate", "--data", dataset, "--batch-size", "64", "--trainers", "2", "--servers", "2",
                    "--lookahead", "4", "--cache-rows", "30%"]) == 0
    out = capsys.readouterr().out
    for what in ("hit rate", "rows fetched / iter", "vs none", "written back", "exchange", "occupancy",
                 "capacity events", "batches/s"):
        assert what in out


def test_simulate_json_and_out(dataset, tmp_path, capsys):
    out_dir = tmp_path / "sim"
    assert run_cli(["simulate", "--data", dataset, "--batch-size", "64", "--trainers", "2", "--lookahead", "4",
                    "--cache-rows", "200", "--iters", "10", "--json", "--out", str(out_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    s = res["summary"]
    assert res["iterations"] == 10 and s["iterations"] == 10
    assert 0.0 < s["hit_rate"] < 1.0
    assert s["fetched_per_iter"] < s["none_fetched_per_iter"]
    assert max(s["peak_occupancy"]) <= 200
    assert (out_dir / "simulate.json").exists()


def test_simulate_scaling(dataset, tmp_path, capsys):
    out_dir = tmp_path / "scale"
    assert run_cli(["simulate", "--data", dataset, "--batch-size", "64", "--trainers", "1,2,4,8,64",
                    "--lookahead", "4", "--cache-rows", "50%", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "skipped: batch size 64 not divisible" not in out
    rows = list(csv.DictReader(open(out_dir / "scaling.csv")))
    assert [int(r["trainers"]) for r in rows] == [1, 2, 4, 8, 64]
    assert all(r["status"] == "ok" for r in rows)
    assert (out_dir / "scaling.png").stat().st_size > 0


def test_simulate_sweep(dataset, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    assert run_cli(["simulate", "--data", dataset, "--batch-size", "64", "--trainers", "2", "--sweep",
                    "--iters", "12", "--out", str(out_dir)]) == 0
    rows = list(csv.DictReader(open(out_dir / "sweep.csv")))
    assert {int(r["lookahead"]) for r in rows} == {1, 2, 4, 8, 16, 32, 64}
    assert len(rows) == 7 * 6
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and any(r["status"] == "capacity too small" for r in rows)  # 1% of 1827 rows cannot work
    assert (out_dir / "sweep.png").stat().st_size > 0
    unlimited = {int(r["lookahead"]): float(r["hit_rate"]) for r in ok if r["cache_fraction"] == ""}
    assert unlimited[64] >= unlimited[1]


def test_simulate_errors(dataset, tmp_path, capsys):
    assert run_cli(["simulate", "--data", dataset, "--batch-size", "64", "--cache-rows", "3"]) == 1
    assert "cache capacity too small" in capsys.readouterr().err
    with pytest.raises(Exception):
        run_cli(["simulate", "--data", str(tmp_path / "missing"), "--batch-size", "64"])


def test_summary():
    bs = zipf_key_batches([50, 500], 32, 20, seed=2)
    s = run_plans(PlannerConfig(2, 1, 4, 2, None, 550), bs)
    d = s.as_dict()
    assert s.iterations == 20 and d["fetch_reduction"] > 1
    assert abs(d["hit_rate"] - (1 - s.fetched / s.reads)) < 1e-12
