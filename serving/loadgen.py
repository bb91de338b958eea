"""Open-loop load: Poisson arrivals at a target QPS against a main shard, and what they measured.

Arrivals are scheduled in advance (exponential gaps, seeded); each request is sent at
its time whatever happened to the previous ones, and its latency runs from its
scheduled time to its answer, so queueing (in the client or the server) counts as it
would for a user. A run stops by itself after ``--requests`` or ``--duration``, and
waits at most the deadline for what is still in flight.

Per request the main shard reports its time split; the client adds its own view of
the call, so each latency splits exactly into queue + serialize (decoding, routing,
assembling, the shards' own decode/encode) + network (client <-> main shard and main
shard <-> shards: gRPC, the wire, the fan-out's dispatch) + lookup (the slowest
contacted shard's pooling, or the local one) + dense.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from .main_shard import LOGIT
from .rpc import SCORE, Security, call_action, exchange, flight_message

SPLIT = ("queue_ms", "serialize_ms", "network_ms", "lookup_ms", "dense_ms")


class ScoringClient:
    """A client of one main shard (thread-safe: one connection, concurrent calls)."""

    def __init__(self, address: str, security: Security) -> None:
        self.address, self.security = address, security
        self.client = security.client(address)

    def score(self, batch: pa.RecordBatch, timeout_s: float | None = None) -> tuple[np.ndarray, dict]:
        out, meta = exchange(self.client, SCORE, batch, self.security.call_options(timeout_s))
        return out.column(LOGIT).to_numpy(), meta

    def info(self, timeout_s: float = 10.0) -> dict:
        return call_action(self.client, "info", self.security.call_options(timeout_s))

    def stats(self, timeout_s: float = 10.0) -> dict:
        return call_action(self.client, "stats", self.security.call_options(timeout_s))

    def close(self) -> None:
        self.client.close()


@dataclass
class Outcome:
    index: int
    latency_ms: float  # scheduled arrival -> answer
    split: dict | None  # SPLIT -> ms
    shards: int = 0
    fanout_bytes: int = 0  # main shard <-> sparse shards, both ways
    request_bytes: int = 0
    error: str | None = None
    logits: np.ndarray | None = None


def split_of(meta: dict, call_ms: float, queue_ms: float) -> dict:
    """Queue / serialize / network / lookup / dense of one request; they add up to its latency."""
    server = meta["server_ms"]
    lookup, dense = meta["lookup_ms"], meta["dense_ms"]
    handled = meta["shard_handle_ms"] if meta["shards"] else lookup
    network = (call_ms - server) + (meta["fanout_ms"] - handled)
    serialize = server - meta["fanout_ms"] - dense + (handled - lookup)
    return {"queue_ms": queue_ms, "serialize_ms": serialize, "network_ms": network, "lookup_ms": lookup,
            "dense_ms": dense}


def run_open_loop(client: ScoringClient, batches: list[pa.RecordBatch], qps: float, duration_s: float | None = None,
                  seed: int = 0, concurrency: int = 64, timeout_s: float = 10.0, keep_logits: bool = False,
                  first_index: int = 0) -> tuple[list[Outcome], float]:
    """Send `batches` at Poisson arrivals of rate `qps`; the outcomes and the run's wall time."""
    if not qps > 0:
        raise ValueError(f"--qps must be positive, got {qps}")
    gaps = np.random.default_rng([seed, first_index, 7]).exponential(1.0 / qps, len(batches))
    arrivals = np.cumsum(gaps) - gaps[0]
    outcomes: list[Outcome | None] = [None] * len(batches)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadgen")
    lock = threading.Lock()

    def send(k: int, scheduled: float) -> None:
        sent = time.perf_counter()
        index = first_index + k
        try:
            logits, meta = client.score(batches[k], timeout_s)
        except (flight.FlightError, pa.ArrowException) as err:
            done = time.perf_counter()
            outcome = Outcome(index, (done - scheduled) * 1e3, None, error=flight_message(err))
        else:
            done = time.perf_counter()
            split = split_of(meta, (done - sent) * 1e3, (sent - scheduled) * 1e3)
            outcome = Outcome(index, (done - scheduled) * 1e3, split, meta["shards"],
                              meta["bytes_out"] + meta["bytes_in"], batches[k].nbytes,
                              logits=logits.copy() if keep_logits else None)
        with lock:
            outcomes[k] = outcome

    start = time.perf_counter()
    futures = []
    try:
        for k, at in enumerate(arrivals):
            if duration_s is not None and at > duration_s:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, k, start + at))
        wait(futures, timeout=timeout_s + 5.0)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    elapsed = time.perf_counter() - start
    out = []
    for k in range(len(futures)):
        out.append(outcomes[k] or Outcome(first_index + k, float("nan"), None,
                                          error=f"no answer within {timeout_s + 5.0:.0f} s"))
    return out, elapsed


@dataclass
class Counters:
    """CPU seconds of every serving process and ids per shard, between two `stats` calls."""

    cpu_s: float = 0.0
    shard_ids: list[float] = field(default_factory=list)
    shard_peak_rss_mb: list[float] = field(default_factory=list)
    main_peak_rss_mb: float = 0.0

    @classmethod
    def between(cls, before: dict, after: dict) -> "Counters":
        cpu = max(0.0, after["main"]["cpu_s"] - before["main"]["cpu_s"])
        ids, rss = [], []
        for b, a in zip(before["shards"], after["shards"]):
            if a.get("up") and b.get("up") and a["pid"] == b["pid"]:
                cpu += max(0.0, a["cpu_s"] - b["cpu_s"])
                ids.append(a["ids"] - b["ids"])
            else:
                ids.append(0.0)
            rss.append(a.get("peak_rss_kb", 0) / 1024)
        return cls(cpu, ids, rss, after["main"]["peak_rss_kb"] / 1024)

    def __add__(self, other: "Counters") -> "Counters":
        ids = [a + b for a, b in zip(self.shard_ids, other.shard_ids)] if self.shard_ids else list(other.shard_ids)
        return Counters(self.cpu_s + other.cpu_s, ids, other.shard_peak_rss_mb or self.shard_peak_rss_mb,
                        max(self.main_peak_rss_mb, other.main_peak_rss_mb))


def summarize(outcomes: list[Outcome], elapsed_s: float, qps: float, counters: Counters,
              slo_ms: float | None = None) -> dict:
    """The figures of one configuration: latency percentiles, throughput, split, fan-out, CPU."""
    ok = [o for o in outcomes if o.error is None]
    lat = np.array([o.latency_ms for o in ok]) if ok else np.array([np.nan])
    p = {f"p{k}_ms": float(np.percentile(lat, q)) for k, q in (("50", 50), ("90", 90), ("99", 99), ("999", 99.9))}
    mean = (lambda xs: float(np.mean(xs)) if len(xs) else float("nan"))
    split = {key: mean([o.split[key] for o in ok]) for key in SPLIT}
    errors = sorted({o.error for o in outcomes if o.error})
    ids = np.array(counters.shard_ids, dtype=np.float64)
    out = {"requests": len(outcomes), "ok": len(ok), "errors": len(outcomes) - len(ok),
           "error_examples": errors[:3], "qps": qps, "throughput_rps": len(ok) / elapsed_s if elapsed_s else 0.0,
           **p, "mean_ms": mean(lat), **split,
           "shards_per_request": mean([o.shards for o in ok]),
           "fanout_bytes_per_request": mean([o.fanout_bytes for o in ok]),
           "request_bytes": mean([o.request_bytes for o in ok]),
           "cpu_ms_per_request": counters.cpu_s * 1e3 / max(1, len(ok)),
           "shard_load_imbalance": float(ids.max() / ids.mean()) if ids.size and ids.mean() > 0 else 1.0,
           "shard_ids_per_request": [float(x) / max(1, len(ok)) for x in ids],
           "shard_peak_rss_mb": counters.shard_peak_rss_mb, "main_peak_rss_mb": counters.main_peak_rss_mb}
    if slo_ms is not None:
        out["slo_ms"] = slo_ms
        out["slo_met"] = bool(ok) and out["p99_ms"] <= slo_ms and out["errors"] == 0
    return out


def format_summary(s: dict) -> str:
    lines = [f"requests {s['requests']} (ok {s['ok']}, errors {s['errors']}) at {s['qps']:g} QPS: "
             f"throughput {s['throughput_rps']:.1f}/s",
             f"latency ms: p50 {s['p50_ms']:.2f}  p90 {s['p90_ms']:.2f}  p99 {s['p99_ms']:.2f}  "
             f"p99.9 {s['p999_ms']:.2f}",
             "split ms: " + "  ".join(f"{k[:-3]} {s[k]:.3f}" for k in SPLIT),
             f"shards/request {s['shards_per_request']:.2f}  fan-out bytes/request "
             f"{s['fanout_bytes_per_request'] / 1e3:.1f} kB  request {s['request_bytes'] / 1e3:.1f} kB",
             f"CPU ms/request (all serving processes) {s['cpu_ms_per_request']:.2f}  shard load imbalance "
             f"{s['shard_load_imbalance']:.2f}"]
    if "slo_met" in s:
        lines.append(f"P99 target {s['slo_ms']:g} ms: {'held' if s['slo_met'] else 'missed'}")
    for e in s["error_examples"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


__all__ = ["Counters", "Outcome", "ScoringClient", "format_summary", "run_open_loop", "summarize"]
