"""Checkpoints, exact resume, export/evaluate and the run directory's lifecycle (in-process, `local` mode).

The distributed counterparts (none/bagpipe resume at another S, kills under
--max-restarts, SIGTERM to the launcher) are in tests/test_restarts.py.
"""

import json
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import compare, run_local, train_args

SCHEDULE = ["--optimizer", "adagrad", "--lr-schedule", "dlrm", "--warmup-iters", "3", "--decay-start", "6",
            "--decay-iters", "5"]


def _train(data, run_dir, *extra, iters=12):
    from bagpipe.train import main

    return main(["--mode", "local", *train_args(data, run_dir, "--trainers", "3", *SCHEDULE, *extra, iters=iters)])


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref") / "run")
    assert _train(tiny_data, run) == 0
    return run


@pytest.fixture(scope="module")
def interrupted(tiny_data, tmp_path_factory):
    """7 of 12 iterations with a checkpoint every 3 (kept: iterations 6 and 7)."""
    run = str(tmp_path_factory.mktemp("part") / "run")
    assert _train(tiny_data, run, "--checkpoint-every", "3", iters=7) == 0
    return run


def test_resume_is_bit_identical_and_logs_every_iteration_once(tiny_data, reference, interrupted, tmp_path):
    from bagpipe.checkpoint import complete

    done = complete(os.path.join(interrupted, "checkpoints"))
    assert [n for n, _ in done] == [6, 7]  # every 3 and the final one, 2 kept
    run = str(tmp_path / "run")
    os.makedirs(run)
    for name in ("config.json", "metrics.jsonl"):  # a run directory to continue
        with open(os.path.join(interrupted, name)) as src, open(os.path.join(run, name), "w") as dst:
            dst.write(src.read())
    assert _train(tiny_data, run, "--resume", done[0][1]) == 0  # from iteration 6: the schedule goes on
    same, message = compare(reference, run)
    assert same, message
    assert [m["iter"] for m in _metrics(run)] == list(range(12))
    assert [m["lr_sparse"] for m in _metrics(run)] == [m["lr_sparse"] for m in _metrics(reference)]
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["resumed_from"] == 6 and summary["status"] == "complete"


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_a_changed_file_is_refused_naming_it(tiny_data, interrupted, tmp_path):
    from bagpipe.checkpoint import CheckpointError, complete
    from bagpipe.config import ConfigError

    path = _copy_checkpoint(complete(os.path.join(interrupted, "checkpoints"))[-1][1], tmp_path / "ck")
    values = os.path.join(path, "server-0000.values.npy")
    with open(values, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")  # same size, other bits
    from bagpipe.checkpoint import load_rows, open_checkpoint
    from bagpipe.placement import Placement

    with pytest.raises(CheckpointError, match="server-0000.values.npy: missing, truncated or changed"):
        load_rows(open_checkpoint(path), Placement(1), 0)
    os.truncate(values, 10)
    with pytest.raises(ConfigError, match="server-0000.values.npy: missing or truncated"):
        open_checkpoint(path)
    assert _train(tiny_data, str(tmp_path / "run"), "--resume", path) == 2


def test_a_checkpoint_of_another_run_is_refused_naming_the_field(tiny_data, interrupted, tmp_path, capsys):
    from bagpipe.checkpoint import complete

    path = complete(os.path.join(interrupted, "checkpoints"))[-1][1]
    assert _train(tiny_data, str(tmp_path / "a"), "--resume", path, "--lr", "0.05") == 2
    assert "optimizer.dense_lr: checkpoint 0.1, now 0.05" in capsys.readouterr().err
    assert _train(tiny_data, str(tmp_path / "b"), "--resume", path, "--seed", "3") == 2
    assert "seed: checkpoint 0, now 3" in capsys.readouterr().err
    # what does not change results may change
    assert _train(tiny_data, str(tmp_path / "c"), "--resume", path, "--threads", "2", "--keep-checkpoints", "1") == 0


def test_loading_never_runs_code_from_the_files(tiny_data, interrupted, tmp_path):
    """A dense file replaced by a pickle (checksums updated to match) is refused, and
    the pickle's payload never runs."""
    from bagpipe.checkpoint import MANIFEST, complete
    from bagpipe.files import sha256

    path = _copy_checkpoint(complete(os.path.join(interrupted, "checkpoints"))[-1][1], tmp_path / "ck")
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    dense = os.path.join(path, "dense.npz")
    with open(dense, "wb") as f:
        pickle.dump({"param/top": Payload()}, f)
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"]["dense.npz"] = {"bytes": os.path.getsize(dense), "sha256": sha256(dense)}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(Exception, match="pickle"):
        from bagpipe.checkpoint import load_dense, open_checkpoint
        from bagpipe.config import RunConfig
        from bagpipe.trainers.common import DenseState

        ckpt = open_checkpoint(path)
        dense_state = DenseState.build(RunConfig.from_dict(ckpt.config))
        load_dense(ckpt, dense_state.model, dense_state.optimizer)
    assert not marker.exists()


def test_a_failed_checkpoint_write_fails_the_run_and_keeps_the_last_one(tiny_data, tmp_path, monkeypatch, capsys):
    from bagpipe import checkpoint

    real, calls = checkpoint.write_part, []

    def disk_full(directory, part, **contents):
        calls.append(directory)
        if "iter-00000006" in directory:
            raise OSError(28, "No space left on device", os.path.join(directory, part))
        return real(directory, part, **contents)

    monkeypatch.setattr(checkpoint, "write_part", disk_full)
    run = str(tmp_path / "run")
    assert _train(tiny_data, run, "--checkpoint-every", "3", iters=9) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "writing a checkpoint failed" in err
    done = checkpoint.complete(os.path.join(run, "checkpoints"))
    assert [n for n, _ in done] == [3]  # the one before is complete and intact
    checkpoint.open_checkpoint(done[0][1])
    with open(os.path.join(run, "status.json")) as f:
        assert json.load(f)["status"] == "failed"
    assert not os.path.exists(os.path.join(run, "summary.json"))


def test_export_and_evaluate_reproduce_the_runs_evaluation(interrupted, tmp_path):
    from bagpipe.checkpoint import complete
    from bagpipe.cli import main
    from bagpipe.evaluate import evaluate_saved
    from bagpipe.export import read_export

    path = complete(os.path.join(interrupted, "checkpoints"))[-1][1]
    assert main(["export", path, "--out", str(tmp_path / "model")]) == 0
    exported = read_export(str(tmp_path / "model"))
    assert exported.iteration == 7 and len(exported.tables) == 5
    with open(os.path.join(interrupted, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(interrupted, "config.json")) as f:
        config = json.load(f)
    data, trainers = config["data"], config["cluster"]["trainers"]
    for source, slices in ((path, None), (str(tmp_path / "model"), trainers)):  # (an export does not know T)
        got = evaluate_saved(source, data["path"], data["batch_size"], data["eval_batches"], slices)
        assert (got["auc"], got["logloss"], got["ne"]) == (summary["auc"], summary["logloss"], summary["ne"])
    assert main(["export", path, "--out", str(tmp_path / "model")]) == 2  # exists: refused


def test_a_run_directory_belongs_to_one_job(tiny_data, reference, tmp_path, capsys):
    from bagpipe import lifecycle

    assert _train(tiny_data, reference) == 2
    assert "holds another run" in capsys.readouterr().err
    run = str(tmp_path / "run")
    held = lifecycle.lock(run)
    try:
        assert _train(tiny_data, run) == 2
        assert "in use by job pid" in capsys.readouterr().err
    finally:
        held.release()
    assert _train(tiny_data, run, iters=2) == 0
    assert _train(tiny_data, run, "--overwrite", iters=3) == 0
    assert [m["iter"] for m in _metrics(run)] == [0, 1, 2]


def test_a_run_that_fails_says_so(tiny_data, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    monkeypatch.setattr("bagpipe.trainers.local.slice_step", _exploding)
    with pytest.raises(RuntimeError):
        _train(tiny_data, run)
    with open(os.path.join(run, "status.json")) as f:
        status = json.load(f)
    assert status["status"] == "failed" and "boom" in status["why"]
    assert not os.path.exists(os.path.join(run, "summary.json"))


def _exploding(*args, **kwargs):
    raise RuntimeError("boom")


def _with_column(data, tmp_path, column, index, value):
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(data, out)
    part = out / "part-00000.parquet"
    table = pq.read_table(part)
    values = table.column(column).to_numpy().copy()
    values[index] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, type=pa.float32()))
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), part)
    return str(out)


@pytest.mark.parametrize("column,value,message", [
    ("I3", np.nan, "column 'I3' holds nan, not a finite number"),
    ("label", 2.0, "label 2.0 is not 0 or 1"),
])
def test_non_finite_features_and_bad_labels_fail_naming_the_row(tiny_data, tmp_path, capsys, column, value,
                                                                message):
    bad = _with_column(tiny_data, tmp_path, column, 70, value)
    assert _train(bad, str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "part-00000.parquet: row 70 (row group 0)" in err and message in err


def test_non_finite_loss_stops_the_run_naming_the_iteration(tiny_data, tmp_path, capsys):
    assert _train(tiny_data, str(tmp_path / "run"), "--lr", "1e30") == 2
    assert re.search(r"iteration \d+: the loss is \S+ \(not finite\)", capsys.readouterr().err)
