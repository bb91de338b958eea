"""`bagpipe simulate`: plan a dataset with the LRPP oracle without training.

Hook into the main CLI with ``from bagpipe.oracle.cli import register; register(sub)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="plan a dataset with the LRPP cache oracle (no training): hit rate, traffic, occupancy",
        description="Run the oracle's planner over a dataset's training parts and report the hit rate, rows "
                    "fetched / written back / exchanged per iteration against the no-cache baseline, cache "
                    "occupancy, capacity events and planning throughput.",
    )
    p.add_argument("--data", required=True, help="dataset directory (Parquet parts; the last part is held out)")
    p.add_argument("--batch-size", type=int, required=True, help="global batch size B")
    p.add_argument("--trainers", type=_int_list, default=(1,),
                   help="trainer count T, or a list (e.g. 1,2,4,8) for a scaling study")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--lookahead", type=int, default=32, help="reuse horizon L (as `bagpipe train`)")
    p.add_argument("--cache-rows", default="unlimited",
                   help="R owned rows per trainer, P%% of all rows (the trainers' caches together), or 'unlimited'")
    p.add_argument("--prefetch-distance", type=int, default=None, help="D (default min(2, L))")
    p.add_argument("--evict-ahead", type=int, default=1,
                   help="capacity evictions make room for rows used up to this many iterations after the "
                        "next stage (1: fewest fetches; 2: keep fetches two iterations ahead)")
    p.add_argument("--iters", type=int, default=None, help="plan at most this many global batches")
    p.add_argument("--sweep", action="store_true",
                   help="grid over lookahead (1..64) x cache capacity (1%%..20%% of rows, and unlimited)")
    p.add_argument("--out", default=None, help="directory for summary.json, sweep.csv/png, scaling.csv/png")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .lrpp import PlanError, PlannerConfig
    from bagpipe.config import CacheSize, ConfigError

    from .simulate import (SWEEP_COLUMNS, format_summary, load_keys, plot_scaling, plot_sweep, run_plans,
                           scaling_study, sweep, write_csv)

    if args.batch_size < 1:
        print("simulate: --batch-size must be positive", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    batches, total_rows, cards = load_keys(args.data, args.batch_size, args.iters)
    load_s = time.perf_counter() - t0
    if not batches:
        print(f"simulate: {args.data} has no full batch of {args.batch_size} rows in its training parts",
              file=sys.stderr)
        return 2
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    result: dict = {"data": args.data, "batch_size": args.batch_size, "iterations": len(batches),
                    "tables": len(cards), "total_rows": total_rows, "load_seconds": round(load_s, 3)}
    text: list[str] = [f"{args.data}: {len(batches)} global batches of {args.batch_size}, {len(cards)} tables, "
                       f"{total_rows} rows (read in {load_s:.1f} s)"]
    T0 = args.trainers[0]
    try:
        if args.sweep:
            rows = sweep(batches, total_rows, T0, args.servers, args.prefetch_distance)
            result["sweep"] = rows
            text.append(_sweep_table(rows))
            if args.out:
                write_csv(os.path.join(args.out, "sweep.csv"), rows, SWEEP_COLUMNS)
                text.append(f"wrote {os.path.join(args.out, 'sweep.csv')}")
                _try_plot(plot_sweep, rows, os.path.join(args.out, "sweep.png"), text)
        elif len(args.trainers) > 1:
            rows = scaling_study(args.trainers, batches, total_rows, args.servers, args.lookahead,
                                 args.prefetch_distance, args.cache_rows)
            result["scaling"] = rows
            text.append(_scaling_table(rows))
            if args.out:
                write_csv(os.path.join(args.out, "scaling.csv"), rows)
                text.append(f"wrote {os.path.join(args.out, 'scaling.csv')}")
                _try_plot(plot_scaling, rows, os.path.join(args.out, "scaling.png"), text)
        else:
            cfg = PlannerConfig(T0, args.servers, args.lookahead, args.prefetch_distance,
                                CacheSize.parse(args.cache_rows).rows_per_trainer(total_rows, T0), total_rows,
                                evict_ahead=args.evict_ahead)
            s = run_plans(cfg, batches)
            result["summary"] = s.as_dict()
            text.append(format_summary(s))
    except (PlanError, ConfigError, ValueError) as err:
        print(f"simulate: {err}", file=sys.stderr)
        return 1
    if args.out:
        with open(os.path.join(args.out, "simulate.json"), "w") as f:
            json.dump(_jsonable(result), f, indent=1)
    if args.json:
        print(json.dumps(_jsonable(result), indent=1))
    else:
        print("\n".join(text))
    return 0


def _try_plot(fn, rows, path, text) -> None:
    try:
        fn(rows, path)
        text.append(f"wrote {path}")
    except RuntimeError as err:
        text.append(f"no plot: {err}")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    return x


def _sweep_table(rows: list[dict]) -> str:
    out = ["  L  D  cache        hit rate  fetched/iter  (none)   reduction  peak occ  cap.evict  batches/s"]
    for r in rows:
        cap = "unlimited" if r["cache_fraction"] == "" else f"{float(r['cache_fraction']):>4.0%} {r['cache_rows']}"
        if r["status"] != "ok":
            out.append(f"{r['lookahead']:>3} {str(r.get('prefetch_distance', '')):>2}  {cap:<12} {r['status']}")
            continue
        out.append(f"{r['lookahead']:>3} {r['prefetch_distance']:>2}  {cap:<12} {r['hit_rate']:>7.1%}  "
                   f"{r['fetched_per_iter']:>12.1f}  {r['none_fetched_per_iter']:>7.1f}  "
                   f"{r['fetch_reduction']:>8.2f}x  {r['peak_occupancy']:>8}  {r['capacity_evictions']:>9}  "
                   f"{r['batches_per_s']:>9.0f}")
    return "\n".join(out)


def _scaling_table(rows: list[dict]) -> str:
    out = ["per trainer per iteration (rows):",
           f"{'T':>4}  {'cache/trainer':>13}  {'hit rate':>8}  {'fetched':>9}  {'none':>9}  {'written back':>12}  "
           f"{'exchanged':>9}  {'occupancy peak / mean':>21}"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"{r['trainers']:>4}  {r.get('status')}")
            continue
        cap = "unlimited" if r["cache_rows"] is None else str(r["cache_rows"])
        occ = f"{r['peak_occupancy']} / {r['mean_occupancy']:.0f}"
        out.append(f"{r['trainers']:>4}  {cap:>13}  {r['hit_rate']:>8.1%}  {r['fetched_per_trainer_iter']:>9.1f}  "
                   f"{r['none_fetched_per_trainer_iter']:>9.1f}  {r['written_back_per_trainer_iter']:>12.1f}  "
                   f"{r['exchange_per_trainer_iter']:>9.1f}  {occ:>21}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
