"""Embedding server: one shard of every table, with optimizer state, worked in stages.

Rows are placed by key modulo S (key = table offset + id; see bagpipe.rows), so
server j holds keys j, j+S, j+2S, ... at local index key // S. Placement changes no
result: values come from the counter-based initialiser and every update is the
shared optimizer on the same rows in the same order.

Per stage s (DESIGN.md section 4) the server takes exactly one message from each
trainer, applies the stage in trainer-rank order (gradients summed 0 + c_0 + c_1
+ ... then the optimizer, in `none` mode; write-backs in `bagpipe` mode), and then
answers the fetches, so a fetch at stage s sees every update of iterations <= s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from bagpipe.config import RunConfig
from bagpipe.embedding import sum_contributions, union_of
from bagpipe.hashing import stored_rows_digest
from bagpipe.oracle.plan import ServerPlan
from bagpipe.optim import initial_state, state_dim, update_table_rows
from bagpipe.rows import RowSpace
from bagpipe.metrics import peak_rss_kb
from bagpipe.transport import Groups, PeerError, Roles, pack_frame, recv_array, unpack_frame, wait
from bagpipe import faults, wire

KIND_STAGE = 1
KIND_ANSWER = 2
STOP_STAGE = -1000


def stage_layout(counts: tuple[int, int, int], row_dim: int, sdim: int) -> tuple[list[int], list[int]]:
    """(int counts, float counts) of a trainer's stage message: grads, write-backs, fetches."""
    n_grad, n_wb, n_fetch = counts
    return [n_grad, n_wb, n_fetch], [n_grad * row_dim, n_wb * row_dim, n_wb * sdim]


def answer_layout(n_fetch: int, row_dim: int, sdim: int, with_state: bool) -> tuple[list[int], list[int]]:
    return [n_fetch], [n_fetch * row_dim, n_fetch * sdim if with_state else 0]


@dataclass
class Shard:
    """Server j's rows: values, optimizer state, and consistency bookkeeping."""

    rows: RowSpace
    index: int
    servers: int
    optimizer: str
    values: torch.Tensor = field(init=False)
    state: torch.Tensor = field(init=False)
    checked_out: np.ndarray = field(init=False)  # row is cached by a trainer (bagpipe mode)

    def __post_init__(self) -> None:
        self.keys = np.arange(self.index, self.rows.total_rows, self.servers, dtype=np.int64)
        self.values = self.rows.init_tensor(self.keys)
        self.state = initial_state(self.optimizer, len(self.keys), self.rows.row_dim)
        self.checked_out = np.zeros(len(self.keys), dtype=bool)

    def local(self, keys: np.ndarray, who: str) -> torch.Tensor:
        if len(keys) and (np.any(keys % self.servers != self.index) or keys.max() >= self.rows.total_rows
                          or keys.min() < 0):
            raise PeerError(f"{who}: keys not held by server {self.index}")
        return torch.from_numpy(keys // self.servers)

    def digest(self) -> int:
        return stored_rows_digest(self.keys, self.values, self.state)


def run_server(cfg: RunConfig, roles: Roles, groups: Groups, index: int) -> None:
    me = roles.servers[index]
    desc = roles.describe(me)
    rows = RowSpace(cfg.model.cardinalities, cfg.model.row_dim, cfg.seed)
    opt = cfg.optimizer
    shard = Shard(rows, index, cfg.cluster.servers, opt.sparse)
    d, sdim = rows.row_dim, state_dim(opt.sparse, rows.row_dim)
    bagpipe_mode = cfg.cluster.mode == "bagpipe"
    trainers = roles.trainers
    pending_answers: list = []
    pending_metrics: list = []
    answered_last_stage: list[np.ndarray] = [np.zeros(0, np.int64)] * len(trainers)

    while True:
        plan = ServerPlan.decode(recv_array(roles.oracle, groups.plan, f"{desc}: plan from oracle"))
        if plan.stage == STOP_STAGE:
            break
        s = plan.stage
        faults.maybe_kill("server", index, s)
        # post every receive of the stage before waiting on anything
        recvs = []
        for k, src in enumerate(trainers):
            counts = (int(plan.grad_counts[k]), int(plan.writeback_counts[k]), int(plan.fetch_counts[k]))
            ints, floats = stage_layout(counts, d, sdim)
            buf = torch.empty(8 * (8 + sum(ints)) + 4 * sum(floats), dtype=torch.uint8)
            recvs.append((dist.irecv(buf, src, group=groups.data), buf, counts, ints, floats))
        messages = []
        for k, (work, buf, counts, ints, floats) in enumerate(recvs):
            who = f"{desc}: stage {s} from {roles.describe(trainers[k])}"
            wait(work, who)
            messages.append(unpack_frame(buf, (s, KIND_STAGE, k, 0, counts), ints, floats, who))
        for work, *_ in pending_answers:  # answers of the previous stage
            wait(work, f"{desc}: answer delivery")
        pending_answers = []

        bytes_in = sum(buf.numel() for _, buf, *_ in recvs)
        updated_digest, n_updated = 0, 0
        # 1. gradients (none mode), summed in trainer-rank order
        grad_parts = []
        for k, (ints, floats) in enumerate(messages):
            keys = ints[0]
            if len(keys):
                if not np.array_equal(keys, answered_last_stage[k]):
                    raise PeerError(
                        f"{desc}: stage {s}: {roles.describe(trainers[k])} sent gradients for rows it "
                        f"was not served at stage {s - 1}"
                    )
                grad_parts.append((keys, torch.from_numpy(floats[0].reshape(-1, d))))
        if grad_parts:
            if faults.active("reverse_contributions"):
                grad_parts = grad_parts[::-1]
            union = union_of([k for k, _ in grad_parts])
            grads = sum_contributions(union, grad_parts, d)
            idx = shard.local(union, desc)
            updated = update_table_rows(opt.sparse, shard.values, shard.state, idx, grads, opt.sparse_lr_at(s),
                                        opt.eps)
            updated_digest = stored_rows_digest(union, *updated)
            n_updated = len(union)
        # 2. write-backs (bagpipe mode): value and state of rows leaving a cache
        n_written = 0
        for k, (ints, floats) in enumerate(messages):
            keys = ints[1]
            if not len(keys):
                continue
            idx = shard.local(keys, desc)
            if not shard.checked_out[idx.numpy()].all():
                raise PeerError(f"{desc}: stage {s}: write-back of rows not checked out to "
                                f"{roles.describe(trainers[k])}")
            shard.values.index_copy_(0, idx, torch.from_numpy(floats[1].reshape(-1, d)))
            if sdim:
                shard.state.index_copy_(0, idx, torch.from_numpy(floats[2].reshape(-1, sdim)))
            shard.checked_out[idx.numpy()] = False
            n_written += len(keys)
        # 3. answer fetches with values after this stage
        bytes_out, n_fetched = 0, 0
        for k, (ints, _) in enumerate(messages):
            keys = ints[2]
            idx = shard.local(keys, desc)
            with_state = bagpipe_mode and not plan.read_only
            floats = [shard.values.index_select(0, idx).numpy()]
            if with_state:
                local = idx.numpy()
                if shard.checked_out[local].any():
                    raise PeerError(f"{desc}: stage {s}: {roles.describe(trainers[k])} fetches rows already "
                                    f"checked out to a cache (a stale read)")
                shard.checked_out[local] = True
                floats.append(shard.state.index_select(0, idx).numpy())
            frame = pack_frame(s, KIND_ANSWER, index, (len(keys), int(with_state), 0), [keys], floats)
            pending_answers.append((dist.isend(frame, trainers[k], group=groups.data), frame))
            answered_last_stage[k] = keys.copy()
            bytes_out += frame.numel()
            n_fetched += len(keys)
        if s >= 0 and not plan.read_only:
            msg = wire.encode(wire.SERVER_FIELDS, {
                "stage": s, "rows_digest": updated_digest, "rows_updated": n_updated,
                "rows_written_back": n_written, "rows_fetched": n_fetched,
                "bytes_in": bytes_in, "bytes_out": bytes_out,
            })
            pending_metrics.append((dist.isend(msg, roles.oracle, group=groups.metrics), msg))
            if len(pending_metrics) > 64:
                wait(pending_metrics.pop(0)[0], f"{desc}: metrics to oracle")

    for work, *_ in pending_answers + pending_metrics:
        wait(work, f"{desc}: final sends")
    final = wire.encode(wire.FINAL_SERVER_FIELDS, {"rows_digest": shard.digest(),
                                                   "rows_checked_out": int(shard.checked_out.sum()),
                                                   "peak_rss_kb": peak_rss_kb()})
    wait(dist.isend(final, roles.oracle, group=groups.metrics), f"{desc}: final digest to oracle")
