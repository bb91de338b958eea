"""Entry point of a training job: `bagpipe train ...` or `python -m bagpipe.train ...`.

Resolves the config from the command line and the dataset's metadata, then runs
the mode. Bad configuration fails here, before any work, with one message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bagpipe.config import (DENSE_OPTIMIZERS, LR_SCHEDULES, MODELS, MODES, OPTIMIZERS, CacheSize, ClusterConfig,
                            CheckpointConfig, ConfigError, DataConfig, LRSchedule, Mode, ModelConfig, OptimizerConfig,
                            DEFAULT_OPTIMIZER, PRESET_OPTIMIZERS, PRESETS, RunConfig, TableConfig)
from bagpipe.datasets.format import DatasetError, read_meta
from bagpipe.datasets.reader import split_parts


DEFAULT_DATA = os.path.join("data", "synthetic-default")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="local")
    p.add_argument("--data", default=None,
                   help="dataset directory (default: the embedded synthetic workload, generated once in "
                        "data/synthetic-default)")
    p.add_argument("--eval-data", default=None, help="eval file or directory (default: the dataset's last part)")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate on at most this many batches")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named model shape (flags given as well override its values), e.g. mlperf-dcnv2: "
                        "MLPerf's DLRM-DCNv2 (bottom 512-256-128, dim 128, 3 low-rank cross layers of rank 512, "
                        "top 1024-1024-512-256-1)")
    p.add_argument("--model", choices=MODELS, default=None, help="default: dlrm")
    p.add_argument("--embedding-dim", type=int, default=None, help="default: 16")
    p.add_argument("--bottom-mlp", type=_ints, default=None, help="default: 64,<embedding-dim>")
    p.add_argument("--top-mlp", type=_ints, default=None, help="default: 64,32")
    p.add_argument("--deep-mlp", type=_ints, default=None, help="default: 64,32 (dcn: the MLP after the cross network)")
    p.add_argument("--cross-layers", type=int, default=None, help="dcn: default 2")
    p.add_argument("--cross-rank", type=int, default=None, help="dcn: low-rank cross layers of this rank")
    p.add_argument("--cross-input", choices=("raw", "bottom"), default=None,
                   help="dcn: the cross network reads the raw dense features (default) or a bottom MLP's output")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--iters", type=int, default=None, help="default: one pass over the training split")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the training split (instead of --iters); with --shuffle-seed S, epoch e "
                        "reads in the seeded order S + e")
    p.add_argument("--run-dir", default=None, help="default: runs/<mode>")
    p.add_argument("--trainers", type=int, default=1)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="evaluate every K iterations (and after training): AUC, logloss, NE in metrics.jsonl")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="sparse (row) optimizer (default: sgd, or the --preset's)")
    p.add_argument("--dense-optimizer", choices=DENSE_OPTIMIZERS, default=None, help="default: like --optimizer")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of both optimizers unless overridden (default: 0.1, or the --preset's)")
    p.add_argument("--sparse-lr", type=float, default=None)
    p.add_argument("--dense-lr", type=float, default=None)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="learning-rate schedule of both optimizers (default: from the flags below: dlrm with "
                        "--decay-iters, warmup with --warmup-iters, else constant)")
    p.add_argument("--warmup-iters", type=int, default=0, help="linear warmup over this many iterations")
    p.add_argument("--decay-start", type=int, default=None,
                   help="dlrm schedule: first iteration of the decay (default: the end of the warmup)")
    p.add_argument("--decay-iters", type=int, default=0,
                   help="dlrm schedule: the polynomial (power 2) decay to zero spans this many iterations")
    p.add_argument("--initial-accumulator", type=float, default=0.0,
                   help="initial Adagrad accumulator of every row and dense parameter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-seed", type=int, default=None, help="seeded shuffle of row-group order")
    p.add_argument("--lookahead", type=int, default=32)
    p.add_argument("--prefetch-distance", type=int, default=None)
    p.add_argument("--cache-rows", default="unlimited",
                   help="bagpipe mode cache capacity: R owned rows per trainer, P%% of all rows (the trainers' "
                        "caches together), or 'unlimited'")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (digests are comparable only at equal thread counts)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer fails the job")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save a checkpoint every N iterations (default: only the final one)")
    p.add_argument("--checkpoint-dir", default=None, help="default: RUN_DIR/checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, metavar="K", help="complete checkpoints kept")
    p.add_argument("--no-final-checkpoint", action="store_true", help="do not save a checkpoint at the end")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the latest checkpoint of the run directory, or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds another run (its files are removed)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard scalars to DIR (needs the extra: pip install 'bagpipe[tensorboard]')")
    p.add_argument("--node-roles", default=None,
                   help="roles of this node's processes in a multi-node job, e.g. 'oracle=1,server=2' or 'trainer=2'")


def ensure_default_data(path: str = DEFAULT_DATA, wait_s: float = 600.0) -> str:
    """The embedded default workload: synthetic Criteo-like data, generated once.

    In a torchrun world only local rank 0 generates; the others wait for the
    directory, which appears complete (the generator renames a finished temp dir)."""
    if os.path.isdir(path):
        return path
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.monotonic() + wait_s
        while not os.path.isdir(path):
            if time.monotonic() > deadline:
                raise ConfigError(f"{path}: the default dataset did not appear within {wait_s:.0f} s")
            time.sleep(0.2)
        return path
    import fcntl

    from bagpipe.datasets.synthetic import generate_synthetic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(os.path.abspath(path) + ".lock", "w") as lock:  # two jobs racing: one generates, one waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(path):
            print(f"generating the default synthetic dataset in {path} ...", file=sys.stderr)
            generate_synthetic(out=path, rows=200_000, seed=0, table_scale=0.01)
    return path


def resolve_config(args: argparse.Namespace) -> RunConfig:
    data_path = args.data or ensure_default_data()
    train_parts, _ = split_parts(data_path, args.eval_data)
    meta = read_meta(train_parts[0])
    shape = dict(PRESETS[args.preset]) if args.preset else {}
    for field_name, value in (("name", args.model), ("embedding_dim", args.embedding_dim),
                              ("bottom_mlp", args.bottom_mlp), ("top_mlp", args.top_mlp), ("deep_mlp", args.deep_mlp),
                              ("cross_layers", args.cross_layers), ("cross_rank", args.cross_rank),
                              ("cross_input", args.cross_input)):
        if value is not None:
            shape[field_name] = value
    shape.setdefault("embedding_dim", 16)
    shape.setdefault("bottom_mlp", (64, shape["embedding_dim"]))
    if not meta.num_dense:
        shape["bottom_mlp"] = ()
    tables = tuple(TableConfig(t.name, t.cardinality, tuple(t.features), t.pooling) for t in meta.tables)
    model = ModelConfig(num_dense=meta.num_dense, tables=tables, features=tuple(meta.sparse_features),
                        multi_hot=tuple(meta.multi_hot), **shape)
    trained = {**DEFAULT_OPTIMIZER, **PRESET_OPTIMIZERS.get(args.preset, {})}
    sparse_optimizer = args.optimizer or trained["optimizer"]
    lr = args.lr if args.lr is not None else trained["lr"]
    optimizer = OptimizerConfig(
        sparse=sparse_optimizer,
        sparse_lr=args.sparse_lr if args.sparse_lr is not None else lr,
        dense=args.dense_optimizer or ("adagrad" if sparse_optimizer != "sgd" else "sgd"),
        dense_lr=args.dense_lr if args.dense_lr is not None else lr,
        schedule=LRSchedule.resolve(args.lr_schedule, args.warmup_iters, args.decay_start, args.decay_iters),
        initial_accumulator=args.initial_accumulator,
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
        cache_rows=CacheSize.parse(args.cache_rows).rows_per_trainer(sum(meta.cardinalities), args.trainers),
        timeout_s=args.timeout,
    )
    return RunConfig(
        model=model,
        optimizer=optimizer,
        data=data,
        cluster=cluster,
        seed=args.seed,
        iters=args.iters,
        epochs=args.epochs,
        eval_every=args.eval_every,
        run_dir=args.run_dir or os.path.join("runs", args.mode),
        threads=args.threads,
        tensorboard=args.tensorboard,
        checkpoint=CheckpointConfig(every=args.checkpoint_every, dir=args.checkpoint_dir, keep=args.keep_checkpoints,
                                    final=not args.no_final_checkpoint, resume=args.resume),
        overwrite=args.overwrite,
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = resolve_config(args)
        if cfg.cluster.mode is Mode.LOCAL:
            return _run_local(cfg)
        return _run_distributed(cfg, args.node_roles)
    except (ConfigError, DatasetError, ValueError) as err:
        # every rank of a torchrun job fails the same way; one message per node. The
        # other ranks linger a moment so torchrun doesn't stop local rank 0 before it prints.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        elif "RANK" in os.environ:
            time.sleep(3)
        return 2


def _summary_line(cfg: RunConfig, summary: dict) -> str:
    return (f"{cfg.run_dir}: {summary['iters']} iterations, {summary['samples_per_s']:.0f} samples/s, "
            f"final loss {summary['final_loss']:.4f}, eval AUC {summary['auc']:.4f}, "
            f"logloss {summary['logloss']:.4f}, digest {summary['digest']}")


def _run_local(cfg: RunConfig) -> int:
    import torch

    from bagpipe import lifecycle
    from bagpipe.rundata import RunData
    from bagpipe.rundir import RunWriter
    from bagpipe.trainers.local import train_local

    torch.set_num_threads(cfg.threads)
    data = RunData.open(cfg)
    run_lock = lifecycle.lock(cfg.run_dir)
    try:
        lifecycle.claim(cfg)
        resume = lifecycle.resume_point(cfg, data.num_train_batches)
        try:
            history = lifecycle.record_attempt(cfg.run_dir, resume.iterations if resume else None)
            writer = RunWriter(cfg.run_dir, cfg.to_dict(), tensorboard=cfg.tensorboard,
                               keep_below=resume.iterations if resume else 0)
            try:
                summary = train_local(cfg, data, writer, resume)
            finally:
                writer.close()
            summary.update(history, status="complete")
            writer.summary(summary)
            lifecycle.set_status(cfg.run_dir, "complete")
        except BaseException as err:
            lifecycle.mark_failed(cfg.run_dir, "local", f"{type(err).__name__}: {err}")
            raise
    finally:
        run_lock.release()
    print(_summary_line(cfg, summary))
    return 0


def _run_distributed(cfg: RunConfig, node_roles: str | None) -> int:
    """One role of a torchrun world. Everything that can be checked is checked
    before the process group forms, so bad input fails on every rank at once."""
    import torch
    import torch.distributed as dist

    from bagpipe import lifecycle, transport
    from bagpipe.rundata import RunData

    if "RANK" not in os.environ:
        raise ConfigError(
            f"--mode {cfg.cluster.mode} runs inside torchrun; use `bagpipe launch --trainers "
            f"{cfg.cluster.trainers} --servers {cfg.cluster.servers} -- ...` or torchrun --nproc-per-node "
            f"{cfg.cluster.trainers + cfg.cluster.servers + 1} -m bagpipe.train ..."
        )
    torch.set_num_threads(cfg.threads)
    data = RunData.open(cfg)
    role = transport.local_role(node_roles, cfg.cluster.servers, cfg.cluster.trainers)
    run_lock = None
    if role == "oracle":  # the run directory's one writer
        preflight(cfg, data)
        run_lock = lifecycle.lock(cfg.run_dir)
        lifecycle.claim(cfg)
    resume = lifecycle.resume_point(cfg, data.num_train_batches)
    history = lifecycle.record_attempt(cfg.run_dir, resume.iterations if resume else None) \
        if role == "oracle" else {}
    transport.init_world(cfg.cluster.timeout_s)
    desc = f"{role} (rank {dist.get_rank()})"
    roles = None
    try:
        roles = transport.gather_roles(role, cfg.cluster.servers, cfg.cluster.trainers)
        desc = roles.describe(dist.get_rank())
        groups = transport.make_groups(roles, cfg.cluster.timeout_s)
        name, index = roles.role_of(dist.get_rank())
        if name == "oracle":
            from bagpipe.oracle.process import run_oracle
            from bagpipe.rundir import read_summary

            run_oracle(cfg, roles, groups, data, start=resume.iterations if resume else 0, history=history)
            lifecycle.set_status(cfg.run_dir, "complete")
            print(_summary_line(cfg, read_summary(cfg.run_dir)))
        elif name == "server":
            from bagpipe.server import run_server

            run_server(cfg, roles, groups, index, resume)
        else:
            from bagpipe.trainers.runtime import TrainerRuntime

            runtime = TrainerRuntime(cfg, roles, groups, index, data, resume)
            if cfg.cluster.mode is Mode.NONE:
                from bagpipe.trainers.nocache import run_nocache_trainer

                run_nocache_trainer(runtime)
            else:
                from bagpipe.trainers.cached import run_cached_trainer

                run_cached_trainer(runtime)
    except BaseException as err:  # noqa: BLE001 - report and end this process now
        if role == "oracle":
            lifecycle.mark_failed(cfg.run_dir, desc, f"{type(err).__name__}: {err}")
        transport.fail_fast(desc, err, roles)
    if run_lock is not None:
        run_lock.release()
    dist.destroy_process_group()
    return 0


def preflight(cfg: RunConfig, data, budget_s: float = 10.0) -> None:
    """Checks that need the data, before any process group forms: a cache too small for
    two consecutive iterations is found now (within `budget_s`; said when cut short)."""
    if cfg.cluster.mode is not Mode.BAGPIPE or cfg.cluster.cache_rows is None:
        return
    from bagpipe.oracle.lrpp import PlanError, check_capacity
    from bagpipe.embedding import planner_keys
    from bagpipe.rows import RowSpace

    rows = RowSpace.for_model(cfg.model, cfg.seed, row_dim=1)
    batches = (planner_keys(b, rows) for b in data.train_batches(columns="sparse"))
    try:
        scan = check_capacity(batches, cfg.cluster.trainers, cfg.cluster.cache_rows, budget_s)
    except PlanError as err:
        raise ConfigError(str(err)) from None
    if scan.cut_short:
        print(f"bagpipe: the cache capacity pre-scan checked {scan.checked} of {data.num_train_batches} iterations "
              f"in {budget_s:.0f} s; the rest is checked as planning goes", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bagpipe.train")
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    from bagpipe.exits import exit_now

    exit_now(main())
