"""BatchChannelNorm2d against the official ``EstBN``/``BCNorm`` transcribed here, and the checks of bcn_ws.md."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.layers.batch_channel import BatchChannelNorm2d

EPS = 1e-5
D = torch.float64


class OfficialEstBN(nn.Module):
    """The official ``EstBN`` (Batch-Channel-Normalization README), its rate set to ``ms`` (the buffer
    ``estbn_moving_speed`` the training script sets)."""

    def __init__(self, c, ms):
        super().__init__()
        self.c, self.ms = c, ms
        self.weight = nn.Parameter(torch.ones(c, dtype=D))
        self.bias = nn.Parameter(torch.zeros(c, dtype=D))
        self.register_buffer("running_mean", torch.zeros(c, dtype=D))
        self.register_buffer("running_var", torch.ones(c, dtype=D))

    def forward(self, inp):
        if self.training:
            with torch.no_grad():
                inp_t = inp.transpose(0, 1).contiguous().view(self.c, -1)
                running_mean = inp_t.mean(dim=1)
                inp_t = inp_t - self.running_mean.view(-1, 1)
                running_var = torch.mean(inp_t * inp_t, dim=1)
                self.running_mean.mul_(1 - self.ms).add_(self.ms * running_mean)
                self.running_var.mul_(1 - self.ms).add_(self.ms * running_var)
        out = inp - self.running_mean.view(1, -1, 1, 1)
        out = out / torch.sqrt(self.running_var + 1e-5).view(1, -1, 1, 1)
        return self.weight.view(1, -1, 1, 1) * out + self.bias.view(1, -1, 1, 1)


class OfficialBCNorm(nn.Module):
    """The official ``BCNorm``: EstBN or ``nn.BatchNorm2d``, then a per-sample group standardization with a
    per-group affine of shape (1, G, 1)."""

    def __init__(self, c, groups, estimate, ms=0.01, momentum=0.1):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(1, groups, 1, dtype=D))
        self.bias = nn.Parameter(torch.zeros(1, groups, 1, dtype=D))
        self.bn = OfficialEstBN(c, ms) if estimate else nn.BatchNorm2d(c, momentum=momentum, dtype=D)

    def forward(self, inp):
        out = self.bn(inp)
        out = out.view(1, inp.size(0) * self.groups, -1)
        out = torch.batch_norm(out, None, None, None, None, True, 0, EPS, True)
        out = out.view(inp.size(0), self.groups, -1)
        out = self.weight * out + self.bias
        return out.view_as(inp)


def randomize(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.weight, m.bias, m.group_weight, m.group_bias):
            p.copy_((1.0 if p is m.weight or p is m.group_weight else 0.0)
                    + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


def copy_to_official(m, ref):
    with torch.no_grad():
        ref.bn.weight.copy_(m.weight)
        ref.bn.bias.copy_(m.bias)
        ref.weight.copy_(m.group_weight.view(1, -1, 1))
        ref.bias.copy_(m.group_bias.view(1, -1, 1))
        ref.bn.running_mean.copy_(m.running_mean)
        ref.bn.running_var.copy_(m.running_var)


def batches(steps=5, shape=(3, 8, 4, 4), seed=1):
    """Inputs whose mean and scale move per step (so estimates, batch statistics and buffers differ)."""
    gen = torch.Generator().manual_seed(seed)
    return [((0.5 + 0.3 * i) * torch.randn(shape, generator=gen, dtype=D) + 0.7 - 0.2 * i,
             torch.randn(shape, generator=gen, dtype=D)) for i in range(steps)]


def step(m, x, gy):
    x = x.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x)
    y.backward(gy)
    return y.detach(), x.grad


@pytest.mark.parametrize("estimate", [True, False])
def test_matches_official_bcnorm_train_and_eval(estimate):
    """5 train steps then eval, float64: outputs, input and parameter gradients, buffers."""
    m = randomize(BatchChannelNorm2d(8, 2, momentum=0.01 if estimate else 0.1, estimate=estimate, dtype=D))
    ref = OfficialBCNorm(8, 2, estimate, ms=0.01, momentum=0.1)
    copy_to_official(m, ref)
    data = batches()
    for i, (x, gy) in enumerate(data):
        y, dx = step(m, x, gy)
        ry, rdx = step(ref, x, gy)
        torch.testing.assert_close(y, ry, atol=1e-13, rtol=0, msg=f"step {i}: output")
        torch.testing.assert_close(dx, rdx, atol=1e-13, rtol=0, msg=f"step {i}: input grad")
        torch.testing.assert_close(m.weight.grad, ref.bn.weight.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(m.bias.grad, ref.bn.bias.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(m.group_weight.grad, ref.weight.grad.view(-1), atol=1e-12, rtol=0)
        torch.testing.assert_close(m.group_bias.grad, ref.bias.grad.view(-1), atol=1e-12, rtol=0)
        torch.testing.assert_close(m.running_mean, ref.bn.running_mean, atol=1e-15, rtol=0)
        torch.testing.assert_close(m.running_var, ref.bn.running_var, atol=1e-15, rtol=0)
    if not estimate:
        assert int(m.num_batches_tracked) == len(data)
    m.eval()
    ref.eval()
    x, gy = data[0]
    y, dx = step(m, x, gy)
    ry, rdx = step(ref, x, gy)
    torch.testing.assert_close(y, ry, atol=1e-13, rtol=0)
    torch.testing.assert_close(dx, rdx, atol=1e-13, rtol=0)
    # the trace is not trivial: the buffers moved away from (0, 1)
    assert (m.running_mean.abs().max() > 1e-3) and ((m.running_var - 1).abs().max() > 1e-3)


def test_standard_variant_with_g_equal_c_is_per_sample_channel_standardization_of_bn():
    m = BatchChannelNorm2d(8, 8, momentum=0.1, estimate=False, dtype=D)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, 8, dtype=D))
        m.bias.copy_(torch.linspace(-1.0, 1.0, 8, dtype=D))
    bn = nn.BatchNorm2d(8, momentum=0.1, dtype=D)
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("group_")})
    x = batches(1)[0][0]
    z = bn(x)
    var, mean = torch.var_mean(z, dim=(2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(m(x), (z - mean) / torch.sqrt(var + EPS), atol=1e-13, rtol=0)
    torch.testing.assert_close(m.running_var, bn.running_var, atol=1e-15, rtol=0)


def test_channel_stage_is_group_norm_with_per_group_affine():
    """Eval mode from fresh buffers: the batch stage is ``weight * x / sqrt(1 + eps) + bias``."""
    m = randomize(BatchChannelNorm2d(8, 2, dtype=D)).eval()
    x = batches(1)[0][0]
    z = m.weight.view(1, -1, 1, 1) * x / (1 + EPS) ** 0.5 + m.bias.view(1, -1, 1, 1)
    g = F.group_norm(z, 2, eps=EPS).view(3, 2, 4, 4, 4)
    expected = (g * m.group_weight.view(1, 2, 1, 1, 1) + m.group_bias.view(1, 2, 1, 1, 1)).view_as(x)
    torch.testing.assert_close(m(x), expected, atol=1e-13, rtol=0)


def batch_stage_reference(x, mean, var, weight, bias):
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS) * weight.view(1, -1, 1, 1) \
        + bias.view(1, -1, 1, 1)


def channel_stage_reference(z, groups, gw, gb):
    n = z.shape[0]
    zg = z.reshape(n, groups, -1)
    var, mean = torch.var_mean(zg, dim=-1, correction=0, keepdim=True)
    return ((zg - mean) / torch.sqrt(var + EPS) * gw.view(1, -1, 1) + gb.view(1, -1, 1)).view_as(z)


@pytest.mark.parametrize("r", [0.01, 0.3])
def test_estbn_one_step_from_initial_estimates(r):
    m = randomize(BatchChannelNorm2d(8, 2, momentum=r, dtype=D))
    x = batches(1)[0][0]
    y = m(x)
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(m.running_mean, r * mean, atol=1e-15, rtol=0)
    torch.testing.assert_close(m.running_var, (1 - r) + r * x.square().mean(dim=(0, 2, 3)), atol=1e-15, rtol=0)
    z = batch_stage_reference(x, m.running_mean, m.running_var, m.weight, m.bias)
    torch.testing.assert_close(y, channel_stage_reference(z, 2, m.group_weight, m.group_bias), atol=1e-13, rtol=0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    torch.testing.assert_close(m(x), y, atol=1e-13, rtol=0)  # eval: same formula, updated estimates
    m(x + 3.0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_zero_rate_freezes_estimates_and_warns():
    m = randomize(BatchChannelNorm2d(8, 2, momentum=0.0, dtype=D))
    x = batches(1)[0][0]
    with pytest.warns(UserWarning, match="momentum=0"):
        y = m(x)
    assert torch.equal(m.running_mean, torch.zeros(8, dtype=D)) and torch.equal(m.running_var, torch.ones(8, dtype=D))
    w, b = m.weight.view(1, -1, 1, 1), m.bias.view(1, -1, 1, 1)
    right = channel_stage_reference(w * x / (1 + EPS) ** 0.5 + b, 2, m.group_weight, m.group_bias)
    wrong = channel_stage_reference((w * x + b) / (1 + EPS) ** 0.5, 2, m.group_weight, m.group_bias)
    torch.testing.assert_close(y, right, atol=1e-13, rtol=0)
    assert (y - wrong).abs().max() > 1e-7  # the check can tell the two forms apart
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.eval()(x)  # no warning in eval
        BatchChannelNorm2d(8, 2, dtype=D)(x)  # nor with r > 0


def test_center_var_on_estimate_vs_batch():
    r = 0.05
    ms = {c: BatchChannelNorm2d(8, 2, momentum=r, center_var_on=c, dtype=D) for c in ("estimate", "batch")}
    old_mean = torch.linspace(-1.0, 1.0, 8, dtype=D)
    old_var = torch.linspace(0.5, 2.0, 8, dtype=D)
    for m in ms.values():
        m.running_mean.copy_(old_mean)
        m.running_var.copy_(old_var)
    x = batches(1)[0][0]
    for m in ms.values():
        m(x)
    mean = x.mean(dim=(0, 2, 3))
    s2 = x.var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(ms["batch"].running_var, (1 - r) * old_var + r * s2, atol=1e-15, rtol=0)
    torch.testing.assert_close(ms["estimate"].running_var - ms["batch"].running_var, r * (mean - old_mean) ** 2,
                               atol=1e-15, rtol=0)
    torch.testing.assert_close(ms["estimate"].running_mean, ms["batch"].running_mean, atol=0, rtol=0)
    assert (r * (mean - old_mean) ** 2).max() > 1e-3


@pytest.mark.parametrize("r", [0.01, 0.0])
def test_training_forward_batch_coupling_is_order_r(r):
    """Two copies with identical buffers: f(cat[a, b])[:len(a)] vs f(a) differ only through the buffer update
    (O(r)); the backward has no batch coupling at all."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 8, 4, 4, generator=gen, dtype=D)
    b = torch.randn(2, 8, 4, 4, generator=gen, dtype=D) + 2.0
    m1 = randomize(BatchChannelNorm2d(8, 2, momentum=r, dtype=D))
    m2 = randomize(BatchChannelNorm2d(8, 2, momentum=r, dtype=D))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ab = torch.cat([a, b]).requires_grad_()
        y_ab = m1(ab)[: len(a)]
        y_a = m2(a)
    diff = (y_ab - y_a).abs().max().item()
    if r == 0:
        assert diff == 0
    else:
        assert 1e-3 < diff < 0.1, diff
    y_ab.backward(torch.randn(y_ab.shape, generator=gen, dtype=D))
    assert torch.equal(ab.grad[len(a):], torch.zeros_like(b))


@pytest.mark.parametrize("case", ["standard-train", "estimate-eval", "estimate-r0-train"])
def test_gradcheck(case):
    """(2, 8, 3, 3), G = 2: estimate=False in train mode; estimate=True in eval mode and with r = 0 (in train
    mode with r > 0 finite differences see the estimates move, which the analytic gradient drops by design).
    Full gradcheck for the input of the standard variant (autograd through the batch statistics), fast mode
    (random projections) for everything together."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 8, 3, 3, generator=gen, dtype=D) + 0.5).requires_grad_()
    m = randomize(BatchChannelNorm2d(8, 2, estimate=not case.startswith("standard"),
                                     momentum=0.0 if case.endswith("r0-train") else 0.01, dtype=D))
    if case == "estimate-eval":
        m.running_mean.copy_(torch.linspace(-0.5, 0.5, 8, dtype=D))
        m.running_var.copy_(torch.linspace(0.5, 1.5, 8, dtype=D))
        m.eval()
    names = ("weight", "bias", "group_weight", "group_bias")

    def f(x, *p):
        return torch.func.functional_call(m, dict(zip(names, p)), (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(f, (x, *(getattr(m, n) for n in names)), fast_mode=True)
        if case == "standard-train":
            assert torch.autograd.gradcheck(m, (x,))
    assert m.training == (case != "estimate-eval")


def test_errors():
    with pytest.raises(ValueError, match=r"num_features=10, num_groups=4"):
        BatchChannelNorm2d(10, 4)
    with pytest.raises(ValueError, match="momentum"):
        BatchChannelNorm2d(8, 2, momentum=1.5)
    with pytest.raises(ValueError, match="center_var_on"):
        BatchChannelNorm2d(8, 2, center_var_on="paper")
    with pytest.raises(ValueError, match="eps"):
        BatchChannelNorm2d(8, 2, eps=-1.0)
    with pytest.raises(ValueError, match="num_features"):
        BatchChannelNorm2d(0, 1)
    m = BatchChannelNorm2d(8, 2)
    with pytest.raises(ValueError, match="expected 8 channels in dim 1, got 6"):
        m(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="4D"):
        m(torch.randn(2, 8, 3))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 8, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("estimate", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_raises_before_buffers_change(estimate, training):
    m = BatchChannelNorm2d(8, 2, estimate=estimate).train(training)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(0, 8, 3, 3\)"):
        m(torch.randn(0, 8, 3, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_single_value_per_channel():
    """estimate=False in training needs > 1 value per channel (as nn.BatchNorm2d); estimate=True is made for
    micro-batches and handles a single value (no NaN); eval always works."""
    x = torch.randn(1, 8, 1, 1)
    m = BatchChannelNorm2d(8, 2, estimate=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="more than one value per channel"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.isfinite(m.eval()(x)).all()
    assert torch.isfinite(BatchChannelNorm2d(8, 2, estimate=False)(torch.randn(1, 8, 3, 3))).all()  # B=1, 9 values
    est = BatchChannelNorm2d(8, 2)
    assert torch.isfinite(est(x)).all() and torch.isfinite(est.running_var).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimate", [True, False])
def test_half_input_statistics_in_float32(dtype, estimate):
    m32 = randomize(BatchChannelNorm2d(8, 2, estimate=estimate))
    mh = randomize(BatchChannelNorm2d(8, 2, estimate=estimate))
    x = batches(1)[0][0].to(dtype)
    y = mh(x)
    assert y.dtype == dtype and mh.running_var.dtype == torch.float32
    y32 = m32(x.float())
    torch.testing.assert_close(y, y32.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(mh.running_var, m32.running_var, atol=0, rtol=0)


@pytest.mark.parametrize("estimate", [True, False])
def test_half_module(estimate):
    m = BatchChannelNorm2d(8, 2, estimate=estimate, dtype=torch.bfloat16)
    y = m(torch.randn(2, 8, 3, 3, dtype=torch.bfloat16) + 2.0)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert m.running_mean.dtype == torch.bfloat16 and (m.running_mean > 0).all()


def test_float64_and_module_defaults():
    m = BatchChannelNorm2d(64)
    assert (m.num_groups, m.eps, m.momentum, m.estimate, m.center_var_on) == (32, 1e-5, 0.01, True, "estimate")
    assert m.process_group is None
    assert set(BatchChannelNorm2d.batchnorm_state) <= set(m.state_dict())
    assert "num_batches_tracked" not in m.state_dict()
    assert "num_batches_tracked" in BatchChannelNorm2d(64, estimate=False).state_dict()
    assert m.group_weight.shape == (32,) and m.weight.shape == (64,)
    assert "num_groups=32" in repr(m) and "estimate=True" in repr(m)
    m64 = BatchChannelNorm2d(8, 2, dtype=D)
    assert m64(torch.randn(2, 8, 3, 3, dtype=D)).dtype == D


@pytest.mark.parametrize("estimate", [True, False])
def test_reset_parameters_and_running_stats(estimate):
    m = randomize(BatchChannelNorm2d(8, 2, estimate=estimate))
    m(torch.randn(4, 8, 3, 3) + 1)
    m.reset_parameters()
    fresh = BatchChannelNorm2d(8, 2, estimate=estimate)
    for k, v in fresh.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("estimate", [True, False])
def test_state_dict_round_trip_resumes_bit_exactly(estimate):
    data = batches(6, shape=(2, 8, 3, 3))
    m = randomize(BatchChannelNorm2d(8, 2, estimate=estimate, dtype=D))
    for x, _ in data[:3]:
        m(x)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    resumed = BatchChannelNorm2d(8, 2, estimate=estimate, dtype=D)
    resumed.load_state_dict(torch.load(buf))
    for x, _ in data[3:]:
        assert torch.equal(m(x), resumed(x))
    for k, v in m.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


@pytest.mark.parametrize("estimate", [True, False])
def test_torch_compile_aot_eager_matches_eager(estimate):
    torch._dynamo.reset()
    eager = randomize(BatchChannelNorm2d(8, 2, estimate=estimate, momentum=0.1))
    compiled_module = randomize(BatchChannelNorm2d(8, 2, estimate=estimate, momentum=0.1))
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for i, (x, gy) in enumerate(batches(3, shape=(2, 8, 3, 3))):
        x, gy = x.float(), gy.float()
        ye, dxe = step(eager, x, gy)
        x2 = x.clone().requires_grad_()
        yc = compiled(x2)
        yc.backward(gy)
        torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6, msg=f"step {i}")
        torch.testing.assert_close(x2.grad, dxe, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(compiled_module.running_var, eager.running_var, atol=1e-7, rtol=0)
        torch.testing.assert_close(compiled_module.running_mean, eager.running_mean, atol=1e-7, rtol=0)
    eager.eval()
    compiled_module.eval()
    x = batches(1, shape=(2, 8, 3, 3), seed=9)[0][0].float()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
