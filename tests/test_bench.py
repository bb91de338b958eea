"""`bagpipe bench` smoke tests: CI-sized unshaped, and shaped where the machine allows."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from conftest import SMALL_MODEL, TINY_BATCH

pytestmark = pytest.mark.distributed  # real torchrun worlds: the slow tier


def _bench_args(data, out, *extra):
    return ["bench", "--data", data, "--out", str(out), "--iters", "6", "--warmup", "2", "--repeats", "1",
            "--batch-size", str(TINY_BATCH), *extra, "--", "--eval-batches", "2", *SMALL_MODEL]


def test_unshaped_bench_reports_every_mode(tiny_data, tmp_path, capsys):
    from bagpipe.cli import main

    assert main(_bench_args(tiny_data, tmp_path, "--cache-rows", "unlimited,400")) == 0
    for name in ("bench.csv", "bench.json", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["mode"] for r in rows] == ["local", "none", "bagpipe", "bagpipe"]
    for row in rows:
        assert row["samples_per_s"] > 0 and row["iter_ms_p99"] >= row["iter_ms_p50"] > 0
    assert math.isnan(rows[0]["compute_spread_ms"])  # local has no peers to wait for
    assert all(0 <= r["compute_spread_ms"] < r["compute_ms"] for r in rows[1:])
    none = rows[1]
    for cached in rows[2:]:
        assert cached["digest_matches_none"] is True
        assert cached["rows_fetched_per_iter"] < none["rows_fetched_per_iter"]
        assert cached["speedup_over_none"] > 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "vs none" in out


def test_bench_refuses_a_bad_sweep(tiny_data, tmp_path, capsys):
    from bagpipe.cli import main

    assert main(_bench_args(tiny_data, tmp_path, "--sweep", "colour=red")) == 2
    assert "--sweep takes KEY=V1,V2" in capsys.readouterr().err


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link_support():
    from bagpipe.netlink import link_support

    return link_support()


@pytest.mark.skipif(not _link_support()[0], reason=f"no shaped link here: {_link_support()[1]}")
def test_shaped_bench_matches_and_cleans_up(tiny_data, tmp_path):
    before = _namespaces()
    cmd = [sys.executable, "-m", "bagpipe.cli",
           *_bench_args(tiny_data, tmp_path, "--modes", "none,bagpipe", "--link-gbps", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert rows[1]["digest_matches_none"] is True
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["link_gbps"] == 1
    assert _namespaces() <= before


@pytest.mark.skipif(not _link_support()[0], reason=f"no shaped link here: {_link_support()[1]}")
def test_interrupted_shaped_bench_leaves_nothing(tiny_data, tmp_path):
    before = _namespaces()
    cmd = [sys.executable, "-m", "bagpipe.cli",
           *_bench_args(tiny_data, tmp_path, "--modes", "none", "--link-gbps", "1")]
    log = tmp_path / "bench.stderr"
    with open(log, "w") as err:
        bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)

    def link_up() -> bool:  # the link's namespaces, not link_support()'s short-lived probe namespace
        return any("-probe" not in name for name in _namespaces() - before)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and bench.poll() is None and not link_up():
        time.sleep(0.2)
    assert link_up(), (f"the bench never brought its link up (exit code {bench.poll()}); "
                       f"its stderr: {log.read_text()[-3000:]}")
    time.sleep(2)
    bench.send_signal(signal.SIGINT)
    bench.wait(timeout=60)
    assert bench.returncode != 0
    time.sleep(1)
    assert _namespaces() <= before
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"processes left behind: {leftover}"
