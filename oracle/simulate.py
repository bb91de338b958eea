"""Plan without training: what the LRPP cache would fetch, keep and exchange.

`run_plans(cfg, batches)` drives `plan_lrpp` over in-memory key batches and sums
the per-iteration plan stats into a summary (`Summary.as_dict()`):

- hit rate: the share of row reads (sum over trainers of |reads[k][i]|, what the
  `none` baseline fetches) served without a server fetch, 1 - fetched / reads;
- rows fetched and written back per iteration against `none` (which fetches
  every read and pushes a gradient for every read);
- peak and mean owned-row occupancy per trainer (over stages 0 .. N-1);
- exchange volume per iteration: rows sent owner -> readers (values), which is
  also the number of gradient contributions readers -> owners;
- capacity events: capacity evictions, postponed fetches, fetches landing only one
  iteration ahead of their use;
- planning throughput (global batches/s, keys/s; wall and CPU time).

`scaling_study` repeats that over trainer counts, `sweep` over a grid of
lookahead x cache capacity; both can plot with matplotlib (imported lazily).
Data loading uses the dataset reader; nothing here touches processes.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from bagpipe.datasets.zipf import ZipfSampler

from bagpipe.config import CacheSize

from .lrpp import PlanError, PlannerConfig, plan_lrpp

SWEEP_LOOKAHEADS = (1, 2, 4, 8, 16, 32, 64)
SWEEP_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20)


def zipf_key_batches(cardinalities: Sequence[int], batch_size: int, iterations: int, exponent: float = 1.05,
                     seed: int = 0) -> list[np.ndarray]:
    """Synthetic global batches of row keys ([B, tables] int64) for tests and
    benchmarks: per table a bounded Zipf(exponent) over ranks 1..n (the generator's
    `ZipfSampler`), ranks mapped to ids by a fixed random permutation; keys = table
    offset + id."""
    rng = np.random.default_rng(seed)
    cards = [int(c) for c in cardinalities]
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)
    samplers = [ZipfSampler(n, exponent) for n in cards]
    perms = [rng.permutation(n).astype(np.int64) for n in cards]
    out = []
    for _ in range(iterations):
        cols = [perms[t][samplers[t].ranks(rng.random(batch_size))] + offsets[t] for t in range(len(cards))]
        out.append(np.stack(cols, axis=1))
    return out


def load_keys(data: str, batch_size: int, iters: int | None) -> tuple[list[np.ndarray], int, list[int]]:
    """Global batches of row keys ([B, tables] int64) of a dataset's training parts
    (all parts but the last when there are >= 2), plus total rows and cardinalities."""
    from bagpipe.datasets.format import list_parts, read_meta
    from bagpipe.datasets.reader import BatchReader
    from bagpipe.embedding import planner_keys
    from bagpipe.rows import RowSpace

    meta = read_meta(data)
    parts = list_parts(data)
    if len(parts) >= 2:
        parts = parts[:-1]
    space = RowSpace(tuple(int(c) for c in meta.cardinalities), 1, 0, tuple(meta.feature_tables))
    reader = BatchReader(parts, batch_size, columns="sparse", max_batches=iters)
    keys = [planner_keys(b, space) for b in reader]
    return keys, space.total_rows, list(meta.cardinalities)


@dataclass
class Summary:
    trainers: int
    servers: int
    lookahead: int
    prefetch_distance: int
    cache_rows: int | None
    total_rows: int
    iterations: int = 0
    keys_per_batch: int = 0
    reads: int = 0
    fetched: int = 0
    written_back: int = 0
    exchange_rows: int = 0
    capacity_evictions: int = 0
    postponed: int = 0
    fetched_one_ahead: int = 0
    peak_occupancy: list[int] = field(default_factory=list)
    mean_occupancy: list[float] = field(default_factory=list)
    fetched_per_trainer: list[int] = field(default_factory=list)
    written_back_per_trainer: list[int] = field(default_factory=list)
    exchange_sent_per_trainer: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.fetched / self.reads if self.reads else 0.0

    @property
    def fetch_reduction(self) -> float:
        return self.reads / self.fetched if self.fetched else math.inf

    def per_iter(self, value: float) -> float:
        return value / self.iterations if self.iterations else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        n = max(self.iterations, 1)
        d.update(
            hit_rate=self.hit_rate,
            fetch_reduction=self.fetch_reduction,
            none_fetched_per_iter=self.reads / n,
            none_gradients_per_iter=self.reads / n,
            fetched_per_iter=self.fetched / n,
            written_back_per_iter=self.written_back / n,
            exchange_rows_per_iter=self.exchange_rows / n,
            batches_per_s=self.iterations / self.wall_seconds if self.wall_seconds else math.inf,
            batches_per_cpu_s=self.iterations / self.cpu_seconds if self.cpu_seconds else math.inf,
            keys_per_s=self.iterations * self.keys_per_batch / self.wall_seconds if self.wall_seconds else math.inf,
        )
        return d


def run_plans(cfg: PlannerConfig, batches: Sequence[np.ndarray]) -> Summary:
    """Plan every batch and sum the plans' stats (planning time measured alone)."""
    T = cfg.trainers
    summ = Summary(T, cfg.servers, cfg.lookahead, cfg.prefetch_distance, cfg.cache_rows, cfg.total_rows)
    summ.keys_per_batch = int(getattr(batches[0], "keys", batches[0]).size) if len(batches) else 0
    peak = np.zeros(T, dtype=np.int64)
    occ_sum = np.zeros(T, dtype=np.float64)
    f_t = np.zeros(T, dtype=np.int64)
    w_t = np.zeros(T, dtype=np.int64)
    x_t = np.zeros(T, dtype=np.int64)
    w0, c0 = time.perf_counter(), time.process_time()
    for plan in plan_lrpp(cfg, batches):
        st = plan.stats
        summ.reads += st.reads
        summ.fetched += st.fetched
        summ.written_back += st.written_back
        summ.exchange_rows += st.exchange_rows
        summ.capacity_evictions += st.capacity_evictions
        summ.postponed += st.postponed
        summ.fetched_one_ahead += st.fetched_one_ahead
        f_t += st.fetched_per_trainer
        w_t += st.written_back_per_trainer
        x_t += st.exchange_sent_per_trainer
        if plan.iteration >= 0:
            summ.iterations += 1
            occ = np.asarray(st.occupancy)
            peak = np.maximum(peak, occ)
            occ_sum += occ
    summ.wall_seconds = time.perf_counter() - w0
    summ.cpu_seconds = time.process_time() - c0
    summ.peak_occupancy = peak.tolist()
    summ.mean_occupancy = (occ_sum / max(summ.iterations, 1)).tolist()
    summ.fetched_per_trainer = f_t.tolist()
    summ.written_back_per_trainer = w_t.tolist()
    summ.exchange_sent_per_trainer = x_t.tolist()
    return summ


def format_summary(s: Summary) -> str:
    d = s.as_dict()
    cap = "unlimited" if s.cache_rows is None else f"{s.cache_rows} rows/trainer"
    lines = [
        f"T={s.trainers} S={s.servers} L={s.lookahead} D={s.prefetch_distance} cache={cap} "
        f"({s.iterations} iterations, {s.total_rows} rows in all tables)",
        f"  hit rate               {d['hit_rate']:.1%}  (row reads served without a server fetch)",
        f"  rows fetched / iter    {d['fetched_per_iter']:.1f}  vs none {d['none_fetched_per_iter']:.1f}  "
        f"({d['fetch_reduction']:.2f}x fewer)",
        f"  written back / iter    {d['written_back_per_iter']:.1f}  vs none {d['none_gradients_per_iter']:.1f} "
        f"gradient rows pushed",
        f"  exchange / iter        {d['exchange_rows_per_iter']:.1f} rows owner->readers "
        f"(= contributions readers->owners)",
        "  occupancy per trainer  peak " + ", ".join(map(str, s.peak_occupancy))
        + "  mean " + ", ".join(f"{v:.0f}" for v in s.mean_occupancy),
        f"  capacity events        {s.capacity_evictions} capacity evictions, {s.postponed} postponed fetches, "
        f"{s.fetched_one_ahead} rows fetched only one iteration ahead",
        f"  planning               {d['batches_per_s']:.0f} batches/s, {d['keys_per_s'] / 1e6:.2f} M keys/s "
        f"({d['batches_per_cpu_s']:.0f} batches per CPU second)",
    ]
    return "\n".join(lines)


def scaling_study(trainer_counts: Iterable[int], batches: Sequence[np.ndarray], total_rows: int, servers: int,
                  lookahead: int, prefetch_distance: int | None, cache_rows: str) -> list[dict]:
    """One summary per trainer count, with per-trainer volumes per iteration."""
    rows = []
    B = int(batches[0].shape[0]) if len(batches) else 0
    for T in trainer_counts:
        rec: dict = {"trainers": T}
        if B % T:
            rec["status"] = f"skipped: batch size {B} not divisible by {T}"
            rows.append(rec)
            continue
        try:
            cfg = PlannerConfig(T, servers, lookahead, prefetch_distance,
                                CacheSize.parse(cache_rows).rows_per_trainer(total_rows, T), total_rows)
            s = run_plans(cfg, batches)
        except PlanError as err:
            rec["status"] = f"plan error: {err}"
            rows.append(rec)
            continue
        n = max(s.iterations, 1)
        d = s.as_dict()
        rec.update(
            status="ok", cache_rows=s.cache_rows, hit_rate=d["hit_rate"], fetch_reduction=d["fetch_reduction"],
            fetched_per_trainer_iter=d["fetched_per_iter"] / T,
            none_fetched_per_trainer_iter=d["none_fetched_per_iter"] / T,
            written_back_per_trainer_iter=d["written_back_per_iter"] / T,
            exchange_per_trainer_iter=d["exchange_rows_per_iter"] / T,
            max_fetched_per_trainer_iter=max(s.fetched_per_trainer) / n,
            max_exchange_sent_per_trainer_iter=max(s.exchange_sent_per_trainer) / n,
            peak_occupancy=max(s.peak_occupancy), mean_occupancy=float(np.mean(s.mean_occupancy)),
            occupancy_imbalance=(max(s.mean_occupancy) / max(np.mean(s.mean_occupancy), 1e-9)),
            capacity_evictions=s.capacity_evictions, batches_per_s=d["batches_per_s"],
        )
        rows.append(rec)
    return rows


def sweep(batches: Sequence[np.ndarray], total_rows: int, trainers: int, servers: int,
          prefetch_distance: int | None, lookaheads: Sequence[int] = SWEEP_LOOKAHEADS,
          fractions: Sequence[float | None] = (*SWEEP_FRACTIONS, None)) -> list[dict]:
    """Grid over lookahead x capacity (fractions of all rows, split over the trainers;
    None = unlimited). Infeasible capacities are recorded, not raised."""
    out = []
    for L in lookaheads:
        D = min(prefetch_distance, L) if prefetch_distance is not None else None
        for frac in fractions:
            R = CacheSize(percent=100 * frac if frac is not None else None).rows_per_trainer(total_rows, trainers)
            rec = {"lookahead": L, "cache_fraction": "" if frac is None else frac,
                   "cache_rows": "" if R is None else R, "trainers": trainers}
            try:
                cfg = PlannerConfig(trainers, servers, L, D, R, total_rows)
                s = run_plans(cfg, batches)
            except PlanError as err:
                rec.update(prefetch_distance=D if D is not None else "", status="capacity too small",
                           detail=str(err).split(".")[0])
                out.append(rec)
                continue
            d = s.as_dict()
            rec.update(
                prefetch_distance=cfg.prefetch_distance, status="ok", hit_rate=round(d["hit_rate"], 6),
                fetch_reduction=round(d["fetch_reduction"], 4), fetched_per_iter=round(d["fetched_per_iter"], 2),
                none_fetched_per_iter=round(d["none_fetched_per_iter"], 2),
                written_back_per_iter=round(d["written_back_per_iter"], 2),
                exchange_rows_per_iter=round(d["exchange_rows_per_iter"], 2),
                peak_occupancy=max(s.peak_occupancy), mean_occupancy=round(float(np.mean(s.mean_occupancy)), 1),
                capacity_evictions=s.capacity_evictions, postponed=s.postponed,
                fetched_one_ahead=s.fetched_one_ahead, batches_per_s=round(d["batches_per_s"], 1),
            )
            out.append(rec)
    return out


SWEEP_COLUMNS = ("lookahead", "prefetch_distance", "cache_fraction", "cache_rows", "trainers", "status",
                 "hit_rate", "fetch_reduction", "fetched_per_iter", "none_fetched_per_iter",
                 "written_back_per_iter", "exchange_rows_per_iter", "peak_occupancy", "mean_occupancy",
                 "capacity_evictions", "postponed", "fetched_one_ahead", "batches_per_s", "detail")


def write_csv(path: str, rows: list[dict], columns: Sequence[str] | None = None) -> None:
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError(
            "plots need matplotlib, which is not installed: `pip install matplotlib` "
            "(or `pip install bagpipe[plot]`); the CSV was written anyway"
        ) from err
    return plt


def plot_sweep(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({r["cache_fraction"] for r in rows}, key=lambda f: (f == "", f or 0))
    none_level = None
    markers = "osD^v<>"
    for n, frac in enumerate(keys):
        pts = sorted((r["lookahead"], r) for r in rows if r["cache_fraction"] == frac and r["status"] == "ok")
        if not pts:
            continue
        label = "unlimited" if frac == "" else f"{float(frac):.0%} of rows"
        style = dict(ls="--" if frac == "" else "-", marker="x" if frac == "" else markers[n % len(markers)],
                     label=label)
        ax1.plot([p[0] for p in pts], [p[1]["hit_rate"] for p in pts], **style)
        ax2.plot([p[0] for p in pts], [p[1]["fetched_per_iter"] for p in pts], **style)
        none_level = pts[0][1]["none_fetched_per_iter"]
    if none_level is not None:
        ax2.axhline(none_level, color="k", lw=1, ls=":", label="none (no cache)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lookahead L (iterations)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("hit rate (reads without a server fetch)")
    ax2.set_ylabel("rows fetched per iteration")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8, title="cache (all trainers)")
    ax2.legend(fontsize=8)
    t = rows[0]["trainers"] if rows else "?"
    fig.suptitle(f"LRPP cache: hit rate and server fetches vs lookahead ({t} trainers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    T = [r["trainers"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(T, [r["none_fetched_per_trainer_iter"] for r in ok], ":", marker="o", label="none: fetched")
    def pos(vals):  # log axes: leave out zeros (no exchange at T=1)
        return [v if v > 0 else float("nan") for v in vals]

    ax1.plot(T, [r["fetched_per_trainer_iter"] for r in ok], marker="o", label="fetched")
    ax1.plot(T, [r["written_back_per_trainer_iter"] for r in ok], "--", marker="x", label="written back")
    ax1.plot(T, pos([r["exchange_per_trainer_iter"] for r in ok]), marker="o", label="exchanged (values sent)")
    ax1.set_ylabel("rows per trainer per iteration")
    ax2.plot(T, [r["peak_occupancy"] for r in ok], marker="o", label="peak owned rows (max trainer)")
    ax2.plot(T, [r["mean_occupancy"] for r in ok], marker="o", label="mean owned rows")
    ax2.set_ylabel("owned rows per trainer")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("trainers T")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("LRPP scaling with the number of trainers (fixed global batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Benchmark on a synthetic Criteo-like Zipf workload (no dataset needed):
    ``python -m bagpipe.oracle.simulate --iters 500``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bagpipe.oracle.simulate", description=main.__doc__)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--trainers", type=int, default=2)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--lookahead", type=int, default=8)
    p.add_argument("--prefetch-distance", type=int, default=2)
    p.add_argument("--cache-rows", default="10%",
                   help="R owned rows per trainer, P%% of all rows (the caches together), or 'unlimited'")
    p.add_argument("--evict-ahead", type=int, default=1)
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--scale", type=float, default=0.01, help="Criteo Kaggle table sizes times this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="also replay the plans in the reference checker")
    a = p.parse_args(argv)
    from bagpipe.datasets.synthetic import scaled_tables  # imports pyarrow: only for this benchmark

    cards = scaled_tables(a.scale)
    total = sum(cards)
    t0 = time.perf_counter()
    batches = zipf_key_batches(cards, a.batch_size, a.iters, a.zipf, a.seed)
    print(f"{len(cards)} tables, {total} rows, Zipf {a.zipf}: generated {a.iters} batches of {a.batch_size} "
          f"in {time.perf_counter() - t0:.1f} s")
    cfg = PlannerConfig(a.trainers, a.servers, a.lookahead, a.prefetch_distance,
                        CacheSize.parse(a.cache_rows).rows_per_trainer(total, a.trainers), total, evict_ahead=a.evict_ahead)
    s = run_plans(cfg, batches)
    print(format_summary(s))
    if a.verify:
        from .verify import verify_plans

        t0 = time.perf_counter()
        verify_plans(cfg, batches, plan_lrpp(cfg, batches))
        print(f"verify_plans: OK ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
