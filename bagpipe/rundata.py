"""Which batches a run trains and evaluates on, resolved once from the config and checked
against the model before any process group forms.

Training may span several passes over the training split (`--epochs`, or an `--iters`
beyond one pass): iteration i reads batch i mod P of epoch i // P (P batches per pass,
a partial last batch dropped each pass). Every epoch reads in the same order, or with
`--shuffle-seed S` in the seeded order S + e, so the whole run is one fixed sequence the
oracle plans across epoch boundaries (caches are not flushed between epochs)."""

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
    num_train_batches: int  # over every epoch
    eval_batch_count: int | None
    shuffle_seed: int | None = None
    batches_per_epoch: int = 0

    @classmethod
    def open(cls, cfg: RunConfig) -> "RunData":
        """Check data against the model and count batches; raises before training."""
        train_parts, eval_parts = split_parts(cfg.data.path, cfg.data.eval_path)
        meta = read_meta(train_parts[0])
        check_compatible(meta, cfg.model.num_dense, cfg.model.cardinalities, where=cfg.data.path,
                         feature_tables=cfg.model.feature_tables)
        check_id_ranges(train_parts + eval_parts, meta)
        available = num_batches(train_parts, cfg.data.batch_size)
        if available == 0:
            raise ConfigError(
                f"{cfg.data.path}: fewer training rows than one global batch of {cfg.data.batch_size}"
            )
        iters = cfg.iters if cfg.iters is not None else available * (cfg.epochs or 1)
        return cls(meta, train_parts, eval_parts, cfg.data.batch_size, iters, cfg.data.eval_batches,
                   cfg.data.shuffle_seed, available)

    @property
    def epochs(self) -> int:
        return -(-self.num_train_batches // self.batches_per_epoch)

    def train_batches(self, columns: str = "all", start_batch: int = 0, slice_of: tuple[int, int] = (0, 1)):
        """Global batches in training order from `start_batch` (indexed by iteration, across
        epochs), or with `slice_of=(k, T)` only trainer k's slices."""
        per_epoch = self.batches_per_epoch or self.num_train_batches
        epoch, first = divmod(start_batch, per_epoch)
        remaining = self.num_train_batches - start_batch
        while remaining > 0:
            seed = None if self.shuffle_seed is None else self.shuffle_seed + epoch
            take = min(remaining, per_epoch - first)
            for batch in BatchReader(self.train_parts, self.batch_size, columns=columns, shuffle_seed=seed,
                                     start_batch=first, max_batches=take, slice_of=slice_of):
                batch.index += epoch * per_epoch
                yield batch
            remaining -= take
            epoch, first = epoch + 1, 0

    def eval_batches(self, columns: str = "all", slice_of: tuple[int, int] = (0, 1)):
        if not self.eval_parts:
            return iter(())
        return BatchReader(self.eval_parts, self.batch_size, columns=columns, max_batches=self.eval_batch_count,
                           slice_of=slice_of)
