"""Serving processes: start them, wait (bounded) until they are ready, restart dead shards, stop them.

A serving process announces itself with one JSON line on stdout (``{"ready": ...,
"port": ...}``) and writes nothing else there. `spawn_ready` starts one and waits for
that line; `ShardProcesses` keeps `bagpipe serve`'s K sparse shards alive (a shard that
dies is restarted and handed to the main shard's fan-out again). Children end with
their parent (`shard.die_with_parent`), so a stopped or killed server leaves nothing
behind.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .shard import PARENT_ENV

log = logging.getLogger("bagpipe.serving")


class StartError(RuntimeError):
    """A serving process that exited or stayed silent instead of announcing itself ready."""


@dataclass
class Child:
    proc: subprocess.Popen
    ready: dict
    reported_stop: bool = False

    @property
    def port(self) -> int:
        return int(self.ready["port"])


def child_env(extra: dict | None = None) -> dict:
    """One thread per process (they share the cores), unbuffered output, this process as parent."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
    env.update(extra or {})
    return env


def launch(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)


def wait_ready(proc: subprocess.Popen, timeout_s: float, what: str) -> Child:
    """The child's ready line, or StartError (the child is then stopped)."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                stop_process(proc)
                raise StartError(f"{what} did not report ready within {timeout_s:.0f} s")
            if sel.select(timeout=min(left, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                    proc.stdout.close()
                    raise StartError(f"{what} exited with code {code} before it was ready (its messages are above)")
                buffer += chunk
    line = buffer.split(b"\n", 1)[0]
    try:
        ready = json.loads(line)
    except json.JSONDecodeError:
        stop_process(proc)
        raise StartError(f"{what} printed {line[:200]!r} instead of its ready line") from None
    return Child(proc, ready)


def spawn_ready(cmd: list[str], env: dict, timeout_s: float, what: str) -> Child:
    return wait_ready(launch(cmd, env), timeout_s, what)


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)
    if proc.stdout is not None:
        proc.stdout.close()


def shard_command(placement_file: str, index: int, shard_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "bagpipe.cli", "shard", "--placement-file", placement_file, "--index", str(index),
            "--port", "0", *shard_args]


class ShardProcesses:
    """K local shard processes, restarted when they die (backoff 0.5 s doubling to 8 s)."""

    POLL_S = 0.2

    def __init__(self, placement_file: str, shards: int, shard_args: list[str], env: dict, start_timeout_s: float,
                 on_restart: Callable[[int, str], None]) -> None:
        self.placement_file, self.shards, self.shard_args = placement_file, shards, shard_args
        self.env, self.start_timeout_s, self.on_restart = env, start_timeout_s, on_restart
        self.children: list[Child] = []
        self.restarts = [0] * shards
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._starting: subprocess.Popen | None = None

    def _what(self, index: int) -> str:
        return f"shard {index}"

    def start(self) -> list[str]:
        """Start every shard at once; their addresses once all are ready."""
        procs = [launch(shard_command(self.placement_file, i, self.shard_args), self.env) for i in range(self.shards)]
        try:
            for i, proc in enumerate(procs):
                self.children.append(wait_ready(proc, self.start_timeout_s, self._what(i)))
        except BaseException:
            for proc in procs:
                stop_process(proc)
            raise
        self._monitor = threading.Thread(target=self._watch, name="shard-monitor", daemon=True)
        self._monitor.start()
        return [self.address(i) for i in range(self.shards)]

    def address(self, index: int) -> str:
        return f"127.0.0.1:{self.children[index].port}"

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def _watch(self) -> None:
        backoff = [0.5] * self.shards
        while not self._stop.wait(self.POLL_S):
            for i, child in enumerate(self.children):
                code = child.proc.poll()
                if code is None or self._stop.is_set():
                    continue
                if code == 0:  # stopped on purpose (SIGTERM, SIGINT): not restarted
                    if not child.reported_stop:
                        log.warning("shard %d (pid %d) was stopped; it is not restarted", i, child.proc.pid)
                        child.reported_stop = True
                    continue
                log.warning("shard %d (pid %d) exited with code %s; restarting it in %.1f s", i, child.proc.pid,
                            code, backoff[i])
                if self._stop.wait(backoff[i]):
                    return
                self._starting = launch(shard_command(self.placement_file, i, self.shard_args), self.env)
                try:
                    fresh = wait_ready(self._starting, self.start_timeout_s, self._what(i))
                except StartError as err:
                    if self._stop.is_set():
                        return
                    log.error("%s; trying again", err)
                    backoff[i] = min(8.0, backoff[i] * 2)
                    continue
                if child.proc.stdout is not None:
                    child.proc.stdout.close()
                self.children[i] = fresh
                self._starting = None
                self.restarts[i] += 1
                backoff[i] = 0.5
                self.on_restart(i, self.address(i))
                log.warning("shard %d is back (pid %d, %s)", i, fresh.proc.pid, self.address(i))

    def stop(self) -> None:
        self._stop.set()
        starting = self._starting
        if starting is not None and starting.poll() is None:
            starting.kill()  # a restart in progress ends at once (the monitor reaps it)
        if self._monitor is not None:
            self._monitor.join(timeout=self.start_timeout_s + 10)
        for child in self.children:
            stop_process(child.proc)
