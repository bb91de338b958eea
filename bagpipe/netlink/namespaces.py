"""Network-namespace plumbing for the emulated link: names, subnets, /etc/netns,
teardown on every exit path, and removal of what a killed bench left behind.

Naming: a link with prefix P (default ``bp<pid>``, so a killed bench's leftovers can
be told from a live one's and removed by `cleanup_stale`) is made of::

    root namespace:  bridge Pbr = 10.x.y.1/24 --+-- Pv0 <=veth=> Pi0  (netns P-<host0>, 10.x.y.2)
                                                +-- Pv1 <=veth=> Pi1  (netns P-<host1>, 10.x.y.3)

DNS: a namespace cannot reach the root namespace's resolver, so every lookup (c10d
does reverse lookups of peers) waited out a 10 s timeout. Each namespace gets
/etc/netns/NS/{resolv.conf,hosts} (bind-mounted by `ip netns exec`): a resolver that
fails at once, and the link's addresses by name.

Teardown: every live link is tracked here (`track_link`); it is closed at exit and on
SIGINT/SIGTERM, and a signal that arrives while a link is being set up or torn down
(`critical()`) waits for that to finish.
"""

from __future__ import annotations

import atexit
import fnmatch
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

NETNS_ETC = "/etc/netns"
IFNAMSIZ = 15

# what a link's names look like (see the module notes): the owner's pid is group 1
_NAME_RE = re.compile(r"^[A-Za-z]*(\d+)(?:n\d+)?(?:-.+|br|v\d+|i\d+)$")


class LinkError(RuntimeError):
    """Setting up or tearing down the emulated link failed."""


# --- small helpers ----------------------------------------------------------------

def run_tool(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip`/`tc` (or any command), output captured; `check`: raise LinkError on failure."""
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LinkError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...).
    Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def kill_quietly(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to each pid; one already gone is fine."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pid_dead(pid: int) -> bool:
    """True when `pid` is gone or a zombie (a killed bench waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return proc_stat(pid)[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def owner_pid(name: str) -> int | None:
    """The pid encoded in a link's namespace or interface name, or None if it is not one."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def netns_list() -> list[str]:
    """Names of the network namespaces (`ip netns list`)."""
    out = run_tool(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_names() -> list[str]:
    """Names of the interfaces in the root namespace (a veth's `@peer` suffix dropped)."""
    out = run_tool(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def kill_netns_pids(ns: str, rounds: int = 50) -> None:
    """SIGKILL every process inside `ns` (repeat: one may fork while we kill)."""
    for _ in range(rounds):
        out = run_tool(["ip", "netns", "pids", ns], check=False).stdout.split()
        pids = [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        kill_quietly(pids)
        time.sleep(0.05)


def delete_netns(ns: str) -> None:
    """Kill what runs in `ns`, delete it and its /etc/netns/NS."""
    kill_netns_pids(ns)
    run_tool(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)


def write_netns_etc(ns: str, hosts_lines: list[str]) -> None:
    """`ip netns exec` bind-mounts /etc/netns/NS/* over /etc. A namespace cannot reach
    the root namespace's DNS server (no forwarding), so every lookup glibc sends there
    (torch's c10d looks up peer addresses, getfqdn, ...) waits out a 5-10 s timeout.
    Give the namespace a resolver that fails at once (nothing listens on its 127.0.0.1:53)
    and a hosts file naming the link's addresses, so lookups answer from files."""
    d = os.path.join(NETNS_ETC, ns)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "resolv.conf"), "w") as f:
        f.write("# written by bagpipe.netlink: no DNS inside the emulated cluster\n"
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    try:
        with open("/etc/hosts") as f:
            base = f.read()
    except OSError:
        base = "127.0.0.1 localhost\n"
    with open(os.path.join(d, "hosts"), "w") as f:
        f.write(base.rstrip("\n") + "\n# bagpipe.netlink\n" + "".join(line + "\n" for line in hosts_lines))


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in run_tool(["ip", "-4", "-o", "addr", "show"], check=False).stdout.splitlines():
        m = re.search(r"\binet (\d+\.\d+\.\d+\.\d+/\d+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in run_tool(["ip", "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast", "unreachable", "blackhole", "prohibit", "throw"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        if first and first != "default":
            try:
                nets.append(ipaddress.ip_network(first, strict=False))
            except ValueError:
                pass
    return nets


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A free 10.x.y.0/24 with x in 100..249, starting from one derived from `seed` (the
    pid), so concurrent benches start apart and then skip anything already in use."""
    in_use = _networks_in_use()
    span = 150 * 256
    for k in range(span):
        h = (seed + k) % span
        net = ipaddress.ip_network(f"10.{100 + h // 256}.{h % 256}.0/24")
        if not any(net.overlaps(n) for n in in_use if n.prefixlen > 0):
            return net
    raise LinkError("no free 10.x.y.0/24 subnet for the emulated link")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on `addr` right now."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


# --- support probe ----------------------------------------------------------------

_SUPPORT: tuple[bool, str] | None = None


def link_support() -> tuple[bool, str]:
    """(True, "") when namespaces, veths, bridges and tbf work here; else (False, why)."""
    global _SUPPORT
    if _SUPPORT is None:
        _SUPPORT = _probe_support()
    return _SUPPORT


def _probe_support() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "not root (network namespaces and tc need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found (install iproute2)"
    ns = f"bp{os.getpid()}-probe{uuid.uuid4().hex[:6]}"
    try:
        run_tool(["ip", "netns", "add", ns])
        try:
            # everything inside the probe namespace: no trace left in the root one
            run_tool(["ip", "-n", ns, "link", "add", "pbr", "type", "bridge"])
            run_tool(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
            run_tool(["ip", "-n", ns, "link", "set", "pa", "master", "pbr"])
            run_tool(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "tbf",
                      "rate", "1gbit", "burst", "256kb", "latency", "5ms"])
        finally:
            run_tool(["ip", "netns", "del", ns], check=False)
        if ns in netns_list():
            return False, f"could not delete test namespace {ns}"
    except LinkError as err:
        return False, str(err)
    except OSError as err:
        return False, f"{type(err).__name__}: {err}"
    return True, ""


# --- cleanup on every exit path ---------------------------------------------------
#
# A tracked link is anything with `close()` (bagpipe.netlink.shaping.ShapedLink); it is
# kept with the pid that created it, so a forked child never tears down its parent's.

_LIVE: list[tuple[int, object]] = []  # (owner pid, link)
_LOCK = threading.RLock()
_PREV_HANDLERS: dict[int, object] = {}
_BUSY = 0  # >0 while a link is being set up or torn down: signals wait for it
_PENDING: list[int] = []
_ATEXIT = False
_PREFIXES: set[str] = set()


def claim_prefix(owner: int, prefix: str | None, nhosts: int) -> str:
    """Reserve the name prefix of a new link of `nhosts` hosts made by process `owner`:
    `prefix`, or by default bp<owner>, or bp<owner>n<k> when this process already has a
    link, or when a dead process with the same pid left one behind (cleanup_stale's
    job). `release_link` frees it again."""
    with _LOCK:
        if prefix is None:
            taken = set(netns_list()) | set(link_names())
            prefix, k = f"bp{owner}", 0
            while prefix in _PREFIXES or f"{prefix}br" in taken or any(
                    t.startswith(prefix + "-") for t in taken):
                k += 1
                prefix = f"bp{owner}n{k}"
        if prefix in _PREFIXES:
            raise ValueError(f"prefix {prefix!r} is already in use by a live link")
        if len(prefix) + 1 + len(str(nhosts - 1)) > IFNAMSIZ or len(prefix) + 2 > IFNAMSIZ:
            raise ValueError(f"prefix {prefix!r} is too long for interface names ({IFNAMSIZ} chars)")
        _PREFIXES.add(prefix)
    return prefix


def track_link(link) -> None:
    """Close `link` at exit and on SIGINT/SIGTERM (in this process, not a forked child)."""
    global _ATEXIT
    with _LOCK:
        _LIVE.append((os.getpid(), link))
        if not _ATEXIT:
            atexit.register(_close_all)
            _ATEXIT = True
        _install_handlers()


def release_link(link, prefix: str) -> None:
    """Forget a closed `link` and free its `prefix`; with no live link left, put the
    previous signal handlers back."""
    with _LOCK:
        _LIVE[:] = [(pid, other) for pid, other in _LIVE if other is not link]
        _PREFIXES.discard(prefix)
        if not _LIVE:
            _restore_handlers()


def _close_all() -> None:
    for owner, link in list(_LIVE):
        if owner == os.getpid():  # never tear down a parent's link from a forked child
            link.close()


def _on_signal(signum, frame) -> None:
    if _BUSY:
        _PENDING.append(signum)  # handled when the setup/teardown in progress finishes
        return
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    _close_all()  # also restores the previous handlers
    if callable(prev):
        prev(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextmanager
def critical():
    """Setting up or tearing down a link: a SIGINT/SIGTERM arriving meanwhile is
    handled when the outermost such block ends."""
    global _BUSY
    _BUSY += 1
    try:
        yield
    finally:
        _BUSY -= 1
        if not _BUSY and _PENDING:
            signum = _PENDING.pop(0)
            _PENDING.clear()
            _on_signal(signum, None)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread() or _PREV_HANDLERS:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN or prev is None:
            continue  # ignored (or set outside Python): leave it so
        _PREV_HANDLERS[sig] = prev
        signal.signal(sig, _on_signal)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_PREV_HANDLERS.items()):
        try:
            if signal.getsignal(sig) is _on_signal:
                signal.signal(sig, prev)
        except (ValueError, TypeError):
            pass
    _PREV_HANDLERS.clear()


def cleanup_stale(prefix_glob: str = "bp*") -> list[str]:
    """Remove namespaces, bridges and veths matching `prefix_glob` whose owning pid
    (encoded in the name, e.g. bp1234-servers) is dead: what a `kill -9`-ed bench left.
    Processes still running inside such a namespace are killed first. Returns what it
    removed."""
    removed = []

    def stale(name: str) -> bool:
        pid = owner_pid(name)
        return fnmatch.fnmatch(name, prefix_glob) and pid is not None and pid_dead(pid)

    namespaces = [ns for ns in netns_list() if stale(ns)]
    for ns in namespaces:  # nothing may keep running in (or keep alive) a namespace
        kill_netns_pids(ns)
    for name in link_names():  # a veth's outer end takes its peer with it, at once
        if stale(name) and run_tool(["ip", "link", "del", name], check=False).returncode == 0:
            removed.append(f"link {name}")
    for ns in namespaces:
        delete_netns(ns)
        removed.append(f"netns {ns}")
    try:
        leftover = os.listdir(NETNS_ETC)
    except OSError:
        leftover = []
    for ns in leftover:  # /etc/netns/NS of a namespace already gone
        if stale(ns) and os.path.isdir(os.path.join(NETNS_ETC, ns)):
            shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)
            removed.append(f"dir {os.path.join(NETNS_ETC, ns)}")
    return removed
