"""The on-disk dataset format every reader and writer agrees on.

A dataset is a directory of Parquet files named ``part-NNNNN.parquet``, read in
name order. Every file has the same schema:

- ``label``: float32, 0.0 or 1.0
- ``I1`` .. ``In``: float32 dense features, already preprocessed (e.g. log(x+1))
- one column per sparse feature (``C1`` .. ``Cm`` by default): either int64, one id per
  example (one-hot, the fast path), or list<int64>, a bag of ids per example of any
  length, empty included (multi-hot); every id in ``[0, cardinality)`` of the table
  the feature reads

Every file's schema metadata holds, under the key ``bagpipe``, a JSON object
(`DatasetMeta`): feature names, the tables (name, cardinality, pooling ``sum`` or
``mean``, and the features that read each one: a table may serve several features, as
TorchRec's ``feature_names``), which features are multi-hot, the source and the
preprocessing options. The meta is identical across the files of a dataset.

Version 1 (every feature one-hot, one table per feature, named like the feature,
sum pooling) is still read: its meta has no ``tables``, and they are derived.

By convention the last part is the held-out evaluation split (as Criteo's last
day) when a dataset has more than one part.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"bagpipe"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
POOLINGS = ("sum", "mean")
PART_PATTERN = "part-{:05d}.parquet"


class DatasetError(ValueError):
    """Bad or inconsistent dataset input; the message names the file and field."""


@dataclass(frozen=True)
class TableMeta:
    """One embedding table: its rows, how a bag of them pools, and the features reading it."""

    name: str
    cardinality: int
    pooling: str = "sum"
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetMeta:
    dense_features: list[str]
    sparse_features: list[str]
    cardinalities: list[int]  # per table (in version 1, tables and sparse features are the same)
    source: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    tables: list[TableMeta] = field(default_factory=list)  # empty: one table per feature (version 1)
    multi_hot: list[str] = field(default_factory=list)  # sparse features stored as list<int64>

    def __post_init__(self) -> None:
        tables = [t if isinstance(t, TableMeta) else TableMeta(**t) for t in self.tables]
        if not tables:
            if len(self.cardinalities) != len(self.sparse_features):
                raise DatasetError(f"{len(self.cardinalities)} cardinalities for {len(self.sparse_features)} "
                                   f"sparse features and no tables given")
            tables = [TableMeta(f, int(c), "sum", [f]) for f, c in zip(self.sparse_features, self.cardinalities)]
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "cardinalities", [int(t.cardinality) for t in tables])
        readers = [f for t in tables for f in t.features]
        if sorted(readers) != sorted(self.sparse_features) or len(set(readers)) != len(readers):
            raise DatasetError(f"every sparse feature must be read by exactly one table: features "
                               f"{self.sparse_features}, tables read {readers}")
        for t in tables:
            if t.pooling not in POOLINGS:
                raise DatasetError(f"table {t.name!r}: pooling {t.pooling!r}, expected one of {', '.join(POOLINGS)}")
            if t.cardinality < 1:
                raise DatasetError(f"table {t.name!r}: cardinality must be >= 1, got {t.cardinality}")
        unknown = set(self.multi_hot) - set(self.sparse_features)
        if unknown:
            raise DatasetError(f"multi-hot features {sorted(unknown)} are not sparse features")

    @property
    def num_dense(self) -> int:
        return len(self.dense_features)

    @property
    def num_features(self) -> int:
        return len(self.sparse_features)

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    @property
    def feature_tables(self) -> list[int]:
        """The table each sparse feature reads (by position)."""
        owner = {f: i for i, t in enumerate(self.tables) for f in t.features}
        return [owner[f] for f in self.sparse_features]

    @property
    def feature_cardinalities(self) -> list[int]:
        return [self.cardinalities[t] for t in self.feature_tables]

    @property
    def is_multi_hot(self) -> bool:
        return bool(self.multi_hot)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "<metadata>") -> "DatasetMeta":
        try:
            raw = json.loads(text)
            version = raw.get("version")
            if version not in READABLE_VERSIONS:
                raise DatasetError(f"{where}: dataset format version {version}, expected one of "
                                   f"{', '.join(map(str, READABLE_VERSIONS))}")
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise DatasetError(f"{where}: bagpipe metadata is malformed: {err}") from err
        except DatasetError as err:
            if str(err).startswith(where):
                raise
            raise DatasetError(f"{where}: {err}") from None

    def schema(self) -> pa.Schema:
        fields = [pa.field("label", pa.float32())]
        fields += [pa.field(name, pa.float32()) for name in self.dense_features]
        fields += [pa.field(name, pa.list_(pa.int64()) if name in self.multi_hot else pa.int64())
                   for name in self.sparse_features]
        return pa.schema(fields, metadata={META_KEY: self.to_json().encode()})


def default_feature_names(num_dense: int, num_sparse: int) -> tuple[list[str], list[str]]:
    return [f"I{i + 1}" for i in range(num_dense)], [f"C{i + 1}" for i in range(num_sparse)]


def list_parts(directory: str) -> list[str]:
    """The dataset's Parquet parts in read order; a clear error if there are none."""
    if not os.path.isdir(directory):
        raise DatasetError(f"{directory}: dataset directory does not exist")
    parts = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith("part-") and name.endswith(".parquet")
    )
    if not parts:
        raise DatasetError(f"{directory}: no part-*.parquet files (run `bagpipe prepare ...` first)")
    return parts


def read_meta(path: str) -> DatasetMeta:
    """Meta of one part file, or of a dataset directory (checked equal across its parts)."""
    if os.path.isdir(path):
        parts = list_parts(path)
        metas = [read_meta(p) for p in parts]
        for part, meta in zip(parts[1:], metas[1:]):
            if meta != metas[0]:
                raise DatasetError(f"{part}: bagpipe metadata differs from {parts[0]}")
        return metas[0]
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise DatasetError(f"{path}: not a readable Parquet file: {err}") from err
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DatasetError(f"{path}: no 'bagpipe' metadata; was it written by `bagpipe prepare`?")
    meta = DatasetMeta.from_json(raw.decode(), where=path)
    expected = meta.schema()
    for f in expected:
        if f.name not in schema.names:
            raise DatasetError(f"{path}: column {f.name!r} missing")
        actual = schema.field(f.name).type
        if actual != f.type:
            raise DatasetError(f"{path}: column {f.name!r} has type {actual}, expected {f.type}")
    return meta
