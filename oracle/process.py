"""The oracle role: a thin loop around the pure planners.

It reads the sparse ids of the training data ahead (only the sparse columns),
runs the planner, and ships each iteration's plans to trainers and servers as
message streams (bagpipe.transport.StreamSender: bounded, so it runs ahead of
training but not unboundedly; each message announces the next, so receivers post
their receives early), in their compact wire form (bagpipe.plan.PlanMessage),
counting the bytes. A second
thread, on its own process group, collects the per-iteration reports of trainers
and servers, combines the digest parts and writes the run directory: the oracle
is the one writer.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch.distributed as dist

from bagpipe import faults, wire
from bagpipe.checkpoint import Committer, name_for
from bagpipe.config import Mode, RunConfig
from bagpipe.digest import final_digest, iteration_digest
from bagpipe.errors import PeerError
from bagpipe.metrics import auc, logloss, peak_rss_kb
from bagpipe.placement import Placement
from bagpipe.plan import EMPTY_I64, PlanMessage, PlanStats, ServerPlan, server_plans
from bagpipe.rows import RowSpace
from bagpipe.rundata import RunData
from bagpipe.rundir import RunWriter
from bagpipe.transport import Groups, Roles, StreamSender, posted, ready, recv_bytes, wait

QUEUE_DEPTH = 32  # plans in flight per destination
TRAILER_BYTES = 8  # every plan message carries the length of the next one


def _key_batches(data: RunData, rows: RowSpace, start: int = 0):
    for batch in data.train_batches(columns="sparse", start_batch=start):
        yield np.ascontiguousarray(rows.keys_of(batch.sparse))


def make_planner(cfg: RunConfig, data: RunData, rows: RowSpace, start: int = 0):
    """Plans from iteration `start` on (a resumed run starts with empty caches), numbered
    from 0 by the planner: the caller shifts them by `start`."""
    T, S = cfg.cluster.trainers, cfg.cluster.servers
    batches = _key_batches(data, rows, start)
    if cfg.cluster.mode is Mode.NONE:
        from bagpipe.oracle.nocache import plan_none

        return plan_none(T, S, batches)
    from bagpipe.oracle.lrpp import PlannerConfig, plan_lrpp

    pcfg = PlannerConfig(trainers=T, servers=S, lookahead=cfg.cluster.lookahead,
                         prefetch_distance=cfg.cluster.prefetch_distance, cache_rows=cfg.cluster.cache_rows,
                         total_rows=rows.total_rows, checkpoint_every=cfg.checkpoint.every, first_iteration=start)
    return plan_lrpp(pcfg, batches)


def eval_server_plans(cfg: RunConfig, data: RunData, rows: RowSpace, first_stage: int):
    """Read-only stages: per eval batch, how many rows each trainer fetches from each server."""
    T = cfg.cluster.trainers
    per = cfg.data.batch_size // T
    placement = Placement(cfg.cluster.servers)
    empty = [EMPTY_I64] * T
    for stage, batch in enumerate(data.eval_batches(columns="sparse"), start=first_stage):
        keys = rows.keys_of(batch.sparse)
        reads = [np.unique(keys[k * per:(k + 1) * per]) for k in range(T)]
        yield server_plans(stage, placement, empty, reads, read_only=True)


def run_oracle(cfg: RunConfig, roles: Roles, groups: Groups, data: RunData, start: int = 0,
               history: dict | None = None) -> None:
    """`start`: the first iteration (a resumed run's checkpoint); `history`: restarts and
    redone iterations so far, for the summary."""
    rows = RowSpace(cfg.model.cardinalities, cfg.model.row_dim, cfg.seed)
    writer = RunWriter(cfg.run_dir, cfg.to_dict(), tensorboard=cfg.tensorboard, keep_below=start)
    root = cfg.checkpoint.root(cfg.run_dir)
    committer = Committer(root, cfg.to_dict(), [f"server-{j:04d}" for j in range(cfg.cluster.servers)] + ["dense"],
                          cfg.checkpoint.keep, timeout_s=max(10 * cfg.cluster.timeout_s, 600.0))
    collector = MetricsCollector(cfg, roles, groups, data, writer, committer, start, history or {})
    thread = threading.Thread(target=collector.run, name="metrics", daemon=True)
    thread.start()
    sender = StreamSender(groups.plan, roles.describe, depth=QUEUE_DEPTH)
    ship_keys = cfg.cluster.mode is Mode.BAGPIPE  # `none` trainers read their next keys themselves
    plan_time, plan_cpu, planned = 0.0, 0.0, 0
    planner = make_planner(cfg, data, rows, start)
    last = data.num_train_batches - 1
    ready("oracle")
    while True:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        item = next(planner, None)
        plan_time += time.perf_counter() - t0
        plan_cpu += time.thread_time() - cpu0
        if item is None:
            break
        item.shift(start)
        for plan in item.servers:  # the shard is final for a checkpoint once this stage is applied
            plan.checkpoint = item.iteration + 1 if item.iteration >= 0 and cfg.checkpoint.after(item.iteration,
                                                                                                  last) else 0
        if faults.active("early_read") and item.iteration >= start + 1:
            for plan in item.trainers:  # read rows one stage before their fetch lands
                plan.wait_through_stage = min(plan.wait_through_stage, item.iteration - 1) - 1
        messages = []
        for k, plan in enumerate(item.trainers):
            if not ship_keys:
                plan.fetch_keys, plan.fetch_slots = EMPTY_I64, EMPTY_I64
            messages.append((roles.trainers[k], PlanMessage.from_plan(plan, cfg.cluster.trainers,
                                                                        rows.total_rows).encode()))
        messages += [(roles.servers[j], plan.encode()) for j, plan in enumerate(item.servers)]
        # recorded before sending: the iteration's reports can only come after its plans
        collector.plan_stats[item.iteration] = (item.stats, sum(m.nbytes + TRAILER_BYTES for _, m in messages))
        for dst, payload in messages:
            sender.send(dst, payload)
        planned += 1
    # wall-clock rate (shares the cores with every other role) and per CPU-second of
    # the planning thread (what the planner itself sustains)
    n = planned - 1
    collector.planning = {"plan_seconds": plan_time, "plan_cpu_seconds": plan_cpu, "planned_iterations": n,
                          "plan_batches_per_s": n / plan_time if plan_time else 0.0,
                          "plan_batches_per_cpu_s": n / plan_cpu if plan_cpu else 0.0,
                          "plan_ids_per_s": n * cfg.data.batch_size * cfg.model.num_tables / plan_time
                          if plan_time else 0.0}
    for plans in eval_server_plans(cfg, data, rows, data.num_train_batches):
        for j, plan in enumerate(plans):
            sender.send(roles.servers[j], plan.encode())
    for j in range(cfg.cluster.servers):
        sender.send(roles.servers[j], ServerPlan.stop(j, cfg.cluster.trainers).encode())
    sender.close()
    thread.join()
    if collector.error is not None:
        raise collector.error
    committer.close()  # the final checkpoint is complete before the run says it is
    writer.close()
    collector.summary["checkpoints"] = [os.path.join(root, name_for(n)) for n in committer.committed]
    writer.summary(collector.summary)


TIME_FIELDS = ("time_data", "time_plan", "time_wait", "time_compute", "time_exchange", "time_update", "time_iter")
SUMMED_FIELDS = ("rows_read", "rows_fetched", "rows_written_back", "bytes_exchange", "bytes_dense")


class MetricsCollector:
    """Receives per-iteration reports and writes metrics.jsonl and summary.json."""

    def __init__(self, cfg: RunConfig, roles: Roles, groups: Groups, data: RunData, writer: RunWriter,
                 committer: Committer, start: int, history: dict):
        self.cfg, self.roles, self.groups, self.data, self.writer = cfg, roles, groups, data, writer
        self.committer, self.start, self.history = committer, start, history
        self.plan_stats: dict[int, tuple[PlanStats, int]] = {}
        self.planning: dict = {}
        self.summary: dict = {}
        self.error: BaseException | None = None

    def _recv(self, src: int, layout, what: str) -> dict:
        buf = wire.empty(layout)
        what = f"oracle: {what} from {self.roles.describe(src)}"
        wait(posted(what, dist.irecv, buf, src, group=self.groups.metrics), what)
        return wire.decode(layout, buf)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # reported by the main thread
            self.error = err

    def _run(self) -> None:
        cfg, roles = self.cfg, self.roles
        n = self.data.num_train_batches
        totals = dict.fromkeys(("rows_fetched", "rows_written_back", "bytes_moved", "rows_read", "bytes_exchange",
                                "bytes_plan", "bytes_dense"), 0)
        wait_time, loss, elapsed = 0.0, float("nan"), 0.0
        boot_plan_bytes = 0

        for i in range(self.start, n):
            reports = [self._recv(r, wire.TRAINER_FIELDS, f"iteration {i} report") for r in roles.trainers]
            servers = [self._recv(r, wire.SERVER_FIELDS, f"stage {i} report") for r in roles.servers]
            for rep in reports:
                if rep["iter"] != i:
                    raise PeerError(f"oracle: report of iteration {rep['iter']}, expected {i}")
            rows_digest = (sum(r["rows_digest"] for r in reports) + sum(s["rows_digest"] for s in servers)) % (1 << 64)
            loss = reports[0]["loss"]
            record = {"iter": i, "loss": loss, "digest": iteration_digest(loss, reports[0]["dense_digest"], rows_digest)}
            # the rates in use: owners apply the sparse optimizer in bagpipe mode, servers in none mode
            sparse_rates = [r["lr_sparse"] for r in reports] + [s["lr"] for s in servers]
            record["lr_sparse"] = next((x for x in sparse_rates if not np.isnan(x)), None)
            record["lr_dense"] = reports[0]["lr_dense"]
            # trainers run in lockstep: the slowest one's clock, and its phase split, is the iteration's
            slowest = max(reports, key=lambda r: r["time_iter"])
            for name in TIME_FIELDS:
                record[name] = round(slowest[name], 6)
            elapsed = max(r["elapsed"] for r in reports)
            record["elapsed"] = round(elapsed, 6)
            wait_time += record["time_wait"]
            for name in SUMMED_FIELDS:
                record[name] = sum(r[name] for r in reports)
            record["bytes_moved"] = sum(s["bytes_in"] + s["bytes_out"] for s in servers)
            if cfg.cluster.mode is Mode.BAGPIPE:
                record["cache_occupancy"] = [r["cache_occupancy"] for r in reports]
            stats, plan_bytes = self.plan_stats.pop(i, (None, 0))
            if i == self.start:  # the bootstrap stage's plans are part of the first iteration
                boot_plan_bytes = self.plan_stats.pop(i - 1, (None, 0))[1]
            record["bytes_plan"] = plan_bytes + boot_plan_bytes * (i == self.start)
            if stats is not None and cfg.cluster.mode is Mode.BAGPIPE:
                record["plan_capacity_evictions"] = stats.capacity_evictions
                record["plan_postponed"] = stats.postponed
                record["plan_exchange_rows"] = stats.exchange_rows
            if not np.isfinite(loss):
                raise PeerError(f"oracle: iteration {i}: the loss is {loss} (not finite): training diverged "
                                f"(lower --lr) or the data holds non-finite values")
            for name in totals:
                totals[name] += record.get(name, 0)
            self.writer.log(record)
            if cfg.checkpoint.after(i, n - 1):
                self.committer.commit(i + 1)
            faults.maybe_kill("oracle", 0, i)

        eval_scores, eval_labels = [], []
        for r in roles.trainers:
            for out in (eval_scores, eval_labels):
                out.append(recv_bytes(r, self.groups.metrics, f"oracle: eval results from {roles.describe(r)}")
                           .view(np.float64))
        finals = [self._recv(r, wire.FINAL_TRAINER_FIELDS, "final report") for r in roles.trainers]
        server_finals = [self._recv(r, wire.FINAL_SERVER_FIELDS, "final digest") for r in roles.servers]
        left = sum(s["rows_checked_out"] for s in server_finals)
        if left:
            raise PeerError(f"oracle: {left} rows are still checked out to trainer caches at the end of the run")
        rows_digest = sum(s["rows_digest"] for s in server_finals) % (1 << 64)
        scores, labels = np.concatenate(eval_scores), np.concatenate(eval_labels)
        self.summary = {
            "status": "complete",
            "mode": str(cfg.cluster.mode),
            "trainers": cfg.cluster.trainers,
            "servers": cfg.cluster.servers,
            "iters": n,
            "resumed_from": self.start,
            **self.history,
            # wall clock of the training loop (slowest trainer), everything included
            "samples_per_s": (n - self.start) * cfg.data.batch_size / elapsed if elapsed else 0.0,
            "train_seconds": elapsed,
            "wait_share": wait_time / elapsed if elapsed else 0.0,
            "final_loss": loss,
            "auc": auc(labels, scores) if labels.size else float("nan"),
            "logloss": logloss(labels, scores) if labels.size else float("nan"),
            "eval_examples": int(labels.size),
            "eval_ctr": float(labels.mean()) if labels.size else float("nan"),
            "digest": final_digest(finals[0]["dense_digest"], rows_digest),
            "peak_rss_kb": {"oracle": peak_rss_kb(), "servers": [s["peak_rss_kb"] for s in server_finals],
                            "trainers": [f["peak_rss_kb"] for f in finals]},
            **totals,
            **self.planning,
        }
