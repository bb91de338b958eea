"""`bagpipe report`, `compare --compare-plot` and the TensorBoard scalars of `--tensorboard`."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from conftest import run_local, run_torchrun, train_args

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {"loss", "eval", "throughput", "time_split", "rows", "cache"}


def assert_valid_png(path: str) -> None:
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def lengths(plot, panel_start: str) -> dict[str, int]:
    """Points per line of the panels whose title starts so."""
    return {label: n for (title, label), n in plot.series.items() if title.startswith(panel_start)}


def test_report_overlays_two_local_runs(tiny_data, tmp_path, capsys, monkeypatch):
    import bagpipe.report
    from bagpipe.cli import main

    reports = []  # what the command made, to check beyond its files
    real = bagpipe.report.write_report
    monkeypatch.setattr(bagpipe.report, "write_report", lambda *a, **kw: reports.append(real(*a, **kw)) or reports[-1])
    run_local(tiny_data, str(tmp_path / "a"), "--eval-every", "4", iters=12)
    run_local(tiny_data, str(tmp_path / "b"), "--trainers", "3", iters=9)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--window", "3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped cache.png: no bagpipe-mode run" in printed and f"wrote {out / 'index.html'}" in printed

    (report,) = reports
    plots = {p.name: p for p in report.plots}
    assert set(plots) == {"loss", "eval", "throughput", "time_split"} and set(report.skipped) == {"rows", "cache"}
    for plot in plots.values():
        assert_valid_png(plot.path)
    assert lengths(plots["loss"], "training loss") == {"a raw": 12, "a": 12, "b raw": 9, "b": 9}
    assert sorted(lengths(plots["throughput"], "wall-clock").values()) == [9, 12]
    assert lengths(plots["time_split"], "a:") == {"iteration (total)": 12}
    assert lengths(plots["eval"], "eval AUC") == {"a": 3, "b": 1}  # iterations 3, 7, 11; b: the final one
    index = (out / "index.html").read_text()
    assert index.count("<tr>") == 3 and index.count("<img ") == 4 and "complete" in index
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_compare_plot_writes_overlay_and_difference(tiny_data, tmp_path, capsys):
    from bagpipe.cli import main

    run_local(tiny_data, str(tmp_path / "a"), iters=6)
    run_local(tiny_data, str(tmp_path / "b"), "--lr", "0.5", iters=6)
    png = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tolerance", "0.5",
                 "--compare-plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert_valid_png(str(png))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--compare-plot", str(png)]) == 1  # bits


@pytest.mark.distributed
def test_report_of_a_bagpipe_run_draws_every_plot(tiny_data, tmp_path):
    from bagpipe.report import write_report

    iters = 12
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    extra = ["--tensorboard", str(tmp_path / "tb")] if has_tensorboard else []
    run_torchrun(tiny_data, str(tmp_path / "bagpipe"), "bagpipe", 2, 1, "--lookahead", "4", "--cache-rows", "200",
                 *extra, iters=iters)
    run_local(tiny_data, str(tmp_path / "local"), "--trainers", "2", iters=iters)
    report = write_report([str(tmp_path / "bagpipe"), str(tmp_path / "local")], str(tmp_path / "report"), window=4)
    plots = {p.name: p for p in report.plots}
    assert set(plots) == ALL_PLOTS and not report.skipped
    for plot in plots.values():
        assert_valid_png(plot.path)
        # every series has the run's length; distributed runs evaluate once, at the end
        assert plot.series and set(plot.series.values()) == {1 if plot.name == "eval" else iters}, plot.series
    assert lengths(plots["cache"], "cache occupancy") == {"bagpipe trainer 0": iters, "bagpipe trainer 1": iters}
    assert lengths(plots["cache"], "hit rate") == {"bagpipe": iters}
    assert lengths(plots["rows"], "rows fetched") == {"bagpipe": iters}
    assert lengths(plots["rows"], "rows read") == {"bagpipe": iters, "local": iters}
    assert lengths(plots["time_split"], "bagpipe:") == {"iteration (total)": iters}
    if has_tensorboard:  # the oracle writes the scalars of a distributed run
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        for tag in ("train/loss", "cache/hit_rate", "cache/occupancy/trainer_1", "time/wait_share"):
            assert [e.step for e in events.Scalars(tag)] == list(range(iters)), tag
        assert [e.step for e in events.Scalars("eval/auc")] == [iters - 1]


def test_tensorboard_scalars_read_back(tiny_data, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'bagpipe[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bagpipe.rundir import RunRecord

    logdir = str(tmp_path / "tb")
    run_local(tiny_data, str(tmp_path / "run"), "--eval-every", "3", "--tensorboard", logdir, iters=6)
    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    run = RunRecord.load(str(tmp_path / "run"))
    expected = {"train/loss", "eval/auc", "eval/logloss", "eval/ne", "throughput/samples_per_s", "time/wait_share",
                "run/samples_per_s"}
    expected |= {f"train/{name}" for name in ("lr_sparse", "lr_dense") if run.has(name)}
    assert expected <= tags, tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(6))
    np.testing.assert_allclose([e.value for e in loss], run.column("loss"), rtol=1e-6)
    assert [e.step for e in events.Scalars("eval/auc")] == [2, 5]
    assert events.Scalars("eval/auc")[-1].value == pytest.approx(run.summary["auc"], rel=1e-6)


def test_missing_tensorboard_extra_fails_before_training(tiny_data, tmp_path, monkeypatch, capsys):
    from bagpipe.train import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run_dir = tmp_path / "run"
    assert main(["--mode", "local", *train_args(tiny_data, str(run_dir), "--tensorboard", str(tmp_path / "tb"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package: pip install 'bagpipe[tensorboard]'")
    assert not (run_dir / "metrics.jsonl").exists()  # training never started


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from bagpipe.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"data": {"batch_size": 60}, "cluster": {"mode": "local"}}')
    (run / "metrics.jsonl").write_text("".join(f'{{"iter": {i}, "loss": 0.5, "time_iter": 0.01}}\n' for i in range(3)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: plots need matplotlib: pip install 'bagpipe[plot]'\n"
