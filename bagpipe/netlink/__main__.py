"""`python -m bagpipe.netlink check|measure --gbps G|cleanup`: can links be made here,
what goodput does one shaped to G Gbit/s give, and removal of a killed bench's links."""

from __future__ import annotations

import argparse
import sys

import bagpipe.netlink
from bagpipe.netlink.namespaces import cleanup_stale, link_support
from bagpipe.netlink.shaping import ShapedLink, measure_gbps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bagpipe.netlink",
                                description=bagpipe.netlink.__doc__.split("\n\n")[0])
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
