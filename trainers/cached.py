"""`bagpipe` mode trainer: the logically replicated, physically partitioned cache.

Each cached row has one owner trainer holding its value and optimizer state in a
slot the oracle chose. Per iteration (DESIGN.md section 4; the order is what the
plans in bagpipe.oracle.lrpp assume):

1. land the prefetched rows this iteration needs (the only wait for servers);
2. exchange 2: owners send values of rows other trainers read now;
3. compute on the working set, as in every mode;
4. exchange 1: contributions go back to owners, which sum 0 + c_0 + c_1 + ...
   in rank order and apply the shared optimizer;
5. stage message: write back evicted rows with state, request later rows.

Nothing here decides anything: every slot, owner and stage comes from the plan,
and the trainer checks the plan against what it holds, so a wrong plan is an
error naming the row instead of a silently wrong value.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from bagpipe import faults

from bagpipe.embedding import sum_contributions
from bagpipe.hashing import stored_rows_digest
from bagpipe.optim import initial_state, update_table_rows
from bagpipe.transport import PeerError, wait
from bagpipe.trainers.common import PhaseTimer
from bagpipe.trainers.runtime import NO_KEYS, PendingAnswers, TrainerRuntime
from bagpipe.trainers.step import slice_step


class OwnedCache:
    """Owned rows with their optimizer state in preallocated slots."""

    def __init__(self, capacity: int, row_dim: int, optimizer: str, who: str):
        self.who = who
        self.values = torch.zeros((capacity, row_dim), dtype=torch.float32)
        self.state = initial_state(optimizer, capacity, row_dim)
        self.slot_keys = np.full(capacity, -1, dtype=np.int64)

    @property
    def occupancy(self) -> int:
        return int((self.slot_keys >= 0).sum())

    def ensure(self, slots: np.ndarray) -> None:
        """Grow (unlimited capacity only: a bounded cache is allocated at full size)."""
        need = int(slots.max()) + 1 if len(slots) else 0
        if need > len(self.slot_keys):
            size = max(need, 2 * len(self.slot_keys))
            grow = size - len(self.slot_keys)
            self.values = torch.cat([self.values, torch.zeros((grow, self.values.shape[1]))])
            self.state = torch.cat([self.state, torch.zeros((grow, self.state.shape[1]))])
            self.slot_keys = np.concatenate([self.slot_keys, np.full(grow, -1, dtype=np.int64)])

    def held(self, slots: np.ndarray) -> np.ndarray:
        """Key in each slot; -1 for an empty slot or one past the end of the cache."""
        inside = slots < len(self.slot_keys)
        return np.where(inside, self.slot_keys[np.where(inside, slots, 0)], -1)

    def check(self, slots: np.ndarray, keys: np.ndarray, what: str) -> torch.Tensor:
        """The plan says `keys` sit in `slots`; anything else is an internal error."""
        held = self.held(slots)
        if not np.array_equal(held, keys):
            j = int(np.flatnonzero(held != keys)[0])
            raise PeerError(f"{self.who}: {what}: row {int(keys[j])} is not resident in slot {int(slots[j])} "
                            f"(slot holds {int(held[j])}): the plan reads a row that is not cached")
        return torch.from_numpy(slots)

    def occupied(self, slots: np.ndarray, what: str) -> torch.Tensor:
        """Slots the plan says hold rows (keys unknown to this trainer): they must."""
        held = self.held(slots)
        if np.any(held < 0):
            slot = int(slots[np.flatnonzero(held < 0)[0]])
            raise PeerError(f"{self.who}: {what}: slot {slot} holds no row: the plan uses a row that is not resident")
        return torch.from_numpy(slots)

    def land(self, keys: np.ndarray, slots: np.ndarray, values: torch.Tensor, state: torch.Tensor | None) -> None:
        self.ensure(slots)
        if np.any(self.slot_keys[slots] >= 0):
            raise PeerError(f"{self.who}: a fetched row lands in a slot that is still occupied")
        idx = torch.from_numpy(slots)
        self.values.index_copy_(0, idx, values)
        if state is not None and self.state.shape[1]:
            self.state.index_copy_(0, idx, state)
        self.slot_keys[slots] = keys

    def evict(self, keys: np.ndarray, slots: np.ndarray):
        idx = self.check(slots, keys, "write-back")
        values = self.values.index_select(0, idx)
        state = self.state.index_select(0, idx)
        self.slot_keys[slots] = -1
        return values, state


def _all_to_all(rt: TrainerRuntime, send: list[torch.Tensor], recv_rows: list[int], what: str) -> list[torch.Tensor]:
    """Rows to every trainer (empty parts included), rows from every trainer."""
    d = rt.d
    inp = torch.cat([s.reshape(-1) for s in send]) if send else torch.zeros(0)
    out = torch.empty(sum(recv_rows) * d, dtype=torch.float32)
    work = dist.all_to_all_single(out, inp, output_split_sizes=[n * d for n in recv_rows],
                                  input_split_sizes=[s.numel() for s in send], group=rt.groups.exchange,
                                  async_op=True)
    wait(work, f"{rt.desc}: {what}")
    return list(torch.split(out.view(-1, d), recv_rows))


def run_cached_trainer(rt: TrainerRuntime) -> None:
    cfg, opt = rt.cfg, rt.cfg.optimizer
    T, k = rt.T, rt.k
    capacity = cfg.cluster.cache_rows or 1024
    cache = OwnedCache(capacity, rt.d, opt.sparse, rt.desc)
    timer = PhaseTimer()
    pending: list[tuple[PendingAnswers, np.ndarray]] = []

    def land_through(stage: int) -> int:
        landed = 0
        while pending and pending[0][0].stage <= stage:
            answers, slots = pending.pop(0)
            values, state = rt.wait_answers(answers)
            cache.land(answers.keys, slots, values, state)
            landed += answers.bytes
        return landed

    boot, answers = rt.bootstrap(with_state=True)
    pending.append((answers, boot.fetch_slots))
    bar = rt.progress("bagpipe")
    for plan, part, sk in rt.iterations():
        start = time.perf_counter()
        i = plan.iteration
        with timer.phase("wait"):
            bytes_server = land_through(plan.wait_through_stage)
        with timer.phase("exchange"):
            # values of rows other trainers read now (their last update is applied)
            send = [cache.values.index_select(0, cache.occupied(plan.send_slots[j], "value exchange"))
                    for j in range(T)]
            received = _all_to_all(rt, send, [len(p) for p in plan.recv_pos], "value exchange")
            bytes_exchange = sum(s.numel() * 4 for s in send)
        with timer.phase("compute"):
            working_set = torch.empty((len(sk.keys), rt.d), dtype=torch.float32)
            owned = cache.check(plan.owned_slots, sk.keys[plan.owned_pos], "read")
            working_set[torch.from_numpy(plan.owned_pos)] = cache.values.index_select(0, owned)
            for o in range(T):
                if len(plan.recv_pos[o]):
                    working_set[torch.from_numpy(plan.recv_pos[o])] = received[o]
            result = slice_step(rt.dense.model, torch.from_numpy(part.dense), torch.from_numpy(part.labels),
                                working_set, sk.inverse, cfg.data.batch_size)
        with timer.phase("exchange"):
            dense = rt.start_dense_reduction(result)
            contrib_out = [result.row_grads[torch.from_numpy(plan.recv_pos[o])] for o in range(T)]
            contrib_in = _all_to_all(rt, contrib_out, [len(s) for s in plan.send_slots], "gradient exchange")
            bytes_exchange += sum(c.numel() * 4 for c in contrib_out)
            dense_grad, loss = rt.finish_dense_reduction(dense)
        with timer.phase("update"):
            parts = []
            for r in range(T):  # rank order: 0 + c_0 + c_1 + ...
                if r == k:
                    parts.append((sk.keys[plan.owned_pos], result.row_grads[torch.from_numpy(plan.owned_pos)]))
                elif len(plan.send_slots[r]):
                    parts.append((cache.slot_keys[plan.send_slots[r]], contrib_in[r]))
            if faults.active("reverse_contributions"):
                parts = parts[::-1]
            grads = sum_contributions(plan.update_keys, parts, rt.d)
            slots = cache.check(plan.update_slots, plan.update_keys, "update")
            updated = update_table_rows(opt.sparse, cache.values, cache.state, slots, grads, opt.sparse_lr_at(i),
                                        opt.eps)
            digest = stored_rows_digest(plan.update_keys, *updated)
            rt.dense.step(dense_grad, opt.dense_lr_at(i))
            wb_values, wb_state = cache.evict(plan.writeback_keys, plan.writeback_slots)
            bytes_server += rt.send_stage(i, NO_KEYS, None, plan.writeback_keys, wb_values, wb_state,
                                          plan.fetch_keys)
            pending.append((rt.post_answers(i, plan.fetch_keys, with_state=True), plan.fetch_slots))
        record = {
            "iter": i, "loss": loss.item(), "rows_digest": digest, "rows_read": len(sk.keys),
            "rows_fetched": len(plan.fetch_keys) + (len(boot.fetch_keys) if i == 0 else 0),
            "rows_written_back": len(plan.writeback_keys),
            "rows_from_cache": len(sk.keys), "bytes_server": bytes_server, "bytes_exchange": bytes_exchange,
            "cache_occupancy": cache.occupancy,
        }
        if k == 0:
            record["dense_digest"] = rt.dense.digest(with_optimizer_state=False)
        record.update(timer.pop())
        record["time_iter"] = time.perf_counter() - start
        rt.send_metrics(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    land_through(1 << 62)
    if cache.occupancy:
        raise PeerError(f"{rt.desc}: {cache.occupancy} rows still cached after the final write-back stage")
    rt.evaluate_over_servers(first_stage=rt.data.num_train_batches)
    rt.finish()
