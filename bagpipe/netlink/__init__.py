"""An emulated cluster link on one machine: network namespaces, veth pairs, tbf.

On one machine every "remote" embedding fetch is a loopback memory copy, which hides
what Bagpipe is for (DESIGN.md section 7). This subpackage puts named "hosts" in
network namespaces behind tbf-shaped veths (`ShapedLink`) and runs one Bagpipe job as
a multi-node torchrun world across them (`shaped_torchrun`), so trainer <-> server
traffic crosses a real, rate-limited link.

It is apart from the core because nothing in training needs it: only benchmarks
(`bagpipe bench --link-gbps`, which imports it lazily) and its tests do, and it needs
what the core does not: Linux, root, and `ip`/`tc` (iproute2); `link_support()` says
whether it works here. `python -m bagpipe.netlink check|measure --gbps G|cleanup`
from a shell.

Modules, each depending only on those before it:
- `namespaces`: names, subnets, /etc/netns, the support probe, teardown on exit and
  on signals, `cleanup_stale` for what a killed bench left;
- `shaping`: tbf sizing (`tbf_params`), `ShapedLink`, `measure_gbps`;
- `cluster`: `plan_nodes` and `shaped_torchrun`, the multi-node job supervisor.
"""

from bagpipe.netlink.namespaces import LinkError, cleanup_stale, link_support
from bagpipe.netlink.shaping import ShapedLink, measure_gbps, tbf_params
from bagpipe.netlink.cluster import TOPOLOGIES, plan_nodes, shaped_torchrun

__all__ = ["LinkError", "ShapedLink", "TOPOLOGIES", "cleanup_stale", "link_support",
           "measure_gbps", "plan_nodes", "shaped_torchrun", "tbf_params"]
