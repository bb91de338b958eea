"""Pooling, the fan-out and the Flight endpoints, in-process (servers on loopback ports, no processes).

The distributed path must give the single-process bits for every placement, including
tables split by rows; a dead or slow shard fails only the requests that need it, naming
it; a bad, oversized or unauthenticated request is refused and the server keeps serving.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow.flight as flight
import pytest
import torch

from bagpipe.config import ConfigError
from bagpipe.rows import RowSpace
from bagpipe.serving.loadgen import ScoringClient
from bagpipe.serving.main_shard import MainShard
from bagpipe.serving.placement import Strategy, place
from bagpipe.serving.pooling import pool, pool_gathered
from bagpipe.serving.requests import Bags, ItemCount, Request, RequestLimits, SpecRequests, access_stats
from bagpipe.serving.rpc import Security, call_action, encode_query, exchange, LOOKUP
from bagpipe.serving.shard import SparseShard
from bagpipe.serving.source import ModelSource
from bagpipe.serving.spec import ModelSpec, PoolingMode

ROW_BYTES_DIM8 = 8 * 4


def tiny_spec(model: str = "dlrm", mode: str = "sum") -> ModelSpec:
    return ModelSpec.from_dict({
        "name": f"tiny-{model}", "model": model, "embedding_dim": 8, "num_dense": 3, "bottom_mlp": [8],
        "top_mlp": [8], "deep_mlp": [8], "cross_layers": 1, "seed": 11, "pooling_mode": mode,
        "tables": [{"rows": 300, "pooling": 4, "coverage": 1.0}, {"rows": 40, "pooling": 1, "coverage": 0.6},
                   {"rows": 120, "pooling": 2, "coverage": 0.5}, {"rows": 60, "pooling": 3, "coverage": 0.8}]})


class Stack:
    """A main shard and its in-process sparse shards."""

    def __init__(self, spec: ModelSpec, strategy: Strategy, shards: int = 2, capacity_rows: int | None = None,
                 security: Security = Security(), host: str = "127.0.0.1", limits: RequestLimits = RequestLimits(),
                 deadline_s: float = 5.0) -> None:
        self.source = ModelSource(spec.model_config(), spec.seed, spec)
        self.stats = access_stats(SpecRequests(spec, ItemCount.parse("6"), seed=9).take(0, 50))
        row_dim = spec.model_config().row_dim
        capacity = None if capacity_rows is None else capacity_rows * row_dim * 4
        self.placement = place(strategy, spec.cardinalities, row_dim, self.stats, shards, capacity)
        self.args = (limits, security, host)
        count = self.placement.shards if self.placement.remote else 0
        self.shards = [SparseShard.build(self.source, self.placement, i, limits, security, host, 0)
                       for i in range(count)]
        self.main = MainShard(self.source, self.placement, limits, security, host, 0,
                              [f"127.0.0.1:{s.port}" for s in self.shards], deadline_s)
        self.client = ScoringClient(f"127.0.0.1:{self.main.port}", security)

    def restart_shard(self, index: int) -> None:
        self.shards[index].shutdown()
        self.shards[index] = SparseShard.build(self.source, self.placement, index, *self.args, 0)
        self.main.reconnect(index, f"127.0.0.1:{self.shards[index].port}")

    def close(self) -> None:
        self.client.close()
        self.main.close()
        for s in self.shards:
            s.shutdown()


@pytest.fixture
def stacks():
    made: list[Stack] = []

    def make(*args, **kwargs) -> Stack:
        made.append(Stack(*args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def requests_of(spec: ModelSpec, count: int = 12, items: str = "uniform:1:9"):
    return SpecRequests(spec, ItemCount.parse(items), seed=4).take(0, count)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_embedding_bag_adds_each_bag_in_order_so_gathered_rows_pool_alike():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=gen)
    for lengths in ([3, 0, 7, 1, 0], [40], [1] * 9, [0, 0]):
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
        ids = torch.randint(0, 50, (int(sum(lengths)),), generator=gen)
        for mode in PoolingMode:
            direct = pool(weight, ids, offsets, mode)
            gathered = pool_gathered(weight[ids], offsets, mode)
            reference = torch.zeros(len(lengths), 16)
            for bag, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
                for k in range(lo, hi):  # one row after another, in the order given
                    reference[bag] += weight[ids[k]]
                if mode is PoolingMode.MEAN and hi > lo:
                    reference[bag] /= float(hi - lo)
            assert torch.equal(direct, gathered) and torch.equal(direct, reference)


@pytest.mark.parametrize("model", ["dlrm", "dcn", "wide_deep", "deepfm"])
def test_every_placement_scores_the_single_process_bits(stacks, model):
    spec = tiny_spec(model, "mean" if model == "dcn" else "sum")
    requests = requests_of(spec)
    # the single-process computation, from scratch: full tables, pooled, the dense model
    source = ModelSource(spec.model_config(), spec.seed, spec)
    dense_model = source.load_dense()
    space = RowSpace(spec.cardinalities, spec.model_config().row_dim, spec.seed)
    tables = [space.init_tensor(np.arange(c) + space.offsets[t]) for t, c in enumerate(spec.cardinalities)]
    expected = []
    with torch.inference_mode():
        for r in requests:
            emb = torch.stack([pool(tables[t], torch.from_numpy(b.ids), torch.from_numpy(b.offsets), spec.pooling_mode)
                               for t, b in enumerate(r.bags)], dim=1)
            expected.append(dense_model(torch.from_numpy(r.dense), emb).numpy())
    configs = [(Strategy.LOCAL, 1, None), (Strategy.SINGLE, 1, None), (Strategy.CAPACITY, 3, None),
               (Strategy.LOAD, 2, None), (Strategy.COACCESS, 2, 300),
               (Strategy.CAPACITY, 3, 200)]  # the 300-row table split by rows over shards
    for strategy, shards, capacity in configs:
        stack = stacks(spec, strategy, shards, capacity)
        if capacity == 200:
            assert stack.placement.split_tables == [0]
        for r, want in zip(requests, expected):
            logits, meta = stack.client.score(r.to_arrow())
            assert np.array_equal(bits(logits), bits(want)), (strategy, shards)
            assert meta["shards"] == (0 if strategy is Strategy.LOCAL else len(stack.main.router.shards_of(
                np.flatnonzero(r.touched()))))


def only_tables(spec: ModelSpec, tables: list[int], items: int = 3) -> Request:
    """A request that touches just `tables` (one id each per item)."""
    bags = tuple(Bags.from_lengths(np.ones(items, np.int64), np.arange(items) % spec.cardinalities[t])
                 if t in tables else Bags.empty(items) for t in range(spec.num_tables))
    return Request(np.zeros((items, spec.num_dense), np.float32), bags)


def test_a_dead_shard_fails_only_the_requests_that_need_it_and_is_picked_up_again(stacks):
    spec = tiny_spec()
    stack = stacks(spec, Strategy.CAPACITY, 2)
    on_0, on_1 = stack.placement.tables_on(0), stack.placement.tables_on(1)
    stack.shards[1].shutdown()
    stack.client.score(only_tables(spec, on_0).to_arrow(), timeout_s=10)  # does not need shard 1
    with pytest.raises(flight.FlightServerError, match=r"shard 1 at 127\.0\.0\.1:\d+ \(tables t\d"):
        stack.client.score(only_tables(spec, on_1).to_arrow(), timeout_s=10)
    stack.restart_shard(1)
    logits, meta = stack.client.score(only_tables(spec, on_0 + on_1).to_arrow(), timeout_s=10)
    assert meta["shards"] == 2 and np.isfinite(logits).all()


def test_a_slow_shard_times_out_at_the_deadline_naming_it(stacks):
    spec = tiny_spec()
    stack = stacks(spec, Strategy.CAPACITY, 2, deadline_s=0.2)
    slow = stack.shards[1].store
    lookup = slow.lookup_all
    slow.lookup_all = lambda *a: (time.sleep(0.6), lookup(*a))[1]
    start = time.perf_counter()
    with pytest.raises(flight.FlightServerError, match=r"shard 1 at .* did not answer within 200 ms"):
        stack.client.score(only_tables(spec, stack.placement.tables_on(1)).to_arrow(), timeout_s=10)
    assert time.perf_counter() - start < 0.55
    stack.client.score(only_tables(spec, stack.placement.tables_on(0)).to_arrow(), timeout_s=10)
    slow.lookup_all = lookup
    stack.client.score(only_tables(spec, stack.placement.tables_on(1)).to_arrow(), timeout_s=10)


def test_beyond_loopback_a_token_is_required_and_bad_requests_leave_the_server_up(stacks, caplog):
    spec = tiny_spec()
    with pytest.raises(ConfigError, match="--host 0.0.0.0 is not loopback: a token is required"):
        Security().check_bind("0.0.0.0")
    secure = Security(token="s3cret")
    stack = stacks(spec, Strategy.CAPACITY, 2, security=secure, host="0.0.0.0",
                   limits=RequestLimits(max_items=8, max_ids=100))
    request = only_tables(spec, [0, 1, 2, 3]).to_arrow()
    anonymous = ScoringClient(f"127.0.0.1:{stack.main.port}", Security())
    with caplog.at_level(logging.WARNING, logger="bagpipe.serving"):
        with pytest.raises(flight.FlightUnauthenticatedError):
            anonymous.score(request, timeout_s=10)
        with pytest.raises(flight.FlightUnauthenticatedError):  # the shards check the token too
            exchange(secure.client(f"127.0.0.1:{stack.shards[0].port}"), LOOKUP,
                     encode_query([0], [Bags.empty(1)]), Security().call_options(10))
    anonymous.close()
    assert "main shard: refused a do_exchange call without a valid token" in caplog.text
    assert "shard 0: refused" in caplog.text
    wrong = ScoringClient(f"127.0.0.1:{stack.main.port}", Security(token="guess"))
    with pytest.raises(flight.FlightUnauthenticatedError):
        wrong.info()
    wrong.close()
    bad = {"12 items; allowed 1..8": only_tables(spec, [0], items=12).to_arrow(),
           "ids; at most 100 allowed": Request(np.zeros((2, 3), np.float32), tuple(
               Bags.from_lengths(np.array([60, 60]), np.zeros(120, np.int64)) for _ in range(4))).to_arrow(),
           "id 300 outside": Request(np.zeros((1, 3), np.float32), (Bags.from_lengths(np.ones(1), np.array([300])),
                                                                     *[Bags.empty(1)] * 3)).to_arrow(),
           "4 tables": only_tables(spec, [0]).to_arrow().drop_columns(["t3"])}
    for message, batch in bad.items():
        with pytest.raises(flight.FlightServerError, match=message):
            stack.client.score(batch, timeout_s=10)
    logits, _ = stack.client.score(request, timeout_s=10)  # still serving
    assert logits.shape == (3,)
    stats = stack.client.stats()
    assert stats["main"]["errors"] == 4 and stats["main"]["requests"] == 1 and len(stats["shards"]) == 2


def test_a_shard_refuses_tables_and_rows_it_does_not_hold(stacks):
    spec = tiny_spec()
    stack = stacks(spec, Strategy.CAPACITY, 3, capacity_rows=200)
    part = next(p for p in stack.placement.parts if not stack.placement.is_whole(p))
    shard = stack.shards[part.shard]
    client = Security().client(f"127.0.0.1:{shard.port}")
    other = next(t for t in range(4) if t not in stack.placement.tables_on(part.shard))
    outside = part.row_hi if part.row_hi < spec.cardinalities[part.table] else part.row_lo - 1
    for table, ids, message in ((other, [0], f"tables \\[{other}\\] are not held here"),
                                (part.table, [outside], f"id {outside} outside \\[{part.row_lo}, {part.row_hi}\\)")):
        with pytest.raises(flight.FlightServerError, match=message):
            exchange(client, LOOKUP, encode_query([table], [Bags.from_lengths(np.ones(1), np.array(ids))]),
                     Security().call_options(10))
    out, meta = exchange(client, LOOKUP, encode_query([part.table], [Bags.from_lengths(np.ones(1),
                                                                                       np.array([part.row_lo]))]),
                         Security().call_options(10))
    assert out.num_rows == 1 and meta["lookup_ms"] >= 0
    assert call_action(client, "info", Security().call_options(10))["parts"]
    client.close()


def test_tls_with_a_token_end_to_end(stacks, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    secure = Security(token="t", tls_cert=str(cert), tls_key=str(key))
    spec = tiny_spec()
    stack = stacks(spec, Strategy.CAPACITY, 2, security=secure, host="0.0.0.0")
    logits, meta = stack.client.score(only_tables(spec, [0, 1, 2, 3]).to_arrow(), timeout_s=10)  # TLS to the shards too
    assert meta["shards"] == 2 and logits.shape == (3,)
    plain = ScoringClient(f"127.0.0.1:{stack.main.port}", Security(token="t"))
    with pytest.raises(flight.FlightError):
        plain.score(only_tables(spec, [0]).to_arrow(), timeout_s=5)
    plain.close()
