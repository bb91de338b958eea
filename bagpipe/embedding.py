"""The mode-agnostic working-set lookup (DESIGN.md section 2, rule 1; section 11).

A trainer gathers the sorted unique row keys of its slice into a contiguous fp32
working set W, runs the model on a lookup into W, and W's dense gradient is its
per-row contribution. Never EmbeddingBag over cache slots, never sparse gradients:
the bits must not depend on where rows live.

One-hot slices look up ``F.embedding(inverse [b, F], W)``. Multi-hot slices pool:
every id of every feature is one position of ``inverse`` (feature by feature, each
example's bag in order), ``bags`` says which (example, feature) bag it falls in, and
the pooled vector is ``0 + row_1 + row_2 + ...`` over the bag (``index_add`` in id
order), divided by the bag's length for mean pooling (an empty bag pools to zeros).
Only W's labels (the sorted keys) and the slice's ids enter, so every mode computes
the same bits, forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SliceKeys:
    """Sorted unique keys of one trainer's slice, and where each id of the slice is in them."""

    keys: np.ndarray  # int64 [u], sorted
    inverse: torch.Tensor  # int64: one-hot [b, features]; multi-hot [ids] (feature by feature)
    bags: torch.Tensor | None = None  # multi-hot: int64 [ids], the bag (example * features + feature) of each id
    divisor: torch.Tensor | None = None  # multi-hot with mean pooling: fp32 [b * features, 1] bag sizes (>= 1)
    shape: tuple[int, int] = (0, 0)  # multi-hot: (examples, features)


# a key space at most this many times the ids is marked key by key instead of sorted
_MARK_FACTOR = 32


def unique_with_inverse(ids: np.ndarray, bound: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(ids, return_inverse=True)` (flat), the same arrays. With every id in
    [0, bound) and the key space small next to the ids, one mark per key replaces the
    sort: O(ids + bound), not O(ids log ids) (0.5 against 1.9 ms for a 26,000-id slice
    of the default workload, on the trainers' read-ahead threads)."""
    ids = np.asarray(ids).ravel()
    if bound is None or ids.size == 0 or bound > _MARK_FACTOR * ids.size or ids.min() < 0 or ids.max() >= bound:
        uniq, inverse = np.unique(ids, return_inverse=True)
        return uniq, inverse.reshape(-1)
    present = np.zeros(bound, dtype=bool)
    present[ids] = True
    uniq = np.flatnonzero(present)
    position = np.empty(bound, dtype=np.int64)
    position[uniq] = np.arange(uniq.size)
    return uniq.astype(ids.dtype, copy=False), position[ids]


def slice_keys(keys_bt: np.ndarray, bound: int | None = None) -> SliceKeys:
    """A one-hot slice: keys [b, features], each in [0, bound) when bound is given."""
    uniq, inverse = unique_with_inverse(keys_bt, bound)
    return SliceKeys(uniq, torch.from_numpy(inverse.reshape(keys_bt.shape).astype(np.int64, copy=False)))


def batch_keys(batch, rows, poolings: Sequence[str] = ()) -> SliceKeys:
    """The working set of a batch (or a trainer's slice of one): every id of every
    feature; `rows` is the RowSpace, `poolings` each feature's table pooling."""
    if not batch.bags:
        return slice_keys(rows.keys_of(batch.sparse), rows.total_rows)
    b, n_features = batch.size, batch.sparse.shape[0]
    offsets = rows.feature_offsets
    keys, bags, lengths = [], [], []
    for f in range(n_features):  # (per feature, vectorised over the slice)
        if f in batch.bags:
            ids, n = batch.bags[f].values, batch.bags[f].lengths()
        else:
            ids, n = batch.sparse[f], np.ones(b, dtype=np.int64)
        keys.append(ids + offsets[f])
        bags.append(np.repeat(np.arange(b, dtype=np.int64) * n_features + f, n))
        lengths.append(n)
    uniq, inverse = unique_with_inverse(np.concatenate(keys), rows.total_rows)
    divisor = None
    if "mean" in poolings:
        size = np.stack(lengths, axis=1).astype(np.float32)  # [b, features]
        size[:, [p != "mean" for p in poolings]] = 1.0
        divisor = torch.from_numpy(np.maximum(size, 1.0).reshape(-1, 1))
    return SliceKeys(uniq, torch.from_numpy(inverse.astype(np.int64)),
                     torch.from_numpy(np.concatenate(bags)), divisor, (b, n_features))


@dataclass
class ExampleKeys:
    """Every row key a multi-hot global batch reads, each with its example: what the
    planners need to know which trainer (a contiguous block of examples) reads what."""

    keys: np.ndarray  # int64 [ids]
    example: np.ndarray  # int64 [ids]: the example each key belongs to
    examples: int  # B

    def per_trainer(self, trainers: int) -> list[np.ndarray]:
        if self.examples % trainers:
            raise ValueError(f"global batch of {self.examples} examples does not split over {trainers} trainers "
                             f"(B % T must be 0)")
        trainer = self.example // (self.examples // trainers)
        if trainers == 1:
            return [self.keys]
        order = np.argsort(trainer, kind="stable")
        return np.split(self.keys[order], np.cumsum(np.bincount(trainer, minlength=trainers))[:-1])


def planner_keys(batch, rows):
    """A global batch's row keys as the planners take them: the [B, features] key array
    of one-hot data, or the `ExampleKeys` of multi-hot data."""
    if not batch.bags:
        return np.ascontiguousarray(rows.keys_of(batch.sparse))
    b, offsets = batch.size, rows.feature_offsets
    keys, example = [], []
    for f in range(batch.sparse.shape[0]):
        if f in batch.bags:
            bags = batch.bags[f]
            keys.append(bags.values + offsets[f])
            example.append(np.repeat(np.arange(b, dtype=np.int64), bags.lengths()))
        else:
            keys.append(batch.sparse[f] + offsets[f])
            example.append(np.arange(b, dtype=np.int64))
    return ExampleKeys(np.concatenate(keys), np.concatenate(example), b)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` in torch-allocated (64-byte aligned) memory. CPU kernels split a reduction
    into a peeled head and vector blocks by the data pointer's alignment, so the same
    numbers at another address can sum to other bits: a slice viewed inside its batch
    (local), a frame's payload (none), a request's buffer (serving) and a fresh array
    (a reader) must all look alike."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def lookup(working_set: torch.Tensor, sk: SliceKeys) -> torch.Tensor:
    """The model's embedding input [b, features, row_dim] from the working set."""
    rows = F.embedding(sk.inverse, working_set)
    if sk.bags is None:
        return rows
    b, n_features = sk.shape
    pooled = torch.zeros((b * n_features, working_set.shape[1]), dtype=working_set.dtype).index_add(0, sk.bags, rows)
    if sk.divisor is not None:
        pooled = pooled / sk.divisor
    return pooled.view(b, n_features, -1)


def sum_contributions(
    union_keys: np.ndarray, parts: list[tuple[np.ndarray, torch.Tensor]], row_dim: int
) -> torch.Tensor:
    """Row gradients 0 + c_1 + c_2 + ... in the order of `parts` (rank order).

    Each part is (sorted unique keys, contributions); all keys are in union_keys.
    Starting from zeros and adding every contribution, even a single one, keeps
    signed zeros identical in every mode.
    """
    total = torch.zeros((len(union_keys), row_dim), dtype=torch.float32)
    for keys, grads in parts:
        if len(keys) == 0:
            continue
        pos = torch.from_numpy(np.searchsorted(union_keys, keys).astype(np.int64))
        total.index_add_(0, pos, grads)
    return total


def union_of(key_lists: list[np.ndarray]) -> np.ndarray:
    nonempty = [k for k in key_lists if len(k)]
    if not nonempty:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(nonempty))
