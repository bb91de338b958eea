"""`bagpipe prepare {synthetic,criteo,avazu}` and `bagpipe stats`.

`register(subparsers)` adds the commands to the top-level argparse parser's
subparsers; each sets ``func`` (``args -> exit code``). A `DatasetError` prints
``error: <message>`` to stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Callable

from .format import DatasetError

CLI_TABLE_SCALE = 0.01  # default --table-scale of `prepare synthetic`


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _table_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every table cardinality must be >= 1, got {text!r}")
    return values


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input and I/O failures (read-only output, disk full) are one `error:` line and
    exit code 2; SIGTERM stops like Ctrl-C. Either way the writers remove their
    temporary output, so nothing half-written is left."""

    def run(args: argparse.Namespace) -> int:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(args)
        except DatasetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: {where}{err.strerror or err}; nothing was written", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; nothing was written", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _output_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of the dataset writers from the `_add_output_options` flags
    (``progress=None``: a bar when stderr is a terminal)."""
    return dict(
        overwrite=args.overwrite,
        compression=None if args.compression == "none" else args.compression,
        progress=False if getattr(args, "no_progress", False) else None,
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out when done")
    p.add_argument("--compression", choices=("none", "snappy", "lz4", "zstd"), default="none",
                   help="Parquet compression (default none: fastest to read)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@_guarded
def cmd_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import generate_synthetic

    if args.tables is not None and args.table_scale is not None:
        raise DatasetError("give --tables or --table-scale, not both")
    scale = 1.0 if args.tables is not None else (args.table_scale if args.table_scale is not None else CLI_TABLE_SCALE)
    result = generate_synthetic(
        args.out,
        args.rows,
        seed=args.seed,
        zipf=args.zipf,
        table_scale=scale,
        tables=args.tables,
        eval_rows=args.eval_rows,
        rows_per_part=args.rows_per_part,
        format=args.format,
        **_output_options(args),
    )
    print(result.summary())
    return 0


def _text_prepare(kind: str):
    @_guarded
    def cmd(args: argparse.Namespace) -> int:
        if kind == "criteo":
            from .criteo import prepare_criteo as prepare
        else:
            from .avazu import prepare_avazu as prepare
        result = prepare(
            args.input,
            args.out,
            max_ind_range=args.max_ind_range,
            min_count=args.min_count,
            on_bad_line=args.on_bad_line,
            **_output_options(args),
        )
        print(result.summary())
        return 0

    cmd.__name__ = f"cmd_{kind}"
    return cmd


def _json_safe(value):
    """NaN (e.g. the click rate of an empty dataset) becomes null: strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@_guarded
def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import dataset_stats, format_stats

    stats = dataset_stats(args.path)
    if args.json:
        print(json.dumps(_json_safe(stats), indent=2, sort_keys=True))
    else:
        print(format_stats(stats))
    return 0


def register(subparsers) -> None:
    """Add `prepare` (synthetic, criteo, avazu) and `stats` to an argparse subparsers object."""
    prep = subparsers.add_parser(
        "prepare", help="convert or generate a dataset (Parquet parts)",
        description="Build a dataset directory of Parquet parts; the last part is the eval split.",
    )
    kinds = prep.add_subparsers(dest="prepare_kind", metavar="{synthetic,criteo,avazu}")
    kinds.required = True

    syn = kinds.add_parser(
        "synthetic", help="generate a Criteo-like synthetic dataset",
        description="Criteo-like rows: per-table Zipf ids, a hot missing id, a learnable label "
        "(about 25.6% clicks). Table sizes are Criteo Kaggle's times --table-scale "
        f"(default {CLI_TABLE_SCALE} here; 1.0 is the full 33.8M rows), or --tables.",
    )
    syn.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    syn.add_argument("--rows", required=True, type=_positive_int, help="training rows")
    syn.add_argument("--seed", type=_non_negative_int, default=0, help="seed (default 0)")
    syn.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of id popularity (default 1.05)")
    syn.add_argument("--table-scale", type=float, default=None,
                     help=f"multiply Criteo Kaggle's table sizes (default {CLI_TABLE_SCALE})")
    syn.add_argument("--tables", type=_table_list, default=None, help="explicit cardinalities, e.g. 1000,20,5000")
    syn.add_argument("--eval-rows", type=_non_negative_int, default=None,
                     help="held-out rows written as the last part (default 10%% of --rows; 0: none)")
    syn.add_argument("--rows-per-part", type=_positive_int, default=1_000_000, help="training rows per part")
    syn.add_argument("--format", choices=("parquet", "criteo-tsv"), default="parquet",
                     help="parquet (default) or raw Criteo TSV lines to test `prepare criteo`")
    _add_output_options(syn)
    syn.set_defaults(func=cmd_synthetic)

    for kind, desc in (
        ("criteo", "Criteo TSV (label, I1..I13, C1..C26 hex) -> Parquet, one part per input file"),
        ("avazu", "Avazu CSV (with header) -> Parquet, one part per input file"),
    ):
        p = kinds.add_parser(kind, help=desc, description=desc + "; give the eval file last.")
        p.add_argument("--input", required=True, nargs="+", help="input files, in order (the last is the eval split)")
        p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
        p.add_argument("--max-ind-range", type=_positive_int, default=None,
                       help="hash ids modulo this cap (every table gets this cardinality)")
        p.add_argument("--min-count", type=_positive_int, default=1,
                       help="vocabulary mode: values seen fewer times map to id 0 (default 1)")
        p.add_argument("--on-bad-line", choices=("error", "skip"), default="error",
                       help="error (default): stop and leave no output; skip: drop, count and report")
        _add_output_options(p)
        p.set_defaults(func=_text_prepare(kind))

    st = subparsers.add_parser("stats", help="dataset statistics (rows, clicks, skew per table)")
    st.add_argument("path", help="dataset directory (or one part file)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_stats)
