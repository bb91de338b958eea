"""Trainer CPU per iteration spent on data: reading its slice and its sorted unique keys.

    python scripts/bench_trainer_data.py --data data/synthetic-default --trainers 2

Measures process CPU time over one pass of the training parts (every batch),
for trainer 0's view. Before per-rank reads a trainer read every global batch with
all columns and sliced it; now it reads only its slice (`slice_of`).
"""

from __future__ import annotations

import argparse
import time

from bagpipe.datasets.format import read_meta
from bagpipe.datasets.reader import BatchReader, split_parts
from bagpipe.embedding import slice_keys
from bagpipe.rows import RowSpace


def cpu_per_batch(reader, trainers: int, rows: RowSpace, whole_batches: bool) -> float:
    start, n = time.process_time(), 0
    for batch in reader:
        part = batch.slice(0, trainers) if whole_batches else batch
        slice_keys(rows.keys_of(part.sparse))
        n += 1
    return (time.process_time() - start) / max(n, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/synthetic-default")
    p.add_argument("--trainers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    parts, _ = split_parts(a.data)
    meta = read_meta(parts[0])
    rows = RowSpace(tuple(meta.cardinalities), 1, 0)
    whole, mine = float("inf"), float("inf")
    for _ in range(a.repeats):  # interleaved; the least disturbed pass of each counts
        whole = min(whole, cpu_per_batch(BatchReader(parts, a.batch_size), a.trainers, rows, True))
        mine = min(mine, cpu_per_batch(BatchReader(parts, a.batch_size, slice_of=(0, a.trainers)), a.trainers,
                                       rows, False))
    print(f"whole global batch, then slice: {whole * 1e3:.2f} ms CPU per iteration")
    print(f"own slice only (slice_of):      {mine * 1e3:.2f} ms CPU per iteration ({whole / mine:.1f}x less)")


if __name__ == "__main__":
    main()
