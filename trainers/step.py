"""The per-slice training step shared by every mode.

`local` calls it once per simulated trainer slice; distributed trainers call it
once for their own slice. Everything mode-specific (where W comes from, where
contributions go, how dense gradients meet) stays outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagpipe import faults
from bagpipe.embedding import SliceKeys, aligned, lookup


@dataclass
class SliceResult:
    loss: torch.Tensor  # scalar fp32: sum of the slice's losses / global batch size
    dense_grad: torch.Tensor  # flat fp32 contribution to the dense gradient
    row_grads: torch.Tensor  # [u, row_dim] contribution to each working-set row
    logits: torch.Tensor


def flat_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def forward_logits(model: torch.nn.Module, dense: torch.Tensor, working_set: torch.Tensor, sk: SliceKeys):
    return model(aligned(dense), lookup(aligned(working_set), sk))


def slice_step(
    model: torch.nn.Module,
    dense: torch.Tensor,
    labels: torch.Tensor,
    working_set: torch.Tensor,
    sk: SliceKeys,
    global_batch: int,
) -> SliceResult:
    """Forward/backward of one slice; loss scaled by 1/B so contributions sum."""
    w = aligned(working_set.detach()).requires_grad_(True)
    logits = forward_logits(model, dense, w, sk)
    scale = labels.numel() if faults.active("loss_over_slice") else global_batch
    loss = F.binary_cross_entropy_with_logits(logits, aligned(labels), reduction="sum") / scale
    params = flat_params(model)
    for p in params:
        p.grad = None
    loss.backward()
    dense_grad = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    row_grads = w.grad if w.grad is not None else torch.zeros_like(w)
    return SliceResult(loss.detach(), dense_grad, row_grads, logits.detach())


def set_dense_grads(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in flat_params(model):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
