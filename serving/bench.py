"""`bagpipe infer-bench`: every placement and shard count side by side, under the same load.

Per spec, every configuration (``local``; ``single``; ``capacity``, ``load``, ``coaccess``
at each K) runs as its own `bagpipe serve` process tree, all started up front. Per QPS
the requests are sent in rounds: each round draws the next slice of requests and sends
that same slice, at the same Poisson arrival times, to every configuration in turn
(rotated order), so slow drifts of a shared machine fall on all of them alike. Logits
are compared bit for bit with ``local``'s for the same request. CPU seconds are the
serving processes' own (main shard + shards), read before and after each slice.

Writes ``infer.csv``, ``infer.json`` (one row per spec x placement x K x QPS) and
``infer.png`` (P99 and CPU overhead per placement and K, at the lowest QPS).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from bagpipe.config import ConfigError

from .loadgen import SPLIT, Counters, ScoringClient, run_open_loop, summarize
from .placement import ShardPlacement, Strategy, imbalance
from .requests import ItemCount, SpecRequests
from .rpc import Security
from .spec import DEFAULT_TABLE_SCALE, load_spec
from .supervisor import Child, child_env, launch, stop_process, wait_ready

COLUMNS = ["spec", "placement", "shards", "qps", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
           "mean_ms", "throughput_rps", "p50_overhead_pct", "p99_overhead_pct", "cpu_ms_per_request",
           "cpu_overhead", "shards_per_request", "fanout_bytes_per_request", "request_bytes", *SPLIT,
           "shard_load_imbalance", "bytes_imbalance", "shard_mb", "split_tables", "scores_match_local",
           "max_qps_at_slo", "slo_ms"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default="drm1", help="comma-separated specs (shipped names or files)")
    p.add_argument("--table-scale", type=float, default=DEFAULT_TABLE_SCALE)
    p.add_argument("--shards", default="2,4", help="comma-separated K for capacity, load and coaccess")
    p.add_argument("--placement", default="local,single,capacity,load,coaccess")
    p.add_argument("--qps", default="20,100", help="comma-separated open-loop rates")
    p.add_argument("--requests", type=int, default=200, help="measured requests per configuration and QPS")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the requests are split into")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured requests per configuration first")
    p.add_argument("--items", default="32", help="candidate items per request (as loadgen)")
    p.add_argument("--slo-ms", type=float, default=50.0, help="P99 target for max_qps_at_slo")
    p.add_argument("--capacity-slack", type=float, default=1.25)
    p.add_argument("--deadline-ms", type=float, default=2000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", required=True, help="directory for infer.csv, infer.json, infer.png")


@dataclass(frozen=True)
class Config:
    placement: Strategy
    shards: int  # 0: local (no sparse shard), 1: single

    @property
    def label(self) -> str:
        return self.placement.value if self.shards <= 1 else f"{self.placement.value} K={self.shards}"


def configurations(placements: list[Strategy], shard_counts: list[int]) -> list[Config]:
    out = []
    for p in placements:
        if p is Strategy.LOCAL:
            out.append(Config(p, 0))
        elif p is Strategy.SINGLE:
            out.append(Config(p, 1))
        else:
            out += [Config(p, k) for k in shard_counts]
    return out


def _list(text: str, parse, what: str) -> list:
    try:
        values = [parse(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: cannot read {text!r}") from None
    if not values:
        raise ConfigError(f"{what}: empty")
    return values


class ServedConfig:
    """One configuration's `bagpipe serve` process (its shards are its children)."""

    def __init__(self, config: Config, child: Child) -> None:
        self.config, self.child = config, child
        self.client = ScoringClient(f"127.0.0.1:{child.port}", Security())
        self.info = self.client.info()
        self.placement = ShardPlacement.from_dict(self.info["placement"])

    def stop(self) -> None:
        self.client.close()
        stop_process(self.child.proc, grace_s=10.0)


def start_all(spec: str, configs: list[Config], args: argparse.Namespace) -> list[ServedConfig]:
    procs = []
    env = child_env()
    try:
        for c in configs:
            cmd = [sys.executable, "-m", "bagpipe.cli", "serve", "--spec", spec, "--table-scale", str(args.table_scale),
                   "--placement", c.placement.value, "--shards", str(max(1, c.shards)), "--items", args.items,
                   "--seed", str(args.seed), "--capacity-slack", str(args.capacity_slack),
                   "--deadline-ms", str(args.deadline_ms), "--start-timeout", str(args.start_timeout), "--port", "0"]
            procs.append((c, launch(cmd, env)))
        return [ServedConfig(c, wait_ready(p, args.start_timeout, f"serve {spec} {c.label}")) for c, p in procs]
    except BaseException:
        for _, p in procs:
            stop_process(p)
        raise


def run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    specs = _list(args.spec, str, "--spec")
    shard_counts = _list(args.shards, int, "--shards")
    placements = _list(args.placement, Strategy.parse, "--placement")
    rates = _list(args.qps, float, "--qps")
    items = ItemCount.parse(args.items)
    if args.requests < args.rounds or args.rounds < 1:
        raise ConfigError(f"--requests ({args.requests}) must be >= --rounds ({args.rounds}) >= 1")
    configs = configurations(placements, shard_counts)
    os.makedirs(args.out, exist_ok=True)
    per_round = math.ceil(args.requests / args.rounds)
    rows: list[dict] = []
    bar = tqdm(total=len(specs) * len(rates) * args.rounds * len(configs), desc="infer-bench", unit="slice")
    for spec_name in specs:
        spec = load_spec(spec_name, args.table_scale)
        requests = SpecRequests(spec, items, args.seed)
        bar.set_postfix_str(f"starting {spec.name}")
        served = start_all(spec_name, configs, args)
        try:
            warm = [r.to_arrow() for r in requests.take(1 << 31, args.warmup)]
            for s in served:
                run_open_loop(s.client, warm, 50.0, timeout_s=args.deadline_ms / 1e3 + 5)
            for qps in rates:
                bar.set_postfix_str(f"{spec.name} at {qps:g} QPS")
                outcomes = {c: [] for c in configs}
                counters = {c: Counters() for c in configs}
                elapsed = {c: 0.0 for c in configs}
                for r in range(args.rounds):
                    first = r * per_round
                    batches = [q.to_arrow() for q in requests.take(first, min(per_round, args.requests - first))]
                    for s in served[r % len(served):] + served[:r % len(served)]:
                        before = s.client.stats()
                        got, took = run_open_loop(s.client, batches, qps, seed=args.seed, keep_logits=True,
                                                  first_index=first, timeout_s=args.deadline_ms / 1e3 + 5)
                        counters[s.config] = counters[s.config] + Counters.between(before, s.client.stats())
                        outcomes[s.config] += got
                        elapsed[s.config] += took
                        bar.update(1)
                local = next((c for c in configs if c.placement is Strategy.LOCAL), None)
                for s in served:
                    c = s.config
                    row = {"spec": spec.name, "placement": c.placement.value, "shards": c.shards,
                           **summarize(outcomes[c], elapsed[c], qps, counters[c], args.slo_ms)}
                    shard_bytes = s.placement.shard_bytes() if s.placement.remote else np.zeros(0)
                    row.update(bytes_imbalance=imbalance(shard_bytes) if shard_bytes.size else 1.0,
                               shard_mb=[round(b / 1e6, 2) for b in shard_bytes],
                               split_tables=s.placement.split_tables if s.placement.remote else [],
                               scores_match_local=_same_logits(outcomes[c], outcomes[local]) if local else None)
                    rows.append(row)
        finally:
            for s in served:
                s.stop()
    bar.close()
    _derive(rows)
    write_outputs(rows, args.out)
    print(format_table(rows))
    print(f"wrote {os.path.join(args.out, 'infer.csv')}, infer.json, infer.png")
    return 0 if all(r["scores_match_local"] is not False for r in rows) else 1


def _same_logits(mine: list, local: list) -> bool | None:
    """Bit-equal logits for every request both answered (None: nothing to compare)."""
    reference = {o.index: o.logits for o in local if o.error is None}
    pairs = [(o.logits, reference[o.index]) for o in mine if o.error is None and o.index in reference]
    if not pairs:
        return None
    return all(a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in pairs)


def _derive(rows: list[dict]) -> None:
    """Overheads against local at the same spec and QPS; the highest QPS that held the P99 target."""
    local = {(r["spec"], r["qps"]): r for r in rows if r["placement"] == Strategy.LOCAL.value}
    for r in rows:
        base = local.get((r["spec"], r["qps"]))
        pct = (lambda key: 100.0 * (r[key] / base[key] - 1.0) if base and base[key] > 0 else float("nan"))
        r["p50_overhead_pct"], r["p99_overhead_pct"] = pct("p50_ms"), pct("p99_ms")
        r["cpu_overhead"] = r["cpu_ms_per_request"] / base["cpu_ms_per_request"] if base else float("nan")
    for r in rows:
        same = [x for x in rows if (x["spec"], x["placement"], x["shards"]) == (r["spec"], r["placement"], r["shards"])]
        held = [x["qps"] for x in same if x.get("slo_met")]
        r["max_qps_at_slo"] = max(held) if held else None


def write_outputs(rows: list[dict], out: str) -> None:
    def atomic(name: str, write) -> None:
        path = os.path.join(out, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)

    def csv_value(v):
        if isinstance(v, list):
            return ";".join(str(x) for x in v)
        return f"{v:.4f}" if isinstance(v, float) else v

    def write_csv(f) -> None:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([csv_value(r.get(k)) for k in COLUMNS])

    atomic("infer.csv", write_csv)
    atomic("infer.json", lambda f: json.dump(rows, f, indent=1, default=float))
    plot(rows, os.path.join(out, "infer.png"))


def plot(rows: list[dict], path: str) -> None:
    """Per spec: P99 (bars) and P50 (dots) per configuration; CPU per request relative to local."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["spec"] for r in rows))
    low = min(r["qps"] for r in rows)
    fig, axes = plt.subplots(len(specs), 2, figsize=(12, 3.2 * len(specs)), squeeze=False)
    for i, spec in enumerate(specs):
        mine = [r for r in rows if r["spec"] == spec and r["qps"] == low]
        labels = [r["placement"] if r["shards"] <= 1 else f"{r['placement']}\nK={r['shards']}" for r in mine]
        x = np.arange(len(mine))
        colors = [f"C{list(Strategy).index(Strategy(r['placement']))}" for r in mine]
        ax = axes[i][0]
        ax.bar(x, [r["p99_ms"] for r in mine], color=colors)
        ax.plot(x, [r["p50_ms"] for r in mine], "k.", label="P50")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("latency ms")
        ax.set_title(f"{spec}: P99 (bars), P50 (dots) at {low:g} QPS", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[i][1]
        ax.bar(x, [r["cpu_overhead"] for r in mine], color=colors)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("CPU / request vs local")
        ax.set_title(f"{spec}: CPU seconds per request, all processes, relative to local", fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def format_table(rows: list[dict]) -> str:
    head = (f"{'spec':6} {'placement':9} {'K':>2} {'QPS':>5} {'P50 ms':>7} {'P99 ms':>7} {'P99 +%':>7} "
            f"{'CPU ms':>7} {'CPU x':>6} {'shards/req':>10} {'kB/req':>7} {'imbal':>6} {'errors':>6} match")
    lines = [head]
    for r in rows:
        lines.append(f"{r['spec']:6} {r['placement']:9} {r['shards']:>2} {r['qps']:>5g} {r['p50_ms']:>7.2f} "
                     f"{r['p99_ms']:>7.2f} {r['p99_overhead_pct']:>7.1f} {r['cpu_ms_per_request']:>7.2f} "
                     f"{r['cpu_overhead']:>6.2f} {r['shards_per_request']:>10.2f} "
                     f"{r['fanout_bytes_per_request'] / 1e3:>7.1f} {r['shard_load_imbalance']:>6.2f} "
                     f"{r['errors']:>6} {r['scores_match_local']}")
    return "\n".join(lines)
