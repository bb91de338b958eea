"""The main shard: takes scoring requests, fans the sparse part out, runs the dense part.

``do_exchange(score)``: a request batch in (see `requests`), logits out (float32 per
item) with the request's time split as JSON metadata. The fan-out contacts only the
shards holding a table the request touches, all at once (one `FlightClient` per shard,
calls on a thread pool, each bounded by ``--deadline-ms``); a shard that fails or is
late fails just the requests that need it, with an error naming the shard, and the
server keeps answering the others. ``--placement local`` holds every table in this
process and looks them up through the same `Router`, without any remote call.

`serve` is ``bagpipe serve``: the model source, the placement (from sampled requests),
K shard processes (or ``--shard-addresses`` of running ones), then this server until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch

from bagpipe.config import ConfigError
from bagpipe.embedding import aligned
from bagpipe.export import ExportedModel

from .fanout import Route, Router, ShardQuery, split_answer
from .placement import AccessStats, ShardPlacement, Strategy, default_capacity, place
from .requests import DatasetRequests, ItemCount, RequestError, RequestLimits, RequestShape, SpecRequests, \
    access_stats
from .rpc import LOOKUP, SCORE, Security, action_result, answer, bad_request, call_action, decode_vectors, \
    encode_query, exchange, flight_message, read_one, wait_for_signal
from .shard import ShardCounters, die_with_parent, write_placement_file
from .source import ModelSource
from .store import TableStore
from .supervisor import ShardProcesses, StartError, child_env

log = logging.getLogger("bagpipe.serving")
LOGIT = "logit"


class ShardError(RuntimeError):
    """A shard that failed, refused or missed the deadline for one request."""


@dataclass
class ShardAnswer:
    vectors: list[np.ndarray]
    call_ms: float  # as the main shard saw it
    handle_ms: float  # inside the shard: decode, lookup, encode
    lookup_ms: float
    bytes_out: int
    bytes_in: int


class ShardClient:
    """One connection to one sparse shard."""

    def __init__(self, index: int, address: str, security: Security, row_dim: int, deadline_s: float) -> None:
        self.index, self.security, self.row_dim, self.deadline_s = index, security, row_dim, deadline_s
        self._lock = threading.Lock()
        self.connect(address)

    def connect(self, address: str) -> None:
        client = self.security.client(address)
        with self._lock:
            old, self.client, self.address = getattr(self, "client", None), client, address
        if old is not None:
            old.close()

    def name(self, query: ShardQuery | None = None) -> str:
        held = f" (tables {', '.join(f't{t}' for t in query.tables)})" if query is not None else ""
        return f"shard {self.index} at {self.address}{held}"

    def lookup(self, query: ShardQuery) -> ShardAnswer:
        batch = encode_query(query.tables, query.bags)
        start = time.perf_counter()
        try:
            out, meta = exchange(self.client, LOOKUP, batch, self.security.call_options(self.deadline_s))
            vectors = split_answer(decode_vectors(out, self.row_dim), query)
        except flight.FlightTimedOutError:
            raise ShardError(f"{self.name(query)} did not answer within {self.deadline_s * 1e3:.0f} ms "
                             f"(--deadline-ms)") from None
        except flight.FlightUnavailableError as err:
            raise ShardError(f"{self.name(query)} is unavailable: {flight_message(err)}") from None
        except (flight.FlightError, pa.ArrowException, ValueError) as err:
            raise ShardError(f"{self.name(query)} failed: {flight_message(err)}") from None
        call_ms = (time.perf_counter() - start) * 1e3
        return ShardAnswer(vectors, call_ms, float(meta.get("handle_ms", 0.0)), float(meta.get("lookup_ms", 0.0)),
                           batch.nbytes, out.nbytes)

    def action(self, name: str, timeout_s: float = 2.0) -> dict:
        return call_action(self.client, name, self.security.call_options(timeout_s))


class RemoteShards:
    """The parallel fan-out over one client per shard."""

    def __init__(self, clients: list[ShardClient]) -> None:
        self.clients = clients
        self.pool = ThreadPoolExecutor(max_workers=max(8, 4 * len(clients)), thread_name_prefix="fanout")

    def run(self, route: Route) -> dict[int, ShardAnswer]:
        """Every shard's answer; the first shard's call runs in this thread (no hand-off), the others
        on the pool at the same time."""
        if not route.queries:
            return {}
        (first, query), *others = route.queries.items()
        futures = {s: self.pool.submit(self.clients[s].lookup, q) for s, q in others}
        errors = []
        answers = {}
        try:
            answers[first] = self.clients[first].lookup(query)
        except ShardError as err:
            errors.append(str(err))
        deadline = max(c.deadline_s for c in self.clients) + 5.0  # the calls' own deadlines end them first
        wait(futures.values(), timeout=deadline)
        for s, future in futures.items():
            if not future.done():
                errors.append(f"{self.clients[s].name(route.queries[s])} did not answer within {deadline:.0f} s")
            elif future.exception() is not None:
                errors.append(str(future.exception()))
            else:
                answers[s] = future.result()
        if errors:
            raise ShardError("; ".join(errors))
        return answers

    def stats(self) -> list[dict]:
        def one(client: ShardClient) -> dict:
            try:
                return {"index": client.index, "address": client.address, "up": True, **client.action("stats", 2.0)}
            except (flight.FlightError, pa.ArrowException) as err:
                return {"index": client.index, "address": client.address, "up": False, "error": flight_message(err)}

        return list(self.pool.map(one, self.clients))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients:
            c.client.close()


class MainShard(flight.FlightServerBase):
    """The main shard of a placement, over its shards at `shard_addresses` (none for local)."""

    def __init__(self, source: ModelSource, placement: ShardPlacement, limits: RequestLimits, security: Security,
                 host: str, port: int, shard_addresses: list[str], deadline_s: float, info: dict | None = None,
                 exported: ExportedModel | None = None) -> None:
        self.model = source.load_dense(exported)
        self.local: TableStore | None = None
        self.remote: RemoteShards | None = None
        if not placement.remote:
            parts = list(placement.parts)
            self.local = TableStore(parts, source.load_rows(parts, exported), placement.cardinalities,
                                    source.pooling_mode)
        else:
            if len(shard_addresses) != placement.shards:
                raise ConfigError(f"{len(shard_addresses)} shard addresses for a placement of {placement.shards} "
                                  f"shards")
            clients = [ShardClient(i, a, security, placement.row_dim, deadline_s) for i, a in enumerate(shard_addresses)]
            self.remote = RemoteShards(clients)
            try:
                _check_shards(clients, placement)
            except BaseException:
                self.remote.close()
                raise
        super().__init__(**security.server_options(host, port, "main shard"))
        self.source, self.placement, self.limits = source, placement, limits
        self.info = {"model": dataclasses.asdict(source.model), "spec": source.spec.to_dict(),
                     "placement": placement.to_dict(), "limits": dataclasses.asdict(limits),
                     "shards": list(shard_addresses), **(info or {})}
        self.shape = RequestShape.of(source.model)
        self.router = Router(placement, source.pooling_mode)
        self.counters = ShardCounters()

    def reconnect(self, shard: int, address: str) -> None:
        """A restarted shard, now at `address`."""
        self.remote.clients[shard].connect(address)
        self.info["shards"][shard] = address

    def close(self) -> None:
        self.shutdown()
        if self.remote is not None:
            self.remote.close()

    def do_exchange(self, context, descriptor, reader, writer):
        start = time.perf_counter()
        try:
            if descriptor.command != SCORE:
                raise RequestError(f"unknown command {descriptor.command!r}; the main shard answers {SCORE!r}")
            request = self.shape.decode(read_one(reader), self.limits)
        except RequestError as err:
            self.counters.error()
            raise bad_request(err) from None
        t_route = time.perf_counter()
        route = self.router.route(request)
        meta = {"shards": len(route.queries) if self.remote is not None else 0, "bytes_out": 0, "bytes_in": 0,
                "shard_handle_ms": 0.0, "shard_call_ms": 0.0}
        t_fan = time.perf_counter()
        with torch.inference_mode():
            if self.remote is None:
                answers = {s: self.local.lookup_all(q.tables, q.bags) for s, q in route.queries.items()}
                t_done = time.perf_counter()
                meta["lookup_ms"] = (t_done - t_fan) * 1e3
            else:
                try:
                    remote = self.remote.run(route)
                except ShardError as err:
                    self.counters.error()
                    raise flight.FlightServerError(str(err)) from None
                t_done = time.perf_counter()
                answers = {s: a.vectors for s, a in remote.items()}
                slowest = max(remote.values(), key=lambda a: a.call_ms, default=None)
                if slowest is not None:
                    meta.update(lookup_ms=slowest.lookup_ms, shard_handle_ms=slowest.handle_ms,
                                shard_call_ms=slowest.call_ms)
                meta["bytes_out"] = sum(a.bytes_out for a in remote.values())
                meta["bytes_in"] = sum(a.bytes_in for a in remote.values())
            emb = self.router.assemble(route, answers)
            t_dense = time.perf_counter()
            logits = self.model(aligned(torch.from_numpy(request.dense)), aligned(torch.from_numpy(emb)))
        t_encode = time.perf_counter()
        batch = pa.record_batch([pa.array(logits.numpy())], names=[LOGIT])
        meta.update(decode_ms=(t_route - start) * 1e3, route_ms=(t_fan - t_route) * 1e3,
                    fanout_ms=(t_done - t_fan) * 1e3, assemble_ms=(t_dense - t_done) * 1e3,
                    dense_ms=(t_encode - t_dense) * 1e3)
        meta["server_ms"] = (time.perf_counter() - start) * 1e3
        answer(writer, batch, meta)
        self.counters.add(request.total_ids, time.perf_counter() - start)

    def do_action(self, context, action):
        if action.type == "stats":
            shards = self.remote.stats() if self.remote is not None else []
            return action_result({"main": self.counters.snapshot(), "shards": shards})
        if action.type == "info":
            return action_result(self.info)
        raise flight.FlightServerError(f"unknown action {action.type!r}; the main shard answers info, stats")

    def list_actions(self, context):
        return [("info", "model, spec, placement, limits, shards"),
                ("stats", "counters and CPU seconds of the main shard and every shard")]


def request_source(source: ModelSource, data: str | None, items: ItemCount, seed: int, max_items: int):
    """Where requests for `source` come from: real ids of a dataset, else its spec."""
    if data is not None:
        return DatasetRequests(data, source.model, items, seed, max_items)
    return SpecRequests(source.spec, items, seed, max_items)


def placement_stats(source: ModelSource, data: str | None, items: ItemCount, count: int, seed: int,
                    max_items: int) -> AccessStats:
    requests = request_source(source, data, items, seed, max_items)
    return access_stats(requests.take(1 << 30, count))  # indices apart from any load's


def make_placement(source: ModelSource, strategy: Strategy, shards: int, stats: AccessStats,
                   capacity_mb: float | None, slack: float) -> ShardPlacement:
    cards, row_dim = source.model.cardinalities, source.model.row_dim
    capacity = int(capacity_mb * 1e6) if capacity_mb is not None else default_capacity(cards, row_dim, shards, slack)
    return place(strategy, cards, row_dim, stats, shards, capacity)


def serve(args: argparse.Namespace) -> int:
    die_with_parent()  # when started by infer-bench
    torch.set_num_threads(args.threads)
    security = Security.from_args(args.token_file, args.tls_cert, args.tls_key, args.tls_root)
    security.check_bind(args.host)
    limits = RequestLimits(args.max_items, args.max_ids_per_request)
    source, exported = ModelSource.open(args.spec, args.checkpoint, args.table_scale)
    strategy = Strategy.parse(args.placement)
    stats = placement_stats(source, args.data, ItemCount.parse(args.items), args.stats_requests, args.seed,
                            limits.max_items)
    placement = make_placement(source, strategy, args.shards, stats, args.shard_capacity_mb, args.capacity_slack)
    workdir = tempfile.mkdtemp(prefix="bagpipe-serve-")
    placement_file = args.placement_out or os.path.join(workdir, "placement.json")
    write_placement_file(placement_file, source, placement, limits)
    processes = server = None
    try:
        addresses = []
        if placement.remote and args.shard_addresses:
            addresses = args.shard_addresses.split(",")
        elif placement.remote:
            shard_args = ["--threads", str(args.threads)]
            for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
                if value:
                    shard_args += [flag, value]
            env = child_env({"BAGPIPE_TOKEN": security.token} if security.token else None)
            processes = ShardProcesses(placement_file, placement.shards, shard_args, env, args.start_timeout,
                                       on_restart=lambda i, address: server and server.reconnect(i, address))
            addresses = processes.start()
        info = {"shard_pids": processes.pids() if processes else [], "pid": os.getpid(),
                "shards_per_request": placement.shards_per_request(stats)}
        server = MainShard(source, placement, limits, security, args.host, args.port, addresses,
                           args.deadline_ms / 1e3, info, exported)
        del exported  # a remote placement keeps only the dense part here
        ready = {"ready": "main", "port": server.port, "address": f"{args.host}:{server.port}",
                 "placement": strategy.value, "shards": addresses, "pid": os.getpid(),
                 "shard_pids": info["shard_pids"]}
        print(json.dumps(ready), flush=True)
        os.dup2(2, 1)
        log.info("main shard serving %s (%s, %d shards) on %s:%d", source.spec.name, strategy, len(addresses),
                 args.host, server.port)
        wait_for_signal()
    finally:
        if server is not None:
            server.close()
        if processes is not None:
            processes.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _check_shards(clients: list[ShardClient], placement: ShardPlacement) -> None:
    """Each shard holds exactly the parts the placement gives it (attached shards could differ)."""
    for client in clients:
        try:
            info = client.action("info", 10.0)
        except (flight.FlightError, pa.ArrowException) as err:
            raise StartError(f"shard {client.index} at {client.address}: {flight_message(err)}") from None
        want = sorted([p.table, p.row_lo, p.row_hi] for p in placement.parts_on(client.index))
        if sorted(info["parts"]) != want or info["index"] != client.index:
            raise ConfigError(f"shard {client.index} at {client.address} holds {info['parts']} as shard "
                             f"{info['index']}; the placement gives it {want}")
