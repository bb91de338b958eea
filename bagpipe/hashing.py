"""Counter-based hashing: the one splitmix64, tuple hashes and hash-derived uniforms.

Everything here is a pure function of its inputs (no RNG state), vectorised over
numpy uint64 arrays, so any process can compute the value of any row (row
initialisation, the synthetic generator) and digests (bagpipe.digest) can be
summed over whatever subset of rows a process holds.
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied elementwise (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=_U64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _M1
        z = (z ^ (z >> _U64(27))) * _M2
        return z ^ (z >> _U64(31))


def mix(*parts: np.ndarray | int) -> np.ndarray:
    """Hash of a tuple of integers (broadcast elementwise)."""
    h = np.zeros((), dtype=_U64)
    for part in parts:
        h = splitmix64(h ^ np.asarray(part).astype(_U64))
    return h


def uniform01(h: np.ndarray) -> np.ndarray:
    """float32 in [0, 1) from the top 24 bits of a hash (exactly representable)."""
    return (h >> _U64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
