"""The shaped link: hosts in namespaces behind tbf-limited veths, and a goodput probe.

`ShapedLink` puts named "hosts" in their own network namespaces, each joined to a
Linux bridge in the root namespace by a veth pair (layout: bagpipe.netlink.namespaces)
whose two ends are both shaped with `tc qdisc ... tbf` to the requested rate (netem is
not available here, so there is rate limiting but no added delay).

Shaping: tbf on the egress of the outer end (bridge -> namespace, the host's
download) and of the inner end (namespace -> bridge, its upload), like one NIC per
host. Traffic between two namespaces passes both hosts' tbf; traffic inside the root
namespace (to `root_ip` from a root-namespace process) stays on loopback, unshaped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from typing import Callable

from bagpipe.netlink.namespaces import (
    LinkError, claim_prefix, critical, delete_netns, free_port, kill_netns_pids, link_support,
    pick_subnet, release_link, run_tool, track_link, write_netns_etc,
)

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

_HOST_RE = re.compile(r"^[A-Za-z0-9_.]+$")


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
        self.prefix = claim_prefix(self._owner, prefix, len(hosts))
        self.gbps = float(gbps)
        self.hosts = hosts
        self._cleanups: list[Callable[[], None]] = []
        self._closed = False
        self._close_lock = threading.Lock()
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self.rate_bits, self.burst_bytes, self.latency_ms = tbf_params(gbps)
        with critical():
            track_link(self)
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

    def _tc(self, host: str, to_host: bool) -> tuple[list[str], str]:
        """(`tc` command, device) for `host`'s shaped end: `to_host`, the outer end (root
        namespace, bridge -> namespace), else the inner one (in the host's namespace)."""
        if to_host:
            return ["tc"], self.outer_ifname_of(host)
        return ["tc", "-n", self.ns_of(host)], self.ifname_of(host)

    def qdisc(self, host: str, to_host: bool = True) -> dict:
        """tc's JSON for the tbf on `host`'s veth (`to_host`: the bridge -> namespace end):
        options.rate (bytes/s), bytes, packets, drops, overlimits, ..."""
        tc, dev = self._tc(host, to_host)
        out = run_tool(tc + ["-s", "-j", "qdisc", "show", "dev", dev]).stdout
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

    def _shape(self, host: str, to_host: bool) -> None:
        tc, dev = self._tc(host, to_host)
        run_tool(tc + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{self.rate_bits}bit",
                       "burst", str(self.burst_bytes), "latency", f"{self.latency_ms}ms"])

    def _setup(self) -> None:
        self._net = pick_subnet(self._owner)
        br = self.root_ifname
        run_tool(["ip", "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        self._made_links.append(br)
        # where br_netfilter is loaded (docker hosts), bridged frames go through the
        # iptables FORWARD chain, often DROP by default: keep this bridge out of it
        run_tool(["ip", "link", "set", br, "type", "bridge", "nf_call_iptables", "0"], check=False)
        run_tool(["ip", "addr", "add", f"{self.root_ip}/24", "dev", br])
        run_tool(["ip", "link", "set", br, "up"])
        names = [f"{self.root_ip} {self.prefix}-root"] + [f"{self.ip_of(h)} {self.ns_of(h)}" for h in self.hosts]
        for host in self.hosts:
            ns, inner, outer = self.ns_of(host), self.ifname_of(host), self.outer_ifname_of(host)
            run_tool(["ip", "netns", "add", ns])
            self._made_ns.append(ns)
            write_netns_etc(ns, names)
            run_tool(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns])
            self._made_links.append(outer)
            run_tool(["ip", "link", "set", outer, "master", br])
            run_tool(["ip", "link", "set", outer, "up"])
            run_tool(["ip", "-n", ns, "link", "set", "lo", "up"])
            run_tool(["ip", "-n", ns, "addr", "add", f"{self.ip_of(host)}/24", "dev", inner])
            run_tool(["ip", "-n", ns, "link", "set", inner, "up"])
            run_tool(["ip", "-n", ns, "route", "add", "default", "via", self.root_ip])
            self._shape(host, to_host=True)  # bridge -> namespace
            self._shape(host, to_host=False)  # namespace -> bridge

    def close(self) -> None:
        with critical():
            with self._close_lock:
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
                    kill_netns_pids(ns)
                for link in reversed(self._made_links):
                    run_tool(["ip", "link", "del", link], check=False)
                for ns in self._made_ns:
                    delete_netns(ns)
            finally:
                release_link(self, self.prefix)

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
    port = free_port(link.root_ip)
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
