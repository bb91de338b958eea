"""Digests: one number that says whether two runs are the same training, bit for bit.

Row digests are sums mod 2^64 of a hash of (row key, value bits, state bits), so
servers and cache owners can each digest the rows they hold and the parts add up
to the same number wherever rows live (DESIGN.md section 2, "Digest"). Iteration
and final digests combine those with the loss and dense parameter bits; the
oracle combines the parts that trainers and servers report.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from bagpipe.hashing import mix, splitmix64

_U64 = np.uint64
_CHUNK = 1 << 18


@functools.lru_cache(maxsize=32)
def _multipliers(n: int, salt: int) -> np.ndarray:
    """Fixed odd (so invertible mod 2^64) pseudo-random multipliers, one per position."""
    return splitmix64(np.arange(n, dtype=_U64) + _U64(salt)) | _U64(1)


def _weighted_sum(words: np.ndarray, salt: int) -> np.ndarray:
    """Row-wise sum of words times per-column odd multipliers (mod 2^64): any change
    of one word changes the sum, and it is one vectorised multiply-add."""
    with np.errstate(over="ignore"):
        return (words * _multipliers(words.shape[-1], salt)).sum(axis=-1, dtype=_U64)


def rows_digest(keys: np.ndarray, values: np.ndarray, state: np.ndarray | None = None) -> int:
    """Sum mod 2^64 of a hash of (row key, value bits, state bits) over rows.

    A sum, so servers and cache owners can each digest their own rows and the
    parts add up to the same number wherever the rows live.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if keys.size == 0:
        return 0
    if keys.size > _CHUNK:  # bound the uint64 temporaries (16x the rows' bytes)
        total = 0
        for lo in range(0, keys.size, _CHUNK):
            part = slice(lo, lo + _CHUNK)
            total += rows_digest(keys[part], values[part], None if state is None else state[part])
        return total % (1 << 64)
    blocks = [np.ascontiguousarray(b, dtype=np.float32).view(np.uint32).reshape(len(keys), -1)
              for b in (values, state) if b is not None and b.size]
    bits = np.concatenate(blocks, axis=1).astype(_U64) if blocks else np.zeros((len(keys), 0), _U64)
    h = splitmix64(splitmix64(keys.astype(_U64) ^ _U64(0x5BD1E995)) ^ _weighted_sum(bits, 0x51))
    with np.errstate(over="ignore"):
        return int(h.sum(dtype=_U64))


def stored_rows_digest(keys: np.ndarray, values, state) -> int:
    """rows_digest of rows held in [n, d] value and [n, s] state tensors (s may be 0)."""
    return rows_digest(keys, values.numpy(), state.numpy() if state.shape[1] else None)


def bytes_digest(*arrays: np.ndarray) -> int:
    """Order-sensitive hash of raw bytes (dense parameters, loss)."""
    h = np.zeros((), dtype=_U64)
    for arr in arrays:
        raw = np.ascontiguousarray(arr).view(np.uint8).ravel()
        pad = (-raw.size) % 8
        words = np.concatenate([raw, np.zeros(pad, np.uint8)]).view(_U64) if pad else raw.view(_U64)
        h = splitmix64(h ^ _U64(raw.size))
        h = splitmix64(h ^ _weighted_sum(words, 0xD16E))
    return int(h)


def combine(*digests: int) -> str:
    """One hex digest from several 64-bit parts."""
    return "%016x" % int(mix(*[np.uint64(d % (1 << 64)) for d in digests]))


def dense_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Digest of the trainable dense parameters, plus the optimizer state when given."""
    params = [p for p in model.parameters() if p.requires_grad]
    arrays = [p.detach().numpy() for p in params]
    if optimizer is not None:
        for p in params:
            for key in sorted(optimizer.state.get(p, {})):
                value = optimizer.state[p][key]
                if torch.is_tensor(value):
                    arrays.append(value.detach().numpy())
    return bytes_digest(*arrays)


def dense_digest_reporter(iteration: int, trainers: int) -> int:
    """The trainer that digests the dense parameters after `iteration` (identical on
    every trainer): they take turns, so the cost does not make one of them late every time."""
    return iteration % trainers


def iteration_digest(loss: float, dense: int, updated_rows: int) -> str:
    """Digest of iteration i: its loss (fp32 bits), the dense parameters after its
    update and the rows it updated (a sum over whoever holds them)."""
    return combine(bytes_digest(np.asarray([loss], dtype=np.float32)), dense, updated_rows)


def final_digest(dense_with_state: int, all_rows: int) -> str:
    return combine(dense_with_state, all_rows)
