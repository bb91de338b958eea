"""Building blocks shared by the models.

Every parameter is created uninitialised (no draw from torch's global RNG) and
then filled from an explicit ``torch.Generator``: a model's initial weights must
be a pure function of the run seed, identical in every process that builds it,
and building a model must not shift the random stream anything else relies on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BIAS_STD = 0.01


def init_weight_(weight: Tensor, fan_in: int, fan_out: int, gen: torch.Generator) -> None:
    """Glorot-normal, as in the DLRM reference, so activations keep their scale
    through the stack regardless of layer widths."""
    std = math.sqrt(2.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.normal_(0.0, std, generator=gen)


def init_bias_(bias: Tensor, gen: torch.Generator) -> None:
    """Small but non-zero, so that two units of one layer never start equal."""
    with torch.no_grad():
        bias.normal_(0.0, BIAS_STD, generator=gen)


def make_linear(in_dim: int, out_dim: int, gen: torch.Generator) -> nn.Linear:
    """An ``nn.Linear`` whose default (global-RNG) init is skipped in favour of ``gen``."""
    layer = nn.utils.skip_init(nn.Linear, in_dim, out_dim, dtype=torch.float32)
    init_weight_(layer.weight, in_dim, out_dim, gen)
    init_bias_(layer.bias, gen)
    return layer


class MLP(nn.Sequential):
    """Linear+ReLU for every width (ReLU after the last one too, as DLRM's bottom
    MLP and the hidden part of every top/deep network want). An empty ``widths``
    is the identity, so callers need no special case."""

    def __init__(self, in_dim: int, widths: tuple[int, ...], gen: torch.Generator) -> None:
        layers: list[nn.Module] = []
        dim = in_dim
        for width in widths:
            if width <= 0:
                raise ValueError(f"MLP widths must be positive, got {list(widths)}")
            layers += [make_linear(dim, width, gen), nn.ReLU()]
            dim = width
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = dim


def check_inputs(dense: Tensor, emb: Tensor, num_dense: int, num_features: int, row_dim: int) -> None:
    """Fail with a readable message rather than a shape error deep inside a matmul:
    the emb tensor is assembled by the caller from whatever storage is in use."""
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise ValueError(f"dense must be [batch, {num_dense}], got {list(dense.shape)}")
    if emb.dim() != 3 or emb.shape[1] != num_features or emb.shape[2] != row_dim:
        raise ValueError(f"emb must be [batch, {num_features}, {row_dim}], got {list(emb.shape)}")
    if dense.shape[0] != emb.shape[0]:
        raise ValueError(f"batch mismatch: dense has {dense.shape[0]} rows, emb {emb.shape[0]}")
