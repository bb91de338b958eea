"""The `bagpipe` command: prepare, stats, train, compare (and more as they land)."""

from __future__ import annotations

import argparse
import sys

from bagpipe.config import MODELS, MODES, OPTIMIZERS


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
    p.add_argument("--model", choices=MODELS, default="dlrm")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--bottom-mlp", type=_ints, default=None, help="default: 64,<embedding-dim>")
    p.add_argument("--top-mlp", type=_ints, default=(64, 32))
    p.add_argument("--deep-mlp", type=_ints, default=(64, 32))
    p.add_argument("--cross-layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--iters", type=int, default=None, help="default: one pass over the training split")
    p.add_argument("--run-dir", default=None, help="default: runs/<mode>")
    p.add_argument("--trainers", type=int, default=1)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sparse (row) optimizer")
    p.add_argument("--dense-optimizer", choices=("sgd", "adagrad"), default=None, help="default: like --optimizer")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of both optimizers unless overridden")
    p.add_argument("--sparse-lr", type=float, default=None)
    p.add_argument("--dense-lr", type=float, default=None)
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-seed", type=int, default=None, help="seeded shuffle of row-group order")
    p.add_argument("--lookahead", type=int, default=32)
    p.add_argument("--prefetch-distance", type=int, default=None)
    p.add_argument("--cache-rows", type=int, default=None, help="owned rows per trainer (bagpipe mode)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (digests are comparable only at equal thread counts)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer fails the job")
    p.add_argument("--node-roles", default=None,
                   help="roles of this node's processes in a multi-node job, e.g. 'oracle=1,server=2' or 'trainer=2'")


def main(argv: list[str] | None = None) -> int:
    from bagpipe.datasets.cli import register as register_datasets
    from bagpipe.oracle.cli import register as register_oracle

    parser = argparse.ArgumentParser(prog="bagpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    register_datasets(sub)
    register_oracle(sub)

    train = sub.add_parser("train", help="train a model (local, or one role of a torchrun world)")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    launch = sub.add_parser("launch", help="run a distributed job on this machine under torchrun")
    launch.add_argument("--trainers", type=int, default=2)
    launch.add_argument("--servers", type=int, default=1)
    launch.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `bagpipe train` arguments")
    launch.set_defaults(func=_cmd_launch)

    bench = sub.add_parser("bench", help="benchmark local, none and bagpipe side by side (optionally over a shaped link)")
    from bagpipe.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    compare = sub.add_parser("compare", help="exit 0 when two runs have identical digests")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.set_defaults(func=_cmd_compare)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _cmd_train(args: argparse.Namespace) -> int:
    from bagpipe.train import run_from_args

    return run_from_args(args)


def _cmd_launch(args: argparse.Namespace) -> int:
    from bagpipe.launch import launch

    try:
        return launch(args.trainers, args.servers, args.train_args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_bench(args: argparse.Namespace) -> int:
    from bagpipe.bench import main_from_args

    return main_from_args(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from bagpipe.compare import compare_runs

    same, message = compare_runs(args.run_a, args.run_b)
    print(message)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
