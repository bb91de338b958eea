"""Microbenchmark: the dense reduction, old (all_gather + rank-order sum) against new
(`ShardedOrderedSum`: all_to_all of shards, rank-order sum, all_gather of summed shards).

Starts T gloo processes on this machine for each T, reduces a P-float vector per
trainer `--repeats` times with each method, checks that both give exactly the bits
of a sequential `0 + g_0 + g_1 + ...`, and prints per trainer: the bytes it sends
plus receives per reduction (from the message sizes of each algorithm), the peak
receive-buffer memory, and the median wall time per reduction (slowest trainer).

    python scripts/bench_dense_reduction.py --trainers 2,4,8 --params 1000000

On this 2-core machine T processes share two cores, so times at T > 2 measure
contention as much as the algorithm; the bytes are what carries over to a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _gradient(rank: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(numel, generator=g) * (10.0 ** (rank % 3))  # magnitudes that make order matter


def _worker(rank: int, trainers: int, numel: int, repeats: int, store_path: str, out_path: str) -> None:
    from bagpipe.trainers.reduction import ShardedOrderedSum, ordered_sum

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=trainers)
    group = dist.new_group(list(range(trainers)), backend="gloo")
    grad = _gradient(rank, numel)
    expected = ordered_sum([_gradient(r, numel) for r in range(trainers)])
    gathered = [torch.empty_like(grad) for _ in range(trainers)]
    sharded = ShardedOrderedSum(numel, trainers, rank, group, f"trainer {rank}")

    def old() -> torch.Tensor:
        dist.all_gather(gathered, grad, group=group)
        return ordered_sum(gathered)

    def new() -> torch.Tensor:
        sharded.start(grad)
        return sharded.finish()

    result = {}
    for name, fn in (("old", old), ("new", new)):
        same = torch.equal(fn(), expected)
        times = []
        for _ in range(repeats):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = {"bit_identical": same, "times": times}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def traffic(trainers: int, numel: int) -> dict[str, float]:
    """Bytes per trainer per reduction (sent + received, own data excluded) and receive buffers."""
    shard = -(-numel // trainers)
    return {
        # gloo's ring all_gather: every process sends and receives T-1 blocks of P floats
        "old_bytes": 2 * 4 * (trainers - 1) * numel,
        "old_buffer_bytes": 4 * trainers * numel,
        # all_to_all of shards, then a ring all_gather of summed shards: T-1 shards each way, twice
        "new_bytes": 2 * 2 * 4 * (trainers - 1) * shard,
        "new_buffer_bytes": 4 * 3 * trainers * shard,  # send copy, received pieces, gathered result
    }


def measure(trainers: int, numel: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "result")
        mp.spawn(_worker, args=(trainers, numel, repeats, store, out), nprocs=trainers, join=True)
        per_rank = []
        for r in range(trainers):
            with open(f"{out}.{r}") as f:
                per_rank.append(json.load(f))
    row = {"trainers": trainers, "params": numel, **traffic(trainers, numel)}
    for name in ("old", "new"):
        slowest = [max(rank[name]["times"][i] for rank in per_rank) for i in range(repeats)]
        row[f"{name}_ms"] = sorted(slowest)[len(slowest) // 2] * 1e3
        row[f"{name}_bit_identical"] = all(rank[name]["bit_identical"] for rank in per_rank)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", default="2,4,8", help="comma list of trainer counts")
    p.add_argument("--params", type=int, default=1_000_000, help="floats in the dense gradient")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = []
    print(f"{'T':>3}  {'old MB/trainer':>14}  {'new MB/trainer':>14}  {'old buf MB':>10}  {'new buf MB':>10}  "
          f"{'old ms':>7}  {'new ms':>7}  bit-identical")
    for t in (int(x) for x in args.trainers.split(",")):
        row = measure(t, args.params, args.repeats)
        rows.append(row)
        print(f"{t:>3}  {row['old_bytes'] / 1e6:>14.1f}  {row['new_bytes'] / 1e6:>14.1f}  "
              f"{row['old_buffer_bytes'] / 1e6:>10.1f}  {row['new_buffer_bytes'] / 1e6:>10.1f}  "
              f"{row['old_ms']:>7.1f}  {row['new_ms']:>7.1f}  "
              f"{row['old_bit_identical'] and row['new_bit_identical']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["old_bit_identical"] and r["new_bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
