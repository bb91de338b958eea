"""The emulated cluster link (bagpipe/netlink/): namespaces + veth + tbf, a shaped
multi-node torchrun job, and cleanup on success, failure, signals and kill -9.
Needs root, `ip` and `tc`; skipped with the reason otherwise."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bagpipe import netlink
from bagpipe.netlink.namespaces import NETNS_ETC, link_names, netns_list, owner_pid, pid_dead
from conftest import compare, run_torchrun, train_args

SUPPORTED, WHY = netlink.link_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason=f"emulated links unavailable: {WHY}")


def _netns() -> list[str]:
    return netns_list()


def _links() -> list[str]:
    return link_names()


def _ours(names: list[str], pid: int) -> list[str]:
    """Names created by links of process `pid` (prefix bp<pid>, bp<pid>n<k>)."""
    return [n for n in names if owner_pid(n) == pid]


def _procs_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and not pid_dead(int(entry)):
            pids.append(int(entry))
    return pids


def _assert_clean(pid: int) -> None:
    assert _ours(_netns(), pid) == [], _netns()
    assert _ours(_links(), pid) == [], _links()
    leftover = os.listdir(NETNS_ETC) if os.path.isdir(NETNS_ETC) else []
    assert _ours(leftover, pid) == [], leftover


def test_link_up_and_down():
    with netlink.ShapedLink(0.5, ["a", "b"]) as link:
        assert link.prefix == f"bp{os.getpid()}"
        assert set(_ours(_netns(), os.getpid())) == {link.ns_of("a"), link.ns_of("b")}
        assert link.root_ifname in _links()
        assert link.root_ip.startswith("10.") and link.root_ip.endswith(".1")
        assert link.ip_of("a") != link.ip_of("b")
        for host in ("a", "b"):
            for to_host in (True, False):
                q = link.qdisc(host, to_host)
                assert q["kind"] == "tbf"
                assert q["options"]["rate"] == 0.5e9 / 8  # tc's JSON gives bytes/s
            shown = subprocess.run(link.wrap(host, ["ip", "-4", "-o", "addr", "show", "dev", link.ifname_of(host)]),
                                   capture_output=True, text=True, check=True).stdout
            assert f"{link.ip_of(host)}/24" in shown
        # a namespace reaches the root namespace at root_ip and another namespace at its ip
        assert netlink.measure_gbps(link, "a", megabytes=2, to_host=False) > 0
        stats = link.stats()
        assert stats["a"]["from_host_bytes"] > 2 * 2**20 > stats["b"]["from_host_bytes"]
        link.close()
        link.close()  # idempotent
        _assert_clean(os.getpid())
    _assert_clean(os.getpid())


@pytest.mark.distributed
def test_shaped_job_matches_unshaped(tiny_data, tmp_path):
    common = ["--mode", "bagpipe", "--timeout", "30"]
    logs = tmp_path / "logs"
    rc = netlink.shaped_torchrun(2, 1, common + train_args(tiny_data, str(tmp_path / "shaped")), gbps=0.5,
                                 topology="servers", timeout=120, log_dir=str(logs))
    assert rc == 0, (logs / "servers.log").read_text()[-3000:]
    run_torchrun(tiny_data, str(tmp_path / "plain"), "bagpipe", 2, 1)
    same, message = compare(str(tmp_path / "plain"), str(tmp_path / "shaped"))
    assert same, message
    report = json.loads((logs / "link.json").read_text())
    # the trainers' rows really crossed the shaped veth, both ways
    assert report["links"]["servers"]["to_host_bytes"] > 10_000
    assert report["links"]["servers"]["from_host_bytes"] > 10_000
    assert report["nodes"]["servers"]["netns"] and report["nodes"]["trainers"]["netns"] is None
    _assert_clean(os.getpid())
    assert _procs_mentioning(str(tmp_path)) == []


@pytest.mark.distributed
def test_killed_server_fails_the_job_and_leaves_nothing(tiny_data, tmp_path, capfd):
    run_dir = str(tmp_path / "run")
    start = time.monotonic()
    rc = netlink.shaped_torchrun(1, 1, ["--mode", "none", "--timeout", "30", *train_args(tiny_data, run_dir, iters=20)],
                                 gbps=1.0, topology="per-process", timeout=90, log_dir=str(tmp_path / "logs"),
                                 env={"BAGPIPE_FAULTS": "kill:server0@3"})
    assert rc not in (0, 124), rc
    assert time.monotonic() - start < 80
    err = capfd.readouterr().err
    assert "shaped_torchrun: node" in err and "server 0 (rank" in err, err[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    _assert_clean(os.getpid())
    assert _procs_mentioning(str(tmp_path)) == []


_BENCH = """
import os, subprocess, sys, time
from bagpipe.netlink import ShapedLink
link = ShapedLink(1.0, ["x", "y"], prefix=sys.argv[1].format(pid=os.getpid()))
sleeper = subprocess.Popen(link.wrap("x", ["sleep", "300"]))
print(link.prefix, sleeper.pid, flush=True)
time.sleep(300)
"""


def _start_bench(prefix: str):
    child = subprocess.Popen([sys.executable, "-c", _BENCH, prefix], stdout=subprocess.PIPE, text=True)
    made, sleeper = child.stdout.readline().split()
    assert made == prefix.format(pid=child.pid)
    assert len(_ours(_netns(), child.pid)) == 2
    return child, int(sleeper)


def test_sigkilled_bench_is_cleaned_by_cleanup_stale():
    # the prefix keeps a concurrent bench's default sweep (bp*) off this test's leftovers
    with netlink.ShapedLink(1.0, ["live"], prefix=f"nlt{os.getpid()}") as mine:  # live: must survive
        child, sleeper = _start_bench("nlt{pid}")
        child.kill()
        child.wait()
        assert len(_ours(_netns(), child.pid)) == 2  # kill -9: nothing could clean up
        assert not pid_dead(sleeper)
        removed = netlink.cleanup_stale("nlt*")
        assert any(r.startswith("netns ") for r in removed), removed
        _assert_clean(child.pid)
        assert pid_dead(sleeper)
        assert mine.ns_of("live") in _netns() and mine.root_ifname in _links()
    _assert_clean(os.getpid())


def test_sigterm_cleans_up_and_exits_143():
    child, sleeper = _start_bench("bp{pid}")
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    _assert_clean(child.pid)
    assert pid_dead(sleeper)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="--node-roles"):
        netlink.shaped_torchrun(1, 1, ["--node-roles", "trainer=1"], gbps=1.0)
    with pytest.raises(ValueError, match="topology"):
        netlink.shaped_torchrun(1, 1, [], gbps=1.0, topology="mesh")
    with pytest.raises(ValueError):
        netlink.ShapedLink(1.0, ["a", "a"])
    _assert_clean(os.getpid())
