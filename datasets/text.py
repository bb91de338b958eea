"""The text-to-Parquet engine every raw-log converter is built on.

Why one engine: Criteo's TSV and Avazu's CSV (and any later click log) differ only
in how a line splits into a label, dense counts and categorical values. Reading
files in blocks of whole lines, vectorised field decoding, the bad-line policy,
the vocabulary pass, id mapping and the Parquet output are the same, so they live
here once and each converter stays a small, format-only module.

How a conversion runs (`convert_text`): every input file becomes one part, in
input order (the last one is the eval split by convention). A file is read in
blocks of whole lines (`iter_raw_blocks`), parsed on ``threads`` threads and
consumed in file order (`ordered_map`), so bad-line reports carry exact 1-based
line numbers and come in line order. Categorical tables are either

- **fixed**: the parser gives the ids directly (e.g. Avazu's hour of day), capped
  by ``max_ind_range`` when one is given, or
- **keyed**: the parser gives 64-bit keys (`parse_hex`, `hash_fields`) and a
  presence mask; then either **modulo mode** (``max_ind_range=N``: ``id = key % N``,
  missing -> 0, cardinality N) or **vocabulary mode** (no cap: a first streaming
  pass counts every key per table over *all* inputs, `KeyCounter`; keys seen at
  least ``min_count`` times get ids ``1..V`` in increasing key order, rarer and
  missing ones share id 0, cardinality ``V + 1``; lookups through the vectorised
  hash index `VocabIndex`).

Memory is bounded by a few blocks plus, in vocabulary mode, the distinct keys.
A line the parser rejects is a *bad line*: ``on_bad_line="error"`` raises
`DatasetError` ``"<file>:<line>: <reason>"`` and leaves no output at all;
``"skip"`` drops such lines, counts them and reports the first few
(`PrepareResult`). Output is built under a temporary name and renamed when
complete (`writer.DatasetWriter`); an existing non-empty ``out`` is refused
unless ``overwrite=True``.

What a converter provides (`TextFormat`): its source name, the number of dense
features, the cardinalities of its fixed tables and the number of keyed tables,
the preprocessing description stored in the metadata, and per input file a
`TextFile`: where the data lines start (after a header, say) and two functions,
``parse(block, want_dense) -> Rows`` (vectorised over a `LineBlock`, built from
`LineBlock.split`, `binary_labels`, `parse_dec`, `parse_hex`, `hash_fields`) and
``reason(line) -> str`` (why a rejected line is bad, for messages only).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from bagpipe.hashing import splitmix64

from .format import DatasetError, DatasetMeta, default_feature_names
from .writer import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE, DatasetWriter, check_output_path

BAD_LINE_POLICIES = ("error", "skip")
MAX_EXAMPLES = 5
DEFAULT_BLOCK_BYTES = 4 << 20
MAX_DEC_DIGITS = 18
MAX_HEX_DIGITS = 16
LOOKUP_HASH_MIN = 4  # vocabularies at least this large use the hash index (faster from ~5 keys)

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"abcdef"):
    _HEX_LUT[_c] = 10 + _i
    _HEX_LUT[_c - 32] = 10 + _i
_DEC_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789"):
    _DEC_LUT[_c] = _i
_POW10 = np.array([10**k for k in range(MAX_DEC_DIGITS)][::-1], dtype=np.int64)


# --------------------------------------------------------------------------- results
@dataclass
class PrepareResult:
    """What a conversion wrote; `summary()` is the CLI's report."""

    out: str
    source: str
    parts: list[str]
    part_rows: list[int]
    rows: int
    bad_lines: int
    bad_examples: list[str]
    cardinalities: list[int]
    seconds: float
    meta: DatasetMeta | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def finished(cls, out: str, source: str, parts: list[str], part_rows: list[int], bad: "BadLines",
                 cardinalities: list[int], start: float, meta: DatasetMeta, info: dict) -> "PrepareResult":
        """What a conversion that began at `start` (`time.perf_counter`) wrote: `parts` are
        file names inside `out`."""
        out_abs = os.path.abspath(out)
        return cls(
            out=out_abs,
            source=source,
            parts=[os.path.join(out_abs, p) for p in parts],
            part_rows=part_rows,
            rows=sum(part_rows),
            bad_lines=bad.count,
            bad_examples=list(bad.examples),
            cardinalities=cardinalities,
            seconds=time.perf_counter() - start,
            meta=meta,
            info=info,
        )

    def summary(self) -> str:
        lines = [
            f"wrote {len(self.parts)} parts ({self.rows:,} rows) to {self.out} in {self.seconds:.1f} s"
            f" ({self.rows / max(self.seconds, 1e-9):,.0f} rows/s); {len(self.cardinalities)} tables,"
            f" {sum(self.cardinalities):,} embedding rows"
            + ("; the last part is the eval split" if len(self.parts) >= 2 else ""),
        ]
        if self.bad_lines:
            lines.append(f"skipped {self.bad_lines:,} bad lines; first {len(self.bad_examples)}:")
            lines += [f"  {e}" for e in self.bad_examples]
        return "\n".join(lines)


class BadLines:
    """Bad-line policy: raise on the first, or count and keep a few examples."""

    def __init__(self, policy: str) -> None:
        if policy not in BAD_LINE_POLICIES:
            raise DatasetError(f"on_bad_line must be one of {', '.join(BAD_LINE_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.count = 0
        self.examples: list[str] = []

    def report(self, path: str, block: "LineBlock", bad_local: np.ndarray, reason: Callable[[bytes], str]) -> None:
        """bad_local: sorted local line indices of the block's bad lines."""
        def message(k: int) -> str:
            i = int(bad_local[k])
            return f"{path}:{block.first_line + i}: {reason(block.line(i))}"

        self.report_each(int(bad_local.size), message)

    def report_each(self, count: int, message: Callable[[int], str]) -> None:
        """`count` bad lines in line order, the k-th described by ``message(k)`` (called
        only for the lines a report shows)."""
        if count == 0:
            return
        if self.policy == "error":
            raise DatasetError(message(0))
        self.examples += [message(k) for k in range(min(count, max(0, MAX_EXAMPLES - len(self.examples))))]
        self.count += count


# --------------------------------------------------------------------------- line blocks
class LineBlock:
    """Whole lines of a file as one uint8 array, with their start/end offsets."""

    def __init__(self, data: bytes, first_line: int) -> None:
        self.data = data
        self.a = np.frombuffer(data, dtype=np.uint8)
        self.first_line = first_line  # 1-based number of the block's first line
        nl = np.flatnonzero(self.a == 10)
        self.nl = nl
        n = len(nl)
        self.starts = np.empty(n, dtype=np.int64)
        if n:
            self.starts[0] = 0
            self.starts[1:] = nl[:-1] + 1
        ends = nl.astype(np.int64, copy=True)
        if n:
            cr = (ends > self.starts) & (self.a[np.maximum(ends - 1, 0)] == 13)
            ends[cr] -= 1
        self.ends = ends  # exclusive, CR stripped
        self._words: np.ndarray | None = None

    @property
    def words(self) -> np.ndarray:
        """The block as little-endian uint64 words, zero padded (for `load_words`)."""
        if self._words is None:
            self._words = padded_words(self.data)
        return self._words

    @property
    def num_lines(self) -> int:
        return len(self.nl)

    def line(self, i: int) -> bytes:
        return self.data[self.starts[i] : self.ends[i]]

    def split(self, sep: int, nfields: int) -> tuple[np.ndarray, np.ndarray]:
        """(good, bounds): good[L] marks lines with exactly `nfields` fields;
        bounds [nfields + 1, G] (field-major) for those lines: field k spans
        ``[bounds[k] + 1, bounds[k + 1])``."""
        a = self.a
        L = self.num_lines
        is_sep = a == sep
        is_sep |= a == 10
        marks = np.flatnonzero(is_sep)  # every separator and newline, in order
        if len(marks) == nfields * L and (L == 0 or (a.take(marks[nfields - 1 :: nfields]) == 10).all()):
            # common case: every line has the right field count
            good = np.ones(L, dtype=bool)
            m = marks.reshape(L, nfields)
            bounds = np.empty((nfields + 1, L), dtype=np.int64)
            bounds[0] = self.starts
            bounds[0] -= 1
            bounds[1:nfields] = m[:, : nfields - 1].T
            bounds[nfields] = self.ends
            return good, bounds
        seps = marks[a.take(marks) == sep]
        before = np.searchsorted(seps, self.nl)  # separators before each newline
        counts = np.diff(before, prepend=0)
        good = counts == nfields - 1
        gs = seps[np.repeat(good, counts)].reshape(-1, nfields - 1)
        G = gs.shape[0]
        bounds = np.empty((nfields + 1, G), dtype=np.int64)
        bounds[0] = self.starts[good] - 1
        bounds[1:nfields] = gs.T
        bounds[nfields] = self.ends[good]
        return good, bounds

    def fields(self, sep: int, nfields: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(good, starts, ends) as in `split`: field k of the good lines spans
        ``[starts[k], ends[k])``, both [nfields, G]."""
        good, bounds = self.split(sep, nfields)
        return good, bounds[:nfields] + 1, bounds[1:]


def padded_words(data: bytes) -> np.ndarray:
    """Bytes as little-endian uint64 words, zero padded so `load_words` may read 16
    bytes past any offset."""
    pad = (-len(data)) % 8 + 16
    return np.frombuffer(bytes(data) + bytes(pad), dtype="<u8")


def iter_raw_blocks(path: str, block_bytes: int = DEFAULT_BLOCK_BYTES, *, start_offset: int = 0,
                    progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Blocks of whole lines of a file from byte `start_offset` on (a final line
    without newline gets one). Line numbers are assigned by the consumer from
    `LineBlock.num_lines`, so the reader does not scan the bytes."""
    with open(path, "rb") as f:
        f.seek(start_offset)
        carry = b""
        while True:
            data = f.read(block_bytes)
            if progress is not None and data:
                progress(len(data))
            if not data:
                if carry:
                    yield carry + b"\n"
                return
            buf = carry + data if carry else data
            cut = buf.rfind(b"\n")
            if cut < 0:
                carry = buf
                continue
            carry = buf[cut + 1 :]
            yield buf[: cut + 1]


def iter_line_blocks(path: str, block_bytes: int = DEFAULT_BLOCK_BYTES, *, first_line: int = 1,
                     **kw) -> Iterator[LineBlock]:
    """`LineBlock`s of a file with their line numbers."""
    for data in iter_raw_blocks(path, block_bytes, **kw):
        block = LineBlock(data, first_line)
        first_line += block.num_lines
        yield block


def ordered_map(fn: Callable, items: Iterator, threads: int = 2, ahead: int | None = None) -> Iterator:
    """``map(fn, items)`` in order, computed `ahead` items in advance on a thread
    pool (numpy and pyarrow release the GIL for the heavy work)."""
    if threads <= 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ahead = ahead or 2 * threads
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bagpipe-parse")
    queue: deque = deque()
    finished = False
    try:
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) > ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
        finished = True
    finally:
        for fut in queue:
            fut.cancel()
        # Join the workers only on normal exhaustion. An abandoned generator (its consumer
        # raised) is closed by the garbage collector, which may run inside another thread's
        # start-up; joining threads there deadlocks (seen in the test suite).
        pool.shutdown(wait=finished, cancel_futures=True)


# --------------------------------------------------------------------------- field parsers
_ONES = np.uint64(0x0101010101010101)
_ASCII0 = np.uint64(0x3030303030303030)
_LO8 = np.uint64(0x00FF00FF00FF00FF)
_LO16 = np.uint64(0x0000FFFF0000FFFF)
_LO32 = np.uint64(0xFFFFFFFF)
# FILL[k]: '0' bytes in the low 8 - k bytes (left padding of a k-char field)
_FILL = np.array([0x3030303030303030 & ((1 << (8 * (8 - k))) - 1) for k in range(9)], dtype=np.uint64)
_ALIGN_SHIFT = np.array([8 * (8 - k) if k else 0 for k in range(9)], dtype=np.uint64)
# BYTE_MASK[k]: the low k bytes of a word
_BYTE_MASK = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: Fibonacci-hashing multiplier


def load_words(words: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The 8 bytes starting at each byte offset `pos` (>= 0), as little-endian uint64."""
    upos = pos.view(np.uint64)
    sh = upos & np.uint64(7)
    sh <<= np.uint64(3)
    j = pos >> 3
    lo = words.take(j)
    lo >>= sh
    j += 1
    hi = words.take(j)
    np.subtract(np.uint64(63), sh, out=sh)
    hi <<= sh
    hi <<= np.uint64(1)  # two steps: a shift by 64 must give 0
    lo |= hi
    return lo


def _right_align(words: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Fields of 1..8 chars as uint64, right aligned and left padded with '0'."""
    x = load_words(words, pos)
    x <<= _ALIGN_SHIFT.take(width)
    x |= _FILL.take(width)
    return x


def decode_dec8(words: np.ndarray, pos: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SWAR decimal of 1..8 digit fields at byte offsets `pos` of `LineBlock.words`:
    (values int64, ok)."""
    x = _right_align(words, pos, width)
    b = x.view(np.uint8)
    d = b - 48
    ok = (d < 10).view(np.uint64) == _ONES
    x -= _ASCII0
    y = x >> np.uint64(8)
    y &= _LO8
    x &= _LO8
    x *= np.uint64(10)
    x += y
    np.right_shift(x, np.uint64(16), out=y)
    y &= _LO16
    x &= _LO16
    x *= np.uint64(100)
    x += y
    np.right_shift(x, np.uint64(32), out=y)
    x &= _LO32
    x *= np.uint64(10000)
    x += y
    return x.view(np.int64), ok


def decode_hex8(words: np.ndarray, pos: np.ndarray, width: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """SWAR hexadecimal of 1..8 digit fields (either case): (values uint64, ok).
    ``width=None``: every field has exactly 8 digits."""
    x = load_words(words, pos) if width is None else _right_align(words, pos, width)
    b = x.view(np.uint8)
    low = b | 32
    low -= 97
    ok = low < 6
    low = b - 48
    ok |= low < 10
    ok = ok.view(np.uint64) == _ONES
    # digit: c & 15; letter: (c & 15) + 9 (bit 6 set)
    y = x >> np.uint64(6)
    y &= _ONES
    y *= np.uint64(9)
    x &= np.uint64(0x0F0F0F0F0F0F0F0F)
    x += y
    np.right_shift(x, np.uint64(8), out=y)
    y &= _LO8
    x &= _LO8
    x <<= np.uint64(4)
    x += y
    np.right_shift(x, np.uint64(16), out=y)
    y &= _LO16
    x &= _LO16
    x <<= np.uint64(8)
    x += y
    np.right_shift(x, np.uint64(32), out=y)
    x &= _LO32
    x <<= np.uint64(16)
    x += y
    return x, ok


def _digit_matrix(a: np.ndarray, fend: np.ndarray, width: np.ndarray, W: int,
                  lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digit values (by `lut`, 255 = not a digit) of the fields ending at fend
    (exclusive), right aligned in an [n, W] matrix with zeros on the left, and
    whether each field is all digits."""
    k = np.arange(W, dtype=np.int64)
    idx = fend[:, None] - W + k
    np.maximum(idx, 0, out=idx)
    d = lut.take(a.take(idx))
    d[k < (W - width)[:, None]] = 0
    not_digit = d == 255
    ok = ~not_digit.any(axis=1)
    d[not_digit] = 0
    return d, ok


def _decode_long_dec(a: np.ndarray, fend: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal digits right before fend (any width <= MAX_DEC_DIGITS): (values, ok)."""
    W = int(digits.max())
    d, ok = _digit_matrix(a, fend, digits, W, _DEC_LUT)
    return d.astype(np.int64) @ _POW10[MAX_DEC_DIGITS - W :], ok


def _decode_long_hex(a: np.ndarray, fend: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hex digits right before fend (any width <= MAX_HEX_DIGITS): (values, ok)."""
    d, ok = _digit_matrix(a, fend, width, MAX_HEX_DIGITS, _HEX_LUT)
    packed = (d[:, 0::2] << 4) | d[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8")[:, 0].astype(np.uint64), ok


def _redo_long_fields(values: np.ndarray, bad: np.ndarray, digits: np.ndarray, max_digits: int,
                      decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    """Fields of more digits than the 8 the SWAR path reads: those over `max_digits`
    are bad, the others get ``decode(indices)``'s values (in place)."""
    long = np.flatnonzero(digits > 8)
    if long.size == 0:
        return
    too_long = digits[long] > max_digits
    bad[long] = too_long
    fit = long[~too_long]
    if fit.size:
        v, ok = decode(fit)
        values[fit] = v
        bad[fit] = ~ok


def parse_dec(block: "LineBlock", fstart: np.ndarray, fend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed decimal integers (up to 18 digits): (values int64, missing, bad)."""
    a = block.a
    width = fend - fstart
    missing = width == 0
    if len(fstart) == 0:
        return np.zeros(0, np.int64), missing, np.zeros(0, bool)
    neg = a.take(fstart) == 45  # '-' (fstart is at most the newline's offset)
    neg &= ~missing
    digits = width - neg
    values, ok = decode_dec8(block.words, fstart + neg, np.clip(digits, 1, 8))
    bad = ~ok
    bad &= ~missing
    _redo_long_fields(values, bad, digits, MAX_DEC_DIGITS, lambda i: _decode_long_dec(a, fend[i], digits[i]))
    np.negative(values, out=values, where=neg)
    return values, missing, bad


def parse_hex(block: "LineBlock", fstart: np.ndarray, fend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hexadecimal values (1..16 digits, either case): (values uint64, missing, bad)."""
    width = fend - fstart
    missing = width == 0
    if len(fstart) == 0:
        return np.zeros(0, np.uint64), missing, np.zeros(0, bool)
    all8 = ((width == 8) | missing).all()
    values, ok = decode_hex8(block.words, fstart, None if all8 else np.clip(width, 1, 8))
    bad = ~ok
    bad &= ~missing
    _redo_long_fields(values, bad, width, MAX_HEX_DIGITS, lambda i: _decode_long_hex(block.a, fend[i], width[i]))
    return values, missing, bad


def binary_labels(block: "LineBlock", fstart: np.ndarray, fend: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Click labels from ``0``/``1`` fields: (labels float32, ok: the field is exactly one of those)."""
    char = block.a.take(fstart)
    ok = fend - fstart == 1
    ok &= (char == 48) | (char == 49)
    return (char == 49).astype(np.float32), ok


def hash_fields(block: "LineBlock", fstart: np.ndarray, fend: np.ndarray) -> np.ndarray:
    """64-bit keys of byte-string fields (splitmix64 chain over 8-byte words and the length)."""
    return hash_spans(block.words, fstart, fend)


def hash_spans(words: np.ndarray, fstart: np.ndarray, fend: np.ndarray) -> np.ndarray:
    """`hash_fields` over any `padded_words` buffer (int64 byte offsets; stable across
    runs and machines: a pure function of the bytes)."""
    width = fend - fstart
    h = width.view(np.uint64) * _GOLDEN64
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


# Message twins of the vectorised rules above: they say why a line the parser
# rejected is bad, one line at a time, for `BadLines` reports only.
def line_fields(line: bytes, sep: bytes, nfields: int, sep_name: str) -> tuple[list[bytes], str | None]:
    """A line's fields and, when `LineBlock.fields` rejects their count, why."""
    if not line:
        return [], "empty line"
    fields = line.split(sep)
    if len(fields) != nfields:
        return fields, f"expected {nfields} {sep_name}-separated fields, got {len(fields)}"
    return fields, None


def first_field_problem(checks: Iterable[tuple[str, bytes, Callable[[bytes], str | None]]]) -> str | None:
    """``"<name> '<field>' <problem>"`` for the first (name, field, problem_of) check that fails."""
    for name, value, problem_of in checks:
        problem = problem_of(value)
        if problem:
            return f"{name} {show_field(value)} {problem}"
    return None


def binary_label_problem(field: bytes) -> str | None:
    """Why `binary_labels` rejects a field, None if it does not."""
    return None if field in (b"0", b"1") else "is not 0 or 1"


def dec_field_problem(field: bytes) -> str | None:
    """Why `parse_dec` rejects a field, None if it does not."""
    digits = field[1:] if field.startswith(b"-") else field
    if field and (not digits or not digits.isdigit() or not digits.isascii()):
        return "is not an integer"
    if len(digits) > MAX_DEC_DIGITS:
        return f"has more than {MAX_DEC_DIGITS} digits"
    return None


def hex_field_problem(field: bytes) -> str | None:
    """Why `parse_hex` rejects a field, None if it does not."""
    if field and (len(field) > MAX_HEX_DIGITS or any(_HEX_LUT[c] == 255 for c in field)):
        return f"is not a hexadecimal value of 1-{MAX_HEX_DIGITS} digits"
    return None


def show_field(b: bytes, limit: int = 40) -> str:
    """A field as quoted text for a bad-line message, cut at `limit` bytes."""
    text = b[:limit].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(b) > limit else ""))


# --------------------------------------------------------------------------- vocabulary
class KeyCounter:
    """Streaming exact counts of uint64 keys: sorted unique keys + counts, merged
    in amortised batches (memory O(distinct keys))."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.uint64)
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0

    def add(self, keys: np.ndarray) -> None:
        """Count raw keys (any order, repeats allowed)."""
        if keys.size:
            self.add_counted(*np.unique(keys, return_counts=True))

    def add_counted(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add sorted unique keys with their counts (np.unique(..., return_counts=True))."""
        if keys.size == 0:
            return
        self._pending.append((keys, counts))
        self._pending_n += keys.size
        if self._pending_n >= max(len(self.keys), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:
            u, c = self._pending[0]
        else:
            k = np.concatenate([p[0] for p in self._pending])
            n = np.concatenate([p[1] for p in self._pending])
            order = np.argsort(k)
            k, n = k[order], n[order]
            first = np.empty(len(k), dtype=bool)
            first[0] = True
            np.not_equal(k[1:], k[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            u, c = k[starts], np.add.reduceat(n, starts)
        self._pending = []
        self._pending_n = 0
        c = c.astype(np.int64)
        if len(self.keys) == 0:
            self.keys, self.counts = u, c
            return
        pos = np.searchsorted(self.keys, u)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == u[found]
        self.counts[pos[found]] += c[found]  # positions are distinct: u and keys are unique
        fresh = ~found
        self.keys = np.insert(self.keys, pos[fresh], u[fresh])
        self.counts = np.insert(self.counts, pos[fresh], c[fresh])

    def vocabulary(self, min_count: int) -> np.ndarray:
        """Sorted keys seen at least `min_count` times."""
        self._merge()
        return self.keys[self.counts >= min_count]


class VocabIndex:
    """Sorted vocabulary keys -> ids 1..V, looked up through a vectorised
    open-addressing hash table (Fibonacci hashing, linear probing, load <= 1/4
    below a million keys, <= 1/2 above): a few gathers per key instead of a
    binary search, whatever the vocabulary size."""

    def __init__(self, vocab: np.ndarray) -> None:
        self.vocab = vocab
        V = len(vocab)
        spare = 4 if V < (1 << 20) else 2
        bits = max(1, int(np.ceil(np.log2(max(spare * V, 2)))))
        self.mask = np.int64((1 << bits) - 1)
        self.shift = np.uint64(64 - bits)
        size = 1 << bits
        self.slot_key = np.zeros(size, dtype=np.uint64)
        self.slot_id = np.zeros(size, dtype=np.int64)  # 0 = empty
        self.max_probe = 0
        pending_ids = np.arange(1, V + 1, dtype=np.int64)
        pos = self._home(vocab)
        probe = 0
        while pending_ids.size:
            free = self.slot_id.take(pos) == 0
            cand = np.flatnonzero(free)
            # one winner per free slot: the first pending key aiming at it
            _, first = np.unique(pos[cand], return_index=True)
            win = cand[first]
            self.slot_id[pos[win]] = pending_ids[win]
            self.slot_key[pos[win]] = vocab[pending_ids[win] - 1]
            self.max_probe = max(self.max_probe, probe)
            lose = np.ones(len(pos), dtype=bool)
            lose[win] = False
            pending_ids = pending_ids[lose]
            pos = (pos[lose] + 1) & self.mask
            probe += 1

    def _home(self, keys: np.ndarray) -> np.ndarray:
        h = keys * _GOLDEN64
        h >>= self.shift
        return h.view(np.int64)

    def lookup(self, keys: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Ids for keys (0 where absent from the vocabulary or not present)."""
        if len(self.vocab) == 0 or len(keys) == 0:
            return np.zeros(len(keys), dtype=np.int64)
        pos = self._home(keys)
        ids = self.slot_id.take(pos)
        hit = self.slot_key.take(pos) == keys
        again = np.flatnonzero(~hit & (ids != 0))  # occupied by another key: probe on
        ids[~hit] = 0
        probe = 0
        while again.size and probe < self.max_probe:
            probe += 1
            p = (pos[again] + probe) & self.mask
            sid = self.slot_id.take(p)
            h = self.slot_key.take(p) == keys[again]
            ids[again[h]] = sid[h]
            again = again[~h & (sid != 0)]
        ids[~present] = 0
        return ids


def vocab_lookup(vocab: np.ndarray, keys: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Ids 1..len(vocab) for keys in the sorted vocabulary, 0 for missing/rare ones
    (binary search; `VocabIndex` is the fast equivalent)."""
    if len(vocab) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    pos = np.searchsorted(vocab, keys)
    np.minimum(pos, len(vocab) - 1, out=pos)
    hit = present & (vocab.take(pos) == keys)
    ids = pos + 1
    ids[~hit] = 0
    return ids


class _SortedLookup:
    def __init__(self, vocab: np.ndarray) -> None:
        self.vocab = vocab

    def lookup(self, keys: np.ndarray, present: np.ndarray) -> np.ndarray:
        return vocab_lookup(self.vocab, keys, present)


def make_lookup(vocab: np.ndarray):
    """Binary search for small vocabularies, a hash index for large ones."""
    return VocabIndex(vocab) if len(vocab) >= LOOKUP_HASH_MIN else _SortedLookup(vocab)


# --------------------------------------------------------------------------- driver
@dataclass
class Rows:
    """Parsed valid rows of one block."""

    valid: np.ndarray  # [L] bool, per line of the block
    labels: np.ndarray  # [N] float32
    dense: np.ndarray  # [D, N] float32, preprocessed ([D, 0] when not wanted)
    fixed: np.ndarray  # [F, N] int64 ids of fixed-vocabulary tables
    keys: np.ndarray  # [K, N] uint64 keys of vocabulary/modulo tables
    present: np.ndarray  # [K, N] bool


@dataclass(frozen=True)
class TextFile:
    """How to read one input file: where its data lines start and how to parse them."""

    parse: Callable[[LineBlock, bool], Rows]  # (block, want_dense) -> its valid rows
    reason: Callable[[bytes], str]  # why a line the parser rejected is bad (messages only)
    start_offset: int = 0  # byte offset of the first data line (after a header)
    first_line: int = 1  # its 1-based line number


@dataclass(frozen=True)
class TextFormat:
    """What a converter provides to `convert_text` (see the module docstring)."""

    source: str  # DatasetMeta.source
    num_dense: int
    fixed_cards: tuple[int, ...]  # cardinalities of the tables whose ids the parser gives
    num_keyed: int  # tables whose keys go through a vocabulary or the modulo
    open_file: Callable[[str], TextFile]  # per input path, before any output exists
    describe: Callable[[int | None, int], dict]  # (max_ind_range, min_count) -> preprocessing notes


def check_inputs(inputs: Sequence[str]) -> list[str]:
    """The input paths, after checking that there are some and that each is a file."""
    if not inputs:
        raise DatasetError("no input files given")
    paths = [os.fspath(p) for p in inputs]
    for p in paths:
        if os.path.isdir(p):
            raise DatasetError(f"{p}: is a directory; give the input files (e.g. {os.path.join(p, '*')})")
        if not os.path.isfile(p):
            raise DatasetError(f"{p}: input file does not exist")
        if not os.access(p, os.R_OK):
            raise DatasetError(f"{p}: input file is not readable")
    return paths


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "B"):
    """A tqdm bar on stderr; ``progress=None`` shows it when stderr is a terminal."""
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not progress, file=sys.stderr)


def convert_text(
    fmt: TextFormat,
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
    """Convert text files of format `fmt` (one output part each, in order) to a
    dataset at `out`: two passes in vocabulary mode, one in modulo mode.

    Tables are the fixed-vocabulary ones (ids given by the parser, capped by
    max_ind_range) followed by the keyed ones. Every argument is checked, and every
    input file opened, before any output exists."""
    start = time.perf_counter()
    paths = check_inputs(inputs)
    bad = BadLines(on_bad_line)
    files = [fmt.open_file(p) for p in paths]
    if max_ind_range is not None and max_ind_range <= 0:
        raise DatasetError(f"max_ind_range must be positive, got {max_ind_range}")
    if min_count < 1:
        raise DatasetError(f"min_count must be >= 1, got {min_count}")
    if max_ind_range is not None and min_count != 1:
        raise DatasetError("min_count applies to vocabulary mode only; drop it or drop max_ind_range")
    check_output_path(out, overwrite)
    vocab_mode = max_ind_range is None
    num_keyed = fmt.num_keyed
    total_bytes = sum(os.path.getsize(p) - f.start_offset for p, f in zip(paths, files))
    bar = progress_bar(total_bytes * (2 if vocab_mode else 1), fmt.source, progress)

    def blocks(i: int):
        return iter_raw_blocks(paths[i], block_bytes, start_offset=files[i].start_offset, progress=bar.update)

    def numbered(i: int, results: Iterator) -> Iterator:
        """Give each parsed block its first line number, in file order."""
        line_no = files[i].first_line
        for res in results:
            res[0].first_line = line_no
            line_no += res[0].num_lines
            yield res

    def count_block(i: int, data: bytes):
        block = LineBlock(data, 0)
        rows = files[i].parse(block, False)
        counted = [np.unique(rows.keys[t][rows.present[t]], return_counts=True) for t in range(num_keyed)]
        return block, rows.valid, counted

    try:
        if vocab_mode:
            counters = [KeyCounter() for _ in range(num_keyed)]
            for i, p in enumerate(paths):
                for block, valid, counted in numbered(i, ordered_map(partial(count_block, i), blocks(i), threads)):
                    bad.report(p, block, np.flatnonzero(~valid), files[i].reason)
                    for t in range(num_keyed):
                        counters[t].add_counted(*counted[t])
            vocabs = [c.vocabulary(min_count) for c in counters]
            del counters
            lookups = [make_lookup(v) for v in vocabs]
            cards = list(fmt.fixed_cards) + [len(v) + 1 for v in vocabs]
        else:
            cap = int(max_ind_range)
            cards = [min(c, cap) for c in fmt.fixed_cards] + [cap] * num_keyed
        nfixed = len(fmt.fixed_cards)
        num_tables = nfixed + num_keyed

        def convert_block(i: int, data: bytes):
            block = LineBlock(data, 0)
            rows = files[i].parse(block, True)
            n = len(rows.labels)
            sparse = np.empty((num_tables, n), dtype=np.int64)
            for t in range(nfixed):
                np.remainder(rows.fixed[t], cards[t], out=sparse[t])
            for t in range(num_keyed):
                if vocab_mode:
                    sparse[nfixed + t] = lookups[t].lookup(rows.keys[t], rows.present[t])
                else:
                    ids = rows.keys[t] % np.uint64(cap)
                    ids[~rows.present[t]] = 0
                    sparse[nfixed + t] = ids.view(np.int64)
            return block, rows.valid, rows.labels, rows.dense, sparse

        dense_names, sparse_names = default_feature_names(fmt.num_dense, num_tables)
        info = dict(fmt.describe(max_ind_range, min_count))
        info.update(
            inputs=[os.path.basename(p) for p in paths],
            max_ind_range=max_ind_range,
            min_count=min_count if vocab_mode else None,
            on_bad_line=on_bad_line,
            eval_split="last part" if len(paths) >= 2 else "none",
        )
        meta = DatasetMeta(dense_names, sparse_names, cards, fmt.source, info)
        part_rows, parts = [], []
        with DatasetWriter(out, overwrite=overwrite, row_group_size=row_group_size, compression=compression) as w:
            for i, p in enumerate(paths):
                writer = w.open_part(i, meta)
                parts.append(os.path.basename(writer.path))
                results = numbered(i, ordered_map(partial(convert_block, i), blocks(i), threads))
                for block, valid, labels, dense, sparse in results:
                    if not vocab_mode:  # vocabulary mode reported them in pass 1
                        bad.report(p, block, np.flatnonzero(~valid), files[i].reason)
                    writer.write(labels, dense.T, sparse)
                part_rows.append(writer.close())
                if part_rows[-1] == 0:  # (raised inside the writer's block: nothing is committed)
                    raise DatasetError(f"{p}: no data rows" + (f" ({bad.count} bad lines skipped so far)"
                                                              if bad.count else ""))
    finally:
        bar.close()
    return PrepareResult.finished(out, fmt.source, parts, part_rows, bad, cards, start, meta, info)
