"""`bagpipe prepare tabular`: users' own tables (CSV, Parquet, JSON lines) -> a dataset.

The user names the columns' roles: one label, dense (numeric) columns, sparse
(categorical) columns and multi-hot columns (``COL=SEP``: a bag of values per row, split
at SEP; Parquet list columns and JSON arrays are bags already). Everything else in the
input is ignored. Output columns keep the input's names.

Reading. Inputs are streamed in blocks, memory bounded by a few blocks (plus the
vocabularies): CSV with `pyarrow.csv.open_csv` (a header line, RFC 4180 quoting,
quoted newlines; every column read as a string, then converted vectorised with
`pyarrow.compute`), Parquet with `ParquetFile.iter_batches`, JSON lines with
`pyarrow.json.read_json` over blocks of whole lines (a block that does not parse is
bisected, so a malformed line is found and named while its neighbours are kept).
Blank lines are skipped (in a CSV: a row whose named columns are all empty). The
format comes from the file extension unless given.

Values. A value is *missing* when null or, trimmed, one of `MISSING_VALUES`.
- Label: 0/1 (or true/false), or with ``label_threshold=X`` any number, 1 when
  ``value >= X``. A missing or unusable label makes the row bad.
- Dense: a number (surrounding spaces allowed; it must fit float32), missing -> 0; then
  ``dense_transform``: ``log1p`` (``log(1 + max(x, 0))``, Criteo's rule), ``standardize``
  (``(x - mean) / std``, statistics of the training rows, stored in the metadata; a
  constant column gets std 1) or ``none``. Anything else makes the row bad.
- Categorical and multi-hot values (strings or numbers, compared as trimmed text):
  each is keyed by a 64-bit hash of its UTF-8 bytes (`text.hash_spans`, stable across
  runs and machines). Vocabulary mode (default): values seen at least ``min_count``
  times in the training rows get ids ``1..V`` in increasing key order; id 0 is
  missing and out-of-vocabulary (cardinality V + 1). ``hash_buckets=N``: ``key % N``
  (missing -> 0, cardinality N), one pass fewer. A multi-hot bag drops its empty and
  missing elements (a missing cell is an empty bag); one table per column.

Splits. Without ``eval_fraction`` every input becomes one part, in order, and the last
is the eval split (when there are two or more). With ``eval_fraction=F`` a row goes
to eval when a hash of (seed, input index, line) falls below F: deterministic,
independent of block sizes and of which rows are bad; then part 0 is train, part 1 eval.
Training rows (all inputs but the last, or the train side of the split) give the
vocabularies and the standardize statistics, in a first pass.

Bad rows (missing label, unparsable number, wrong field count, malformed JSON) follow
``on_bad_line`` as in the text converters (`text.BadLines`): ``error`` stops at the
first, naming file, line (Parquet: row) and column, and leaves nothing at ``out``;
``skip`` drops them, counts them and reports the first few. A CSV line number is the
record number when a quoted value spans lines.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bagpipe.hashing import mix

from .format import POOLINGS, DatasetError, DatasetMeta, TableMeta
from .jagged import Bags
from .text import (BadLines, KeyCounter, LineBlock, PrepareResult, check_inputs, hash_spans, iter_line_blocks,
                   make_lookup, padded_words, progress_bar, show_field)
from .writer import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE, DatasetWriter, check_output_path

INPUT_FORMATS = ("csv", "parquet", "jsonl")
EXTENSION_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet",
                     ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
DENSE_TRANSFORMS = ("log1p", "standardize", "none")
MISSING_VALUES = ("", "NA", "N/A", "NaN", "nan", "NULL", "null", "None")
NUMBER_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
DEFAULT_BLOCK_BYTES = 4 << 20
PARQUET_BATCH_ROWS = 65536
SEPARATOR_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe", " ": "space"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MISSING = pa.array(MISSING_VALUES, pa.string())

# why a value makes its row bad (per column and row; 0: it does not)
_OK, _MISSING_LABEL, _NOT_NUMBER, _OUT_OF_RANGE, _NOT_BINARY = range(5)
_PROBLEMS = {_NOT_NUMBER: "is not a number", _OUT_OF_RANGE: "is out of range (beyond float32)",
             _NOT_BINARY: "is not 0 or 1 (give --label-threshold to binarise a numeric label)"}


class _Unusable(ValueError):
    """A value of a type the column cannot take (a list where one value belongs, an object)."""


# --------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Columns:
    """The input columns' roles; sparse features in output order (one-hot and multi-hot)."""

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    separators: dict[str, str] = field(default_factory=dict)  # multi-hot column -> separator

    @property
    def read(self) -> list[str]:
        return [self.label, *self.dense, *self.sparse]

    @property
    def multi_hot(self) -> list[str]:
        return [c for c in self.sparse if c in self.separators]


def make_columns(label: str, dense: Sequence[str] = (), sparse: Sequence[str] = (),
                 multi_hot: dict[str, str] | None = None) -> Columns:
    """Check the roles: every name once, at least one sparse feature, no clash with the
    output's ``label`` column. Multi-hot columns listed in `sparse` keep their place;
    the others follow."""
    multi_hot = dict(multi_hot or {})
    for col, sep in multi_hot.items():
        if not sep:
            raise DatasetError(f"multi-hot column {col!r}: empty separator")
    features = list(sparse) + [c for c in multi_hot if c not in sparse]
    names = [label, *dense, *features]
    if not label:
        raise DatasetError("no label column given")
    if not features:
        raise DatasetError("no sparse or multi-hot columns given; at least one embedding table is needed")
    seen: set[str] = set()
    for name in names:
        if not name:
            raise DatasetError(f"empty column name in {names}")
        if name in seen:
            raise DatasetError(f"column {name!r} is given more than once (each column has one role)")
        seen.add(name)
    if "label" in [*dense, *features]:
        raise DatasetError("a feature column may not be named 'label' (the output's label column); rename it")
    return Columns(label, tuple(dense), tuple(features), multi_hot)


def parse_multi_hot(text: str) -> dict[str, str]:
    """``COL=SEP[,COL=SEP...]``; a separator may itself be a comma (``tags=,``)."""
    items: list[str] = []
    for piece in text.split(","):
        if "=" in piece or not items:
            items.append(piece)
        else:  # no '=': a comma that belongs to the previous item's separator
            items[-1] += "," + piece
    out: dict[str, str] = {}
    for item in items:
        col, eq, sep = item.partition("=")
        if not eq or not col.strip() or not sep:
            raise DatasetError(f"multi-hot columns must be COL=SEP (e.g. genres=|), got {item!r}")
        out[col.strip()] = sep
    return out


# --------------------------------------------------------------------------- values
def _bools(arr) -> np.ndarray:
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False)


def _is_missing(trimmed: pa.Array) -> np.ndarray:
    return _bools(pc.or_kleene(pc.is_null(trimmed), pc.is_in(trimmed, value_set=_MISSING)))


def _numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float64 with missing and bad -> 0, missing, problem code per row)."""
    n = len(arr)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type) \
            or pa.types.is_decimal(arr.type):
        values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False).copy()
        missing = np.isnan(values)  # null or NaN
        problem = np.zeros(n, dtype=np.int8)
    else:
        text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
        missing = _is_missing(text)
        numeric = _bools(pc.match_substring_regex(text, NUMBER_PATTERN))
        problem = np.where(missing | numeric, _OK, _NOT_NUMBER).astype(np.int8)
        values = pc.cast(pc.if_else(pa.array(numeric), text, pa.scalar(None, pa.string())),
                         pa.float64()).to_numpy(zero_copy_only=False).copy()
    problem[~missing & ~(np.abs(np.nan_to_num(values, nan=0.0)) <= _FLOAT32_MAX)] = _OUT_OF_RANGE
    values[missing | (problem != _OK)] = 0.0
    return values, missing, problem


def _labels(arr: pa.Array, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels float32, problem code per row)."""
    values, missing, problem = _numbers(arr)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        word = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        for text, value in (("true", 1.0), ("false", 0.0)):
            hit = _bools(pc.equal(word, text))
            values[hit], problem[hit] = value, _OK
    problem[missing & (problem == _OK)] = _MISSING_LABEL
    if threshold is None:
        problem[(problem == _OK) & (values != 0.0) & (values != 1.0)] = _NOT_BINARY
        return values.astype(np.float32), problem
    return (values >= threshold).astype(np.float32), problem


def _string_keys(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit key of every trimmed value, present) for a string array."""
    text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    present = ~_is_missing(text)
    n = len(text)
    _, offsets_buf, data_buf = text.buffers()
    if offsets_buf is None:  # no values at all
        return np.zeros(n, np.uint64), present
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=4 * text.offset).astype(np.int64)
    data = data_buf.to_pybytes() if data_buf is not None else b""
    keys = hash_spans(padded_words(data), offsets[:-1], offsets[1:]) if n else np.zeros(0, np.uint64)
    return keys, present


@dataclass
class FeatureKeys:
    """One sparse feature's keys over a block's rows: one per row (`offsets` None) or,
    multi-hot, the present elements of every row's bag."""

    keys: np.ndarray  # uint64
    present: np.ndarray  # bool, as keys
    offsets: np.ndarray | None = None  # int64 [rows + 1] for a bag column

    def select(self, rows: np.ndarray) -> "FeatureKeys":
        """The rows where `rows` (bool) is true."""
        if self.offsets is None:
            return FeatureKeys(self.keys[rows], self.present[rows])
        lengths = np.diff(self.offsets)
        elements = np.repeat(rows, lengths)
        offsets = np.zeros(int(rows.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[rows], out=offsets[1:])
        return FeatureKeys(self.keys[elements], self.present[elements], offsets)

    def counted_keys(self) -> np.ndarray:
        return self.keys[self.present]


def _feature_keys(arr: pa.Array, bag: bool) -> FeatureKeys:
    if not bag:
        return FeatureKeys(*_string_keys(arr))
    n = len(arr)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    keys, present = _string_keys(pc.list_flatten(arr))
    keys, parents = keys[present], parents[present]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(parents, minlength=n), out=offsets[1:])
    return FeatureKeys(keys, np.ones(len(keys), dtype=bool), offsets)


def _normalize(arr: pa.Array, name: str, separator: str | None, keep_numbers: bool) -> pa.Array:
    """A column as what decoding takes: list<string> for a multi-hot column (split at its
    separator unless it is a list already), else numbers (`keep_numbers`) or strings."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    kind = arr.type
    nested = pa.types.is_nested(kind)
    if separator is not None:
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            if pa.types.is_nested(kind.value_type):
                raise _Unusable(f"column {name!r} holds lists of {kind.value_type}; expected values")
            return pc.cast(arr, pa.list_(pa.string()))
        if nested:
            raise _Unusable(f"column {name!r} holds {kind}; expected a string or a list")
        return pc.split_pattern(pc.cast(arr, pa.string()), separator)
    if nested:
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        raise _Unusable(f"column {name!r} holds {'a list' if is_list else kind}; expected one value"
                        + (" (give it with --multi-hot COL=SEP if it is a bag)" if is_list else ""))
    if keep_numbers and (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
                         or pa.types.is_decimal(kind)):
        return arr
    return pc.cast(arr, pa.string())


# --------------------------------------------------------------------------- sources
@dataclass
class Piece:
    """Consecutive rows of one input: its named columns (normalized), every row's line
    number, and the lines the reader itself rejected up to here (line, reason)."""

    columns: dict[str, pa.Array]
    lines: np.ndarray
    rejected: list[tuple[int, str]] = field(default_factory=list)
    blank: int = 0  # blank rows dropped


class _Source:
    """One input file: opened (columns checked) before any output exists."""

    format = ""

    def __init__(self, path: str, index: int, columns: Columns, block_bytes: int) -> None:
        self.path = path
        self.index = index
        self.columns = columns
        self.block_bytes = block_bytes
        self.size = os.path.getsize(path)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}" if line >= 0 else f"{self.path}: (line unknown)"

    def pieces(self, progress: Callable[[int], None]) -> Iterator[Piece]:
        raise NotImplementedError

    def column_type(self, col: str) -> pa.DataType:
        """A normalized column's type when it holds no numbers."""
        return pa.list_(pa.string()) if col in self.columns.separators else pa.string()

    def no_rows(self, rejected: list[tuple[int, str]]) -> Piece:
        empty = {c: pa.array([], self.column_type(c)) for c in self.columns.read}
        return Piece(empty, np.zeros(0, np.int64), rejected)

    def _check_names(self, names: list[str], what: str) -> None:
        for col in self.columns.read:
            count = names.count(col)
            if count == 0:
                raise DatasetError(f"{self.path}: no column {col!r} in the {what} (it has {_shown(names)})")
            if count > 1:
                raise DatasetError(f"{self.path}: column {col!r} appears {count} times in the {what}")


def _shown(names: list[str], limit: int = 12) -> str:
    return ", ".join(map(repr, names[:limit])) + (f", ... ({len(names)} columns)" if len(names) > limit else "")


class _CsvSource(_Source):
    format = "csv"

    def __init__(self, path: str, index: int, columns: Columns, block_bytes: int, delimiter: str) -> None:
        super().__init__(path, index, columns, block_bytes)
        if len(delimiter) != 1:
            raise DatasetError(f"the CSV delimiter must be one character, got {delimiter!r}")
        self.delimiter = delimiter
        with open(path, "rb") as f:
            reader = self._open(f, include=False, on_invalid=lambda row: "skip")
            names = reader.schema.names
        self._check_names(names, "header")

    def _open(self, f, include: bool, on_invalid):
        import pyarrow.csv as pcsv

        read = self.columns.read
        try:
            return pcsv.open_csv(
                f,
                read_options=pcsv.ReadOptions(block_size=self.block_bytes, use_threads=False),
                parse_options=pcsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True,
                                                ignore_empty_lines=False, invalid_row_handler=on_invalid),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in read},
                                                    include_columns=read if include else None,
                                                    strings_can_be_null=False),
            )
        except pa.ArrowInvalid as err:
            if "Empty CSV file" in str(err):
                raise DatasetError(f"{self.path}: empty file; expected a header line") from None
            raise DatasetError(f"{self.path}: not readable as CSV: {err}") from None

    def pieces(self, progress: Callable[[int], None]) -> Iterator[Piece]:
        invalid: list[tuple[int, int, int]] = []  # (row number, expected fields, actual fields)

        def on_invalid(row) -> str:
            invalid.append((row.number if row.number is not None else -1, row.expected_columns, row.actual_columns))
            return "skip"

        sep = SEPARATOR_NAMES.get(self.delimiter, repr(self.delimiter))
        delivered = 0  # rows delivered so far (the reader's rejects excluded)
        reported = 0  # rejects handed on so far
        known = np.zeros(0, dtype=np.int64)  # row numbers of the rejects seen so far
        done = 0
        with open(self.path, "rb") as f:
            reader = self._open(f, include=True, on_invalid=on_invalid)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    batch = None
                except pa.ArrowInvalid as err:
                    near = int(self._lines(delivered, 1, known)[0])
                    raise DatasetError(f"{self.path}: unreadable CSV near line {near}: {err}") from None
                if len(invalid) > len(known):
                    fresh = np.array([r[0] for r in invalid[len(known):]], dtype=np.int64)
                    known = np.concatenate([known, fresh])
                n = 0 if batch is None else batch.num_rows
                lines = self._lines(delivered, n, known)
                delivered += n
                if batch is None:
                    upto = len(invalid)
                else:  # the rejects among this batch's lines; later ones wait for their batch
                    upto = reported + int(np.searchsorted(known[reported:], lines[-1], side="right")) if n else reported
                rejected = [(num, f"expected {exp} {sep}-separated fields, got {got}")
                            for num, exp, got in invalid[reported:upto]]
                reported = upto
                position = f.tell()
                progress(max(0, position - done))
                done = max(done, position)
                if batch is None:
                    if rejected:
                        yield self.no_rows(rejected)
                    return
                yield self._piece(batch, lines, rejected)

    @staticmethod
    def _lines(delivered: int, n: int, rejected: np.ndarray) -> np.ndarray:
        """Line numbers of the delivered rows delivered..delivered+n-1, given the row
        numbers of the rows the reader rejected (ascending; -1: unknown, ignored): data
        starts at line 2, and every rejected row before a row moves it down one."""
        rows = np.arange(delivered, delivered + n, dtype=np.int64)
        known = rejected[rejected >= 0]
        before = known - 2 - np.arange(len(known))  # delivered rows ahead of each rejected row
        return rows + 2 + np.searchsorted(before, rows, side="right")

    def _piece(self, batch: pa.RecordBatch, lines: np.ndarray, rejected) -> Piece:
        cols = self.columns
        arrays = [batch.column(c) for c in cols.read]
        blank = np.ones(batch.num_rows, dtype=bool)
        for arr in arrays:
            blank &= _bools(pc.equal(pc.binary_length(arr), 0))
        blanks = int(blank.sum())
        if blanks:
            keep = pa.array(~blank)
            arrays = [pc.filter(a, keep) for a in arrays]
            lines = lines[~blank]
        columns = {c: _normalize(a, c, cols.separators.get(c), keep_numbers=False) for c, a in zip(cols.read, arrays)}
        return Piece(columns, lines, rejected, blanks)


class _ParquetSource(_Source):
    format = "parquet"

    def __init__(self, path: str, index: int, columns: Columns, block_bytes: int) -> None:
        super().__init__(path, index, columns, block_bytes)
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as err:
            raise DatasetError(f"{path}: not a readable Parquet file: {err}") from None
        schema = self.file.schema_arrow
        self._check_names(schema.names, "schema")
        for col in columns.read:
            try:  # the types decoding will see, checked on an empty column of each
                _normalize(pa.array([], schema.field(col).type), col, columns.separators.get(col), True)
            except (_Unusable, pa.ArrowNotImplementedError, pa.ArrowInvalid) as err:
                raise DatasetError(f"{path}: {err}" if isinstance(err, _Unusable)
                                   else f"{path}: column {col!r} of type {schema.field(col).type} is not usable: "
                                   f"{err}") from None

    def where(self, line: int) -> str:
        return f"{self.path}: row {line}"

    def pieces(self, progress: Callable[[int], None]) -> Iterator[Piece]:
        cols = self.columns
        total = max(self.file.metadata.num_rows, 1)
        row = 0
        for batch in self.file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols.read, use_threads=False):
            n = batch.num_rows
            columns = {c: _normalize(batch.column(c), c, cols.separators.get(c), keep_numbers=True) for c in cols.read}
            yield Piece(columns, np.arange(row + 1, row + n + 1, dtype=np.int64))
            progress(int(self.size * n / total))
            row += n


class _JsonSource(_Source):
    format = "jsonl"

    def pieces(self, progress: Callable[[int], None]) -> Iterator[Piece]:
        seen: set[str] = set()
        for block in iter_line_blocks(self.path, self.block_bytes, progress=progress):
            visible = block.a != 32
            visible &= block.a != 9
            visible &= block.a != 13
            visible &= block.a != 10
            seen_before = np.concatenate([[0], np.cumsum(visible)])  # visible bytes before each offset
            lines = np.flatnonzero(seen_before[block.ends] > seen_before[block.starts])  # the non-blank lines
            parsed, rejected = self._parse(block, lines, 0, len(lines), seen)
            rejected = [(block.first_line + i, reason) for i, reason in rejected]
            if not parsed:
                yield self.no_rows(rejected)
                continue
            columns = {c: pa.concat_arrays([p[0][c] for p in parsed]) for c in self.columns.read}
            yield Piece(columns, block.first_line + np.concatenate([p[1] for p in parsed]), rejected)
        missing = [c for c in self.columns.read if c not in seen]
        if missing:
            raise DatasetError(f"{self.path}: no line has the field {missing[0]!r}")

    def _parse(self, block: LineBlock, lines: np.ndarray, lo: int, hi: int, seen: set[str]):
        """Parse lines[lo:hi] (block-local indices): ([(columns, local lines)], [(local line,
        reason)]); a range that does not parse as one is split in two, down to single lines."""
        import pyarrow.json as pj

        if lo >= hi:
            return [], []
        start, end = int(block.starts[lines[lo]]), int(block.nl[lines[hi - 1]]) + 1
        try:
            table = pj.read_json(io.BytesIO(block.data[start:end]),
                                 read_options=pj.ReadOptions(use_threads=False, block_size=max(end - start, 1 << 16)))
            if table.num_rows != hi - lo:
                raise _Unusable("more than one JSON value on a line")
            columns = {}
            for c in self.columns.read:
                if c in table.column_names:
                    columns[c] = _normalize(table.column(c), c, self.columns.separators.get(c), keep_numbers=False)
                else:
                    columns[c] = pa.nulls(hi - lo, self.column_type(c))
            seen.update(c for c in self.columns.read if c in table.column_names)
            return [(columns, lines[lo:hi])], []
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, _Unusable) as err:
            if hi - lo == 1:
                return [], [(int(lines[lo]), _json_reason(err))]
            mid = (lo + hi) // 2
            first, bad_first = self._parse(block, lines, lo, mid, seen)
            second, bad_second = self._parse(block, lines, mid, hi, seen)
            return first + second, bad_first + bad_second


def _json_reason(err: Exception) -> str:
    if isinstance(err, _Unusable):
        return str(err)
    text = str(err).split(" in row ")[0].replace("JSON parse error: ", "")
    return f"not a JSON object with usable values ({text})"


def _open_source(path: str, index: int, columns: Columns, input_format: str | None, delimiter: str | None,
                 block_bytes: int) -> _Source:
    fmt = input_format
    if fmt is None:
        ext = os.path.splitext(path)[1].lower()
        fmt = EXTENSION_FORMATS.get(ext)
        if fmt is None:
            raise DatasetError(f"{path}: cannot tell the format from {ext or 'no extension'!r}; "
                               f"give one of {', '.join(INPUT_FORMATS)}")
    if fmt == "csv":
        default = "\t" if path.lower().endswith(".tsv") else ","
        return _CsvSource(path, index, columns, block_bytes, delimiter or default)
    if fmt == "parquet":
        return _ParquetSource(path, index, columns, block_bytes)
    if fmt == "jsonl":
        return _JsonSource(path, index, columns, block_bytes)
    raise DatasetError(f"input format must be one of {', '.join(INPUT_FORMATS)}, got {fmt!r}")


# --------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """A piece's good rows, decoded: labels, raw dense values (missing -> 0), keys."""

    lines: np.ndarray
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float64 [D, n]
    features: list[FeatureKeys]

    def select(self, rows: np.ndarray) -> "Decoded":
        features = [f.select(rows) for f in self.features]
        return Decoded(self.lines[rows], self.labels[rows], self.dense[:, rows], features)


def _decode(source: _Source, piece: Piece, threshold: float | None, bad: BadLines | None) -> Decoded:
    """Decode a piece; its bad rows (value problems and the reader's rejects, in line
    order) go to `bad` (None: already reported in an earlier pass) and are left out."""
    cols = source.columns
    n = len(piece.lines)
    labels, label_problem = _labels(piece.columns[cols.label], threshold)
    dense = np.zeros((len(cols.dense), n), dtype=np.float64)
    problems = [label_problem]
    for j, c in enumerate(cols.dense):
        dense[j], _, problem = _numbers(piece.columns[c])
        problems.append(problem)
    problem_matrix = np.stack(problems)  # [1 + D, n]
    rows_bad = (problem_matrix != _OK).any(axis=0)
    if bad is not None:
        _report(source, piece, problem_matrix, rows_bad, bad)
    good = ~rows_bad
    features = [_feature_keys(piece.columns[c], c in cols.separators) for c in cols.sparse]
    decoded = Decoded(piece.lines, labels, dense, features)
    return decoded if good.all() else decoded.select(good)


def _report(source: _Source, piece: Piece, problem_matrix: np.ndarray, rows_bad: np.ndarray, bad: BadLines) -> None:
    cols = source.columns
    names = [cols.label, *cols.dense]
    bad_rows = np.flatnonzero(rows_bad)
    rejected_lines = np.array([line for line, _ in piece.rejected], dtype=np.int64)
    lines = np.concatenate([piece.lines[bad_rows], rejected_lines])
    order = np.argsort(lines, kind="stable")

    def message(k: int) -> str:
        i = int(order[k])
        if i >= len(bad_rows):
            line, reason = piece.rejected[i - len(bad_rows)]
            return f"{source.where(line)}: {reason}"
        row = int(bad_rows[i])
        column = int(np.flatnonzero(problem_matrix[:, row])[0])
        name, code = names[column], int(problem_matrix[column, row])
        if code == _MISSING_LABEL:
            return f"{source.where(int(piece.lines[row]))}: column {name!r}: missing label"
        shown = show_field(str(piece.columns[name][row].as_py()).encode())
        return f"{source.where(int(piece.lines[row]))}: column {name!r}: {shown} {_PROBLEMS[code]}"

    bad.report_each(len(lines), message)


# --------------------------------------------------------------------------- fitting
class _Moments:
    """Streaming mean and variance per dense column (Chan et al.'s pairwise merge)."""

    def __init__(self, columns: int) -> None:
        self.n = 0
        self.mean = np.zeros(columns)
        self.m2 = np.zeros(columns)

    def add(self, x: np.ndarray) -> None:  # x: [D, k]
        k = x.shape[1]
        if k == 0:
            return
        mean = x.mean(axis=1)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * k / total)
        self.n = total

    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(self.n, 1))
        return np.where(std > 0, std, 1.0)


def _eval_rows(seed: int, index: int, lines: np.ndarray, fraction: float) -> np.ndarray:
    """The seeded split: rows whose hash of (seed, input index, line) is below the fraction."""
    h = mix(np.uint64(seed), np.uint64(index), lines.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


# --------------------------------------------------------------------------- driver
def prepare_tabular(
    inputs: Sequence[str],
    out: str,
    *,
    label: str,
    dense: Sequence[str] = (),
    sparse: Sequence[str] = (),
    multi_hot: dict[str, str] | None = None,
    dense_transform: str = "log1p",
    min_count: int = 1,
    hash_buckets: int | None = None,
    label_threshold: float | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
    pooling: str = "sum",
    input_format: str | None = None,
    delimiter: str | None = None,
    on_bad_line: str = "error",
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression: str | None = DEFAULT_COMPRESSION,
    progress: bool | None = None,
) -> PrepareResult:
    """Convert the user's tables to a dataset at `out` (see the module docstring).
    Every argument and every input's columns are checked before any output exists."""
    start = time.perf_counter()
    paths = check_inputs(inputs)
    bad = BadLines(on_bad_line)
    columns = make_columns(label, dense, sparse, multi_hot)
    if dense_transform not in DENSE_TRANSFORMS:
        raise DatasetError(f"dense transform must be one of {', '.join(DENSE_TRANSFORMS)}, got {dense_transform!r}")
    if pooling not in POOLINGS:
        raise DatasetError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if min_count < 1:
        raise DatasetError(f"min_count must be >= 1, got {min_count}")
    if hash_buckets is not None and (hash_buckets < 1 or min_count != 1):
        raise DatasetError(f"hash_buckets must be >= 1 and excludes min_count (vocabulary mode only), got "
                           f"{hash_buckets} buckets and min_count {min_count}")
    if label_threshold is not None and not math.isfinite(label_threshold):
        raise DatasetError(f"label threshold must be a finite number, got {label_threshold}")
    if eval_fraction is not None and not 0.0 < eval_fraction < 1.0:
        raise DatasetError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    if block_bytes < 1024:
        raise DatasetError(f"block_bytes must be at least 1024, got {block_bytes}")
    sources = [_open_source(p, i, columns, input_format, delimiter, block_bytes) for i, p in enumerate(paths)]
    check_output_path(out, overwrite)

    split = eval_fraction is not None
    training = sources if split or len(sources) == 1 else sources[:-1]
    vocab_mode = hash_buckets is None
    fit = vocab_mode or dense_transform == "standardize"
    validated: set[int] = set()
    blank = 0
    passes_bytes = sum(s.size for s in training) * fit + sum(s.size for s in sources)
    bar = progress_bar(passes_bytes, "tabular", progress)

    def decoded(source: _Source) -> Iterator[Decoded]:
        """A source's decoded pieces; its bad rows are reported in the first pass over it."""
        nonlocal blank
        first = source.index not in validated
        for piece in source.pieces(bar.update):
            if first:
                blank += piece.blank
            yield _decode(source, piece, label_threshold, bad if first else None)
        validated.add(source.index)

    def train_rows(source: _Source, d: Decoded) -> np.ndarray:
        return ~_eval_rows(int(seed), source.index, d.lines, eval_fraction) if split else np.ones(len(d.lines), bool)

    try:
        moments = _Moments(len(columns.dense))
        counters = [KeyCounter() for _ in columns.sparse] if vocab_mode else []
        if fit:
            for source in training:
                for d in decoded(source):
                    d = d.select(train_rows(source, d)) if split else d
                    if dense_transform == "standardize":
                        moments.add(d.dense)
                    for counter, feature in zip(counters, d.features):
                        counter.add(feature.counted_keys())
        if vocab_mode:
            vocabs = [c.vocabulary(min_count) for c in counters]
            del counters
            lookups = [make_lookup(v) for v in vocabs]
            cards = [len(v) + 1 for v in vocabs]
        else:
            cards = [int(hash_buckets)] * len(columns.sparse)
        mean, std = moments.mean, moments.std()

        def ids(f: int, feature: FeatureKeys) -> np.ndarray:
            if vocab_mode:
                return lookups[f].lookup(feature.keys, feature.present)
            out_ids = (feature.keys % np.uint64(hash_buckets)).view(np.int64)
            out_ids[~feature.present] = 0
            return out_ids

        def dense_values(x: np.ndarray) -> np.ndarray:
            if dense_transform == "log1p":
                return np.log1p(np.maximum(x, 0.0)).astype(np.float32)
            if dense_transform == "standardize":
                return ((x - mean[:, None]) / std[:, None]).astype(np.float32)
            return x.astype(np.float32)

        info = _describe(sources, columns, dense_transform, mean, std, vocab_mode, min_count, hash_buckets,
                         label_threshold, eval_fraction, seed, on_bad_line, len(training))
        meta = DatasetMeta(
            dense_features=list(columns.dense),
            sparse_features=list(columns.sparse),
            cardinalities=cards,
            source="tabular",
            preprocessing=info,
            tables=[TableMeta(c, n, pooling, [c]) for c, n in zip(columns.sparse, cards)],
            multi_hot=columns.multi_hot,
        )
        multi = [f for f, c in enumerate(columns.sparse) if c in columns.separators]

        def write(writer, d: Decoded) -> None:
            n = len(d.labels)
            sparse_ids = np.zeros((len(columns.sparse), n), dtype=np.int64)
            bags = {}
            for f, feature in enumerate(d.features):
                if feature.offsets is None:
                    sparse_ids[f] = ids(f, feature)
                else:
                    bags[f] = Bags(ids(f, feature), feature.offsets)
            writer.write(d.labels, dense_values(d.dense).T, sparse_ids, bags if multi else None)

        part_rows, parts = [], []
        with DatasetWriter(out, overwrite=overwrite, row_group_size=row_group_size, compression=compression) as w:
            if split:
                writers = [w.open_part(0, meta), w.open_part(1, meta)]
                parts = [os.path.basename(x.path) for x in writers]
            for source in sources:
                if not split:
                    writer = w.open_part(source.index, meta)
                    parts.append(os.path.basename(writer.path))
                for d in decoded(source):
                    if split:
                        to_eval = _eval_rows(int(seed), source.index, d.lines, eval_fraction)
                        write(writers[0], d.select(~to_eval))
                        write(writers[1], d.select(to_eval))
                    else:
                        write(writer, d)
                if not split:
                    part_rows.append(writer.close())
                    if part_rows[-1] == 0:  # (inside the writer's block: nothing is committed)
                        raise DatasetError(f"{source.path}: no data rows"
                                           + (f" ({bad.count} bad rows skipped so far)" if bad.count else ""))
            if split:
                part_rows = [x.close() for x in writers]
                for side, rows in zip(("train", "eval"), part_rows):
                    if rows == 0:
                        raise DatasetError(f"--eval-fraction {eval_fraction} left the {side} split empty "
                                           f"({sum(part_rows)} rows in all)")
    finally:
        bar.close()
    return PrepareResult.finished(out, "tabular", parts, part_rows, bad, cards, start, meta,
                                  dict(info, blank_lines=blank))


def _describe(sources, columns: Columns, dense_transform, mean, std, vocab_mode, min_count, hash_buckets,
              label_threshold, eval_fraction, seed, on_bad_line, training: int) -> dict:
    """The metadata's preprocessing notes: enough to redo the conversion on new rows."""
    info = {
        "converter": "bagpipe.datasets.tabular",
        "inputs": [os.path.basename(s.path) for s in sources],
        "input_formats": [s.format for s in sources],
        "label": {"column": columns.label,
                  "rule": "0/1 (or true/false)" if label_threshold is None else f"1 when value >= {label_threshold}",
                  "threshold": label_threshold},
        "dense": {"columns": list(columns.dense), "missing": 0.0, "transform": dense_transform},
        "sparse": {"columns": list(columns.sparse), "multi_hot": {c: columns.separators[c] for c in columns.multi_hot},
                   "key": "splitmix64 chain over the trimmed value's UTF-8 bytes (bagpipe.datasets.text.hash_spans)",
                   "missing_id": 0},
        "missing_values": list(MISSING_VALUES),
        "on_bad_line": on_bad_line,
    }
    if dense_transform == "log1p":
        info["dense"]["rule"] = "log(1 + max(x, 0))"
    if dense_transform == "standardize":
        info["dense"].update(rule="(x - mean) / std over the training rows", mean=[float(v) for v in mean],
                             std=[float(v) for v in std])
    if vocab_mode:
        info["sparse"]["ids"] = {"mode": "vocabulary", "min_count": min_count, "oov_id": 0,
                                 "order": "values of the training rows seen min_count+ times, by increasing key"}
    else:
        info["sparse"]["ids"] = {"mode": "hash", "buckets": int(hash_buckets), "rule": "key % buckets"}
    if eval_fraction is not None:
        info["eval_split"] = {"fraction": eval_fraction, "seed": int(seed),
                              "rule": "eval when splitmix64 mix(seed, input index, line) / 2^64 < fraction; "
                                      "part 0 train, part 1 eval"}
    else:
        info["eval_split"] = "last part" if len(sources) >= 2 else "none"
    info["training_inputs"] = training if eval_fraction is None else len(sources)
    return info
