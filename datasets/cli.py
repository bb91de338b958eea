"""`bagpipe prepare {synthetic,criteo,avazu,tabular}` and `bagpipe stats`.

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


def _table_list(text: str) -> list[int] | str:
    """A preset name (kaggle, criteo-terabyte) or comma-separated cardinalities."""
    from .synthetic import TABLE_PRESETS

    if text.strip() in TABLE_PRESETS:
        return text.strip()
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(TABLE_PRESETS)} or comma-separated integers, "
                                         f"got {text!r}") from None
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

    explicit = args.tables is not None and not isinstance(args.tables, str)
    if explicit and args.table_scale is not None:
        raise DatasetError("give explicit --tables or --table-scale, not both (a preset name scales)")
    scale = 1.0 if explicit else (args.table_scale if args.table_scale is not None else CLI_TABLE_SCALE)
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
        multi_hot=args.multi_hot,
        bag_lengths=args.bag_lengths,
        distinct_in_bag=args.distinct_in_bag,
        pooling=args.pooling,
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


def _name_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@_guarded
def cmd_tabular(args: argparse.Namespace) -> int:
    from .tabular import parse_multi_hot, prepare_tabular

    if args.seed is not None and args.eval_fraction is None:
        raise DatasetError("--seed only seeds the --eval-fraction split; give --eval-fraction too")
    result = prepare_tabular(
        args.input,
        args.out,
        label=args.label,
        dense=args.dense,
        sparse=args.sparse,
        multi_hot=parse_multi_hot(args.multi_hot) if args.multi_hot else None,
        dense_transform=args.dense_transform,
        min_count=args.min_count,
        hash_buckets=args.hash_buckets,
        label_threshold=args.label_threshold,
        eval_fraction=args.eval_fraction,
        seed=args.seed or 0,
        pooling=args.pooling,
        input_format=args.format,
        delimiter=args.delimiter,
        on_bad_line=args.on_bad_line,
        **_output_options(args),
    )
    print(result.summary())
    if result.info.get("blank_lines"):
        print(f"skipped {result.info['blank_lines']:,} blank lines")
    return 0


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
    kinds = prep.add_subparsers(dest="prepare_kind", metavar="{synthetic,criteo,avazu,tabular}")
    kinds.required = True

    syn = kinds.add_parser(
        "synthetic", help="generate a Criteo-like synthetic dataset",
        description="Criteo-like rows: per-table Zipf ids, a hot missing id, a learnable label "
        "(about 25.6% clicks). Table sizes are Criteo Kaggle's (or Criteo Terabyte's, --tables "
        f"criteo-terabyte) times --table-scale (default {CLI_TABLE_SCALE} here; 1.0 is the full 33.8M "
        "Kaggle rows), or explicit --tables. --multi-hot makes every feature a bag of ids.",
    )
    syn.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    syn.add_argument("--rows", required=True, type=_positive_int, help="training rows")
    syn.add_argument("--seed", type=_non_negative_int, default=0, help="seed (default 0)")
    syn.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of id popularity (default 1.05)")
    syn.add_argument("--table-scale", type=float, default=None,
                     help=f"multiply the preset's table sizes (default {CLI_TABLE_SCALE})")
    syn.add_argument("--tables", type=_table_list, default=None,
                     help="kaggle (default), criteo-terabyte (26 sizes capped at 40M), or explicit "
                     "cardinalities, e.g. 1000,20,5000")
    syn.add_argument("--multi-hot", default=None, metavar="SIZES",
                     help="every feature a bag of ids: mean bag size per table (comma list, or one for all) "
                     "or 'mlperf' (3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1)")
    syn.add_argument("--bag-lengths", choices=("fixed", "poisson"), default="poisson",
                     help="multi-hot bag length per example: round(mean), or Poisson(mean) (default; empty bags occur)")
    syn.add_argument("--distinct-in-bag", action="store_true", help="multi-hot: no id twice in a bag")
    syn.add_argument("--pooling", choices=("sum", "mean"), default="sum",
                     help="how every table pools a bag (stored in the metadata; default sum)")
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

    tab = kinds.add_parser(
        "tabular", help="your own CSV / Parquet / JSON-lines tables -> Parquet",
        description="Name the label, dense, sparse and multi-hot columns of your tables; one part per "
        "input (the last is the eval split) or a seeded --eval-fraction split. Vocabularies and "
        "standardize statistics come from the training rows.",
    )
    tab.add_argument("--input", required=True, nargs="+", help="input files, in order (.csv/.tsv, .parquet, .jsonl)")
    tab.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    tab.add_argument("--label", required=True, help="label column: 0/1 (or true/false), or see --label-threshold")
    tab.add_argument("--dense", type=_name_list, default=[], metavar="COLS", help="numeric columns, comma-separated")
    tab.add_argument("--sparse", type=_name_list, default=[], metavar="COLS",
                     help="categorical columns, comma-separated (one embedding table each)")
    tab.add_argument("--multi-hot", default=None, metavar="COL=SEP,...",
                     help="bag columns and their separators, e.g. genres=|,tags=; "
                     "(Parquet and JSON lists are bags already)")
    tab.add_argument("--dense-transform", choices=("log1p", "standardize", "none"), default="log1p",
                     help="after missing -> 0: log(1 + max(x, 0)) (default), (x - mean) / std of the training rows, "
                     "or none")
    tab.add_argument("--min-count", type=_positive_int, default=1,
                     help="vocabulary mode: values seen fewer times in the training rows map to id 0 (default 1)")
    tab.add_argument("--hash-buckets", type=_positive_int, default=None, metavar="N",
                     help="ids = hash of the value mod N instead of a vocabulary (one pass fewer)")
    tab.add_argument("--label-threshold", type=float, default=None, metavar="X",
                     help="numeric label: 1 when value >= X, else 0 (e.g. 4 for ratings)")
    tab.add_argument("--eval-fraction", type=float, default=None, metavar="F",
                     help="a seeded per-row split instead of 'the last input is eval'")
    tab.add_argument("--seed", type=_non_negative_int, default=None,
                     help="seed of the --eval-fraction split (default 0)")
    tab.add_argument("--pooling", choices=("sum", "mean"), default="sum", help="how the tables pool bags (default sum)")
    tab.add_argument("--format", choices=("csv", "parquet", "jsonl"), default=None,
                     help="input format (default: from each file's extension)")
    tab.add_argument("--delimiter", default=None, help="CSV field delimiter (default ',', tab for .tsv)")
    tab.add_argument("--on-bad-line", choices=("error", "skip"), default="error",
                     help="error (default): stop and leave no output; skip: drop, count and report")
    _add_output_options(tab)
    tab.set_defaults(func=cmd_tabular)

    st = subparsers.add_parser("stats", help="dataset statistics (rows, clicks, skew per table)")
    st.add_argument("path", help="dataset directory (or one part file)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_stats)
