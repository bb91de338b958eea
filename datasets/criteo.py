"""Criteo (Kaggle / Terabyte) raw TSV -> bagpipe Parquet, on the `text` engine.

Input lines are ``label \\t I1..I13 \\t C1..C26``: label 0/1, dense integers, and
categoricals as hexadecimal hashes (normally 8 digits); any field may be empty.

Canonical preprocessing (DLRM's):

- dense: missing and negative -> 0, then ``log(x + 1)`` as float32 (`preprocess_dense`);
- categorical: hex -> integer key, then the engine's modulo mode
  (``max_ind_range=N``: ``id = value % N``, so a missing value shares id 0 with
  the values divisible by N, as in DLRM) or vocabulary mode (counted over *all*
  input files, as DLRM does; ids ``1..V`` in increasing order of the hex value, so
  hot ids are spread over the id range, not packed at its start). Use
  ``max_ind_range`` for Criteo Terabyte: vocabulary mode keeps every distinct value.

Accepted: a missing final newline, CRLF line ends, upper-case hex digits, 1..16
hex digits, a leading ``-`` on dense integers (up to 18 digits). A *bad line* is
one with a field count other than 40 (an empty line included), a label other than
``0``/``1``, a non-integer dense field or a non-hex categorical field; it follows
``on_bad_line`` (`text.convert_text`). Each input file becomes one part, in input
order, so the last input file is the eval split by convention (pass the held-out
day last).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .text import (
    LineBlock,
    PrepareResult,
    Rows,
    TextFile,
    TextFormat,
    binary_label_problem,
    binary_labels,
    convert_text,
    dec_field_problem,
    first_field_problem,
    hex_field_problem,
    line_fields,
    parse_dec,
    parse_hex,
)

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE


def preprocess_dense(raw: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Criteo's canonical dense preprocessing: missing/negative -> 0, log(x+1), float32."""
    x = np.maximum(raw, 0).astype(np.float64)
    x[missing] = 0.0
    return np.log1p(x).astype(np.float32)


def _parse_criteo_block(block: LineBlock, want_dense: bool = True) -> Rows:
    good, fs, fe = block.fields(9, NUM_FIELDS)  # [40, G] field starts and ends
    G = fs.shape[1]
    labels, ok = binary_labels(block, fs[0], fe[0])
    raw, dmiss, dbad = parse_dec(block, fs[1 : 1 + NUM_DENSE].ravel(), fe[1 : 1 + NUM_DENSE].ravel())
    ok &= ~dbad.reshape(NUM_DENSE, G).any(axis=0)
    keys, cmiss, cbad = parse_hex(block, fs[1 + NUM_DENSE :].ravel(), fe[1 + NUM_DENSE :].ravel())
    ok &= ~cbad.reshape(NUM_SPARSE, G).any(axis=0)
    valid = good.copy()
    valid[good] = ok
    keys = keys.reshape(NUM_SPARSE, G)
    present = ~cmiss.reshape(NUM_SPARSE, G)
    raw = raw.reshape(NUM_DENSE, G)
    dmiss = dmiss.reshape(NUM_DENSE, G)
    if not ok.all():
        keys, present, raw, dmiss, labels = keys[:, ok], present[:, ok], raw[:, ok], dmiss[:, ok], labels[ok]
    if want_dense:
        dense = preprocess_dense(raw, dmiss)
    else:
        dense = np.empty((NUM_DENSE, 0), np.float32)
    return Rows(valid, labels, dense, np.empty((0, len(labels)), np.int64), keys, present)


def criteo_line_reason(line: bytes) -> str:
    """Why a Criteo line is bad (used for messages only; parsing is vectorised)."""
    fields, problem = line_fields(line, b"\t", NUM_FIELDS, "tab")
    if problem:
        return problem
    checks = [("label", fields[0], binary_label_problem)]
    checks += [(f"I{j + 1}", f, dec_field_problem) for j, f in enumerate(fields[1 : 1 + NUM_DENSE])]
    checks += [(f"C{j + 1}", f, hex_field_problem) for j, f in enumerate(fields[1 + NUM_DENSE :])]
    return first_field_problem(checks) or "malformed line"


def _describe(max_ind_range: int | None, min_count: int) -> dict:
    """The preprocessing notes stored in the metadata (`TextFormat.describe`)."""
    return {
        "dense": "log(x+1); missing and negative -> 0",
        "categorical": (
            f"hex % {max_ind_range}; missing -> 0" if max_ind_range is not None else
            f"vocabulary over all inputs, ids 1..V by hex value; count < {min_count} and missing -> 0"
        ),
    }


_CRITEO_FILE = TextFile(_parse_criteo_block, criteo_line_reason)
CRITEO_FORMAT = TextFormat(
    source="criteo", num_dense=NUM_DENSE, fixed_cards=(), num_keyed=NUM_SPARSE,
    open_file=lambda path: _CRITEO_FILE, describe=_describe,
)


def prepare_criteo(inputs: Sequence[str], out: str, max_ind_range: int | None = None, min_count: int = 1,
                   on_bad_line: str = "error", **options) -> PrepareResult:
    """Convert Criteo TSV files (one output part each, in order) to a dataset at `out`;
    `text.convert_text` documents the arguments and the keyword `options`."""
    return convert_text(CRITEO_FORMAT, inputs, out, max_ind_range, min_count, on_bad_line, **options)
