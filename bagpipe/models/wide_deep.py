"""Wide & Deep: a linear (wide) part plus an MLP (deep) part, summed as logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bagpipe.config import ConfigError, ModelConfig

from .layers import MLP, check_inputs, make_linear


class WideDeep(nn.Module):
    """The wide part's per-id weights are not parameters here: each is the last
    column of that id's stored row, so the same storage (and sparse optimizer)
    that serves embeddings also serves and updates them."""

    def __init__(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.num_dense = cfg.num_dense
        self.num_features = cfg.num_features
        self.row_dim = cfg.row_dim
        self.dim = cfg.embedding_dim
        deep_in = cfg.num_dense + cfg.num_features * cfg.embedding_dim
        if deep_in == 0:
            raise ConfigError(f"{cfg.name}: no dense features and no tables")
        # No dense features -> no dense linear term; the deep output bias then
        # serves as the global bias.
        self.wide_dense = make_linear(cfg.num_dense, 1, gen) if cfg.num_dense > 0 else None
        self.deep = MLP(deep_in, cfg.deep_mlp, gen)
        self.out = make_linear(self.deep.out_dim, 1, gen)

    def forward(self, dense: Tensor, emb: Tensor) -> Tensor:
        check_inputs(dense, emb, self.num_dense, self.num_features, self.row_dim)
        vecs = emb[:, :, : self.dim]
        wide = emb[:, :, self.dim].sum(dim=1)
        if self.wide_dense is not None:
            wide = wide + self.wide_dense(dense).squeeze(1)
        deep_in = torch.cat([dense, vecs.reshape(vecs.shape[0], -1)], dim=1)
        deep = self.out(self.deep(deep_in)).squeeze(1)
        return wide + deep
