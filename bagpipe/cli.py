"""The `bagpipe` command: prepare, stats, train, compare (and more as they land)."""

from __future__ import annotations

import argparse
import sys



def main(argv: list[str] | None = None) -> int:
    from bagpipe.datasets.cli import register as register_datasets
    from bagpipe.train import add_train_arguments
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
