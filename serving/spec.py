"""Model specs: the shape of a randomly initialised model to serve (`--spec NAME|FILE`).

A spec gives the dense network (as `bagpipe.config.ModelConfig` does) and, per
embedding table, its size, its pooling factor (mean ids per candidate item when a
request touches the table) and its coverage (the probability that a request
touches it). Rows come from `bagpipe.rows.RowSpace`, so any process can build any
table or row range of a spec model without the others, to the same bits.

The three shipped specs, ``drm1``, ``drm2`` and ``drm3``, are *shaped after* the
three DLRM-like models of Lui et al. ("Understanding Capacity-Driven Scale-Out
Neural Recommendation Inference"): a few large tables with high pooling; many small
tables with low coverage; a mix of both. They are not the paper's models (whose
exact tables are not public); their nominal sizes are "too large for this machine"
and ``--table-scale`` (default `DEFAULT_TABLE_SCALE`) shrinks every table so that
all placements run side by side on 2 cores.

A spec file is JSON: the fields of `ModelSpec` with either ``"tables": [{"rows",
"pooling", "coverage"}, ...]`` or ``"generate": {"count", "largest", "exponent",
"pooling": [lo, hi], "coverage": [lo, hi]}`` (heavy-tailed sizes, see
`heavy_tailed_tables`), or ``"groups": [<generate>, ...]`` for a mix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from enum import Enum

import numpy as np

from bagpipe.config import MODELS, ConfigError, ModelConfig

DEFAULT_TABLE_SCALE = 0.01
MIN_TABLE_ROWS = 16


class PoolingMode(str, Enum):
    """How a bag of rows becomes one vector (DESIGN.md section 11)."""

    SUM = "sum"
    MEAN = "mean"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TableSpec:
    rows: int
    pooling: float  # mean ids per candidate item, when the request touches the table
    coverage: float  # probability that a request touches the table

    def __post_init__(self) -> None:
        if int(self.rows) < 1:
            raise ConfigError(f"table rows must be >= 1, got {self.rows}")
        if not self.pooling >= 1:
            raise ConfigError(f"table pooling factor must be >= 1 (ids per item), got {self.pooling}")
        if not 0 < self.coverage <= 1:
            raise ConfigError(f"table coverage must be in (0, 1], got {self.coverage}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tables: tuple[TableSpec, ...]
    model: str = "dlrm"
    num_dense: int = 13
    embedding_dim: int = 64
    bottom_mlp: tuple[int, ...] = (512, 256, 64)
    top_mlp: tuple[int, ...] = (512, 256)
    cross_layers: int = 2
    deep_mlp: tuple[int, ...] = (512, 256)
    pooling_mode: PoolingMode = PoolingMode.SUM
    id_skew: float = 1.05  # Zipf exponent of id popularity inside a table
    seed: int = 0
    table_scale: float = 1.0  # the factor `scaled` applied (recorded, for reports)

    def __post_init__(self) -> None:
        if not self.tables:
            raise ConfigError(f"spec {self.name!r}: no tables")
        if self.model not in MODELS:
            raise ConfigError(f"spec {self.name!r}: model {self.model!r} unknown; expected one of {', '.join(MODELS)}")
        if not self.id_skew >= 0:
            raise ConfigError(f"spec {self.name!r}: id_skew must be >= 0, got {self.id_skew}")
        self.model_config()  # every dense-part error now, naming the spec

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(int(t.rows) for t in self.tables)

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(name=self.model, num_dense=self.num_dense, cardinalities=self.cardinalities,
                               embedding_dim=self.embedding_dim, bottom_mlp=tuple(self.bottom_mlp),
                               top_mlp=tuple(self.top_mlp), cross_layers=self.cross_layers,
                               deep_mlp=tuple(self.deep_mlp))
        except ConfigError as err:
            raise ConfigError(f"spec {self.name!r}: {err}") from None

    def scaled(self, table_scale: float) -> "ModelSpec":
        """Every table's rows times `table_scale` (at least MIN_TABLE_ROWS); pooling and coverage kept."""
        if not table_scale > 0:
            raise ConfigError(f"--table-scale must be positive, got {table_scale}")
        tables = tuple(replace(t, rows=max(MIN_TABLE_ROWS, int(round(t.rows * table_scale)))) for t in self.tables)
        return replace(self, tables=tables, table_scale=self.table_scale * table_scale)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pooling_mode"] = self.pooling_mode.value
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "<spec>") -> "ModelSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a spec is a JSON object, got {type(data).__name__}")
        data = dict(data)
        sources = [k for k in ("tables", "generate", "groups") if k in data]
        if len(sources) != 1:
            raise ConfigError(f"{where}: give exactly one of 'tables', 'generate' or 'groups', got {sources or 'none'}")
        try:
            if "tables" in data:
                tables = tuple(TableSpec(int(t["rows"]), float(t["pooling"]), float(t["coverage"]))
                               for t in data.pop("tables"))
            elif "generate" in data:
                tables = heavy_tailed_tables(**data.pop("generate"), seed=int(data.get("seed", 0)))
            else:
                groups = data.pop("groups")
                tables = tuple(t for k, g in enumerate(groups)
                               for t in heavy_tailed_tables(**g, seed=int(data.get("seed", 0)) + 1000 * k))
            for key in ("bottom_mlp", "top_mlp", "deep_mlp"):
                if key in data:
                    data[key] = tuple(int(w) for w in data[key])
            if "pooling_mode" in data:
                try:
                    data["pooling_mode"] = PoolingMode(data["pooling_mode"])
                except ValueError:
                    raise ConfigError(f"pooling_mode {data['pooling_mode']!r} unknown; expected sum or mean") from None
            known = {f for f in cls.__dataclass_fields__} - {"tables"}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(f"unknown spec fields {unknown}; expected some of {sorted(known)}")
            data.setdefault("name", os.path.splitext(os.path.basename(where))[0])
            return cls(tables=tables, **data)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise ConfigError(f"{where}: {err}") from None
            raise ConfigError(f"{where}: malformed spec: {err!r}") from None


def heavy_tailed_tables(count: int, largest: int, exponent: float, pooling: tuple[float, float],
                        coverage: tuple[float, float], seed: int = 0) -> tuple[TableSpec, ...]:
    """`count` tables whose sizes fall off as a power of their rank (``largest * r^-exponent``,
    a heavy tail: a few tables hold most rows), in a seeded shuffled order; pooling factors
    log-uniform and coverages uniform in their ranges (seeded)."""
    if count < 1 or largest < 1:
        raise ConfigError(f"generate: count and largest must be >= 1, got {count}, {largest}")
    (p_lo, p_hi), (c_lo, c_hi) = pooling, coverage
    if not 1 <= p_lo <= p_hi or not 0 < c_lo <= c_hi <= 1:
        raise ConfigError(f"generate: need 1 <= pooling lo <= hi and 0 < coverage lo <= hi <= 1, got "
                          f"pooling {list(pooling)}, coverage {list(coverage)}")
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, count + 1, dtype=np.float64)
    rows = np.maximum(MIN_TABLE_ROWS, np.round(largest * ranks ** -float(exponent))).astype(np.int64)
    rows = rows[rng.permutation(count)]
    pools = np.exp(rng.uniform(math.log(p_lo), math.log(p_hi), count))
    covers = rng.uniform(c_lo, c_hi, count)
    return tuple(TableSpec(int(r), round(float(p), 3), round(float(c), 3)) for r, p, c in zip(rows, pools, covers))


# Nominal sizes: a few hundred million to a few billion bytes of rows, too large for this
# machine on purpose; DEFAULT_TABLE_SCALE brings each to tens of MB.
SHIPPED: dict[str, dict] = {
    # a few large tables, high pooling, touched by nearly every request
    "drm1": {"embedding_dim": 64, "seed": 1,
             "generate": {"count": 8, "largest": 8_000_000, "exponent": 0.6, "pooling": [20, 60],
                          "coverage": [0.85, 1.0]}},
    # many small tables, low pooling, each touched by few requests
    "drm2": {"embedding_dim": 32, "bottom_mlp": [512, 256, 32], "seed": 2,
             "generate": {"count": 100, "largest": 1_000_000, "exponent": 1.0, "pooling": [1, 4],
                          "coverage": [0.05, 0.6]}},
    # a mix: four large high-pooling tables and forty small sparse ones
    "drm3": {"embedding_dim": 64, "seed": 3,
             "groups": [{"count": 4, "largest": 6_000_000, "exponent": 0.5, "pooling": [20, 50],
                         "coverage": [0.9, 1.0]},
                        {"count": 40, "largest": 500_000, "exponent": 1.0, "pooling": [1, 4],
                         "coverage": [0.1, 0.5]}]},
}


def load_spec(name_or_file: str, table_scale: float = DEFAULT_TABLE_SCALE) -> ModelSpec:
    """A shipped spec by name, or a JSON spec file, scaled by `table_scale`."""
    if name_or_file in SHIPPED:
        return ModelSpec.from_dict({"name": name_or_file, **SHIPPED[name_or_file]}, where=name_or_file).scaled(table_scale)
    if not os.path.isfile(name_or_file):
        raise ConfigError(f"--spec {name_or_file!r}: neither a shipped spec ({', '.join(SHIPPED)}) nor a file")
    try:
        with open(name_or_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name_or_file}: not valid JSON: {err}") from None
    return ModelSpec.from_dict(data, where=name_or_file).scaled(table_scale)


__all__ = ["DEFAULT_TABLE_SCALE", "ModelSpec", "PoolingMode", "SHIPPED", "TableSpec", "heavy_tailed_tables",
           "load_spec"]
