"""The oracle role: a thin loop around the pure planners.

It reads the sparse ids of the training data ahead, runs the planner, and ships
each iteration's plans to trainers and servers through bounded queues (so it runs
ahead of training, but not unboundedly). A second thread, on its own process
group, collects the per-iteration reports of trainers and servers, combines the
digest parts and writes the run directory: the oracle is the one writer.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import torch.distributed as dist

from bagpipe import faults, wire
from bagpipe.config import RunConfig
from bagpipe.metrics import RunWriter, auc, logloss, peak_rss_kb
from bagpipe.oracle.plan import ServerPlan, server_of
from bagpipe.rows import RowSpace
from bagpipe.server import STOP_STAGE
from bagpipe.transport import Groups, PeerError, Roles, recv_array, send_array, wait
from bagpipe.trainers.common import final_digest, iteration_digest
from bagpipe.trainers.data import RunData

QUEUE_DEPTH = 32  # plans in flight per destination


class PlanSender:
    """Async sends with a bounded number in flight per destination (backpressure)."""

    def __init__(self, roles: Roles, group):
        self.roles, self.group = roles, group
        self.in_flight: dict[int, deque] = {}

    def send(self, dst: int, flat: np.ndarray) -> None:
        queue = self.in_flight.setdefault(dst, deque())
        while len(queue) >= QUEUE_DEPTH:
            for work, *_ in queue.popleft():
                wait(work, f"oracle: plan delivery to {self.roles.describe(dst)}")
        queue.append(send_array(flat, dst, self.group))

    def drain(self) -> None:
        for dst, queue in self.in_flight.items():
            while queue:
                for work, *_ in queue.popleft():
                    wait(work, f"oracle: plan delivery to {self.roles.describe(dst)}")


def _key_batches(cfg: RunConfig, data: RunData, rows: RowSpace):
    for batch in data.train_batches(columns="sparse"):
        yield np.ascontiguousarray(rows.keys_of(batch.sparse))


def make_planner(cfg: RunConfig, data: RunData, rows: RowSpace):
    T, S = cfg.cluster.trainers, cfg.cluster.servers
    batches = _key_batches(cfg, data, rows)
    if cfg.cluster.mode == "none":
        from bagpipe.oracle.nocache import plan_none

        return plan_none(T, S, batches)
    from bagpipe.oracle.lrpp import PlannerConfig, default_prefetch_distance, plan_lrpp

    distance = cfg.cluster.prefetch_distance or default_prefetch_distance(cfg.cluster.lookahead)
    pcfg = PlannerConfig(trainers=T, servers=S, lookahead=cfg.cluster.lookahead, prefetch_distance=distance,
                         cache_rows=cfg.cluster.cache_rows, total_rows=rows.total_rows)
    return plan_lrpp(pcfg, batches)


def eval_server_plans(cfg: RunConfig, data: RunData, rows: RowSpace, first_stage: int):
    """Read-only stages: per eval batch, how many rows each trainer fetches from each server."""
    T, S = cfg.cluster.trainers, cfg.cluster.servers
    per = cfg.data.batch_size // T
    stage = first_stage
    for batch in data.eval_batches():
        keys = rows.keys_of(batch.sparse)
        counts = np.zeros((S, T), dtype=np.int64)
        for k in range(T):
            uniq = np.unique(keys[k * per:(k + 1) * per])
            counts[:, k] = np.bincount(server_of(uniq, S), minlength=S)
        zeros = np.zeros(T, dtype=np.int64)
        yield [ServerPlan(stage, j, zeros, zeros, counts[j], read_only=1) for j in range(S)]
        stage += 1


def run_oracle(cfg: RunConfig, roles: Roles, groups: Groups, data: RunData) -> None:
    rows = RowSpace(cfg.model.cardinalities, cfg.model.row_dim, cfg.seed)
    writer = RunWriter(cfg.run_dir, cfg.to_dict())
    collector = MetricsCollector(cfg, roles, groups, data, writer)
    thread = threading.Thread(target=collector.run, name="metrics", daemon=True)
    thread.start()
    sender = PlanSender(roles, groups.plan)
    plan_time, plan_cpu, planned = 0.0, 0.0, 0
    planner = make_planner(cfg, data, rows)
    while True:
        start, start_cpu = time.perf_counter(), time.thread_time()
        item = next(planner, None)
        plan_time += time.perf_counter() - start
        plan_cpu += time.thread_time() - start_cpu
        if item is None:
            break
        if faults.active("early_read") and item.iteration >= 1:
            for plan in item.trainers:  # read rows one stage before their fetch lands
                plan.wait_through_stage = min(plan.wait_through_stage, item.iteration - 1) - 1
        for k, plan in enumerate(item.trainers):
            sender.send(roles.trainers[k], plan.encode())
        for j, plan in enumerate(item.servers):
            sender.send(roles.servers[j], plan.encode())
        collector.plan_stats[item.iteration] = item.stats
        planned += 1
    # wall-clock rate (shares the cores with every other role) and per CPU-second of
    # the planning thread (what the planner itself sustains)
    collector.planning = {"plan_seconds": plan_time, "plan_cpu_seconds": plan_cpu, "planned_iterations": planned - 1,
                          "plan_batches_per_s": (planned - 1) / plan_time if plan_time else 0.0,
                          "plan_batches_per_cpu_s": (planned - 1) / plan_cpu if plan_cpu else 0.0,
                          "plan_ids_per_s": (planned - 1) * cfg.data.batch_size * cfg.model.num_tables / plan_time
                          if plan_time else 0.0}
    for plans in eval_server_plans(cfg, data, rows, data.num_train_batches):
        for j, plan in enumerate(plans):
            sender.send(roles.servers[j], plan.encode())
    zeros = np.zeros(cfg.cluster.trainers, dtype=np.int64)
    for j in range(cfg.cluster.servers):
        sender.send(roles.servers[j], ServerPlan(STOP_STAGE, j, zeros, zeros, zeros).encode())
    sender.drain()
    thread.join()
    if collector.error is not None:
        raise collector.error
    writer.close()
    writer.summary(collector.summary)


class MetricsCollector:
    """Receives per-iteration reports and writes metrics.jsonl and summary.json."""

    def __init__(self, cfg: RunConfig, roles: Roles, groups: Groups, data: RunData, writer: RunWriter):
        self.cfg, self.roles, self.groups, self.data, self.writer = cfg, roles, groups, data, writer
        self.plan_stats: dict[int, dict] = {}
        self.planning: dict = {}
        self.summary: dict = {}
        self.error: BaseException | None = None

    def _recv(self, src: int, layout, what: str) -> dict:
        buf = wire.empty(layout)
        wait(dist.irecv(buf, src, group=self.groups.metrics), f"oracle: {what} from {self.roles.describe(src)}")
        return wire.decode(layout, buf)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # reported by the main thread
            self.error = err

    def _run(self) -> None:
        cfg, roles = self.cfg, self.roles
        n = self.data.num_train_batches
        totals = {"rows_fetched": 0, "rows_written_back": 0, "bytes_moved": 0, "rows_read": 0,
                  "rows_from_cache": 0, "bytes_exchange": 0}
        train_time, wait_time, loss = 0.0, 0.0, float("nan")

        for i in range(n):
            reports = [self._recv(r, wire.TRAINER_FIELDS, f"iteration {i} report") for r in roles.trainers]
            servers = [self._recv(r, wire.SERVER_FIELDS, f"stage {i} report") for r in roles.servers]
            for rep in reports:
                if rep["iter"] != i:
                    raise PeerError(f"oracle: report of iteration {rep['iter']}, expected {i}")
            rows_digest = (sum(r["rows_digest"] for r in reports) + sum(s["rows_digest"] for s in servers)) % (1 << 64)
            loss = reports[0]["loss"]
            digest = iteration_digest(loss, reports[0]["dense_digest"], rows_digest)
            time_iter = max(r["time_iter"] for r in reports)
            train_time += time_iter
            wait_time += max(r["time_wait"] for r in reports)
            record = {"iter": i, "loss": loss, "digest": digest, "time_iter": round(time_iter, 6)}
            for name in ("time_wait", "time_compute", "time_exchange", "time_update"):
                record[name] = round(max(r[name] for r in reports), 6)
            for name in ("rows_read", "rows_fetched", "rows_from_cache", "bytes_exchange"):
                record[name] = sum(r[name] for r in reports)
            record["rows_written_back"] = sum(r["rows_written_back"] for r in reports)
            record["bytes_moved"] = sum(s["bytes_in"] + s["bytes_out"] for s in servers)
            if cfg.cluster.mode == "bagpipe":
                record["cache_occupancy"] = [r["cache_occupancy"] for r in reports]
            stats = self.plan_stats.pop(i, {}) or {}
            for name in ("capacity_evictions", "postponed", "exchange_rows"):
                if name in stats:
                    record[f"plan_{name}"] = stats[name]
            for name in totals:
                totals[name] += record.get(name, 0)
            self.writer.log(record)

        eval_scores, eval_labels = [], []
        for r in roles.trainers:
            for out in (eval_scores, eval_labels):
                out.append(recv_array(r, self.groups.metrics, f"oracle: eval results from {roles.describe(r)}")
                           .view(np.float64))
        finals = [self._recv(r, wire.FINAL_TRAINER_FIELDS, "final report") for r in roles.trainers]
        server_finals = [self._recv(r, wire.FINAL_SERVER_FIELDS, "final digest") for r in roles.servers]
        left = sum(s["rows_checked_out"] for s in server_finals)
        if left:
            raise PeerError(f"oracle: {left} rows are still checked out to trainer caches at the end of the run")
        rows_digest = sum(s["rows_digest"] for s in server_finals) % (1 << 64)
        scores, labels = np.concatenate(eval_scores), np.concatenate(eval_labels)
        self.summary = {
            "mode": cfg.cluster.mode,
            "trainers": cfg.cluster.trainers,
            "servers": cfg.cluster.servers,
            "iters": n,
            "samples_per_s": n * cfg.data.batch_size / train_time if train_time else 0.0,
            "wait_share": wait_time / train_time if train_time else 0.0,
            "final_loss": loss,
            "auc": auc(labels, scores) if labels.size else float("nan"),
            "logloss": logloss(labels, scores) if labels.size else float("nan"),
            "eval_examples": int(labels.size),
            "digest": final_digest(finals[0]["dense_digest"], rows_digest),
            "peak_rss_kb": {"oracle": peak_rss_kb(), "servers": [s["peak_rss_kb"] for s in server_finals],
                            "trainers": [f["peak_rss_kb"] for f in finals]},
            **totals,
            **self.planning,
        }
