"""The synchronous data-parallel floor: how close can T one-thread trainer processes get
to one T-thread process on this machine, with nothing but the step they must share?

Both sides run the same slices of the same batches (read once, before timing), with
the same working sets, through the same `slice_step`, and take the same dense step:
- `single`: one process with T torch threads computes the T slices one after another
  and sums their dense gradients in order (what `local` does, without row updates);
- `dp`: T processes with one thread each compute their own slice, reduce the dense
  gradient in rank order over gloo (`ShardedOrderedSum`, as trainers do) and step.
No embedding traffic, no oracle, no servers, no row updates: any design whose trainers
are synchronous processes pays at least what `dp` pays here, so `dp / single` bounds
what `bagpipe` can reach against `local` on this machine. It also prints the spread
of the trainers' compute times (the lateness a peer absorbs at the reduction).

    python scripts/bench_dp_floor.py --repeats 3 -- --embedding-dim 64 --bottom-mlp 512,256,64 --top-mlp 512,256

Repeats alternate single and dp; the ratio is of medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _config(train_args: list[str]):
    from bagpipe.train import add_train_arguments, resolve_config

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return resolve_config(p.parse_args(train_args))


def _inputs(cfg, batches: int, trainers: int) -> list[list[tuple]]:
    """Per batch, per slice: (dense, labels, working set, keys), in memory."""
    from bagpipe.embedding import batch_keys
    from bagpipe.rows import RowSpace
    from bagpipe.rundata import RunData

    data = RunData.open(cfg)
    rows = RowSpace.for_model(cfg.model, cfg.seed)
    out = []
    for b, batch in enumerate(data.train_batches()):
        if b == batches:
            break
        parts = []
        for k in range(trainers):
            part = batch.slice(k, trainers)
            sk = batch_keys(part, rows, cfg.model.feature_poolings)
            parts.append((torch.from_numpy(np.ascontiguousarray(part.dense)),
                          torch.from_numpy(np.ascontiguousarray(part.labels)), rows.init_tensor(sk.keys), sk))
        out.append(parts)
    if len(out) < batches:
        raise SystemExit(f"the data has {len(out)} training batches; --iters + --warmup needs {batches}")
    return out


def run_single(train_args: list[str], trainers: int, iters: int, warmup: int) -> dict:
    from bagpipe.trainers.common import DenseState
    from bagpipe.trainers.reduction import ordered_sum
    from bagpipe.trainers.step import slice_step

    cfg = _config(train_args)
    torch.set_num_threads(trainers)
    inputs = _inputs(cfg, iters + warmup, trainers)
    dense = DenseState.build(cfg)
    times = []
    for i, parts in enumerate(inputs):
        t0 = time.perf_counter()
        results = [slice_step(dense.model, d, y, w, sk, cfg.data.batch_size) for d, y, w, sk in parts]
        dense.step(ordered_sum([r.dense_grad for r in results]), cfg.optimizer.dense_lr_at(i))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"iter_s": times, "batch_size": cfg.data.batch_size}


def _dp_worker(rank: int, train_args: list[str], trainers: int, iters: int, warmup: int, store: str,
               out: str) -> None:
    from bagpipe.trainers.common import DenseState
    from bagpipe.trainers.reduction import ShardedOrderedSum
    from bagpipe.trainers.step import slice_step

    cfg = _config(train_args)
    torch.set_num_threads(1)
    inputs = [parts[rank] for parts in _inputs(cfg, iters + warmup, trainers)]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=trainers)
    dense = DenseState.build(cfg)
    reduction = ShardedOrderedSum(dense.numel, trainers, rank, dist.group.WORLD, f"trainer {rank}")
    dist.barrier()
    times, computes = [], []
    for i, (d, y, w, sk) in enumerate(inputs):
        t0 = time.perf_counter()
        result = slice_step(dense.model, d, y, w, sk, cfg.data.batch_size)
        t1 = time.perf_counter()
        reduction.start(result.dense_grad)
        reduction.reduce()
        dense.step(reduction.finish(), cfg.optimizer.dense_lr_at(i))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            computes.append(t1 - t0)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"iter_s": times, "compute_s": computes}, f)
    dist.barrier()  # no peer tears its connections down while another still uses them
    dist.destroy_process_group()


def run_dp(train_args: list[str], trainers: int, iters: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "result")
        mp.spawn(_dp_worker, args=(train_args, trainers, iters, warmup, store, out), nprocs=trainers, join=True)
        ranks = []
        for r in range(trainers):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
    iter_s = [max(r["iter_s"][i] for r in ranks) for i in range(iters)]
    spread = [max(r["compute_s"][i] for r in ranks) - min(r["compute_s"][i] for r in ranks) for i in range(iters)]
    compute = [statistics.mean(r["compute_s"][i] for r in ranks) for i in range(iters)]
    return {"iter_s": iter_s, "compute_s": compute, "spread_s": spread}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset (default: the embedded synthetic workload)")
    p.add_argument("--trainers", type=int, default=2)
    p.add_argument("--iters", type=int, default=30, help="timed iterations per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write every run's figures to this file")
    args = p.parse_args(own)
    train_args = ([] if args.data is None else ["--data", args.data]) + ["--trainers", str(args.trainers), *extra]
    batch = _config(train_args).data.batch_size
    runs: dict[str, list[dict]] = {"single": [], "dp": []}
    for r in range(args.repeats):
        for name, fn in (("single", run_single), ("dp", run_dp)):
            run = fn(train_args, args.trainers, args.iters, args.warmup)
            runs[name].append(run)
            line = f"repeat {r + 1}/{args.repeats} {name:>6}: {batch / statistics.mean(run['iter_s']):>8.0f} samples/s"
            if name == "dp":
                line += (f", compute {statistics.mean(run['compute_s']) * 1e3:.1f} ms, trainers' compute spread "
                         f"{statistics.mean(run['spread_s']) * 1e3:.1f} ms mean")
            print(line, flush=True)
    rate = {name: statistics.median(batch / statistics.mean(run["iter_s"]) for run in rs) for name, rs in runs.items()}
    print(f"median over {args.repeats} repeats: single {rate['single']:.0f} samples/s, dp {rate['dp']:.0f} samples/s, "
          f"dp / single {rate['dp'] / rate['single']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": argv, "samples_per_s": rate, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
