"""Dense recommendation models whose embedding storage lives outside them.

Every model is ``forward(dense[b, num_dense], emb[b, num_features, row_dim]) -> logits[b]``,
so one model runs unchanged over a full table, a fetched working set or a cache.
``emb[:, f, :]`` is the (pooled) row of sparse feature f for each example; for wide_deep and
deepfm its last column is that id's first-order weight (see ``ModelConfig.row_dim``).

Models own only dense parameters (no ``nn.Embedding``) and contain nothing
stochastic (no dropout, no batch norm): training relies on repeated computation
being bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from bagpipe.config import MODELS, ModelConfig

from .dcn import DCN
from .deepfm import DeepFM
from .dlrm import DLRM
from .wide_deep import WideDeep

MODEL_NAMES: tuple[str, ...] = MODELS

_CLASSES: dict[str, type[nn.Module]] = {
    "dlrm": DLRM,
    "dcn": DCN,
    "wide_deep": WideDeep,
    "deepfm": DeepFM,
}


def build_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """Build ``cfg.name`` with parameters that are a pure function of ``seed``.

    All parameters are drawn from a private generator in construction order, so
    every process building the same config and seed gets bitwise-identical
    weights, and torch's global RNG is left untouched.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return _CLASSES[cfg.name](cfg, gen)


__all__ = ["MODEL_NAMES", "build_model", "DLRM", "DCN", "WideDeep", "DeepFM"]
