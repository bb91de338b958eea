"""The mode-agnostic working-set lookup (DESIGN.md section 2, rule 1).

A trainer gathers the sorted unique row keys of its slice into a contiguous fp32
working set W, runs the model on F.embedding(inverse, W), and W's dense gradient
is its per-row contribution. Never EmbeddingBag over cache slots, never sparse
gradients: the bits must not depend on where rows live.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SliceKeys:
    """Sorted unique keys of one trainer's slice and the inverse map [b, tables]."""

    keys: np.ndarray  # int64 [u], sorted
    inverse: torch.Tensor  # int64 [b, tables]


def slice_keys(keys_bt: np.ndarray) -> SliceKeys:
    uniq, inverse = np.unique(keys_bt.ravel(), return_inverse=True)
    return SliceKeys(uniq, torch.from_numpy(inverse.reshape(keys_bt.shape).astype(np.int64)))


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
