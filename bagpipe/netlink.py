"""An emulated cluster link on one machine: network namespaces, veth pairs, tbf.

On one machine every "remote" embedding fetch is a loopback memory copy, which hides
what Bagpipe is for (DESIGN.md section 7). `ShapedLink` puts named "hosts" in their
own network namespaces, each joined to a Linux bridge in the root namespace by a veth
pair whose two ends are both shaped with `tc qdisc ... tbf` to the requested rate
(netem is not available here, so there is rate limiting but no added delay).
`shaped_torchrun` then runs one Bagpipe job as a multi-node torchrun world across
those namespaces, so trainer <-> server traffic crosses a real, rate-limited link.

Layout of a link with prefix P (default ``bp<pid>``, so a killed bench's leftovers
can be told from a live one's and removed by `cleanup_stale`)::

    root namespace:  bridge Pbr = 10.x.y.1/24 --+-- Pv0 <=veth=> Pi0  (netns P-<host0>, 10.x.y.2)
                                                +-- Pv1 <=veth=> Pi1  (netns P-<host1>, 10.x.y.3)

Shaping: tbf on the egress of the outer end (bridge -> namespace, the host's
download) and of the inner end (namespace -> bridge, its upload), like one NIC per
host. Traffic between two namespaces passes both hosts' tbf; traffic inside the root
namespace (to `root_ip` from a root-namespace process) stays on loopback, unshaped.

Things a namespace needs that are handled here (each found on this machine):
- DNS: a namespace cannot reach the root namespace's resolver, so every lookup (c10d
  does reverse lookups of peers) waited out a 10 s timeout. Each namespace gets
  /etc/netns/NS/{resolv.conf,hosts} (bind-mounted by `ip netns exec`): a resolver that
  fails at once, and the link's addresses by name.
- the hostname resolves to 127.0.0.1 in every namespace, so each torchrun node is
  told its address (`--local-addr`, where its store listens if it becomes rank 0),
  whether it hosts the rendezvous (`--rdzv-conf is_host=0/1`), and gloo its interface
  (GLOO_SOCKET_IFNAME).

Needs root, `ip` and `tc` (iproute2); `link_support()` says whether it works here.
`python -m bagpipe.netlink check|measure --gbps G|cleanup` from a shell.
"""

from __future__ import annotations

import atexit
import ctypes
import fnmatch
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable

HZ = 250  # CONFIG_HZ of this kernel class; tbf's classic sizing rule is burst >= rate / HZ

# tbf sizing (measured on this machine with a TCP stream through a bridge + veth):
# - burst: the bucket must hold at least rate/HZ bytes or the qdisc cannot release a
#   timer tick's worth of data per tick, and at least a few 64 KB GSO super-packets
#   (veth does GSO; a packet bigger than the bucket is split or dropped). 256 KB floor:
#   at 1 Gbit/s, 64 KB gave 0.87 Gbit/s of goodput, 256-512 KB gave 0.94-0.96
#   (~0.96 is the wire rate minus TCP/IP/Ethernet headers); at 0.2 Gbit/s any of them
#   gave 0.19. A bigger bucket only lets the first <= burst bytes after an idle
#   period go at memory speed, which is small against the MBs of a fetch.
# - latency: the longest a packet may wait in the tbf queue (the queue holds
#   rate * latency + burst bytes; it is a queueing bound, not an added delay). 5 ms is
#   125 KB at 0.2 Gbit/s and 625 KB at 1 Gbit/s, far above the bandwidth-delay product
#   of a ~50 us veth round trip, so TCP keeps the bucket busy (2 and 20 ms measured
#   the same); more would only add queueing delay.
MIN_BURST_BYTES = 256 * 1024
LATENCY_MS = 5

_NAME_RE = re.compile(r"^[A-Za-z]*(\d+)(?:n\d+)?(?:-.+|br|v\d+|i\d+)$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.]+$")
IFNAMSIZ = 15


class LinkError(RuntimeError):
    """Setting up or tearing down the emulated link failed."""


# --- small helpers ----------------------------------------------------------------

def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LinkError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _pid_dead(pid: int) -> bool:
    """True when `pid` is gone or a zombie (a killed bench waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _owner_pid(name: str) -> int | None:
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _kill_netns_pids(ns: str, rounds: int = 50) -> None:
    """SIGKILL every process inside `ns` (repeat: one may fork while we kill)."""
    for _ in range(rounds):
        out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        pids = [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


NETNS_ETC = "/etc/netns"


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)


def _write_netns_etc(ns: str, hosts_lines: list[str]) -> None:
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
    for line in _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout.splitlines():
        m = re.search(r"\binet (\d+\.\d+\.\d+\.\d+/\d+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast", "unreachable", "blackhole", "prohibit", "throw"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        if first and first != "default":
            try:
                nets.append(ipaddress.ip_network(first, strict=False))
            except ValueError:
                pass
    return nets


def _pick_subnet(seed: int) -> ipaddress.IPv4Network:
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
        _run(["ip", "netns", "add", ns])
        try:
            # everything inside the probe namespace: no trace left in the root one
            _run(["ip", "-n", ns, "link", "add", "pbr", "type", "bridge"])
            _run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
            _run(["ip", "-n", ns, "link", "set", "pa", "master", "pbr"])
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "tbf",
                  "rate", "1gbit", "burst", "256kb", "latency", "5ms"])
        finally:
            _run(["ip", "netns", "del", ns], check=False)
        if ns in _netns_list():
            return False, f"could not delete test namespace {ns}"
    except LinkError as err:
        return False, str(err)
    except OSError as err:
        return False, f"{type(err).__name__}: {err}"
    return True, ""


# --- cleanup on every exit path ---------------------------------------------------

_LIVE: list["ShapedLink"] = []
_LOCK = threading.RLock()
_PREV_HANDLERS: dict[int, object] = {}
_BUSY = 0  # >0 while a link is being set up or torn down: signals wait for it
_PENDING: list[int] = []
_ATEXIT = False
_PREFIXES: set[str] = set()


def _close_all() -> None:
    for link in list(_LIVE):
        link.close()


def _atexit_close() -> None:
    for link in list(_LIVE):
        if link._owner == os.getpid():  # never tear down a parent's link from a forked child
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
def _critical():
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
        pid = _owner_pid(name)
        return fnmatch.fnmatch(name, prefix_glob) and pid is not None and _pid_dead(pid)

    namespaces = [ns for ns in _netns_list() if stale(ns)]
    for ns in namespaces:  # nothing may keep running in (or keep alive) a namespace
        _kill_netns_pids(ns)
    for name in _link_names():  # a veth's outer end takes its peer with it, at once
        if stale(name) and _run(["ip", "link", "del", name], check=False).returncode == 0:
            removed.append(f"link {name}")
    for ns in namespaces:
        _delete_netns(ns)
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


# --- the link ---------------------------------------------------------------------

def tbf_params(gbps: float) -> tuple[int, int, int]:
    """(rate bit/s, burst bytes, latency ms) for a tbf at `gbps`; see the module notes."""
    rate = int(gbps * 1e9)
    burst = max(MIN_BURST_BYTES, -(-rate // 8 // HZ))
    return rate, burst, LATENCY_MS


class ShapedLink:
    """Namespaces `{prefix}-{host}` joined to bridge `{prefix}br` by veths shaped to
    `gbps` in both directions. A context manager; `close()` is idempotent and also runs
    at exit and on SIGINT/SIGTERM while the link exists. A custom `prefix` should contain
    the owner's pid (like the default ``bp<pid>``) or `cleanup_stale` cannot tell when
    its owner is dead."""

    def __init__(self, gbps: float, hosts: list[str], prefix: str | None = None):
        if not gbps > 0:
            raise ValueError(f"gbps must be positive, got {gbps}")
        hosts = list(hosts)
        if not hosts or len(set(hosts)) != len(hosts):
            raise ValueError(f"hosts must be unique and non-empty, got {hosts}")
        for h in hosts:
            if not _HOST_RE.match(h):
                raise ValueError(f"host name {h!r}: use letters, digits, '_' and '.'")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts on one /24")
        ok, why = link_support()
        if not ok:
            raise LinkError(f"emulated links are not supported here: {why}")
        self._owner = os.getpid()
        with _LOCK:
            if prefix is None:
                # bp<pid>, or bp<pid>n<k> when this process already has a link, or when a
                # dead process with the same pid left one behind (cleanup_stale's job)
                taken = set(_netns_list()) | set(_link_names())
                prefix, k = f"bp{self._owner}", 0
                while prefix in _PREFIXES or f"{prefix}br" in taken or any(
                        t.startswith(prefix + "-") for t in taken):
                    k += 1
                    prefix = f"bp{self._owner}n{k}"
            if prefix in _PREFIXES:
                raise ValueError(f"prefix {prefix!r} is already in use by a live link")
            if len(prefix) + 1 + len(str(len(hosts) - 1)) > IFNAMSIZ or len(prefix) + 2 > IFNAMSIZ:
                raise ValueError(f"prefix {prefix!r} is too long for interface names ({IFNAMSIZ} chars)")
            _PREFIXES.add(prefix)
        self.gbps = float(gbps)
        self.prefix = prefix
        self.hosts = hosts
        self._cleanups: list[Callable[[], None]] = []
        self._closed = False
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self.rate_bits, self.burst_bytes, self.latency_ms = tbf_params(gbps)
        with _critical():
            with _LOCK:
                _LIVE.append(self)
                global _ATEXIT
                if not _ATEXIT:
                    atexit.register(_atexit_close)
                    _ATEXIT = True
                _install_handlers()
            try:
                self._setup()
            except BaseException:
                self.close()
                raise

    # names and addresses
    @property
    def root_ifname(self) -> str:
        return f"{self.prefix}br"

    @property
    def root_ip(self) -> str:
        return str(self._net.network_address + 1)

    def _index(self, host: str) -> int:
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError(f"no host {host!r} on this link (hosts: {self.hosts})") from None

    def ns_of(self, host: str) -> str:
        self._index(host)
        return f"{self.prefix}-{host}"

    def ip_of(self, host: str) -> str:
        return str(self._net.network_address + 2 + self._index(host))

    def ifname_of(self, host: str) -> str:
        return f"{self.prefix}i{self._index(host)}"

    def outer_ifname_of(self, host: str) -> str:
        return f"{self.prefix}v{self._index(host)}"

    def wrap(self, host: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns_of(host), *cmd]

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run `fn` first when the link closes (on any path, signals included)."""
        self._cleanups.append(fn)

    def qdisc(self, host: str, to_host: bool = True) -> dict:
        """tc's JSON for the tbf on `host`'s veth (`to_host`: the bridge -> namespace end):
        options.rate (bytes/s), bytes, packets, drops, overlimits, ..."""
        ns = None if to_host else self.ns_of(host)
        dev = self.outer_ifname_of(host) if to_host else self.ifname_of(host)
        out = _run(["tc"] + (["-n", ns] if ns else []) + ["-s", "-j", "qdisc", "show", "dev", dev]).stdout
        for q in json.loads(out or "[]"):
            if q.get("kind") == "tbf":
                return q
        raise LinkError(f"no tbf qdisc on {dev}")

    def stats(self) -> dict[str, dict[str, int]]:
        """Bytes and drops through each host's shaped link so far, both directions."""
        out = {}
        for host in self.hosts:
            down, up = self.qdisc(host, True), self.qdisc(host, False)
            out[host] = {"to_host_bytes": int(down.get("bytes", 0)), "from_host_bytes": int(up.get("bytes", 0)),
                         "drops": int(down.get("drops", 0)) + int(up.get("drops", 0))}
        return out

    def _tbf(self, ns: str | None, dev: str) -> None:
        cmd = ["tc"] + (["-n", ns] if ns else []) + [
            "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{self.rate_bits}bit",
            "burst", str(self.burst_bytes), "latency", f"{self.latency_ms}ms"]
        _run(cmd)

    def _setup(self) -> None:
        self._net = _pick_subnet(self._owner)
        br = self.root_ifname
        _run(["ip", "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        self._made_links.append(br)
        # where br_netfilter is loaded (docker hosts), bridged frames go through the
        # iptables FORWARD chain, often DROP by default: keep this bridge out of it
        _run(["ip", "link", "set", br, "type", "bridge", "nf_call_iptables", "0"], check=False)
        _run(["ip", "addr", "add", f"{self.root_ip}/24", "dev", br])
        _run(["ip", "link", "set", br, "up"])
        names = [f"{self.root_ip} {self.prefix}-root"] + [f"{self.ip_of(h)} {self.ns_of(h)}" for h in self.hosts]
        for host in self.hosts:
            ns, inner, outer = self.ns_of(host), self.ifname_of(host), self.outer_ifname_of(host)
            _run(["ip", "netns", "add", ns])
            self._made_ns.append(ns)
            _write_netns_etc(ns, names)
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns])
            self._made_links.append(outer)
            _run(["ip", "link", "set", outer, "master", br])
            _run(["ip", "link", "set", outer, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.ip_of(host)}/24", "dev", inner])
            _run(["ip", "-n", ns, "link", "set", inner, "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", self.root_ip])
            self._tbf(None, outer)  # bridge -> namespace
            self._tbf(ns, inner)  # namespace -> bridge

    def close(self) -> None:
        with _critical():
            with _LOCK:
                if self._closed:
                    return
                self._closed = True
            try:
                for fn in reversed(self._cleanups):
                    try:
                        fn()
                    except Exception as err:  # noqa: BLE001 - keep tearing down
                        print(f"netlink: cleanup hook failed: {err}", file=sys.stderr)
                # kill and delete namespaces first (deleting the veth pair with it),
                # then whatever is left in the root namespace
                for ns in self._made_ns:
                    _kill_netns_pids(ns)
                for link in reversed(self._made_links):
                    _run(["ip", "link", "del", link], check=False)
                for ns in self._made_ns:
                    _delete_netns(ns)
            finally:
                with _LOCK:
                    if self in _LIVE:
                        _LIVE.remove(self)
                    _PREFIXES.discard(self.prefix)
                    if not _LIVE:
                        _restore_handlers()

    def __enter__(self) -> "ShapedLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._net}"
        return f"ShapedLink({self.gbps} Gbit/s, hosts={self.hosts}, prefix={self.prefix!r}, {state})"


# --- measuring the link -----------------------------------------------------------

_TPUT = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); buf = memoryview(bytearray(1 << 20)); n = 0; t0 = None
    while True:
        k = c.recv_into(buf)
        if not k: break
        if t0 is None: t0 = time.perf_counter()
        n += k
    print(n, time.perf_counter() - t0, flush=True)
else:
    c = socket.create_connection((host, port)); data = b"\0" * (1 << 20)
    for _ in range(int(sys.argv[4])): c.sendall(data)
    c.close()
"""


def measure_gbps(link: ShapedLink, host: str, megabytes: int = 50, to_host: bool = True) -> float:
    """TCP goodput (payload Gbit/s) of one stream between the root namespace and `host`
    (`to_host`: root -> host). Goodput is ~4% under the tbf rate, which counts headers."""
    port = _free_port(link.root_ip)
    if to_host:
        recv_cmd = link.wrap(host, [sys.executable, "-c", _TPUT, "recv", link.ip_of(host), str(port)])
        send_cmd = [sys.executable, "-c", _TPUT, "send", link.ip_of(host), str(port), str(megabytes)]
    else:
        recv_cmd = [sys.executable, "-c", _TPUT, "recv", link.root_ip, str(port)]
        send_cmd = link.wrap(host, [sys.executable, "-c", _TPUT, "send", link.root_ip, str(port), str(megabytes)])
    recv = subprocess.Popen(recv_cmd, stdout=subprocess.PIPE, text=True)
    try:
        if recv.stdout.readline().strip() != "ready":
            raise LinkError("throughput receiver did not start")
        subprocess.run(send_cmd, check=True, timeout=600)
        out, _ = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    nbytes, seconds = out.split()
    return int(nbytes) * 8 / float(seconds) / 1e9


def _free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


# --- a Bagpipe job across namespaces ------------------------------------------------

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
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
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


def _kill_nodes(nodes: list[_Node], grace: float = 5.0) -> None:
    """SIGTERM each torchrun agent's process group (the agent stops its workers, which
    run in sessions of their own), then SIGKILL the agents and every descendant."""
    live = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    tree = {n.name: _descendants(n.proc.pid) for n in live}
    for n in live:
        n.killed = True
        try:
            os.killpg(n.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for n in live:
        try:
            n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for n in live:
        pids = tree[n.name] + (_descendants(n.proc.pid) if n.proc.poll() is None else [])
        try:
            os.killpg(n.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            n.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


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
        port = _free_port(link.root_ip)
        rdzv_id = f"bagpipe-{link.prefix}-{uuid.uuid4().hex[:8]}"
        base_env = dict(os.environ, **(env or {}))
        base_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        logs = []
        try:
            for node in nodes:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)),
                       "--nproc-per-node", str(node.nproc), "--rdzv-backend", "c10d",
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
                    break  # its failure is reported below
            rc = _watch(nodes, start, timeout)
            _write_link_report(link, topology, nodes, rc, os.path.join(log_dir, "link.json"))
            return rc
        finally:
            _kill_nodes(nodes)
            for log in logs:
                log.close()


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


def _watch(nodes: list[_Node], start: float, timeout: float | None) -> int:
    first_bad: _Node | None = None
    while True:
        started = [n for n in nodes if n.proc is not None]
        codes = {n.name: n.proc.poll() for n in started}
        if first_bad is None:
            bad = [n for n in started if codes[n.name] not in (None, 0)]
            if bad or len(started) < len(nodes) and all(c is not None for c in codes.values()):
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bagpipe.netlink", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="can emulated links be created here?")
    sub.add_parser("cleanup", help="remove links left by killed benches")
    m = sub.add_parser("measure", help="TCP goodput through a link shaped to --gbps")
    m.add_argument("--gbps", type=float, default=1.0)
    m.add_argument("--megabytes", type=int, default=50)
    a = p.parse_args(argv)
    if a.cmd == "check":
        ok, why = link_support()
        print("supported" if ok else f"not supported: {why}")
        return 0 if ok else 1
    if a.cmd == "cleanup":
        for item in cleanup_stale():
            print(f"removed {item}")
        return 0
    with ShapedLink(a.gbps, ["peer"]) as link:
        down = measure_gbps(link, "peer", a.megabytes, to_host=True)
        up = measure_gbps(link, "peer", a.megabytes, to_host=False)
    print(f"configured {a.gbps:g} Gbit/s (tbf rate {link.rate_bits} bit/s, burst {link.burst_bytes} B, "
          f"latency {link.latency_ms} ms): root->ns {down:.3f} Gbit/s, ns->root {up:.3f} Gbit/s of TCP goodput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
