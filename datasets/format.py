"""The on-disk dataset format every reader and writer agrees on.

A dataset is a directory of Parquet files named ``part-NNNNN.parquet``, read in
name order. Every file has the same schema:

- ``label``: float32, 0.0 or 1.0
- ``I1`` .. ``In``: float32 dense features, already preprocessed (e.g. log(x+1))
- ``C1`` .. ``Cm``: int64 sparse ids, one per example per table, each in
  ``[0, cardinality)`` of its table

Every file's schema metadata holds, under the key ``bagpipe``, a JSON object
(`DatasetMeta`): feature names, table cardinalities, the source and the
preprocessing options. The meta is identical across the files of a dataset.

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
FORMAT_VERSION = 1
PART_PATTERN = "part-{:05d}.parquet"


class DatasetError(ValueError):
    """Bad or inconsistent dataset input; the message names the file and field."""


@dataclass(frozen=True)
class DatasetMeta:
    dense_features: list[str]
    sparse_features: list[str]
    cardinalities: list[int]
    source: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def num_dense(self) -> int:
        return len(self.dense_features)

    @property
    def num_tables(self) -> int:
        return len(self.sparse_features)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "<metadata>") -> "DatasetMeta":
        try:
            raw = json.loads(text)
            meta = cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise DatasetError(f"{where}: bagpipe metadata is malformed: {err}") from err
        if meta.version != FORMAT_VERSION:
            raise DatasetError(f"{where}: dataset format version {meta.version}, expected {FORMAT_VERSION}")
        if len(meta.cardinalities) != len(meta.sparse_features):
            raise DatasetError(
                f"{where}: {len(meta.cardinalities)} cardinalities for {len(meta.sparse_features)} sparse features"
            )
        return meta

    def schema(self) -> pa.Schema:
        fields = [pa.field("label", pa.float32())]
        fields += [pa.field(name, pa.float32()) for name in self.dense_features]
        fields += [pa.field(name, pa.int64()) for name in self.sparse_features]
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
