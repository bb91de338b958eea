"""`bagpipe` mode trainer: the logically replicated, physically partitioned cache.

Each cached row has one owner trainer holding its value and optimizer state in a
slot the oracle chose (bagpipe.cache). Per iteration (DESIGN.md section 4; the
order is what the plans of bagpipe.oracle.lrpp assume):

1. land the prefetched rows this iteration needs (the only wait for servers) and
   resolve the plan against the cache;
2. exchange 2: owners send values of rows other trainers read now;
3. compute on the working set, as in every mode;
4. exchange 1: contributions go back to owners, which sum 0 + c_0 + c_1 + ...
   in rank order and apply the shared optimizer, while the summed dense gradient
   is all-gathered (its shard sums were launched first);
5. stage message: write back evicted rows with state, request later rows; then
   the dense step.

Steps 1-2 of iteration i+1 need nothing of iteration i but its row updates and its
stage message, so they run right after them (`_Ahead`, the non-critical exchange of
DESIGN.md section 4): the values travel while iteration i's dense gradient gathers
and its dense step runs, not on their own between two iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bagpipe import faults
from bagpipe.cache import OwnedCache, ResolvedPlan
from bagpipe.digest import dense_digest_reporter, stored_rows_digest
from bagpipe.embedding import SliceKeys, sum_contributions
from bagpipe.errors import PeerError
from bagpipe.protocol import PendingAnswers, RowBlock
from bagpipe.transport import posted, wait
from bagpipe.trainers.runtime import TrainerRuntime
from bagpipe.trainers.step import slice_step


class _RowExchange:
    """One all_to_all of rows on the exchange group, in flight: rows to every trainer
    (empty parts included), rows from every trainer once `received()` has waited."""

    def __init__(self, rt: TrainerRuntime, send: list[torch.Tensor], recv_rows: list[int], what: str):
        d, self.what = rt.d, f"{rt.desc}: {what}"
        inp = torch.cat([s.reshape(-1) for s in send])
        out = torch.empty(sum(recv_rows) * d, dtype=torch.float32)
        self.bytes_sent = inp.numel() * 4
        self._rows = list(torch.split(out.view(-1, d), recv_rows))
        self._work = posted(self.what, dist.all_to_all_single, out, inp,
                            output_split_sizes=[n * d for n in recv_rows],
                            input_split_sizes=[s.numel() for s in send], group=rt.groups.exchange, async_op=True)

    def received(self) -> list[torch.Tensor]:
        wait(self._work, self.what)
        return self._rows


@dataclass
class _Ahead:
    """Iteration i+1 prepared at the end of iteration i: its slice, its plan resolved
    against the cache (fetches landed), and exchange 2 in flight."""

    part: object
    keys: SliceKeys
    plan: ResolvedPlan
    bytes_server: int
    values: _RowExchange


def run_cached_trainer(rt: TrainerRuntime) -> None:
    cfg, opt, channel = rt.cfg, rt.cfg.optimizer, rt.channel
    T, k = rt.T, rt.k
    cache = OwnedCache(cfg.cluster.cache_rows or 1024, rt.optimizer, rt.desc, k, T)
    clock = rt.start_clock()
    pending: list[tuple[PendingAnswers, np.ndarray]] = []

    def land_through(stage: int) -> int:
        landed = 0
        while pending and pending[0][0].stage <= stage:
            answers, slots = pending.pop(0)
            values, state = channel.wait_answers(answers)
            cache.land(answers.keys, slots, values, state)
            landed += answers.bytes
        return landed

    def prepare(i: int) -> _Ahead:
        """Steps 1-2 of iteration i (after iteration i-1's row updates and stage message)."""
        part, sk = rt.read_slice(batches)
        msg = rt.next_plan(i)
        with clock.phase("wait"):
            bytes_server = land_through(msg.wait_through_stage)
        with clock.phase("plan"):
            plan = cache.resolve(msg, sk.keys)
        with clock.phase("exchange"):
            # values of rows other trainers read at i (their last update is applied)
            send = [cache.values.index_select(0, torch.from_numpy(plan.send_slots[j])) for j in range(T)]
            values = _RowExchange(rt, send, [len(p) for p in plan.recv_pos], "value exchange")
        return _Ahead(part, sk, plan, bytes_server, values)

    boot = rt.next_plan(rt.start - 1)  # the bootstrap stage fetches the first iteration's rows
    boot_keys = boot.fetch_keys.astype(np.int64)
    channel.send_stage(boot.iteration, boot_keys)
    pending.append((channel.post_answers(boot.iteration, boot_keys, with_state=True),
                    boot.fetch_slots.astype(np.int64)))
    batches = rt.slices()
    bar = rt.progress(cfg.cluster.mode)
    n = rt.data.num_train_batches
    ahead = prepare(rt.start) if rt.start < n else None
    for i in range(rt.start, n):
        now, ahead = ahead, None
        part, sk, plan = now.part, now.keys, now.plan
        rt.crash_point(i)
        with clock.phase("exchange"):
            received = now.values.received()
        with clock.phase("compute"):
            working_set = torch.empty((len(sk.keys), rt.d), dtype=torch.float32)
            working_set[torch.from_numpy(plan.owned_pos)] = cache.values.index_select(
                0, torch.from_numpy(plan.owned_slots))
            for o in range(T):
                if len(plan.recv_pos[o]):
                    working_set[torch.from_numpy(plan.recv_pos[o])] = received[o]
            result = slice_step(rt.dense.model, torch.from_numpy(part.dense), torch.from_numpy(part.labels),
                                working_set, sk, cfg.data.batch_size)
        with clock.phase("exchange"):
            rt.start_dense_reduction(result)
            contrib_out = [result.row_grads[torch.from_numpy(plan.recv_pos[o])] for o in range(T)]
            contributions = _RowExchange(rt, contrib_out, [len(s) for s in plan.send_slots], "gradient exchange")
            contrib_in = contributions.received()
            bytes_exchange = now.values.bytes_sent + contributions.bytes_sent
            rt.gather_dense_reduction()  # the summed dense gradient gathers while rows update
        with clock.phase("update"):
            parts = []
            for r in range(T):  # rank order: 0 + c_0 + c_1 + ...
                if r == k:
                    parts.append((sk.keys[plan.owned_pos], result.row_grads[torch.from_numpy(plan.owned_pos)]))
                elif len(plan.send_slots[r]):
                    parts.append((cache.slot_keys[plan.send_slots[r]], contrib_in[r]))
            if faults.active("reverse_contributions"):
                parts = parts[::-1]
            grads = sum_contributions(plan.update_keys, parts, rt.d)
            lr_sparse = opt.sparse_lr_at(faults.lr_iteration("owner", i))
            updated = cache.update(plan.update_slots, grads, lr_sparse)
            digest = stored_rows_digest(plan.update_keys, *updated)
            wb_values, wb_state = cache.evict(plan.writeback_keys, plan.writeback_slots)
            if faults.active("drop_state_on_writeback"):
                wb_state = torch.zeros_like(wb_state)
            flushes = None
            if len(plan.flush_slots):  # a checkpoint: changed rows go to the servers and stay cached
                flushes = RowBlock(plan.flush_keys, *cache.snapshot(plan.flush_slots))
            bytes_server = now.bytes_server + channel.send_stage(
                i, plan.fetch_keys, writebacks=RowBlock(plan.writeback_keys, wb_values, wb_state), flushes=flushes)
            pending.append((channel.post_answers(i, plan.fetch_keys, with_state=True), plan.fetch_slots))
        if i + 1 < n:  # the next values go out while the dense gradient gathers
            ahead = prepare(i + 1)
        with clock.phase("exchange"):
            dense_grad, loss = rt.finish_dense_reduction()
        with clock.phase("update"):
            lr_dense = rt.dense_step(dense_grad, i)
        record = {
            "iter": i, "loss": loss.item(), "rows_digest": digest, "lr_sparse": lr_sparse, "lr_dense": lr_dense,
            "rows_read": len(sk.keys),
            "rows_fetched": len(plan.fetch_keys) + (len(boot_keys) if i == rt.start else 0),
            "rows_written_back": len(plan.writeback_keys), "bytes_server": bytes_server,
            "bytes_exchange": bytes_exchange, "cache_occupancy": cache.occupancy,
        }
        if dense_digest_reporter(i, T) == k:
            record["dense_digest"] = rt.dense.digest(with_optimizer_state=False)
        rt.report(record)
        rt.evaluate_during_training(i)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    land_through(1 << 62)
    if cache.occupancy:
        raise PeerError(f"{rt.desc}: {cache.occupancy} rows still cached after the final write-back stage")
    rt.evaluate_final()
    rt.finish()
