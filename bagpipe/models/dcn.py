"""DCN-v2: full-rank cross network followed by a deep MLP (stacked variant)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bagpipe.config import ConfigError, ModelConfig

from .layers import MLP, check_inputs, init_bias_, init_weight_, make_linear


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l: explicit feature crosses of one more
    degree per layer; the residual keeps the lower-degree terms."""

    def __init__(self, dim: int, gen: torch.Generator) -> None:
        super().__init__()
        # torch.empty: no draw from the global RNG; filled from gen below.
        self.weight = nn.Parameter(torch.empty(dim, dim, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(dim, dtype=torch.float32))
        init_weight_(self.weight, dim, dim, gen)
        init_bias_(self.bias, gen)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * nn.functional.linear(x, self.weight, self.bias) + x


class DCN(nn.Module):
    """DCN-v2 over ``concat(dense, flattened embeddings)``."""

    def __init__(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.num_dense = cfg.num_dense
        self.num_tables = cfg.num_tables
        self.row_dim = cfg.row_dim
        in_dim = cfg.num_dense + cfg.num_tables * cfg.embedding_dim
        if in_dim == 0:
            raise ConfigError("dcn: no dense features and no tables")
        self.cross = nn.ModuleList(CrossLayer(in_dim, gen) for _ in range(cfg.cross_layers))
        self.deep = MLP(in_dim, cfg.deep_mlp, gen)
        self.out = make_linear(self.deep.out_dim, 1, gen)

    def forward(self, dense: Tensor, emb: Tensor) -> Tensor:
        check_inputs(dense, emb, self.num_dense, self.num_tables, self.row_dim)
        x0 = torch.cat([dense, emb.reshape(emb.shape[0], -1)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.out(self.deep(x)).squeeze(1)
