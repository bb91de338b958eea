"""`bagpipe compare`: bit mode, the tolerance check, seed-variance bands, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import TINY_TABLES, run_local

ITERS = 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Local runs on a 6000-row dataset (100 iterations of 60): the reference (seed 0,
    2 trainers), the same at 4 trainers, a 10x learning rate, and seeds 1, 2 and 6."""
    from bagpipe.datasets.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("compare")
    data = str(root / "data")
    generate_synthetic(data, 6000, seed=1, tables=TINY_TABLES, eval_rows=600, rows_per_part=2000, progress=False)
    variants = {"ref": ["--trainers", "2"], "t4": ["--trainers", "4"], "lr10": ["--trainers", "2", "--lr", "1.0"],
                **{f"seed{s}": ["--trainers", "2", "--seed", str(s)] for s in (1, 2, 6)}}
    out = {}
    for name, extra in variants.items():
        out[name] = str(root / name)
        run_local(data, out[name], *extra, iters=ITERS)
    return out


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from bagpipe.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_other_trainer_count_passes_the_tolerance_and_fails_the_bits(runs, capsys):
    code, out, _ = cli(capsys, "compare", runs["ref"], runs["t4"])
    assert code == 1 and "first difference at iteration 0" in out
    code, out, _ = cli(capsys, "compare", runs["ref"], runs["t4"], "--tolerance", "1e-3")
    assert code == 0, out
    assert "compared over all 100 common iterations (0..99)" in out
    assert "trailing mean over 10 iterations" in out and "within tolerance 0.001" in out
    for name in ("auc", "logloss", "ne"):
        assert f"    {name}" in out


def test_ten_times_the_learning_rate_fails_naming_an_iteration(runs, capsys):
    from bagpipe.compare import compare_tolerance, load_runs

    code, out, _ = cli(capsys, "compare", runs["ref"], runs["lr10"], "--tolerance", "0.05")
    assert code == 1
    result = compare_tolerance(*load_runs([runs["ref"], runs["lr10"]]), 0.05)
    first = result.iters[result.first_loss_beyond]
    assert f"beyond tolerance: first at iteration {first}, smoothed loss" in out
    assert result.smoothed_relative[result.first_loss_beyond] > 0.05
    assert (result.smoothed_relative[:result.first_loss_beyond] <= 0.05).all()
    # a window of 1 judges raw losses
    raw = compare_tolerance(*load_runs([runs["ref"], runs["lr10"]]), 0.05, window=1)
    np.testing.assert_array_equal(raw.smoothed_relative, raw.raw_relative)


def test_seed_band_accepts_another_seed_and_rejects_ten_times_the_learning_rate(runs, capsys):
    """With 3 baselines σ rests on 2 degrees of freedom: measured over 10 seeds of this
    workload, about half of further seeds leave a 3σ band somewhere on the curve; seed
    6 sits at about 1.6σ here and the 10x run at about 4.7σ."""
    baselines = [runs["ref"], runs["seed1"], runs["seed2"]]
    code, out, _ = cli(capsys, "compare", runs["seed6"], "--baseline", *baselines)
    assert code == 0, out
    assert "against 3 baseline runs, mean ± 3 σ" in out and "within 3 σ of the baseline" in out
    code, out, _ = cli(capsys, "compare", runs["lr10"], "--baseline", *baselines)
    assert code == 1 and "outside the band: first at iteration" in out
    code, out, _ = cli(capsys, "compare", runs["lr10"], "--baseline", *baselines, "--sigmas", "50")
    assert code == 0, out


def _copy_run(src: str, dst: str, lines: int | None = None, summary: bool = True, offset: int = 0) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "metrics.jsonl")
    records = [json.loads(x) for x in open(path).read().splitlines()][:lines]
    with open(path, "w") as f:
        f.writelines(json.dumps(dict(r, iter=r["iter"] + offset)) + "\n" for r in records)
    if not summary:
        os.unlink(os.path.join(dst, "summary.json"))
    return dst


def test_runs_of_different_lengths_compare_over_common_iterations(runs, tmp_path, capsys):
    short = _copy_run(runs["t4"], str(tmp_path / "short"), lines=60, summary=False)
    with open(os.path.join(short, "metrics.jsonl"), "a") as f:
        f.write('{"iter": 60, "lo')  # a live run, mid-line
    code, out, _ = cli(capsys, "compare", runs["ref"], short, "--tolerance", "1e-3")
    assert code == 0, out
    assert "runs of different lengths (100 vs 60 iterations): compared over their 60 common iterations (0..59)" in out
    assert f"{short}: incomplete (still running or failed), 60 iterations" in out
    assert f"eval metrics: not compared (no evaluation recorded in {short})" in out


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    shifted = _copy_run(runs["ref"], str(tmp_path / "shifted"), offset=1000)
    cases = [
        (["compare", runs["ref"], str(tmp_path / "missing"), "--tolerance", "0.1"], "no such run directory"),
        (["compare", runs["ref"], str(empty), "--tolerance", "0.1"], "no metrics.jsonl"),
        (["compare", runs["ref"], shifted, "--tolerance", "0.1"], "no iteration in common"),
        (["compare", runs["ref"], "--baseline", runs["seed1"], runs["seed2"]], "at least 3 runs"),
        (["compare", runs["ref"], runs["t4"], "--tolerance", "-1"], "non-negative"),
        (["compare", runs["ref"], runs["t4"], "--tolerance", "0.1", "--window", "0"], "--window must be >= 1"),
        (["compare", runs["ref"], runs["t4"], "--baseline", runs["seed1"], runs["seed2"], runs["seed6"]],
         "one CANDIDATE"),
        (["compare", runs["ref"]], "give two runs"),
        (["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "no such run directory"),
    ]
    for argv, expected in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, (argv, err)


def test_smoothing_differences_and_ne():
    from bagpipe.compare import centred_mean, relative_difference, trailing_mean
    from bagpipe.metrics import normalized_entropy

    np.testing.assert_allclose(trailing_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(trailing_mean(np.arange(5.0), 1), np.arange(5.0))
    np.testing.assert_allclose(centred_mean(np.arange(1.0, 6.0), 1), [1.5, 2.0, 3.0, 4.0, 4.5])
    rel = relative_difference(np.array([1.0, 0.0, np.nan, 2.0]), np.array([1.1, 0.0, 1.0, np.inf]))
    np.testing.assert_allclose(rel, [0.1 / 1.1, 0.0, np.inf, np.inf])
    assert normalized_entropy(np.log(2.0), 0.5) == pytest.approx(1.0)
    assert np.isnan(normalized_entropy(0.5, None)) and np.isnan(normalized_entropy(0.5, 0.0))


def test_summaries_carry_the_eval_click_rate(runs):
    from bagpipe.rundir import RunRecord

    run = RunRecord.load(runs["ref"])
    assert 0.0 < run.summary["eval_ctr"] < 1.0
    final = run.eval_points().final()
    assert 0.5 < final["ne"] < 1.5


def test_status_says_failed_or_running(runs, tmp_path):
    from bagpipe.rundir import RunRecord

    run = _copy_run(runs["ref"], str(tmp_path / "run"), lines=5, summary=False)
    assert RunRecord.load(run).status == "incomplete (still running or failed)"
    with open(os.path.join(run, "status.json"), "w") as f:
        json.dump({"status": "failed", "where": "trainer 1", "why": "PeerError: lost the oracle"}, f)
    assert RunRecord.load(run).status == "failed (trainer 1: PeerError: lost the oracle)"
    with open(os.path.join(run, "status.json"), "w") as f:
        json.dump({"status": "running"}, f)
    assert RunRecord.load(run).status.startswith("running")
