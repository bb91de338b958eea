"""DLRM: bottom MLP over dense features, pairwise dot interaction, top MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bagpipe.config import ConfigError, ModelConfig

from .layers import MLP, check_inputs, make_linear


class DLRM(nn.Module):
    """Dot-interaction DLRM over externally looked-up embedding rows.

    The interaction takes the strict upper triangle of the Gram matrix of
    ``[bottom_out, emb_1, ..., emb_m]`` (self products carry no cross-feature
    signal and the lower triangle repeats the upper) and concatenates it with
    ``bottom_out``.

    When ``num_dense == 0`` (e.g. Avazu) there is no bottom MLP at all, whatever
    ``cfg.bottom_mlp`` says: the interaction runs over the embeddings alone and
    the top MLP sees only their pairwise dots. With dense features and an empty
    ``bottom_mlp`` the dense vector itself joins the interaction, which needs
    ``num_dense == embedding_dim``.
    """

    def __init__(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.num_dense = cfg.num_dense
        self.num_features = cfg.num_features
        self.row_dim = cfg.row_dim
        dim = cfg.embedding_dim

        self.bottom: MLP | None = None
        if cfg.num_dense > 0:
            self.bottom = MLP(cfg.num_dense, cfg.bottom_mlp, gen)
            if self.bottom.out_dim != dim:
                raise ConfigError(
                    f"dlrm: the dense vector entering the interaction has width {self.bottom.out_dim}, "
                    f"but embedding_dim is {dim}; set bottom_mlp to end in {dim}"
                )

        n_vec = cfg.num_features + (1 if self.bottom is not None else 0)
        rows, cols = torch.triu_indices(n_vec, n_vec, offset=1)
        # Derived from the shape alone: a buffer (moves with .to(device)) that is
        # neither a parameter nor part of the state_dict.
        self.register_buffer("tri_rows", rows, persistent=False)
        self.register_buffer("tri_cols", cols, persistent=False)

        top_in = rows.numel() + (dim if self.bottom is not None else 0)
        if top_in == 0:
            raise ConfigError(
                "dlrm: nothing reaches the top MLP (no dense features and fewer than two tables)"
            )
        self.top = MLP(top_in, cfg.top_mlp, gen)
        self.out = make_linear(self.top.out_dim, 1, gen)

    def forward(self, dense: Tensor, emb: Tensor) -> Tensor:
        check_inputs(dense, emb, self.num_dense, self.num_features, self.row_dim)
        if self.bottom is not None:
            x = self.bottom(dense)
            vecs = torch.cat([x.unsqueeze(1), emb], dim=1)
        else:
            vecs = emb
        gram = torch.bmm(vecs, vecs.transpose(1, 2))
        feats = gram[:, self.tri_rows, self.tri_cols]
        if self.bottom is not None:
            feats = torch.cat([x, feats], dim=1)
        return self.out(self.top(feats)).squeeze(1)
