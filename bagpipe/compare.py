"""`bagpipe compare`: are two runs the same training, bit for bit, or do they converge alike?

Three checks, all over run directories only (finished, failed or still running):

- bits (the default): every iteration digest and the final digest are identical;
- tolerance (`--tolerance REL`): the loss curves, smoothed by a trailing mean, and
  the eval metrics (AUC, logloss, NE) at the latest evaluation every run has agree
  within a relative difference |a - b| / max(|a|, |b|);
- seed band (`--baseline RUN RUN RUN ...`): the candidate's smoothed loss and eval
  metrics stay within k standard deviations of the baseline runs' mean (band_sigma),
  the check for systems whose bits cannot match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bagpipe.rundir import RunRecord, read_metrics, read_summary

DEFAULT_WINDOW = 10
DEFAULT_SIGMAS = 3.0
FINAL_METRICS = ("auc", "logloss", "ne")
MIN_BASELINES = 3


class CompareError(ValueError):
    """Inputs no check can be made on (the CLI prints it and exits 2)."""


def compare_runs(run_a: str, run_b: str) -> tuple[bool, str]:
    """(identical, explanation). Names the first iteration whose digests differ."""
    for run in (run_a, run_b):
        for name in ("metrics.jsonl", "summary.json"):
            if not os.path.exists(os.path.join(run, name)):
                return False, f"{run}: no {name} (did the run finish?)"
    metrics_a, metrics_b = read_metrics(run_a), read_metrics(run_b)
    by_iter_a = {m["iter"]: m for m in metrics_a if "digest" in m}
    by_iter_b = {m["iter"]: m for m in metrics_b if "digest" in m}
    for i in sorted(set(by_iter_a) | set(by_iter_b)):
        a, b = by_iter_a.get(i), by_iter_b.get(i)
        if a is None or b is None:
            missing = run_a if a is None else run_b
            return False, f"iteration {i}: missing in {missing}"
        if a["digest"] != b["digest"]:
            return False, (
                f"first difference at iteration {i}: digest {a['digest']} vs {b['digest']} "
                f"(loss {a.get('loss')!r} vs {b.get('loss')!r})"
            )
    da, db = read_summary(run_a).get("digest"), read_summary(run_b).get("digest")
    if da != db:
        return False, f"per-iteration digests agree over {len(by_iter_a)} iterations, final digests differ: {da} vs {db}"
    return True, f"identical: {len(by_iter_a)} iterations and the final digest {da}"


# ---------------------------------------------------------------- shared pieces


def _range_means(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mean of values[starts[i]:ends[i]] for every i, from one cumulative sum."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    return (sums[ends] - sums[starts]) / (ends - starts)


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start): the one
    smoothing of compare and report. A non-finite value poisons the rest of the curve,
    which is what a diverged run should show."""
    if window < 1:
        raise CompareError(f"--window must be >= 1, got {window}")
    ends = np.arange(1, len(values) + 1)
    return _range_means(values, np.maximum(ends - window, 0), ends)


def centred_mean(values: np.ndarray, half_width: int) -> np.ndarray:
    """Mean over the points within +-half_width of each point (fewer at the ends)."""
    index = np.arange(len(values))
    return _range_means(values, np.maximum(index - half_width, 0), np.minimum(index + half_width + 1, len(values)))


def relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| / max(|a|, |b|): symmetric, 0 for equal values, inf where either is not finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, np.abs(a - b) / scale, 0.0)
    return np.where(np.isfinite(a) & np.isfinite(b), rel, np.inf)


def first_beyond(scores: np.ndarray, limit: float) -> int | None:
    """Index of the first score above the limit (NaN counts as above), or None."""
    beyond = np.flatnonzero(~(np.asarray(scores) <= limit))
    return int(beyond[0]) if beyond.size else None


def load_runs(paths: list[str]) -> list[RunRecord]:
    return [RunRecord.load(p) for p in paths]


def common_iterations(runs: list[RunRecord]) -> np.ndarray:
    common = runs[0].iterations
    for run in runs[1:]:
        common = np.intersect1d(common, run.iterations)
    if not common.size:
        raise CompareError("the runs have no iteration in common: " + "; ".join(r.describe() for r in runs))
    return common


def loss_at(run: RunRecord, iters: np.ndarray) -> np.ndarray:
    """The run's raw loss at the given iterations (all of which it has)."""
    order = np.argsort(run.iterations, kind="stable")
    positions = order[np.searchsorted(run.iterations[order], iters)]
    return run.column("loss")[positions]


def common_evaluation(runs: list[RunRecord]) -> tuple[list[dict[str, float]] | None, str]:
    """Each run's AUC / logloss / NE at the latest iteration that every run evaluated
    (metrics of different training lengths do not compare), and a note saying which."""
    points = [r.eval_points() for r in runs]
    missing = [r.path for r, p in zip(runs, points) if not p.iters.size]
    if missing:
        return None, "no evaluation recorded in " + ", ".join(missing)
    shared = points[0].iters
    for p in points[1:]:
        shared = np.intersect1d(shared, p.iters)
    if not shared.size:
        latest = "; ".join(f"{r.path}: iteration {p.iters[-1]}" for r, p in zip(runs, points))
        return None, f"no evaluation at a common iteration (latest: {latest})"
    iteration = int(shared[-1])
    final = all(r.complete and int(r.metrics[-1]["iter"]) == iteration for r in runs)
    note = "final evaluation" if final else f"evaluation at iteration {iteration}, the latest every run has"
    return [p.at(iteration) for p in points], note


def _span(iters: np.ndarray) -> str:
    return f"{iters.size} common iterations ({iters[0]}..{iters[-1]})"


def _coverage(runs: list[RunRecord], iters: np.ndarray) -> str:
    lengths = {len(r.metrics) for r in runs}
    if len(lengths) == 1 and iters.size == lengths.pop():
        return f"compared over all {_span(iters)}"
    return ("runs of different lengths (" + " vs ".join(str(len(r.metrics)) for r in runs)
            + f" iterations): compared over their {_span(iters)}")


def _metrics_block(rows: list[str], note: str) -> list[str]:
    if not rows:
        return [f"  eval metrics: not compared ({note})"]
    return [f"  eval metrics ({note}):", *(f"    {row}" for row in rows)]


def _fmt(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.6g}"


# ---------------------------------------------------------------- tolerance mode


class _Verdict:
    """What both convergence checks decide: a score per compared iteration (of the
    smoothed loss) and per final metric, each against one limit."""

    metrics: list

    @property
    def scores(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def limit(self) -> float:
        raise NotImplementedError

    @property
    def first_loss_beyond(self) -> int | None:
        """Index into iters of the first compared iteration beyond the limit."""
        return first_beyond(self.scores, self.limit)

    @property
    def metrics_beyond(self) -> list:
        return [m for m in self.metrics if not m.score <= self.limit]

    @property
    def within(self) -> bool:
        return self.first_loss_beyond is None and not self.metrics_beyond


@dataclass(frozen=True)
class MetricDifference:
    name: str
    a: float
    b: float
    relative: float

    @property
    def score(self) -> float:
        return self.relative


@dataclass(frozen=True)
class ToleranceResult(_Verdict):
    """Two runs' convergence compared within a relative tolerance."""

    run_a: RunRecord
    run_b: RunRecord
    tolerance: float
    window: int
    iters: np.ndarray  # the common iterations
    loss_a: np.ndarray  # raw losses at iters
    loss_b: np.ndarray
    smoothed_a: np.ndarray  # trailing means over iters
    smoothed_b: np.ndarray
    metrics: list[MetricDifference]  # final eval metrics both runs have
    metrics_note: str  # which evaluation the metrics are from, or why there are none

    @property
    def raw_relative(self) -> np.ndarray:
        return relative_difference(self.loss_a, self.loss_b)

    @property
    def smoothed_relative(self) -> np.ndarray:
        return relative_difference(self.smoothed_a, self.smoothed_b)

    @property
    def scores(self) -> np.ndarray:
        return self.smoothed_relative

    @property
    def limit(self) -> float:
        return self.tolerance

    def message(self) -> str:
        lines = [f"convergence check: {self.run_a.path} vs {self.run_b.path}, tolerance {self.tolerance:g} "
                 f"(relative difference |a-b|/max(|a|,|b|)); loss smoothed by a trailing mean over "
                 f"{self.window} iterations",
                 f"  {self.run_a.describe()}", f"  {self.run_b.describe()}",
                 f"  {_coverage([self.run_a, self.run_b], self.iters)}"]
        for name, a, b, rel in (("raw loss", self.loss_a, self.loss_b, self.raw_relative),
                                ("smoothed loss", self.smoothed_a, self.smoothed_b, self.smoothed_relative)):
            worst = int(np.argmax(rel))
            with np.errstate(invalid="ignore"):
                largest_abs = np.nanmax(np.abs(a - b)) if np.isfinite(a - b).any() else float("nan")
            lines.append(f"  {name:<14} largest |a-b| {_fmt(largest_abs)}, largest relative {_fmt(rel[worst])} "
                         f"at iteration {self.iters[worst]} ({_fmt(a[worst])} vs {_fmt(b[worst])})")
        lines += _metrics_block([f"{m.name:<8} {_fmt(m.a)} vs {_fmt(m.b)}, relative {_fmt(m.relative)}"
                                 for m in self.metrics], self.metrics_note)
        first = self.first_loss_beyond
        if first is not None:
            i = self.iters[first]
            lines.append(f"beyond tolerance: first at iteration {i}, smoothed loss {_fmt(self.smoothed_a[first])} vs "
                         f"{_fmt(self.smoothed_b[first])} (relative {_fmt(self.smoothed_relative[first])} > "
                         f"{self.tolerance:g})")
        elif self.metrics_beyond:
            m = self.metrics_beyond[0]
            lines.append(f"beyond tolerance: eval {m.name} {_fmt(m.a)} vs {_fmt(m.b)} "
                         f"(relative {_fmt(m.relative)} > {self.tolerance:g})")
        else:
            lines.append(f"within tolerance {self.tolerance:g} at every compared iteration and eval metric")
        return "\n".join(lines)


def compare_tolerance(run_a: RunRecord, run_b: RunRecord, tolerance: float,
                      window: int = DEFAULT_WINDOW) -> ToleranceResult:
    if not tolerance >= 0:
        raise CompareError(f"--tolerance must be a non-negative relative difference, got {tolerance}")
    iters = common_iterations([run_a, run_b])
    loss_a, loss_b = loss_at(run_a, iters), loss_at(run_b, iters)
    evaluations, note = common_evaluation([run_a, run_b])
    metrics: list[MetricDifference] = []
    for name in FINAL_METRICS if evaluations else ():
        a, b = evaluations[0][name], evaluations[1][name]
        if np.isfinite(a) or np.isfinite(b):
            metrics.append(MetricDifference(name, a, b, float(relative_difference(a, b))))
    return ToleranceResult(run_a, run_b, tolerance, window, iters, loss_a, loss_b, trailing_mean(loss_a, window),
                           trailing_mean(loss_b, window), metrics, note)


# ---------------------------------------------------------------- seed band


@dataclass(frozen=True)
class BandMetric:
    name: str
    candidate: float
    mean: float
    std: float

    @property
    def sigmas(self) -> float:
        return _in_sigmas(self.candidate, self.mean, self.std)

    @property
    def score(self) -> float:
        return self.sigmas


def _in_sigmas(value, mean, std):
    """|value - mean| in standard deviations (inf off a zero-width band, nan never passes)."""
    value, mean, std = (np.asarray(x, dtype=np.float64) for x in (value, mean, std))
    gap = np.abs(value - mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(std > 0, gap / std, np.where(gap == 0, 0.0, np.inf))
    out = np.where(np.isfinite(value) & np.isfinite(mean), out, np.inf)
    return out if out.ndim else float(out)


@dataclass(frozen=True)
class BandResult(_Verdict):
    """A candidate run against the seed-variance band of baseline runs."""

    candidate: RunRecord
    baselines: list[RunRecord]
    sigmas: float
    window: int
    iters: np.ndarray  # iterations every run has
    candidate_smoothed: np.ndarray
    mean: np.ndarray  # baseline mean of the smoothed loss
    std: np.ndarray  # the band's σ at each point (band_sigma)
    metrics: list[BandMetric]
    metrics_note: str

    @property
    def deviation(self) -> np.ndarray:
        """The candidate's distance from the baseline mean, in standard deviations."""
        return _in_sigmas(self.candidate_smoothed, self.mean, self.std)

    @property
    def scores(self) -> np.ndarray:
        return self.deviation

    @property
    def limit(self) -> float:
        return self.sigmas

    def message(self) -> str:
        k = self.sigmas
        n = len(self.baselines)
        lines = [f"seed band: {self.candidate.path} against {n} baseline runs, mean ± {k:g} σ; loss smoothed by a "
                 f"trailing mean over {self.window} iterations; σ: the baselines' sample standard deviation, its "
                 f"variance averaged over ±{self.window} iterations, times sqrt(1+1/{n}) (a new run against the "
                 f"mean of {n})",
                 f"  candidate {self.candidate.describe()}"]
        lines += [f"  baseline  {b.describe()}" for b in self.baselines]
        lines.append(f"  {_coverage([self.candidate, *self.baselines], self.iters)}")
        dev = self.deviation
        worst = int(np.argmax(dev))
        lines.append(f"  smoothed loss  largest deviation {_fmt(dev[worst])} σ at iteration {self.iters[worst]} "
                     f"(candidate {_fmt(self.candidate_smoothed[worst])}, baseline {_fmt(self.mean[worst])} ± "
                     f"{_fmt(self.std[worst])})")
        lines += _metrics_block([f"{m.name:<8} candidate {_fmt(m.candidate)}, baseline {_fmt(m.mean)} ± "
                                 f"{_fmt(m.std)} ({_fmt(m.sigmas)} σ)" for m in self.metrics], self.metrics_note)
        first = self.first_loss_beyond
        if first is not None:
            lines.append(f"outside the band: first at iteration {self.iters[first]}, smoothed loss "
                         f"{_fmt(self.candidate_smoothed[first])} is {_fmt(dev[first])} σ from the baseline mean "
                         f"{_fmt(self.mean[first])} (σ {_fmt(self.std[first])}, limit {k:g} σ)")
        elif self.metrics_beyond:
            m = self.metrics_beyond[0]
            lines.append(f"outside the band: eval {m.name} {_fmt(m.candidate)} is {_fmt(m.sigmas)} σ from the "
                         f"baseline mean {_fmt(m.mean)} (σ {_fmt(m.std)}, limit {k:g} σ)")
        else:
            lines.append(f"within {k:g} σ of the baseline at every compared iteration and eval metric")
        return "\n".join(lines)


def band_sigma(curves: np.ndarray, window: int) -> np.ndarray:
    """σ of a further run around the mean of `curves` ([n runs, points]) at each point.

    The baselines' sample variance (ddof=1) is averaged over the points within
    +-window (3 runs give a per-point σ of 2 degrees of freedom that dips towards 0 by
    chance somewhere on a long curve), and scaled by (1 + 1/n): a new run differs
    from an n-run mean by its own spread plus the mean's."""
    n = curves.shape[0]
    return np.sqrt(centred_mean(curves.var(axis=0, ddof=1), window) * (1.0 + 1.0 / n))


def compare_band(candidate: RunRecord, baselines: list[RunRecord], sigmas: float = DEFAULT_SIGMAS,
                 window: int = DEFAULT_WINDOW) -> BandResult:
    if len(baselines) < MIN_BASELINES:
        raise CompareError(f"--baseline needs at least {MIN_BASELINES} runs (e.g. different seeds), "
                           f"got {len(baselines)}")
    if not sigmas > 0:
        raise CompareError(f"--sigmas must be positive, got {sigmas}")
    iters = common_iterations([candidate, *baselines])
    curves = np.stack([trailing_mean(loss_at(b, iters), window) for b in baselines])
    evaluations, note = common_evaluation([candidate, *baselines])
    metrics: list[BandMetric] = []
    for name in FINAL_METRICS if evaluations else ():
        values = np.array([e[name] for e in evaluations[1:]])
        if np.isfinite(values).all() or np.isfinite(evaluations[0][name]):
            spread = float(values.std(ddof=1) * np.sqrt(1.0 + 1.0 / values.size))
            metrics.append(BandMetric(name, evaluations[0][name], float(values.mean()), spread))
    return BandResult(candidate, baselines, sigmas, window, iters, trailing_mean(loss_at(candidate, iters), window),
                      curves.mean(axis=0), band_sigma(curves, window), metrics, note)
