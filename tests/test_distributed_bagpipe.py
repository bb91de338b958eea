"""`bagpipe` mode under real torchrun worlds: bit-identical to `none`/`local` across
trainers, servers, lookahead, prefetch distance, capacity, optimizers and models,
with far fewer server fetches; wrong plans are caught."""

import json

import pytest

from conftest import compare, run_local, run_torchrun

pytestmark = pytest.mark.distributed  # real torchrun worlds: the slow tier

ITERS = 12

# (trainers, servers, lookahead, prefetch distance, cache rows, optimizer, model);
# cache rows 130 at lookahead 7 is near the feasible minimum on the tiny data: capacity
# evictions happen in most iterations (checked below)
MATRIX = [
    (1, 1, 1, 1, None, "sgd", "dlrm"),
    (2, 2, 7, 2, 130, "adagrad", "dlrm"),  # tight: capacity evictions in most iterations
    (3, 1, 7, 3, None, "rowwise_adagrad", "dcn"),
    (3, 2, 64, 64, None, "sgd", "wide_deep"),
    (2, 1, 7, 1, 130, "rowwise_adagrad", "deepfm"),  # tight
    (2, 1, 2, 2, 140, "sgd", "dlrm"),  # short lookahead, bounded capacity
    (2, 1, 7, 7, 4000, "adagrad", "dlrm"),
]


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("trainers,servers,lookahead,distance,cache_rows,optimizer,model", MATRIX)
def test_bagpipe_is_bit_identical(tiny_data, tmp_path, trainers, servers, lookahead, distance, cache_rows,
                                  optimizer, model):
    common = ["--optimizer", optimizer, "--model", model]
    run_local(tiny_data, str(tmp_path / "local"), "--trainers", str(trainers), *common, iters=ITERS)
    extra = ["--lookahead", str(lookahead), "--prefetch-distance", str(distance)]
    if cache_rows:
        extra += ["--cache-rows", str(cache_rows)]
    run_torchrun(tiny_data, str(tmp_path / "bagpipe"), "bagpipe", trainers, servers, *common, *extra, iters=ITERS)
    same, message = compare(str(tmp_path / "local"), str(tmp_path / "bagpipe"))
    assert same, message
    metrics = _metrics(tmp_path / "bagpipe")
    fetched = sum(m["rows_fetched"] for m in metrics)
    read = sum(m["rows_read"] for m in metrics)
    assert 0 < fetched < read, "a cache that fetches every read is not caching"
    if cache_rows:
        assert all(max(m["cache_occupancy"]) <= cache_rows for m in metrics)
        if cache_rows == 130:
            evicting = sum(1 for m in metrics if m.get("plan_capacity_evictions", 0) > 0)
            assert evicting >= ITERS // 2, "the tight case must really evict for capacity"


def test_bagpipe_matches_none_directly(tiny_data, tmp_path):
    args = ["--optimizer", "adagrad", "--lookahead", "3"]
    run_torchrun(tiny_data, str(tmp_path / "none"), "none", 2, 1, *args, iters=ITERS)
    run_torchrun(tiny_data, str(tmp_path / "bagpipe"), "bagpipe", 2, 2, *args, "--cache-rows", "400", iters=ITERS)
    same, message = compare(str(tmp_path / "none"), str(tmp_path / "bagpipe"))
    assert same, message
    none_fetched = sum(m["rows_fetched"] for m in _metrics(tmp_path / "none"))
    cached_fetched = sum(m["rows_fetched"] for m in _metrics(tmp_path / "bagpipe"))
    assert cached_fetched < none_fetched / 2


def test_read_before_the_fetch_lands_is_an_error(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BAGPIPE_FAULTS", "early_read")
    proc = run_torchrun(tiny_data, str(tmp_path / "run"), "bagpipe", 2, 1, "--lookahead", "2", check=False,
                        iters=ITERS)
    assert proc.returncode != 0
    assert "not resident" in proc.stderr, proc.stderr[-3000:]


def test_capacity_too_small_is_a_clear_error(tiny_data, tmp_path):
    proc = run_torchrun(tiny_data, str(tmp_path / "run"), "bagpipe", 2, 1, "--cache-rows", "20", check=False)
    assert proc.returncode != 0
    assert "cache capacity too small" in proc.stderr and "--cache-rows" in proc.stderr


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
def test_initial_accumulator_is_the_same_state_everywhere(tiny_data, tmp_path, optimizer):
    """Servers, caches and `local` create optimizer state in one place (SparseOptimizer)."""
    args = ["--optimizer", optimizer, "--initial-accumulator", "0.1"]
    run_local(tiny_data, str(tmp_path / "local"), "--trainers", "3", *args, iters=ITERS)
    run_local(tiny_data, str(tmp_path / "zero"), "--trainers", "3", "--optimizer", optimizer, iters=ITERS)
    run_torchrun(tiny_data, str(tmp_path / "none"), "none", 3, 2, *args, iters=ITERS)
    run_torchrun(tiny_data, str(tmp_path / "bagpipe"), "bagpipe", 3, 2, *args, "--cache-rows", "90",
                 "--lookahead", "7", iters=ITERS)
    for other in ("none", "bagpipe"):
        same, message = compare(str(tmp_path / "local"), str(tmp_path / other))
        assert same, f"{other}: {message}"
    assert not compare(str(tmp_path / "local"), str(tmp_path / "zero"))[0], "the accumulator must matter"
