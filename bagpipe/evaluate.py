"""`bagpipe evaluate`: score a dataset with a trained model (a checkpoint or an export).

The same evaluation a run makes at its end (trainers.common.evaluate: AUC, logloss,
the eval labels' positive rate) over the same batches (the dataset's eval split, the
run's batch size and eval-batch limit unless given), so a checkpoint's scores can be
checked against the run that wrote it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from bagpipe.config import ConfigError
from bagpipe.datasets.reader import BatchReader, check_compatible, split_parts
from bagpipe.datasets.format import read_meta
from bagpipe.rows import RowSpace


def load_model(path: str):
    """(ModelConfig, dense module, all rows [total_rows, row_dim], default eval settings:
    batch size, eval batches, data, trainers) from a checkpoint or an export directory."""
    from bagpipe.checkpoint import MANIFEST, load_rows, open_checkpoint
    from bagpipe.config import RunConfig
    from bagpipe.export import read_export
    from bagpipe.models import build_model
    from bagpipe.placement import Placement

    if os.path.exists(os.path.join(path, MANIFEST)):
        ckpt = open_checkpoint(path)
        cfg = RunConfig.from_dict(ckpt.config)
        model = build_model(cfg.model, cfg.seed)
        with np.load(ckpt.file("dense.npz"), allow_pickle=False) as npz:
            model.load_state_dict({k[len("param/"):]: torch.from_numpy(npz[k].copy())
                                   for k in npz.files if k.startswith("param/")})
        _, values, _ = load_rows(ckpt, Placement(1), 0)
        return cfg.model, model, values, (cfg.data.batch_size, cfg.data.eval_batches, cfg.data.path,
                                          cfg.cluster.trainers)
    exported = read_export(path)
    return exported.model, exported.build(), np.concatenate(exported.tables), (None, None, None, 1)


def evaluate_saved(path: str, data: str | None = None, batch_size: int | None = None,
                   eval_batches: int | None = None, trainers: int | None = None) -> dict:
    """`trainers`: score each batch in that many slices, as a run of that many trainers
    does (default: the checkpoint's run; 1 for an export), so the figures are the run's bits."""
    from bagpipe.trainers.common import evaluate

    model_cfg, model, values, (run_batch, run_eval_batches, run_data, run_trainers) = load_model(path)
    trainers = trainers or run_trainers
    data = data or run_data
    if not data:
        raise ConfigError(f"{path}: an export does not know its data: give --data")
    _, eval_parts = split_parts(data)
    if not eval_parts:
        raise ConfigError(f"{data}: no eval split (a dataset's last part; this one has one part)")
    meta = read_meta(eval_parts[0])
    check_compatible(meta, model_cfg.num_dense, model_cfg.cardinalities, where=data,
                     feature_tables=model_cfg.feature_tables)
    batch_size = batch_size or run_batch or 2048
    if trainers < 1 or batch_size % trainers:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by --trainers {trainers}")
    rows = RowSpace.for_model(model_cfg, 0)
    table = torch.from_numpy(values)
    batches = BatchReader(eval_parts, batch_size, max_batches=eval_batches if eval_batches else run_eval_batches)
    model.eval()
    return evaluate(model, rows, batches, lambda keys: table.index_select(0, torch.from_numpy(keys)),
                    model_cfg.feature_poolings, trainers)
