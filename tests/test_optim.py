"""The shared sparse optimizers against torch.optim and a float64 reference."""

import pytest
import torch

from bagpipe.optim import apply_rows, initial_state, state_dim, update_table_rows


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
    ours, state = w0.clone(), initial_state("sgd", *w0.shape)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        apply_rows("sgd", ours, state, g, lr)
    assert torch.equal(ours, ref.detach())


@pytest.mark.parametrize("acc", [0.0, 0.1])
def test_adagrad_matches_torch_bitwise(acc):
    w0, grads = _steps()
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adagrad([ref], lr=0.05, eps=1e-10, initial_accumulator_value=acc, foreach=False)
    ours, state = w0.clone(), initial_state("adagrad", *w0.shape, initial_accumulator=acc)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        apply_rows("adagrad", ours, state, g, 0.05, 1e-10)
    assert torch.equal(ours, ref.detach())
    assert torch.equal(state, opt.state[ref]["sum"])


def test_rowwise_adagrad_matches_float64_formula():
    w0, grads = _steps()
    ours, state = w0.clone(), initial_state("rowwise_adagrad", *w0.shape)
    ref_w, ref_s = w0.double(), torch.zeros(w0.shape[0], 1, dtype=torch.float64)
    for g in grads:
        apply_rows("rowwise_adagrad", ours, state, g, 0.05, 1e-10)
        g64 = g.double()
        ref_s += (g64 * g64).mean(1, keepdim=True)
        ref_w -= 0.05 * g64 / (ref_s.sqrt() + 1e-10)
    assert state.shape == (w0.shape[0], 1)
    assert torch.allclose(ours.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_state_dims():
    assert state_dim("sgd", 16) == 0
    assert state_dim("adagrad", 16) == 16
    assert state_dim("rowwise_adagrad", 16) == 1


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad"])
def test_update_table_rows_touches_only_given_slots(kind):
    table = torch.randn(10, 4)
    state = initial_state(kind, 10, 4)
    before, state_before = table.clone(), state.clone()
    slots = torch.tensor([1, 7, 3])
    grads = torch.randn(3, 4)
    update_table_rows(kind, table, state, slots, grads, 0.1, 1e-10)
    untouched = torch.tensor([0, 2, 4, 5, 6, 8, 9])
    assert torch.equal(table[untouched], before[untouched])
    assert torch.equal(state[untouched], state_before[untouched])
    expected, expected_state = before[slots].clone(), state_before[slots].clone()
    apply_rows(kind, expected, expected_state, grads, 0.1, 1e-10)
    assert torch.equal(table[slots], expected)
