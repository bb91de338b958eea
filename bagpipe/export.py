"""A trained model, out: what inference loads (DESIGN.md section 9).

An export is a directory:

- ``model.json``: ``{"format": "bagpipe-model", "version": 1, "model": <ModelConfig>,
  "seed": int, "row_dim": int, "iteration": int, "files": {name: {"bytes", "sha256"}}}``
  (written last, under a temporary name: no model.json, no export);
- ``dense.npz``: the dense model's ``state_dict()``, one float32 array per name (NumPy's
  npz, read with ``allow_pickle=False``: loading never executes code from the file);
- ``tables.parquet``: every row of every table, columns ``table`` (int32), ``id``
  (int64) and ``value`` (fixed-size list of ``row_dim`` float32), sorted by (table, id).
  ``row_dim`` is ``embedding_dim`` plus one first-order column for wide_deep/deepfm
  (``ModelConfig.row_dim``).

Nothing in it depends on how the model was trained (mode, T, S, caches).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bagpipe.config import ConfigError, ModelConfig
from bagpipe.files import check_listed, fsync_dir, listing, read_manifest, write_atomic, write_json_atomic

FORMAT = "bagpipe-model"
VERSION = 1


class ExportError(ValueError):
    """An export that is missing, incomplete, corrupt or of another format."""


@dataclass
class ExportedModel:
    model: ModelConfig
    seed: int
    iteration: int
    dense_state: dict[str, torch.Tensor]
    tables: list[np.ndarray]  # per table: float32 [cardinality, row_dim]

    def build(self) -> torch.nn.Module:
        """The dense model with the exported weights loaded."""
        from bagpipe.models import build_model

        module = build_model(self.model, self.seed)
        module.load_state_dict(self.dense_state)
        return module


def write_export(out: str, model: ModelConfig, seed: int, iteration: int, dense_state: dict[str, torch.Tensor],
                 keys: np.ndarray, values: np.ndarray) -> None:
    """Write an export from every row's key (bagpipe.rows.RowSpace) and value [n, row_dim]."""
    os.makedirs(out, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum(model.cardinalities)[:-1]]).astype(np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], np.ascontiguousarray(values[order], dtype=np.float32)
    if keys.size != sum(model.cardinalities) or np.any(keys != np.arange(keys.size)):
        raise ExportError(f"an export holds every row exactly once: got {keys.size} rows for "
                          f"{sum(model.cardinalities)}")
    table = (np.searchsorted(offsets, keys, side="right") - 1).astype(np.int32)
    flat = pa.array(values.ravel(), type=pa.float32())
    columns = pa.table({"table": table, "id": keys - offsets[table],
                        "value": pa.FixedSizeListArray.from_arrays(flat, model.row_dim)})
    arrays = {k: v.detach().cpu().numpy() for k, v in dense_state.items()}
    write_atomic(os.path.join(out, "tables.parquet"), lambda f: pq.write_table(columns, f))
    write_atomic(os.path.join(out, "dense.npz"), lambda f: np.savez(f, **arrays))
    manifest = {"format": FORMAT, "version": VERSION, "model": asdict(model), "seed": seed, "row_dim": model.row_dim,
                "iteration": iteration, "files": listing(out, ["tables.parquet", "dense.npz"])}
    write_json_atomic(os.path.join(out, "model.json"), manifest)  # last: no model.json, no export
    fsync_dir(out)


def read_export(path: str) -> ExportedModel:
    """Load and check an export (sizes and checksums of every file; no pickle)."""
    manifest_path = os.path.join(path, "model.json")
    if not os.path.isfile(manifest_path):
        raise ExportError(f"{path}: not a model export (no model.json)")
    manifest = read_manifest(manifest_path, FORMAT, VERSION, ExportError)
    try:
        model = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["model"].items()})
        files = manifest["files"]
    except (KeyError, TypeError, AttributeError, ConfigError) as err:
        raise ExportError(f"{manifest_path}: malformed: {err}") from err
    for name, want in files.items():
        check_listed(path, name, want, ExportError)
    with np.load(os.path.join(path, "dense.npz"), allow_pickle=False) as npz:
        dense_state = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    columns = pq.read_table(os.path.join(path, "tables.parquet"))
    table = columns.column("table").to_numpy()
    values = columns.column("value").combine_chunks().flatten().to_numpy().reshape(-1, model.row_dim)
    bounds = np.searchsorted(table, np.arange(len(model.cardinalities) + 1))
    tables = [values[bounds[t]:bounds[t + 1]] for t in range(len(model.cardinalities))]
    for t, (rows, card) in enumerate(zip(tables, model.cardinalities)):
        if rows.shape[0] != card:
            raise ExportError(f"{path}: table {t} has {rows.shape[0]} rows, the model says {card}")
    return ExportedModel(model, int(manifest["seed"]), int(manifest["iteration"]), dense_state, tables)


def export_checkpoint(checkpoint_path: str, out: str, overwrite: bool = False) -> ExportedModel:
    """`bagpipe export`: a training checkpoint (any mode, T and S) as an export."""
    from bagpipe.checkpoint import load_rows, open_checkpoint
    from bagpipe.config import RunConfig
    from bagpipe.placement import Placement

    ckpt = open_checkpoint(checkpoint_path)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty (give --overwrite to replace it)")
    cfg = RunConfig.from_dict(ckpt.config)
    keys, values, _ = load_rows(ckpt, Placement(1), 0)
    with np.load(ckpt.file("dense.npz"), allow_pickle=False) as npz:
        dense_state = {k[len("param/"):]: torch.from_numpy(npz[k].copy()) for k in npz.files if k.startswith("param/")}
    write_export(out, cfg.model, cfg.seed, ckpt.iterations, dense_state, keys, values)
    return read_export(out)
