"""torch.distributed plumbing: roles, process groups, framed messages, failure reports.

One torchrun world holds one oracle, S embedding servers and T trainers. gloo
rules from DESIGN.md section 5 live here so no other module has to remember them:
one process group per purpose (and thread), created in the same order on every
rank; timeouts short enough that a dead peer ends the job; failures reported
with the peer's role. The trainer <-> server frames are `bagpipe.protocol`'s.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bagpipe.errors import PeerError
from bagpipe.exits import exit_now

__all__ = ["PeerError", "Roles", "Groups", "make_groups", "init_world", "gather_roles", "local_role", "wait",
           "ready", "send_bytes", "recv_bytes", "StreamSender", "StreamReceiver", "fail_fast"]


@dataclass(frozen=True)
class Roles:
    """Global ranks of each role, in role-index order."""

    oracle: int
    servers: tuple[int, ...]
    trainers: tuple[int, ...]
    hosts: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()

    def describe(self, rank: int) -> str:
        if rank == self.oracle:
            return f"oracle (rank {rank})"
        if rank in self.servers:
            return f"server {self.servers.index(rank)} (rank {rank})"
        if rank in self.trainers:
            return f"trainer {self.trainers.index(rank)} (rank {rank})"
        return f"rank {rank}"

    def role_of(self, rank: int) -> tuple[str, int]:
        if rank == self.oracle:
            return "oracle", 0
        if rank in self.servers:
            return "server", self.servers.index(rank)
        return "trainer", self.trainers.index(rank)


def parse_node_roles(spec: str) -> list[str]:
    """'oracle=1,server=2,trainer=1' -> the role of each local rank on this node."""
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition("=")
        name = name.strip().rstrip("s")  # accept plurals
        if name not in ("oracle", "server", "trainer"):
            raise ValueError(f"--node-roles: unknown role {name!r} in {spec!r} (expected oracle, server, trainer)")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"--node-roles: {item!r} is not role=count") from None
        out += [name] * n
    return out


def local_role(node_roles: str | None, servers: int, trainers: int) -> str:
    """This process's role from its local rank and its node's role list."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if node_roles is None:
        if local_world != world:
            raise ValueError(
                "a multi-node job needs --node-roles on every node, e.g. 'oracle=1,server=2' on one "
                "and 'trainer=2' on the other"
            )
        node_roles = f"oracle=1,server={servers},trainer={trainers}"
    roles = parse_node_roles(node_roles)
    if len(roles) != local_world:
        raise ValueError(
            f"--node-roles {node_roles!r} lists {len(roles)} processes but torchrun started "
            f"{local_world} on this node (--nproc-per-node)"
        )
    return roles[local_rank]


def init_world(timeout_s: float) -> None:
    """The torchrun world's default group, on a store namespace of this attempt: torchrun's
    store outlives a restart (--max-restarts), and a restarted rank must not read the
    addresses its peers published in an earlier attempt."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        dist.init_process_group(backend="gloo", timeout=timeout)
        return
    from torch.distributed.rendezvous import _create_c10d_store  # torch's own env:// store

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"bagpipe/attempt-{attempt}", base)
    dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def gather_roles(my_role: str, servers: int, trainers: int) -> Roles:
    """Every rank learns every rank's role; the counts must match the command line."""
    world = dist.get_world_size()
    if world != trainers + servers + 1:
        raise ValueError(
            f"world size {world} != trainers {trainers} + servers {servers} + 1 oracle; "
            f"start torchrun with --nproc-per-node {trainers + servers + 1} (or use `bagpipe launch`)"
        )
    gathered = [None] * world
    posted("gathering every rank's role", dist.all_gather_object, gathered, (my_role, socket.gethostname(), os.getpid()))
    names = [g[0] for g in gathered]
    oracle = [r for r, n in enumerate(names) if n == "oracle"]
    server_ranks = tuple(r for r, n in enumerate(names) if n == "server")
    trainer_ranks = tuple(r for r, n in enumerate(names) if n == "trainer")
    if len(oracle) != 1 or len(server_ranks) != servers or len(trainer_ranks) != trainers:
        raise ValueError(
            f"roles across nodes give {len(oracle)} oracle, {len(server_ranks)} servers, "
            f"{len(trainer_ranks)} trainers; expected 1, {servers}, {trainers}"
        )
    return Roles(oracle[0], server_ranks, trainer_ranks,
                 hosts=tuple(g[1] for g in gathered), pids=tuple(g[2] for g in gathered))


def lost_peers(roles: Roles | None) -> list[str]:
    """Peers on this host whose process is gone (or a zombie) or stopped (SIGSTOP, a
    debugger): who to blame when an operation fails or times out without naming its
    peer. Peers on other hosts can't be probed."""
    if roles is None or not roles.pids:
        return []
    here, lost = socket.gethostname(), []
    for rank, (host, pid) in enumerate(zip(roles.hosts, roles.pids)):
        if host != here or pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            state = "X"
        if state in ("Z", "X"):
            lost.append(f"{roles.describe(rank)} is dead")
        elif state in ("T", "t"):
            lost.append(f"{roles.describe(rank)} is stopped (not answering)")
    return lost


@dataclass
class Groups:
    """One gloo group per purpose; see the module docstring."""

    dense: object  # trainers: ordered dense-gradient reduction
    exchange: object  # trainers: all_to_all of rows and contributions
    data: object  # everyone: trainer <-> server stage messages
    plan: object  # everyone: oracle -> plans
    metrics: object  # everyone: -> oracle metrics and digests


def make_groups(roles: Roles, timeout_s: float) -> Groups:
    timeout = datetime.timedelta(seconds=timeout_s)
    trainers = list(roles.trainers)
    everyone = list(range(dist.get_world_size()))
    return Groups(
        dense=dist.new_group(trainers, timeout=timeout, backend="gloo"),
        exchange=dist.new_group(trainers, timeout=timeout, backend="gloo"),
        data=dist.new_group(everyone, timeout=timeout, backend="gloo"),
        plan=dist.new_group(everyone, timeout=timeout, backend="gloo"),
        metrics=dist.new_group(everyone, timeout=timeout, backend="gloo"),
    )


def posted(what: str, op, *args, **kwargs):
    """Start a torch.distributed operation (isend, irecv, all_to_all_single, ...); a
    peer already gone makes gloo fail right here, not at wait(): name it the same way."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as err:
        raise PeerError(f"{what}: {_gloo_reason(err)}") from err


def wait(work, what: str) -> None:
    """Wait on a request; turn gloo's errors into one that names the peer."""
    try:
        work.wait()
    except RuntimeError as err:
        raise PeerError(f"{what}: {_gloo_reason(err)}") from err


def _gloo_reason(err: BaseException) -> str:
    """gloo's message without its source path and boilerplate advice."""
    text = str(err).strip()
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically caused", 1)[0]


def ready(who: str) -> None:
    """Every role calls this once its setup is done (shards initialised, models built,
    the planner's first window read): training clocks start together after it, so a
    run's throughput is not charged with another role's start-up."""
    try:
        dist.barrier()
    except RuntimeError as err:
        raise PeerError(f"{who}: waiting for every role to finish setting up: {_gloo_reason(err)}") from err


def send_bytes(payload: np.ndarray, dst: int, group) -> list:
    """Variable-length message: its length, then the bytes (both async). Returns the
    pending sends with their tensors, which must stay alive until they complete."""
    raw = torch.from_numpy(np.ascontiguousarray(payload).view(np.uint8).ravel())
    length = torch.tensor([raw.numel()], dtype=torch.int64)
    what = f"message to rank {dst}"
    works = [posted(what, dist.isend, length, dst, group=group)]
    if raw.numel():
        works.append(posted(what, dist.isend, raw, dst, group=group))
    return [(w, length, raw) for w in works]


def recv_bytes(src: int, group, what: str) -> np.ndarray:
    length = torch.zeros(1, dtype=torch.int64)
    wait(posted(what, dist.irecv, length, src, group=group), what)
    out = torch.empty(int(length.item()), dtype=torch.uint8)
    if out.numel():
        wait(posted(what, dist.irecv, out, src, group=group), what)
    return out.numpy()


# --- message streams -------------------------------------------------------------------
# Plans go oracle -> each peer as an ordered stream of variable-length messages. Each
# message ends with an int64 trailer holding the length of the next one (-1: the
# stream ends), so the receiver posts the next receive as soon as it has a message:
# the transfer then happens while the receiver works, instead of costing two round
# trips (length, then payload) through a busy sender at the moment it is needed.

_TRAILER = 8
_END = -1


class StreamSender:
    """The sending side of one stream per destination, with at most `depth` messages in
    flight per destination (backpressure: the sender never runs unboundedly ahead). It
    holds each message back until the next one exists (its length goes in the trailer)."""

    def __init__(self, group, describe, depth: int = 32):
        self.group, self.describe, self.depth = group, describe, depth
        self._held: dict[int, np.ndarray] = {}
        self._in_flight: dict[int, list] = {}

    def send(self, dst: int, payload: np.ndarray) -> None:
        payload = np.ascontiguousarray(payload).view(np.uint8).ravel()
        if dst not in self._held:  # the stream opens with the first message's length
            self._put(dst, np.array([payload.nbytes], dtype=np.int64).view(np.uint8))
        else:
            self._release(dst, payload.nbytes)
        self._held[dst] = payload

    def close(self) -> None:
        """End every stream and wait until everything is delivered."""
        for dst in list(self._held):
            self._release(dst, _END)
        self._held.clear()
        for dst, queue in self._in_flight.items():
            for work, _ in queue:
                wait(work, f"oracle: plan delivery to {self.describe(dst)}")
            queue.clear()

    def _release(self, dst: int, next_length: int) -> None:
        held = self._held[dst]
        self._put(dst, np.concatenate([held, np.array([next_length], dtype=np.int64).view(np.uint8)]))

    def _put(self, dst: int, raw: np.ndarray) -> None:
        queue = self._in_flight.setdefault(dst, [])
        if len(queue) >= self.depth:
            work, _ = queue.pop(0)
            wait(work, f"oracle: plan delivery to {self.describe(dst)}")
        tensor = torch.from_numpy(raw)
        what = f"oracle: plan delivery to {self.describe(dst)}"
        queue.append((posted(what, dist.isend, tensor, dst, group=self.group), tensor))


class StreamReceiver:
    """The receiving side of one stream: `next()` returns the next message, and posts
    the receive of the one after it before returning."""

    def __init__(self, src: int, group, what: str):
        self.src, self.group, self.what = src, group, what
        self._buf = torch.zeros(1, dtype=torch.int64)
        self._work = posted(what, dist.irecv, self._buf, src, group=group)
        self._first = True

    def next(self) -> np.ndarray:
        if self._work is None:
            raise PeerError(f"{self.what}: the stream has ended")
        wait(self._work, self.what)
        if self._first:  # the opening length
            self._first = False
            self._post(int(self._buf.item()))
            wait(self._work, self.what)
        raw = self._buf.numpy()
        next_length = int(raw[-_TRAILER:].view(np.int64)[0])
        message = raw[:-_TRAILER]
        if next_length == _END:
            self._work = None
        else:
            self._post(next_length)
        return message

    def _post(self, length: int) -> None:
        if length < 0:
            raise PeerError(f"{self.what}: corrupt stream (message length {length})")
        self._buf = torch.empty(length + _TRAILER, dtype=torch.uint8)
        self._work = posted(self.what, dist.irecv, self._buf, self.src, group=self.group)


def fail_fast(desc: str, err: BaseException, roles: Roles | None = None) -> None:
    """Report a role's failure with its name and end the process now: waiting for
    destructors or other threads could hang on a dead peer."""
    lost = lost_peers(roles) if isinstance(err, PeerError) else []
    blame = f" [{'; '.join(lost)}]" if lost else ""
    print(f"bagpipe: {desc} failed: {type(err).__name__}: {err}{blame}", file=sys.stderr, flush=True)
    if not isinstance(err, (PeerError, ValueError, RuntimeError)) or type(err) is RuntimeError:
        traceback.print_exc(file=sys.stderr)  # unexpected: the traceback is the report
    exit_now(1)
