"""A sparse shard: holds the tables (or row ranges) a placement gives it and answers lookups.

``bagpipe shard --placement-file F --index i`` builds only shard i's rows (`source`),
then serves ``do_exchange(lookup)``: one list<int64> column per table asked for in, one
column of float32 vectors out (pooled per item for a whole table, the rows of the ids
for a row range). Every request is checked (tables held, ids in range, size limits);
a bad one is answered with an error naming the field, and the shard keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import pyarrow.flight as flight
import torch

from bagpipe.metrics import peak_rss_kb

from .placement import ShardPlacement
from .requests import RequestError, RequestLimits
from .rpc import LOOKUP, Security, action_result, answer, bad_request, decode_query, encode_vectors, read_one, \
    wait_for_signal
from .source import ModelSource
from .store import TableStore

log = logging.getLogger("bagpipe.serving")
PARENT_ENV = "BAGPIPE_PARENT_PID"


class ShardCounters:
    """What a server did, for the ``stats`` action (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.errors = self.ids = 0
        self.busy_s = 0.0

    def add(self, ids: int, busy_s: float) -> None:
        with self._lock:
            self.requests += 1
            self.ids += ids
            self.busy_s += busy_s

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "errors": self.errors, "ids": self.ids, "busy_s": self.busy_s,
                    "cpu_s": time.process_time(), "peak_rss_kb": peak_rss_kb(), "pid": os.getpid()}


class SparseShard(flight.FlightServerBase):
    def __init__(self, index: int, store: TableStore, limits: RequestLimits, security: Security, host: str,
                 port: int) -> None:
        super().__init__(**security.server_options(host, port, f"shard {index}"))
        self.index, self.store, self.limits = index, store, limits
        self.counters = ShardCounters()

    @classmethod
    def build(cls, source: ModelSource, placement: ShardPlacement, index: int, limits: RequestLimits,
              security: Security, host: str, port: int) -> "SparseShard":
        """Shard `index` of `placement`, holding just its parts' rows."""
        parts = placement.parts_on(index)
        store = TableStore(parts, source.load_rows(parts), placement.cardinalities, source.pooling_mode)
        return cls(index, store, limits, security, host, port)

    def do_exchange(self, context, descriptor, reader, writer):
        start = time.perf_counter()
        try:
            if descriptor.command != LOOKUP:
                raise RequestError(f"unknown command {descriptor.command!r}; a shard answers {LOOKUP!r}")
            tables, bags = decode_query(read_one(reader))
            ids = sum(b.count for b in bags)
            if ids > self.limits.max_ids or any(b.items > self.limits.max_items for b in bags):
                raise RequestError(f"{ids} ids for up to {max(b.items for b in bags)} items; at most "
                                   f"{self.limits.max_ids} ids and {self.limits.max_items} items allowed")
            self.store.check(tables, bags)
        except RequestError as err:
            self.counters.error()
            raise bad_request(err) from None
        t_lookup = time.perf_counter()
        with torch.inference_mode():
            vectors = self.store.lookup_all(tables, bags)
        t_encode = time.perf_counter()
        flat = torch.cat(vectors).numpy() if vectors else np.zeros((0, self.store.row_dim), np.float32)
        batch = encode_vectors(flat)
        end = time.perf_counter()
        answer(writer, batch, {"lookup_ms": (t_encode - t_lookup) * 1e3, "handle_ms": (end - start) * 1e3})
        self.counters.add(ids, end - start)

    def do_action(self, context, action):
        if action.type == "stats":
            return action_result(self.counters.snapshot())
        if action.type == "info":
            return action_result({"index": self.index, "parts": [[p.table, p.row_lo, p.row_hi]
                                                                  for p in self.store.parts.values()],
                                  "bytes": self.store.nbytes, "rows": self.store.rows, "pid": os.getpid()})
        raise flight.FlightServerError(f"unknown action {action.type!r}; a shard answers info, stats")

    def list_actions(self, context):
        return [("info", "parts held, bytes, pid"), ("stats", "requests, ids, CPU seconds, peak RSS")]


def read_placement_file(path: str) -> tuple[ModelSource, ShardPlacement, RequestLimits]:
    with open(path) as f:
        data = json.load(f)
    return (ModelSource.from_dict(data["source"]), ShardPlacement.from_dict(data["placement"]),
            RequestLimits(**data["limits"]))


def write_placement_file(path: str, source: ModelSource, placement: ShardPlacement, limits: RequestLimits) -> None:
    """Under a temporary name, then renamed."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"source": source.to_dict(), "placement": placement.to_dict(),
                   "limits": {"max_items": limits.max_items, "max_ids": limits.max_ids}}, f)
    os.replace(tmp, path)


def die_with_parent() -> None:
    """When started by another serving process (PARENT_ENV set: `bagpipe serve` starts shards,
    `infer-bench` starts `serve`): end with the parent, even a killed one (SIGTERM on its death)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(1)


def run_shard(args: argparse.Namespace) -> int:
    die_with_parent()
    torch.set_num_threads(args.threads)
    security = Security.from_args(args.token_file, args.tls_cert, args.tls_key)
    security.check_bind(args.host)
    source, placement, limits = read_placement_file(args.placement_file)
    if not 0 <= args.index < placement.shards:
        raise SystemExit(f"--index {args.index}: the placement has shards 0..{placement.shards - 1}")
    server = SparseShard.build(source, placement, args.index, limits, security, args.host, args.port)
    ready = {"ready": "shard", "index": args.index, "port": server.port, "pid": os.getpid(),
             "tables": len(server.store.parts), "bytes": server.store.nbytes}
    print(json.dumps(ready), flush=True)
    os.dup2(2, 1)  # nothing else goes to stdout: a parent may stop reading it
    log.info("shard %d serving %d parts (%.1f MB) on %s:%d", args.index, len(server.store.parts),
             server.store.nbytes / 1e6, args.host, server.port)
    try:
        wait_for_signal()
    finally:
        server.shutdown()
    return 0
