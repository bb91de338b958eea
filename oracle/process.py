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
from bagpipe.digest import dense_digest_reporter, final_digest, iteration_digest
from bagpipe.embedding import ExampleKeys, planner_keys
from bagpipe.errors import PeerError
from bagpipe.metrics import as_record_fields, as_summary_fields, peak_rss_kb, score_metrics
from bagpipe.oracle.window import trainer_keys
from bagpipe.placement import Placement
from bagpipe.plan import EMPTY_I64, PlanMessage, PlanStats, ServerPlan, eval_plans
from bagpipe.rows import RowSpace
from bagpipe.rundata import RunData
from bagpipe.rundir import RunWriter
from bagpipe.transport import Groups, Roles, StreamSender, posted, ready, recv_bytes, wait

QUEUE_DEPTH = 32  # plans in flight per destination
TRAILER_BYTES = 8  # every plan message carries the length of the next one


class KeyStream:
    """The planner's input: every training batch's row keys from `start` on (only the
    sparse columns are read), counting the ids (for the planning rate in ids/s)."""

    def __init__(self, data: RunData, rows: RowSpace, start: int = 0):
        self.data, self.rows, self.start = data, rows, start
        self.ids = 0

    def __iter__(self):
        for batch in self.data.train_batches(columns="sparse", start_batch=self.start):
            keys = planner_keys(batch, self.rows)
            self.ids += keys.keys.size if isinstance(keys, ExampleKeys) else keys.size
            yield keys


def make_planner(cfg: RunConfig, data: RunData, rows: RowSpace, start: int = 0):
    """(plans, their KeyStream): plans from iteration `start` on (a resumed run starts
    with empty caches), numbered from 0 by the planner: the caller shifts them by `start`."""
    T, S = cfg.cluster.trainers, cfg.cluster.servers
    batches = KeyStream(data, rows, start)
    if cfg.cluster.mode is Mode.NONE:
        from bagpipe.oracle.nocache import plan_none

        return plan_none(T, S, batches), batches
    from bagpipe.oracle.lrpp import PlannerConfig, plan_lrpp

    pcfg = PlannerConfig(trainers=T, servers=S, lookahead=cfg.cluster.lookahead,
                         prefetch_distance=cfg.cluster.prefetch_distance, cache_rows=cfg.cluster.cache_rows,
                         total_rows=rows.total_rows, checkpoint_every=cfg.checkpoint.every,
                         eval_every=None if faults.active("no_eval_flush") else cfg.eval_every,
                         first_iteration=start)
    return plan_lrpp(pcfg, batches), batches


def eval_server_plans(cfg: RunConfig, data: RunData, rows: RowSpace, after_iteration: int) -> list:
    """The evaluation after `after_iteration`, one message per server: per eval batch, how
    many rows each trainer fetches from it."""
    T = cfg.cluster.trainers
    reads = ([np.unique(keys) for keys in trainer_keys(planner_keys(batch, rows), T)]
             for batch in data.eval_batches(columns="sparse"))
    return eval_plans(after_iteration, Placement(cfg.cluster.servers), T, reads)


def send_eval_plans(sender: StreamSender, roles: Roles, plans: list) -> None:
    for j, plan in enumerate(plans):
        sender.send(roles.servers[j], plan.encode())


def run_oracle(cfg: RunConfig, roles: Roles, groups: Groups, data: RunData, start: int = 0,
               history: dict | None = None) -> None:
    """`start`: the first iteration (a resumed run's checkpoint); `history`: restarts and
    redone iterations so far, for the summary."""
    rows = RowSpace.for_model(cfg.model, cfg.seed)
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
    planner, keys = make_planner(cfg, data, rows, start)
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
        if item.iteration >= start and item.iteration != last and cfg.evaluates_after(item.iteration):
            send_eval_plans(sender, roles, eval_server_plans(cfg, data, rows, item.iteration))
        planned += 1
    # wall-clock rate (shares the cores with every other role) and per CPU-second of
    # the planning thread (what the planner itself sustains)
    n = planned - 1
    collector.planning = {"plan_seconds": plan_time, "plan_cpu_seconds": plan_cpu, "planned_iterations": n,
                          "plan_batches_per_s": n / plan_time if plan_time else 0.0,
                          "plan_batches_per_cpu_s": n / plan_cpu if plan_cpu else 0.0,
                          "plan_ids_per_s": keys.ids / plan_time if plan_time else 0.0}
    send_eval_plans(sender, roles, eval_server_plans(cfg, data, rows, last))
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


def iteration_timings(reports: list[dict]) -> dict[str, float]:
    """An iteration's clock from its trainers' reports. Trainers run in lockstep, so the
    slowest one's clock and phase split are the iteration's. `time_compute_spread` is the
    slowest minus the fastest trainer's compute: the lateness the others absorb at the
    next exchange, which no transfer can hide (0 with one trainer)."""
    slowest = max(reports, key=lambda r: r["time_iter"])
    out = {name: round(slowest[name], 6) for name in TIME_FIELDS}
    computes = [r["time_compute"] for r in reports]
    out["time_compute_spread"] = round(max(computes) - min(computes), 6)
    return out


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

    def _recv_evaluation(self, after_iteration: int) -> dict:
        """Every trainer's scores and labels of its slices of the eval batches."""
        scores, labels = [], []
        for r in self.roles.trainers:
            what = f"oracle: results of the evaluation after iteration {after_iteration} from {self.roles.describe(r)}"
            for out in (scores, labels):
                out.append(recv_bytes(r, self.groups.metrics, what).view(np.float64))
        return score_metrics(np.concatenate(labels), np.concatenate(scores))

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
            record = {"iter": i, "loss": loss, "digest": iteration_digest(
                loss, reports[dense_digest_reporter(i, len(reports))]["dense_digest"], rows_digest)}
            # the rates in use: owners apply the sparse optimizer in bagpipe mode, servers in none mode
            sparse_rates = [r["lr_sparse"] for r in reports] + [s["lr"] for s in servers]
            record["lr_sparse"] = next((x for x in sparse_rates if not np.isnan(x)), None)
            record["lr_dense"] = reports[0]["lr_dense"]
            record.update(iteration_timings(reports))
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
            if cfg.evaluates_after(i):
                evaluation = self._recv_evaluation(i)
                record.update(as_record_fields(evaluation))
            self.writer.log(record)
            if cfg.checkpoint.after(i, n - 1):
                self.committer.commit(i + 1)
            faults.maybe_kill("oracle", 0, i)

        if n == self.start or not cfg.evaluates_after(n - 1):
            evaluation = self._recv_evaluation(n - 1)
        finals = [self._recv(r, wire.FINAL_TRAINER_FIELDS, "final report") for r in roles.trainers]
        server_finals = [self._recv(r, wire.FINAL_SERVER_FIELDS, "final digest") for r in roles.servers]
        left = sum(s["rows_checked_out"] for s in server_finals)
        if left:
            raise PeerError(f"oracle: {left} rows are still checked out to trainer caches at the end of the run")
        rows_digest = sum(s["rows_digest"] for s in server_finals) % (1 << 64)
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
            **as_summary_fields(evaluation),
            "digest": final_digest(finals[0]["dense_digest"], rows_digest),
            "peak_rss_kb": {"oracle": peak_rss_kb(), "servers": [s["peak_rss_kb"] for s in server_finals],
                            "trainers": [f["peak_rss_kb"] for f in finals]},
            **totals,
            **self.planning,
        }
