"""Avazu click-through CSV -> bagpipe Parquet, on the `text` engine.

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
  (`text.hash_fields`: splitmix64 over their bytes and length), then either a contiguous vocabulary
  per field with a frequency threshold (ids ``1..V`` in key order; rare values and
  empty fields -> 0; cardinality ``V + 1``), counted over all input files in a
  first streaming pass, or ``key % max_ind_range`` (empty -> 0; cardinality
  ``max_ind_range``).
- no dense features (``num_dense = 0``).

Sparse columns are ``C1..C23`` (format.py's naming) in the order hour_of_day,
day_of_week, then the 21 fields in `AVAZU_CATEGORICAL` order; the metadata's
``preprocessing["sparse_fields"]`` records the original names. Bad lines (wrong
field count, bad click, bad hour) follow ``on_bad_line`` as in every converter
built on `text.convert_text`; one part per input file; temporary names + rename.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np

from .format import DatasetError
from .text import (
    LineBlock,
    PrepareResult,
    Rows,
    TextFile,
    TextFormat,
    binary_label_problem,
    binary_labels,
    convert_text,
    decode_dec8,
    first_field_problem,
    hash_fields,
    line_fields,
    show_field,
)

AVAZU_CATEGORICAL: tuple[str, ...] = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
SPARSE_FIELDS: tuple[str, ...] = ("hour_of_day", "day_of_week", *AVAZU_CATEGORICAL)
NUM_SPARSE = len(SPARSE_FIELDS)



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


def _parse_hour(block: LineBlock, fstart: np.ndarray, fend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hour_of_day, day_of_week, ok) from YYMMDDHH fields."""
    width = fend - fstart
    v, ok = decode_dec8(block.words, fstart, np.clip(width, 1, 8))
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
    good, fs, fe = block.fields(44, len(header.names))
    G = fs.shape[1]
    labels, ok = binary_labels(block, fs[header.click], fe[header.click])
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
        labels, fixed, keys, present = labels[ok], fixed[:, ok], keys[:, ok], present[:, ok]
    return Rows(valid, labels, np.empty((0, len(labels)), np.float32), fixed, keys, present)


def _line_reason(header: _Header):
    nf = len(header.names)

    def reason(line: bytes) -> str:
        fields, problem = line_fields(line, b",", nf, "comma")
        if problem:
            return problem
        return (first_field_problem([("click", fields[header.click], binary_label_problem)])
                or f"hour {show_field(fields[header.hour])} is not a valid YYMMDDHH time")

    return reason


def _describe(max_ind_range: int | None, min_count: int) -> dict:
    """The preprocessing notes stored in the metadata (`TextFormat.describe`)."""
    return {
        "sparse_fields": list(SPARSE_FIELDS),
        "label": "click",
        "hour": "YYMMDDHH -> hour_of_day (HH, 24 ids) and day_of_week (0=Monday, 7 ids); id dropped",
        "categorical": (
            f"hash64(string) % {max_ind_range}; empty -> 0" if max_ind_range is not None else
            f"vocabulary over all inputs, ids 1..V in hash64 order; count < {min_count} and empty -> 0"
        ),
    }


def _open_avazu_file(path: str) -> TextFile:
    """A file's column order comes from its own header line; data starts on line 2."""
    header = _read_header(path)
    return TextFile(partial(_parse_avazu_block, header=header), _line_reason(header), len(header.raw), 2)


AVAZU_FORMAT = TextFormat(
    source="avazu", num_dense=0, fixed_cards=(24, 7), num_keyed=len(AVAZU_CATEGORICAL),
    open_file=_open_avazu_file, describe=_describe,
)


def prepare_avazu(inputs: Sequence[str], out: str, max_ind_range: int | None = None, min_count: int = 1,
                  on_bad_line: str = "error", **options) -> PrepareResult:
    """Convert Avazu CSV files (one output part each, in order) to a dataset at `out`;
    `text.convert_text` documents the arguments and the keyword `options`."""
    return convert_text(AVAZU_FORMAT, inputs, out, max_ind_range, min_count, on_bad_line, **options)
