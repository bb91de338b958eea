"""Entry point of a training job: `bagpipe train ...` or `python -m bagpipe.train ...`.

Resolves the config from the command line and the dataset's metadata, then runs
the mode. Bad configuration fails here, before any work, with one message.
"""

from __future__ import annotations

import argparse
import os
import sys

from bagpipe.config import ClusterConfig, ConfigError, DataConfig, ModelConfig, OptimizerConfig, RunConfig
from bagpipe.datasets.format import DatasetError, read_meta
from bagpipe.datasets.reader import split_parts


def ensure_default_data(path: str) -> str:
    """The embedded default workload: synthetic Criteo-like data, generated once."""
    if not os.path.isdir(path):
        from bagpipe.datasets.synthetic import generate_synthetic

        print(f"generating the default synthetic dataset in {path} ...", file=sys.stderr)
        generate_synthetic(out=path, rows=200_000, seed=0, table_scale=0.01)
    return path


def resolve_config(args: argparse.Namespace) -> RunConfig:
    data_path = args.data or ensure_default_data(os.path.join("data", "synthetic-default"))
    train_parts, _ = split_parts(data_path, args.eval_data)
    meta = read_meta(train_parts[0])
    bottom = args.bottom_mlp if args.bottom_mlp is not None else (64, args.embedding_dim)
    model = ModelConfig(
        name=args.model,
        num_dense=meta.num_dense,
        cardinalities=tuple(meta.cardinalities),
        embedding_dim=args.embedding_dim,
        bottom_mlp=bottom if meta.num_dense else (),
        top_mlp=args.top_mlp,
        cross_layers=args.cross_layers,
        deep_mlp=args.deep_mlp,
    )
    lr = args.lr
    optimizer = OptimizerConfig(
        sparse=args.optimizer,
        sparse_lr=args.sparse_lr if args.sparse_lr is not None else lr,
        dense=args.dense_optimizer or ("adagrad" if args.optimizer != "sgd" else "sgd"),
        dense_lr=args.dense_lr if args.dense_lr is not None else lr,
        warmup_iters=args.warmup_iters,
    )
    data = DataConfig(
        path=data_path,
        batch_size=args.batch_size,
        eval_path=args.eval_data,
        eval_batches=args.eval_batches,
        shuffle_seed=args.shuffle_seed,
    )
    cluster = ClusterConfig(
        mode=args.mode,
        trainers=args.trainers,
        servers=args.servers,
        lookahead=args.lookahead,
        prefetch_distance=args.prefetch_distance,
        cache_rows=args.cache_rows,
        device=args.device,
        timeout_s=args.timeout,
    )
    return RunConfig(
        model=model,
        optimizer=optimizer,
        data=data,
        cluster=cluster,
        seed=args.seed,
        iters=args.iters,
        eval_every=args.eval_every,
        run_dir=args.run_dir or os.path.join("runs", args.mode),
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = resolve_config(args)
        if cfg.cluster.mode == "local":
            return _run_local(cfg)
        raise ConfigError(f"--mode {cfg.cluster.mode} is not available yet")
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run_local(cfg: RunConfig) -> int:
    import torch

    from bagpipe.metrics import RunWriter
    from bagpipe.trainers.data import RunData
    from bagpipe.trainers.local import train_local

    torch.set_num_threads(1)
    data = RunData.open(cfg)
    writer = RunWriter(cfg.run_dir, cfg.to_dict())
    try:
        summary = train_local(cfg, data, writer)
    finally:
        writer.close()
    writer.summary(summary)
    print(
        f"{cfg.run_dir}: {summary['iters']} iterations, {summary['samples_per_s']:.0f} samples/s, "
        f"final loss {summary['final_loss']:.4f}, eval AUC {summary['auc']:.4f}, logloss {summary['logloss']:.4f}, "
        f"digest {summary['digest']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from bagpipe.cli import add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m bagpipe.train")
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
