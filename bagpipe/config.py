"""Typed run configuration, resolved once and written to the run directory.

Everything that defines a run's meaning (DESIGN.md section 2) lives here, so that
two runs with equal configs (bar mode and placement knobs) must give equal digests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODELS = ("dlrm", "dcn", "wide_deep", "deepfm")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
MODES = ("local", "none", "bagpipe")


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work starts."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the dense network; embedding storage is not part of the model."""

    name: str = "dlrm"
    num_dense: int = 13
    cardinalities: tuple[int, ...] = ()
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)  # ends in embedding_dim (dlrm)
    top_mlp: tuple[int, ...] = (64, 32)
    cross_layers: int = 2  # dcn only
    deep_mlp: tuple[int, ...] = (64, 32)  # wide_deep, deepfm

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"model {self.name!r} unknown; expected one of {', '.join(MODELS)}")
        if self.embedding_dim <= 0:
            raise ConfigError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if any(c <= 0 for c in self.cardinalities):
            raise ConfigError(f"every table cardinality must be positive, got {list(self.cardinalities)}")
        if self.name == "dlrm" and self.num_dense and self.bottom_mlp and self.bottom_mlp[-1] != self.embedding_dim:
            raise ConfigError(
                f"dlrm: the bottom MLP must end in embedding_dim={self.embedding_dim} "
                f"(dot interaction), got {list(self.bottom_mlp)}"
            )

    @property
    def num_tables(self) -> int:
        return len(self.cardinalities)

    @property
    def row_dim(self) -> int:
        """Floats per stored row: models with a first-order (wide/FM) term keep
        that scalar weight as one extra column of the same row."""
        return self.embedding_dim + (1 if self.name in ("wide_deep", "deepfm") else 0)


@dataclass(frozen=True)
class OptimizerConfig:
    """Sparse (row) and dense optimizers; the learning rate depends only on the
    iteration number (DESIGN.md section 2)."""

    sparse: str = "sgd"
    sparse_lr: float = 0.1
    dense: str = "sgd"
    dense_lr: float = 0.1
    eps: float = 1e-10
    initial_accumulator: float = 0.0
    warmup_iters: int = 0

    def __post_init__(self) -> None:
        for kind in (self.sparse, self.dense):
            if kind not in OPTIMIZERS:
                raise ConfigError(f"optimizer {kind!r} unknown; expected one of {', '.join(OPTIMIZERS)}")
        if self.dense == "rowwise_adagrad":
            raise ConfigError("rowwise_adagrad is a sparse (row) optimizer; use sgd or adagrad for --dense-optimizer")

    def sparse_lr_at(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.sparse_lr * (iteration + 1) / self.warmup_iters
        return self.sparse_lr

    def dense_lr_at(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.dense_lr * (iteration + 1) / self.warmup_iters
        return self.dense_lr


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    batch_size: int = 2048
    eval_path: str | None = None  # default: the dataset's last part, when it has several
    eval_batches: int | None = None  # None: the whole eval split
    shuffle_seed: int | None = None  # seeded shuffle of row-group order


@dataclass(frozen=True)
class ClusterConfig:
    mode: str = "local"
    trainers: int = 1
    servers: int = 1
    lookahead: int = 32
    prefetch_distance: int | None = None
    cache_rows: int | None = None
    device: str = "cpu"
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} unknown; expected one of {', '.join(MODES)}")
        if self.trainers < 1:
            raise ConfigError(f"--trainers must be >= 1, got {self.trainers}")
        if self.servers < 1:
            raise ConfigError(f"--servers must be >= 1, got {self.servers}")
        if self.lookahead < 1:
            raise ConfigError(f"--lookahead must be >= 1, got {self.lookahead}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0
    iters: int | None = None  # None: one pass over the training split
    eval_every: int | None = None
    run_dir: str = "runs/default"
    log_every: int = 1
    threads: int = 1  # torch threads per process; bits are only promised at equal thread counts

    def __post_init__(self) -> None:
        batch, trainers = self.data.batch_size, self.cluster.trainers
        if batch <= 0:
            raise ConfigError(f"--batch-size must be positive, got {batch}")
        if batch % trainers != 0:
            raise ConfigError(f"--batch-size {batch} is not divisible by --trainers {trainers}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.eval_every and self.cluster.mode != "local":
            raise ConfigError(
                f"--eval-every works in local mode only for now; --mode {self.cluster.mode} evaluates once, "
                f"after training (drop --eval-every)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        def tuples(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            model=ModelConfig(**tuples(raw["model"])),
            optimizer=OptimizerConfig(**raw["optimizer"]),
            data=DataConfig(**raw["data"]),
            cluster=ClusterConfig(**raw["cluster"]),
            **{k: v for k, v in raw.items() if k not in ("model", "optimizer", "data", "cluster")},
        )
