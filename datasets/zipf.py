"""Bounded Zipf sampling by exact inverse CDF, shared by every skewed-id workload.

The synthetic generator (`synthetic`) and the planner's key batches
(`bagpipe.oracle.simulate.zipf_key_batches`) draw their popularity ranks here, so
"Zipf(a) over n ranks" means the same distribution, to the bit, everywhere.
"""

from __future__ import annotations

import math

import numpy as np


class ZipfSampler:
    """Exact inverse-CDF sampling of a bounded Zipf over ranks 1..m (``P(k) ~ k^-a``).

    The float64 cumulative distribution ``cdf`` is built once; a guide table of
    ``G`` (a power of two, so ``u * G`` is exact) equal buckets of [0, 1) stores
    ``searchsorted(cdf, b / G, "right")``, so a key's answer lies in
    ``[guide[b], guide[b + 1]]`` and a fixed number of vectorised bisection steps
    over that bracket finds it. The result equals
    ``np.searchsorted(cdf, u, side="right")`` exactly (tested), in a fraction of the
    time for large tables; small tables use searchsorted directly."""

    GUIDE_MIN = 1024
    GUIDE_MAX_LOG2 = 22

    def __init__(self, m: int, a: float) -> None:
        if m < 1:
            raise ValueError(f"a Zipf sampler needs at least one rank, got {m}")
        cdf = np.arange(1, m + 1, dtype=np.float64)
        np.power(cdf, -a, out=cdf)
        np.cumsum(cdf, out=cdf)
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        self.cdf = cdf
        self.m = m
        self.guide: np.ndarray | None = None
        self.G = 0
        self.iters = 0
        if m >= self.GUIDE_MIN:
            self.G = 1 << min(self.GUIDE_MAX_LOG2, int(math.ceil(math.log2(2 * m))))
            grid = np.arange(self.G + 1, dtype=np.float64)
            grid *= 1.0 / self.G
            self.guide = np.searchsorted(cdf, grid, side="right")
            span = int(np.diff(self.guide).max())
            self.iters = int(math.ceil(math.log2(span + 1))) if span > 0 else 0

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """0-based rank index (0..m-1) for uniforms u in [0, 1)."""
        if self.guide is None:
            r = np.searchsorted(self.cdf, u, side="right")
            np.minimum(r, self.m - 1, out=r)
            return r
        b = (u * self.G).astype(np.intp)
        lo = self.guide.take(b)
        b += 1
        hi = self.guide.take(b)
        mid = b  # reuse the buffer
        le = np.empty(len(u), dtype=bool)
        top = self.m - 1
        for _ in range(self.iters):
            np.add(lo, hi, out=mid)
            mid >>= 1
            np.minimum(mid, top, out=mid)
            np.less_equal(self.cdf.take(mid), u, out=le)
            np.copyto(hi, mid, where=~le)
            mid += 1
            np.copyto(lo, mid, where=le)
        np.minimum(lo, top, out=lo)
        return lo
