"""`bagpipe launch`: a one-machine torchrun world with every role in it.

The same as `torchrun --standalone --nproc-per-node T+S+1 [--max-restarts K] -m
bagpipe.train --trainers T --servers S ...` (what users run on clusters, with
--nnodes and --node-roles; see README), with what a job on one machine should have:

- everything that can be checked is checked here first (the config, the data, a cache
  too small for two consecutive iterations, the run directory's owner), so a bad
  command is one `error:` line and no process starts;
- the run directory's lock is held here for the whole job, restarts included;
- torchrun's agent runs in this process, so SIGTERM or SIGINT to `bagpipe launch` stops
  every worker before it exits (non-zero), and a failed job ends with one line per
  failed role instead of torchrun's error report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


# how often torchrun's agent looks at its workers: at its default 0.1 s it could stop the
# survivors of a killed worker before the first of them had named the dead peer
MONITOR_INTERVAL_S = 1.0


def torchrun_flags(trainers: int, servers: int, max_restarts: int = 0) -> list[str]:
    """torchrun's options for a job on this machine (then `-m bagpipe.train ...`)."""
    return ["--standalone", "--nproc-per-node", str(trainers + servers + 1), "--max-restarts", str(max_restarts),
            "--monitor-interval", str(MONITOR_INTERVAL_S)]


def torchrun_command(trainers: int, servers: int, train_args: list[str]) -> list[str]:
    """torchrun as a subprocess (what `bench` runs per measured job)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(trainers, servers), "-m", "bagpipe.train",
            *worker_args(trainers, servers, train_args)]


def worker_args(trainers: int, servers: int, train_args: list[str]) -> list[str]:
    args = list(train_args)
    if args and args[0] == "--":
        args = args[1:]
    for flag in ("--trainers", "--servers"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            raise ValueError(f"give {flag} to `bagpipe launch`, not after --")
    if not any(a == "--mode" or a.startswith("--mode=") for a in args):
        args = ["--mode", "bagpipe"] + args
    return ["--trainers", str(trainers), "--servers", str(servers), *args]


def _role_names(trainers: int, servers: int) -> list[str]:
    return ["oracle"] + [f"server {j}" for j in range(servers)] + [f"trainer {k}" for k in range(trainers)]


def launch(trainers: int, servers: int, train_args: list[str], max_restarts: int = 0) -> int:
    from bagpipe import lifecycle
    from bagpipe.config import ConfigError, Mode
    from bagpipe.rundata import RunData
    from bagpipe.train import add_train_arguments, ensure_default_data, preflight, resolve_config

    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {max_restarts}")
    args = worker_args(trainers, servers, train_args)
    parser = argparse.ArgumentParser(prog="bagpipe launch -- ...", add_help=False)
    add_train_arguments(parser)
    parsed, unknown = parser.parse_known_args(args)
    if unknown:
        raise ConfigError(f"unrecognized arguments after --: {' '.join(unknown)}")
    if parsed.mode == Mode.LOCAL.value:
        raise ConfigError("--mode local runs in one process: use `bagpipe train --mode local`")
    if parsed.data is None:
        ensure_default_data()  # once, here, rather than racing in every rank
    cfg = resolve_config(parsed)
    data = RunData.open(cfg)
    preflight(cfg, data)
    run_lock = lifecycle.lock(cfg.run_dir)
    rc = 1
    try:
        lifecycle.claim(cfg)
        lifecycle.resume_point(cfg, data.num_train_batches)  # a bad --resume fails here, not in every rank
        os.environ[lifecycle.LOCK_ENV] = os.path.abspath(cfg.run_dir)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        rc = _run_agent(trainers, servers, max_restarts, args)
        return rc
    finally:
        if rc:
            lifecycle.mark_failed(cfg.run_dir, "bagpipe launch", f"the job ended with exit code {rc}")
        run_lock.release()


def _run_agent(trainers: int, servers: int, max_restarts: int, args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # our workers report their own failures; torchrun's log lines would repeat them
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    torchrun = parse_args([*torchrun_flags(trainers, servers, max_restarts), "-m", "bagpipe.train", *args])
    names = _role_names(trainers, servers)
    try:
        run(torchrun)
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):
            role = names[rank] if rank < len(names) else f"rank {rank}"
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"bagpipe launch: {role} (rank {rank}) ended with {how}", file=sys.stderr)
        return 1
    except SignalException as err:
        print(f"bagpipe launch: stopped by {err.sigval.name}; every worker was stopped", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0
