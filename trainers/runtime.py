"""What every distributed trainer does regardless of mode: read its own slices,
receive plans, talk to servers in stages, reduce dense gradients in rank order,
report to the oracle, and evaluate over the servers' tables (during training and at the end)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bagpipe import faults, wire
from bagpipe.checkpoint import BackgroundWriter, Checkpoint, dense_arrays, load_dense, name_for
from bagpipe.config import RunConfig
from bagpipe.embedding import SliceKeys, batch_keys
from bagpipe.errors import PeerError
from bagpipe.metrics import peak_rss_kb
from bagpipe.optim import SparseOptimizer
from bagpipe.placement import Placement
from bagpipe.plan import PlanMessage, eval_stage
from bagpipe.protocol import FrameLayout, TrainerChannel
from bagpipe.rows import RowSpace
from bagpipe.rundata import RunData
from bagpipe.transport import Groups, Roles, StreamReceiver, posted, ready, send_bytes, wait
from bagpipe.trainers.common import DenseState, IterationClock, ReadAhead
from bagpipe.trainers.reduction import ShardedOrderedSum
from bagpipe.trainers.step import SliceResult, forward_logits

NO_KEYS = np.zeros(0, dtype=np.int64)


class TrainerRuntime:
    def __init__(self, cfg: RunConfig, roles: Roles, groups: Groups, index: int, data: RunData,
                 resume: Checkpoint | None = None):
        self.cfg, self.roles, self.groups, self.k, self.data = cfg, roles, groups, index, data
        self.me = roles.trainers[index]
        self.desc = roles.describe(self.me)
        self.T = cfg.cluster.trainers
        self.rows = RowSpace.for_model(cfg.model, cfg.seed)
        self.poolings = cfg.model.feature_poolings
        self.d = self.rows.row_dim
        self.optimizer = SparseOptimizer.from_config(cfg.optimizer, self.d)
        self.dense = DenseState.build(cfg)
        self.start = 0  # first iteration of this run (a resumed run continues a checkpoint)
        if resume is not None:
            load_dense(resume, self.dense.model, self.dense.optimizer)
            self.start = resume.iterations
        self.writer = BackgroundWriter(self.desc)
        layout = FrameLayout(self.d, self.optimizer.state_dim, self.rows.total_rows)
        self.channel = TrainerChannel(layout, Placement(cfg.cluster.servers), roles.servers, groups.data, index,
                                      self.desc, roles.describe)
        # dense gradient with the loss appended, reduced in rank order
        self.reduction = ShardedOrderedSum(self.dense.numel + 1, self.T, index, groups.dense, self.desc)
        self.plans = StreamReceiver(roles.oracle, groups.plan, f"{self.desc}: plan from oracle")
        self.clock: IterationClock | None = None
        self._pending_metrics: list = []

    # --- plans and data -------------------------------------------------------------
    def start_clock(self) -> IterationClock:
        """The training loop's wall clock starts here, once every role is set up
        (before the bootstrap stage)."""
        ready(self.desc)
        self.clock = IterationClock()
        return self.clock

    def next_plan(self, expect_iteration: int) -> PlanMessage:
        with self.clock.phase("plan"):
            raw = self.plans.next()
            try:
                plan = PlanMessage.decode(raw)
            except ValueError as err:
                raise PeerError(f"{self.desc}: plan from oracle: {err}") from err
            if plan.iteration != expect_iteration or plan.trainer != self.k:
                raise PeerError(f"{self.desc}: got the plan of iteration {plan.iteration} for trainer {plan.trainer}, "
                                f"expected iteration {expect_iteration} for trainer {self.k}")
            return plan

    def slices(self) -> ReadAhead:
        """This trainer's slices of the training batches (it reads no other rows) from the
        start, each with its sorted unique keys, read ahead on a thread."""
        batches = self.data.train_batches(start_batch=self.start, slice_of=(self.k, self.T))
        return ReadAhead(batches, lambda part: (part, batch_keys(part, self.rows, self.poolings)),
                         name=f"{self.desc}: read-ahead")

    def read_slice(self, slices: ReadAhead) -> tuple[object, SliceKeys] | None:
        """The next slice and its keys, timed as data (what the read-ahead has not hidden);
        None at the end."""
        with self.clock.phase("data"):
            return next(slices, None)

    def crash_point(self, iteration: int) -> None:
        """Where a test's fault list kills or stops this trainer at `iteration`."""
        faults.maybe_kill("trainer", self.k, iteration)

    def progress(self, mode: str):
        return tqdm(total=self.data.num_train_batches, initial=self.start, desc=str(mode), unit="it",
                    disable=None if self.k == 0 else True)

    # --- dense reduction -------------------------------------------------------------
    def start_dense_reduction(self, result: SliceResult) -> None:
        """Launch the rank-order reduction of [dense grad, loss] (async, on the dense
        group, so row traffic can go out meanwhile)."""
        self.reduction.start(torch.cat([result.dense_grad, result.loss.reshape(1)]))

    def gather_dense_reduction(self) -> None:
        """Sum this trainer's shard and launch the gather of the sum (async: the
        sparse update runs meanwhile); finish_dense_reduction waits for it."""
        self.reduction.reduce()

    def finish_dense_reduction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed dense gradient, summed loss): the same bits as `local`'s sequential sum."""
        total = self.reduction.finish()
        return total[:-1], total[-1].clone()

    def dense_step(self, summed_grad: torch.Tensor, iteration: int) -> float:
        """The dense optimizer's step (and trainer 0's part of a checkpoint after it);
        returns the learning rate it used."""
        lr = self.cfg.optimizer.dense_lr_at(faults.lr_iteration("trainer_dense", iteration))
        self.dense.step(summed_grad, lr)
        if self.k == 0 and self.cfg.checkpoint.after(iteration, self.data.num_train_batches - 1):
            root = self.cfg.checkpoint.root(self.cfg.run_dir)
            self.writer.submit(os.path.join(root, name_for(iteration + 1)), "dense",
                               npz=dense_arrays(self.dense.model, self.dense.optimizer))
        return lr

    # --- reports to the oracle ----------------------------------------------------------
    def report(self, record: dict) -> None:
        """Send one iteration's record; the clock's lap closes the iteration."""
        self.writer.check()  # a failed checkpoint write fails the job here, naming this trainer
        record.update(self.clock.lap())
        record["bytes_dense"] = self.reduction.bytes_per_call
        msg = wire.encode(wire.TRAINER_FIELDS, record)
        what = f"{self.desc}: iteration {record['iter']} report to {self.roles.describe(self.roles.oracle)}"
        self._pending_metrics.append((posted(what, dist.isend, msg, self.roles.oracle, group=self.groups.metrics), msg))
        if len(self._pending_metrics) > 64:
            wait(self._pending_metrics.pop(0)[0], f"{self.desc}: metrics to oracle")

    def evaluate_over_servers(self, after_iteration: int) -> None:
        """The read-only stages of the evaluation after `after_iteration`: every trainer
        scores its slice of each eval batch with rows fetched from the servers (which
        hold every update through that iteration) and sends scores and labels to the oracle."""
        logits, labels = [], []
        with torch.no_grad():
            for j, part in enumerate(self.data.eval_batches(slice_of=(self.k, self.T))):
                stage = eval_stage(after_iteration, j)
                sk = batch_keys(part, self.rows, self.poolings)
                self.channel.send_stage(stage, sk.keys)
                values, _ = self.channel.wait_answers(self.channel.post_answers(stage, sk.keys, with_state=False))
                out = forward_logits(self.dense.model, torch.from_numpy(part.dense), values, sk)
                logits.append(out.numpy().astype(np.float64))
                labels.append(part.labels.astype(np.float64))
        scores = np.concatenate(logits) if logits else np.zeros(0)
        truth = np.concatenate(labels) if labels else np.zeros(0)
        self._flush_sends()
        for arr in (scores, truth):
            for work, *_ in send_bytes(arr, self.roles.oracle, self.groups.metrics):
                wait(work, f"{self.desc}: eval results to oracle")

    def evaluate_during_training(self, iteration: int) -> None:
        """--eval-every: evaluate after `iteration` unless it is the last (the final
        evaluation follows it anyway); the training clock stops meanwhile."""
        if self.cfg.evaluates_after(iteration) and iteration != self.data.num_train_batches - 1:
            with self.clock.excluded():
                self.evaluate_over_servers(iteration)

    def evaluate_final(self) -> None:
        self.evaluate_over_servers(self.data.num_train_batches - 1)

    def finish(self) -> None:
        self.writer.close()
        self._flush_sends()
        final = wire.encode(wire.FINAL_TRAINER_FIELDS, {
            "dense_digest": self.dense.digest(with_optimizer_state=True), "peak_rss_kb": peak_rss_kb(),
        })
        what = f"{self.desc}: final report to {self.roles.describe(self.roles.oracle)}"
        wait(posted(what, dist.isend, final, self.roles.oracle, group=self.groups.metrics), what)

    def _flush_sends(self) -> None:
        self.channel.flush()
        for work, *_ in self._pending_metrics:
            wait(work, f"{self.desc}: pending sends")
        self._pending_metrics = []
