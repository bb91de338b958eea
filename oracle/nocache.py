"""Plans of the no-cache baseline (`none` mode), with the same stage convention as LRPP.

Stage -1 (bootstrap) fetches the reads of iteration 0. At stage i every trainer
sends its gradients of iteration i (the servers apply the optimizer) and fetches
the reads of iteration i+1, so a fetch sees every update of iterations <= i. The
last iteration's stage fetches nothing. Trainer k's plan for iteration i carries
its reads, ``fetch_keys`` = its reads of i+1 (``fetch_slots`` = their positions,
unused), empty ownership/exchange/write-back lists and
``wait_through_stage = i - 1``. (A `none` trainer reads its next slice itself, so
only the counts and checksums of these travel; see bagpipe.plan.PlanMessage.)
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from bagpipe.placement import Placement
from bagpipe.plan import EMPTY_I64, IterationPlan, PlanStats, TrainerPlan, server_plans

from .lrpp import PlanError
from .window import sorted_unique, trainer_keys


def _slice_reads(batch, trainers: int, index: int) -> list[np.ndarray]:
    try:
        return [sorted_unique(keys) for keys in trainer_keys(batch, trainers)]
    except ValueError as err:
        raise PlanError(f"batch {index}: {err}") from None


def plan_none(trainers: int, servers: int, batches: Iterable[np.ndarray]) -> Iterator[IterationPlan]:
    if trainers < 1 or servers < 1:
        raise PlanError(f"trainers and servers must be >= 1, got {trainers} and {servers}")
    T = trainers
    placement = Placement(servers)
    it = iter(batches)
    empties = [EMPTY_I64] * T

    def plan(i: int, reads: list[np.ndarray] | None, nxt: list[np.ndarray] | None) -> IterationPlan:
        fetch = nxt if nxt is not None else empties
        grads = reads if reads is not None else empties
        tps = []
        for k in range(T):
            r = reads[k] if reads is not None else EMPTY_I64
            tps.append(TrainerPlan(
                iteration=i, trainer=k, reads=r, owned_pos=EMPTY_I64, owned_slots=EMPTY_I64,
                recv_pos=list(empties), send_slots=list(empties), update_slots=EMPTY_I64,
                update_keys=EMPTY_I64, writeback_slots=EMPTY_I64, writeback_keys=EMPTY_I64,
                fetch_keys=fetch[k], fetch_slots=np.arange(fetch[k].size, dtype=np.int64),
                wait_through_stage=i - 1 if i >= 0 else -2,
            ))
        total_reads = int(sum(g.size for g in grads))
        stats = PlanStats(stage=i, reads=total_reads, fetched=int(sum(f.size for f in fetch)),
                          fetched_per_trainer=[int(f.size) for f in fetch], gradients=total_reads, occupancy=[0] * T)
        return IterationPlan(i, tps, server_plans(i, placement, list(empties), list(fetch), list(grads)), stats)

    index = 0
    try:
        cur = _slice_reads(next(it), T, index)
    except StopIteration:
        yield plan(-1, None, None)
        return
    yield plan(-1, None, cur)
    while True:
        try:
            nxt = _slice_reads(next(it), T, index + 1)
        except StopIteration:
            yield plan(index, cur, None)
            return
        yield plan(index, cur, nxt)
        cur = nxt
        index += 1
