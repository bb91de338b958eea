"""Arrow Flight plumbing every serving endpoint shares: security, calls, the shard wire format.

Transport is Arrow Flight (gRPC underneath): one ``do_exchange`` call per request per
shard, the request as one record batch in, the answer as one record batch out plus a
small JSON metadata buffer (timings); ``do_action`` for ``info`` and ``stats``. One
`FlightClient` per peer; gRPC multiplexes concurrent calls over its connection.

Security: endpoints bind to 127.0.0.1 unless ``--host`` says otherwise; a non-loopback
bind needs a token (``--token-file`` or ``BAGPIPE_TOKEN``), checked on every call by
`TokenCheck` (``authorization: Bearer <token>``; a refused call is logged), and may use
TLS (``--tls-cert``/``--tls-key``; clients trust ``--tls-root``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from bagpipe.config import ConfigError

from .requests import Bags, RequestError, table_column

log = logging.getLogger("bagpipe.serving")

TOKEN_ENV = "BAGPIPE_TOKEN"
SCORE = b"score"
LOOKUP = b"lookup"
VECTORS = "vectors"
# gRPC reconnects to a restarted peer within a second instead of its default backoff (up to 2 min)
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 1000)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    token: str | None = None
    tls_cert: str | None = None  # server certificate (PEM); also what clients trust when tls_root is None
    tls_key: str | None = None
    tls_root: str | None = None  # what a client trusts (PEM)

    @classmethod
    def from_args(cls, token_file: str | None, tls_cert: str | None, tls_key: str | None,
                  tls_root: str | None = None) -> "Security":
        token = None
        if token_file:
            try:
                with open(token_file) as f:
                    token = f.read().strip()
            except OSError as err:
                raise ConfigError(f"--token-file {token_file}: {err.strerror}") from None
            if not token:
                raise ConfigError(f"--token-file {token_file}: empty")
        elif os.environ.get(TOKEN_ENV):
            token = os.environ[TOKEN_ENV].strip()
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-root", tls_root)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{flag} {path}: no such file")
        return cls(token, tls_cert, tls_key, tls_root)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_root is not None

    def location(self, host: str, port: int) -> str:
        return f"{'grpc+tls' if self.tls else 'grpc'}://{host}:{port}"

    def check_bind(self, host: str) -> None:
        if not is_loopback(host) and not self.token:
            raise ConfigError(f"--host {host} is not loopback: a token is required (--token-file FILE or "
                              f"{TOKEN_ENV})")

    def server_options(self, host: str, port: int, role: str) -> dict:
        """FlightServerBase keyword arguments for an endpoint on host:port."""
        self.check_bind(host)
        options: dict = {"location": self.location(host, port)}
        if self.tls_cert:
            with open(self.tls_cert, "rb") as c, open(self.tls_key, "rb") as k:
                options["tls_certificates"] = [flight.CertKeyPair(cert=c.read(), key=k.read())]
        if self.token:
            options["middleware"] = {"auth": TokenCheck(self.token, role)}
        return options

    def client(self, address: str) -> flight.FlightClient:
        """A client for ``host:port`` (or a full grpc:// location)."""
        location = address if "://" in address else f"{'grpc+tls' if self.tls else 'grpc'}://{address}"
        kwargs: dict = {"generic_options": RECONNECT}
        root = self.tls_root or self.tls_cert
        if location.startswith("grpc+tls") and root:
            with open(root, "rb") as f:
                kwargs["tls_root_certs"] = f.read()
        return flight.FlightClient(location, **kwargs)

    def call_options(self, timeout_s: float | None = None) -> flight.FlightCallOptions:
        headers = [(b"authorization", b"Bearer " + self.token.encode())] if self.token else []
        return flight.FlightCallOptions(headers=headers, timeout=timeout_s)


class TokenCheck(flight.ServerMiddlewareFactory):
    """Refuses (and logs) every call without ``authorization: Bearer <token>``."""

    def __init__(self, token: str, role: str) -> None:
        super().__init__()
        self._expected = ("Bearer " + token).encode()
        self.role = role
        self.refused = 0

    def start_call(self, info, headers):
        given = (headers.get("authorization") or [""])[0]
        if not hmac.compare_digest(given.encode(), self._expected):
            self.refused += 1
            log.warning("%s: refused a %s call without a valid token (%d refused so far)", self.role,
                        info.method.name.lower(), self.refused)
            raise flight.FlightUnauthenticatedError("a valid token is required (authorization: Bearer <token>)")
        return None


def bad_request(err: Exception) -> flight.FlightServerError:
    return flight.FlightServerError(f"bad request: {err}")


def flight_message(err: BaseException) -> str:
    """A Flight error's own message, without gRPC's debug context."""
    text = str(err)
    for cut in (". Detail:", ". gRPC client debug context"):
        if cut in text:
            text = text[: text.index(cut)]
    return text


def exchange(client: flight.FlightClient, command: bytes, batch: pa.RecordBatch,
             options: flight.FlightCallOptions) -> tuple[pa.RecordBatch, dict]:
    """One request batch out, one answer batch (and its JSON metadata) back."""
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(command), options=options)
    try:
        writer.begin(batch.schema)
        writer.write_batch(batch)
        writer.done_writing()
        chunk = reader.read_chunk()
    finally:
        try:
            writer.close()
        except flight.FlightError:
            pass
    meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata is not None else {}
    return chunk.data, meta


def read_one(reader) -> pa.RecordBatch:
    """The request batch of an exchange (one batch per call)."""
    try:
        chunk = reader.read_chunk()
    except StopIteration:
        raise bad_request(RequestError("the call carried no record batch")) from None
    if chunk.data is None:
        raise bad_request(RequestError("the call carried no record batch"))
    return chunk.data


def answer(writer, batch: pa.RecordBatch, meta: dict) -> None:
    writer.begin(batch.schema)
    writer.write_with_metadata(batch, json.dumps(meta, separators=(",", ":")).encode())


def call_action(client: flight.FlightClient, name: str, options: flight.FlightCallOptions) -> dict:
    results = list(client.do_action(flight.Action(name, b""), options=options))
    return json.loads(results[0].body.to_pybytes()) if results else {}


def action_result(payload: dict) -> list[flight.Result]:
    return [flight.Result(json.dumps(payload).encode())]


# The shard wire format: one list<int64> column per table asked for, one fixed-size-list
# column of float32 vectors back (pooled per item for a whole table, one per id for a part).

def encode_query(tables: list[int], bags: list[Bags]) -> pa.RecordBatch:
    return pa.record_batch([b.to_arrow() for b in bags], names=[table_column(t) for t in tables])


def decode_query(batch: pa.RecordBatch) -> tuple[list[int], list[Bags]]:
    tables = []
    for name in batch.schema.names:
        if not (name.startswith("t") and name[1:].isdigit()):
            raise RequestError(f"column {name!r}: expected t<table>")
        tables.append(int(name[1:]))
    return tables, [Bags.from_arrow(batch.column(k), name) for k, name in enumerate(batch.schema.names)]


def encode_vectors(vectors: np.ndarray, name: str = VECTORS) -> pa.RecordBatch:
    """[n, d] float32 as one fixed-size-list column (no copy)."""
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, d)], names=[name])


def decode_vectors(batch: pa.RecordBatch, row_dim: int) -> np.ndarray:
    column = batch.column(0)
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != row_dim:
        raise ValueError(f"expected vectors of {row_dim} float32, got {column.type}")
    return column.flatten().to_numpy().reshape(-1, row_dim)


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (the way every serving process is stopped).

    The handler only flips a flag: one that took a lock (``Event.set``) could deadlock
    against this very thread waiting on that lock when the signal lands."""
    stopped: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stopped.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopped:
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
