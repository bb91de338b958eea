"""DeepFM: first-order + factorisation-machine second-order + deep MLP logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bagpipe.config import ConfigError, ModelConfig

from .layers import MLP, check_inputs, make_linear


class DeepFM(nn.Module):
    """The FM and deep parts share the embedding vectors (the point of DeepFM);
    the first-order weight of each id is the last column of its stored row.

    The second-order term uses the O(m*d) identity
    ``sum_{i<j} <v_i, v_j> = 0.5 * sum_k ((sum_i v_ik)^2 - sum_i v_ik^2)``
    instead of forming all pairs.
    """

    def __init__(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.num_dense = cfg.num_dense
        self.num_tables = cfg.num_tables
        self.row_dim = cfg.row_dim
        self.dim = cfg.embedding_dim
        deep_in = cfg.num_dense + cfg.num_tables * cfg.embedding_dim
        if deep_in == 0:
            raise ConfigError("deepfm: no dense features and no tables")
        # No dense features -> no dense linear term; the deep output bias then
        # serves as the global bias.
        self.first_dense = make_linear(cfg.num_dense, 1, gen) if cfg.num_dense > 0 else None
        self.deep = MLP(deep_in, cfg.deep_mlp, gen)
        self.out = make_linear(self.deep.out_dim, 1, gen)

    def forward(self, dense: Tensor, emb: Tensor) -> Tensor:
        check_inputs(dense, emb, self.num_dense, self.num_tables, self.row_dim)
        vecs = emb[:, :, : self.dim]
        first = emb[:, :, self.dim].sum(dim=1)
        if self.first_dense is not None:
            first = first + self.first_dense(dense).squeeze(1)
        total = vecs.sum(dim=1)
        second = 0.5 * (total * total - (vecs * vecs).sum(dim=1)).sum(dim=1)
        deep_in = torch.cat([dense, vecs.reshape(vecs.shape[0], -1)], dim=1)
        deep = self.out(self.deep(deep_in)).squeeze(1)
        return first + second + deep
