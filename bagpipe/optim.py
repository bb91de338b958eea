"""The one sparse optimizer function per optimizer (DESIGN.md section 2, rule 4).

Servers (`none`), cache owners (`bagpipe`) and the `local` trainer all call
`apply_rows` on contiguous [n, d] fp32 tensors, so the same row, gradient and
state give the same bits wherever the update runs. Index ops, not torch's sparse
optimizers (3-10x slower here). The op sequence mirrors torch.optim's
single-tensor SGD and Adagrad, so those are the reference in tests.
"""

from __future__ import annotations

import torch

from bagpipe.config import ConfigError, OptimizerConfig


def state_dim(kind: str, row_dim: int) -> int:
    """Floats of optimizer state stored beside each row."""
    if kind == "sgd":
        return 0
    if kind == "adagrad":
        return row_dim
    if kind == "rowwise_adagrad":
        return 1
    raise ConfigError(f"sparse optimizer {kind!r} unknown")


def initial_state(kind: str, n: int, row_dim: int, initial_accumulator: float = 0.0) -> torch.Tensor:
    return torch.full((n, state_dim(kind, row_dim)), float(initial_accumulator), dtype=torch.float32)


def apply_rows(
    kind: str, values: torch.Tensor, state: torch.Tensor, grads: torch.Tensor, lr: float, eps: float = 1e-10
) -> None:
    """Update rows in place: values, state [n, s] and grads are contiguous."""
    if kind == "sgd":
        values.add_(grads, alpha=-lr)
    elif kind == "adagrad":
        state.addcmul_(grads, grads, value=1)
        std = state.sqrt().add_(eps)
        values.addcdiv_(grads, std, value=-lr)
    elif kind == "rowwise_adagrad":
        state.add_((grads * grads).mean(dim=1, keepdim=True))
        std = state.sqrt().add_(eps)
        values.addcdiv_(grads, std, value=-lr)
    else:
        raise ConfigError(f"sparse optimizer {kind!r} unknown")


def update_table_rows(
    kind: str,
    table: torch.Tensor,
    table_state: torch.Tensor,
    slots: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather rows at `slots`, apply the optimizer, scatter back (slots unique).
    Returns the updated rows and state (contiguous copies), e.g. for digests."""
    values = table.index_select(0, slots)
    state = table_state.index_select(0, slots)
    apply_rows(kind, values, state, grads, lr, eps)
    table.index_copy_(0, slots, values)
    if state.shape[1]:
        table_state.index_copy_(0, slots, state)
    return values, state


def build_dense_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Dense optimizer; single-tensor (not foreach/fused) so every mode runs one code path."""
    if cfg.dense == "sgd":
        return torch.optim.SGD(params, lr=cfg.dense_lr, foreach=False)
    if cfg.dense == "adagrad":
        return torch.optim.Adagrad(
            params, lr=cfg.dense_lr, eps=cfg.eps, initial_accumulator_value=cfg.initial_accumulator, foreach=False
        )
    raise ConfigError(f"dense optimizer {cfg.dense!r} unknown")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
