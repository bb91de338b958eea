"""Resume and restart in real torchrun worlds, and the launcher's job lifecycle.

Every run uses the DLRM learning-rate schedule (a different rate almost every
iteration), so resuming with the wrong iteration number anywhere changes the digest.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import SMALL_MODEL, TINY_BATCH, compare, run_local, run_torchrun

pytestmark = pytest.mark.distributed

SCHEDULE = ["--optimizer", "adagrad", "--lr-schedule", "dlrm", "--warmup-iters", "3", "--decay-start", "6",
            "--decay-iters", "5"]


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _launch(args, env=None, timeout=180, **kwargs):
    cmd = [sys.executable, "-m", "bagpipe.cli", "launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), **kwargs)


def test_resume_in_another_mode_with_another_server_count(tiny_data, tmp_path):
    """A bagpipe checkpoint taken mid-run (cached rows flushed, not evicted) resumes bit
    for bit in `none` with S=1 and in `bagpipe` with S=3."""
    run_local(tiny_data, str(tmp_path / "reference"), "--trainers", "3", *SCHEDULE, iters=12)
    first = tmp_path / "first"
    run_torchrun(tiny_data, str(first), "bagpipe", 3, 2, *SCHEDULE, "--cache-rows", "90", "--lookahead", "7",
                 "--checkpoint-every", "3", iters=7)
    ckpt = first / "checkpoints" / "iter-00000006"
    assert (ckpt / "MANIFEST.json").exists()
    for mode, servers in (("none", 1), ("bagpipe", 3)):
        run = tmp_path / mode
        shutil.copytree(first, run)
        extra = ["--cache-rows", "90", "--lookahead", "7"] if mode == "bagpipe" else []
        run_torchrun(tiny_data, str(run), mode, 3, servers, *SCHEDULE, *extra, "--resume", str(ckpt), iters=12)
        same, message = compare(str(tmp_path / "reference"), str(run))
        assert same, f"{mode}: {message}"
        assert _summary(str(run))["resumed_from"] == 6


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    run_local(tiny_data, run, "--trainers", "2", *SCHEDULE, iters=30)
    return run


# killed late enough that a checkpoint is complete (their writes trail training by a few iterations)
@pytest.mark.parametrize("victim", ["trainer1@25", "server0@25", "oracle0@25"])
def test_a_killed_process_restarts_the_job_which_finishes_the_same(tiny_data, tmp_path, uninterrupted, victim):
    from conftest import train_args

    run = str(tmp_path / "run")
    start = time.monotonic()
    proc = _launch(["--trainers", "2", "--servers", "1", "--max-restarts", "1", "--",
                    *train_args(tiny_data, run, *SCHEDULE, "--cache-rows", "140", "--lookahead", "7",
                                "--checkpoint-every", "4", "--timeout", "20", iters=30)],
                   env={"BAGPIPE_FAULTS": f"kill:{victim}"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.monotonic() - start < 150
    same, message = compare(uninterrupted, run)
    assert same, message
    summary = _summary(run)
    # the latest complete checkpoint at the kill: usually after 24 iterations, an earlier one when
    # the newest one's files were still being written (their writes overlap training)
    assert summary["restarts"] == 1 and summary["resumed_from"] in (8, 12, 16, 20, 24)
    assert 0 <= summary["iterations_redone"] <= 26 - summary["resumed_from"]
    role = victim.split("@")[0].rstrip("0123456789")
    assert f"bagpipe: {role}" in proc.stderr or "dead" in proc.stderr  # the loss was reported


def _workers():
    out = subprocess.run(["pgrep", "-f", "bagpipe.train"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_sigterm_to_the_launcher_stops_the_whole_job(tmp_path):
    run = str(tmp_path / "run")
    before = set(_workers())
    proc = subprocess.Popen([sys.executable, "-m", "bagpipe.cli", "launch", "--trainers", "2", "--servers", "1", "--",
                             "--run-dir", run, "--embedding-dim", "64", "--bottom-mlp", "512,256,64", "--top-mlp",
                             "512,256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 90
        while not os.path.exists(os.path.join(run, "metrics.jsonl")) or not open(os.path.join(run, "metrics.jsonl")).read():
            assert time.monotonic() < deadline, "the job did not start training"
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err
    time.sleep(1)
    assert set(_workers()) - before == set(), "workers outlived the launcher"
    assert not os.path.exists(os.path.join(run, "summary.json"))
    with open(os.path.join(run, "status.json")) as f:
        assert json.load(f)["status"] == "failed"


def test_a_stopped_trainer_is_named(tiny_data, tmp_path):
    """A trainer that stops answering (SIGSTOP) is named as the one that stopped, within
    --timeout. (torchrun then takes 30 s to SIGKILL a stopped worker: the test ends the
    job itself once the failure is reported; test_sigterm... covers a clean stop.)"""
    from conftest import train_args

    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "bagpipe.cli", "launch", "--trainers", "2", "--servers", "1", "--",
                             *train_args(tiny_data, run, "--timeout", "5", iters=30)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", BAGPIPE_FAULTS="stop:trainer1@4"))
    seen, start = [], time.monotonic()
    try:
        for line in proc.stderr:
            seen.append(line)
            if "is stopped" in line or time.monotonic() - start > 90:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in _workers():  # the job's workers (stopped ones too) go with it
            if os.path.exists(f"/proc/{pid}") and run in open(f"/proc/{pid}/cmdline").read().replace("\0", " "):
                os.kill(pid, signal.SIGKILL)
    err = "".join(seen)
    assert "trainer 1 (rank 3) is stopped (not answering)" in err, err[-3000:]
    assert time.monotonic() - start < 60


def test_a_bad_command_is_one_line_and_starts_nothing(tiny_data, tmp_path):
    from conftest import train_args

    proc = _launch(["--trainers", "2", "--servers", "1", "--",
                    *train_args(tiny_data, str(tmp_path / "run"), "--cache-rows", "20")], timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cache capacity too small"), proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    proc = _launch(["--trainers", "2", "--servers", "1", "--", "--data", tiny_data, "--iters", "-5"], timeout=60)
    assert proc.returncode == 2 and "--iters must be >= 1, got -5" in proc.stderr
