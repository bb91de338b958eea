"""`bagpipe serve`, `loadgen` and `infer-bench` as real processes on 127.0.0.1.

Every wait is bounded, and every process tree a test starts is killed by the fixture
(its own process group), also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.flight as flight
import pytest
import torch

from bagpipe.serving.loadgen import ScoringClient
from bagpipe.serving.requests import Bags, ItemCount, Request, SpecRequests
from bagpipe.serving.rpc import Security
from bagpipe.serving.spec import ModelSpec
from bagpipe.serving.supervisor import wait_ready

pytestmark = pytest.mark.distributed

SPEC = {"name": "tiny", "embedding_dim": 8, "num_dense": 3, "bottom_mlp": [8], "top_mlp": [8], "seed": 7,
        "tables": [{"rows": 400, "pooling": 4, "coverage": 1.0}, {"rows": 50, "pooling": 1, "coverage": 0.6},
                   {"rows": 150, "pooling": 2, "coverage": 0.5}, {"rows": 80, "pooling": 3, "coverage": 0.8}]}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Served:
    def __init__(self, proc: subprocess.Popen, ready: dict, stderr) -> None:
        self.proc, self.ready, self.stderr = proc, ready, stderr
        self.address = f"127.0.0.1:{ready['port']}"

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def client(self, token: str | None = None) -> ScoringClient:
        return ScoringClient(self.address, Security(token=token))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def spawn():
    """start(command...) -> process in its own group; all groups are killed at the end."""
    started: list[subprocess.Popen] = []

    def start(*args: str, stdout=subprocess.PIPE) -> tuple[subprocess.Popen, object]:
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-m", "bagpipe.cli", *args], stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=ENV, start_new_session=True)
        started.append(proc)
        return proc, stderr

    yield start
    for proc in started:
        kill_group(proc)


def kill_group(leader: subprocess.Popen) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after a grace period; reap the leader."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(leader.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            leader.poll()
            try:
                os.killpg(leader.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            continue
        break
    leader.poll()
    if leader.stdout:
        leader.stdout.close()


@pytest.fixture
def serve(spawn, tmp_path):
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(SPEC))

    def launch(*args: str):
        if "--checkpoint" not in args and "--spec" not in args:
            args = ("--spec", str(spec_file), "--table-scale", "1", *args)
        return spawn("serve", "--items", "4", *args)

    def ready(proc, stderr, timeout_s: float = 120) -> Served:
        try:
            child = wait_ready(proc, timeout_s, "bagpipe serve")
        except Exception as err:
            stderr.seek(0)
            raise AssertionError(f"{err}\n{stderr.read().decode()[-3000:]}") from None
        return Served(proc, child.ready, stderr)

    def start(*args: str) -> Served:
        return ready(*launch(*args))

    start.many = lambda configs: {name: ready(*p) for name, p in {n: launch(*a) for n, a in configs.items()}.items()}
    start.spec_file = str(spec_file)
    return start


def spec_requests(count: int = 15, items: str = "uniform:1:6"):
    return SpecRequests(ModelSpec.from_dict(SPEC), ItemCount.parse(items), seed=2).take(0, count)


def only_tables(tables: list[int], items: int = 3) -> Request:
    cards = [t["rows"] for t in SPEC["tables"]]
    bags = tuple(Bags.from_lengths(np.ones(items, np.int64), np.arange(items) % cards[t]) if t in tables
                 else Bags.empty(items) for t in range(len(cards)))
    return Request(np.zeros((items, SPEC["num_dense"]), np.float32), bags)


def test_every_placement_serves_the_local_bits(serve):
    configs = {"local": ["--placement", "local"], "single": ["--placement", "single"],
               "capacity2": ["--placement", "capacity", "--shards", "2"],
               "load3": ["--placement", "load", "--shards", "3"],
               "coaccess2": ["--placement", "coaccess", "--shards", "2"],
               # 680 rows x 32 B over 3 shards of 8 kB: the 400-row table is split by rows
               "split3": ["--placement", "capacity", "--shards", "3", "--shard-capacity-mb", "0.008"]}
    servers = serve.many(configs)  # all start at once
    placement = servers["split3"].client().info()["placement"]
    assert len([p for p in placement["parts"] if p[0] == 0]) >= 2  # table 0 in row ranges
    requests = [r.to_arrow() for r in spec_requests()]
    local = servers.pop("local").client()
    expected = [local.score(b, timeout_s=30)[0] for b in requests]
    for name, served in servers.items():
        client = served.client()
        for batch, want in zip(requests, expected):
            got, meta = client.score(batch, timeout_s=30)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
            assert meta["shards"] >= 1
        client.close()


def test_a_checkpoint_scores_what_evaluation_computes(serve, tiny_data, tmp_path):
    from conftest import TINY_TABLES

    from bagpipe.config import ModelConfig
    from bagpipe.embedding import slice_keys
    from bagpipe.export import read_export, write_export
    from bagpipe.models import build_model
    from bagpipe.rows import RowSpace
    from bagpipe.serving.requests import DatasetRequests
    from bagpipe.trainers.step import forward_logits

    model = ModelConfig(name="dlrm", num_dense=13, cardinalities=tuple(TINY_TABLES), embedding_dim=8,
                        bottom_mlp=(16, 8), top_mlp=(16,))
    dense = build_model(model, seed=3)
    with torch.no_grad():  # a model that is not its initial state: the export, not the seed, must be served
        for p in dense.parameters():
            p.mul_(1.5)
    space = RowSpace(model.cardinalities, model.row_dim, seed=3)
    keys = np.arange(space.total_rows)
    export = str(tmp_path / "export")
    write_export(export, model, 3, 100, dense.state_dict(), keys, space.init_rows(keys) * 2)
    served = serve("--checkpoint", export, "--data", tiny_data, "--placement", "capacity", "--shards", "2")
    exported = read_export(export)
    reference = exported.build().eval()
    working = torch.from_numpy(np.concatenate(exported.tables))
    client = served.client()
    for request in DatasetRequests(tiny_data, model, ItemCount.parse("uniform:1:20"), seed=1).take(0, 10):
        sparse = np.stack([b.ids for b in request.bags])  # [tables, b], one id per item
        sk = slice_keys(space.keys_of(sparse))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the main shard's thread count: GEMM bits depend on it
        try:
            with torch.no_grad():
                want = forward_logits(reference, torch.from_numpy(request.dense), working[sk.keys], sk).numpy()
        finally:
            torch.set_num_threads(threads)
        got, _ = client.score(request.to_arrow(), timeout_s=30)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    client.close()


def test_dead_and_slow_shards_fail_only_their_requests_and_come_back(serve):
    served = serve("--placement", "capacity", "--shards", "2", "--deadline-ms", "300")
    client = served.client()
    placement = client.info()["placement"]
    tables_on = {s: sorted({p[0] for p in placement["parts"] if p[1] == s}) for s in (0, 1)}
    needs = {s: only_tables(tables_on[s]).to_arrow() for s in (0, 1)}
    pids = served.ready["shard_pids"]

    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: not alive(pids[1]), 10, "shard 1 to die")
    with pytest.raises(flight.FlightServerError, match=r"shard 1 at 127\.0\.0\.1:\d+ \(tables t"):
        client.score(needs[1], timeout_s=10)
    client.score(needs[0], timeout_s=10)  # shard 0 still answers

    def back() -> bool:
        try:
            client.score(needs[1], timeout_s=10)
            return True
        except flight.FlightServerError:
            return False

    wait_until(back, 60, "the restarted shard 1 to answer")
    assert "shard 1 is back" in served.log()

    os.kill(pids[0], signal.SIGSTOP)  # a shard that hangs
    try:
        start = time.monotonic()
        with pytest.raises(flight.FlightServerError, match=r"shard 0 at .* did not answer within 300 ms"):
            client.score(needs[0], timeout_s=10)
        assert time.monotonic() - start < 5
        client.score(needs[1], timeout_s=10)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    wait_until(back, 30, "shard 1 after shard 0 resumed")
    client.score(needs[0], timeout_s=10)
    client.close()


def test_beyond_loopback_a_token_is_required_and_checked(serve, spawn, tmp_path):
    proc, stderr = spawn("serve", "--spec", serve.spec_file, "--table-scale", "1", "--host", "0.0.0.0")
    assert proc.wait(timeout=60) == 2
    stderr.seek(0)
    assert "--host 0.0.0.0 is not loopback: a token is required" in stderr.read().decode()

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    served = serve("--host", "0.0.0.0", "--token-file", str(token), "--placement", "capacity", "--shards", "2",
                   "--max-items", "16")
    anonymous = served.client()
    with pytest.raises(flight.FlightUnauthenticatedError):
        anonymous.score(only_tables([0]).to_arrow(), timeout_s=10)
    anonymous.close()
    wait_until(lambda: "main shard: refused a do_exchange call without a valid token" in served.log(), 10,
               "the refusal to be logged")
    client = served.client("s3cret-token")
    with pytest.raises(flight.FlightServerError, match=r"40 items; allowed 1\.\.16 \(--max-items\)"):
        client.score(only_tables([0], items=40).to_arrow(), timeout_s=10)
    with pytest.raises(flight.FlightServerError, match="id 999 outside"):
        bad = only_tables([0])
        bad.bags[0].ids[:] = 999
        client.score(bad.to_arrow(), timeout_s=10)
    logits, meta = client.score(only_tables([0, 1, 2, 3]).to_arrow(), timeout_s=10)  # still serving
    assert logits.shape == (3,) and meta["shards"] >= 1
    client.close()


def test_loadgen_reports_and_a_stopped_server_leaves_no_process(serve, spawn, tmp_path):
    served = serve("--placement", "coaccess", "--shards", "2")
    out = tmp_path / "load.json"
    proc, stderr = spawn("loadgen", "--address", served.address, "--qps", "50", "--requests", "30",
                         "--duration", "20", "--slo-ms", "500", "--out", str(out), stdout=subprocess.PIPE)
    printed = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, printed
    assert "latency ms: p50" in printed and "CPU ms/request" in printed
    summary = json.loads(out.read_text())
    for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "throughput_rps", "serialize_ms", "network_ms",
                "lookup_ms", "dense_ms", "shards_per_request", "fanout_bytes_per_request", "cpu_ms_per_request",
                "shard_load_imbalance", "shard_peak_rss_mb", "slo_met"):
        assert key in summary
    assert summary["ok"] == 30 and 1 <= summary["shards_per_request"] <= 2 and summary["cpu_ms_per_request"] > 0

    shards = served.ready["shard_pids"]
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    wait_until(lambda: not any(alive(p) for p in shards), 10, "the shards to end with the server")

    killed = serve("--placement", "capacity", "--shards", "2")
    shards = killed.ready["shard_pids"]
    killed.proc.kill()  # no chance to clean up: the shards must still go
    killed.proc.wait(timeout=10)
    try:
        wait_until(lambda: not any(alive(p) for p in shards), 30, "the shards of a killed server to end")
    except AssertionError:
        print([open(f"/proc/{x}/stat").read() if os.path.exists(f"/proc/{x}") else "gone" for x in shards])
        print(killed.log())
        raise


def test_infer_bench_runs_every_placement_side_by_side(serve, spawn, tmp_path):
    out = tmp_path / "bench"
    proc, stderr = spawn("infer-bench", "--spec", serve.spec_file, "--table-scale", "1", "--shards", "2",
                         "--qps", "40", "--requests", "8", "--rounds", "2", "--warmup", "2", "--items", "4",
                         "--out", str(out), stdout=subprocess.PIPE)
    printed = proc.communicate(timeout=300)[0].decode()
    stderr.seek(0)
    assert proc.returncode == 0, printed + stderr.read().decode()[-3000:]
    rows = json.loads((out / "infer.json").read_text())
    assert [(r["placement"], r["shards"]) for r in rows] == [("local", 0), ("single", 1), ("capacity", 2),
                                                            ("load", 2), ("coaccess", 2)]
    for r in rows:
        assert r["scores_match_local"] is True and r["errors"] == 0 and r["requests"] == 8
        for key in ("p50_ms", "p99_ms", "cpu_ms_per_request", "shards_per_request", "qps"):
            assert r[key] == r[key]  # present, not NaN
    assert (out / "infer.csv").read_text().startswith("spec,placement,shards,qps")
    assert (out / "infer.png").stat().st_size > 10_000
    assert "scores_match_local" not in printed or "False" not in printed
