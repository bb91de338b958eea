"""`bagpipe report RUN [RUN ...] --out DIR`: a run (or several, overlaid) as pictures.

PNG plots of the smoothed loss, eval metrics, wall-clock throughput, the time split,
rows moved and the cache, plus a static index.html with a summary table; also the
overlay / difference plot of `bagpipe compare --compare-plot`. Reads run directories
only, so finished, failed and still-running runs all work. Matplotlib draws through
its object API on the Agg canvas (no pyplot state, no display); every file is
written under a temporary name and renamed.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bagpipe.compare import DEFAULT_WINDOW, BandResult, ToleranceResult, trailing_mean
from bagpipe.rundir import RunRecord

PHASES = ("data", "plan", "wait", "compute", "exchange", "update")
ROW_FIELDS = (("rows_read", "rows read"), ("rows_fetched", "rows fetched from servers"),
              ("rows_written_back", "rows written back"), ("plan_exchange_rows", "rows exchanged between trainers"))


class ReportError(ValueError):
    """Something a report cannot be made from (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class Plot:
    """One written PNG and what it shows: `series` maps (panel title, line label) to its number of points."""

    name: str
    path: str
    caption: str
    series: dict[tuple[str, str], int]


@dataclass(frozen=True)
class Report:
    out_dir: str
    runs: list[RunRecord]
    labels: list[str]
    plots: list[Plot]
    skipped: dict[str, str] = field(default_factory=dict)  # plot name -> why it was not drawn
    index: str = ""


def _figure(rows: int, cols: int = 1, width: float = 8.0, height: float = 3.2):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'bagpipe[plot]'") from None
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, list(axes.ravel())


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename onto path: readers never see a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp-{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save(fig, path: str) -> None:
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _replace_atomically(path, write)


def _style(index: int) -> dict:
    """Run i's colour and dash: identical curves stay visible when overlaid."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", "-.", ":")[index % 4]}


def _series(fig) -> dict[tuple[str, str], int]:
    """Every labelled line of the figure and its length: what the plot really shows."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_"):
                out[(ax.get_title(), label)] = len(line.get_xdata())
    return out


def run_labels(runs: list[RunRecord]) -> list[str]:
    """Legend names: the directories' base names, or their paths where those repeat."""
    names = [os.path.basename(os.path.normpath(r.path)) for r in runs]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(r.path) for r in runs]


def _legend(ax, handles=None) -> None:
    if handles or ax.get_legend_handles_labels()[0]:
        ax.legend(handles=handles, fontsize="small")


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _hit_rate(run: RunRecord, window: int) -> np.ndarray:
    """1 - fetched / read over a trailing window, all trainers together: per-trainer
    reads are not in metrics.jsonl (the oracle sums them)."""
    fetched = trailing_mean(np.nan_to_num(run.column("rows_fetched")), window)
    read = trailing_mean(np.nan_to_num(run.column("rows_read")), window)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(read > 0, 1.0 - fetched / read, np.nan)
    return np.clip(rate, 0.0, 1.0)  # prefetches run ahead of reads (all of the bootstrap at iteration 0)


# ---------------------------------------------------------------- the plots


def _plot_loss(runs, labels, window):
    fig, (ax,) = _figure(1)
    handles = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        loss = run.column("loss")
        ax.plot(run.iterations, loss, linewidth=0.6, alpha=0.3, label=f"{label} raw", color=_style(i)["color"])
        handles += ax.plot(run.iterations, trailing_mean(loss, window), label=label, **_style(i))
    ax.set(title=f"training loss (trailing mean over {window} iterations; faint: raw)", xlabel="iteration",
           ylabel="loss")
    _legend(ax, handles)
    return fig, "training loss per iteration, smoothed"


def _plot_eval(runs, labels, window):
    points = [r.eval_points() for r in runs]
    if not any(p.iters.size for p in points):
        return None, "no run has an evaluation yet (distributed runs evaluate at the end)"
    panels = [("auc", "eval AUC"), ("logloss", "eval logloss")]
    if any(np.isfinite(p.ne).any() for p in points):
        panels.append(("ne", "eval NE (logloss / entropy of the eval click rate)"))
    fig, axes = _figure(len(panels), height=2.6)
    for ax, (attr, title) in zip(axes, panels):
        for i, (p, label) in enumerate(zip(points, labels)):
            if p.iters.size:
                ax.plot(p.iters, getattr(p, attr), marker="o", label=label, **_style(i))
        ax.set(title=title, xlabel="iteration")
        _legend(ax)
    return fig, "eval metrics at each evaluation (the last point is summary.json's final evaluation)"


def _plot_throughput(runs, labels, window):
    fig, (ax,) = _figure(1)
    for i, (run, label) in enumerate(zip(runs, labels)):
        if not run.batch_size:
            continue
        per_iter = trailing_mean(run.column("time_iter"), window)
        rate = run.batch_size / per_iter
        overall = run.summary.get("samples_per_s") if run.complete else None
        suffix = f" (run: {overall:,.0f}/s)" if overall else ""
        ax.plot(run.iterations, rate, label=f"{label}{suffix}", **_style(i))
    ax.set(title=f"wall-clock samples/s (global batch / trailing mean of iteration time over {window})",
           xlabel="iteration", ylabel="samples/s")
    _legend(ax)
    return fig, "wall-clock throughput over the run"


def _plot_time_split(runs, labels, window):
    fig, axes = _figure(len(runs), height=2.8)
    for ax, run, label in zip(axes, runs, labels):
        x = run.iterations
        total = trailing_mean(run.column("time_iter"), window) * 1e3
        parts = [trailing_mean(np.nan_to_num(run.column(f"time_{p}")), window) * 1e3 for p in PHASES]
        other = np.maximum(total - np.sum(parts, axis=0), 0.0)
        ax.stackplot(x, *parts, other, labels=[*PHASES, "other"], alpha=0.85)
        ax.plot(x, total, color="black", linewidth=0.8, label="iteration (total)")
        ax.set(title=f"{label}: time per iteration, ms (trailing mean over {window})", xlabel="iteration",
               ylabel="ms")
        ax.legend(fontsize="x-small", ncol=4, loc="upper right")
    return fig, "where each iteration's wall time goes (stacked; distributed runs: the slowest trainer)"


def _plot_rows(runs, labels, window):
    if not any(run.has(name) for run in runs for name, _ in ROW_FIELDS[1:]):
        return None, "no run moves rows (local mode keeps full tables)"
    fig, axes = _figure(len(ROW_FIELDS), height=2.4)
    for ax, (name, title) in zip(axes, ROW_FIELDS):
        for i, (run, label) in enumerate(zip(runs, labels)):
            if run.has(name):
                ax.plot(run.iterations, trailing_mean(np.nan_to_num(run.column(name)), window), label=label,
                        **_style(i))
        ax.set(title=f"{title} per iteration, all trainers (trailing mean over {window})", xlabel="iteration")
        if ax.get_lines():
            _legend(ax)
        else:
            _no_data(ax, "not recorded by these runs")
    return fig, "rows moved per iteration"


def _plot_cache(runs, labels, window):
    cached = [(i, run, label) for i, (run, label) in enumerate(zip(runs, labels)) if run.has("cache_occupancy")]
    if not cached:
        return None, "no bagpipe-mode run (no cache)"
    fig, (occupancy, hits) = _figure(2, height=2.8)
    for i, run, label in cached:
        table = np.array([m.get("cache_occupancy") or [np.nan] for m in run.metrics], dtype=np.float64)
        for trainer in range(table.shape[1]):
            occupancy.plot(run.iterations, table[:, trainer], label=f"{label} trainer {trainer}")
        capacity = (run.config.get("cluster") or {}).get("cache_rows")
        if capacity:
            occupancy.axhline(capacity, linestyle="--", color="grey", linewidth=0.8)
        hits.plot(run.iterations, _hit_rate(run, window), label=label, **_style(i))
    occupancy.set(title="cache occupancy per trainer, owned rows (dashed: capacity)", xlabel="iteration",
                  ylabel="rows")
    hits.set(title=f"hit rate 1 - fetched/read, all trainers (trailing {window})", xlabel="iteration",
             ylim=(-0.02, 1.02))
    _legend(occupancy)
    _legend(hits)
    return fig, ("cache occupancy per trainer, and the hit rate of all trainers together (per-trainer reads are "
                 "not in metrics.jsonl; fetches are prefetches, so the rate is clipped at 0 where they run ahead)")


PLOTS: list[tuple[str, Callable]] = [("loss", _plot_loss), ("eval", _plot_eval), ("throughput", _plot_throughput),
                                     ("time_split", _plot_time_split), ("rows", _plot_rows), ("cache", _plot_cache)]


# ---------------------------------------------------------------- the report


def _summary_row(run: RunRecord, label: str, window: int) -> dict[str, str]:
    final = run.eval_points().final() or {}
    summary = run.summary or {}
    loss = run.column("loss")
    elapsed = float(run.metrics[-1].get("elapsed") or np.nan)
    rate = summary.get("samples_per_s")
    if rate is None and run.batch_size:  # a run still going (or failed): its rate so far
        rate = len(run.metrics) * run.batch_size / elapsed
    wait_share = summary.get("wait_share", np.nansum(run.column("time_wait")) / elapsed)
    cluster = run.config.get("cluster") or {}

    def num(value, spec=".4f"):
        return "" if value is None or not np.isfinite(value) else format(value, spec)

    return {"run": label, "status": run.status, "mode": run.mode,
            "model": str((run.config.get("model") or {}).get("name", "")),
            "trainers": str(cluster.get("trainers", "")), "iterations": str(len(run.metrics)),
            "final loss": num(loss[-1]), f"smoothed loss ({window})": num(trailing_mean(loss, window)[-1]),
            "AUC": num(final.get("auc")), "logloss": num(final.get("logloss")), "NE": num(final.get("ne")),
            "samples/s": num(rate, ",.0f"), "wait share": num(wait_share, ".1%"),
            "digest": str(summary.get("digest", "")), "path": run.path}


def _index_html(report: Report, window: int) -> str:
    rows = [_summary_row(r, label, window) for r, label in zip(report.runs, report.labels)]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    figures = "".join(f'<figure><img src="{html.escape(os.path.basename(p.path))}" alt="{html.escape(p.name)}">'
                      f"<figcaption>{html.escape(p.caption)}</figcaption></figure>" for p in report.plots)
    skipped = "".join(f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in report.skipped.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>bagpipe report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}
figure{{margin:2em 0}}</style></head><body>
<h1>bagpipe report</h1>
<p>{len(report.runs)} run(s), read from their run directories; curves are trailing means over {window}
iterations. AUC, logloss and NE are the final evaluation (of an incomplete run: its latest).</p>
<table><tr>{head}</tr>{body}</table>
{figures}
{f"<p>Not drawn:</p><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""


def write_report(run_paths: list[str], out_dir: str, window: int = DEFAULT_WINDOW) -> Report:
    if not run_paths:
        raise ReportError("give at least one run directory")
    if window < 1:
        raise ReportError(f"--window must be >= 1, got {window}")
    runs = [RunRecord.load(p) for p in run_paths]
    labels = run_labels(runs)
    os.makedirs(out_dir, exist_ok=True)
    plots, skipped = [], {}
    for name, draw in PLOTS:
        fig, caption = draw(runs, labels, window)
        if fig is None:
            skipped[name] = caption
            continue
        path = os.path.join(out_dir, f"{name}.png")
        _save(fig, path)
        plots.append(Plot(name, path, caption, _series(fig)))
    report = Report(out_dir, runs, labels, plots, skipped, os.path.join(out_dir, "index.html"))
    _write_text(report.index, _index_html(report, window))
    return report


def write_compare_plot(result: ToleranceResult | BandResult, path: str, show_tolerance: bool = True) -> Plot:
    """The overlay of the compared smoothed losses and their difference curve."""
    fig, (overlay, difference) = _figure(2)
    x = result.iters
    if isinstance(result, BandResult):
        k = result.sigmas
        labels = run_labels([result.candidate, *result.baselines])
        overlay.fill_between(x, result.mean - k * result.std, result.mean + k * result.std, alpha=0.25,
                             color="tab:blue", label=f"baseline ± {k:g} σ")
        overlay.plot(x, result.mean, color="tab:blue", label="baseline mean")
        overlay.plot(x, result.candidate_smoothed, color="tab:red", label=f"{labels[0]} (candidate)")
        difference.plot(x, result.deviation, color="tab:red", label="|candidate - mean| / σ")
        difference.axhline(k, linestyle="--", color="grey", label=f"limit {k:g} σ")
        difference.set(title="distance from the baseline mean, in σ", xlabel="iteration", ylabel="σ")
    else:
        labels = run_labels([result.run_a, result.run_b])
        overlay.plot(x, result.smoothed_a, label=labels[0], **_style(0))
        overlay.plot(x, result.smoothed_b, label=labels[1], **_style(1))
        difference.plot(x, result.raw_relative, linewidth=0.6, alpha=0.4, label="raw")
        difference.plot(x, result.smoothed_relative, label="smoothed")
        if show_tolerance:
            difference.axhline(result.tolerance, linestyle="--", color="grey", label=f"tolerance {result.tolerance:g}")
        difference.set(title="relative loss difference |a-b|/max(|a|,|b|)", xlabel="iteration")
    overlay.set(title=f"loss, trailing mean over {result.window} iterations", xlabel="iteration", ylabel="loss")
    _legend(overlay)
    _legend(difference)
    _save(fig, path)
    return Plot("compare", path, "compared losses and their difference", _series(fig))
