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
- **Multi-hot** (``multi_hot``: a mean bag size per table, or ``"mlperf"``, the sizes of
  MLPerf's multi-hot DLRM-DCNv2 setup `MLPERF_BAG_SIZES`): every feature is a bag of ids
  (list<int64>, ``meta.multi_hot`` = all features). Table t's bag length per example is
  ``round(mean_t)`` (at least 1, ``bag_lengths="fixed"``) or ``Poisson(mean_t)`` (empty bags
  occur, ``"poisson"``); every id of a bag is drawn as a one-hot id is (missing id 0 with
  the table's missing probability, else Zipf). ``distinct_in_bag`` redraws the repeats
  inside a bag (vectorised rejection, `DISTINCT_ROUNDS` rounds; a bag still repeating
  after that drops its repeats, so on tiny or very hot tables a bag can come out
  shorter; lengths are capped at the cardinality). Chunks then hold about `CHUNK_IDS`
  ids instead of `CHUNK_ROWS` rows, so memory stays bounded whatever the bag sizes.
- **Tables.** ``tables="kaggle"`` (the default) or ``"criteo-terabyte"`` (the MLPerf DLRM
  reference's 26 Criteo Terabyte sizes, days 0-23, capped at 40M:
  `CRITEO_TERABYTE_TABLES`), both scaled by ``table_scale``; or explicit cardinalities.
  One table per feature, pooled by ``pooling`` (sum or mean) in the metadata.
- **Dense.** Raw feature j is a count: ``floor(exp(mu_j + sigma_j * N)) - 1`` with an
  extra point mass at 0 and a missing probability, all drawn per feature from the
  seed; I2 (j = 1) is occasionally -1..-3 as in Criteo. Parquet holds Criteo's
  canonical preprocessing ``log(x + 1)`` (float32) with missing and negative -> 0,
  bit-identical to what `criteo.prepare_criteo` makes of the raw value.
- **Label.** ``logit = bias + sum_t effect_t(id_t) + sum_j w_j * dense_j +
  sum_{(a, b) in pairs} c * g_a(id_a) * g_b(id_b)`` (multi-hot: each term is the mean of
  the per-id values over the bag, 0 for an empty bag) where the per-id effects come
  from a counter-based hash (`bagpipe.hashing.splitmix64`) of (seed, table, id) —
  pure functions of the id, precomputed into arrays only for tables of up to 2^20
  rows — and four fixed table pairs interact. ``bias`` is calibrated by bisection on a
  separate calibration sample (`CALIBRATION_ROWS` rows, independent of ``rows``) to
  a mean click probability of ``click_rate`` (0.256). Labels are
  ``Bernoulli(sigmoid(logit))``. The AUC of the true logits against the sampled
  labels ("true model AUC", an upper bound for any learned model) is computed
  exactly (rank based, `bagpipe.metrics.auc`) on the first
  ``min(total rows, TRUE_AUC_ROWS)`` generated rows (multi-hot: at most `AUC_CHUNKS`
  chunks, so the sample stays within memory) and stored in the metadata
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
co-occurrence structure exactly. It is one-hot only (a multi-hot request is refused).
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
from .format import POOLINGS, DatasetError, DatasetMeta, TableMeta, default_feature_names
from .jagged import Bags
from .text import ordered_map, progress_bar
from .writer import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE, DatasetWriter, check_output_path
from .zipf import ZipfSampler

CRITEO_KAGGLE_TABLES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
# The MLPerf DLRM reference's Criteo Terabyte table sizes (days 0-23, ids capped at 40M).
CRITEO_TERABYTE_TABLES: tuple[int, ...] = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)
TABLE_PRESETS = {"kaggle": CRITEO_KAGGLE_TABLES, "criteo-terabyte": CRITEO_TERABYTE_TABLES}
# Mean bag sizes per table of MLPerf's multi-hot DLRM-DCNv2 benchmark (Criteo multi-hot).
MLPERF_BAG_SIZES: tuple[int, ...] = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
BAG_LENGTHS = ("fixed", "poisson")
NUM_DENSE = 13
CLICK_RATE = 0.256
DEFAULT_ZIPF = 1.05
DEFAULT_ROWS_PER_PART = 1_000_000
CHUNK_ROWS = 131072
CHUNK_IDS = CHUNK_ROWS * 26  # multi-hot chunks hold about this many ids (a one-hot chunk's worth)
MIN_CHUNK_ROWS = 1024
AUC_CHUNKS = 4  # the true-AUC sample's chunks at most (kept for writing): bounds its memory
DISTINCT_ROUNDS = 64
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


def table_cardinalities(tables: Sequence[int] | str | None, table_scale: float) -> tuple[list[int], str | None]:
    """(cardinalities, preset name or None): a preset ("kaggle", the default, or
    "criteo-terabyte") scaled by `table_scale`, or explicit cardinalities (scale 1.0)."""
    if tables is None or isinstance(tables, str):
        name = tables or "kaggle"
        if name not in TABLE_PRESETS:
            raise DatasetError(f"tables must be one of {', '.join(TABLE_PRESETS)} or a list of cardinalities, "
                               f"got {name!r}")
        return scaled_tables(table_scale, TABLE_PRESETS[name]), name
    if table_scale != 1.0:
        raise DatasetError("give either explicit tables or a table_scale, not both")
    cards = [int(n) for n in tables]
    if not cards or any(n < 1 for n in cards):
        raise DatasetError(f"every table cardinality must be >= 1, got {list(tables)}")
    return cards, None


def bag_sizes(spec: Sequence[float] | str, num_tables: int) -> list[float]:
    """Mean bag size per table from ``"mlperf"``, a comma list ("3,2,1,...") or a sequence;
    a single value applies to every table."""
    if isinstance(spec, str):
        if spec.strip().lower() == "mlperf":
            values: list[float] = [float(v) for v in MLPERF_BAG_SIZES]
        else:
            try:
                values = [float(v) for v in spec.split(",") if v.strip()]
            except ValueError:
                raise DatasetError(f"multi-hot sizes must be 'mlperf' or comma-separated numbers, "
                                   f"got {spec!r}") from None
    else:
        values = [float(v) for v in spec]
    if len(values) == 1:
        values = values * num_tables
    if len(values) != num_tables:
        raise DatasetError(f"{len(values)} multi-hot bag sizes for {num_tables} tables; give one per table "
                           f"(or one for all)")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise DatasetError(f"every mean bag size must be a positive number, got {bad[0]}")
    return values


@dataclass(frozen=True)
class BagSpec:
    """How multi-hot bags are drawn: a mean size per table, fixed or Poisson lengths,
    and whether ids repeat inside a bag."""

    means: tuple[float, ...]
    lengths: str = "poisson"
    distinct: bool = False

    def __post_init__(self) -> None:
        if self.lengths not in BAG_LENGTHS:
            raise DatasetError(f"bag_lengths must be one of {', '.join(BAG_LENGTHS)}, got {self.lengths!r}")

    def chunk_rows(self) -> int:
        """Rows per chunk so that a chunk holds about `CHUNK_IDS` ids."""
        per_row = sum(max(1, math.floor(m + 0.5)) if self.lengths == "fixed" else m for m in self.means)
        return int(min(CHUNK_ROWS, max(MIN_CHUNK_ROWS, CHUNK_IDS // max(1, math.ceil(per_row)))))


def _bag_means(values: np.ndarray, owner: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of `values` (one per slot) over each bag; 0 for an empty bag."""
    sums = np.bincount(owner, weights=values, minlength=len(lengths))
    return sums / np.maximum(lengths, 1)


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
    ids_per_row: float | None = None  # multi-hot: mean ids per example over all features

    def summary(self) -> str:
        rate = (self.train_rows + self.eval_rows) / max(self.seconds, 1e-9)
        split = f" + {self.eval_rows} eval rows (last part)" if self.eval_rows else " (no eval part)"
        bags = f", multi-hot: {self.ids_per_row:.1f} ids per row" if self.ids_per_row is not None else ""
        return (
            f"wrote {len(self.parts)} {self.format} parts to {self.out}: {self.train_rows} train rows"
            f"{split}, {len(self.cardinalities)} tables"
            f" ({sum(self.cardinalities)} rows){bags}, click rate {self.click_rate:.4f},"
            f" true-model AUC {self.true_auc:.4f}, {self.seconds:.1f} s ({rate:,.0f} rows/s)"
        )


@dataclass
class _Chunk:
    sparse: np.ndarray  # [T, n] int64 (multi-hot: zeros; the ids are in `bags`)
    dense_raw: np.ndarray  # [D, n] int64 raw counts
    dense_missing: np.ndarray  # [D, n] bool
    dense: np.ndarray  # [D, n] float32 preprocessed
    z: np.ndarray  # [n] float64 logit without bias
    u: np.ndarray  # [n] float64 uniforms for the labels
    bags: dict[int, Bags] = field(default_factory=dict)  # multi-hot: every table's bags

    def labels(self, bias: float) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-(bias + self.z)))
        return (self.u < p).astype(np.float32)


class _Model:
    """Everything drawn once from the seed: per-table samplers, effects, dense params."""

    LUT_MAX = 1 << 20  # tables up to this size keep their per-id effects in an array

    def __init__(self, cardinalities: list[int], num_dense: int, zipf: float, seed: int,
                 bags: BagSpec | None = None) -> None:
        self.cards = cardinalities
        self.bags = bags
        self.chunk_rows = bags.chunk_rows() if bags is not None else CHUNK_ROWS
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

    def _ids(self, t: int, u: np.ndarray, out: np.ndarray) -> None:
        """Ids of table t from uniforms u (consumed): the missing id 0 with the table's
        missing probability, else a Zipf rank through the table's permutation."""
        sampler = self.sampler[t]
        if sampler is None:
            out[:] = 0
            return
        p = self.missing_prob[t]
        missing = u < p
        # reuse the uniform: conditional on "present" it is U(p, 1)
        u -= p
        u *= 1.0 / (1.0 - p)
        np.clip(u, 0.0, _BELOW_ONE, out=u)
        out[:] = self.perm[t].take(sampler.ranks(u))
        out[missing] = 0

    def _bags(self, rng: np.random.Generator, t: int, n: int) -> tuple[Bags, np.ndarray]:
        """Table t's bags over n examples, and the bag of every id (its owner)."""
        assert self.bags is not None
        mean = self.bags.means[t]
        if self.bags.lengths == "fixed":
            lengths = np.full(n, max(1, math.floor(mean + 0.5)), dtype=np.int64)
        else:
            lengths = rng.poisson(mean, n).astype(np.int64)
        if self.bags.distinct:
            np.minimum(lengths, self.cards[t], out=lengths)
        owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
        ids = np.empty(len(owner), dtype=np.int64)
        self._ids(t, rng.random(len(owner)), ids)
        if self.bags.distinct and self.cards[t] > 1 and len(ids):
            ids, owner, lengths = self._without_repeats(rng, t, ids, owner, lengths)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Bags(ids, offsets), owner

    def _without_repeats(self, rng, t: int, ids: np.ndarray, owner: np.ndarray, lengths: np.ndarray):
        """Redraw every id that repeats inside its bag until it is new to the bag (for at
        most `DISTINCT_ROUNDS` rounds; what still repeats is then dropped).

        A slot is the pair key ``owner * cardinality + id``: one sort finds the repeats,
        and each round checks only the redrawn slots against the sorted accepted keys."""
        card = self.cards[t]
        keys = owner * card + ids  # < chunk_rows * cardinality: checked to fit int64 up front
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first = np.ones(len(keys), dtype=bool)
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
        accepted = sorted_keys[first]
        pending = np.sort(order[~first])  # slots holding an id their bag already has
        for _round in range(DISTINCT_ROUNDS):
            if pending.size == 0:
                return ids, owner, lengths
            fresh = np.empty(len(pending), dtype=np.int64)
            self._ids(t, rng.random(len(pending)), fresh)
            fresh_keys = owner[pending] * card + fresh
            pos = np.searchsorted(accepted, fresh_keys)
            np.minimum(pos, len(accepted) - 1, out=pos)
            new = np.flatnonzero(accepted[pos] != fresh_keys)
            won_keys, first_new = np.unique(fresh_keys[new], return_index=True)  # one winner per key
            won = new[first_new]
            ids[pending[won]] = fresh[won]
            accepted = np.insert(accepted, np.searchsorted(accepted, won_keys), won_keys)
            still = np.ones(len(pending), dtype=bool)
            still[won] = False
            pending = pending[still]
        if pending.size == 0:
            return ids, owner, lengths
        keep = np.ones(len(ids), dtype=bool)
        keep[pending] = False
        owner = owner[keep]
        return ids[keep], owner, np.bincount(owner, minlength=len(lengths)).astype(np.int64)

    def chunk(self, entropy: Sequence[int], n: int) -> _Chunk:
        rng = np.random.default_rng(np.random.SeedSequence(list(entropy)))
        T, D = len(self.cards), self.num_dense
        # multi-hot: the writer ignores these rows (the ids are in `bags`)
        sparse = np.empty((T, n), dtype=np.int64) if self.bags is None else np.zeros((T, n), dtype=np.int64)
        z = np.zeros(n, dtype=np.float64)
        bags: dict[int, Bags] = {}
        owners: dict[int, np.ndarray] = {}
        for t in range(T):
            if self.bags is None:
                self._ids(t, rng.random(n), sparse[t])
                z += self.effect(t, sparse[t])
            else:
                bags[t], owners[t] = self._bags(rng, t, n)
                z += _bag_means(self.effect(t, bags[t].values), owners[t], bags[t].lengths())
        for a, b in self.pairs:
            if self.bags is None:
                z += PAIR_STRENGTH * self.pair_effect(a, sparse[a]) * self.pair_effect(b, sparse[b])
            else:
                ga = _bag_means(self.pair_effect(a, bags[a].values), owners[a], bags[a].lengths())
                gb = _bag_means(self.pair_effect(b, bags[b].values), owners[b], bags[b].lengths())
                z += PAIR_STRENGTH * ga * gb
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
        return _Chunk(sparse, dense_raw, dense_missing, dense, z, u_label, bags)

    def calibrate(self, click_rate: float) -> float:
        parts = []
        left, k = CALIBRATION_ROWS, 0
        while left > 0:
            n = min(self.chunk_rows, left)
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
    tables: Sequence[int] | str | None = None,
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
    multi_hot: Sequence[float] | str | None = None,
    bag_lengths: str = "poisson",
    distinct_in_bag: bool = False,
    pooling: str = "sum",
) -> SyntheticResult:
    """Write a synthetic Criteo-like dataset to `out` (see the module docstring).

    ``eval_rows`` defaults to ``rows // 10``; 0 writes no eval part. ``tables`` is a
    preset name ("kaggle", the default, or "criteo-terabyte", scaled by ``table_scale``)
    or explicit cardinalities (then ``table_scale`` must stay 1.0). ``multi_hot`` (mean
    bag sizes, one per table or one for all, or "mlperf") makes every feature a bag of
    ids; without it the output is one-hot, byte for byte what it always was."""
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
    cards, preset = table_cardinalities(tables, table_scale)
    if pooling not in POOLINGS:
        raise DatasetError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    bags = None
    if multi_hot is not None:
        if format != "parquet":
            raise DatasetError(f"format {format!r} is one-hot only; multi-hot output needs format 'parquet'")
        bags = BagSpec(tuple(bag_sizes(multi_hot, len(cards))), bag_lengths, bool(distinct_in_bag))
        if bags.distinct and bags.chunk_rows() * max(cards) >= 2**62:
            raise DatasetError(f"distinct_in_bag supports tables below {2**62 // bags.chunk_rows()} rows, "
                               f"got {max(cards)}")
    if eval_rows is None:
        eval_rows = rows // 10
    if eval_rows < 0:
        raise DatasetError(f"eval_rows must be >= 0, got {eval_rows}")
    seed = int(seed)
    check_output_path(out, overwrite)  # fail before any work

    model = _Model(cards, num_dense, float(zipf), seed, bags)
    bias = model.calibrate(click_rate)

    total = rows + eval_rows
    chunk_rows = model.chunk_rows
    n_chunks = -(-total // chunk_rows)

    def chunk_len(c: int) -> int:
        return min(chunk_rows, total - c * chunk_rows)

    # True-model AUC on the first rows of the dataset itself; keep the first chunks.
    cached: dict[int, _Chunk] = {}
    auc_scores, auc_labels = [], []
    auc_rows = min(total, TRUE_AUC_ROWS, AUC_CHUNKS * chunk_rows)
    first = range(-(-auc_rows // chunk_rows))
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
        "chunk_rows": chunk_rows,
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
    # Keys only a non-default option adds, so one-hot Kaggle-preset output keeps its bytes.
    if preset not in (None, "kaggle"):
        info["table_preset"] = preset
    if bags is not None:
        info["multi_hot"] = {
            "bag_sizes": list(bags.means),
            "bag_lengths": bags.lengths,
            "distinct_in_bag": bags.distinct,
            "label": "per-id effects and interactions averaged over each bag (0 for an empty bag)",
        }
    meta = DatasetMeta(
        dense_features=dense_names,
        sparse_features=sparse_names,
        cardinalities=cards,
        source="synthetic",
        preprocessing=info,
        tables=[TableMeta(name, n, pooling, [name]) for name, n in zip(sparse_names, cards)],
        multi_hot=list(sparse_names) if bags is not None else [],
    )
    if format == "parquet":
        names = [None] * n_parts
    else:
        width = len(str(n_parts - 1))
        names = [f"day_{i:0{width}d}.txt" for i in range(n_parts)]

    clicks = 0.0
    ids_written = 0
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
                ids_written += sum(len(b.values) for b in ch.bags.values())
                base = c * chunk_rows
                n = len(labels)
                lo = 0
                while lo < n:
                    end_of_part = bounds[part_idx + 1] - base
                    hi = min(n, end_of_part)
                    if tsv is None:
                        writer.write(labels[lo:hi], ch.dense[:, lo:hi].T, ch.sparse[:, lo:hi],
                                     {t: b.slice(lo, hi) for t, b in ch.bags.items()} or None)
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
        ids_per_row=ids_written / total if bags is not None else None,
    )
