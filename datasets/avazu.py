"""Avazu click-through CSV -> bagpipe Parquet.

Input: Avazu's ``train.csv`` format, a header line then comma-separated rows::

    id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,
    app_category,device_id,device_ip,device_model,device_type,device_conn_type,
    C14,C15,C16,C17,C18,C19,C20,C21

(columns in any order; ``id`` may be absent). No quoting: a comma always
separates fields, so a quoted field containing a comma is a bad line.

Preprocessing:

- ``id`` is dropped; the label is ``click`` (must be ``0`` or ``1``).
- ``hour`` (``YYMMDDHH``, year 20YY) becomes two categorical fields with fixed
  vocabularies: **hour of day** (id = HH, cardinality 24) and **day of week**
  (id 0 = Monday .. 6 = Sunday, cardinality 7). The calendar date itself is not a
  feature (it never repeats between the training days and a later eval day). An
  ``hour`` that is not 8 digits or not a valid date/hour makes a bad line.
- the other 21 fields are categorical strings, hashed to 64-bit keys
  (splitmix64 over their bytes and length), then either a contiguous vocabulary
  per field with a frequency threshold (ids ``1..V`` in key order; rare values and
  empty fields -> 0; cardinality ``V + 1``), counted over all input files in a
  first streaming pass, or ``key % max_ind_range`` (empty -> 0; cardinality
  ``max_ind_range``).
- no dense features (``num_dense = 0``).

Sparse columns are ``C1..C23`` (format.py's naming) in the order hour_of_day,
day_of_week, then the 21 fields in `AVAZU_CATEGORICAL` order; the metadata's
``preprocessing["sparse_fields"]`` records the original names. Bad lines (wrong
field count, bad click, bad hour) follow ``on_bad_line`` exactly like
`criteo.prepare_criteo`; one part per input file; temporary names + rename.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np

from .criteo import (
    DEFAULT_BLOCK_BYTES,
    BadLines,
    LineBlock,
    PrepareResult,
    Rows,
    _check_inputs,
    _fast_dec,
    _show,
    convert_text,
    load_words,
)
from .format import DatasetError
from .synthetic import splitmix64
from .writer import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE

AVAZU_CATEGORICAL: tuple[str, ...] = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
SPARSE_FIELDS: tuple[str, ...] = ("hour_of_day", "day_of_week", *AVAZU_CATEGORICAL)
NUM_SPARSE = len(SPARSE_FIELDS)

_BYTE_MASK = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class _Header:
    raw: bytes  # the header line, newline included
    names: list[str]
    click: int
    hour: int
    cats: list[int]  # column index of every AVAZU_CATEGORICAL field


def _read_header(path: str) -> _Header:
    with open(path, "rb") as f:
        line = f.readline()
    if not line:
        raise DatasetError(f"{path}: empty file, expected an Avazu CSV header line")
    if line.startswith(b"\xef\xbb\xbf"):
        raise DatasetError(f"{path}:1: the file starts with a byte-order mark; remove it")
    names = line.rstrip(b"\r\n").decode("ascii", errors="replace").split(",")
    where = f"{path}:1"
    if len(set(names)) != len(names):
        raise DatasetError(f"{where}: duplicate column names in the header")
    known = {"id", "click", "hour", *AVAZU_CATEGORICAL}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DatasetError(f"{where}: unexpected column(s) {', '.join(unknown)} in the header")
    missing = [n for n in ("click", "hour", *AVAZU_CATEGORICAL) if n not in names]
    if missing:
        raise DatasetError(f"{where}: header lacks column(s) {', '.join(missing)}")
    return _Header(line, names, names.index("click"), names.index("hour"), [names.index(n) for n in AVAZU_CATEGORICAL])


def hash_fields(block: LineBlock, fstart: np.ndarray, fend: np.ndarray) -> np.ndarray:
    """64-bit keys of byte strings (splitmix64 chain over 8-byte words and the length)."""
    width = fend - fstart
    words = block.words
    h = width.view(np.uint64) * _GOLDEN
    first = load_words(words, fstart)
    first &= _BYTE_MASK.take(np.minimum(width, 8))
    h ^= first
    h = splitmix64(h)
    k = 1
    longer = np.flatnonzero(width > 8)
    while longer.size:
        rest = width[longer] - 8 * k
        w = load_words(words, fstart[longer] + 8 * k)
        w &= _BYTE_MASK.take(np.minimum(rest, 8))
        h[longer] = splitmix64(h[longer] ^ w)
        longer = longer[rest > 8]
        k += 1
    return h


def _parse_hour(block: LineBlock, fstart: np.ndarray, fend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hour_of_day, day_of_week, ok) from YYMMDDHH fields."""
    width = fend - fstart
    v, ok = _fast_dec(block.words, fstart, np.clip(width, 1, 8))
    ok &= width == 8
    yy, rest = np.divmod(v, 1000000)
    mm, rest = np.divmod(rest, 10000)
    dd, hh = np.divmod(rest, 100)
    ok &= (mm >= 1) & (mm <= 12) & (dd >= 1) & (dd <= 31) & (hh <= 23)
    months = np.where(ok, (2000 + yy - 1970) * 12 + mm - 1, 0)
    month_start = months.astype("datetime64[M]")
    day = month_start.astype("datetime64[D]").astype(np.int64) + np.where(ok, dd - 1, 0)
    ok &= day.astype("datetime64[D]").astype("datetime64[M]") == month_start  # day exists in month
    dow = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return np.where(ok, hh, 0), np.where(ok, dow, 0), ok


def _parse_avazu_block(block: LineBlock, want_dense: bool = True, *, header: _Header) -> Rows:
    a = block.a
    nf = len(header.names)
    good, bounds = block.split(44, nf)
    G = bounds.shape[1]
    fs = bounds[:nf] + 1
    fe = bounds[1:]
    c = header.click
    click = a.take(fs[c])
    ok = (fe[c] - fs[c] == 1) & ((click == 48) | (click == 49))
    hod, dow, hour_ok = _parse_hour(block, fs[header.hour], fe[header.hour])
    ok &= hour_ok
    cs = fs[header.cats].ravel()
    ce = fe[header.cats].ravel()
    keys = hash_fields(block, cs, ce).reshape(len(header.cats), G)
    present = (ce > cs).reshape(len(header.cats), G)
    fixed = np.stack([hod, dow])
    valid = good.copy()
    valid[good] = ok
    if not ok.all():
        click, fixed, keys, present = click[ok], fixed[:, ok], keys[:, ok], present[:, ok]
    labels = (click == 49).astype(np.float32)
    return Rows(valid, labels, np.empty((0, len(labels)), np.float32), fixed, keys, present)


def _line_reason(header: _Header):
    nf = len(header.names)

    def reason(line: bytes) -> str:
        if not line:
            return "empty line"
        fields = line.split(b",")
        if len(fields) != nf:
            return f"expected {nf} comma-separated fields, got {len(fields)}"
        if fields[header.click] not in (b"0", b"1"):
            return f"click {_show(fields[header.click])} is not 0 or 1"
        hour = fields[header.hour]
        return f"hour {_show(hour)} is not a valid YYMMDDHH time"

    return reason


def prepare_avazu(
    inputs: Sequence[str],
    out: str,
    max_ind_range: int | None = None,
    min_count: int = 1,
    on_bad_line: str = "error",
    *,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression: str | None = DEFAULT_COMPRESSION,
    progress: bool | None = None,
    threads: int = 2,
) -> PrepareResult:
    """Convert Avazu CSV files (one output part each, in order) to a dataset at `out`."""
    paths = _check_inputs(inputs)
    BadLines(on_bad_line)  # validate the policy before any work
    headers = [_read_header(p) for p in paths]
    starts = [(len(h.raw), 2) for h in headers]
    info = {
        "sparse_fields": list(SPARSE_FIELDS),
        "label": "click",
        "hour": "YYMMDDHH -> hour_of_day (HH, 24 ids) and day_of_week (0=Monday, 7 ids); id dropped",
        "categorical": (
            f"hash64(string) % {max_ind_range}; empty -> 0" if max_ind_range is not None else
            f"vocabulary over all inputs, ids 1..V in hash64 order; count < {min_count} and empty -> 0"
        ),
    }
    return convert_text(
        paths, out, source="avazu",
        parsers=[partial(_parse_avazu_block, header=h) for h in headers],
        starts=starts, reasons=[_line_reason(h) for h in headers], num_dense=0, fixed_cards=[24, 7],
        num_keyed=len(AVAZU_CATEGORICAL), max_ind_range=max_ind_range, min_count=min_count,
        on_bad_line=on_bad_line, info=info, overwrite=overwrite, block_bytes=block_bytes,
        row_group_size=row_group_size, compression=compression, progress=progress, threads=threads,
    )
