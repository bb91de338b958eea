"""A faithful synthetic stand-in for Criteo click logs (DESIGN.md section 6).

What a generated dataset looks like
-----------------------------------
- 26 categorical tables (Criteo Kaggle's cardinalities `CRITEO_KAGGLE_TABLES`, each
  multiplied by ``table_scale`` but never below ``min(original, 4)``), or an explicit
  ``tables`` list, and ``num_dense`` (13) dense count features.
- **Ids.** Id 0 of every table is its *missing-value* id. Table t has a missing
  probability ``missing_prob[t]`` drawn once from the seed (``0.4 * U^2``, so most
  columns are rarely empty and a few are often empty, as in Criteo). A present value
  has a Zipf rank ``k`` in ``1..n-1`` with ``P(k) ~ k^-zipf`` (bounded Zipf, sampled by
  inverse CDF on a float64 cumulative distribution built once per table: exactly
  ``np.searchsorted(cdf, u, "right")``, computed through a guide table for tables of
  1024+ rows, see `zipf.ZipfSampler`), and rank k is mapped to id ``perm_t[k-1]`` in
  ``1..n-1`` by a fixed random permutation of the table (seeded). A table of
  cardinality 1 holds only the missing id. Memory: about 20 bytes per table row
  (CDF, permutation, guide), ~700 MB at full Criteo size.
- **Dense.** Raw feature j is a count: ``floor(exp(mu_j + sigma_j * N)) - 1`` with an
  extra point mass at 0 and a missing probability, all drawn per feature from the
  seed; I2 (j = 1) is occasionally -1..-3 as in Criteo. Parquet holds Criteo's
  canonical preprocessing ``log(x + 1)`` (float32) with missing and negative -> 0,
  bit-identical to what `criteo.prepare_criteo` makes of the raw value.
- **Label.** ``logit = bias + sum_t effect_t(id_t) + sum_j w_j * dense_j +
  sum_{(a, b) in pairs} c * g_a(id_a) * g_b(id_b)`` where the per-id effects come
  from a counter-based hash (`bagpipe.hashing.splitmix64`) of (seed, table, id) —
  pure functions of the id, precomputed into arrays only for tables of up to 2^20
  rows — and four fixed table pairs interact. ``bias`` is calibrated by bisection on a
  separate calibration sample (`CALIBRATION_ROWS` rows, independent of ``rows``) to
  a mean click probability of ``click_rate`` (0.256). Labels are
  ``Bernoulli(sigmoid(logit))``. The AUC of the true logits against the sampled
  labels ("true model AUC", an upper bound for any learned model) is computed
  exactly (rank based, `bagpipe.metrics.auc`) on the first
  ``min(total rows, TRUE_AUC_ROWS)`` generated rows and stored in the metadata
  with the generator's options. Effect sizes (per-table
  scale U(0.08, 0.36), pair strength 0.3, dense weights) put it at about 0.79-0.84
  depending on the seed, near what the best published models reach on Criteo.

Determinism and layout
----------------------
Rows form one stream: ``rows`` training rows then ``eval_rows`` held-out rows.
Chunk c of the stream (`CHUNK_ROWS` rows) is drawn from
``np.random.default_rng(SeedSequence([seed, c]))`` alone, so memory is bounded by a
few chunks (generated ahead on ``threads`` threads), and equal arguments give
byte-identical files whatever the thread count (no timestamps anywhere).
Training rows go to parts of ``rows_per_part`` rows; the held-out rows form the
last part (format.py: the last part is the eval split). Output goes through
`writer.DatasetWriter` (temporary names, renamed when complete).

``format="criteo-tsv"`` writes raw Criteo Kaggle lines instead (``label``, 13 raw
integer counts, 26 categoricals as 8 lowercase hex digits, empty when missing),
files ``day_<i>.txt`` (the last is the eval split) plus ``synthetic.json``. The hex
value of (table, id) is a bijective 32-bit mix of ``id + salt_t``, so distinct ids
of a table never collide and `prepare_criteo` in vocabulary mode recovers the
co-occurrence structure exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bagpipe.hashing import splitmix64
from bagpipe.metrics import auc

from .criteo import preprocess_dense
from .format import DatasetError, DatasetMeta, default_feature_names
from .text import ordered_map, progress_bar
from .writer import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE, DatasetWriter, check_output_path
from .zipf import ZipfSampler

CRITEO_KAGGLE_TABLES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
NUM_DENSE = 13
CLICK_RATE = 0.256
DEFAULT_ZIPF = 1.05
DEFAULT_ROWS_PER_PART = 1_000_000
CHUNK_ROWS = 131072
CALIBRATION_ROWS = 65536
TRUE_AUC_ROWS = 524288
MAX_MISSING_PROB = 0.4
NUM_PAIRS = 4
PAIR_STRENGTH = 0.3
FORMATS = ("parquet", "criteo-tsv")

_MASK64 = (1 << 64) - 1
_TAG_TABLE = 0x7AB1E
_TAG_DENSE = 0xDE45E
_TAG_PAIRS = 0x9A125
_TAG_CALIB = 0xCA11B
_SALT_EFFECT = 1
_SALT_PAIR = 2
_SALT_HEX = 3


# --------------------------------------------------------------------------- hashing
def table_key(seed: int, table: int, salt: int) -> int:
    """64-bit key of (seed, table, salt) for the counter-based per-id hashes:
    ``splitmix64(splitmix64(seed) ^ splitmix64(table << 8 | salt))``."""
    seed_hash, table_hash = splitmix64(np.array([seed & _MASK64, (table << 8) | salt], dtype=np.uint64))
    return int(splitmix64(seed_hash ^ table_hash))


def hashed_normal(key: int, ids: np.ndarray) -> np.ndarray:
    """Approximately N(0, 1) value per id, a pure function of (key, id).

    Irwin-Hall sum of the four 16-bit lanes of splitmix64(id ^ key)."""
    h = splitmix64(ids.astype(np.uint64) ^ np.uint64(key))
    m = np.uint64(0xFFFF)
    s = h & m
    t = h >> np.uint64(16)
    t &= m
    s += t
    np.right_shift(h, np.uint64(32), out=t)
    t &= m
    s += t
    h >>= np.uint64(48)
    s += h
    out = s.view(np.int64).astype(np.float64)  # lanes sum < 2^18: exact, and int64 converts faster
    out -= 2.0 * 65535.0
    out *= 1.0 / (65536.0 / math.sqrt(3.0))
    return out


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """A bijective 32-bit integer mix (uint32 in, uint32 out)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint32, copy=True)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def criteo_hex_value(seed: int, table: int, ids: np.ndarray) -> np.ndarray:
    """The 32-bit value written as 8 hex digits for ids (>= 1) of a table."""
    salt = np.uint32(table_key(seed, table, _SALT_HEX) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        return _lowbias32(ids.astype(np.uint32) + salt)


_BELOW_ONE = float(np.nextafter(1.0, 0.0))


# --------------------------------------------------------------------------- options
def scaled_tables(table_scale: float, base: Sequence[int] = CRITEO_KAGGLE_TABLES) -> list[int]:
    """``max(round(n * table_scale), min(n, 4))`` for every base cardinality n."""
    if not table_scale > 0:
        raise DatasetError(f"table_scale must be positive, got {table_scale}")
    return [max(int(round(n * table_scale)), min(n, 4)) for n in base]


@dataclass
class SyntheticResult:
    out: str
    format: str
    parts: list[str]
    train_rows: int
    eval_rows: int
    cardinalities: list[int]
    true_auc: float
    click_rate: float  # observed over all generated rows
    seconds: float
    meta: DatasetMeta | None = None
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = (self.train_rows + self.eval_rows) / max(self.seconds, 1e-9)
        split = f" + {self.eval_rows} eval rows (last part)" if self.eval_rows else " (no eval part)"
        return (
            f"wrote {len(self.parts)} {self.format} parts to {self.out}: {self.train_rows} train rows"
            f"{split}, {len(self.cardinalities)} tables"
            f" ({sum(self.cardinalities)} rows), click rate {self.click_rate:.4f},"
            f" true-model AUC {self.true_auc:.4f}, {self.seconds:.1f} s ({rate:,.0f} rows/s)"
        )


@dataclass
class _Chunk:
    sparse: np.ndarray  # [T, n] int64
    dense_raw: np.ndarray  # [D, n] int64 raw counts
    dense_missing: np.ndarray  # [D, n] bool
    dense: np.ndarray  # [D, n] float32 preprocessed
    z: np.ndarray  # [n] float64 logit without bias
    u: np.ndarray  # [n] float64 uniforms for the labels

    def labels(self, bias: float) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-(bias + self.z)))
        return (self.u < p).astype(np.float32)


class _Model:
    """Everything drawn once from the seed: per-table samplers, effects, dense params."""

    LUT_MAX = 1 << 20  # tables up to this size keep their per-id effects in an array

    def __init__(self, cardinalities: list[int], num_dense: int, zipf: float, seed: int) -> None:
        self.cards = cardinalities
        self.num_dense = num_dense
        self.zipf = zipf
        self.seed = seed
        T = len(cardinalities)
        self.sampler: list[ZipfSampler | None] = []
        self.perm: list[np.ndarray | None] = []
        self.missing_prob = np.zeros(T)
        self.effect_scale = np.zeros(T)
        for t, n in enumerate(cardinalities):
            rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_TABLE, t]))
            self.missing_prob[t] = MAX_MISSING_PROB * rng.random() ** 2
            self.effect_scale[t] = rng.uniform(0.08, 0.36)
            m = n - 1
            if m <= 0:
                self.missing_prob[t] = 1.0
                self.sampler.append(None)
                self.perm.append(None)
                continue
            self.sampler.append(ZipfSampler(m, zipf))
            dtype = np.int32 if n < 2**31 else np.int64
            perm = rng.permutation(m).astype(dtype)
            perm += 1
            self.perm.append(perm)
        self.effect_key = [table_key(seed, t, _SALT_EFFECT) for t in range(T)]
        self.pair_key = [table_key(seed, t, _SALT_PAIR) for t in range(T)]
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_PAIRS]))
        npairs = min(NUM_PAIRS, T // 2)
        chosen = rng.permutation(T)[: 2 * npairs].reshape(npairs, 2) if npairs else np.zeros((0, 2), int)
        self.pairs = [(int(a), int(b)) for a, b in chosen]
        # Per-id values are pure functions of (seed, table, id); small tables
        # precompute them (identical bits, computed elementwise either way).
        self._effect_lut = [self._lut(self.effect_key[t], n, self.effect_scale[t]) for t, n in enumerate(cardinalities)]
        paired = {t for p in self.pairs for t in p}
        self._pair_lut = [self._lut(self.pair_key[t], n, 1.0) if t in paired else None
                          for t, n in enumerate(cardinalities)]
        D = num_dense
        self.d_missing = np.zeros(D)
        self.d_zero = np.zeros(D)
        self.d_mu = np.zeros(D)
        self.d_sigma = np.zeros(D)
        self.d_weight = np.zeros(D)
        for j in range(D):
            rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_DENSE, j]))
            self.d_missing[j] = 0.45 * rng.random() ** 2
            self.d_zero[j] = rng.uniform(0.0, 0.5)
            self.d_mu[j] = rng.uniform(0.0, 4.0)
            self.d_sigma[j] = rng.uniform(0.5, 2.0)
            self.d_weight[j] = rng.uniform(-1.0, 1.0) * 0.3 / self.d_sigma[j]
        self.bias = 0.0

    def _lut(self, key: int, n: int, scale: float) -> np.ndarray | None:
        if n > self.LUT_MAX:
            return None
        return scale * hashed_normal(key, np.arange(n, dtype=np.int64))

    def effect(self, t: int, ids: np.ndarray) -> np.ndarray:
        lut = self._effect_lut[t]
        if lut is not None:
            return lut.take(ids)
        return self.effect_scale[t] * hashed_normal(self.effect_key[t], ids)

    def pair_effect(self, t: int, ids: np.ndarray) -> np.ndarray:
        lut = self._pair_lut[t]
        if lut is not None:
            return lut.take(ids)
        return 1.0 * hashed_normal(self.pair_key[t], ids)

    def chunk(self, entropy: Sequence[int], n: int) -> _Chunk:
        rng = np.random.default_rng(np.random.SeedSequence(list(entropy)))
        T, D = len(self.cards), self.num_dense
        sparse = np.empty((T, n), dtype=np.int64)
        z = np.zeros(n, dtype=np.float64)
        for t in range(T):
            u = rng.random(n)
            sampler = self.sampler[t]
            row = sparse[t]
            if sampler is None:
                row[:] = 0
            else:
                p = self.missing_prob[t]
                missing = u < p
                # reuse the uniform: conditional on "present" it is U(p, 1)
                u -= p
                u *= 1.0 / (1.0 - p)
                np.clip(u, 0.0, _BELOW_ONE, out=u)
                row[:] = self.perm[t].take(sampler.ranks(u))
                row[missing] = 0
            z += self.effect(t, row)
        for a, b in self.pairs:
            z += PAIR_STRENGTH * self.pair_effect(a, sparse[a]) * self.pair_effect(b, sparse[b])
        dense_raw = np.empty((D, n), dtype=np.int64)
        dense_missing = np.empty((D, n), dtype=bool)
        for j in range(D):
            g = rng.standard_normal(n)
            g *= self.d_sigma[j]
            g += self.d_mu[j]
            np.minimum(g, 21.0, out=g)
            np.exp(g, out=g)
            np.floor(g, out=g)
            raw = dense_raw[j]
            raw[:] = g
            raw -= 1
            c = rng.random(n)
            raw[c < self.d_zero[j]] = 0
            if j == 1:  # I2 is occasionally negative in Criteo
                neg = rng.random(n) < 0.03
                raw[neg] = -rng.integers(1, 4, size=int(neg.sum()))
            dense_missing[j] = rng.random(n) < self.d_missing[j]
        dense = preprocess_dense(dense_raw, dense_missing)
        for j in range(D):
            z += self.d_weight[j] * dense[j]
        u_label = rng.random(n)
        return _Chunk(sparse, dense_raw, dense_missing, dense, z, u_label)

    def calibrate(self, click_rate: float) -> float:
        parts = []
        left, k = CALIBRATION_ROWS, 0
        while left > 0:
            n = min(CHUNK_ROWS, left)
            parts.append(self.chunk([self.seed, _TAG_CALIB, k], n).z)
            left -= n
            k += 1
        z = np.concatenate(parts)
        lo, hi = -30.0, 30.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(mid + z)))) < click_rate:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)
        return self.bias


# --------------------------------------------------------------------------- output
_SPREAD16 = np.uint64(0x0000FFFF0000FFFF)
_SPREAD8 = np.uint64(0x00FF00FF00FF00FF)
_SPREAD4 = np.uint64(0x0F0F0F0F0F0F0F0F)


def _hex8(h: np.ndarray) -> np.ndarray:
    """uint32 values -> [n, 8] lowercase hex digit bytes (SWAR nibble spreading)."""
    x = h.astype(np.uint64)
    x |= x << np.uint64(16)
    x &= _SPREAD16
    x |= x << np.uint64(8)
    x &= _SPREAD8
    x |= x << np.uint64(4)
    x &= _SPREAD4  # byte k = nibble k (least significant first)
    x = x.byteswap()  # most significant nibble first
    letters = x + np.uint64(0x0606060606060606)
    letters >>= np.uint64(4)
    letters &= np.uint64(0x0101010101010101)
    letters *= np.uint64(39)  # '0' + 10 + 39 == 'a'
    x += np.uint64(0x3030303030303030)
    x += letters
    return x.view(np.uint8).reshape(-1, 8)


def _tsv_lines(model: _Model, chunk: _Chunk, labels: np.ndarray) -> tuple[memoryview, np.ndarray]:
    """Raw Criteo lines of a chunk (vectorised with pyarrow) and each line's byte offset."""
    n = len(labels)
    cols: list[pa.Array] = []
    lab = np.where(labels > 0, np.uint8(ord("1")), np.uint8(ord("0")))
    offsets = np.arange(n + 1, dtype=np.int32)
    cols.append(pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(lab)]))
    for j in range(model.num_dense):
        arr = pa.array(chunk.dense_raw[j], mask=chunk.dense_missing[j])
        cols.append(pc.cast(pc.cast(arr, pa.string()), pa.binary()))
    offsets8 = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    for t in range(len(model.cards)):
        ids = chunk.sparse[t]
        present = ids != 0
        digits = _hex8(criteo_hex_value(model.seed, t, ids))
        validity = pa.py_buffer(np.packbits(present, bitorder="little"))
        nulls = int(n - np.count_nonzero(present))
        cols.append(
            pa.Array.from_buffers(
                pa.binary(), n, [validity, pa.py_buffer(offsets8), pa.py_buffer(digits)], null_count=nulls
            )
        )
    line = pc.binary_join_element_wise(*cols, pa.scalar(b"\t", pa.binary()), null_handling="replace",
                                       null_replacement=b"")
    line = pc.binary_join_element_wise(line, pa.scalar(b"", pa.binary()), pa.scalar(b"\n", pa.binary()))
    raw = np.frombuffer(line.buffers()[1], dtype=np.int32, count=n + 1, offset=line.offset * 4)
    first = int(raw[0])
    return memoryview(line.buffers()[2])[first:], raw.astype(np.int64) - first


def _chunks_in_order(model: _Model, seed: int, n_chunks: int, chunk_len, cached: dict, threads: int, finish):
    """Yield finish(chunk) for chunks 0..n_chunks-1 in order, computed ahead on a
    small thread pool (numpy and pyarrow release the GIL; every chunk depends only
    on its index)."""
    from concurrent.futures import ThreadPoolExecutor

    def make(c: int, ch: _Chunk | None):
        return finish(ch if ch is not None else model.chunk([seed, c], chunk_len(c)))

    if threads <= 1:
        for c in range(n_chunks):
            yield c, make(c, cached.pop(c, None))
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="synthetic") as pool:
        pending = {}
        ahead = threads + 1
        try:
            for c in range(n_chunks):
                for k in range(c, min(n_chunks, c + ahead)):
                    if k not in pending:
                        pending[k] = pool.submit(make, k, cached.pop(k, None))
                yield c, pending.pop(c).result()
        finally:
            for fut in pending.values():
                fut.cancel()


def generate_synthetic(
    out: str,
    rows: int,
    *,
    seed: int = 0,
    zipf: float = DEFAULT_ZIPF,
    table_scale: float = 1.0,
    tables: Sequence[int] | None = None,
    num_dense: int = NUM_DENSE,
    eval_rows: int | None = None,
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
    format: str = "parquet",
    click_rate: float = CLICK_RATE,
    overwrite: bool = False,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression: str | None = DEFAULT_COMPRESSION,
    progress: bool | None = None,
    threads: int = 2,
) -> SyntheticResult:
    """Write a synthetic Criteo-like dataset to `out` (see the module docstring).

    ``eval_rows`` defaults to ``rows // 10``; 0 writes no eval part. ``tables``
    (explicit cardinalities) and a ``table_scale`` other than 1.0 are exclusive."""
    start = time.perf_counter()
    if format not in FORMATS:
        raise DatasetError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    if rows <= 0:
        raise DatasetError(f"rows must be positive, got {rows}")
    if rows_per_part <= 0:
        raise DatasetError(f"rows_per_part must be positive, got {rows_per_part}")
    if not zipf > 0:
        raise DatasetError(f"zipf exponent must be positive, got {zipf}")
    if not 0.0 < click_rate < 1.0:
        raise DatasetError(f"click_rate must be in (0, 1), got {click_rate}")
    if num_dense < 0:
        raise DatasetError(f"num_dense must be >= 0, got {num_dense}")
    if tables is not None:
        if table_scale != 1.0:
            raise DatasetError("give either explicit tables or a table_scale, not both")
        cards = [int(n) for n in tables]
        if not cards or any(n < 1 for n in cards):
            raise DatasetError(f"every table cardinality must be >= 1, got {list(tables)}")
    else:
        cards = scaled_tables(table_scale)
    if eval_rows is None:
        eval_rows = rows // 10
    if eval_rows < 0:
        raise DatasetError(f"eval_rows must be >= 0, got {eval_rows}")
    seed = int(seed)
    check_output_path(out, overwrite)  # fail before any work

    model = _Model(cards, num_dense, float(zipf), seed)
    bias = model.calibrate(click_rate)

    total = rows + eval_rows
    n_chunks = -(-total // CHUNK_ROWS)

    def chunk_len(c: int) -> int:
        return min(CHUNK_ROWS, total - c * CHUNK_ROWS)

    # True-model AUC on the first rows of the dataset itself; keep those chunks.
    cached: dict[int, _Chunk] = {}
    auc_scores, auc_labels = [], []
    auc_rows = min(total, TRUE_AUC_ROWS)
    first = range(-(-auc_rows // CHUNK_ROWS))
    for c, ch in zip(first, ordered_map(lambda c: model.chunk([seed, c], chunk_len(c)), iter(first), threads)):
        cached[c] = ch
        auc_scores.append(ch.z)
        auc_labels.append(ch.labels(bias))
    true_auc = auc(np.concatenate(auc_labels), np.concatenate(auc_scores))
    del auc_scores, auc_labels

    # Part boundaries in the row stream: train parts, then the eval part.
    bounds = list(range(0, rows, rows_per_part)) + [rows]
    if eval_rows:
        bounds.append(total)
    n_parts = len(bounds) - 1
    dense_names, sparse_names = default_feature_names(num_dense, len(cards))
    info = {
        "generator": "bagpipe.datasets.synthetic",
        "seed": seed,
        "zipf": float(zipf),
        "table_scale": float(table_scale),
        "tables_explicit": tables is not None,
        "num_dense": num_dense,
        "rows": rows,
        "eval_rows": eval_rows,
        "rows_per_part": rows_per_part,
        "chunk_rows": CHUNK_ROWS,
        "click_rate_target": click_rate,
        "bias": bias,
        "true_auc": true_auc,
        "true_auc_rows": auc_rows,
        "missing_id": 0,
        "missing_prob": [float(p) for p in model.missing_prob],
        "interaction_pairs": [list(p) for p in model.pairs],
        "dense": "log(x+1) of raw counts; missing and negative -> 0",
        "eval_split": "last part" if eval_rows else "none",
    }
    meta = DatasetMeta(
        dense_features=dense_names,
        sparse_features=sparse_names,
        cardinalities=cards,
        source="synthetic",
        preprocessing=info,
    )
    if format == "parquet":
        names = [None] * n_parts
    else:
        width = len(str(n_parts - 1))
        names = [f"day_{i:0{width}d}.txt" for i in range(n_parts)]

    clicks = 0.0
    parts: list[str] = []
    with DatasetWriter(out, overwrite=overwrite, row_group_size=row_group_size, compression=compression) as w:
        bar = progress_bar(total, "synthetic", progress, unit="rows")
        try:
            part_idx = 0
            writer = None

            def open_part(i: int):
                if format == "parquet":
                    wr = w.open_part(i, meta)
                else:
                    wr = w.open_text(names[i])
                parts.append(os.path.basename(wr.path))
                return wr

            writer = open_part(0)
            def finish(ch: _Chunk):
                labels = ch.labels(bias)
                return ch, labels, (_tsv_lines(model, ch, labels) if format != "parquet" else None)

            for c, (ch, labels, tsv) in _chunks_in_order(model, seed, n_chunks, chunk_len, cached, threads, finish):
                clicks += float(labels.sum())
                base = c * CHUNK_ROWS
                n = len(labels)
                lo = 0
                while lo < n:
                    end_of_part = bounds[part_idx + 1] - base
                    hi = min(n, end_of_part)
                    if tsv is None:
                        writer.write(labels[lo:hi], ch.dense[:, lo:hi].T, ch.sparse[:, lo:hi])
                    else:
                        writer.write(tsv[0][int(tsv[1][lo]) : int(tsv[1][hi])])
                    lo = hi
                    if hi == end_of_part and part_idx + 1 < n_parts:
                        writer.close()
                        part_idx += 1
                        writer = open_part(part_idx)
                bar.update(n)
            writer.close()
            if format != "parquet":
                sidecar = dict(info, cardinalities=cards, files=names, format="criteo-tsv")
                w.write_text_file("synthetic.json", json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        finally:
            bar.close()
    out_abs = os.path.abspath(out)
    return SyntheticResult(
        out=out_abs,
        format=format,
        parts=[os.path.join(out_abs, p) for p in parts],
        train_rows=rows,
        eval_rows=eval_rows,
        cardinalities=cards,
        true_auc=true_auc,
        click_rate=clicks / total,
        seconds=time.perf_counter() - start,
        meta=meta if format == "parquet" else None,
        info=info,
    )
