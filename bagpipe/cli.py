"""The `bagpipe` command: prepare, stats, train, compare (and more as they land)."""

from __future__ import annotations

import argparse
import sys



def main(argv: list[str] | None = None) -> int:
    from bagpipe.datasets.cli import register as register_datasets
    from bagpipe.train import add_train_arguments
    from bagpipe.oracle.cli import register as register_oracle
    from bagpipe.serving.cli import register as register_serving

    parser = argparse.ArgumentParser(prog="bagpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    register_datasets(sub)
    register_oracle(sub)
    register_serving(sub)

    train = sub.add_parser("train", help="train a model (local, or one role of a torchrun world)")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    launch = sub.add_parser("launch", help="run a distributed job on this machine under torchrun")
    launch.add_argument("--trainers", type=int, default=2)
    launch.add_argument("--servers", type=int, default=1)
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="restart the whole job this many times when a process dies; it resumes from the "
                             "latest complete checkpoint (as torchrun --max-restarts)")
    launch.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `bagpipe train` arguments")
    launch.set_defaults(func=_cmd_launch)

    export = sub.add_parser("export", help="write a training checkpoint as a model export (what serving loads)")
    export.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/iter-N)")
    export.add_argument("--out", required=True)
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_cmd_export)

    evaluate = sub.add_parser("evaluate", help="score a dataset's eval split with a checkpoint or an export")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint or export directory")
    evaluate.add_argument("--data", default=None, help="default: the run's dataset")
    evaluate.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    evaluate.add_argument("--eval-batches", type=int, default=None, help="default: the run's")
    evaluate.add_argument("--trainers", type=int, default=None,
                          help="score each batch in this many slices, as that many trainers do (default: the "
                               "checkpoint's run, 1 for an export): the run's own figures, bit for bit")
    evaluate.set_defaults(func=_cmd_evaluate)

    bench = sub.add_parser("bench", help="benchmark local, none and bagpipe side by side (optionally over a shaped link)")
    from bagpipe.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    from bagpipe.compare import DEFAULT_WINDOW

    compare = sub.add_parser(
        "compare", help="exit 0 when two runs have identical digests, or (--tolerance, --baseline) converge alike",
        description="Bit mode (default): exit 0 iff every digest of RUN_A and RUN_B is identical. "
                    "--tolerance REL: a convergence check of the smoothed loss curves and eval metrics. "
                    "CANDIDATE --baseline RUN RUN RUN...: a seed-variance band check.")
    compare.add_argument("run_a", metavar="RUN_A|CANDIDATE")
    compare.add_argument("run_b", metavar="RUN_B", nargs="?")
    compare.add_argument("--tolerance", type=float, default=None, metavar="REL",
                         help="largest relative difference |a-b|/max(|a|,|b|) of the smoothed loss at any common "
                              "iteration and of eval AUC / logloss / NE at the latest common evaluation")
    compare.add_argument("--baseline", nargs="+", default=None, metavar="RUN",
                         help="three or more baseline runs (e.g. seeds): the candidate must stay within --sigmas "
                              "standard deviations of their mean")
    compare.add_argument("--sigmas", type=float, default=None, help="band width in standard deviations (default 3)")
    compare.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                         help=f"trailing-mean window of the loss, in iterations (default {DEFAULT_WINDOW}; 1: raw "
                              "losses)")
    compare.add_argument("--compare-plot", default=None, metavar="PNG",
                         help="also write the overlay of the losses and their difference curve to PNG")
    compare.set_defaults(func=_cmd_compare)

    report = sub.add_parser("report", help="PNG plots and a static index.html of one or more runs (overlaid)")
    report.add_argument("runs", nargs="+", metavar="RUN")
    report.add_argument("--out", required=True, metavar="DIR")
    report.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"trailing-mean window in iterations (default {DEFAULT_WINDOW}, as in compare)")
    report.set_defaults(func=_cmd_report)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _cmd_train(args: argparse.Namespace) -> int:
    from bagpipe.train import run_from_args

    return run_from_args(args)


def _errors_exit_2(command):
    """Bad input and I/O errors are one `error:` line and exit code 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, OSError) as err:  # ConfigError, DatasetError, ExportError are ValueErrors
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


@_errors_exit_2
def _cmd_launch(args: argparse.Namespace) -> int:
    from bagpipe.launch import launch

    return launch(args.trainers, args.servers, args.train_args, args.max_restarts)


@_errors_exit_2
def _cmd_export(args: argparse.Namespace) -> int:
    from bagpipe.export import export_checkpoint

    exported = export_checkpoint(args.checkpoint, args.out, args.overwrite)
    print(f"{args.out}: {exported.model.name}, {len(exported.tables)} tables, {sum(t.shape[0] for t in exported.tables)} "
          f"rows, after {exported.iteration} iterations")
    return 0


@_errors_exit_2
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bagpipe.evaluate import evaluate_saved

    result = evaluate_saved(args.checkpoint, args.data, args.batch_size, args.eval_batches, args.trainers)
    print(f"{args.checkpoint}: {result['eval_examples']} examples, AUC {result['auc']:.6f}, "
          f"logloss {result['logloss']:.6f}, NE {result['ne']:.6f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from bagpipe.bench import main_from_args

    return main_from_args(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from bagpipe import compare
    from bagpipe.report import ReportError, write_compare_plot
    from bagpipe.rundir import RunDirError

    try:
        if args.baseline is not None:
            if args.run_b is not None or args.tolerance is not None:
                raise compare.CompareError("--baseline compares one CANDIDATE run (no RUN_B, no --tolerance)")
            sigmas = compare.DEFAULT_SIGMAS if args.sigmas is None else args.sigmas
            candidate, *baselines = compare.load_runs([args.run_a, *args.baseline])
            result = compare.compare_band(candidate, baselines, sigmas, args.window)
            ok, message = result.within, result.message()
        else:
            if args.run_b is None:
                raise compare.CompareError("give two runs: RUN_A RUN_B (or one CANDIDATE with --baseline)")
            if args.sigmas is not None:
                raise compare.CompareError("--sigmas applies to --baseline only")
            if args.tolerance is None:  # bits
                ok, message = compare.compare_runs(args.run_a, args.run_b)
                result = None
                if args.compare_plot:
                    result = compare.compare_tolerance(*compare.load_runs([args.run_a, args.run_b]), 0.0, args.window)
            else:
                result = compare.compare_tolerance(*compare.load_runs([args.run_a, args.run_b]), args.tolerance,
                                                   args.window)
                ok, message = result.within, result.message()
        if args.compare_plot:
            write_compare_plot(result, args.compare_plot, show_tolerance=args.tolerance is not None)
            message += f"\nwrote {args.compare_plot}"
    except (compare.CompareError, RunDirError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(message)
    return 0 if ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from bagpipe.report import ReportError, write_report
    from bagpipe.rundir import RunDirError

    try:
        report = write_report(args.runs, args.out, args.window)
    except (ReportError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run in report.runs:
        print(run.describe())
    for plot in report.plots:
        print(f"wrote {plot.path}")
    for name, why in report.skipped.items():
        print(f"skipped {name}.png: {why}")
    print(f"wrote {report.index}")
    return 0


def run() -> None:
    """The `bagpipe` console script: main, then an immediate exit (bagpipe.exits)."""
    from bagpipe.exits import exit_now

    exit_now(main())


if __name__ == "__main__":
    run()
