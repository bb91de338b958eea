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

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bagpipe.config import ConfigError, ModelConfig

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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    files = {}
    for name, write in (("tables.parquet", lambda f: pq.write_table(columns, f)),
                        ("dense.npz", lambda f: np.savez(f, **arrays))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(out, name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        path = os.path.join(out, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "version": VERSION, "model": asdict(model), "seed": seed, "row_dim": model.row_dim,
                "iteration": iteration, "files": files}
    fd, tmp = tempfile.mkstemp(prefix=".model.json.", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(out, "model.json"))


def read_export(path: str) -> ExportedModel:
    """Load and check an export (sizes and checksums of every file; no pickle)."""
    manifest_path = os.path.join(path, "model.json")
    if not os.path.isfile(manifest_path):
        raise ExportError(f"{path}: not a model export (no model.json)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ExportError(f"{manifest_path}: format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        model = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["model"].items()})
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise ExportError(f"{manifest_path}: malformed: {err}") from err
    for name, want in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) != want["bytes"] or _sha256(file) != want["sha256"]:
            raise ExportError(f"{file}: missing, truncated or changed since it was exported (size or checksum "
                              f"differs from model.json)")
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
