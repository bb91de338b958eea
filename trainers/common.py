"""Pieces every training loop shares: the dense state, evaluation, and the clock."""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from bagpipe.config import RunConfig
from bagpipe.digest import dense_digest
from bagpipe.embedding import batch_keys
from bagpipe.metrics import score_metrics
from bagpipe.models import build_model
from bagpipe.optim import build_dense_optimizer, set_lr
from bagpipe.rows import RowSpace
from bagpipe.trainers.step import flat_params, forward_logits, set_dense_grads

PHASES = ("data", "plan", "wait", "compute", "exchange", "update")


@dataclass
class DenseState:
    """The dense model and its optimizer: identical on every trainer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, cfg: RunConfig) -> "DenseState":
        model = build_model(cfg.model, cfg.seed)
        return cls(model, build_dense_optimizer(flat_params(model), cfg.optimizer))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in flat_params(self.model))

    def step(self, summed_grad: torch.Tensor, lr: float) -> None:
        set_dense_grads(self.model, summed_grad)
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    def digest(self, with_optimizer_state: bool = True) -> int:
        return dense_digest(self.model, self.optimizer if with_optimizer_state else None)


def evaluate(model: torch.nn.Module, rows: RowSpace, batches, lookup, poolings=(), trainers: int = 1) -> dict:
    """bagpipe.metrics.score_metrics over eval batches; `lookup(keys) -> [u, row_dim]`
    reads rows. Each batch is scored in `trainers` contiguous slices, as distributed
    trainers score it, so the figures are the same bits in every mode."""
    labels, logits = [], []
    with torch.no_grad():
        for batch in batches:
            for part in (batch.slice(k, trainers) for k in range(trainers)) if trainers > 1 else (batch,):
                sk = batch_keys(part, rows, poolings)
                logits.append(forward_logits(model, torch.from_numpy(part.dense), lookup(sk.keys), sk).numpy())
                labels.append(part.labels)
    if not labels:
        return score_metrics(np.zeros(0), np.zeros(0))
    return score_metrics(np.concatenate(labels), np.concatenate(logits))


class ReadAhead:
    """Items of `source`, each passed through `prepare`, produced `depth` ahead on a
    thread: a trainer's next slices are decoded and their keys sorted while it waits
    for its peers (Parquet decoding and numpy's sort release the GIL), not on its
    critical path. The items and their order are the source's; an error raised while
    producing one is raised to the consumer in its place."""

    _END = object()

    def __init__(self, source, prepare=lambda item: item, depth: int = 2, name: str = "read-ahead"):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        # a daemon: a trainer that fails mid-run ends its process (transport.fail_fast)
        # without draining its read-ahead
        threading.Thread(target=self._run, args=(iter(source), prepare), name=name, daemon=True).start()

    def _run(self, source, prepare) -> None:
        try:
            for item in source:
                self._queue.put((True, prepare(item)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._queue.put((False, err))
            return
        self._queue.put((True, self._END))

    def __iter__(self):
        return self

    def __next__(self):
        ok, item = self._queue.get()
        if not ok:
            raise item
        if item is self._END:
            self._queue.put((True, self._END))  # stays exhausted
            raise StopIteration
        return item


class IterationClock:
    """Wall clock of a training loop, the same in every mode.

    An iteration's `time_iter` runs from the end of the previous iteration (or the
    loop's start) to its own end, so the times add up to the loop's wall clock:
    data reading, plan receive, waits, digests and reporting all count. `elapsed`
    is the time since the loop started. Phases (data, plan, wait, compute,
    exchange, update) split the iteration; what they leave out is bookkeeping."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self._phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - t0

    @contextmanager
    def excluded(self):
        """Work that is not training (evaluation in the middle of a run): the clock stops."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            pause = time.perf_counter() - t0
            self.start += pause
            self._last += pause

    def lap(self) -> dict[str, float]:
        """End the iteration: its phase times, time_iter and elapsed."""
        now = time.perf_counter()
        out = {f"time_{name}": round(self._phases.get(name, 0.0), 6) for name in PHASES}
        out["time_iter"] = round(now - self._last, 6)
        out["elapsed"] = round(now - self.start, 6)
        self._last, self._phases = now, {}
        return out
