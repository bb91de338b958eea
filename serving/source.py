"""Where a served model comes from: a spec (random rows from `RowSpace`) or an export.

A process builds only the rows it holds: a sparse shard its tables or row ranges, the
main shard the dense part (and every table under ``--placement local``). Spec rows are
`RowSpace.init_rows` of their keys, so they equal the single-process tables bit for
bit whatever the placement. An export (`bagpipe.export`) is read without executing
anything from it: the main shard reads and checks it whole with `read_export` (sizes,
checksums, no pickle); a shard reads just its tables from ``tables.parquet`` (a filter
on the table column), with the model config the main shard put in the placement file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bagpipe.config import ConfigError, ModelConfig
from bagpipe.export import ExportedModel, read_export
from bagpipe.rows import RowSpace

from .placement import TablePart
from .requests import spec_of_model
from .spec import ModelSpec, PoolingMode, load_spec


@dataclass(frozen=True)
class ModelSource:
    """A spec model (``export_path`` None) or an exported one; ``spec`` describes its requests."""

    model: ModelConfig
    seed: int
    spec: ModelSpec
    export_path: str | None = None

    @property
    def pooling_mode(self) -> PoolingMode:
        return self.spec.pooling_mode

    @classmethod
    def open(cls, spec: str | None, checkpoint: str | None,
             table_scale: float) -> tuple["ModelSource", ExportedModel | None]:
        """From ``--spec NAME|FILE`` or ``--checkpoint DIR`` (an export, read and checked whole: the
        second value); with both, the spec only describes the requests (pooling, coverage) of the
        exported model."""
        if checkpoint is None:
            if spec is None:
                raise ConfigError("give --spec NAME|FILE or --checkpoint DIR")
            model_spec = load_spec(spec, table_scale)
            return cls(model_spec.model_config(), model_spec.seed, model_spec), None
        exported = read_export(checkpoint)
        request_spec = spec_of_model(exported.model, os.path.basename(os.path.normpath(checkpoint)))
        if spec is not None:
            request_spec = load_spec(spec, 1.0)
            if request_spec.cardinalities != exported.model.cardinalities:
                raise ConfigError(f"--spec {spec}: its tables {list(request_spec.cardinalities)[:6]}... differ from "
                                  f"the exported model's {list(exported.model.cardinalities)[:6]}...")
        return cls(exported.model, exported.seed, request_spec, os.path.abspath(checkpoint)), exported

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "export_path": self.export_path, "seed": self.seed,
                "model": dataclasses.asdict(self.model)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSource":
        model = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["model"].items()})
        return cls(model, int(data["seed"]), ModelSpec.from_dict(data["spec"]), data["export_path"])

    def load_dense(self, exported: ExportedModel | None = None) -> torch.nn.Module:
        """The dense model in eval mode: the export's weights, or the spec's seeded initialisation."""
        from bagpipe.models import build_model

        if self.export_path is None:
            return build_model(self.model, self.seed).eval()
        return (exported or read_export(self.export_path)).build().eval()

    def load_rows(self, parts: list[TablePart], exported: ExportedModel | None = None) -> list[torch.Tensor]:
        """[rows, row_dim] float32 of every part, in order (from `exported` when given)."""
        if self.export_path is None:
            space = RowSpace(self.model.cardinalities, self.model.row_dim, self.seed)
            offsets = space.offsets
            return [space.init_tensor(np.arange(p.row_lo, p.row_hi, dtype=np.int64) + offsets[p.table]) for p in parts]
        if exported is not None:
            return [torch.from_numpy(np.array(exported.tables[p.table][p.row_lo:p.row_hi])) for p in parts]
        return _export_rows(self.export_path, self.model.row_dim, parts)


def _export_rows(path: str, row_dim: int, parts: list[TablePart]) -> list[torch.Tensor]:
    """Just these parts' rows from tables.parquet (sorted by (table, id), every row present)."""
    tables = sorted({p.table for p in parts})
    columns = pq.read_table(os.path.join(path, "tables.parquet"), columns=["table", "id", "value"],
                            filters=[("table", "in", tables)])
    table = columns.column("table").to_numpy()
    ids = columns.column("id").to_numpy()
    values = pc.list_flatten(columns.column("value")).to_numpy().reshape(-1, row_dim)
    out = []
    for p in parts:
        start = int(np.searchsorted(table, p.table))
        rows = values[start + p.row_lo:start + p.row_hi]
        if rows.shape[0] != p.rows or (p.rows and (ids[start + p.row_lo] != p.row_lo
                                                   or ids[start + p.row_hi - 1] != p.row_hi - 1)):
            raise ConfigError(f"{path}: table {p.table} lacks rows [{p.row_lo}, {p.row_hi}) in tables.parquet")
        out.append(torch.from_numpy(np.array(rows)))
    return out
