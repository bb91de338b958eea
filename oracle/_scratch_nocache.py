import numpy as np
from dataclasses import dataclass
from bagpipe.oracle.plan import TrainerPlan, ServerPlan, server_of

@dataclass
class IterationPlan:
    iteration: int
    trainers: list
    servers: list
    stats: dict

def _reads(keys, T):
    per = keys.shape[0] // T
    return [np.unique(keys[k*per:(k+1)*per]) for k in range(T)]

def _tp(i, k, reads, fetch, T, wait):
    e = np.zeros(0, np.int64)
    return TrainerPlan(i, k, reads, e, e, [e]*T, [e]*T, e, e, e, e, fetch, np.arange(len(fetch)), wait)

def plan_none(T, S, batches):
    it = iter(batches)
    cur = next(it, None)
    e = np.zeros(0, np.int64)
    if cur is None:
        return
    cur_reads = _reads(cur, T)
    def counts(rl):
        return np.stack([np.bincount(server_of(r, S), minlength=S) for r in rl], axis=1)  # [S, T]
    z = np.zeros(T, np.int64)
    fc = counts(cur_reads)
    yield IterationPlan(-1, [_tp(-1, k, e, cur_reads[k], T, -2) for k in range(T)],
                        [ServerPlan(-1, j, z, z, fc[j]) for j in range(S)], {})
    i = 0
    while cur is not None:
        nxt = next(it, None)
        nxt_reads = _reads(nxt, T) if nxt is not None else [e]*T
        gc, fc = counts(cur_reads), counts(nxt_reads)
        yield IterationPlan(i, [_tp(i, k, cur_reads[k], nxt_reads[k], T, i-1) for k in range(T)],
                            [ServerPlan(i, j, gc[j], z, fc[j]) for j in range(S)], {})
        cur, cur_reads = nxt, nxt_reads
        i += 1
