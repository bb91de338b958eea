"""Multi-hot features, shared tables, epochs and evaluation during training: the three
modes stay bit-identical (DESIGN.md section 11).

The dataset is built here so it holds every awkward case at once: ids repeated inside
a bag, empty bags, bags of 100+ ids, mean and sum pooling, a table read by two
features (one multi-hot, one one-hot) and plain one-hot features beside them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import compare, run_local, run_torchrun

BATCH = 60  # 20 examples per trainer at T=3
SMALL = ["--embedding-dim", "8", "--bottom-mlp", "16,8", "--top-mlp", "16"]


def _bags(rng, n: int, cardinality: int, max_len: int, long_every: int = 0):
    """Bags with empties and repeats (ids drawn with replacement from a small range),
    every `long_every`-th example a bag of 100-150 ids."""
    from bagpipe.datasets.jagged import Bags

    lengths = rng.integers(0, max_len + 1, size=n)
    if long_every:
        lengths[::long_every] = rng.integers(100, 151, size=lengths[::long_every].size)
    values = rng.integers(0, min(cardinality, 12), size=int(lengths.sum())) if not long_every else \
        rng.integers(0, cardinality, size=int(lengths.sum()))
    return Bags(values.astype(np.int64), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def write_multihot(out: str, rows_per_part: int = 240, parts: int = 3, seed: int = 0) -> str:
    from bagpipe.datasets.format import DatasetMeta, TableMeta
    from bagpipe.datasets.writer import DatasetWriter

    tables = [TableMeta("shared", 40, "sum", ["a", "b"]), TableMeta("means", 25, "mean", ["c"]),
              TableMeta("long", 2000, "sum", ["d"]), TableMeta("plain", 17, "sum", ["e"])]
    meta = DatasetMeta(dense_features=["I1", "I2", "I3"], sparse_features=["a", "b", "c", "d", "e"],
                       cardinalities=[t.cardinality for t in tables], source="test", tables=tables,
                       multi_hot=["a", "c", "d"])
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, row_group_size=100) as w:
        for p in range(parts):
            n = rows_per_part
            bags = {0: _bags(rng, n, 40, 6), 2: _bags(rng, n, 25, 4), 3: _bags(rng, n, 2000, 3, long_every=15)}
            sparse = np.zeros((5, n), dtype=np.int64)
            sparse[1] = rng.integers(0, 40, size=n)
            sparse[4] = rng.integers(0, 17, size=n)
            dense = rng.standard_normal((n, 3)).astype(np.float32)
            labels = (rng.random(n) < 0.3 + 0.4 * (sparse[4] % 2)).astype(np.float32)
            part = w.open_part(p, meta)
            part.write(labels, dense, sparse, bags)
            part.close()
    return out


@pytest.fixture(scope="module")
def multihot_data(tmp_path_factory) -> str:
    return write_multihot(str(tmp_path_factory.mktemp("data") / "multihot"))


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _evaluations(run_dir: str) -> list[tuple]:
    """Every evaluation's figures, bit for bit: during training and the final one."""
    during = [(r["iter"], r["eval_auc"], r["eval_logloss"], r["eval_ne"]) for r in _records(run_dir)
              if "eval_auc" in r]
    s = _summary(run_dir)
    return during + [("final", s["auc"], s["logloss"], s["ne"])]


# --- the lookup itself, without processes --------------------------------------------

def test_pooling_matches_a_bag_by_bag_reference(multihot_data):
    """Sum and mean pooling of every bag, checked against a plain per-bag loop; an empty
    mean-pooled bag is zero, not NaN; repeated ids count as often as they occur."""
    from bagpipe.config import ModelConfig, TableConfig
    from bagpipe.datasets.reader import BatchReader, split_parts
    from bagpipe.embedding import batch_keys, lookup
    from bagpipe.rows import RowSpace

    model = ModelConfig(num_dense=3, embedding_dim=4, bottom_mlp=(8, 4), tables=(
        TableConfig("shared", 40, ("a", "b")), TableConfig("means", 25, ("c",), "mean"),
        TableConfig("long", 2000, ("d",)), TableConfig("plain", 17, ("e",))))
    rows = RowSpace.for_model(model, seed=0)
    table = torch.from_numpy(rows.init_rows(np.arange(rows.total_rows)))
    train, _ = split_parts(multihot_data)
    batch = next(iter(BatchReader(train, BATCH)))
    sk = batch_keys(batch, rows, model.feature_poolings)
    got = lookup(table[sk.keys], sk)
    assert got.shape == (BATCH, 5, 4) and torch.isfinite(got).all()
    offsets = rows.feature_offsets
    saw = {"empty mean": False, "repeat": False, "long": False}
    for f, pooling in enumerate(model.feature_poolings):
        for e in range(BATCH):
            ids = batch.bags[f].to_lists()[e] if f in batch.bags else [int(batch.sparse[f, e])]
            want = torch.zeros(4)
            for i in ids:  # one at a time, in order: the reference, not the implementation
                want = want + table[offsets[f] + i]
            if pooling == "mean" and ids:
                want = want / len(ids)
            saw["empty mean"] |= pooling == "mean" and not ids
            saw["repeat"] |= len(set(ids)) < len(ids)
            saw["long"] |= len(ids) >= 100
            assert torch.allclose(got[e, f], want, rtol=1e-5, atol=1e-6), (f, e, ids)
    assert all(saw.values()), saw
    # features a and b read the same table: the same id is the same row
    assert offsets[0] == offsets[1]


def test_a_trainers_working_set_is_every_id_of_its_slice(multihot_data):
    """Planner and trainer agree on what trainer k reads: the sorted unique keys over every
    id of every feature of its contiguous slice."""
    from bagpipe.config import ModelConfig, TableConfig
    from bagpipe.datasets.reader import BatchReader, split_parts
    from bagpipe.embedding import batch_keys, planner_keys
    from bagpipe.rows import RowSpace

    model = ModelConfig(num_dense=3, embedding_dim=4, bottom_mlp=(8, 4), tables=(
        TableConfig("shared", 40, ("a", "b")), TableConfig("means", 25, ("c",), "mean"),
        TableConfig("long", 2000, ("d",)), TableConfig("plain", 17, ("e",))))
    rows = RowSpace.for_model(model, seed=0)
    train, _ = split_parts(multihot_data)
    for batch in BatchReader(train, BATCH, max_batches=3):
        planned = planner_keys(batch, rows).per_trainer(3)
        for k in range(3):
            assert np.array_equal(np.unique(planned[k]), batch_keys(batch.slice(k, 3), rows).keys)


def test_stats_count_every_id_of_every_bag(multihot_data):
    from bagpipe.datasets.reader import BatchReader, split_parts
    from bagpipe.datasets.stats import dataset_stats, format_stats

    stats = dataset_stats(multihot_data)
    by_name = {t["name"]: t for t in stats["tables"]}
    train, evals = split_parts(multihot_data)
    batches = list(BatchReader(train + evals, 240))  # every row: 3 parts of 240
    a = np.concatenate([b.bags[0].lengths() for b in batches])
    assert by_name["shared"]["ids_per_example"] == pytest.approx(a.mean() + 1)  # feature a's bags + feature b
    assert by_name["shared"]["features"] == ["a", "b"]
    c = np.concatenate([b.bags[2].lengths() for b in batches])
    assert by_name["means"]["empty_share"] == pytest.approx(np.mean(c == 0)) and by_name["means"]["pooling"] == "mean"
    assert by_name["plain"]["ids_per_example"] == 1.0 and by_name["plain"]["empty_share"] == 0.0
    assert "features a, b" in format_stats(stats)


# --- the three modes agree ----------------------------------------------------------

OPTIMIZER_ARGS = {"sgd": [], "adagrad": ["--initial-accumulator", "0.01"], "rowwise_adagrad": []}


@pytest.fixture(scope="module")
def local_runs(multihot_data, tmp_path_factory):
    """`local` at T=3 once per optimizer (cheap; the distributed runs compare against it)."""
    root = tmp_path_factory.mktemp("local")
    return {opt: (run_local(multihot_data, str(root / opt), "--trainers", "3", "--optimizer", opt,
                            *OPTIMIZER_ARGS[opt], *SMALL, iters=10, batch=BATCH), str(root / opt))
            for opt in OPTIMIZER_ARGS}


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", list(OPTIMIZER_ARGS))
def test_bagpipe_with_a_tight_cache_matches_local(multihot_data, local_runs, tmp_path, optimizer):
    run = str(tmp_path / "bagpipe")
    run_torchrun(multihot_data, run, "bagpipe", 3, 2, "--cache-rows", "380", "--lookahead", "4",
                 "--optimizer", optimizer, *OPTIMIZER_ARGS[optimizer], *SMALL, iters=10, batch=BATCH)
    same, message = compare(local_runs[optimizer][1], run)
    assert same, message
    assert _evaluations(run) == _evaluations(local_runs[optimizer][1])
    assert sum(r.get("plan_capacity_evictions", 0) for r in _records(run)) > 0, "the cache was not tight"


@pytest.mark.distributed
def test_none_matches_local(multihot_data, local_runs, tmp_path):
    run = str(tmp_path / "none")
    run_torchrun(multihot_data, run, "none", 3, 2, "--optimizer", "adagrad", *OPTIMIZER_ARGS["adagrad"], *SMALL,
                 iters=10, batch=BATCH)
    same, message = compare(local_runs["adagrad"][1], run)
    assert same, message


@pytest.mark.distributed
def test_reversed_contributions_are_still_caught_on_multihot_data(multihot_data, local_runs, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("BAGPIPE_FAULTS", "reverse_contributions")
    run = str(tmp_path / "faulty")
    run_torchrun(multihot_data, run, "bagpipe", 3, 2, "--cache-rows", "380", "--optimizer", "sgd", *SMALL,
                 iters=10, batch=BATCH)
    same, message = compare(local_runs["sgd"][1], run)
    assert not same, "reversed contributions went unnoticed on multi-hot data"


# --- epochs and evaluation during training ---------------------------------------------

EPOCHS = ["--epochs", "3", "--shuffle-seed", "5", "--eval-every", "3", "--eval-batches", "2",
          "--optimizer", "adagrad", *SMALL]


def _epoch_args(data: str, run_dir: str, *extra: str) -> list[str]:
    return ["--data", data, "--run-dir", run_dir, "--batch-size", str(BATCH), *EPOCHS, *extra]


@pytest.fixture(scope="module")
def local_epochs(multihot_data, tmp_path_factory):
    from bagpipe.train import main

    run = str(tmp_path_factory.mktemp("epochs") / "local")
    assert main(["--mode", "local", "--trainers", "3", *_epoch_args(multihot_data, run)]) == 0
    return run


def test_epochs_reshuffle_each_pass_and_evaluation_leaves_training_alone(multihot_data, local_epochs, tmp_path):
    """Three passes of 8 batches (480 rows / 60), each pass in its own seeded order; the
    evaluations every 3 iterations change no training digest."""
    from bagpipe.train import main

    records = _records(local_epochs)
    assert [r["iter"] for r in records] == list(range(24))
    assert [r["iter"] for r in records if "eval_auc" in r] == [2, 5, 8, 11, 14, 17, 20, 23]
    quiet = str(tmp_path / "no-eval")
    args = _epoch_args(multihot_data, quiet)
    at = args.index("--eval-every")
    del args[at:at + 2]
    assert main(["--mode", "local", "--trainers", "3", *args]) == 0
    same, message = compare(local_epochs, quiet)
    assert same, message


def test_each_epoch_reads_in_its_own_seeded_order_and_resumes_mid_epoch(multihot_data):
    from bagpipe.datasets.format import read_meta
    from bagpipe.datasets.reader import BatchReader, split_parts
    from bagpipe.rundata import RunData

    train, evals = split_parts(multihot_data)
    data = RunData(read_meta(train[0]), train, evals, BATCH, 20, None, shuffle_seed=5, batches_per_epoch=8)
    assert data.epochs == 3
    run = [(b.index, b.labels.copy(), b.dense.copy()) for b in data.train_batches()]
    assert [i for i, _, _ in run] == list(range(20))
    for epoch in range(3):
        want = list(BatchReader(train, BATCH, shuffle_seed=5 + epoch))[: 20 - 8 * epoch]
        for (_, labels, dense), batch in zip(run[8 * epoch: 8 * epoch + 8], want):
            assert np.array_equal(labels, batch.labels) and np.array_equal(dense, batch.dense)
    assert not all(np.array_equal(a[2], b[2]) for a, b in zip(run[:8], run[8:16])), "epochs 0 and 1 in one order"
    resumed = [(b.index, b.dense.copy()) for b in data.train_batches(start_batch=11)]
    assert [i for i, _ in resumed] == list(range(11, 20))
    assert all(np.array_equal(d, run[i][2]) for i, d in resumed)


@pytest.mark.distributed
def test_epochs_and_evaluations_in_bagpipe_mode_match_local(multihot_data, local_epochs, tmp_path):
    run = str(tmp_path / "bagpipe")
    cmd_extra = ["--cache-rows", "380", "--lookahead", "4"]
    _torchrun_epochs(multihot_data, run, "bagpipe", cmd_extra)
    same, message = compare(local_epochs, run)
    assert same, message
    assert _evaluations(run) == _evaluations(local_epochs)
    assert _summary(run)["iters"] == 24


@pytest.mark.distributed
def test_an_evaluation_without_the_flush_reads_stale_rows(multihot_data, local_epochs, tmp_path, monkeypatch):
    """The mutant: the oracle skips the flush before evaluations. Training is unchanged,
    but the evaluations read servers that lack the cached rows' updates."""
    monkeypatch.setenv("BAGPIPE_FAULTS", "no_eval_flush")
    run = str(tmp_path / "faulty")
    _torchrun_epochs(multihot_data, run, "bagpipe", ["--cache-rows", "380", "--lookahead", "4"])
    same, message = compare(local_epochs, run)
    assert same, message  # training digests are not what catches it
    during = _evaluations(run)[:-1]
    assert during != _evaluations(local_epochs)[:-1], "evaluations without a flush went unnoticed"


def _torchrun_epochs(data: str, run_dir: str, mode: str, extra: list[str]) -> None:
    import subprocess
    import sys

    from bagpipe.launch import torchrun_flags

    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(3, 2), "-m", "bagpipe.train",
           "--mode", mode, "--trainers", "3", "--servers", "2", "--timeout", "30",
           *_epoch_args(data, run_dir, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.mark.distributed
def test_evaluations_longer_than_the_plan_stream_do_not_stall_it(tiny_data, tmp_path):
    """40 eval batches per evaluation, more than the oracle's 32 plans in flight per
    server: the evaluation travels as one message, so the plans the trainers wait for
    are never stuck behind it."""
    run = str(tmp_path / "long-eval")
    run_torchrun(tiny_data, run, "bagpipe", 2, 1, "--eval-every", "3", "--eval-batches", "40", *SMALL,
                 iters=6, batch=12, timeout=150)
    evaluations = [r for r in _records(run) if "eval_auc" in r]
    assert [r["iter"] for r in evaluations] == [2, 5] and _summary(run)["eval_examples"] == 40 * 12
