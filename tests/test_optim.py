"""The shared sparse optimizer against torch.optim and a float64 reference."""

import pytest
import torch

from bagpipe.config import OptimizerConfig, OptimizerKind
from bagpipe.optim import SparseOptimizer


def _steps(n=7, d=5, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, d, generator=g)
    grads = [torch.randn(n, d, generator=g) for _ in range(steps)]
    return w0, grads


@pytest.mark.parametrize("lr", [0.1, 0.0123])
def test_sgd_matches_torch_bitwise(lr):
    w0, grads = _steps()
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=lr, foreach=False)
    sgd = SparseOptimizer(OptimizerKind.SGD, w0.shape[1])
    ours, state = w0.clone(), sgd.initial_state(w0.shape[0])
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        sgd.apply(ours, state, g, lr)
    assert torch.equal(ours, ref.detach())


@pytest.mark.parametrize("acc", [0.0, 0.1])
def test_adagrad_matches_torch_bitwise(acc):
    w0, grads = _steps()
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adagrad([ref], lr=0.05, eps=1e-10, initial_accumulator_value=acc, foreach=False)
    adagrad = SparseOptimizer(OptimizerKind.ADAGRAD, w0.shape[1], eps=1e-10, initial_accumulator=acc)
    ours, state = w0.clone(), adagrad.initial_state(w0.shape[0])
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        adagrad.apply(ours, state, g, 0.05)
    assert torch.equal(ours, ref.detach())
    assert torch.equal(state, opt.state[ref]["sum"])


def test_rowwise_adagrad_matches_float64_formula():
    w0, grads = _steps()
    rowwise = SparseOptimizer(OptimizerKind.ROWWISE_ADAGRAD, w0.shape[1], eps=1e-10, initial_accumulator=0.25)
    ours, state = w0.clone(), rowwise.initial_state(w0.shape[0])
    ref_w, ref_s = w0.double(), torch.full((w0.shape[0], 1), 0.25, dtype=torch.float64)
    for g in grads:
        rowwise.apply(ours, state, g, 0.05)
        g64 = g.double()
        ref_s += (g64 * g64).mean(1, keepdim=True)
        ref_w -= 0.05 * g64 / (ref_s.sqrt() + 1e-10)
    assert state.shape == (w0.shape[0], 1)
    assert torch.allclose(ours.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_state_layout_from_config():
    assert SparseOptimizer(OptimizerKind.SGD, 16).state_dim == 0
    assert SparseOptimizer(OptimizerKind.ADAGRAD, 16).state_dim == 16
    assert SparseOptimizer(OptimizerKind.ROWWISE_ADAGRAD, 16).state_dim == 1
    opt = SparseOptimizer.from_config(OptimizerConfig(sparse="adagrad", initial_accumulator=0.5, eps=1e-8), 3)
    assert opt.kind is OptimizerKind.ADAGRAD and opt.eps == 1e-8
    assert torch.equal(opt.initial_state(2), torch.full((2, 3), 0.5))


@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_update_rows_touches_only_given_slots(kind):
    opt = SparseOptimizer(kind, 4, initial_accumulator=0.1)
    table = torch.randn(10, 4)
    state = opt.initial_state(10)
    before, state_before = table.clone(), state.clone()
    slots = torch.tensor([1, 7, 3])
    grads = torch.randn(3, 4)
    values, new_state = opt.update_rows(table, state, slots, grads, 0.1)
    untouched = torch.tensor([0, 2, 4, 5, 6, 8, 9])
    assert torch.equal(table[untouched], before[untouched])
    assert torch.equal(state[untouched], state_before[untouched])
    expected, expected_state = before[slots].clone(), state_before[slots].clone()
    opt.apply(expected, expected_state, grads, 0.1)
    assert torch.equal(table[slots], expected) and torch.equal(values, expected)
    assert torch.equal(new_state, expected_state)
