"""Dataset statistics, streamed over every part.

`dataset_stats(path)` reports rows, click rate, dense means and, per table, the
cardinality, distinct ids seen, the share of its ids that are the missing id 0, the
mean number of ids per example (above 1 for multi-hot features, and summed over every
feature that reads the table), the share of empty bags, and the share of
accesses that go to the hottest 1% of the table's rows (the top
``ceil(1% * cardinality)`` ids by access count). "overall" pools the access
counts of every row of every table and takes the hottest ``ceil(1% * sum of
cardinalities)`` rows (the "1% of rows take 92% of accesses" figure of DESIGN.md).

Counts are exact: per-table ``np.bincount`` over buffered ids (flushed every few
million ids), so memory is one int64 counter per table row plus a buffer.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .format import DatasetError, list_parts, read_meta

HOT_FRACTION = 0.01
_FLUSH_IDS = 1 << 22


def hot_share(counts: np.ndarray, fraction: float = HOT_FRACTION) -> float:
    """Share of all accesses going to the top ceil(fraction * len(counts)) rows."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    k = min(len(counts), max(1, math.ceil(fraction * len(counts))))
    top = np.partition(counts, len(counts) - k)[len(counts) - k :]
    return float(top.sum()) / total


def _pooled_hot_share(count_histograms: list[np.ndarray], num_rows: int, fraction: float) -> float:
    """Hot share over pooled tables from per-table histograms of count values
    (hist[c] = number of rows accessed exactly c times): exact, no concatenation."""
    width = max(len(h) for h in count_histograms)
    hist = np.zeros(width, dtype=np.int64)
    for h in count_histograms:
        hist[: len(h)] += h
    values = np.arange(width, dtype=np.int64)
    total = int((hist * values).sum())
    if total == 0:
        return float("nan")
    k = min(num_rows, max(1, math.ceil(fraction * num_rows)))
    # walk count values from the highest down, taking whole groups, then a partial one
    rows_desc = hist[::-1]
    vals_desc = values[::-1]
    cum_rows = np.cumsum(rows_desc)
    full = int(np.searchsorted(cum_rows, k, side="left"))  # group index where k is reached
    taken = int((rows_desc[:full] * vals_desc[:full]).sum())
    before = int(cum_rows[full - 1]) if full > 0 else 0
    taken += (k - before) * int(vals_desc[full])
    return taken / total


def dataset_stats(path: str, *, hot_fraction: float = HOT_FRACTION) -> dict[str, Any]:
    """Stream over every part of the dataset at `path` (a directory or one part file)."""
    parts = [path] if os.path.isfile(path) else list_parts(path)
    meta = read_meta(path)
    cards = list(meta.cardinalities)
    T, D = meta.num_tables, meta.num_dense
    table_of = meta.feature_tables
    ids_seen = np.zeros(T, dtype=np.int64)
    empty_bags = np.zeros(T, dtype=np.int64)
    bags_seen = np.zeros(T, dtype=np.int64)
    counts = [np.zeros(n, dtype=np.int64) for n in cards]
    buffers: list[list[np.ndarray]] = [[] for _ in range(T)]
    buffered = [0] * T
    rows = 0
    clicks = 0.0
    dense_sum = np.zeros(D, dtype=np.float64)
    part_rows = []

    def flush(t: int) -> None:
        if not buffers[t]:
            return
        ids = np.concatenate(buffers[t]) if len(buffers[t]) > 1 else buffers[t][0]
        counts[t] += np.bincount(ids, minlength=cards[t])
        buffers[t] = []
        buffered[t] = 0

    for part in parts:
        pf = pq.ParquetFile(part)
        if read_meta(part) != meta:
            raise DatasetError(f"{part}: bagpipe metadata differs from {parts[0]}")
        n_part = 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg)
            n = table.num_rows
            n_part += n
            clicks += float(np.sum(table.column("label").to_numpy(), dtype=np.float64))
            for j, name in enumerate(meta.dense_features):
                dense_sum[j] += float(np.sum(table.column(name).to_numpy(), dtype=np.float64))
            for f, name in enumerate(meta.sparse_features):
                t = table_of[f]
                column = table.column(name).combine_chunks()
                if pa.types.is_list(column.type):
                    ids = column.flatten().to_numpy()
                    empty_bags[t] += int(np.count_nonzero(column.value_lengths().to_numpy(zero_copy_only=False) == 0))
                else:
                    ids = column.to_numpy()
                bags_seen[t] += n
                if ids.size and (ids.min() < 0 or ids.max() >= cards[t]):
                    bad = ids[(ids < 0) | (ids >= cards[t])][0]
                    raise DatasetError(
                        f"{part}: column {name!r} has id {int(bad)} outside [0, {cards[t]}) of table "
                        f"{meta.tables[t].name!r} (row group {rg})"
                    )
                buffers[t].append(ids)
                buffered[t] += ids.size
                ids_seen[t] += ids.size
                if buffered[t] >= max(_FLUSH_IDS, cards[t] // 4):
                    flush(t)
        rows += n_part
        part_rows.append(n_part)
    tables = []
    histograms = []
    for t in range(T):
        flush(t)
        c = counts[t]
        histograms.append(np.bincount(c))
        tables.append(
            {
                "name": meta.tables[t].name,
                "features": list(meta.tables[t].features),
                "pooling": meta.tables[t].pooling,
                "cardinality": cards[t],
                "distinct": int(np.count_nonzero(c)),
                "missing_share": float(c[0]) / ids_seen[t] if ids_seen[t] else float("nan"),
                "ids_per_example": float(ids_seen[t]) / rows if rows else float("nan"),
                "empty_share": float(empty_bags[t]) / bags_seen[t] if bags_seen[t] else float("nan"),
                "hot_share": hot_share(c, hot_fraction),
            }
        )
    overall = _pooled_hot_share(histograms, sum(cards), hot_fraction) if T and rows else float("nan")
    return {
        "path": os.path.abspath(path),
        "source": meta.source,
        "parts": len(parts),
        "part_rows": part_rows,
        "rows": rows,
        "eval_rows": part_rows[-1] if len(parts) >= 2 else 0,
        "click_rate": clicks / rows if rows else float("nan"),
        "num_dense": D,
        "num_tables": T,
        "total_cardinality": int(sum(cards)),
        "ids_per_example": float(ids_seen.sum()) / rows if rows else float("nan"),
        "multi_hot": list(meta.multi_hot),
        "hot_fraction": hot_fraction,
        "hot_share_overall": overall,
        "dense_means": {name: (dense_sum[j] / rows if rows else float("nan")) for j, name in
                        enumerate(meta.dense_features)},
        "tables": tables,
        "preprocessing": meta.preprocessing,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable rendering of `dataset_stats` output."""
    pct = f"{stats['hot_fraction'] * 100:g}%"
    lines = [
        f"dataset    {stats['path']}  (source: {stats['source']})",
        f"parts      {stats['parts']}  rows {stats['rows']:,}  (eval part: {stats['eval_rows']:,} rows)",
        f"clicks     {stats['click_rate']:.4f}",
        f"tables     {stats['num_tables']}  total rows {stats['total_cardinality']:,}  "
        f"ids per example {stats['ids_per_example']:.1f}" + ("  (multi-hot)" if stats["multi_hot"] else ""),
        f"hottest {pct} of all table rows take {stats['hot_share_overall'] * 100:.1f}% of accesses",
    ]
    pre = stats.get("preprocessing") or {}
    if "true_auc" in pre:
        lines.append(f"generator  zipf {pre.get('zipf')}  seed {pre.get('seed')}  true-model AUC {pre['true_auc']:.4f}")
    lines.append("")
    lines.append(f"{'table':<8}{'cardinality':>14}{'distinct':>12}{'missing':>10}{'hot ' + pct:>10}"
                 f"{'ids/ex':>9}{'empty':>8}  pooling")
    for t in stats["tables"]:
        lines.append(
            f"{t['name']:<8}{t['cardinality']:>14,}{t['distinct']:>12,}"
            f"{t['missing_share'] * 100:>9.1f}%{t['hot_share'] * 100:>9.1f}%"
            f"{t['ids_per_example']:>9.2f}{t['empty_share'] * 100:>7.1f}%  {t['pooling']}"
            + (f" (features {', '.join(t['features'])})" if t["features"] != [t["name"]] else "")
        )
    if stats["dense_means"]:
        lines.append("")
        lines.append("dense means: " + "  ".join(f"{k}={v:.3f}" for k, v in stats["dense_means"].items()))
    return "\n".join(lines)
