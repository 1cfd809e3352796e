"""``normlab.functional``: rms_norm and crms_norm against torch and an independent formula, gradcheck of
their hand-written backwards, half precision, empty batches and aot_eager compilation; batch_var_mean
against ``torch.var_mean``."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from normlab import functional as NF

AFFINE = list(itertools.product([False, True], repeat=2))  # (weight, bias)


def params(shape, weight, bias, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() if weight else None
    b = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() if bias else None
    return w, b


def crms_formula(x, w, b, eps):
    """CRMSNorm written out: the dropped d-th coordinate is -sum(x)."""
    full = torch.cat([x, -x.sum(-1, keepdim=True)], -1)
    y = x / full.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    y = y if w is None else y * w
    return y if b is None else y + b


def grads(y, inputs, dy):
    return torch.autograd.grad(y, [t for t in inputs if t is not None], dy)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_rms_norm_gradcheck_float64(weight, bias):
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w, b = params(6, weight, bias)
    inputs = [t for t in (x, w, b) if t is not None]
    assert gradcheck(lambda *_: NF.rms_norm(x, (6,), w, b, eps=1e-5), inputs)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_rms_norm_gradcheck_multi_dim_normalized_shape(weight, bias):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w, b = params((4, 5), weight, bias)
    inputs = [t for t in (x, w, b) if t is not None]
    assert gradcheck(lambda *_: NF.rms_norm(x, (4, 5), w, b, eps=1e-5), inputs)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_crms_norm_gradcheck_float64(weight, bias):
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w, b = params(6, weight, bias)
    inputs = [t for t in (x, w, b) if t is not None]
    assert gradcheck(lambda *_: NF.crms_norm(x, w, b, eps=1e-5), inputs)


def test_gradcheck_with_non_contiguous_input():
    x = torch.randn(6, 5, 4, dtype=torch.float64).transpose(0, 1).requires_grad_()
    w, _ = params(4, True, False)
    assert gradcheck(lambda x, w: NF.rms_norm(x, (4,), w), (x, w))
    assert gradcheck(lambda x, w: NF.crms_norm(x, w), (x, w))


@pytest.mark.parametrize("normalized_shape", [(32,), (16, 32)])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_matches_torch_float32(normalized_shape, eps):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 32, requires_grad=True)
    w, _ = params(normalized_shape, True, False, dtype=torch.float32)
    dy = torch.randn_like(x)
    ours, ref = NF.rms_norm(x, normalized_shape, w, eps=eps), F.rms_norm(x, normalized_shape, w, eps=eps)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # the weight grad sums 8 * 16 rows in float32 in another order: 1e-6 of its scale
    for g, r in zip(grads(ours, (x, w), dy), grads(ref, (x, w), dy)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * max(1.0, r.abs().max().item()))


def test_rms_norm_without_weight_matches_torch_and_bias_adds():
    x = torch.randn(4, 7, 32, requires_grad=True)
    _, b = params(32, False, True, dtype=torch.float32)
    torch.testing.assert_close(NF.rms_norm(x, (32,)), F.rms_norm(x, (32,)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(NF.rms_norm(x, (32,), bias=b), F.rms_norm(x, (32,)) + b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_crms_norm_matches_the_written_out_formula(weight, bias):
    x = torch.randn(5, 3, 9, dtype=torch.float64, requires_grad=True)
    w, b = params(9, weight, bias)
    dy = torch.randn_like(x)
    ours, ref = NF.crms_norm(x, w, b, eps=1e-6), crms_formula(x, w, b, 1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads(ours, (x, w, b), dy), grads(ref, (x, w, b), dy)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_crms_norm_of_the_compressed_vector_equals_rms_norm_of_the_zero_mean_vector():
    x = torch.randn(4, 6, 10, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    w = torch.randn(10, dtype=torch.float64)
    full = NF.rms_norm(x, (10,), w, eps=1e-6)
    torch.testing.assert_close(NF.crms_norm(x[..., :-1], w[:-1], eps=1e-6), full[..., :-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", ["rms", "crms"])
def test_half_input_returns_its_dtype_close_to_float32(dtype, fn):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    run = (lambda x, w: NF.rms_norm(x, (64,), w)) if fn == "rms" else NF.crms_norm
    y = run(x, w)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.float(), run(x.float(), w.float()), rtol=tol, atol=tol)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_float64_stays_float64():
    x = torch.randn(3, 8, dtype=torch.float64)
    assert NF.rms_norm(x, (8,)).dtype == torch.float64
    assert NF.crms_norm(x).dtype == torch.float64


def test_eps_none_is_the_dtype_machine_epsilon():
    x = torch.full((2, 4), 1e-4)
    torch.testing.assert_close(NF.rms_norm(x, (4,)), NF.rms_norm(x, (4,), eps=torch.finfo(torch.float32).eps))
    torch.testing.assert_close(NF.crms_norm(x), NF.crms_norm(x, eps=torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("fn", ["rms", "crms"])
def test_empty_batch_returns_empty_and_backward_runs(fn):
    x = torch.randn(0, 3, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    y = NF.rms_norm(x, (8,), w, b) if fn == "rms" else NF.crms_norm(x, w, b)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 3, 8)
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))


@pytest.mark.parametrize("fn", ["rms", "crms"])
def test_aot_eager_compile_matches_eager(fn):
    x = torch.randn(4, 8, 32, requires_grad=True)
    w, b = params(32, True, True, dtype=torch.float32)
    run = (lambda x, w, b: NF.rms_norm(x, (32,), w, b)) if fn == "rms" else NF.crms_norm
    dy = torch.randn_like(x)
    eager = run(x, w, b)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(x, w, b)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads(compiled, (x, w, b), dy), grads(eager, (x, w, b), dy)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, dim", [((5, 3, 4, 2), (0, 2, 3)), ((6, 3), (0,)), ((4, 3, 7), (0, 2)),
                                        ((4, 3, 5), (1, 2))])
def test_batch_var_mean_is_the_biased_moments_with_their_gradient(shape, dim):
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    var, mean, count = NF.batch_var_mean(x, dim)
    ref_var, ref_mean = torch.var_mean(x_ref, dim, correction=0, keepdim=True)
    assert count == math.prod(shape[d] for d in dim)
    torch.testing.assert_close(var, ref_var, rtol=0, atol=1e-13)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-14)
    g_var, g_mean = torch.randn_like(var), torch.randn_like(mean)
    grad = torch.autograd.grad((var * g_var).sum() + (mean * g_mean).sum(), x)[0]
    ref = torch.autograd.grad((ref_var * g_var).sum() + (ref_mean * g_mean).sum(), x_ref)[0]
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-13)
    assert gradcheck(lambda t: NF.batch_var_mean(t, dim)[:2], torch.randn(*shape, dtype=torch.float64, requires_grad=True))


def test_batch_var_mean_takes_half_input_in_float32():
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    var, mean, _ = NF.batch_var_mean(x, (0, 2, 3))
    assert var.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(var, torch.var_mean(x.float(), (0, 2, 3), correction=0, keepdim=True)[0])
