"""`local` mode: one process, full tables in memory, T simulated trainer slices.

The reference for the contract of DESIGN.md section 2 and the ideal lower bound on
time (no remote access). It runs the same per-slice step the distributed trainers
run, sums row contributions in slice order and applies the shared optimizer.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from bagpipe.config import RunConfig
from bagpipe.embedding import slice_keys, sum_contributions, union_of
from bagpipe.hashing import stored_rows_digest
from bagpipe.metrics import peak_rss_kb
from bagpipe.optim import initial_state, state_dim, update_table_rows
from bagpipe.rows import RowSpace
from bagpipe.trainers.common import DenseState, PhaseTimer, evaluate, final_digest, iteration_digest
from bagpipe.trainers.data import RunData
from bagpipe.trainers.step import ordered_sum, slice_step


class FullTables:
    """Every row of every table with its optimizer state, in one process."""

    def __init__(self, rows: RowSpace, optimizer: str, initial_accumulator: float):
        self.rows = rows
        self.values = rows.init_tensor(np.arange(rows.total_rows, dtype=np.int64))
        self.state = initial_state(optimizer, rows.total_rows, rows.row_dim, initial_accumulator)

    def read(self, keys: np.ndarray) -> torch.Tensor:
        return self.values.index_select(0, torch.from_numpy(keys))

    def digest(self) -> int:
        return stored_rows_digest(np.arange(self.rows.total_rows, dtype=np.int64), self.values, self.state)


def train_local(cfg: RunConfig, data: RunData, writer) -> dict:
    torch.manual_seed(cfg.seed)
    rows = RowSpace(cfg.model.cardinalities, cfg.model.row_dim, cfg.seed)
    opt = cfg.optimizer
    tables = FullTables(rows, opt.sparse, opt.initial_accumulator)
    dense = DenseState.build(cfg)
    trainers, batch_size = cfg.cluster.trainers, cfg.data.batch_size
    per_trainer = batch_size // trainers
    timer = PhaseTimer()
    eval_result: dict = {}
    samples, train_time, loss = 0, 0.0, torch.zeros(())

    bar = tqdm(total=data.num_train_batches, desc="local", unit="it", disable=None)
    batches = iter(data.train_batches())
    while True:
        start = time.perf_counter()
        with timer.phase("wait"):
            batch = next(batches, None)
        if batch is None:
            break
        i = batch.index
        with timer.phase("compute"):
            keys_bt = rows.keys_of(batch.sparse)
            results, slice_key_sets = [], []
            for k in range(trainers):
                part = slice(k * per_trainer, (k + 1) * per_trainer)
                sk = slice_keys(keys_bt[part])
                res = slice_step(
                    dense.model,
                    torch.from_numpy(batch.dense[part]),
                    torch.from_numpy(batch.labels[part]),
                    tables.read(sk.keys),
                    sk.inverse,
                    batch_size,
                )
                results.append(res)
                slice_key_sets.append(sk.keys)
        with timer.phase("update"):
            loss = ordered_sum([r.loss for r in results])
            dense.step(ordered_sum([r.dense_grad for r in results]), opt.dense_lr_at(i))
            union = union_of(slice_key_sets)
            grads = sum_contributions(union, list(zip(slice_key_sets, [r.row_grads for r in results])), rows.row_dim)
            updated = update_table_rows(
                opt.sparse, tables.values, tables.state, torch.from_numpy(union), grads, opt.sparse_lr_at(i), opt.eps
            )
            digest = iteration_digest(loss.item(), dense.digest(with_optimizer_state=False),
                                      stored_rows_digest(union, *updated))
        elapsed = time.perf_counter() - start
        train_time += elapsed
        samples += batch_size
        record = {"iter": i, "loss": loss.item(), "digest": digest, "rows_touched": int(len(union))}
        record.update(timer.pop())
        record["time_iter"] = round(elapsed, 6)
        if cfg.eval_every and (i + 1) % cfg.eval_every == 0:
            eval_result = evaluate(dense.model, rows, data.eval_batches(), tables.read)
            record.update({f"eval_{k}": v for k, v in eval_result.items()})
        writer.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()

    last_iter_evaluated = bool(cfg.eval_every) and samples and (samples // batch_size) % cfg.eval_every == 0
    if not last_iter_evaluated:
        eval_result = evaluate(dense.model, rows, data.eval_batches(), tables.read)
    return {
        "mode": "local",
        "iters": samples // batch_size,
        "samples_per_s": samples / train_time if train_time else 0.0,
        "final_loss": loss.item(),
        "auc": eval_result.get("auc"),
        "logloss": eval_result.get("logloss"),
        "eval_examples": eval_result.get("eval_examples"),
        "digest": final_digest(dense.digest(with_optimizer_state=True), tables.digest()),
        "rows_fetched": 0,
        "bytes_moved": 0,
        "state_dim": state_dim(opt.sparse, rows.row_dim),
        "peak_rss_kb": peak_rss_kb(),
    }
