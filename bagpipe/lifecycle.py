"""A job's life in its run directory: one job at a time, a status that never claims
more than happened, and where a restarted or resumed job picks up.

- **Lock**: `RUN_DIR/.lock`, an exclusive `flock` held by the job's writer (the oracle,
  or the `local` process; `bagpipe launch` holds it for the whole job, restarts
  included, and tells its workers through BAGPIPE_RUN_LOCK). A second job on the same
  directory is refused, naming the holder.
- **Ownership**: a directory that holds another run (a `config.json`) is refused unless
  `--overwrite` (start afresh: the old run's files go) or `--resume` (continue it; a job
  restarted by torchrun resumes by itself).
- **Status**: `status.json` says `running` from the start, `complete` once `summary.json`
  is written (only on success), or `failed` with where and why. `summary.json` is
  removed when a job starts, so a finished-looking directory is a finished run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass

from bagpipe import checkpoint
from bagpipe.config import ConfigError, RunConfig
from bagpipe.files import write_json_atomic

LOCK_ENV = "BAGPIPE_RUN_LOCK"  # set by `bagpipe launch`: the run directory whose lock it holds
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "status.json", "restarts.json")


class RunDirBusy(ConfigError):
    """Another job holds the run directory."""


def restart_count() -> int:
    """How many times torchrun restarted this job (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@dataclass
class RunLock:
    path: str
    fd: int | None  # None: held by our launcher

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def lock(run_dir: str) -> RunLock:
    """Take the run directory's lock, or say who holds it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    if os.path.abspath(os.environ.get(LOCK_ENV, "")) == os.path.abspath(run_dir):
        return RunLock(path, None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another job"
        finally:
            os.close(fd)
        raise RunDirBusy(f"{run_dir}: in use by {holder}; wait for it, or give another --run-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"job pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
    return RunLock(path, fd)


def claim(cfg: RunConfig) -> None:
    """Make the run directory this job's (under its lock): refuse another run's files
    unless told, and remove what would make the directory look finished."""
    run_dir = cfg.run_dir
    continuing = bool(cfg.checkpoint.resume) or restart_count() > 0
    held = os.path.exists(os.path.join(run_dir, "config.json"))
    if held and not (cfg.overwrite or continuing):
        raise ConfigError(f"{run_dir}: holds another run (config.json); give --overwrite to start afresh, "
                          f"--resume latest to continue it, or another --run-dir")
    if cfg.overwrite:
        for name in RUN_FILES:
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(cfg.checkpoint.root(run_dir), ignore_errors=True)
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        os.unlink(summary)
    checkpoint.drop_incomplete(cfg.checkpoint.root(run_dir))
    set_status(run_dir, "running", attempt=restart_count())


def set_status(run_dir: str, status: str, **details) -> None:
    write_json_atomic(os.path.join(run_dir, "status.json"),
                      {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                       "pid": os.getpid(), **details})


def mark_failed(run_dir: str, where: str, why: str) -> None:
    """Best effort: a job that fails says so (never raises; the failure being reported matters more)."""
    try:
        path = os.path.join(run_dir, "status.json")
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f).get("status") != "running":
                    return
        set_status(run_dir, "failed", where=where, why=why)
    except (OSError, ValueError):
        pass


def resume_point(cfg: RunConfig, total_iterations: int) -> checkpoint.Checkpoint | None:
    """The checkpoint this job continues: `--resume PATH|latest`, or the latest one when
    torchrun restarted the job (none yet: start over). Checked against the config."""
    which = cfg.checkpoint.resume or ("latest" if restart_count() > 0 else None)
    if which is None:
        return None
    root = cfg.checkpoint.root(cfg.run_dir)
    found = checkpoint.resolve(which, root)
    if found is None:
        if cfg.checkpoint.resume:
            raise ConfigError(f"--resume latest: no complete checkpoint under {root}")
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"bagpipe: restart {restart_count()}: no complete checkpoint under {root} yet; starting over "
                  f"(found: {sorted(os.listdir(root)) if os.path.isdir(root) else 'no directory'})", file=sys.stderr)
        return None
    if restart_count() > 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"bagpipe: restart {restart_count()}: resuming from {found.path}", file=sys.stderr)
    checkpoint.check_compatible(found.config, cfg, found.path)
    if found.iterations >= total_iterations:
        raise ConfigError(f"{found.path}: the checkpoint has {found.iterations} iterations and this run has "
                          f"{total_iterations}: nothing left to train (raise --iters to continue)")
    return found


def last_logged_iteration(run_dir: str) -> int | None:
    """The last iteration in metrics.jsonl (what a failed attempt got through), or None."""
    path = os.path.join(run_dir, "metrics.jsonl")
    last = None
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    last = json.loads(line)["iter"]
                except (ValueError, KeyError):
                    break  # a torn last line: what came before counts
    return last


def record_attempt(run_dir: str, resumed_from: int | None) -> dict:
    """Restarts and redone iterations so far (restarts.json), counting this attempt: a
    restart redoes what the failed attempt logged after the checkpoint it resumes."""
    path = os.path.join(run_dir, "restarts.json")
    history = {"restarts": 0, "iterations_redone": 0}
    if (resumed_from is not None or restart_count() > 0) and os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    if restart_count() > 0:
        logged = last_logged_iteration(run_dir)
        history["restarts"] = restart_count()
        if logged is not None:
            history["iterations_redone"] += max(0, logged + 1 - (resumed_from or 0))
    write_json_atomic(path, history)
    return history
