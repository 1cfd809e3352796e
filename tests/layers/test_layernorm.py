"""LayerNorm, RMSNorm, CRMSNorm against torch and formulas written out here (layernorm.md, pre_rmsnorm.md)."""

import io
import warnings

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st

from normlab import CRMSNorm, LayerNorm, RMSNorm


def ln_formula(x, dims, weight=None, bias=None, eps=1e-5, correction=0):
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=correction)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def rms_formula(x, dims, weight=None, bias=None, eps=1e-5):
    y = x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize("shape,normalized", [((2, 3, 8), (8,)), ((2, 3, 8), (3, 8))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_layernorm_matches_torch_values_and_grads(shape, normalized, dtype, tol):
    ours = randomize(LayerNorm(normalized, dtype=dtype))
    ref = nn.LayerNorm(normalized, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    x = (3 * torch.randn(shape, dtype=dtype) + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    y, y2 = ours(x), ref(x2)
    torch.testing.assert_close(y, y2, atol=tol, rtol=0)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=tol * 10, rtol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=tol * 10, rtol=0)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=tol * 10, rtol=0)


def test_layernorm_formula_biased_variance_and_unbiased_fails():
    x = torch.randn(4, 6, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(x, (6,), eps=1e-5)
    torch.testing.assert_close(LayerNorm(6, elementwise_affine=False, dtype=torch.float64)(x), ref, atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(ln_formula(x, (-1,)), ref, atol=1e-12, rtol=0)
    assert (ln_formula(x, (-1,), correction=1) - ref).abs().max() > 1e-3


def test_layernorm_gradcheck():
    ln = randomize(LayerNorm(5, dtype=torch.float64))
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.nn.functional.layer_norm(x, (5,), w, b, ln.eps),
                                    (x, ln.weight, ln.bias))
    assert torch.autograd.gradcheck(ln, (x,))


@pytest.mark.parametrize("normalized", [(8,), (3, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_rmsnorm_matches_formula(normalized, bias):
    ours = randomize(RMSNorm(normalized, eps=1e-5, bias=bias, dtype=torch.float64))
    x = 3 * torch.randn(2, 3, 8, dtype=torch.float64) + 1
    dims = tuple(range(-len(normalized), 0))
    torch.testing.assert_close(ours(x), rms_formula(x, dims, ours.weight, ours.bias, 1e-5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("normalized", [(8,), (3, 8)])
def test_rmsnorm_default_equals_torch(normalized):
    ours = randomize(RMSNorm(normalized))
    ref = nn.RMSNorm(normalized)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(2, 3, 8) * 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, 3, 8)
    y, y2 = ours(x), ref(x2)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=0)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_rmsnorm_and_crmsnorm_gradcheck(affine, bias):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    rms = randomize(RMSNorm(5, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=torch.float64))
    crms = randomize(CRMSNorm(5, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=torch.float64))
    for layer in (rms, crms):
        params = tuple(layer.parameters())
        assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))
    multi = randomize(RMSNorm((3, 5), eps=1e-5, bias=bias, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, *p: multi(x), (x, *multi.parameters()))


def test_rmsnorm_equals_layernorm_on_zero_mean_input_and_crms_equals_rms_prefix():
    x = torch.randn(4, 7, 16, dtype=torch.float64) * 5
    x = x - x.mean(-1, keepdim=True)
    ln = LayerNorm(16, eps=1e-5, elementwise_affine=False, dtype=torch.float64)
    rms = RMSNorm(16, eps=1e-5, elementwise_affine=False, dtype=torch.float64)
    torch.testing.assert_close(rms(x), ln(x), atol=1e-12, rtol=0)
    crms = CRMSNorm(15, eps=1e-5, elementwise_affine=False, dtype=torch.float64)
    torch.testing.assert_close(crms(x[..., :-1]), rms(x)[..., :-1], atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_invariances(scale, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    ln = LayerNorm(12, eps=0.0, elementwise_affine=False, dtype=torch.float64)
    rms = RMSNorm(12, eps=0.0, elementwise_affine=False, dtype=torch.float64)
    torch.testing.assert_close(ln(scale * x), ln(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(ln(x + shift), ln(x), atol=1e-7, rtol=0)
    torch.testing.assert_close(rms(scale * x), rms(x), atol=1e-9, rtol=0)
    if abs(shift) > 1:
        assert (rms(x + shift) - rms(x)).abs().max() > 1e-3


def test_layernorm_weight_matrix_invariances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    delta = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    ln = LayerNorm(10, eps=0.0, elementwise_affine=False, dtype=torch.float64)
    base = ln(x @ w.T)
    torch.testing.assert_close(ln(x @ (2.5 * w).T), base, atol=1e-10, rtol=0)
    torch.testing.assert_close(ln(x @ (w + torch.ones(10, 1, dtype=torch.float64) @ delta).T), base, atol=1e-10,
                               rtol=0)
    row_scaled = w.clone()
    row_scaled[0] *= 3
    assert (ln(x @ row_scaled.T) - base).abs().max() > 1e-3


@pytest.mark.parametrize("cls,kw", [(LayerNorm, {}), (RMSNorm, {}), (CRMSNorm, {})])
def test_train_eval_identical_and_batch_independent(cls, kw):
    layer = randomize(cls(8, **kw))
    x = torch.randn(4, 8)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 8) * 10
    torch.testing.assert_close(layer(x2)[0], y_eval[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x[:1]), y_eval[:1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm, CRMSNorm])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_keeps_dtype_and_matches_float32(cls, dtype):
    layer = randomize(cls(64))
    x = torch.randn(4, 64) * 3 + 1
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x.to(dtype).float()), atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm, CRMSNorm])
def test_float64_stays_float64_and_empty_batch(cls):
    layer = cls(8, dtype=torch.float64)
    assert layer(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64
    empty = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    out = layer(empty)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert empty.grad.shape == (0, 8)


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm, CRMSNorm])
def test_bad_input_errors(cls):
    layer = cls(8)
    with pytest.raises(ValueError, match=r"expected input with trailing shape \(8,\), got \(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        cls(8, eps=-1e-5)
    with pytest.raises(ValueError, match="normalized_shape must be positive"):
        cls(0)


def test_layernorm_single_element_warns():
    with pytest.warns(UserWarning, match="single element"):
        LayerNorm(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerNorm(2)


def test_constant_row_gives_bias_not_nan():
    ln = randomize(LayerNorm(6))
    out = ln(torch.zeros(2, 6))
    torch.testing.assert_close(out, ln.bias.detach().expand(2, 6))
    assert torch.isfinite(RMSNorm(6)(torch.zeros(2, 6))).all()


@pytest.mark.parametrize("cls,kw", [(LayerNorm, {}), (RMSNorm, {"bias": True}), (CRMSNorm, {"bias": True})])
def test_state_dict_round_trip_and_reset(cls, kw):
    layer = randomize(cls(8, **kw))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = cls(8, **kw)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), layer(x))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(8))
    assert "eps=" in repr(layer)


@pytest.mark.parametrize("cls,kw", [(LayerNorm, {}), (RMSNorm, {"bias": True}), (CRMSNorm, {})])
def test_compiles_aot_eager_with_same_outputs_and_grads(cls, kw):
    torch._dynamo.reset()
    layer = randomize(cls(8, **kw))
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), compiled(x2)
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=1e-6)
    y.sum().backward(), y2.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,kw", [(RMSNorm, {"bias": True}), (CRMSNorm, {"bias": True}), (RMSNorm, {})])
def test_inference_path_equals_training_path(cls, kw):
    """Without grad the layers skip their autograd.Function: the outputs must be the same bits."""
    layer = randomize(cls(8, eps=1e-5, **kw))
    x = torch.randn(5, 8) * 3 + 1
    with_grad = layer(x)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = layer(x)
    assert not without.requires_grad
    assert torch.equal(without, with_grad.detach())
    frozen = randomize(cls(8, eps=1e-5, **kw)).requires_grad_(False)
    assert torch.equal(frozen(x), with_grad.detach())


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", [(RMSNorm, {"bias": True}), (CRMSNorm, {"bias": True})])
def test_inductor_compiled_matches_eager(cls, kw):
    """The recommended fast mode (inductor) computes the same values and gradients as eager."""
    torch._dynamo.reset()
    layer = randomize(cls(64, eps=1e-5, **kw))
    compiled = torch.compile(layer)
    x = (torch.randn(4, 16, 64) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), compiled(x2)
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, *layer.parameters()), g)
    grads2 = torch.autograd.grad(y2, (x2, *layer.parameters()), g)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
