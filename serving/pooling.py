"""The one pooling function: bags of rows -> one vector per bag, the same bits everywhere.

`torch.nn.functional.embedding_bag` adds a bag's rows one after another in the order
the ids are given (tests/test_serving_pooling.py checks it against a sequential
reference), so pooling a bag straight from its table, or from those same rows gathered
first into a working tensor (how the main shard pools a table split by rows across
shards), gives identical bits. The single-process path, a sparse shard and the main
shard all pool through `pool`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .spec import PoolingMode


def as_index(array: np.ndarray) -> torch.Tensor:
    """int64 tensor over `array` (copied when it is read-only, as Arrow buffers are)."""
    array = np.asarray(array, dtype=np.int64)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def pool(weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """[b, d] pooled rows of `weight` for bags ``ids[offsets[i]:offsets[i+1]]`` (offsets: [b + 1]).

    A table no bag touches pools to zeros without calling the kernel, in every path alike."""
    bags = offsets.numel() - 1
    if ids.numel() == 0:
        return torch.zeros((bags, weight.shape[1]), dtype=weight.dtype)
    return F.embedding_bag(ids, weight, offsets, mode=mode.value, include_last_offset=True)


def pool_gathered(rows: torch.Tensor, offsets: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """`pool` over rows already gathered in bag order (rows[i] is the i-th id's row)."""
    return pool(rows, torch.arange(rows.shape[0], dtype=torch.int64), offsets, mode)
