"""The one sparse optimizer (DESIGN.md section 2, rule 4), and the dense one.

Servers (`none`), cache owners (`bagpipe`) and the `local` trainer all hold a
`SparseOptimizer` and call it on contiguous [n, d] fp32 tensors, so the same row,
gradient and state give the same bits wherever the update runs. It also owns the
state layout (width, initial value), so a row's state is created the same way on a
server, in a cache or in `local`. Index ops, not torch's sparse optimizers (3-10x
slower here). The op sequence mirrors torch.optim's single-tensor SGD and Adagrad,
so those are the reference in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagpipe.config import ConfigError, OptimizerConfig, OptimizerKind


@dataclass(frozen=True)
class SparseOptimizer:
    kind: OptimizerKind
    row_dim: int
    eps: float = 1e-10
    initial_accumulator: float = 0.0

    @classmethod
    def from_config(cls, cfg: OptimizerConfig, row_dim: int) -> "SparseOptimizer":
        return cls(OptimizerKind(cfg.sparse), row_dim, cfg.eps, cfg.initial_accumulator)

    @property
    def state_dim(self) -> int:
        """Floats of optimizer state stored beside each row."""
        if self.kind is OptimizerKind.SGD:
            return 0
        if self.kind is OptimizerKind.ADAGRAD:
            return self.row_dim
        if self.kind is OptimizerKind.ROWWISE_ADAGRAD:
            return 1
        raise ConfigError(f"sparse optimizer {self.kind!r} unknown")

    def initial_state(self, n: int) -> torch.Tensor:
        return torch.full((n, self.state_dim), float(self.initial_accumulator), dtype=torch.float32)

    def apply(self, values: torch.Tensor, state: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
        """Update rows in place: values [n, d], state [n, s] and grads are contiguous."""
        if self.kind is OptimizerKind.SGD:
            values.add_(grads, alpha=-lr)
        elif self.kind is OptimizerKind.ADAGRAD:
            state.addcmul_(grads, grads, value=1)
            std = state.sqrt().add_(self.eps)
            values.addcdiv_(grads, std, value=-lr)
        elif self.kind is OptimizerKind.ROWWISE_ADAGRAD:
            state.add_((grads * grads).mean(dim=1, keepdim=True))
            std = state.sqrt().add_(self.eps)
            values.addcdiv_(grads, std, value=-lr)
        else:
            raise ConfigError(f"sparse optimizer {self.kind!r} unknown")

    def update_rows(self, table: torch.Tensor, table_state: torch.Tensor, slots: torch.Tensor, grads: torch.Tensor,
                    lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather rows at `slots` (unique), apply, scatter back. Returns the updated
        rows and state (contiguous copies), e.g. for digests."""
        values = table.index_select(0, slots)
        state = table_state.index_select(0, slots)
        self.apply(values, state, grads, lr)
        table.index_copy_(0, slots, values)
        if state.shape[1]:
            table_state.index_copy_(0, slots, state)
        return values, state


def build_dense_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Dense optimizer; single-tensor (not foreach/fused) so every mode runs one code path."""
    if cfg.dense is OptimizerKind.SGD:
        return torch.optim.SGD(params, lr=cfg.dense_lr, foreach=False)
    if cfg.dense is OptimizerKind.ADAGRAD:
        return torch.optim.Adagrad(
            params, lr=cfg.dense_lr, eps=cfg.eps, initial_accumulator_value=cfg.initial_accumulator, foreach=False
        )
    raise ConfigError(f"dense optimizer {cfg.dense!r} unknown")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
