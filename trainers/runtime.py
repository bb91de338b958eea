"""What every distributed trainer does regardless of mode: receive plans, talk to
servers in stages, reduce dense gradients in rank order, report to the oracle,
and evaluate over the servers' tables at the end."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from tqdm import tqdm

from bagpipe import faults, wire
from bagpipe.config import RunConfig
from bagpipe.embedding import slice_keys
from bagpipe.metrics import peak_rss_kb
from bagpipe.oracle.plan import TrainerPlan, server_of
from bagpipe.optim import state_dim
from bagpipe.rows import RowSpace
from bagpipe.server import KIND_ANSWER, KIND_STAGE, answer_layout
from bagpipe.transport import (
    Groups, PeerError, Roles, frame_size, pack_frame, recv_array, send_array, unpack_frame, wait,
)
from bagpipe.trainers.common import DenseState
from bagpipe.trainers.data import RunData
from bagpipe.trainers.step import SliceResult, forward_logits, ordered_sum


NO_KEYS = np.zeros(0, dtype=np.int64)


class PendingAnswers:
    """Posted receives of one stage's fetch answers, one per server."""

    def __init__(self, stage: int, keys: np.ndarray, requests: list):
        self.stage, self.keys, self.requests = stage, keys, requests
        self.bytes = sum(buf.numel() for _, buf, *_ in requests)


class TrainerRuntime:
    def __init__(self, cfg: RunConfig, roles: Roles, groups: Groups, index: int, data: RunData):
        self.cfg, self.roles, self.groups, self.k, self.data = cfg, roles, groups, index, data
        self.me = roles.trainers[index]
        self.desc = roles.describe(self.me)
        self.T, self.S = cfg.cluster.trainers, cfg.cluster.servers
        self.rows = RowSpace(cfg.model.cardinalities, cfg.model.row_dim, cfg.seed)
        self.d = self.rows.row_dim
        self.sdim = state_dim(cfg.optimizer.sparse, self.d)
        self.dense = DenseState.build(cfg)
        self.per_trainer = cfg.data.batch_size // self.T
        self._pending_sends: list = []
        self._pending_metrics: list = []

    # --- plans and data -------------------------------------------------------------
    def next_plan(self, expect_iteration: int) -> TrainerPlan:
        plan = TrainerPlan.decode(recv_array(self.roles.oracle, self.groups.plan, f"{self.desc}: plan from oracle"))
        if plan.iteration != expect_iteration or plan.trainer != self.k:
            raise PeerError(f"{self.desc}: got the plan of iteration {plan.iteration} for trainer {plan.trainer}, "
                            f"expected iteration {expect_iteration} for trainer {self.k}")
        return plan

    def my_slice(self, batch):
        part = batch.slice(self.k, self.T)
        return part, slice_keys(self.rows.keys_of(part.sparse))

    def iterations(self):
        """The training loop's skeleton: per global batch, this trainer's plan, its
        slice and the slice's keys (checked against the plan)."""
        for batch in self.data.train_batches():
            i = batch.index
            faults.maybe_kill("trainer", self.k, i)
            plan = self.next_plan(i)
            part, sk = self.my_slice(batch)
            self.check_reads(plan, sk.keys)
            yield plan, part, sk

    def bootstrap(self, with_state: bool) -> tuple[TrainerPlan, PendingAnswers]:
        """Stage -1: fetch what iteration 0 (or the first window) needs."""
        boot = self.next_plan(-1)
        self.send_stage(-1, NO_KEYS, None, NO_KEYS, None, None, boot.fetch_keys)
        return boot, self.post_answers(-1, boot.fetch_keys, with_state=with_state)

    def progress(self, mode: str):
        return tqdm(total=self.data.num_train_batches, desc=mode, unit="it", disable=None if self.k == 0 else True)

    def check_reads(self, plan: TrainerPlan, keys: np.ndarray) -> None:
        if not np.array_equal(plan.reads, keys):
            raise PeerError(f"{self.desc}: iteration {plan.iteration}: the oracle planned different rows than "
                            f"this trainer's slice reads ({len(plan.reads)} vs {len(keys)}): data out of step")

    # --- stage messages to servers ----------------------------------------------------
    def send_stage(self, stage: int, grad_keys: np.ndarray, grads: torch.Tensor | None,
                   wb_keys: np.ndarray, wb_values: torch.Tensor | None, wb_state: torch.Tensor | None,
                   fetch_keys: np.ndarray) -> int:
        """One message to every server (possibly empty): the stage protocol. Returns bytes sent."""
        # the previous stage's sends must be done before their buffers go
        for work, *_ in self._pending_sends:
            wait(work, f"{self.desc}: stage message delivery")
        self._pending_sends = []
        g_srv, w_srv, f_srv = (server_of(x, self.S) for x in (grad_keys, wb_keys, fetch_keys))
        sent = 0
        for j, dst in enumerate(self.roles.servers):
            gm, wm, fm = g_srv == j, w_srv == j, f_srv == j
            gk, wk, fk = grad_keys[gm], wb_keys[wm], fetch_keys[fm]
            floats = [
                grads[torch.from_numpy(gm)].numpy() if len(gk) else np.zeros(0, np.float32),
                wb_values[torch.from_numpy(wm)].numpy() if len(wk) else np.zeros(0, np.float32),
                wb_state[torch.from_numpy(wm)].numpy() if len(wk) and self.sdim else np.zeros(0, np.float32),
            ]
            frame = pack_frame(stage, KIND_STAGE, self.k, (len(gk), len(wk), len(fk)), [gk, wk, fk], floats)
            self._pending_sends.append((dist.isend(frame, dst, group=self.groups.data), frame))
            sent += frame.numel()
        return sent

    def post_answers(self, stage: int, fetch_keys: np.ndarray, with_state: bool) -> PendingAnswers:
        srv = server_of(fetch_keys, self.S)
        requests = []
        for j, src in enumerate(self.roles.servers):
            keys = fetch_keys[srv == j]
            ints, floats = answer_layout(len(keys), self.d, self.sdim, with_state)
            buf = torch.empty(frame_size(ints, floats), dtype=torch.uint8)
            requests.append((dist.irecv(buf, src, group=self.groups.data), buf, j, keys, ints, floats, with_state))
        return PendingAnswers(stage, fetch_keys, requests)

    def wait_answers(self, pending: PendingAnswers) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values (and state) of the fetched keys, in the order of `pending.keys`."""
        n = len(pending.keys)
        values = torch.empty((n, self.d), dtype=torch.float32)
        with_state = pending.requests[0][6] if pending.requests else False
        state = torch.empty((n, self.sdim), dtype=torch.float32) if with_state else None
        srv = server_of(pending.keys, self.S)
        for work, buf, j, keys, ints, floats, ws in pending.requests:
            who = f"{self.desc}: stage {pending.stage} rows from {self.roles.describe(self.roles.servers[j])}"
            wait(work, who)
            (got_keys,), (vals, st) = unpack_frame(buf, (pending.stage, KIND_ANSWER, j, 0, (len(keys), int(ws), 0)),
                                                  ints, floats, who)
            if not np.array_equal(got_keys, keys):
                raise PeerError(f"{who}: answered other rows than requested")
            mask = torch.from_numpy(srv == j)
            values[mask] = torch.from_numpy(vals.reshape(-1, self.d))
            if state is not None and self.sdim:
                state[mask] = torch.from_numpy(st.reshape(-1, self.sdim))
        return values, state

    # --- dense reduction -------------------------------------------------------------
    def start_dense_reduction(self, result: SliceResult):
        """all_gather every trainer's [dense grad, loss] (async, on the dense group, so
        row traffic can go out meanwhile); `finish_dense_reduction` sums it."""
        mine = torch.cat([result.dense_grad, result.loss.reshape(1)])
        gathered = [torch.empty_like(mine) for _ in range(self.T)]
        return dist.all_gather(gathered, mine, group=self.groups.dense, async_op=True), gathered, mine

    def finish_dense_reduction(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        """0 + g_0 + g_1 + ... in rank order: the same bits as `local`'s sequential sum,
        for any T. Returns (dense gradient, loss)."""
        work, gathered, _ = handle
        wait(work, f"{self.desc}: dense gradient all_gather")
        total = ordered_sum(gathered)
        return total[:-1], total[-1]

    # --- reports to the oracle ----------------------------------------------------------
    def send_metrics(self, record: dict) -> None:
        msg = wire.encode(wire.TRAINER_FIELDS, record)
        self._pending_metrics.append((dist.isend(msg, self.roles.oracle, group=self.groups.metrics), msg))
        if len(self._pending_metrics) > 64:
            wait(self._pending_metrics.pop(0)[0], f"{self.desc}: metrics to oracle")

    def evaluate_over_servers(self, first_stage: int) -> None:
        """Read-only stages after training: every trainer scores its slice of each eval
        batch with rows fetched from the servers, and sends logits and labels to the oracle."""
        logits, labels = [], []
        stage = first_stage
        with torch.no_grad():
            for batch in self.data.eval_batches():
                part, sk = self.my_slice(batch)
                self.send_stage(stage, NO_KEYS, None, NO_KEYS, None, None, sk.keys)
                values, _ = self.wait_answers(self.post_answers(stage, sk.keys, with_state=False))
                out = forward_logits(self.dense.model, torch.from_numpy(part.dense), values, sk.inverse)
                logits.append(out.numpy().astype(np.float64))
                labels.append(part.labels.astype(np.float64))
                stage += 1
        scores = np.concatenate(logits) if logits else np.zeros(0)
        truth = np.concatenate(labels) if labels else np.zeros(0)
        self._flush_sends()
        for arr in (scores, truth):
            for work, *_ in send_array(arr.view(np.int64), self.roles.oracle, self.groups.metrics):
                wait(work, f"{self.desc}: eval results to oracle")

    def finish(self) -> None:
        self._flush_sends()
        final = wire.encode(wire.FINAL_TRAINER_FIELDS, {
            "dense_digest": self.dense.digest(with_optimizer_state=True), "peak_rss_kb": peak_rss_kb(),
        })
        wait(dist.isend(final, self.roles.oracle, group=self.groups.metrics), f"{self.desc}: final report")

    def _flush_sends(self) -> None:
        for work, *_ in self._pending_sends + self._pending_metrics:
            wait(work, f"{self.desc}: pending sends")
        self._pending_sends, self._pending_metrics = [], []
