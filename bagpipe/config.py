"""Typed run configuration, resolved once and written to the run directory.

Everything that defines a run's meaning (DESIGN.md section 2) lives here, so that
two runs with equal configs (bar mode and placement knobs) must give equal digests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Mode(str, Enum):
    """Where rows live and who applies the sparse optimizer (DESIGN.md section 2)."""

    LOCAL = "local"  # one process, full tables: the reference
    NONE = "none"  # embedding servers, no cache: the baseline
    BAGPIPE = "bagpipe"  # servers + oracle-driven trainer caches

    def __str__(self) -> str:
        return self.value


class OptimizerKind(str, Enum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"  # sparse rows only

    def __str__(self) -> str:
        return self.value


class LRScheduleKind(str, Enum):
    CONSTANT = "constant"
    WARMUP = "warmup"  # linear warmup, then constant
    DLRM = "dlrm"  # the DLRM reference's: linear warmup, constant, then polynomial (power 2) decay to zero

    def __str__(self) -> str:
        return self.value


MODELS = ("dlrm", "dcn", "wide_deep", "deepfm")
MODES = tuple(m.value for m in Mode)
OPTIMIZERS = tuple(o.value for o in OptimizerKind)
DENSE_OPTIMIZERS = (OptimizerKind.SGD.value, OptimizerKind.ADAGRAD.value)
LR_SCHEDULES = tuple(k.value for k in LRScheduleKind)


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work starts."""


def _enum(kind, value, what: str):
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} unknown; expected one of {', '.join(k.value for k in kind)}") from None


@dataclass(frozen=True)
class CacheSize:
    """The one spelling of a cache capacity, everywhere (train, simulate, bench):
    ``R`` owned rows per trainer, ``P%`` of all rows (the trainers' caches together),
    or ``unlimited``."""

    rows: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: "str | int | None", what: str = "--cache-rows") -> "CacheSize":
        if text is None:
            return cls()
        if isinstance(text, int):
            spec = str(text)
        else:
            spec = str(text).strip().lower()
        if spec == "unlimited":
            return cls()
        if spec.endswith("%"):
            try:
                percent = float(spec[:-1])
            except ValueError:
                percent = float("nan")
            if not 0 < percent <= 100:
                raise ConfigError(f"{what}: {text!r} is not a percentage in (0, 100]")
            return cls(percent=percent)
        try:
            rows = int(spec)
        except ValueError:
            raise ConfigError(f"{what}: expected R (rows per trainer), P% (of all rows) or 'unlimited', "
                              f"got {text!r}") from None
        if rows < 1:
            raise ConfigError(f"{what}: rows per trainer must be >= 1, got {rows}")
        return cls(rows=rows)

    @property
    def unlimited(self) -> bool:
        return self.rows is None and self.percent is None

    def rows_per_trainer(self, total_rows: int, trainers: int) -> int | None:
        """Owned rows per trainer; None when unlimited."""
        if self.rows is not None:
            return self.rows
        if self.percent is not None:
            return max(1, math.ceil(self.percent / 100.0 * total_rows / trainers))
        return None

    def __str__(self) -> str:
        if self.rows is not None:
            return str(self.rows)
        if self.percent is not None:
            return f"{self.percent:g}%"
        return "unlimited"


POOLINGS = ("sum", "mean")


@dataclass(frozen=True)
class TableConfig:
    """One embedding table, as TorchRec's EmbeddingBagConfig: its rows, how a bag of its
    rows pools into one vector (sum or mean; an empty bag is zeros), and the sparse
    features that read it (one table may serve several). The row width is the model's."""

    name: str
    num_embeddings: int
    feature_names: tuple[str, ...] = ()
    pooling: str = "sum"

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", tuple(self.feature_names) or (self.name,))
        if self.num_embeddings < 1:
            raise ConfigError(f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"table {self.name!r}: pooling {self.pooling!r}, expected one of {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the dense network and its tables; embedding storage is not part of it.

    `tables` (typed, one per embedding table) and `features` (the sparse features in
    data order; default: every table's features in table order) define what the model
    reads; `multi_hot` names the features whose examples carry bags of ids. Giving only
    `cardinalities` means one one-hot table per feature (C1, C2, ...)."""

    name: str = "dlrm"
    num_dense: int = 13
    cardinalities: tuple[int, ...] = ()  # per table (derived from `tables` when given)
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)  # ends in embedding_dim (dlrm; dcn with cross_input="bottom")
    top_mlp: tuple[int, ...] = (64, 32)
    cross_layers: int = 2  # dcn only
    deep_mlp: tuple[int, ...] = (64, 32)  # wide_deep, deepfm; dcn: the MLP after the cross network
    cross_rank: int | None = None  # dcn: low-rank cross layers (W = U V^T of this rank); None: full rank
    cross_input: str = "raw"  # dcn: what joins the embeddings in the cross network: raw dense features or "bottom"
    tables: tuple[TableConfig, ...] = ()
    features: tuple[str, ...] = ()
    multi_hot: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tables = tuple(t if isinstance(t, TableConfig) else TableConfig(**t) for t in self.tables)
        if not tables:
            tables = tuple(TableConfig(f"C{i + 1}", int(c)) for i, c in enumerate(self.cardinalities))
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "cardinalities", tuple(int(t.num_embeddings) for t in tables))
        features = tuple(self.features) or tuple(f for t in tables for f in t.feature_names)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "multi_hot", tuple(self.multi_hot))
        readers = [f for t in tables for f in t.feature_names]
        if sorted(readers) != sorted(features) or len(set(readers)) != len(readers):
            raise ConfigError(f"every sparse feature must be read by exactly one table: features {list(features)}, "
                              f"tables read {readers}")
        if set(self.multi_hot) - set(features):
            raise ConfigError(f"multi-hot features {sorted(set(self.multi_hot) - set(features))} are not features")
        if self.name not in MODELS:
            raise ConfigError(f"model {self.name!r} unknown; expected one of {', '.join(MODELS)}")
        if self.embedding_dim <= 0:
            raise ConfigError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.cross_rank is not None and self.cross_rank < 1:
            raise ConfigError(f"--cross-rank must be >= 1, got {self.cross_rank}")
        if self.cross_input not in ("raw", "bottom"):
            raise ConfigError(f"cross_input must be 'raw' or 'bottom', got {self.cross_input!r}")
        if self.name == "dlrm" and self.num_dense and self.bottom_mlp and self.bottom_mlp[-1] != self.embedding_dim:
            raise ConfigError(
                f"dlrm: the bottom MLP must end in embedding_dim={self.embedding_dim} "
                f"(dot interaction), got {list(self.bottom_mlp)}"
            )

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    @property
    def num_features(self) -> int:
        """Sparse features: the pooled vectors the dense network sees per example."""
        return len(self.features)

    @property
    def feature_tables(self) -> tuple[int, ...]:
        owner = {f: i for i, t in enumerate(self.tables) for f in t.feature_names}
        return tuple(owner[f] for f in self.features)

    @property
    def feature_poolings(self) -> tuple[str, ...]:
        return tuple(self.tables[t].pooling for t in self.feature_tables)

    @property
    def row_dim(self) -> int:
        """Floats per stored row: models with a first-order (wide/FM) term keep
        that scalar weight as one extra column of the same row."""
        return self.embedding_dim + (1 if self.name in ("wide_deep", "deepfm") else 0)


# named model shapes (`--preset`); ModelConfig fields
PRESETS: dict[str, dict[str, Any]] = {
    # MLPerf Training's DLRM-DCNv2 (Criteo 1TB, multi-hot): the model's shape, not its table sizes
    "mlperf-dcnv2": {"name": "dcn", "embedding_dim": 128, "bottom_mlp": (512, 256, 128), "cross_layers": 3,
                     "cross_rank": 512, "cross_input": "bottom", "deep_mlp": (1024, 1024, 512, 256)},
}
# ... and the optimizer it trains with unless flags say otherwise: the reference's Adagrad, at 0.001 (its
# 0.005 is for batches of 65,536; at the small batches and tables of one machine it blows up the loss)
PRESET_OPTIMIZERS: dict[str, dict[str, Any]] = {"mlperf-dcnv2": {"optimizer": "adagrad", "lr": 0.001}}
DEFAULT_OPTIMIZER = {"optimizer": "sgd", "lr": 0.1}


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate multiplier as a pure function of the iteration number, shared
    by the sparse and dense optimizers and by every mode and role (DESIGN.md section 2:
    the rate comes from the iteration's number, not from when the update runs).

    `warmup`: iteration i < W runs at (i + 1) / W of the base rate. `dlrm` (the DLRM
    reference's shape) adds a decay: from `decay_start`, ((decay_iters - k) /
    decay_iters)^2 at the k-th iteration of the span, then zero."""

    kind: LRScheduleKind = LRScheduleKind.CONSTANT
    warmup_iters: int = 0
    decay_start: int = 0
    decay_iters: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum(LRScheduleKind, self.kind, "--lr-schedule"))
        for name in ("warmup_iters", "decay_start", "decay_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        kind = self.kind
        if kind is LRScheduleKind.CONSTANT and (self.warmup_iters or self.decay_iters):
            raise ConfigError("--lr-schedule constant takes no --warmup-iters or --decay-iters "
                              "(use --lr-schedule warmup or dlrm)")
        if kind is LRScheduleKind.WARMUP and (self.warmup_iters < 1 or self.decay_iters):
            raise ConfigError("--lr-schedule warmup needs --warmup-iters >= 1 and no decay (use dlrm to decay)")
        if kind is LRScheduleKind.DLRM:
            if self.decay_iters < 1:
                raise ConfigError("--lr-schedule dlrm needs --decay-iters >= 1")
            if self.decay_start < self.warmup_iters:
                raise ConfigError(f"--decay-start {self.decay_start} is inside the warmup (--warmup-iters "
                                  f"{self.warmup_iters}): the warmup must end before the decay starts")

    @classmethod
    def resolve(cls, kind: str | None, warmup_iters: int, decay_start: int | None, decay_iters: int) -> "LRSchedule":
        """From the command line: without --lr-schedule, the flags given pick the shape."""
        if kind is None:
            kind = "dlrm" if decay_iters else ("warmup" if warmup_iters else "constant")
        if decay_start is None:
            decay_start = warmup_iters
        return cls(kind, warmup_iters, decay_start, decay_iters)

    def scale(self, iteration: int) -> float:
        if self.kind is LRScheduleKind.CONSTANT:
            return 1.0
        if iteration < self.warmup_iters:
            return (iteration + 1) / self.warmup_iters
        if self.kind is LRScheduleKind.DLRM and iteration >= self.decay_start:
            done = iteration - self.decay_start
            return ((self.decay_iters - done) / self.decay_iters) ** 2 if done < self.decay_iters else 0.0
        return 1.0


@dataclass(frozen=True)
class OptimizerConfig:
    """Sparse (row) and dense optimizers; the learning rate depends only on the
    iteration number (DESIGN.md section 2)."""

    sparse: OptimizerKind = OptimizerKind.SGD
    sparse_lr: float = 0.1
    dense: OptimizerKind = OptimizerKind.SGD
    dense_lr: float = 0.1
    eps: float = 1e-10
    initial_accumulator: float = 0.0
    schedule: LRSchedule = field(default_factory=LRSchedule)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse", _enum(OptimizerKind, self.sparse, "sparse optimizer"))
        object.__setattr__(self, "dense", _enum(OptimizerKind, self.dense, "dense optimizer"))
        if self.dense is OptimizerKind.ROWWISE_ADAGRAD:
            raise ConfigError("rowwise_adagrad is a sparse (row) optimizer; use sgd or adagrad for --dense-optimizer")
        if self.initial_accumulator < 0:
            raise ConfigError(f"--initial-accumulator must be >= 0, got {self.initial_accumulator}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if isinstance(self.schedule, dict):  # from config.json
            object.__setattr__(self, "schedule", LRSchedule(**self.schedule))
        for name in ("sparse_lr", "dense_lr"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def sparse_lr_at(self, iteration: int) -> float:
        return self.sparse_lr * self.schedule.scale(iteration)

    def dense_lr_at(self, iteration: int) -> float:
        return self.dense_lr * self.schedule.scale(iteration)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    batch_size: int = 2048
    eval_path: str | None = None  # default: the dataset's last part, when it has several
    eval_batches: int | None = None  # None: the whole eval split
    shuffle_seed: int | None = None  # seeded shuffle of row-group order


@dataclass(frozen=True)
class ClusterConfig:
    mode: Mode = Mode.LOCAL
    trainers: int = 1
    servers: int = 1
    lookahead: int = 32
    prefetch_distance: int | None = None
    cache_rows: int | None = None  # owned rows per trainer (resolved from a CacheSize); None: unlimited
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum(Mode, self.mode, "mode"))
        if self.cache_rows is not None and self.cache_rows < 1:
            raise ConfigError(f"--cache-rows must be >= 1 rows per trainer, got {self.cache_rows}")
        if self.prefetch_distance is not None and not 1 <= self.prefetch_distance <= self.lookahead:
            raise ConfigError(f"--prefetch-distance must be in [1, --lookahead={self.lookahead}], "
                              f"got {self.prefetch_distance}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout_s}")
        if self.trainers < 1:
            raise ConfigError(f"--trainers must be >= 1, got {self.trainers}")
        if self.servers < 1:
            raise ConfigError(f"--servers must be >= 1, got {self.servers}")
        if self.lookahead < 1:
            raise ConfigError(f"--lookahead must be >= 1, got {self.lookahead}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where a job saves its state (DESIGN.md section 9), and which to resume."""

    every: int | None = None  # iterations between checkpoints; None: only the final one
    dir: str | None = None  # default RUN_DIR/checkpoints
    keep: int = 2  # complete checkpoints kept (older ones go once a newer one is complete)
    final: bool = True  # a successful run ends with a checkpoint
    resume: str | None = None  # "latest" or a checkpoint directory

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1, got {self.keep}")

    def root(self, run_dir: str) -> str:
        return self.dir or os.path.join(run_dir, "checkpoints")

    def after(self, iteration: int, last: int) -> bool:
        """Is a checkpoint taken after (0-based, absolute) `iteration`, `last` the final one?"""
        if iteration == last and self.final:
            return True
        return self.every is not None and (iteration + 1) % self.every == 0


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0
    iters: int | None = None  # None: one pass over the training split (times `epochs`)
    epochs: int | None = None  # passes over the training split (exclusive with iters)
    eval_every: int | None = None  # also evaluate after every K-th iteration (read-only stages)
    run_dir: str = "runs/default"
    threads: int = 1  # torch threads per process; bits are only promised at equal thread counts
    tensorboard: str | None = None  # also write scalars here (bagpipe[tensorboard])
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    overwrite: bool = False  # start fresh in a run directory that holds another run

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, dict):  # from config.json
            object.__setattr__(self, "checkpoint", CheckpointConfig(**self.checkpoint))
        if self.overwrite and self.checkpoint.resume:
            raise ConfigError("--overwrite starts afresh and --resume continues: give one of them")
        batch, trainers = self.data.batch_size, self.cluster.trainers
        if batch <= 0:
            raise ConfigError(f"--batch-size must be positive, got {batch}")
        if batch % trainers != 0:
            raise ConfigError(f"--batch-size {batch} is not divisible by --trainers {trainers}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"--iters must be >= 1, got {self.iters}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.epochs is not None and self.iters is not None:
            raise ConfigError("give --iters or --epochs, not both")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1, got {self.eval_every}")

    def evaluates_after(self, iteration: int) -> bool:
        """Does an evaluation interrupt training after (0-based, absolute) `iteration`?
        (Every run also evaluates after its last iteration.)"""
        return self.eval_every is not None and iteration >= 0 and (iteration + 1) % self.eval_every == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        def tuples(d: dict[str, Any]) -> dict[str, Any]:  # JSON lists back to tuples
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            model=ModelConfig(**tuples(raw["model"])),  # (tables: dicts, rebuilt by ModelConfig)
            optimizer=OptimizerConfig(**raw["optimizer"]),
            data=DataConfig(**raw["data"]),
            cluster=ClusterConfig(**raw["cluster"]),
            **{k: v for k, v in raw.items() if k not in ("model", "optimizer", "data", "cluster")},
        )
