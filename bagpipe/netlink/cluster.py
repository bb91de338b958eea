"""One Bagpipe job as a multi-node torchrun world across a shaped link's namespaces.

`shaped_torchrun` starts one torchrun agent ("node") per namespace (plus one in the
root namespace), watches them, kills the rest when one fails, reports what the roles
said and what crossed the link, and removes everything on every exit path.

What a torchrun node inside a namespace needs (each found on this machine): the
hostname resolves to 127.0.0.1 in every namespace, so each node is told its address
(`--local-addr`, where its store listens if it becomes rank 0), whether it hosts the
rendezvous (`--rdzv-conf is_host=0/1`), and gloo its interface (GLOO_SOCKET_IFNAME).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from bagpipe.launch import MONITOR_INTERVAL_S
from bagpipe.netlink.namespaces import LinkError, cleanup_stale, free_port, kill_quietly, proc_stat
from bagpipe.netlink.shaping import ShapedLink

TOPOLOGIES = ("servers", "per-process")


def plan_nodes(trainers: int, servers: int, topology: str) -> list[tuple[str, str | None, int, str]]:
    """(node name, namespace host or None for the root namespace, nproc, --node-roles).
    The root-namespace node comes first: it hosts the rendezvous."""
    if topology == "servers":
        return [("trainers", None, trainers + 1, f"oracle=1,trainer={trainers}"),
                ("servers", "servers", servers, f"server={servers}")]
    if topology == "per-process":
        return ([("oracle", None, 1, "oracle=1"), ("servers", "servers", servers, f"server={servers}")]
                + [(f"trainer{i}", f"trainer{i}", 1, "trainer=1") for i in range(trainers)])
    raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")


# --- the nodes' processes ---------------------------------------------------------

def _set_pdeathsig() -> None:
    """In the child before exec: get SIGTERM when the bench dies, even by SIGKILL
    (torchrun then stops its workers), so a killed bench leaves no job behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(proc_stat(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class _Node:
    def __init__(self, name: str, host: str | None, ifname: str, addr: str, nproc: int, roles: str):
        self.name, self.host, self.ifname, self.addr = name, host, ifname, addr
        self.nproc, self.roles = nproc, roles
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self.killed = False

    @property
    def is_root(self) -> bool:
        return self.host is None


def _killpg_quietly(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _kill_nodes(nodes: list[_Node], grace: float = 5.0) -> None:
    """SIGTERM each torchrun agent's process group (the agent stops its workers, which
    run in sessions of their own), then SIGKILL the agents and every descendant."""
    live = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    tree = {n.name: _descendants(n.proc.pid) for n in live}
    for n in live:
        n.killed = True
        _killpg_quietly(n.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for n in live:
        try:
            n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for n in live:
        pids = tree[n.name] + (_descendants(n.proc.pid) if n.proc.poll() is None else [])
        _killpg_quietly(n.proc.pid, signal.SIGKILL)
        kill_quietly(pids)
        try:
            n.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _wait_listening(addr: str, port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((addr, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


# --- what the nodes said ----------------------------------------------------------

def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as err:
        return f"(no log: {err})"


_EXC_RE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:? ")


def _failure_lines(path: str, limit: int = 20) -> list[str]:
    """The one-line reports in a node's log: `transport.fail_fast`'s, config errors, and
    the last line of any Python traceback (other than torchrun's own summary)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.startswith(("bagpipe: ", "error: "))
                     or (_EXC_RE.match(line) and "ChildFailedError" not in line)]
    except OSError:
        return []
    return list(dict.fromkeys(lines))[:limit]  # each distinct report once


def _write_link_report(link: ShapedLink, topology: str, nodes: list[_Node], rc: int, path: str) -> None:
    """What crossed the shaped link: lets a bench check its traffic really went remote."""
    try:
        report = {"gbps": link.gbps, "topology": topology, "rc": rc, "tbf": {
            "rate_bits": link.rate_bits, "burst_bytes": link.burst_bytes, "latency_ms": link.latency_ms},
            "nodes": {n.name: {"netns": link.ns_of(n.host) if n.host else None, "ip": n.addr, "ifname": n.ifname,
                               "roles": n.roles, "exit": n.proc.returncode if n.proc else None} for n in nodes},
            "links": link.stats()}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    except (LinkError, OSError) as err:
        print(f"shaped_torchrun: could not write {path}: {err}", file=sys.stderr)


# --- the job ----------------------------------------------------------------------

def shaped_torchrun(trainers: int, servers: int, train_args: list[str], gbps: float,
                    topology: str = "servers", timeout: float | None = None, env: dict | None = None,
                    log_dir: str | None = None) -> int:
    """Run one Bagpipe job as a multi-node torchrun world over an emulated link shaped to
    `gbps`; return 0, or the non-zero exit code of the first node that failed (128+N if
    a signal killed it, 124 on timeout); the other nodes are then killed, processes in
    the namespaces included, and the link removed. Every node's output goes to
    `{log_dir}/{node}.log` (a temp dir by default), what crossed the link to
    `{log_dir}/link.json`; on failure the failing node's log tail is printed. The
    root-namespace node is started first: it hosts the c10d rendezvous at `root_ip`.

    Topologies:
    - "servers": the S servers in one namespace; the oracle and T trainers in the root
      namespace. Trainer <-> server traffic crosses the shaped veth; oracle <-> trainer
      and trainer <-> trainer traffic stays in the root namespace (loopback, unshaped),
      as if the trainers shared one machine.
    - "per-process": the servers in one namespace, each trainer in its own, the oracle
      alone in the root namespace: trainer <-> trainer exchanges are shaped too, and so is
      oracle <-> anyone traffic (plans and metrics; small).
    """
    if trainers < 1 or servers < 1:
        raise ValueError("need at least one trainer and one server")
    args = list(train_args)
    if args and args[0] == "--":
        args = args[1:]
    for flag in ("--trainers", "--servers", "--node-roles"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            raise ValueError(f"{flag} is set by shaped_torchrun, not in train_args")
    specs = plan_nodes(trainers, servers, topology)
    hosts = [h for _, h, _, _ in specs if h is not None]
    if log_dir is None:
        log_dir = tempfile.mkdtemp(prefix="bagpipe-netlink-")
    os.makedirs(log_dir, exist_ok=True)
    start = time.monotonic()
    cleanup_stale()  # what earlier benches killed with -9 left behind (dead owners only)

    with ShapedLink(gbps, hosts) as link:
        nodes = [_Node(name, host, link.ifname_of(host) if host else link.root_ifname,
                       link.ip_of(host) if host else link.root_ip, nproc, roles)
                 for name, host, nproc, roles in specs]
        link.add_cleanup(lambda: _kill_nodes(nodes, grace=3.0))
        port = free_port(link.root_ip)
        rdzv_id = f"bagpipe-{link.prefix}-{uuid.uuid4().hex[:8]}"
        base_env = dict(os.environ, **(env or {}))
        base_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        logs = []
        try:
            for node in nodes:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)),
                       "--nproc-per-node", str(node.nproc), "--monitor-interval", str(MONITOR_INTERVAL_S),
                       "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", f"{link.root_ip}:{port}", "--rdzv-id", rdzv_id,
                       # the hostname resolves to 127.0.0.1 in every namespace: say who hosts
                       # the rendezvous store, and which address this node's store (if it
                       # becomes rank 0) is reached at
                       "--rdzv-conf", f"is_host={1 if node.is_root else 0}",
                       "--local-addr", node.addr,
                       "-m", "bagpipe.train", "--trainers", str(trainers), "--servers", str(servers),
                       *args, "--node-roles", node.roles]
                if not node.is_root:
                    cmd = link.wrap(node.host, cmd)
                node_env = dict(base_env, GLOO_SOCKET_IFNAME=node.ifname)
                node.log_path = os.path.join(log_dir, f"{node.name}.log")
                log = open(node.log_path, "w")
                logs.append(log)
                log.write(f"# {' '.join(cmd)}\n# GLOO_SOCKET_IFNAME={node.ifname}\n")
                log.flush()
                node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=node_env,
                                             start_new_session=True, preexec_fn=_set_pdeathsig)
                if node.is_root and not _wait_listening(link.root_ip, port, node.proc, 60):
                    if node.proc.poll() is None:
                        print(f"shaped_torchrun: node {node.name!r} did not open the rendezvous at "
                              f"{link.root_ip}:{port} within 60 s", file=sys.stderr)
                    break  # its failure is reported below
            rc = _watch(nodes, start, timeout)
            _write_link_report(link, topology, nodes, rc, os.path.join(log_dir, "link.json"))
            return rc
        finally:
            _kill_nodes(nodes)
            for log in logs:
                log.close()


def _watch(nodes: list[_Node], start: float, timeout: float | None) -> int:
    first_bad: _Node | None = None
    while True:
        started = [n for n in nodes if n.proc is not None]
        codes = {n.name: n.proc.poll() for n in started}
        if first_bad is None:
            bad = [n for n in started if codes[n.name] not in (None, 0)]
            # fewer started: the root node never opened the rendezvous (exited, or hangs)
            if bad or len(started) < len(nodes):
                first_bad = bad[0] if bad else started[0]
                # let the other nodes notice the loss and report it themselves, briefly
                grace_end = time.monotonic() + 5
        if first_bad is not None and (all(c is not None for c in codes.values()) or time.monotonic() > grace_end):
            _kill_nodes(nodes, grace=3.0)
            rc = first_bad.proc.returncode
            rc = 128 - rc if rc is not None and rc < 0 else (rc or 1)  # killed by a signal: 128+N
            print(f"shaped_torchrun: node {first_bad.name!r} failed with exit code {first_bad.proc.returncode}; "
                  f"last lines of {first_bad.log_path}:\n{_tail(first_bad.log_path)}", file=sys.stderr)
            others = [f"{n.name}={n.proc.returncode}{' (killed)' if n.killed else ''}"
                      for n in started if n is not first_bad]
            if others:
                print(f"shaped_torchrun: other nodes: {', '.join(others)}; "
                      f"logs in {os.path.dirname(first_bad.log_path)}", file=sys.stderr)
            reports = [f"  [{n.name}] {line}" for n in started for line in _failure_lines(n.log_path)]
            if reports:
                print("shaped_torchrun: failures reported by the roles:\n" + "\n".join(reports), file=sys.stderr)
            return rc
        if first_bad is None and len(started) == len(nodes) and all(c == 0 for c in codes.values()):
            return 0
        if timeout is not None and time.monotonic() - start > timeout:
            _kill_nodes(nodes, grace=3.0)
            print(f"shaped_torchrun: timed out after {timeout:.0f} s; logs in "
                  f"{os.path.dirname(nodes[0].log_path)}", file=sys.stderr)
            for n in started:
                print(f"--- {n.name} ({n.log_path}):\n{_tail(n.log_path, 15)}", file=sys.stderr)
            return 124
        time.sleep(0.1)
