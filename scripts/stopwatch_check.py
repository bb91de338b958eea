"""Does a run's reported throughput agree with a stopwatch?

Runs the same job for N1 and N2 iterations (`--repeats` times each, interleaved),
times every whole command from outside, and compares the marginal rate
B x (N2 - N1) / (wall(N2) - wall(N1)) (start-up, evaluation and shutdown cancel
out) with the `samples_per_s` the N2 run wrote to summary.json.

    python scripts/stopwatch_check.py --mode bagpipe --iters 20,80 -- \\
        --embedding-dim 64 --bottom-mlp 512,256,64 --top-mlp 512,256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run(mode: str, iters: int, trainers: int, servers: int, extra: list[str], run_dir: str) -> float:
    args = ["--mode", mode, "--iters", str(iters), "--run-dir", run_dir, *extra]
    if mode == "local":
        cmd = [sys.executable, "-m", "bagpipe.train", "--trainers", str(trainers), "--threads", str(trainers), *args]
    else:
        cmd = [sys.executable, "-m", "bagpipe.cli", "launch", "--trainers", str(trainers), "--servers", str(servers),
               "--", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="bagpipe", choices=("local", "none", "bagpipe"))
    p.add_argument("--iters", default="20,80", help="N1,N2")
    p.add_argument("--trainers", type=int, default=2)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("train_args", nargs="*", help="after --: extra `bagpipe train` arguments")
    a = p.parse_args(argv)
    n1, n2 = (int(x) for x in a.iters.split(","))
    extra = ["--batch-size", str(a.batch_size), *[x for x in a.train_args if x != "--"]]
    walls: dict[int, list[float]] = {n1: [], n2: []}
    reported = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for n in (n1, n2):
                run_dir = os.path.join(tmp, f"{n}-{rep}")
                walls[n].append(run(a.mode, n, a.trainers, a.servers, extra, run_dir))
                if n == n2:
                    with open(os.path.join(run_dir, "summary.json")) as f:
                        reported.append(json.load(f)["samples_per_s"])
                print(f"{a.mode} {n} iterations: {walls[n][-1]:.2f} s", flush=True)
    w1, w2 = statistics.median(walls[n1]), statistics.median(walls[n2])
    stopwatch = a.batch_size * (n2 - n1) / (w2 - w1)
    summary = statistics.median(reported)
    print(f"{a.mode}: stopwatch B x ({n2} - {n1}) / ({w2:.2f} s - {w1:.2f} s) = {stopwatch:,.0f} samples/s; "
          f"summary.json samples_per_s = {summary:,.0f}; ratio {summary / stopwatch:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
