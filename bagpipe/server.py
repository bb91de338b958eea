"""Embedding server: one shard of every table, with optimizer state, worked in stages.

Server j holds the keys `Placement(S)` gives it. Placement changes no result:
values come from the counter-based initialiser and every update is the shared
optimizer on the same rows in the same order.

Per stage s (DESIGN.md section 4) the server takes exactly one message from each
trainer and `StageServer.apply` works it: gradients summed 0 + c_0 + c_1 + ... in
trainer-rank order and the optimizer applied (`none`), then write-backs
(`bagpipe`), then the fetches are answered, so a fetch at stage s sees every update
of iterations <= s. `StageServer` is pure (no processes): the process loop,
`run_server`, only moves its messages.

Consistency checks (always on; vectorised): in `none` mode, gradients at stage s
must be for exactly the rows that trainer was served at stage s-1; in `bagpipe`
mode a fetched row is *checked out* until written back, and a fetch of a
checked-out row (a stale read) or a write-back of a row not checked out is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bagpipe import faults, wire
from bagpipe.checkpoint import BackgroundWriter, Checkpoint, CheckpointError, load_rows, name_for
from bagpipe.config import Mode, RunConfig
from bagpipe.digest import stored_rows_digest
from bagpipe.embedding import sum_contributions, union_of
from bagpipe.errors import PeerError
from bagpipe.metrics import peak_rss_kb
from bagpipe.optim import SparseOptimizer
from bagpipe.placement import Placement
from bagpipe.plan import EvalPlan, ServerPlan, decode_server_message
from bagpipe.protocol import Answer, FrameLayout, ServerChannel, StageMessage
from bagpipe.rows import RowSpace
from bagpipe.transport import Groups, Roles, StreamReceiver, posted, ready, wait


class Shard:
    """Server j's rows: values, optimizer state, and which rows are checked out to a cache."""

    def __init__(self, rows: RowSpace, placement: Placement, index: int, optimizer: SparseOptimizer,
                 saved: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        """`saved`: (keys, values, state) from a checkpoint; else every row's initial value."""
        self.rows, self.placement, self.index, self.optimizer = rows, placement, index, optimizer
        self.keys = placement.shard_keys(index, rows.total_rows)
        if saved is not None:
            keys, values, state = saved
            if not np.array_equal(keys, self.keys) or values.shape != (len(self.keys), rows.row_dim) \
                    or state.shape != (len(self.keys), optimizer.state_dim):
                raise CheckpointError(f"server {index}: the checkpoint's rows do not cover this shard "
                                      f"({len(keys)} rows for {len(self.keys)}, or other row or state widths)")
            self.values, self.state = torch.from_numpy(values), torch.from_numpy(state)
        else:
            self.values = rows.init_tensor(
                np.arange(len(self.keys)) if faults.active("init_by_position") else self.keys)
            self.state = optimizer.initial_state(len(self.keys))
        self.checked_out = np.zeros(len(self.keys), dtype=bool)

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the shard's rows, to write as a checkpoint part while the server goes on."""
        return {"keys": self.keys, "values": self.values.numpy().copy(), "state": self.state.numpy().copy()}

    def local(self, keys: np.ndarray, who: str) -> torch.Tensor:
        if not self.placement.holds(self.index, keys, self.rows.total_rows):
            raise PeerError(f"{who}: keys not held by server {self.index}")
        return torch.from_numpy(self.placement.local_index(keys))

    def digest(self) -> int:
        return stored_rows_digest(self.keys, self.values, self.state)


@dataclass
class StageReport:
    """What one stage did at one server (summed by the oracle into the iteration's record)."""

    rows_digest: int = 0  # digest of the rows this server updated (none mode)
    rows_updated: int = 0
    rows_written_back: int = 0
    rows_flushed: int = 0
    rows_fetched: int = 0
    lr: float = float("nan")  # the learning rate its updates used (none mode)


class StageServer:
    """The stage logic of one server over its shard; see the module docstring."""

    def __init__(self, shard: Shard, mode: Mode, trainers: int, lr_at, who: str, describe_trainer=None):
        self.shard, self.mode, self.trainers, self.lr_at, self.who = shard, mode, trainers, lr_at, who
        self.describe_trainer = describe_trainer or (lambda k: f"trainer {k}")
        self._served_last_stage = [np.zeros(0, np.int64) for _ in range(trainers)]

    def apply(self, plan: ServerPlan, messages: list[StageMessage]) -> tuple[list[Answer], StageReport]:
        report = StageReport()
        if faults.active("answer_before_apply"):  # a stale read: the stage's fetches miss its updates
            answers = self._answer(plan, messages, report)
            self._apply_updates(plan, messages, report)
        else:
            self._apply_updates(plan, messages, report)
            answers = self._answer(plan, messages, report)
        if not plan.read_only:  # (evaluation reads between two stages are not for training)
            self._served_last_stage = [a.keys.copy() for a in answers]
        return answers, report

    def _apply_updates(self, plan: ServerPlan, messages: list[StageMessage], report: StageReport) -> None:
        s, shard = plan.stage, self.shard
        d = shard.rows.row_dim
        where = f"{self.who}: stage {s}"
        # 1. gradients (none mode), summed in trainer-rank order
        parts = []
        for k, msg in enumerate(messages):
            if len(msg.grad_keys):
                if not np.array_equal(msg.grad_keys, self._served_last_stage[k]):
                    raise PeerError(f"{where}: {self.describe_trainer(k)} sent gradients for rows it was not served "
                                    f"at stage {s - 1}")
                parts.append((msg.grad_keys, torch.from_numpy(msg.grads)))
        if parts:
            if faults.active("reverse_contributions"):
                parts = parts[::-1]
            union = union_of([k for k, _ in parts])
            grads = sum_contributions(union, parts, d)
            report.lr = self.lr_at(faults.lr_iteration("server", s))
            updated = shard.optimizer.update_rows(shard.values, shard.state, shard.local(union, where), grads,
                                                  report.lr)
            report.rows_digest = stored_rows_digest(union, *updated)
            report.rows_updated = len(union)
        # 2. write-backs (bagpipe mode): value and state of rows leaving a cache; at a
        # checkpoint, flushes: the same for rows that stay cached (still checked out)
        for k, msg in enumerate(messages):
            for keys, values, state, leaving in ((msg.writeback_keys, msg.writeback_values, msg.writeback_state, True),
                                                 (msg.flush_keys, msg.flush_values, msg.flush_state, False)):
                if not len(keys):
                    continue
                idx = shard.local(keys, where)
                local = idx.numpy()
                if not shard.checked_out[local].all():
                    what = "write-back" if leaving else "checkpoint flush"
                    raise PeerError(f"{where}: {what} of rows not checked out to {self.describe_trainer(k)}")
                shard.values.index_copy_(0, idx, torch.from_numpy(values))
                if shard.optimizer.state_dim:
                    shard.state.index_copy_(0, idx, torch.from_numpy(state))
                if leaving:
                    shard.checked_out[local] = False
                    report.rows_written_back += len(local)
                else:
                    report.rows_flushed += len(local)

    def _answer(self, plan: ServerPlan, messages: list[StageMessage], report: StageReport) -> list[Answer]:
        """3. answer fetches with values after this stage."""
        s, shard = plan.stage, self.shard
        where = f"{self.who}: stage {s}"
        with_state = self.mode is Mode.BAGPIPE and not plan.read_only
        answers = []
        for k, msg in enumerate(messages):
            idx = shard.local(msg.fetch_keys, where)
            state = None
            if with_state:
                local = idx.numpy()
                if shard.checked_out[local].any():
                    raise PeerError(f"{where}: {self.describe_trainer(k)} fetches rows already checked out to a "
                                    f"cache (a stale read)")
                shard.checked_out[local] = True
                state = shard.state.index_select(0, idx).numpy()
            answers.append(Answer(msg.fetch_keys, shard.values.index_select(0, idx).numpy(), state))
            report.rows_fetched += len(msg.fetch_keys)
        return answers


def run_server(cfg: RunConfig, roles: Roles, groups: Groups, index: int, resume: Checkpoint | None = None) -> None:
    me = roles.servers[index]
    desc = roles.describe(me)
    rows = RowSpace.for_model(cfg.model, cfg.seed)
    optimizer = SparseOptimizer.from_config(cfg.optimizer, rows.row_dim)
    placement = Placement(cfg.cluster.servers)
    saved = load_rows(resume, placement, index) if resume is not None else None
    shard = Shard(rows, placement, index, optimizer, saved)
    writer = BackgroundWriter(desc)
    root = cfg.checkpoint.root(cfg.run_dir)
    first_iteration = resume.iterations if resume is not None else 0
    server = StageServer(shard, cfg.cluster.mode, len(roles.trainers), cfg.optimizer.sparse_lr_at, desc,
                         lambda k: roles.describe(roles.trainers[k]))
    layout = FrameLayout(rows.row_dim, optimizer.state_dim, rows.total_rows)
    channel = ServerChannel(layout, roles.trainers, groups.data, index, desc, roles.describe)
    plans = StreamReceiver(roles.oracle, groups.plan, f"{desc}: plan from oracle")
    pending_metrics: list = []
    ready(desc)
    def work(plan: ServerPlan) -> tuple[StageReport, int, int]:
        messages, bytes_in = channel.receive_stage(plan.stage, [plan.counts(k) for k in range(len(roles.trainers))])
        answers, report = server.apply(plan, messages)
        writer.check()  # a failed checkpoint write fails the job here, naming this server
        return report, bytes_in, sum(channel.send_answer(plan.stage, k, answer) for k, answer in enumerate(answers))

    while True:
        plan = decode_server_message(plans.next())
        if isinstance(plan, EvalPlan):  # read-only stages between two training stages
            for stage in plan.stages():
                work(stage)
            continue
        if plan.is_stop:
            break
        s = plan.stage
        faults.maybe_kill("server", index, s)
        report, bytes_in, bytes_out = work(plan)
        if plan.checkpoint:  # the shard now holds every update through this stage
            writer.submit(os.path.join(root, name_for(plan.checkpoint)), f"server-{index:04d}",
                          arrays=shard.snapshot())
        if s >= first_iteration:  # (the bootstrap stage has no iteration to report)
            msg = wire.encode(wire.SERVER_FIELDS, {"stage": s, "rows_digest": report.rows_digest, "lr": report.lr,
                                                   "bytes_in": bytes_in, "bytes_out": bytes_out})
            to_oracle = f"{desc}: stage {s} report to {roles.describe(roles.oracle)}"
            pending_metrics.append((posted(to_oracle, dist.isend, msg, roles.oracle, group=groups.metrics), msg))
            if len(pending_metrics) > 64:
                wait(pending_metrics.pop(0)[0], f"{desc}: metrics to oracle")
    channel.flush()
    writer.close()
    for work, _ in pending_metrics:
        wait(work, f"{desc}: final sends")
    final = wire.encode(wire.FINAL_SERVER_FIELDS, {"rows_digest": shard.digest(),
                                                   "rows_checked_out": int(shard.checked_out.sum()),
                                                   "peak_rss_kb": peak_rss_kb()})
    what = f"{desc}: final digest to {roles.describe(roles.oracle)}"
    wait(posted(what, dist.isend, final, roles.oracle, group=groups.metrics), what)
