"""Which batches a run trains and evaluates on, resolved once from the config and checked
against the model before any process group forms."""

from __future__ import annotations

from dataclasses import dataclass

from bagpipe.config import ConfigError, RunConfig
from bagpipe.datasets.format import DatasetMeta, read_meta
from bagpipe.datasets.reader import BatchReader, check_compatible, check_id_ranges, num_batches, split_parts


@dataclass
class RunData:
    meta: DatasetMeta
    train_parts: list[str]
    eval_parts: list[str]
    batch_size: int
    num_train_batches: int
    eval_batch_count: int | None
    shuffle_seed: int | None = None

    @classmethod
    def open(cls, cfg: RunConfig) -> "RunData":
        """Check data against the model and count batches; raises before training."""
        train_parts, eval_parts = split_parts(cfg.data.path, cfg.data.eval_path)
        meta = read_meta(train_parts[0])
        check_compatible(meta, cfg.model.num_dense, cfg.model.cardinalities, where=cfg.data.path)
        check_id_ranges(train_parts + eval_parts, meta)
        available = num_batches(train_parts, cfg.data.batch_size)
        if available == 0:
            raise ConfigError(
                f"{cfg.data.path}: fewer training rows than one global batch of {cfg.data.batch_size}"
            )
        iters = available if cfg.iters is None else cfg.iters
        if iters > available:
            raise ConfigError(
                f"--iters {iters} needs {iters} batches of {cfg.data.batch_size}, "
                f"but {cfg.data.path} has {available}"
            )
        return cls(meta, train_parts, eval_parts, cfg.data.batch_size, iters, cfg.data.eval_batches,
                   cfg.data.shuffle_seed)

    def train_batches(self, columns: str = "all", start_batch: int = 0, slice_of: tuple[int, int] = (0, 1)):
        """Global batches in training order, or with `slice_of=(k, T)` only trainer k's slices."""
        return BatchReader(
            self.train_parts,
            self.batch_size,
            columns=columns,
            shuffle_seed=self.shuffle_seed,
            start_batch=start_batch,
            max_batches=self.num_train_batches - start_batch,
            slice_of=slice_of,
        )

    def eval_batches(self, columns: str = "all", slice_of: tuple[int, int] = (0, 1)):
        if not self.eval_parts:
            return iter(())
        return BatchReader(self.eval_parts, self.batch_size, columns=columns, max_batches=self.eval_batch_count,
                           slice_of=slice_of)
