"""DCN-v2: a cross network (full or low rank) followed by a deep MLP (stacked variant).

The cross network reads ``concat(x_dense, flattened embeddings)``, where x_dense is the
raw dense features or (``cross_input="bottom"``, as MLPerf's DLRM-DCNv2) the output of
a bottom MLP over them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bagpipe.config import ConfigError, ModelConfig

from .layers import MLP, check_inputs, init_bias_, init_weight_, make_linear


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l: explicit feature crosses of one more
    degree per layer; the residual keeps the lower-degree terms. With a rank r,
    W = U V^T (DCN-v2's low-rank cross: 2 d r weights instead of d^2)."""

    def __init__(self, dim: int, gen: torch.Generator, rank: int | None = None) -> None:
        super().__init__()
        # torch.empty: no draw from the global RNG; filled from gen below.
        if rank is None:
            self.weight = nn.Parameter(torch.empty(dim, dim, dtype=torch.float32))
            init_weight_(self.weight, dim, dim, gen)
            self.down = self.up = None
        else:
            self.weight = None
            self.down = nn.Parameter(torch.empty(rank, dim, dtype=torch.float32))  # V^T
            self.up = nn.Parameter(torch.empty(dim, rank, dtype=torch.float32))  # U
            init_weight_(self.down, dim, rank, gen)
            init_weight_(self.up, rank, dim, gen)
        self.bias = nn.Parameter(torch.empty(dim, dtype=torch.float32))
        init_bias_(self.bias, gen)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        if self.weight is not None:
            return x0 * nn.functional.linear(x, self.weight, self.bias) + x
        return x0 * nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias) + x


class DCN(nn.Module):
    """DCN-v2 over ``concat(dense, flattened embeddings)``."""

    def __init__(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.num_dense = cfg.num_dense
        self.num_features = cfg.num_features
        self.row_dim = cfg.row_dim
        self.bottom = MLP(cfg.num_dense, cfg.bottom_mlp, gen) \
            if cfg.cross_input == "bottom" and cfg.num_dense and cfg.bottom_mlp else None
        dense_dim = self.bottom.out_dim if self.bottom is not None else cfg.num_dense
        in_dim = dense_dim + cfg.num_features * cfg.embedding_dim
        if in_dim == 0:
            raise ConfigError("dcn: no dense features and no tables")
        self.cross = nn.ModuleList(CrossLayer(in_dim, gen, cfg.cross_rank) for _ in range(cfg.cross_layers))
        self.deep = MLP(in_dim, cfg.deep_mlp, gen)
        self.out = make_linear(self.deep.out_dim, 1, gen)

    def forward(self, dense: Tensor, emb: Tensor) -> Tensor:
        check_inputs(dense, emb, self.num_dense, self.num_features, self.row_dim)
        if self.bottom is not None:
            dense = self.bottom(dense)
        x0 = torch.cat([dense, emb.reshape(emb.shape[0], -1)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.out(self.deep(x)).squeeze(1)
