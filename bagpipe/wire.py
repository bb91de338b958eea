"""Fixed-layout metric messages sent to the oracle, which writes the run directory.

Each message is one int64 tensor; float fields travel as their float64 bits, and
64-bit digests as their two's-complement int64, so nothing is rounded on the way.
"""

from __future__ import annotations

import numpy as np
import torch

# (name, kind): kind "i" integer (digests are taken mod 2^64), "f" float
TRAINER_FIELDS = (
    ("iter", "i"), ("loss", "f"), ("dense_digest", "i"), ("rows_digest", "i"), ("lr_sparse", "f"), ("lr_dense", "f"),
    ("time_data", "f"), ("time_plan", "f"), ("time_wait", "f"), ("time_compute", "f"), ("time_exchange", "f"),
    ("time_update", "f"), ("time_iter", "f"), ("elapsed", "f"),
    ("rows_read", "i"), ("rows_fetched", "i"), ("rows_written_back", "i"),
    ("bytes_server", "i"), ("bytes_exchange", "i"), ("bytes_dense", "i"), ("cache_occupancy", "i"),
)
SERVER_FIELDS = (("stage", "i"), ("rows_digest", "i"), ("lr", "f"), ("bytes_in", "i"), ("bytes_out", "i"))
FINAL_SERVER_FIELDS = (("rows_digest", "i"), ("rows_checked_out", "i"), ("peak_rss_kb", "i"))
FINAL_TRAINER_FIELDS = (("dense_digest", "i"), ("peak_rss_kb", "i"))


def _to_i64(value: int) -> int:
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def encode(layout, values: dict) -> torch.Tensor:
    out = np.zeros(len(layout), dtype=np.int64)
    for j, (name, kind) in enumerate(layout):
        v = values.get(name, float("nan") if kind == "f" else 0)
        if kind == "f":
            out[j] = np.array([float(v)], dtype=np.float64).view(np.int64)[0]
        else:
            out[j] = _to_i64(int(v))
    return torch.from_numpy(out)


def decode(layout, tensor: torch.Tensor) -> dict:
    raw = tensor.numpy().astype(np.int64)
    out = {}
    for j, (name, kind) in enumerate(layout):
        if kind == "f":
            out[name] = float(raw[j : j + 1].view(np.float64)[0])
        else:
            out[name] = int(raw[j]) % (1 << 64) if name.endswith("digest") else int(raw[j])
    return out


def empty(layout) -> torch.Tensor:
    return torch.zeros(len(layout), dtype=torch.int64)
