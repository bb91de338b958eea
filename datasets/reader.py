"""Deterministic global batches from a dataset's Parquet parts.

Order: the parts are concatenated in the given order (or, with ``shuffle_seed``,
their (file, row group) units are permuted once with
``np.random.default_rng(shuffle_seed)``; rows inside a unit keep their order), and
global batch i is rows ``[i * B, (i + 1) * B)`` of that stream. Batches straddle
row groups and files freely; a partial last batch is dropped (DESIGN.md section 2).
``start_batch`` skips ahead using the row-group row counts in the footers, without
reading the skipped rows.

A `Batch` holds ``dense`` float32 [b, num_dense] (C order), ``labels`` float32 [b]
and ``sparse`` int64 [num_tables, b] (table-major, C order). With
``slice_of=(k, T)`` the reader yields only trainer k's contiguous slice of every
global batch (b = B / T), reading only the row groups that slice touches and
copying only its rows, so a trainer never materialises the other trainers' rows;
`Batch.slice(k, T)` cuts a full batch the same way (for `local`, which plays
every trainer). Batches are fresh arrays (never reused), so a consumer may keep a
window of them (the oracle does).

Every consumed id is checked against its table's cardinality (vectorised min/max
per column per slice); a bad id raises `DatasetError` naming the file, column,
value and row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from .format import DatasetError, DatasetMeta, list_parts, read_meta
from .jagged import Bags

COLUMNS = ("all", "sparse")


@dataclass
class Batch:
    index: int
    dense: np.ndarray  # float32 [b, num_dense]; [0, num_dense] when read with columns="sparse"
    labels: np.ndarray  # float32 [b]; [0] when read with columns="sparse"
    sparse: np.ndarray  # int64 [num_features, b], C-contiguous: one-hot features' ids (multi-hot rows: 0)
    bags: dict[int, Bags] = field(default_factory=dict)  # multi-hot features (by position): their bags

    @property
    def size(self) -> int:
        return int(self.sparse.shape[1])

    def slice(self, rank: int, trainers: int) -> "Batch":
        """Trainer `rank`'s contiguous slice: rows [rank*b/T, (rank+1)*b/T)."""
        b = self.size
        if trainers <= 0 or not 0 <= rank < trainers:
            raise ValueError(f"rank {rank} out of range for {trainers} trainers")
        if b % trainers:
            raise ValueError(f"batch of {b} rows does not split evenly over {trainers} trainers")
        per = b // trainers
        lo, hi = rank * per, (rank + 1) * per
        has_rows = self.labels.shape[0] == b
        return Batch(
            index=self.index,
            dense=self.dense[lo:hi] if has_rows else self.dense,
            labels=self.labels[lo:hi] if has_rows else self.labels,
            sparse=np.ascontiguousarray(self.sparse[:, lo:hi]),
            bags={f: bags.slice(lo, hi) for f, bags in self.bags.items()},
        )


def _as_parts(path: str) -> list[str]:
    if os.path.isdir(path):
        return list_parts(path)
    if os.path.isfile(path):
        return [path]
    raise DatasetError(f"{path}: dataset does not exist (no such file or directory)")


def split_parts(path: str, eval_path: str | None = None) -> tuple[list[str], list[str]]:
    """(train parts, eval parts) of a dataset.

    By default the last part is the eval split when there are >= 2 parts; with one
    part the eval list is empty (the caller decides). With `eval_path` (a part file
    or a dataset directory) every part of `path` is training data."""
    parts = _as_parts(path)
    if eval_path is not None:
        return parts, _as_parts(eval_path)
    if len(parts) >= 2:
        return parts[:-1], parts[-1:]
    return parts, []


def num_rows(parts: Sequence[str]) -> int:
    return sum(_footer(p).num_rows for p in parts)


def num_batches(parts: Sequence[str], batch_size: int) -> int:
    """Number of full global batches over the concatenated parts (footers only)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_rows(parts) // batch_size


def _footer(path: str) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable Parquet file: {err}") from err


def check_compatible(meta: DatasetMeta, num_dense: int, cardinalities: Sequence[int], where: str,
                     feature_tables: Sequence[int] | None = None) -> None:
    """Raise DatasetError unless the dataset matches the model's dense features, tables
    and which table each sparse feature reads (default: one table per feature)."""
    problems = []
    if meta.num_dense != num_dense:
        problems.append(f"{meta.num_dense} dense features, the model expects {num_dense}")
    cards = list(cardinalities)
    wanted = list(feature_tables) if feature_tables is not None else list(range(len(cards)))
    if meta.num_tables != len(cards):
        problems.append(f"{meta.num_tables} tables, the model expects {len(cards)}")
    elif meta.feature_tables != wanted:
        problems.append(f"its {meta.num_features} sparse features read tables {meta.feature_tables}, the model "
                        f"expects {wanted}")
    else:
        diffs = [
            f"{t.name}: dataset {int(t.cardinality)}, model {m}"
            for t, m in zip(meta.tables, cards)
            if int(t.cardinality) != int(m)
        ]
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            problems.append("table cardinalities differ: " + "; ".join(diffs[:5]) + more)
    if problems:
        raise DatasetError(f"{where}: dataset does not match the model config: " + "; ".join(problems))


def check_id_ranges(parts: Sequence[str], meta: DatasetMeta) -> None:
    """Every sparse id within its table, from the Parquet min/max statistics alone.

    Lets a job refuse bad data before any process starts training; row groups
    without statistics are left to the reader's per-batch check."""
    for part in parts:
        footer = _footer(part)
        names = [footer.schema.column(i).path.split(".")[0] for i in range(footer.num_columns)]  # (list leaves too)
        for table, (name, card) in enumerate(zip(meta.sparse_features, meta.feature_cardinalities)):
            col = names.index(name)
            for g in range(footer.num_row_groups):
                stats = footer.row_group(g).column(col).statistics
                if stats is None or not stats.has_min_max:
                    continue
                if stats.min < 0 or stats.max >= card:
                    bad = stats.max if stats.max >= card else stats.min
                    raise DatasetError(
                        f"{part}: column {name} (table {table}), row group {g}: id {bad} is outside "
                        f"[0, {card}) — the data does not match its table cardinality"
                    )


class BatchReader:
    """Iterate global batches of exactly `batch_size` rows (see module docstring)."""

    def __init__(
        self,
        parts: Sequence[str],
        batch_size: int,
        *,
        columns: str = "all",
        shuffle_seed: int | None = None,
        start_batch: int = 0,
        max_batches: int | None = None,
        check_ids: bool = True,
        use_threads: bool = False,
        slice_of: tuple[int, int] = (0, 1),
    ) -> None:
        if not parts:
            raise DatasetError("no dataset parts to read")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if columns not in COLUMNS:
            raise ValueError(f"columns must be one of {COLUMNS}, got {columns!r}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if max_batches is not None and max_batches < 0:
            raise ValueError(f"max_batches must be >= 0, got {max_batches}")
        rank, trainers = slice_of
        if trainers < 1 or not 0 <= rank < trainers:
            raise ValueError(f"slice_of: rank {rank} out of range for {trainers} trainers")
        if batch_size % trainers:
            raise ValueError(f"batch of {batch_size} rows does not split evenly over {trainers} trainers")
        self.slice_of = (rank, trainers)
        self.parts = [os.fspath(p) for p in parts]
        self.batch_size = batch_size
        self.columns = columns
        self.shuffle_seed = shuffle_seed
        self.start_batch = start_batch
        self.check_ids = check_ids
        self.use_threads = use_threads
        self.meta = read_meta(self.parts[0])
        for p in self.parts[1:]:
            m = read_meta(p)
            if m.dense_features != self.meta.dense_features or m.sparse_features != self.meta.sparse_features \
                    or m.tables != self.meta.tables or m.multi_hot != self.meta.multi_hot:
                raise DatasetError(f"{p}: features or tables differ from {self.parts[0]}")
        # units: (part index, row group, rows)
        units = []
        for i, p in enumerate(self.parts):
            md = _footer(p)
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                if n:
                    units.append((i, rg, n))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(units))
            units = [units[k] for k in order]
        self.units = units
        self._unit_end = np.cumsum([u[2] for u in units], dtype=np.int64)
        self.num_rows = sum(u[2] for u in units)
        total = self.num_rows // batch_size
        self.total_batches = total
        n = max(0, total - start_batch)
        self.num_batches = n if max_batches is None else min(n, max_batches)
        self._cards = np.asarray(self.meta.feature_cardinalities, dtype=np.int64)  # per sparse feature
        multi = set(self.meta.multi_hot)
        self._multi = [f for f, name in enumerate(self.meta.sparse_features) if name in multi]

    def __len__(self) -> int:
        return self.num_batches

    def _load(self, unit: tuple[int, int, int], files: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """One row group as (labels [n], dense [n, D], sparse [features, n], bags) arrays:
        decoded and stacked once, then sliced by every batch that falls in it."""
        i, rg, n = unit
        pf = files.get(i)
        if pf is None:
            files.clear()  # keep at most one open file
            pf = files[i] = pq.ParquetFile(self.parts[i])
        meta = self.meta
        names = list(meta.sparse_features)
        if self.columns == "all":
            names = ["label", *meta.dense_features, *names]
        table = pf.read_row_group(rg, columns=names, use_threads=self.use_threads)
        F, D = meta.num_features, meta.num_dense
        first = table.num_columns - F
        bags = {f: Bags.from_arrow(table.column(first + f)) for f in self._multi}
        zeros = np.zeros(n, np.int64)
        sparse = np.stack([zeros if f in bags else table.column(first + f).to_numpy() for f in range(F)]) \
            if F else np.zeros((0, n), np.int64)
        if self.columns != "all":
            return np.zeros(0, np.float32), np.zeros((0, D), np.float32), sparse, bags
        cols = [table.column(k).to_numpy() for k in range(first)]
        dense = np.stack(cols[1:1 + D], axis=1) if D else np.zeros((n, 0), np.float32)
        return cols[0], dense, sparse, bags

    def _check_bags(self, bags: dict[int, Bags], unit: tuple[int, int, int], row0: int) -> None:
        """Every id of a multi-hot piece within its table."""
        if not self.check_ids:
            return
        for f, piece in bags.items():
            bad = np.flatnonzero((piece.values < 0) | (piece.values >= self._cards[f]))
            if bad.size:
                example = int(np.searchsorted(piece.offsets, bad[0], side="right")) - 1
                raise DatasetError(f"{self._where(unit, row0 + example)}: column {self.meta.sparse_features[f]!r} "
                                   f"has id {int(piece.values[bad[0]])} outside [0, {int(self._cards[f])})")

    def _check(self, sparse: np.ndarray, unit: tuple[int, int, int], row0: int) -> None:
        """sparse: [features, k] slice of the batch just filled from `unit` starting at its row row0."""
        if not self.check_ids or sparse.shape[1] == 0:
            return
        lo = sparse.min(axis=1)
        hi = sparse.max(axis=1)
        bad = np.flatnonzero((lo < 0) | (hi >= self._cards))  # (multi-hot rows hold zeros: always in range)
        if bad.size == 0:
            return
        t = int(bad[0])
        row = sparse[t]
        where = np.flatnonzero((row < 0) | (row >= self._cards[t]))[0]
        raise DatasetError(f"{self._where(unit, row0 + int(where))}: column {self.meta.sparse_features[t]!r} has id "
                           f"{int(row[where])} outside [0, {int(self._cards[t])})")

    def _where(self, unit: tuple[int, int, int], offset: int) -> str:
        """'<file>: row <n> (row group <g>)' of row `offset` of a unit."""
        i, rg, _ = unit
        md = _footer(self.parts[i])
        file_row = sum(md.row_group(g).num_rows for g in range(rg)) + offset
        return f"{self.parts[i]}: row {file_row} (row group {rg})"

    def _check_values(self, labels: np.ndarray, dense: np.ndarray, unit: tuple[int, int, int], row0: int) -> None:
        """Labels must be 0 or 1 and dense features finite: a NaN would train to a NaN loss."""
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            raise DatasetError(f"{self._where(unit, row0 + int(bad[0]))}: label {float(labels[bad[0]])} is not 0 or 1")
        finite = np.isfinite(dense)
        if not finite.all():
            r, c = (int(x[0]) for x in np.nonzero(~finite))
            raise DatasetError(f"{self._where(unit, row0 + r)}: column {self.meta.dense_features[c]!r} holds "
                               f"{float(dense[r, c])}, not a finite number")

    def __iter__(self) -> Iterator[Batch]:
        B, rank, trainers = self.batch_size, *self.slice_of
        per = B // trainers
        T, D = self.meta.num_features, self.meta.num_dense
        full = self.columns == "all"
        files: dict = {}
        u, loaded = 0, None  # current unit and its arrays
        for index in range(self.start_batch, self.start_batch + self.num_batches):
            lo = index * B + rank * per  # this slice's rows in the stream
            labels = np.empty(per if full else 0, np.float32)
            dense = np.empty((per if full else 0, D), np.float32)
            sparse = np.empty((T, per), np.int64)
            pieces: dict[int, list[Bags]] = {f: [] for f in self._multi}
            fill = 0
            while fill < per:
                while lo + fill >= self._unit_end[u]:
                    u, loaded = u + 1, None
                if loaded is None:
                    loaded = self._load(self.units[u], files)
                off = lo + fill - (self._unit_end[u] - self.units[u][2])
                k = min(per - fill, self.units[u][2] - off)
                sparse[:, fill:fill + k] = loaded[2][:, off:off + k]
                self._check(sparse[:, fill:fill + k], self.units[u], off)
                if pieces:
                    cut = {f: bags.slice(off, off + k) for f, bags in loaded[3].items()}
                    self._check_bags(cut, self.units[u], off)
                    for f, piece in cut.items():
                        pieces[f].append(piece)
                if full:
                    labels[fill:fill + k] = loaded[0][off:off + k]
                    dense[fill:fill + k] = loaded[1][off:off + k]
                    if self.check_ids:
                        self._check_values(labels[fill:fill + k], dense[fill:fill + k], self.units[u], off)
                fill += k
            yield Batch(index=index, dense=dense, labels=labels, sparse=sparse,
                        bags={f: Bags.concat(p) for f, p in pieces.items()})
