"""`local` mode: one process, full tables in memory, T simulated trainer slices.

The reference for the contract of DESIGN.md section 2 and the ideal lower bound on
time (no remote access). It runs the same per-slice step the distributed trainers
run, sums row contributions in slice order and applies the shared optimizer.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from bagpipe import faults
from bagpipe.checkpoint import (BackgroundWriter, Checkpoint, CheckpointError, Committer, dense_arrays, load_dense,
                                load_rows, name_for)
from bagpipe.config import RunConfig
from bagpipe.digest import final_digest, iteration_digest, stored_rows_digest
from bagpipe.embedding import batch_keys, sum_contributions, union_of
from bagpipe.metrics import as_record_fields, as_summary_fields, peak_rss_kb
from bagpipe.optim import SparseOptimizer
from bagpipe.placement import Placement
from bagpipe.rows import RowSpace
from bagpipe.rundata import RunData
from bagpipe.trainers.common import DenseState, IterationClock, evaluate
from bagpipe.trainers.reduction import ordered_sum
from bagpipe.trainers.step import slice_step


class FullTables:
    """Every row of every table with its optimizer state, in one process."""

    def __init__(self, rows: RowSpace, optimizer: SparseOptimizer, resume: Checkpoint | None = None):
        self.rows, self.optimizer = rows, optimizer
        keys = np.arange(rows.total_rows, dtype=np.int64)
        if resume is not None:
            saved, values, state = load_rows(resume, Placement(1), 0)
            if not np.array_equal(saved, keys) or state.shape != (rows.total_rows, optimizer.state_dim):
                raise CheckpointError(f"{resume.path}: the checkpoint's rows do not match these tables")
            self.values, self.state = torch.from_numpy(values), torch.from_numpy(state)
        else:
            self.values = rows.init_tensor(keys)
            self.state = optimizer.initial_state(rows.total_rows)

    def snapshot(self) -> dict[str, np.ndarray]:
        """Every row as one checkpoint shard (copies: training goes on while they are written)."""
        return {"keys": np.arange(self.rows.total_rows, dtype=np.int64), "values": self.values.numpy().copy(),
                "state": self.state.numpy().copy()}

    def read(self, keys: np.ndarray) -> torch.Tensor:
        return self.values.index_select(0, torch.from_numpy(keys))

    def update(self, keys: np.ndarray, grads: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.optimizer.update_rows(self.values, self.state, torch.from_numpy(keys), grads, lr)

    def digest(self) -> int:
        return stored_rows_digest(np.arange(self.rows.total_rows, dtype=np.int64), self.values, self.state)


def train_local(cfg: RunConfig, data: RunData, writer, resume: Checkpoint | None = None) -> dict:
    """Train from the start, or from a checkpoint (`resume`); checkpoints as configured."""
    torch.manual_seed(cfg.seed)
    rows = RowSpace.for_model(cfg.model, cfg.seed)
    opt = cfg.optimizer
    tables = FullTables(rows, SparseOptimizer.from_config(opt, rows.row_dim), resume)
    dense = DenseState.build(cfg)
    start = 0
    if resume is not None:
        load_dense(resume, dense.model, dense.optimizer)
        start = resume.iterations
    root = cfg.checkpoint.root(cfg.run_dir)
    parts = BackgroundWriter("local")
    committer = Committer(root, cfg.to_dict(), ["server-0000", "dense"], cfg.checkpoint.keep, timeout_s=600.0)

    try:
        return _train_loop(cfg, data, writer, tables, dense, start, parts, committer, root)
    except BaseException:
        try:  # checkpoints whose files all get written still become complete
            parts.close()
        except BaseException:  # noqa: BLE001 - the failure being raised matters more
            pass
        committer.abort()
        raise


def _train_loop(cfg: RunConfig, data: RunData, writer, tables: FullTables, dense: DenseState, start: int,
                parts: BackgroundWriter, committer: Committer, root: str) -> dict:
    rows, opt, poolings = tables.rows, cfg.optimizer, cfg.model.feature_poolings
    trainers, batch_size = cfg.cluster.trainers, cfg.data.batch_size
    per_trainer = batch_size // trainers
    eval_result: dict = {}
    iters, loss = start, torch.zeros(())
    last = data.num_train_batches - 1
    bar = tqdm(total=data.num_train_batches, initial=start, desc="local", unit="it", disable=None)
    batches = iter(data.train_batches(start_batch=start))
    clock = IterationClock()
    elapsed = 0.0
    while True:
        with clock.phase("data"):
            batch = next(batches, None)
            if batch is None:
                break
            slices = [batch_keys(batch.slice(k, trainers), rows, poolings) for k in range(trainers)]
        i = batch.index
        with clock.phase("compute"):
            results = []
            for k, sk in enumerate(slices):
                part = slice(k * per_trainer, (k + 1) * per_trainer)
                results.append(slice_step(dense.model, torch.from_numpy(batch.dense[part]),
                                          torch.from_numpy(batch.labels[part]), tables.read(sk.keys), sk,
                                          batch_size))
        with clock.phase("update"):
            loss = ordered_sum([r.loss for r in results])
            lr_dense = opt.dense_lr_at(faults.lr_iteration("local_dense", i))
            lr_sparse = opt.sparse_lr_at(faults.lr_iteration("local_sparse", i))
            dense.step(ordered_sum([r.dense_grad for r in results]), lr_dense)
            key_sets = [sk.keys for sk in slices]
            union = union_of(key_sets)
            grads = sum_contributions(union, list(zip(key_sets, [r.row_grads for r in results])), rows.row_dim)
            updated = tables.update(union, grads, lr_sparse)
            digest = iteration_digest(loss.item(), dense.digest(with_optimizer_state=False),
                                      stored_rows_digest(union, *updated))
        record = {"iter": i, "loss": loss.item(), "digest": digest, "lr_sparse": lr_sparse, "lr_dense": lr_dense,
                  "rows_read": int(sum(len(s) for s in key_sets)),
                  "rows_touched": int(len(union))}
        if not np.isfinite(loss.item()):
            raise ValueError(f"iteration {i}: the loss is {loss.item()} (not finite): training diverged (lower --lr) "
                             f"or the data holds non-finite values")
        if cfg.checkpoint.after(i, last):  # written on a thread from copies; the clock runs on
            directory = os.path.join(root, name_for(i + 1))
            parts.submit(directory, "server-0000", arrays=tables.snapshot())
            parts.submit(directory, "dense", npz=dense_arrays(dense.model, dense.optimizer))
            committer.commit(i + 1)
        timing = clock.lap()
        record.update(timing)
        elapsed, iters = timing["elapsed"], iters + 1
        if cfg.evaluates_after(i):
            with clock.excluded():
                eval_result = evaluate(dense.model, rows, data.eval_batches(), tables.read, poolings, trainers)
            record.update(as_record_fields(eval_result))
        writer.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    parts.close()
    committer.close()

    last_iter_evaluated = iters > start and cfg.evaluates_after(iters - 1)
    if not last_iter_evaluated:
        eval_result = evaluate(dense.model, rows, data.eval_batches(), tables.read, poolings, trainers)
    return {
        "mode": "local",
        "trainers": trainers,
        "iters": iters,
        "resumed_from": start,
        "samples_per_s": (iters - start) * batch_size / elapsed if elapsed else 0.0,
        "train_seconds": elapsed,
        "final_loss": loss.item(),
        **as_summary_fields(eval_result),
        "digest": final_digest(dense.digest(with_optimizer_state=True), tables.digest()),
        "rows_fetched": 0,
        "bytes_moved": 0,
        "state_dim": tables.optimizer.state_dim,
        "peak_rss_kb": peak_rss_kb(),
        "checkpoints": [os.path.join(root, name_for(n)) for n in committer.committed],
    }
