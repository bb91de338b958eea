"""`none` mode under real torchrun worlds: equivalence with `local`, placement
independence, contribution order, and failure behaviour."""

import os
import time

import pytest

from conftest import compare, run_local, run_torchrun

pytestmark = pytest.mark.distributed  # real torchrun worlds: the slow tier


def test_none_matches_local_at_two_trainers_two_servers(tiny_data, tmp_path):
    run_local(tiny_data, str(tmp_path / "local"), "--trainers", "2", "--optimizer", "adagrad")
    run_torchrun(tiny_data, str(tmp_path / "none"), "none", 2, 2, "--optimizer", "adagrad")
    same, message = compare(str(tmp_path / "local"), str(tmp_path / "none"))
    assert same, message


def test_server_count_changes_nothing_at_three_trainers(tiny_data, tmp_path):
    args = ("--optimizer", "rowwise_adagrad")
    run_torchrun(tiny_data, str(tmp_path / "s1"), "none", 3, 1, *args)
    run_torchrun(tiny_data, str(tmp_path / "s3"), "none", 3, 3, *args)
    run_local(tiny_data, str(tmp_path / "local"), "--trainers", "3", *args)
    for other in ("s3", "local"):
        same, message = compare(str(tmp_path / "s1"), str(tmp_path / other))
        assert same, f"{other}: {message}"


@pytest.mark.parametrize("victim", ["server0@3", "trainer1@3"])
def test_killed_process_ends_the_job_with_a_named_failure(tiny_data, tmp_path, monkeypatch, victim):
    monkeypatch.setenv("BAGPIPE_FAULTS", f"kill:{victim}")
    start = time.monotonic()
    proc = run_torchrun(tiny_data, str(tmp_path / "run"), "none", 2, 1, check=False, timeout=90, iters=20)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    role = victim.split("@")[0].rstrip("0123456789")
    index = victim.split("@")[0][len(role):]
    # survivors name the dead peer: directly, or by probing local peers after a collective failed
    assert f"{role} {index} (rank" in proc.stderr.replace("dead peers: ", ""), proc.stderr[-3000:]
    assert "failed: PeerError" in proc.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail"
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_bad_data_fails_every_rank_before_work(bad_id_data, tmp_path):
    proc = run_torchrun(bad_id_data, str(tmp_path / "run"), "none", 2, 1, check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert "part-00001.parquet: column C2 (table 1), row group 0: id 999 is outside [0, 200)" in proc.stderr
    assert not os.path.exists(tmp_path / "run")
