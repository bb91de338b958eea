"""The `local` reference trainer: determinism, digests, outputs, the CLI."""

import json
import os

import pytest

from conftest import compare, run_local, train_args


def test_same_seed_identical_other_seed_differs(tiny_data, tmp_path):
    a = run_local(tiny_data, str(tmp_path / "a"), "--trainers", "2")
    b = run_local(tiny_data, str(tmp_path / "b"), "--trainers", "2")
    c = run_local(tiny_data, str(tmp_path / "c"), "--trainers", "2", "--seed", "1")
    assert a["digest"] == b["digest"]
    same, message = compare(str(tmp_path / "a"), str(tmp_path / "b"))
    assert same, message
    same, message = compare(str(tmp_path / "a"), str(tmp_path / "c"))
    assert not same and "iteration 0" in message
    assert c["digest"] != a["digest"]


def test_run_directory_contents(tiny_data, tmp_path):
    run = tmp_path / "run"
    summary = run_local(tiny_data, str(run), "--optimizer", "adagrad", "--eval-every", "4")
    for key in ("mode", "iters", "samples_per_s", "final_loss", "auc", "logloss", "digest"):
        assert key in summary
    assert summary["mode"] == "local" and summary["iters"] == 8
    assert 0.0 <= summary["auc"] <= 1.0 and summary["logloss"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"]["sparse"] == "adagrad" and config["model"]["cardinalities"] == [50, 200, 1000, 30, 5000]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in lines] == list(range(8))
    assert all({"loss", "digest", "time_compute", "time_update"} <= set(m) for m in lines)
    assert "eval_auc" in lines[3] and "eval_auc" in lines[7]


@pytest.mark.parametrize("model", ["dcn", "wide_deep", "deepfm"])
def test_other_models_train_deterministically(tiny_data, tmp_path, model):
    a = run_local(tiny_data, str(tmp_path / "a"), "--model", model, "--optimizer", "rowwise_adagrad", iters=4)
    b = run_local(tiny_data, str(tmp_path / "b"), "--model", model, "--optimizer", "rowwise_adagrad", iters=4)
    assert a["digest"] == b["digest"]


def test_slice_order_changes_the_digest(tiny_data, tmp_path, monkeypatch):
    """The contribution order is part of the contract: reversing it must show."""
    ref = run_local(tiny_data, str(tmp_path / "ref"), "--trainers", "3")
    import bagpipe.trainers.local as local

    real = local.sum_contributions
    monkeypatch.setattr(local, "sum_contributions", lambda union, parts, d: real(union, parts[::-1], d))
    rev = run_local(tiny_data, str(tmp_path / "rev"), "--trainers", "3")
    assert rev["digest"] != ref["digest"]


def test_compare_cli_exit_codes(tiny_data, tmp_path, capsys):
    from bagpipe.cli import main

    run_local(tiny_data, str(tmp_path / "a"), iters=3)
    run_local(tiny_data, str(tmp_path / "b"), iters=3)
    run_local(tiny_data, str(tmp_path / "c"), "--lr", "0.05", iters=3)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "first difference at iteration 0" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 1


def test_bad_configuration_is_one_clear_error(tiny_data, tmp_path, capsys):
    from bagpipe.cli import main

    assert main(["train", *train_args(tiny_data, str(tmp_path / "x"), "--trainers", "7")]) == 2
    assert "not divisible by --trainers 7" in capsys.readouterr().err
    assert main(["train", *train_args(tiny_data, str(tmp_path / "x"), "--epochs", "2")]) == 2
    assert "give --iters or --epochs, not both" in capsys.readouterr().err
    assert main(["train", *train_args(str(tmp_path / "nowhere"), str(tmp_path / "x"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "summary.json")


def test_out_of_range_ids_fail_before_training(bad_id_data, tmp_path, capsys):
    from bagpipe.cli import main

    assert main(["train", *train_args(bad_id_data, str(tmp_path / "x"))]) == 2
    assert "column C2 (table 1)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_default_data_is_generated_by_one_rank_and_awaited_by_the_others(tmp_path, monkeypatch):
    import threading

    from bagpipe.config import ConfigError
    from bagpipe.train import ensure_default_data

    target = tmp_path / "default"
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="did not appear"):
        ensure_default_data(str(target), wait_s=0.3)
    threading.Timer(0.3, lambda: target.mkdir()).start()
    assert ensure_default_data(str(target), wait_s=10) == str(target)
