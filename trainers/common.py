"""Pieces every training loop shares: dense state, digests, evaluation, timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from bagpipe.config import RunConfig
from bagpipe.embedding import slice_keys
from bagpipe.hashing import bytes_digest, combine
from bagpipe.metrics import auc, logloss
from bagpipe.models import build_model
from bagpipe.optim import build_dense_optimizer, set_lr
from bagpipe.rows import RowSpace
from bagpipe.trainers.step import flat_params, forward_logits, set_dense_grads


@dataclass
class DenseState:
    """The dense model and its optimizer: identical on every trainer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, cfg: RunConfig) -> "DenseState":
        model = build_model(cfg.model, cfg.seed)
        return cls(model, build_dense_optimizer(flat_params(model), cfg.optimizer))

    def step(self, summed_grad: torch.Tensor, lr: float) -> None:
        set_dense_grads(self.model, summed_grad)
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    def digest(self, with_optimizer_state: bool = True) -> int:
        arrays = [p.detach().numpy() for p in flat_params(self.model)]
        if with_optimizer_state:
            for p in flat_params(self.model):
                for key in sorted(self.optimizer.state.get(p, {})):
                    value = self.optimizer.state[p][key]
                    if torch.is_tensor(value):
                        arrays.append(value.detach().numpy())
        return bytes_digest(*arrays)


def iteration_digest(loss: float, dense_digest: int, updated_rows_digest: int) -> str:
    """Digest of iteration i: its loss (fp32 bits), the dense parameters after its
    update and the rows it updated (a sum over whoever holds them)."""
    return combine(bytes_digest(np.asarray([loss], dtype=np.float32)), dense_digest, updated_rows_digest)


def final_digest(dense_digest_with_state: int, all_rows_digest: int) -> str:
    return combine(dense_digest_with_state, all_rows_digest)


def evaluate(model: torch.nn.Module, rows: RowSpace, batches, lookup) -> dict[str, float]:
    """AUC and logloss over eval batches; `lookup(keys) -> [u, row_dim]` reads rows."""
    labels, logits = [], []
    with torch.no_grad():
        for batch in batches:
            sk = slice_keys(rows.keys_of(batch.sparse))
            out = forward_logits(model, torch.from_numpy(batch.dense), lookup(sk.keys), sk.inverse)
            labels.append(batch.labels)
            logits.append(out.numpy())
    if not labels:
        return {"auc": float("nan"), "logloss": float("nan"), "eval_examples": 0}
    y, z = np.concatenate(labels), np.concatenate(logits)
    return {"auc": auc(y, z), "logloss": logloss(y, z), "eval_examples": int(y.size)}


class PhaseTimer:
    """Accumulates wall time per named phase of an iteration."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.times = {f"time_{k}": round(v, 6) for k, v in self.times.items()}, {}
        return out
