"""`bagpipe launch`: start a one-machine torchrun world with every role in it.

The same as `torchrun --standalone --nproc-per-node T+S+1 -m bagpipe.train
--trainers T --servers S ...`, which is what users run on clusters (with
--nnodes and --node-roles; see README).
"""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(trainers: int, servers: int, train_args: list[str]) -> list[str]:
    args = list(train_args)
    if args and args[0] == "--":
        args = args[1:]
    for flag in ("--trainers", "--servers"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            raise ValueError(f"give {flag} to `bagpipe launch`, not after --")
    if not any(a == "--mode" or a.startswith("--mode=") for a in args):
        args = ["--mode", "bagpipe"] + args
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(trainers + servers + 1),
        "-m", "bagpipe.train", "--trainers", str(trainers), "--servers", str(servers), *args,
    ]


def launch(trainers: int, servers: int, train_args: list[str]) -> int:
    cmd = torchrun_command(trainers, servers, train_args)
    if not any(a == "--data" or a.startswith("--data=") for a in train_args):
        from bagpipe.train import ensure_default_data

        ensure_default_data()  # once, here, rather than racing in every rank
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)
