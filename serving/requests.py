"""Inference requests: what they hold, how they travel (Arrow), where they come from.

A request is one query with a batch of `b` candidate items. Per item it has the dense
features and, per table, a bag of ids (empty when the request does not touch the
table). On the wire it is one Arrow record batch: ``dense`` (fixed-size list of
``num_dense`` float32) and ``t0 .. t{T-1}`` (list of int64): Arrow's list offsets and
values are the bag offsets and ids, so nothing passes through Python objects.

Requests come from a spec (`SpecRequests`: coverage, pooling factors and Zipf-skewed
ids of every table) or from a prepared dataset (`DatasetRequests`: real ids, one per
table per item, as training reads them). Request ``i`` of a source is a pure function
of (source, seed, i), so every configuration of a benchmark sees the same requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bagpipe.config import ConfigError, ModelConfig
from bagpipe.datasets.zipf import ZipfSampler

from .placement import AccessStats
from .spec import ModelSpec, TableSpec

DENSE = "dense"


def table_column(table: int) -> str:
    return f"t{table}"


class RequestError(ValueError):
    """A request that cannot be served: malformed, oversized or out of range. Names the field."""


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds, so one request cannot exhaust a server's memory."""

    max_items: int = 1024
    max_ids: int = 1 << 18

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_ids < 1:
            raise ConfigError(f"--max-items and --max-ids-per-request must be >= 1, got {self.max_items}, "
                              f"{self.max_ids}")


@dataclass
class Bags:
    """One table's bags for b items: ids ``ids[offsets[i]:offsets[i+1]]`` belong to item i."""

    offsets: np.ndarray  # int64 [b + 1], offsets[0] == 0
    ids: np.ndarray  # int64 [offsets[-1]]
    arrow: pa.ListArray | None = None  # the column these bags were read from, sent on as it is

    @classmethod
    def empty(cls, items: int) -> "Bags":
        return cls(np.zeros(items + 1, np.int64), np.zeros(0, np.int64))

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, ids: np.ndarray) -> "Bags":
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(offsets, np.asarray(ids, np.int64))

    @property
    def items(self) -> int:
        return len(self.offsets) - 1

    @property
    def count(self) -> int:
        return int(self.ids.size)

    def item_of_id(self) -> np.ndarray:
        """[count] the item each id belongs to."""
        return np.repeat(np.arange(self.items), np.diff(self.offsets))

    def to_arrow(self) -> pa.ListArray:
        if self.arrow is not None:
            return self.arrow
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(self.ids))

    @classmethod
    def from_arrow(cls, column: pa.Array, name: str) -> "Bags":
        """Checked: a list of integers without nulls."""
        kind = column.type
        if not pa.types.is_list(kind) or not pa.types.is_integer(kind.value_type):
            raise RequestError(f"column {name!r}: expected list<int64> (bags of ids), got {kind}")
        values = column.values
        if column.null_count or values.null_count:
            raise RequestError(f"column {name!r}: null bags or ids are not allowed")
        offsets = column.offsets.to_numpy().astype(np.int64)
        reusable = column if offsets[0] == 0 and kind.value_type == pa.int64() else None
        if offsets[0]:
            values = values.slice(offsets[0], offsets[-1] - offsets[0])
            offsets -= offsets[0]
        return cls(offsets, values.to_numpy().astype(np.int64, copy=False)[: offsets[-1]], reusable)


@dataclass
class Request:
    dense: np.ndarray  # float32 [b, num_dense]
    bags: tuple[Bags, ...]  # one per table

    @property
    def items(self) -> int:
        return int(self.dense.shape[0])

    @property
    def total_ids(self) -> int:
        return sum(b.count for b in self.bags)

    def touched(self) -> np.ndarray:
        """bool [T]: the tables this request has any id for."""
        return np.array([b.count > 0 for b in self.bags], dtype=bool)

    def to_arrow(self) -> pa.RecordBatch:
        columns = [pa.FixedSizeListArray.from_arrays(pa.array(self.dense.ravel()), self.dense.shape[1])]
        columns += [b.to_arrow() for b in self.bags]
        return pa.record_batch(columns, names=[DENSE] + [table_column(t) for t in range(len(self.bags))])


@dataclass(frozen=True)
class RequestShape:
    """What a well-formed request for a model looks like."""

    num_dense: int
    cardinalities: tuple[int, ...]

    @classmethod
    def of(cls, model: ModelConfig) -> "RequestShape":
        return cls(model.num_dense, tuple(model.cardinalities))

    def decode(self, batch: pa.RecordBatch, limits: RequestLimits) -> Request:
        """A checked request from its record batch; every problem is a RequestError naming the field."""
        names = batch.schema.names
        want = [DENSE] + [table_column(t) for t in range(len(self.cardinalities))]
        if names != want:
            tables = sum(1 for n in names if n != DENSE)
            raise RequestError(f"request has columns {_abbrev(names)} ({tables} tables), the model expects "
                               f"{_abbrev(want)} ({len(self.cardinalities)} tables, ids as t0..t"
                               f"{len(self.cardinalities) - 1}, plus {self.num_dense} dense features)")
        items = batch.num_rows
        if not 1 <= items <= limits.max_items:
            raise RequestError(f"request has {items} items; allowed 1..{limits.max_items} (--max-items)")
        dense_col = batch.column(0)
        if (not pa.types.is_fixed_size_list(dense_col.type) or dense_col.type.list_size != self.num_dense
                or not pa.types.is_float32(dense_col.type.value_type)):
            raise RequestError(f"column 'dense': expected fixed_size_list<float32>[{self.num_dense}], got "
                               f"{dense_col.type}")
        if dense_col.null_count or dense_col.values.null_count:
            raise RequestError("column 'dense': nulls are not allowed")
        dense = dense_col.flatten().to_numpy()
        bags = tuple(Bags.from_arrow(batch.column(k + 1), want[k + 1]) for k in range(len(self.cardinalities)))
        total = sum(b.count for b in bags)
        if total > limits.max_ids:
            raise RequestError(f"request has {total} ids; at most {limits.max_ids} allowed (--max-ids-per-request)")
        check_id_ranges(bags, [(0, c) for c in self.cardinalities], list(range(len(self.cardinalities))))
        if not np.isfinite(dense).all():
            raise RequestError("column 'dense': values must be finite")
        return Request(dense.reshape(items, self.num_dense).copy(), bags)


def check_id_ranges(bags, ranges, tables) -> None:
    """Every id of bags[k] within ranges[k] = [lo, hi) of table tables[k]; else RequestError naming it."""
    for bag, (lo, hi), table in zip(bags, ranges, tables):
        if bag.count and (bag.ids.min() < lo or bag.ids.max() >= hi):
            bad = bag.ids[(bag.ids < lo) | (bag.ids >= hi)][0]
            raise RequestError(f"column {table_column(table)!r}: id {int(bad)} outside [{lo}, {hi}) of table {table}")


def _abbrev(names: list[str]) -> str:
    return str(names) if len(names) <= 6 else f"[{', '.join(names[:4])}, ..., {names[-1]}]"


@dataclass(frozen=True)
class ItemCount:
    """Candidate items per request: ``fixed:N`` (or ``N``), ``uniform:LO:HI`` or
    ``lognormal:MEDIAN:SIGMA`` (rounded, at least 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "ItemCount":
        parts = str(text).split(":")
        try:
            if len(parts) == 1 or parts[0] == "fixed":
                n = int(parts[-1])
                if n < 1:
                    raise ValueError
                return cls("fixed", n)
            if parts[0] == "uniform" and len(parts) == 3 and 1 <= int(parts[1]) <= int(parts[2]):
                return cls("uniform", int(parts[1]), int(parts[2]))
            if parts[0] == "lognormal" and len(parts) == 3 and float(parts[1]) >= 1 and float(parts[2]) >= 0:
                return cls("lognormal", float(parts[1]), float(parts[2]))
        except ValueError:
            pass
        raise ConfigError(f"--items: expected N, fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA, got {text!r}")

    def draw(self, rng: np.random.Generator, limit: int) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.integers(self.a, self.b + 1)
        else:
            n = round(self.a * math.exp(self.b * rng.standard_normal()))
        return int(min(max(1, n), limit))

    def __str__(self) -> str:
        return f"{self.kind}:{self.a:g}" + (f":{self.b:g}" if self.kind != "fixed" else "")


def _coprime_multiplier(rows: int) -> int:
    """A multiplier whose affine map ``(r * m + c) % rows`` permutes 0..rows-1."""
    m = 0x9E3779B1 % rows or 1
    while math.gcd(m, rows) != 1:
        m += 1
    return m


class SpecRequests:
    """Requests drawn from a spec: request i touches table t with probability coverage_t;
    a touched table gives each item ``1 + Poisson(pooling_t - 1)`` ids, Zipf(id_skew)
    popular, scattered over the table by a fixed affine permutation (hashed feature ids
    are not sorted by popularity)."""

    def __init__(self, spec: ModelSpec, items: ItemCount, seed: int = 0, max_items: int = 1024) -> None:
        self.spec, self.items, self.seed, self.max_items = spec, items, seed, max_items
        self._samplers = [ZipfSampler(t.rows, spec.id_skew) for t in spec.tables]
        self._mult = np.array([_coprime_multiplier(t.rows) for t in spec.tables], dtype=np.int64)
        self._coverage = np.array([t.coverage for t in spec.tables])

    def request(self, index: int) -> Request:
        rng = np.random.default_rng([self.seed, index])
        b = self.items.draw(rng, self.max_items)
        touched = rng.random(len(self.spec.tables)) < self._coverage
        bags = []
        for t, table in enumerate(self.spec.tables):
            if not touched[t]:
                bags.append(Bags.empty(b))
                continue
            lengths = 1 + rng.poisson(table.pooling - 1, b)
            ranks = self._samplers[t].ranks(rng.random(int(lengths.sum())))
            ids = (ranks.astype(np.int64) * self._mult[t] + 7 * t) % table.rows
            bags.append(Bags.from_lengths(lengths, ids))
        dense = rng.standard_normal((b, self.spec.num_dense), dtype=np.float32)
        return Request(dense, tuple(bags))

    def take(self, start: int, count: int) -> list[Request]:
        return [self.request(i) for i in range(start, start + count)]


class DatasetRequests:
    """Requests of real ids from a prepared dataset: request i is `b` consecutive rows
    starting at row ``i * max_items`` (wrapping around the rows loaded), one id per table
    per item and the rows' dense features."""

    def __init__(self, path: str, model: ModelConfig, items: ItemCount, seed: int = 0, max_items: int = 1024,
                 max_rows: int = 1 << 18) -> None:
        from bagpipe.datasets.reader import BatchReader, check_compatible, num_rows, split_parts

        train, held_out = split_parts(path)
        parts = train + held_out
        batch = max(1, min(max_rows, 4096, num_rows(parts)))
        reader = BatchReader(parts, batch, columns="all", max_batches=max(1, max_rows // batch))
        check_compatible(reader.meta, model.num_dense, model.cardinalities, path)
        dense, sparse = [], []
        for b in reader:
            dense.append(b.dense)
            sparse.append(b.sparse)
        if not dense:
            raise ConfigError(f"{path}: no rows to draw requests from")
        self.dense = np.concatenate(dense)
        self.sparse = np.concatenate(sparse, axis=1)
        self.items, self.seed, self.max_items = items, seed, max_items

    def request(self, index: int) -> Request:
        rng = np.random.default_rng([self.seed, index])
        b = self.items.draw(rng, self.max_items)
        rows = (index * self.max_items + np.arange(b)) % self.dense.shape[0]
        ones = np.ones(b, np.int64)
        bags = tuple(Bags.from_lengths(ones, self.sparse[t, rows]) for t in range(self.sparse.shape[0]))
        return Request(np.ascontiguousarray(self.dense[rows]), bags)

    def take(self, start: int, count: int) -> list[Request]:
        return [self.request(i) for i in range(start, start + count)]


def spec_of_model(model: ModelConfig, name: str = "export") -> ModelSpec:
    """The spec of a trained model's requests when nothing better is known: every table
    touched by every request, one id per item (as in the training data)."""
    return ModelSpec(name=name, tables=tuple(TableSpec(c, 1.0, 1.0) for c in model.cardinalities),
                     model=model.name, num_dense=model.num_dense, embedding_dim=model.embedding_dim,
                     bottom_mlp=model.bottom_mlp, top_mlp=model.top_mlp, cross_layers=model.cross_layers,
                     deep_mlp=model.deep_mlp)


def access_stats(requests: list[Request]) -> AccessStats:
    """Coverage, pooling factors and the touched-table sample of `requests`, for placement."""
    touched = np.stack([r.touched() for r in requests])
    ids = np.array([[b.count for b in r.bags] for r in requests], dtype=np.float64)
    items = np.array([r.items for r in requests], dtype=np.float64)
    per_item = ids / items[:, None]
    hits = touched.sum(axis=0)
    pooling = np.where(hits > 0, per_item.sum(axis=0) / np.maximum(hits, 1), 1.0)
    return AccessStats(touched=touched, pooling=np.maximum(pooling, 1.0), items=float(items.mean()))
