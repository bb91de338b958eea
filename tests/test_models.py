"""Tests for bagpipe.models: shapes, gradients, determinism, first-order columns."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from bagpipe.config import ConfigError, ModelConfig
from bagpipe.models import MODEL_NAMES, build_model


def small_cfg(name: str, num_dense: int = 3, tables: int = 3, dim: int = 4) -> ModelConfig:
    return ModelConfig(
        name=name,
        num_dense=num_dense,
        cardinalities=tuple(range(5, 5 + tables)),
        embedding_dim=dim,
        bottom_mlp=(6, dim),
        top_mlp=(5, 3),
        cross_layers=2,
        deep_mlp=(5, 3),
    )


def inputs(cfg: ModelConfig, batch: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, cfg.num_dense, generator=g, dtype=dtype)
    emb = torch.randn(batch, cfg.num_tables, cfg.row_dim, generator=g, dtype=dtype)
    return dense, emb


def state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_model_names():
    assert set(MODEL_NAMES) == {"dlrm", "dcn", "wide_deep", "deepfm"}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_dense", [0, 3])
def test_shapes(name, num_dense):
    cfg = small_cfg(name, num_dense=num_dense)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 5)
    out = model(dense, emb)
    assert out.shape == (5,)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_embedding_tables_owned(name):
    model = build_model(small_cfg(name), seed=0)
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # parameters do not depend on table cardinalities: no table hides inside
    huge = build_model(ModelConfig(**{**small_cfg(name).__dict__, "cardinalities": (10**6,) * 3}), seed=0)
    assert [p.shape for p in model.parameters()] == [p.shape for p in huge.parameters()]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_row_dim(name):
    cfg = small_cfg(name)
    if name in ("dlrm", "dcn"):
        assert cfg.row_dim == cfg.embedding_dim
    else:
        assert cfg.row_dim == cfg.embedding_dim + 1


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rejects_wrong_input_shapes(name):
    cfg = small_cfg(name)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 4)
    with pytest.raises(ValueError):
        model(dense, emb[:, :, :-1])
    with pytest.raises(ValueError):
        model(dense[:, :-1], emb)
    with pytest.raises(ValueError):
        model(dense[:3], emb)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_dense", [0, 2])
def test_gradcheck_inputs(name, num_dense):
    cfg = small_cfg(name, num_dense=num_dense, tables=3, dim=3)
    model = build_model(cfg, seed=3).double()
    dense, emb = inputs(cfg, 3, seed=4, dtype=torch.float64)
    dense.requires_grad_(num_dense > 0)
    emb.requires_grad_(True)
    if num_dense > 0:
        assert gradcheck(lambda d, e: model(d, e), (dense, emb), eps=1e-6, atol=1e-5)
    else:
        assert gradcheck(lambda e: model(dense, e), (emb,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradcheck_parameters(name):
    cfg = small_cfg(name, num_dense=2, tables=2, dim=2)
    model = build_model(cfg, seed=5).double()
    dense, emb = inputs(cfg, 3, seed=6, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (dense, emb))

    assert gradcheck(f, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_dense", [0, 3])
def test_gradients_reach_everything(name, num_dense):
    cfg = small_cfg(name, num_dense=num_dense)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 32)
    emb.requires_grad_(True)
    model(dense, emb).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # every table and every column of the stored row receives gradient
    assert (emb.grad.abs().sum(dim=0) > 0).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_identical_params(name):
    cfg = small_cfg(name)
    a, b = build_model(cfg, seed=42), build_model(cfg, seed=42)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = build_model(cfg, seed=43)
    assert any(not torch.equal(sa[k], c.state_dict()[k]) for k in sa)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    build_model(small_cfg(name), seed=7)
    assert torch.equal(before, torch.get_rng_state())
    # and the global RNG does not influence the parameters
    torch.manual_seed(999)
    x = build_model(small_cfg(name), seed=7)
    torch.manual_seed(0)
    y = build_model(small_cfg(name), seed=7)
    assert state_digest(x) == state_digest(y)


def test_same_seed_identical_across_processes():
    cfg = small_cfg("dcn")
    code = (
        "import hashlib, torch\n"
        "from bagpipe.config import ModelConfig, TableConfig\n"
        "from bagpipe.models import build_model\n"
        f"m = build_model(ModelConfig(**{cfg.__dict__!r}), seed=11)\n"
        "h = hashlib.sha256()\n"
        "for n, t in sorted(m.state_dict().items()):\n"
        "    h.update(n.encode()); h.update(t.detach().contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == state_digest(build_model(cfg, seed=11))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_repeated_forward_bit_identical(name):
    cfg = small_cfg(name)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 16)
    assert torch.equal(model(dense, emb), model(dense, emb))


@pytest.mark.parametrize("name", ["wide_deep", "deepfm"])
def test_first_order_column_is_used(name):
    cfg = small_cfg(name)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 5)
    base = model(dense, emb)
    bumped = emb.clone()
    bumped[:, 1, -1] += 0.5
    # the first-order weight enters the logit linearly with coefficient 1
    torch.testing.assert_close(model(dense, bumped), base + 0.5)


def test_dlrm_interaction_matches_naive():
    cfg = small_cfg("dlrm", num_dense=3, tables=3, dim=4)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 5)
    x = model.bottom(dense)
    vecs = [x] + [emb[:, t] for t in range(cfg.num_tables)]
    dots = [(vecs[i] * vecs[j]).sum(1) for i in range(len(vecs)) for j in range(i + 1, len(vecs))]
    feats = torch.cat([x, torch.stack(dots, 1)], 1)
    expected = model.out(model.top(feats)).squeeze(1)
    torch.testing.assert_close(model(dense, emb), expected)
    assert "tri_rows" not in model.state_dict()


def test_dlrm_without_dense_uses_embeddings_only():
    cfg = small_cfg("dlrm", num_dense=0, tables=4)
    model = build_model(cfg, seed=0)
    assert model.bottom is None
    assert model.top[0].in_features == 4 * 3 // 2


def test_dlrm_rejects_mismatched_dense_width():
    cfg = ModelConfig(name="dlrm", num_dense=3, cardinalities=(4, 4), embedding_dim=4, bottom_mlp=())
    with pytest.raises(ConfigError):
        build_model(cfg, seed=0)


def test_deepfm_second_order_matches_pairwise():
    cfg = small_cfg("deepfm", num_dense=0, tables=3, dim=4)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 5)
    v = emb[:, :, :4]
    pairs = sum((v[:, i] * v[:, j]).sum(1) for i in range(3) for j in range(i + 1, 3))
    first = emb[:, :, 4].sum(1)
    deep = model.out(model.deep(v.reshape(5, -1))).squeeze(1)
    torch.testing.assert_close(model(dense, emb), first + pairs + deep)


def test_dcn_cross_layer_formula():
    cfg = small_cfg("dcn", num_dense=2, tables=2, dim=2)
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 5)
    x0 = torch.cat([dense, emb.reshape(5, -1)], 1)
    x = x0
    for layer in model.cross:
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(model(dense, emb), model.out(model.deep(x)).squeeze(1))


def test_dcn_low_rank_cross_on_the_bottom_mlp_output():
    """MLPerf's DCN-v2: x0 = [bottom(dense), embeddings], cross layers x0 * (U (V x) + b) + x."""
    from dataclasses import replace

    cfg = replace(small_cfg("dcn", num_dense=3, tables=2, dim=4), cross_rank=2, cross_input="bottom",
                  bottom_mlp=(6, 5))
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 5)
    x0 = torch.cat([model.bottom(dense), emb.reshape(5, -1)], 1)
    assert x0.shape == (5, 5 + 2 * 4)
    x = x0
    for layer in model.cross:
        assert layer.down.shape == (2, 13) and layer.up.shape == (13, 2)
        x = x0 * ((x @ layer.down.T) @ layer.up.T + layer.bias) + x
    torch.testing.assert_close(model(dense, emb), model.out(model.deep(x)).squeeze(1))


def test_the_mlperf_preset_builds_its_shape():
    from bagpipe.config import PRESETS

    cfg = ModelConfig(num_dense=13, cardinalities=(7,) * 26, **PRESETS["mlperf-dcnv2"])
    model = build_model(cfg, seed=0)
    assert [m.out_features for m in model.bottom.modules() if isinstance(m, torch.nn.Linear)] == [512, 256, 128]
    assert len(model.cross) == 3 and model.cross[0].down.shape == (512, 128 + 26 * 128)
    dense, emb = inputs(cfg, 2)
    assert model(dense, emb).shape == (2,)


def test_dlrm_default_size_forward_backward():
    cfg = ModelConfig(
        name="dlrm",
        num_dense=13,
        cardinalities=(1000,) * 26,
        embedding_dim=16,
        bottom_mlp=(64, 16),
        top_mlp=(64, 32),
    )
    model = build_model(cfg, seed=0)
    dense, emb = inputs(cfg, 256)
    emb.requires_grad_(True)
    out = model(dense, emb)
    assert out.shape == (256,)
    torch.nn.functional.binary_cross_entropy_with_logits(out, torch.ones(256)).backward()
    assert emb.grad.shape == emb.shape
    assert all(p.grad is not None for p in model.parameters())
    assert model.top[0].in_features == 16 + 27 * 26 // 2


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_step_bits_do_not_depend_on_input_addresses(name):
    """`local` views a trainer's slice inside the global batch, `none` reads rows out of a
    frame, a distributed trainer gets fresh arrays: the same numbers at other addresses.
    CPU kernels pick their reduction blocks by the pointer's alignment (Wide&Deep and
    DeepFM gave other bits for a slice at byte offset 1560 on AMD EPYC), so the step must
    see its inputs in torch-allocated memory. Mutant: `aligned` returning its input."""
    import numpy as np

    from bagpipe.embedding import slice_keys
    from bagpipe.trainers.step import slice_step

    cfg = ModelConfig(name=name, num_dense=13, cardinalities=(50, 200, 1000, 30, 5000), embedding_dim=8,
                      bottom_mlp=(16, 8), top_mlp=(16,), deep_mlp=(16,))
    model = build_model(cfg, 0)
    rng = np.random.default_rng(0)
    b = 30
    offsets = np.cumsum((0,) + cfg.cardinalities[:-1])
    sk = slice_keys(np.stack([rng.integers(0, c, b) + o for c, o in zip(cfg.cardinalities, offsets)], 1))
    rows = torch.randn(len(sk.keys), cfg.row_dim)
    results = []
    for shift in range(0, 16, 3):  # floats before the slice in a larger buffer
        dense = np.zeros((b * 2 + shift, 13), dtype=np.float32).ravel()[shift: shift + b * 13].reshape(b, 13)
        dense[:] = np.linspace(-2, 2, b * 13, dtype=np.float32).reshape(b, 13)
        labels = np.zeros(b + shift, dtype=np.float32)[shift:]
        labels[::3] = 1.0
        frame = torch.zeros(rows.numel() + shift)
        working_set = frame[shift:].view_as(rows)
        working_set.copy_(rows)
        results.append(slice_step(model, torch.from_numpy(dense), torch.from_numpy(labels), working_set, sk, 2 * b))
    for other in results[1:]:
        assert torch.equal(other.loss, results[0].loss)
        assert torch.equal(other.dense_grad, results[0].dense_grad)
        assert torch.equal(other.row_grads, results[0].row_grads)
