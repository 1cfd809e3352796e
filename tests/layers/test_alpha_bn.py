"""AlphaBatchNorm against torch's BatchNorm and the alpha-BN formula written out here (alpha_bn.md)."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.convert import ConversionError
from normlab.convert.swap import to_alpha_bn
from normlab.layers.alpha_bn import AlphaBatchNorm

BATCHNORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(6, 5), (6, 5, 7), (4, 5, 3, 3), (3, 5, 2, 3, 2)]


def trained_bn(shape, seed=0, dtype=torch.float32, momentum=0.1):
    """A BatchNorm of the right dimensionality with random affine parameters and running statistics
    far from the (0, 1) defaults, as after training."""
    gen = torch.Generator().manual_seed(seed)
    bn = BATCHNORMS[len(shape)](shape[1], momentum=momentum, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.randn(shape[1], generator=gen))
        bn.bias.copy_(torch.randn(shape[1], generator=gen))
        bn.running_mean.copy_(2 * torch.randn(shape[1], generator=gen))
        bn.running_var.copy_(0.5 + 2 * torch.rand(shape[1], generator=gen))
        bn.num_batches_tracked.fill_(7)
    return bn


def shifted_input(shape, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen, dtype=torch.float64) - 1).to(dtype)


def reference(x, alpha, mu_s, var_s, weight, bias, eps):
    """The sheet's formula in float64: mix means and biased variances over every axis but 1."""
    x = x.double()
    dims = (0,) + tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu_t = x.mean(dims)
    var_t = ((x - mu_t.view(view)) ** 2).mean(dims)
    mu = alpha * mu_s.double() + (1 - alpha) * mu_t
    var = alpha * var_s.double() + (1 - alpha) * var_t
    y = (x - mu.view(view)) / torch.sqrt(var.view(view) + eps)
    if weight is not None:
        y = y * weight.double().view(view) + bias.double().view(view)
    return y


def buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2, 6])
def test_alpha_one_is_eval_batchnorm_exactly(shape, batch):
    shape = (batch,) + shape[1:]
    bn = trained_bn(shape).eval()
    abn = AlphaBatchNorm.from_batchnorm(bn, 1.0).eval()
    x = shifted_input(shape)
    torch.testing.assert_close(abn(x), bn(x), atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_alpha_zero_is_batch_statistics_batchnorm(shape):
    bn = trained_bn(shape)
    abn = AlphaBatchNorm.from_batchnorm(bn, 0.0).eval()
    before = buffers(abn)
    x = shifted_input(shape)
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(abn(x), expected, atol=1e-6, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in abn.named_buffers())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_intermediate_alpha_matches_formula_and_keeps_buffers(shape, alpha):
    bn = trained_bn(shape, dtype=torch.float64)
    abn = AlphaBatchNorm.from_batchnorm(bn, alpha).eval()
    before = buffers(abn)
    for seed in range(3):
        x = shifted_input(shape, seed=seed, dtype=torch.float64)
        expected = reference(x, alpha, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        torch.testing.assert_close(abn(x), expected, atol=1e-12, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in abn.named_buffers())
    assert int(abn.num_batches_tracked) == 7


def test_eval_mix_differs_from_both_ends():
    """The formula tests are not vacuous: alpha=0.5 is neither source BN nor batch-statistics BN."""
    shape = (8, 5, 3, 3)
    bn = trained_bn(shape)
    x = shifted_input(shape)
    outs = {a: AlphaBatchNorm.from_batchnorm(bn, a).eval()(x) for a in (0.0, 0.5, 1.0)}
    assert (outs[0.5] - outs[0.0]).abs().max() > 0.1 and (outs[0.5] - outs[1.0]).abs().max() > 0.1


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3, 3)])
def test_train_mode_is_batchnorm(alpha, momentum, shape):
    """Outputs, input and parameter gradients and all buffers equal nn.BatchNorm's over several steps."""
    bn = trained_bn(shape, momentum=momentum).train()
    abn = AlphaBatchNorm.from_batchnorm(bn, alpha).train()
    assert abn.momentum == momentum
    for step in range(4):
        x = shifted_input(shape, seed=step) * (1 + step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = abn(xa), bn(xb)
        torch.testing.assert_close(ya, yb, atol=1e-6, rtol=0)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-5)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(abn, name).grad, getattr(bn, name).grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(abn.running_mean, bn.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(abn.running_var, bn.running_var, atol=1e-6, rtol=1e-6)
        assert int(abn.num_batches_tracked) == int(bn.num_batches_tracked) == 8 + step
        abn.zero_grad()
        bn.zero_grad()


def test_train_mode_without_affine_and_default_init_matches_batchnorm():
    bn = nn.BatchNorm2d(4, affine=False)
    abn = AlphaBatchNorm(4, affine=False)
    assert abn.weight is None and abn.bias is None
    x = shifted_input((5, 4, 3, 3))
    torch.testing.assert_close(abn(x), bn(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(abn.running_var, bn.running_var, atol=1e-6, rtol=0)
    abn.eval()
    bn.eval()
    abn.alpha = 1.0
    torch.testing.assert_close(abn(x), bn(x), atol=1e-6, rtol=0)  # buffers equal to 1e-6


@pytest.mark.parametrize("training,alpha,affine", [(True, 0.9, True), (False, 0.35, True), (False, 0.35, False),
                                                   (False, 0.0, True)])
def test_gradcheck_float64(training, alpha, affine):
    m = AlphaBatchNorm(3, alpha=alpha, affine=affine, dtype=torch.float64).train(training)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        m.running_var.copy_(torch.tensor([0.7, 2.0, 1.3]))
        if affine:
            m.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x = shifted_input((3, 3, 2, 2), dtype=torch.float64).requires_grad_()
    if not affine:
        assert torch.autograd.gradcheck(m, (x,))
        return
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    m.momentum = 0.0  # gradcheck calls f many times: keep the running statistics where they are

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_eval_gradient_equals_autograd_of_formula(alpha):
    """The hand-written backward against autograd through the float64 reference formula."""
    bn = trained_bn((5, 4, 3, 2), dtype=torch.float64)
    abn = AlphaBatchNorm.from_batchnorm(bn, alpha).eval()
    x = shifted_input((5, 4, 3, 2), dtype=torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    abn(xa).backward(g)
    reference(xr, alpha, bn.running_mean, bn.running_var, w, b, bn.eps).backward(g)
    torch.testing.assert_close(xa.grad, xr.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(abn.weight.grad, w.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(abn.bias.grad, b.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (4, 3)), (nn.BatchNorm2d, (4, 3, 2, 2)),
                                          (nn.BatchNorm3d, (4, 3, 2, 2, 2))])
def test_from_batchnorm_copies_everything(bn_cls, shape):
    bn = bn_cls(3, eps=1e-3, momentum=None, dtype=torch.float64)
    bn.train()(shifted_input(shape, dtype=torch.float64))
    with torch.no_grad():
        bn.weight.normal_()
    bn.bias.requires_grad_(False)
    abn = AlphaBatchNorm.from_batchnorm(bn, 0.25)
    assert (abn.alpha, abn.eps, abn.momentum, abn.affine, abn.num_features) == (0.25, 1e-3, None, True, 3)
    assert abn.training and abn.running_mean.dtype == torch.float64 and abn.weight.dtype == torch.float64
    assert int(abn.num_batches_tracked) == 1
    assert abn.weight.requires_grad and not abn.bias.requires_grad
    for name in AlphaBatchNorm.batchnorm_state:
        assert torch.equal(getattr(abn, name), getattr(bn, name)), name
    assert AlphaBatchNorm.batchnorm_state == ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    x = shifted_input(shape, seed=3, dtype=torch.float64)
    assert torch.equal(AlphaBatchNorm.from_batchnorm(bn, 1.0).eval()(x), bn.eval()(x))


def test_from_batchnorm_sync_batchnorm_and_non_affine():
    sbn = nn.SyncBatchNorm(3, affine=False)
    abn = AlphaBatchNorm.from_batchnorm(sbn)
    assert abn.alpha == 0.9 and not abn.affine and abn.process_group is None
    x = shifted_input((4, 3, 2, 2))
    torch.testing.assert_close(AlphaBatchNorm.from_batchnorm(sbn.eval(), 1.0).eval()(x),
                               F.batch_norm(x, sbn.running_mean, sbn.running_var, eps=sbn.eps), atol=1e-7, rtol=0)


def test_from_batchnorm_refuses_what_it_cannot_convert():
    with pytest.raises(ValueError, match="running statistics"):
        AlphaBatchNorm.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))

    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="MyBN"):
        AlphaBatchNorm.from_batchnorm(MyBN(3))
    with pytest.raises(TypeError, match="GroupNorm"):
        AlphaBatchNorm.from_batchnorm(nn.GroupNorm(1, 3))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        AlphaBatchNorm.from_batchnorm(nn.BatchNorm2d(3), 1.5)


def test_errors_name_the_values():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got -0.1"):
        AlphaBatchNorm(3, alpha=-0.1)
    m = AlphaBatchNorm(3)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2"):
        m.alpha = 2
    assert m.alpha == 0.9
    with pytest.raises(ValueError, match="momentum"):
        AlphaBatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        AlphaBatchNorm(3, eps=-1.0)
    with pytest.raises(ValueError, match="num_features"):
        AlphaBatchNorm(0)
    for training in (True, False):
        m.train(training)
        with pytest.raises(ValueError, match=r"expected 3 channels in dim 1, got 4"):
            m(torch.randn(2, 4, 5))
        with pytest.raises(ValueError, match=r"non-empty batch.*\(0, 3, 2, 2\)"):
            m(torch.randn(0, 3, 2, 2))
        with pytest.raises(ValueError, match="6D"):
            m(torch.randn(2, 3, 1, 1, 1, 1))
        with pytest.raises(TypeError, match="floating"):
            m(torch.ones(2, 3, dtype=torch.long))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.ones(3))


def test_one_value_per_channel():
    """Batch statistics of one value raise (train, eval with alpha < 1); alpha = 1 needs none; no NaN."""
    m = AlphaBatchNorm(3)
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 3\)"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    m.eval()
    with pytest.raises(ValueError, match=r"alpha=0.9 < 1 needs more than one value per channel.*\(1, 3\)"):
        m(x)
    m.alpha = 1.0
    assert torch.isfinite(m(x)).all()
    m.alpha = 0.5
    assert torch.isfinite(m(torch.randn(1, 3, 2))).all()  # two values per channel suffice
    assert torch.isfinite(m(torch.ones(4, 3))).all()  # zero batch variance: finite with alpha > 0
    m.alpha = 0.0
    assert torch.isfinite(m(torch.ones(4, 3))).all()  # divides by sqrt(eps): finite too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_half_input_float32_statistics(dtype, training):
    bn = trained_bn((8, 4, 3, 3))
    m32 = AlphaBatchNorm.from_batchnorm(bn, 0.5).train(training)
    mh = AlphaBatchNorm.from_batchnorm(bn, 0.5).train(training)
    x = shifted_input((8, 4, 3, 3)).to(dtype)
    xh = x.clone().requires_grad_()
    y = mh(xh)
    assert y.dtype == dtype and mh.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), m32(x.float()), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(mh.running_var, m32.running_var, atol=1e-6, rtol=1e-6)  # moments of the same values
    y.float().sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()


def test_float64_input_stays_float64():
    m = AlphaBatchNorm(3, dtype=torch.float64).eval()
    assert m(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64


def test_state_dict_round_trip_resumes_bit_exactly():
    def steps(m, seeds):
        return [m(shifted_input((6, 4, 2, 2), seed=s)) for s in seeds]

    a = AlphaBatchNorm(4, alpha=0.3, momentum=None)
    steps(a, range(3))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = AlphaBatchNorm(4, alpha=0.3, momentum=None)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert set(a.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for ya, yb in zip(steps(a, range(3, 6)), steps(b, range(3, 6))):
        assert torch.equal(ya, yb)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    a.eval()
    b.eval()
    x = shifted_input((6, 4, 2, 2), seed=9)
    assert torch.equal(a(x), b(x))


def test_reset_and_repr():
    m = AlphaBatchNorm(3, alpha=0.25, momentum=None)
    m(torch.randn(4, 3) + 5)
    with torch.no_grad():
        m.weight.add_(1)
    m.reset_parameters()
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.weight, torch.ones(3))
    assert repr(m) == "AlphaBatchNorm(3, alpha=0.25, eps=1e-05, momentum=None, affine=True)"
    assert m.process_group is None


@pytest.mark.parametrize("training,alpha", [(True, 0.5), (False, 0.5), (False, 1.0)])
def test_torch_compile_aot_eager(training, alpha):
    bn = trained_bn((6, 4, 3, 3))
    eager = AlphaBatchNorm.from_batchnorm(bn, alpha).train(training)
    compiled_module = AlphaBatchNorm.from_batchnorm(bn, alpha).train(training)
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for seed in range(2):
        x = shifted_input((6, 4, 3, 3), seed=seed)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad, atol=1e-4, rtol=1e-5)
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(getattr(compiled_module, name), buf, atol=1e-6, rtol=1e-6)


def model_with_bns():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 6),
                         nn.BatchNorm1d(6), nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)))


def test_to_alpha_bn_names_object_and_equivalence():
    torch.manual_seed(0)
    model = model_with_bns()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 2, 4, 4))
    model.eval()
    x = torch.randn(5, 2, 4, 4)
    expected = model(x)
    inner = model[6]
    names = to_alpha_bn(model, alpha=1.0)
    assert sorted(names) == ["1", "5", "6.1"]
    assert model[6] is inner and all(isinstance(model.get_submodule(n), AlphaBatchNorm) for n in names)
    torch.testing.assert_close(model(x), expected, atol=1e-7, rtol=0)
    assert sorted(to_alpha_bn(model, alpha=0.2)) == ["1", "5", "6.1"]  # existing layers get the new alpha
    assert all(model.get_submodule(n).alpha == 0.2 for n in names)


def test_to_alpha_bn_refuses_and_leaves_the_model_untouched():
    model = model_with_bns()
    model[6][1] = nn.BatchNorm1d(3, track_running_stats=False)
    types = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError):
        to_alpha_bn(model, alpha=0.5)
    assert [type(m) for m in model.modules()] == types
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
