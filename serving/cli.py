"""`bagpipe serve`, `bagpipe shard`, `bagpipe loadgen`, `bagpipe infer-bench`.

Hook into the main CLI with ``from bagpipe.serving.cli import register; register(sub)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from bagpipe.config import ConfigError


def _add_security(p: argparse.ArgumentParser, server: bool) -> None:
    if server:
        p.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default loopback; any other needs a token)")
        p.add_argument("--port", type=int, default=0, help="port (0: any free one, printed in the ready line)")
        p.add_argument("--tls-cert", default=None, help="PEM certificate: serve over TLS")
        p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--token-file", default=None,
                   help="file holding the shared token (else $BAGPIPE_TOKEN); required beyond loopback")
    p.add_argument("--tls-root", default=None, help="PEM certificate(s) a client trusts (default: --tls-cert)")


def _add_requests(p: argparse.ArgumentParser, what: str) -> None:
    from .spec import DEFAULT_TABLE_SCALE, SHIPPED

    p.add_argument("--spec", default=None,
                   help=f"a shipped spec ({', '.join(SHIPPED)}) or a JSON spec file: {what}")
    p.add_argument("--table-scale", type=float, default=DEFAULT_TABLE_SCALE,
                   help="multiply every spec table's rows (shipped specs are nominally too large for one machine)")
    p.add_argument("--data", default=None, help="a prepared dataset: requests (and placement statistics) use its ids")
    p.add_argument("--items", default="32",
                   help="candidate items per request: N, uniform:LO:HI or lognormal:MEDIAN:SIGMA")
    p.add_argument("--seed", type=int, default=0)


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-capacity-mb", type=float, default=None,
                   help="memory per sparse shard for tables (default: the tables' bytes / K x --capacity-slack)")
    p.add_argument("--capacity-slack", type=float, default=1.25,
                   help="default capacity = tables / K x this (memory-bound: the model fills 1/slack of the shards)")
    p.add_argument("--stats-requests", type=int, default=500,
                   help="requests sampled for the placement's coverage and co-access statistics")


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-items", type=int, default=1024, help="candidate items allowed per request")
    p.add_argument("--max-ids-per-request", type=int, default=1 << 18, help="ids allowed per request")
    p.add_argument("--deadline-ms", type=float, default=1000.0, help="per-shard call deadline of the fan-out")
    p.add_argument("--threads", type=int, default=1, help="torch threads per serving process")


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model: a main shard (dense part) and K sparse shards (embedding tables)",
        description="Start K sparse-shard processes holding the tables a placement gives them and a main shard "
                    "that fans each request out to the shards it needs and runs the dense part. Prints one JSON "
                    "ready line (address, shards) and serves until SIGTERM or SIGINT.")
    _add_requests(serve, "a randomly initialised model of that shape (with --checkpoint: only the shape of its "
                         "requests)")
    serve.add_argument("--checkpoint", default=None, help="a model export directory (bagpipe.export) to serve")
    serve.add_argument("--placement", default="capacity",
                       help="local | single | capacity | load | coaccess (local: every table in the main shard)")
    serve.add_argument("--shards", type=int, default=2, help="sparse shards K")
    _add_placement(serve)
    _add_limits(serve)
    _add_security(serve, server=True)
    serve.add_argument("--shard-addresses", default=None,
                       help="HOST:PORT,... of running `bagpipe shard` processes to use instead of starting them")
    serve.add_argument("--placement-out", default=None,
                       help="write the placement file here (what `bagpipe shard --placement-file` reads)")
    serve.add_argument("--start-timeout", type=float, default=120.0, help="seconds a shard may take to start")
    serve.set_defaults(func=_cmd_serve)

    shard = subparsers.add_parser("shard", help="serve one sparse shard of a placement file",
                                  description="Hold shard INDEX's tables of a placement file (written by "
                                              "`bagpipe serve --placement-out`) and answer pooled lookups.")
    shard.add_argument("--placement-file", required=True)
    shard.add_argument("--index", type=int, required=True)
    shard.add_argument("--threads", type=int, default=1)
    _add_security(shard, server=True)
    shard.set_defaults(func=_cmd_shard)

    load = subparsers.add_parser("loadgen", help="open-loop Poisson load against a main shard",
                                 description="Send requests at Poisson arrivals of rate --qps until --requests "
                                             "or --duration, then report latency percentiles, throughput, the "
                                             "time split, fan-out, bytes and CPU per request.")
    load.add_argument("--address", required=True, help="HOST:PORT of the main shard")
    _add_requests(load, "the shape of the requests (default: the served model's own spec)")
    load.add_argument("--qps", type=float, default=20.0)
    load.add_argument("--requests", type=int, default=200)
    load.add_argument("--duration", type=float, default=60.0, help="stop sending after this many seconds")
    load.add_argument("--concurrency", type=int, default=64, help="requests in flight at most (client threads)")
    load.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take")
    load.add_argument("--slo-ms", type=float, default=None, help="P99 target")
    load.add_argument("--out", default=None, help="write the summary as JSON here")
    _add_security(load, server=False)
    load.set_defaults(func=_cmd_loadgen)

    from .bench import add_arguments

    bench = subparsers.add_parser("infer-bench", help="serving placements side by side: latency, CPU, fan-out",
                                  description="Serve each spec under every placement and shard count, send the "
                                              "same open-loop load to each configuration in interleaved rounds, "
                                              "and write infer.csv, infer.json and infer.png.")
    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)


def _logging() -> None:
    logging.basicConfig(level=os.environ.get("BAGPIPE_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _run(func, args) -> int:
    from bagpipe.export import ExportError

    from .placement import PlacementError
    from .supervisor import StartError

    _logging()
    try:
        return func(args)
    except (ConfigError, PlacementError, ExportError, StartError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_serve(args: argparse.Namespace) -> int:
    from .main_shard import serve

    return _run(serve, args)


def _cmd_shard(args: argparse.Namespace) -> int:
    from .shard import run_shard

    return _run(run_shard, args)


def _cmd_loadgen(args: argparse.Namespace) -> int:
    return _run(loadgen, args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return _run(run_bench, args)


def loadgen(args: argparse.Namespace) -> int:
    from .loadgen import Counters, ScoringClient, format_summary, run_open_loop, summarize
    from .main_shard import request_source
    from .requests import ItemCount
    from .rpc import Security
    from .source import ModelSource
    from .spec import load_spec

    security = Security.from_args(args.token_file, None, None, args.tls_root)
    client = ScoringClient(args.address, security)
    info = client.info()
    source = ModelSource.from_dict({"model": info["model"], "spec": info["spec"], "seed": 0, "export_path": None})
    if args.spec is not None:
        shape = load_spec(args.spec, args.table_scale)
        if shape.cardinalities != source.model.cardinalities:
            raise ConfigError(f"--spec {args.spec}: its tables {list(shape.cardinalities)[:6]}... differ from the "
                              f"served model's {list(source.model.cardinalities)[:6]}...")
        source = ModelSource(source.model, source.seed, shape)
    requests = request_source(source, args.data, ItemCount.parse(args.items), args.seed, info["limits"]["max_items"])
    batches = [r.to_arrow() for r in requests.take(0, args.requests)]
    before = client.stats()
    outcomes, elapsed = run_open_loop(client, batches, args.qps, args.duration, args.seed, args.concurrency,
                                      args.timeout)
    summary = summarize(outcomes, elapsed, args.qps, Counters.between(before, client.stats()), args.slo_ms)
    summary.update(address=args.address, placement=info["placement"]["strategy"], shards=len(info["shards"]),
                   spec=source.spec.name)
    print(format_summary(summary))
    if args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, args.out)
    client.close()
    return 0 if summary["errors"] == 0 else 1
