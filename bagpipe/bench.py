"""`bagpipe bench`: one workload in several modes, side by side, in one invocation.

Repeats are interleaved (local, none, bagpipe, local, none, ...) so machine noise
hits every mode alike; warm-up iterations are dropped; each figure is the median
over repeats with its min and max. Optionally the servers (and trainers) run in
network namespaces behind a shaped link (bagpipe.netlink), so remote traffic costs
wall time as on a cluster.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bagpipe.config import CacheSize
from bagpipe.files import write_json_atomic

SWEEP_KEYS = ("lookahead", "cache_rows", "zipf", "trainers", "table_scale", "checkpoint_every")


@dataclass(frozen=True)
class Variant:
    """One configuration to measure."""

    mode: str
    trainers: int = 2
    servers: int = 1
    lookahead: int | None = None
    cache_rows: str | None = None  # CacheSize syntax: R, P% or unlimited
    data: str = ""
    label_extra: str = ""
    checkpoint_every: int | None = None  # None: only the final checkpoint (after the measured loop)

    @property
    def label(self) -> str:
        parts = [self.mode]
        if self.mode == "bagpipe":
            if self.lookahead is not None:
                parts.append(f"L={self.lookahead}")
            if self.cache_rows is not None:
                parts.append(f"R={self.cache_rows}")
        if self.label_extra:
            parts.append(self.label_extra)
        return " ".join(parts)

    def train_args(self) -> list[str]:
        args = ["--mode", self.mode, "--data", self.data]
        if self.checkpoint_every is not None:
            args += ["--checkpoint-every", str(self.checkpoint_every)]
        if self.mode == "local":
            args += ["--trainers", str(self.trainers), "--threads", str(self.trainers)]
        if self.mode == "bagpipe":
            if self.lookahead is not None:
                args += ["--lookahead", str(self.lookahead)]
            if self.cache_rows is not None:
                args += ["--cache-rows", str(self.cache_rows)]
        return args


@dataclass
class BenchConfig:
    out: str
    data: str | None = None
    rows: int = 200_000
    table_scale: float = 0.01
    zipf: float = 1.05
    trainers: int = 2
    servers: int = 1
    iters: int = 60
    warmup: int = 10
    repeats: int = 3
    modes: tuple[str, ...] = ("local", "none", "bagpipe")
    lookaheads: tuple[int, ...] = (32,)
    cache_rows: tuple[str | None, ...] = (None,)
    sweep: tuple[str, tuple[str, ...]] | None = None
    link_gbps: float | None = None
    link_topology: str = "servers"
    train_args: tuple[str, ...] = ()
    timeout_s: float = 900.0


def dataset_for(cfg: BenchConfig, zipf: float, table_scale: float) -> str:
    if cfg.data and zipf == cfg.zipf and table_scale == cfg.table_scale:
        return cfg.data
    path = os.path.join(cfg.out, "data", f"rows{cfg.rows}-zipf{zipf}-scale{table_scale}")
    if not os.path.isdir(path):
        from bagpipe.datasets.synthetic import generate_synthetic

        print(f"bench: generating {path}", file=sys.stderr, flush=True)
        generate_synthetic(path, cfg.rows, seed=0, zipf=zipf, table_scale=table_scale)
    return path


def build_variants(cfg: BenchConfig) -> list[Variant]:
    """The variants to run: the base modes, or the base modes along one sweep."""
    base_data = dataset_for(cfg, cfg.zipf, cfg.table_scale)
    base = Variant("local", cfg.trainers, cfg.servers, data=base_data)
    out: list[Variant] = []

    def modes_at(v: Variant, extra: str = "") -> list[Variant]:
        vs = []
        for mode in cfg.modes:
            if mode == "bagpipe":
                for la in cfg.lookaheads:
                    for r in cfg.cache_rows:
                        vs.append(replace(v, mode=mode, lookahead=la, cache_rows=r, label_extra=extra))
            else:
                vs.append(replace(v, mode=mode, label_extra=extra))
        return vs

    if cfg.sweep is None:
        return modes_at(base)
    key, values = cfg.sweep
    if key in ("lookahead", "cache_rows"):
        out += [replace(base, mode=m) for m in cfg.modes if m != "bagpipe"]
        for value in values:
            if key == "lookahead":
                out.append(replace(base, mode="bagpipe", lookahead=int(value), cache_rows=cfg.cache_rows[0]))
            else:
                out.append(replace(base, mode="bagpipe", lookahead=cfg.lookaheads[0], cache_rows=value))
        return out
    for value in values:
        if key == "trainers":
            out += modes_at(replace(base, trainers=int(value)), f"T={value}")
        elif key == "zipf":
            out += modes_at(replace(base, data=dataset_for(cfg, float(value), cfg.table_scale)), f"zipf={value}")
        elif key == "table_scale":
            out += modes_at(replace(base, data=dataset_for(cfg, cfg.zipf, float(value))), f"scale={value}")
        elif key == "checkpoint_every":
            every = None if value in ("none", "final") else int(value)
            out += modes_at(replace(base, checkpoint_every=every), f"ckpt={value}")
    return out


def run_variant(cfg: BenchConfig, v: Variant, run_dir: str) -> tuple[int, str]:
    """Run one job; returns (exit code, stderr tail)."""
    args = v.train_args() + ["--run-dir", run_dir, "--iters", str(cfg.iters)] + list(cfg.train_args)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if v.mode == "local":
        cmd = [sys.executable, "-m", "bagpipe.train", *args]
    elif cfg.link_gbps:
        from bagpipe.netlink import shaped_torchrun

        code = shaped_torchrun(v.trainers, v.servers, args, cfg.link_gbps, topology=cfg.link_topology,
                               timeout=cfg.timeout_s, env=env, log_dir=os.path.join(run_dir + ".logs"))
        return code, ""
    else:
        from bagpipe.launch import torchrun_command

        cmd = torchrun_command(v.trainers, v.servers, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.timeout_s)
    return proc.returncode, proc.stderr[-3000:]


PHASES = ("data", "plan", "wait", "compute", "exchange", "update")


def figures(run_dir: str, warmup: int, batch_size: int) -> dict[str, Any]:
    """Per-run figures from metrics.jsonl and summary.json, the first `warmup`
    iterations dropped. Throughput is wall clock: global batch x measured iterations
    over the loop's elapsed time across them (`elapsed` is what every mode's clock
    reports at the end of each iteration, the slowest trainer's in distributed runs),
    so it includes data reading, plan receive, waits and digests. The phase sum is
    shown beside it, never used for ratios."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        every = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    metrics = every[warmup:]
    if not metrics:
        raise ValueError(f"{run_dir}: no iterations left after {warmup} warm-up iterations")
    start = every[warmup - 1]["elapsed"] if warmup else 0.0
    wall = metrics[-1]["elapsed"] - start
    times = np.array([m["time_iter"] for m in metrics])
    phase_ms = {p: float(np.mean([m.get(f"time_{p}", 0.0) for m in metrics]) * 1e3) for p in PHASES}
    phase_sum_ms = sum(phase_ms.values())
    out: dict[str, Any] = {
        "samples_per_s": batch_size * len(metrics) / wall if wall > 0 else float("nan"),
        "wall_s": wall,
        "iter_ms_mean": wall / len(metrics) * 1e3,
        "iter_ms_p50": float(np.percentile(times, 50) * 1e3),
        "iter_ms_p99": float(np.percentile(times, 99) * 1e3),
        "phase_sum_ms": phase_sum_ms,
        "phase_samples_per_s": batch_size / (phase_sum_ms / 1e3) if phase_sum_ms else float("nan"),
    }
    out.update({f"{p}_ms": v for p, v in phase_ms.items()})
    spreads = [m["time_compute_spread"] for m in metrics if "time_compute_spread" in m]
    out["compute_spread_ms"] = float(np.mean(spreads)) * 1e3 if spreads else float("nan")  # local: no peers
    out["wait_share"] = out["wait_ms"] / out["iter_ms_mean"] if out["iter_ms_mean"] else 0.0
    for name in ("rows_read", "rows_fetched", "rows_written_back", "bytes_moved", "bytes_exchange", "bytes_plan",
                 "bytes_dense"):
        out[f"{name}_per_iter"] = float(np.mean([m.get(name, 0) for m in metrics]))
    if out["bytes_moved_per_iter"]:
        out["plan_over_server_bytes"] = out["bytes_plan_per_iter"] / out["bytes_moved_per_iter"]
    rss = summary.get("peak_rss_kb")
    if isinstance(rss, dict):
        out["rss_mb_trainer"] = max(rss.get("trainers") or [0]) / 1024
        out["rss_mb_server"] = max(rss.get("servers") or [0]) / 1024
        out["rss_mb_oracle"] = rss.get("oracle", 0) / 1024
    else:
        out["rss_mb_trainer"] = float(summary.get("peak_rss_kb", 0)) / 1024  # local: one process
    train_batches_per_s = out["samples_per_s"] / batch_size
    for key, ratio in (("plan_batches_per_s", "plan_over_train_rate"),
                       ("plan_batches_per_cpu_s", "plan_cpu_over_train_rate")):
        if summary.get(key):
            out[key] = summary[key]
            out[ratio] = summary[key] / train_batches_per_s
    out["digest"] = summary.get("digest")
    return out


@dataclass
class Result:
    variant: Variant
    runs: list[dict] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float, float]:
        vals = [r[key] for r in self.runs if isinstance(r.get(key), (int, float))]
        if not vals:
            return float("nan"), float("nan"), float("nan")
        return float(np.median(vals)), float(min(vals)), float(max(vals))


def run_bench(cfg: BenchConfig, batch_size: int) -> list[Result]:
    variants = build_variants(cfg)
    results = [Result(v) for v in variants]
    total = len(variants) * cfg.repeats
    done = 0
    for rep in range(cfg.repeats):
        for j, res in enumerate(results):
            v = res.variant
            run_dir = os.path.join(cfg.out, "runs", f"{j:02d}-{v.label.replace(' ', '_').replace('=', '')}", f"rep{rep}")
            start = time.monotonic()
            code, err = run_variant(cfg, v, run_dir)
            done += 1
            if code != 0:
                raise RuntimeError(f"bench: {v.label} (repeat {rep}) failed with exit code {code}:\n{err}")
            fig = figures(run_dir, cfg.warmup, batch_size)
            res.runs.append(fig)
            print(f"[{done}/{total}] {v.label}: {fig['samples_per_s']:,.0f} samples/s wall clock "
                  f"({fig['iter_ms_mean']:.1f} ms/iteration; phases sum to {fig['phase_sum_ms']:.1f} ms), "
                  f"wait {fig['wait_ms']:.1f} ms ({time.monotonic() - start:.0f} s)", flush=True)
    return results


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """One row per variant: medians with spread, and ratios to none/local at the same setting."""
    rows = []
    for res in results:
        row: dict[str, Any] = {"variant": res.variant.label, **{k: v for k, v in asdict(res.variant).items()
                                                               if k != "label_extra"}}
        keys = sorted({k for r in res.runs for k, v in r.items() if isinstance(v, (int, float))})
        for key in keys:
            med, lo, hi = res.stat(key)
            row[key] = med
            if key in ("samples_per_s", "iter_ms_mean"):
                row[f"{key}_min"], row[f"{key}_max"] = lo, hi
        row["digest"] = res.runs[0].get("digest") if res.runs else None
        rows.append(row)
    for row in rows:
        peers = [r for r in rows if r["trainers"] == row["trainers"] and r["data"] == row["data"]]
        for ref in ("none", "local"):
            base = next((r for r in peers if r["mode"] == ref), None)
            if base and base.get("samples_per_s"):
                row[f"speedup_over_{ref}"] = row["samples_per_s"] / base["samples_per_s"]
        none = next((r for r in peers if r["mode"] == "none"), None)
        if row["mode"] == "bagpipe" and none is not None:
            # same training, bit for bit: the benchmark checks the contract as it measures
            row["digest_matches_none"] = row["digest"] == none["digest"]
    return rows


def write_outputs(cfg: BenchConfig, rows: list[dict[str, Any]]) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    write_json_atomic(os.path.join(cfg.out, "bench.json"), {"config": asdict(cfg), "results": rows})
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = os.path.join(cfg.out, ".bench.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(cfg.out, "bench.csv"))
    try:
        plot(rows, os.path.join(cfg.out, "bench.png"), cfg)
    except ImportError:
        print("bench: matplotlib is not installed; skipped bench.png (pip install matplotlib)", file=sys.stderr)


def plot(rows: list[dict[str, Any]], path: str, cfg: BenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows)), 4.5))
    med = np.array([r["samples_per_s"] for r in rows])
    lo = med - np.array([r.get("samples_per_s_min", m) for r, m in zip(rows, med)])
    hi = np.array([r.get("samples_per_s_max", m) for r, m in zip(rows, med)]) - med
    ax1.bar(x, med, yerr=[lo, hi], capsize=4, color=["#888" if r["mode"] != "bagpipe" else "#2a7" for r in rows])
    ax1.set_xticks(x, labels, rotation=30, ha="right")
    ax1.set_ylabel("samples/s, wall clock (median, min-max)")
    link = f"{cfg.link_gbps} Gbit/s link ({cfg.link_topology})" if cfg.link_gbps else "loopback (unshaped)"
    ax1.set_title(f"Throughput, {link}")
    bottom = np.zeros(len(rows))
    for phase, color in (("data", "#999"), ("plan", "#b7b"), ("wait", "#d33"), ("compute", "#37c"),
                         ("exchange", "#e92"), ("update", "#7a5")):
        vals = np.array([r.get(f"{phase}_ms", 0.0) for r in rows])
        ax2.bar(x, vals, bottom=bottom, label=phase, color=color)
        bottom += vals
    ax2.set_xticks(x, labels, rotation=30, ha="right")
    ax2.set_ylabel("ms per iteration (mean)")
    ax2.set_title("Time split")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Wall-clock throughput and ratios first; the phase split (means per iteration)
    and traffic after. Ratios are of wall-clock samples/s measured in this run."""
    cols = [("variant", "{}", 22), ("samples_per_s", "{:,.0f}", 10), ("speedup_over_none", "{:.2f}x", 7),
            ("speedup_over_local", "{:.2f}x", 8), ("iter_ms_mean", "{:.1f}", 7), ("phase_sum_ms", "{:.1f}", 7),
            ("data_ms", "{:.1f}", 5), ("plan_ms", "{:.1f}", 5), ("wait_ms", "{:.1f}", 6), ("compute_ms", "{:.1f}", 7),
            ("compute_spread_ms", "{:.1f}", 6), ("exchange_ms", "{:.1f}", 8), ("update_ms", "{:.1f}", 6),
            ("rows_fetched_per_iter", "{:,.0f}", 8),
            ("rows_written_back_per_iter", "{:,.0f}", 8), ("bytes_moved_per_iter", "{:,.0f}", 11),
            ("bytes_plan_per_iter", "{:,.0f}", 9), ("plan_over_server_bytes", "{:.1%}", 7),
            ("bytes_exchange_per_iter", "{:,.0f}", 10), ("rss_mb_trainer", "{:.0f}", 6)]
    heads = ["variant", "samples/s", "vs none", "vs local", "ms/it", "phases", "data", "plan", "wait", "compute",
             "spread", "exchange", "update", "fetched", "wrtback", "server B/it", "plan B/it", "plan/srv", "xchg B/it",
             "RSS MB"]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, (_, _, w)) in enumerate(zip(heads, cols))))
    for row in rows:
        cells = []
        for i, (key, fmt, width) in enumerate(cols):
            val = row.get(key)
            text = "-" if val is None or (isinstance(val, float) and np.isnan(val)) else fmt.format(val)
            cells.append(text.ljust(width) if i == 0 else text.rjust(width))
        print("  ".join(cells))
    print("samples/s: wall clock of the training loop (global batch x iterations / elapsed, warm-up dropped); "
          "ms/it: its mean per iteration; phases: the mean phase sum, for the split only; ratios use wall clock; "
          "spread: the slowest minus the fastest trainer's compute, lateness the others wait out in exchange")


def add_arguments(p) -> None:
    p.add_argument("--out", default="bench-out", help="output directory (bench.csv, bench.json, bench.png, runs/)")
    p.add_argument("--data", default=None, help="dataset (default: generate one from --rows/--table-scale/--zipf)")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--table-scale", type=float, default=0.01)
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--trainers", type=int, default=2)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="iterations dropped from every run's figures")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="local,none,bagpipe")
    p.add_argument("--lookahead", default="32", help="comma list of bagpipe lookaheads")
    p.add_argument("--cache-rows", default="unlimited",
                   help="comma list of capacities, each R (rows per trainer), P%% (of all rows) or 'unlimited'")
    p.add_argument("--sweep", default=None, help=f"KEY=V1,V2,... with KEY in {', '.join(SWEEP_KEYS)}")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="run servers (and with per-process, trainers) behind a shaped link of this rate")
    from bagpipe.netlink import TOPOLOGIES

    p.add_argument("--link-topology", choices=TOPOLOGIES, default="servers")
    p.add_argument("train_args", nargs="*", help="after --: extra `bagpipe train` arguments for every run")


def _capacities(text: str) -> tuple[str | None, ...]:
    """Validated CacheSize specs (None: unlimited), passed through to training as given."""
    out = []
    for value in text.split(","):
        size = CacheSize.parse(value)
        out.append(None if size.unlimited else str(size))
    return tuple(out)


def main_from_args(args) -> int:
    sweep = None
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if key not in SWEEP_KEYS or not values:
            print(f"error: --sweep takes KEY=V1,V2 with KEY in {', '.join(SWEEP_KEYS)}, got {args.sweep!r}",
                  file=sys.stderr)
            return 2
        sweep = (key, tuple(values.split(",")))
    if args.link_gbps:
        from bagpipe.netlink import link_support

        ok, reason = link_support()
        if not ok:
            print(f"bench: cannot shape a link here ({reason}); running unshaped", file=sys.stderr)
            args.link_gbps = None
    extra = [a for a in args.train_args if a != "--"]
    try:
        capacities = _capacities(args.cache_rows)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = BenchConfig(
        out=args.out, data=args.data, rows=args.rows, table_scale=args.table_scale, zipf=args.zipf,
        trainers=args.trainers, servers=args.servers, iters=args.iters, warmup=args.warmup,
        repeats=args.repeats, modes=tuple(args.modes.split(",")),
        lookaheads=tuple(int(v) for v in args.lookahead.split(",")), cache_rows=capacities,
        sweep=sweep, link_gbps=args.link_gbps, link_topology=args.link_topology,
        train_args=tuple(["--batch-size", str(args.batch_size), *extra]),
    )
    if cfg.warmup >= cfg.iters:
        print(f"error: --warmup {cfg.warmup} leaves no measured iterations of --iters {cfg.iters}", file=sys.stderr)
        return 2
    try:
        results = run_bench(cfg, args.batch_size)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = summarize(results)
    write_outputs(cfg, rows)
    print_table(rows)
    mismatched = [r["variant"] for r in rows if r.get("digest_matches_none") is False]
    if mismatched:
        print(f"bench: WARNING: digests differ from `none` for {', '.join(mismatched)}", file=sys.stderr)
    print(f"bench: wrote {cfg.out}/bench.csv, bench.json, bench.png")
    return 0
