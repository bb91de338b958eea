"""DeepFM: first-order + factorisation-machine second-order + deep MLP logits."""

from __future__ import annotations

from torch import Tensor

from .wide_deep import WideDeep


class DeepFM(WideDeep):
    """Wide&Deep's first-order and deep parts (the same parameters) plus an FM term
    over the embedding vectors the deep part also reads (the point of DeepFM); the
    first-order weight of each id is the last column of its stored row.

    The second-order term uses the O(m*d) identity
    ``sum_{i<j} <v_i, v_j> = 0.5 * sum_k ((sum_i v_ik)^2 - sum_i v_ik^2)``
    instead of forming all pairs.
    """

    def forward(self, dense: Tensor, emb: Tensor) -> Tensor:
        vecs = emb[:, :, : self.dim]
        total = vecs.sum(dim=1)
        second = 0.5 * (total * total - (vecs * vecs).sum(dim=1)).sum(dim=1)
        return super().forward(dense, emb) + second
