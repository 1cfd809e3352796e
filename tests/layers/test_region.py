"""Region Normalization (RN-B, RN-L, ``region_norm``) against the official code's BatchNorm fill trick and the
sheet's direct formula, both written out here (region_norm.md, Verification (a))."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.functional import region_norm
from normlab.layers.region import LearnableRegionNorm2d, RegionNorm2d

EPS = 1e-5


def data(b=4, c=3, h=6, w=6, seed=0, dtype=torch.float64):
    """Input with a per-channel offset and scale, and a mask with a rectangle hole per sample (1 = hole)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=gen, dtype=dtype) * torch.linspace(0.5, 3, c, dtype=dtype)[:, None, None]
         + torch.linspace(-2, 2, c, dtype=dtype)[:, None, None])
    m = torch.zeros(b, 1, h, w, dtype=torch.bool)
    for i in range(b):
        top = int(torch.randint(0, h // 2, (1,), generator=gen))
        left = int(torch.randint(0, w // 2, (1,), generator=gen))
        m[i, 0, top:top + 2 + i % 3, left:left + 3] = True
    return x, m


def trick_reference(x, m, eps=EPS, stats="batch"):
    """The official ``RN_binarylabel``: per region, fill the outside with the region mean, BatchNorm (batch
    statistics, no affine) or InstanceNorm, times sqrt(n_R / n); sum of the two regions."""
    label = m.to(x.dtype)
    dims = (0, 2, 3) if stats == "batch" else (2, 3)
    out = torch.zeros_like(x)
    for mask in (label, 1 - label):
        region = x * mask
        total = region.sum(dims, keepdim=True)
        sr = mask.sum(dims, keepdim=True)
        sr = torch.where(sr == 0, torch.ones_like(sr), sr)
        mu = total / sr
        filled = region + (1 - mask) * mu
        normed = (F.batch_norm(filled, None, None, training=True, eps=eps) if stats == "batch"
                  else F.instance_norm(filled, eps=eps))
        n = x.shape[2] * x.shape[3] * (x.shape[0] if stats == "batch" else 1)
        out = out + normed * torch.sqrt(sr / n)
    return out


def direct_reference(x, m, eps=EPS, stats="batch"):
    """The sheet's formula with numpy boolean indexing: each region, channel (and sample) on its own."""
    xn, mn = x.detach().numpy(), m.numpy()[:, 0]
    out = np.zeros_like(xn)
    groups = [slice(None)] if stats == "batch" else [slice(i, i + 1) for i in range(x.shape[0])]
    for g in groups:
        xs, ms = xn[g], mn[g]
        n = ms.size
        for region in (ms, ~ms):
            if not region.any():
                continue
            for c in range(xn.shape[1]):
                vals = xs[:, c][region]
                mu, var = vals.mean(), ((vals - vals.mean()) ** 2).mean()
                out[g][:, c][region] = (vals - mu) / np.sqrt(var + eps * n / region.sum())
    return torch.from_numpy(out)


def randomize(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


# ------------------------------------------------------------------------------------- equivalences (a)

@pytest.mark.parametrize("fill", [False, True])
def test_single_region_is_batch_norm_and_instance_norm(fill):
    x, _ = data()
    for mask in (torch.full((4, 1, 6, 6), fill), torch.full((4, 6, 6), float(fill))):
        torch.testing.assert_close(region_norm(x, mask), F.batch_norm(x, None, None, training=True, eps=EPS),
                                   atol=1e-10, rtol=0)
        torch.testing.assert_close(region_norm(x, mask, stats="instance"), F.instance_norm(x, eps=EPS),
                                   atol=1e-10, rtol=0)


@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("eps", [EPS, 0.3])
def test_direct_formula_with_effective_eps_equals_the_official_fill_trick(stats, eps):
    x, m = data()
    m[1] = True   # a sample that is all hole: its region 0 is empty (instance), no NaN
    m[2] = False  # and one without a hole
    out = region_norm(x, m, eps=eps, stats=stats)
    torch.testing.assert_close(out, trick_reference(x, m, eps, stats), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, direct_reference(x, m, eps, stats), atol=1e-12, rtol=0)
    assert torch.isfinite(out).all()


def test_effective_eps_differs_from_plain_eps():
    """A large eps makes the difference visible: the true eps would give a different output."""
    x, m = data()
    out = region_norm(x, m, eps=0.5)
    n, n1 = m.numel(), int(m.sum())
    hole = x.permute(1, 0, 2, 3)[:, m[:, 0]]
    plain = (hole - hole.mean(1, keepdim=True)) / torch.sqrt(hole.var(1, correction=0, keepdim=True) + 0.5)
    scaled = (hole - hole.mean(1, keepdim=True)) / torch.sqrt(hole.var(1, correction=0, keepdim=True)
                                                              + 0.5 * n / n1)
    got = out.permute(1, 0, 2, 3)[:, m[:, 0]]
    torch.testing.assert_close(got, scaled, atol=1e-12, rtol=0)
    assert (got - plain).abs().max() > 1e-2


def test_per_region_moments():
    """stats="batch": inside each region and channel the output has mean 0 and variance var/(var + eps_eff)."""
    x, m = data(b=5, c=4, h=8, w=8, seed=3)
    out = region_norm(x, m, eps=0.05)
    n = m.numel()
    for region in (m[:, 0], ~m[:, 0]):
        vals = x.permute(1, 0, 2, 3)[:, region]
        got = out.permute(1, 0, 2, 3)[:, region]
        var = vals.var(1, correction=0)
        eps_eff = 0.05 * n / int(region.sum())
        torch.testing.assert_close(got.mean(1), torch.zeros(4, dtype=x.dtype), atol=1e-12, rtol=0)
        torch.testing.assert_close(got.var(1, correction=0), var / (var + eps_eff), atol=1e-12, rtol=0)


@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_hole_independence_and_batch_and_instance_norm_fail_it(stats):
    """Changing the input inside the hole leaves RN-B's output at valid positions exactly unchanged."""
    x, m = data(seed=5)
    changed = torch.where(m, 100 * torch.randn_like(x) + 7, x)
    assert not torch.equal(changed, x)
    layer = randomize(RegionNorm2d(3, stats=stats, dtype=torch.float64))
    valid = ~m.expand_as(x)
    a, b = layer(x, m), layer(changed, m)
    assert torch.equal(a[valid], b[valid])
    assert not torch.equal(a[m.expand_as(x)], b[m.expand_as(x)])
    bn, inorm = nn.BatchNorm2d(3, dtype=torch.float64), nn.InstanceNorm2d(3, dtype=torch.float64)
    for baseline in (bn, inorm):
        assert (baseline(x)[valid] - baseline(changed)[valid]).abs().max() > 1e-2


def test_affine_identity_at_init_and_bias_variants():
    x, m = data(seed=2)
    paper, code = RegionNorm2d(3, dtype=torch.float64), RegionNorm2d(3, official_bias=True, dtype=torch.float64)
    r = region_norm(x, m)
    assert torch.equal(paper(x, m), r) and torch.equal(code(x, m), r)
    state = randomize(RegionNorm2d(3, dtype=torch.float64), seed=4).state_dict()
    paper.load_state_dict(state)
    code.load_state_dict(state)
    fg_g, fg_b, bg_g, bg_b = (state[k][None, :, None, None] for k in ("foreground_gamma", "foreground_beta",
                                                                       "background_gamma", "background_beta"))
    mf = m.to(x.dtype)
    # The official RN_B.forward, transcribed.
    official = (r * mf) * (1 + fg_g) + fg_b + (r * (1 - mf)) * (1 + bg_g) + bg_b
    intended = mf * r * (1 + fg_g) + (1 - mf) * r * (1 + bg_g) + mf * fg_b + (1 - mf) * bg_b
    torch.testing.assert_close(code(x, m), official, atol=1e-12, rtol=0)
    torch.testing.assert_close(paper(x, m), intended, atol=1e-12, rtol=0)
    assert (paper(x, m) - code(x, m)).abs().min() > 1e-3


def test_no_affine_is_region_norm():
    x, m = data()
    layer = RegionNorm2d(3, affine=False, stats="instance")
    assert list(layer.parameters()) == [] and layer.foreground_gamma is None
    torch.testing.assert_close(layer(x, m), region_norm(x, m, stats="instance"), atol=1e-15, rtol=0)


def rnl_reference(layer, x):
    """``SelfAware_Affine`` + ``RN_L`` transcribed: the response map from the mean and max over channels,
    the thresholded mask, region standardization and the spatial affine from the response map."""
    avg, mx = torch.mean(x, dim=1, keepdim=True), torch.max(x, dim=1, keepdim=True)[0]
    s = torch.sigmoid(layer.response_conv(torch.cat([avg, mx], dim=1)))
    gamma, beta = layer.gamma_conv(s), layer.beta_conv(s)
    mask = torch.zeros_like(s)
    mask[s.detach() >= layer.threshold] = 1
    return trick_reference(x, mask.bool()) * (1 + gamma) + beta, s, mask.bool()


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_rnl_matches_the_official_steps(kernel_size):
    x, _ = data(seed=6)
    layer = LearnableRegionNorm2d(3, threshold=1.5, kernel_size=kernel_size, dtype=torch.float64)
    assert layer.last_mask is None
    expected, s, mask = rnl_reference(layer, x)
    assert not mask.any()  # threshold > 1: one region
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    gamma, beta = layer.gamma_conv(s), layer.beta_conv(s)
    torch.testing.assert_close(layer(x), region_norm(x, torch.zeros(4, 1, 6, 6)) * (1 + gamma) + beta,
                               atol=1e-12, rtol=0)
    layer.threshold = float(s.detach().median())  # about half the positions in each region
    expected, _, mask = rnl_reference(layer, x)
    assert 0.2 < mask.float().mean() < 0.8
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    assert torch.equal(layer.last_mask, mask) and layer.last_mask.dtype == torch.bool


def test_rnl_gradient_reaches_response_conv_only_through_the_affine_maps():
    x, _ = data(seed=7)
    layer = LearnableRegionNorm2d(3, threshold=0.5, dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.response_conv.weight.grad.abs().sum() > 0
    frozen = LearnableRegionNorm2d(3, threshold=0.5, dtype=torch.float64)
    frozen.load_state_dict(layer.state_dict())
    with torch.no_grad():  # gamma_conv and beta_conv constant in s: nothing reaches response_conv
        for conv in (frozen.gamma_conv, frozen.beta_conv):
            conv.weight.zero_()
    frozen(x).sum().backward()
    assert torch.equal(frozen.response_conv.weight.grad, torch.zeros_like(frozen.response_conv.weight))


def _gap_threshold(layer, x):
    """A threshold in the widest gap between the middle response values (far from every one of them)."""
    s = torch.sort(layer.response(x).detach().flatten()).values
    mid = s[len(s) // 4: 3 * len(s) // 4]
    i = int(torch.argmax(mid[1:] - mid[:-1]))
    return float((mid[i] + mid[i + 1]) / 2), float(mid[i + 1] - mid[i])


@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_gradcheck(stats):
    x, m = data(b=2, c=3, h=4, w=4, seed=8)
    x.requires_grad_()
    rnb = randomize(RegionNorm2d(3, stats=stats, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, *p: torch.func.functional_call(
        rnb, dict(zip([n for n, _ in rnb.named_parameters()], p)), (x, m)),
        (x, *[p.detach().clone().requires_grad_() for p in rnb.parameters()]), fast_mode=True)
    rnl = LearnableRegionNorm2d(3, kernel_size=3, stats=stats, dtype=torch.float64)
    rnl.threshold, gap = _gap_threshold(rnl, x)
    assert gap > 1e-4
    names = [n for n, _ in rnl.named_parameters()]
    assert torch.autograd.gradcheck(lambda x, *p: torch.func.functional_call(rnl, dict(zip(names, p)), (x,)),
                                    (x, *[p.detach().clone().requires_grad_() for p in rnl.parameters()]),
                                    fast_mode=True)
    assert rnl.last_mask.any() and not rnl.last_mask.all()
    assert torch.autograd.gradcheck(lambda x: region_norm(x, m, eps=0.1, stats=stats), (x,))


# --------------------------------------------------------------------------------------------- the mask

def test_mask_forms_and_nearest_resizing():
    x, _ = data(h=4, w=4)
    gen = torch.Generator().manual_seed(9)
    big = torch.rand(4, 1, 8, 8, generator=gen) > 0.5
    small = F.interpolate(big.float(), size=(4, 4), mode="nearest").bool()
    expected = region_norm(x, small)
    for form in (big, big.float(), big.to(torch.uint8), big[:, 0], big.double()[:, 0]):
        assert torch.equal(region_norm(x, form), expected)
    layer = randomize(RegionNorm2d(3, dtype=torch.float64))
    assert torch.equal(layer(x, big), layer(x, small))
    assert not torch.equal(region_norm(x, big[:, :, :4, :4]), expected)


def test_region_vanishing_after_downsampling_gives_no_nan():
    x, _ = data(h=2, w=2)
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, 1:3, 1:3] = 1  # nearest down-sampling to 2x2 reads pixels (0, 0), (0, 4), (4, 0), (4, 4)
    for eps in (EPS, 0.0):
        out = RegionNorm2d(3, eps=eps, dtype=torch.float64)(x.requires_grad_(), mask)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        var, mean = torch.var_mean(x.detach(), (0, 2, 3), correction=0, keepdim=True)
        torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + eps), atol=1e-12, rtol=0)
        x.grad = None


def test_all_hole_and_no_hole_samples_in_instance_mode():
    x, m = data()
    m[0], m[1] = True, False
    out = RegionNorm2d(3, stats="instance", dtype=torch.float64)(x, m)
    torch.testing.assert_close(out[:2], F.instance_norm(x[:2], eps=EPS), atol=1e-12, rtol=0)
    assert torch.isfinite(out).all()


def test_mask_errors():
    x, m = data()
    layer = RegionNorm2d(3)
    with pytest.raises(ValueError, match="mask must be binary"):
        layer(x.float(), m.float() * 0.7)
    with pytest.raises(ValueError, match="mask must be binary"):
        region_norm(x, m.to(torch.uint8) * 2)
    for bad in (m[:3], m.expand(4, 2, 6, 6), m[:, 0, 0], m[None]):
        with pytest.raises(ValueError, match=r"expected mask of shape \(4, 1, H, W\) or \(4, H, W\).*got"):
            layer(x.float(), bad)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        layer(x.float(), m.numpy())


# ------------------------------------------------------------------------------------ common contract

def layers():
    return [randomize(RegionNorm2d(3)), randomize(RegionNorm2d(3, official_bias=True, stats="instance")),
            LearnableRegionNorm2d(3, threshold=0.55)]


def call(layer, x, m, module=None):
    """RN-B gets the mask, RN-L only the input (``layer`` may be the compiled wrapper of ``module``)."""
    return layer(x, m) if isinstance(module or layer, RegionNorm2d) else layer(x)


def test_train_equals_eval_no_buffers_and_state_dict_round_trip():
    x, m = data(dtype=torch.float32)
    for layer in layers():
        assert list(layer.buffers()) == []
        y_train = call(layer.train(), x, m)
        assert torch.equal(call(layer.eval(), x, m), y_train)
        buf = io.BytesIO()
        torch.save(layer.state_dict(), buf)
        fresh = type(layer)(3, **({"official_bias": layer.official_bias, "stats": layer.stats}
                                  if isinstance(layer, RegionNorm2d) else {"threshold": layer.threshold}))
        fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = call(layer, xa, m), call(fresh, xb, m)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for (name, pa), pb in zip(layer.named_parameters(), fresh.parameters()):
            assert torch.equal(pa.grad, pb.grad), name


def test_official_state_dict_names():
    assert set(RegionNorm2d(4).state_dict()) == {"foreground_gamma", "foreground_beta", "background_gamma",
                                                 "background_beta"}
    assert set(LearnableRegionNorm2d(4).state_dict()) == {"response_conv.weight", "gamma_conv.weight",
                                                          "gamma_conv.bias", "beta_conv.weight", "beta_conv.bias"}
    assert LearnableRegionNorm2d.batchnorm_state == ()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_float32_statistics(dtype):
    x, m = data(dtype=torch.float32)
    xh = x.to(dtype)
    for layer in layers():
        yh = call(layer, xh, m)
        assert yh.dtype == dtype
        assert torch.equal(yh, call(layer, xh.float(), m).to(dtype))
    assert region_norm(xh, m).dtype == dtype


def test_float64_stays_float64():
    x, m = data()
    assert RegionNorm2d(3, dtype=torch.float64)(x, m).dtype == torch.float64
    assert LearnableRegionNorm2d(3, dtype=torch.float64)(x).dtype == torch.float64


def test_batch_size_one_and_single_value_errors():
    x, m = data(b=1)
    torch.testing.assert_close(region_norm(x, m), region_norm(x, m, stats="instance"), atol=1e-15, rtol=0)
    assert torch.isfinite(RegionNorm2d(3, dtype=torch.float64)(x, m)).all()
    one = torch.randn(1, 3, 1, 1)
    for fn in (lambda: RegionNorm2d(3)(one, torch.ones(1, 1, 1, 1)), lambda: LearnableRegionNorm2d(3)(one),
               lambda: region_norm(torch.randn(4, 3, 1, 1), torch.ones(4, 1, 1, 1), stats="instance")):
        with pytest.raises(ValueError, match="more than one value per channel"):
            fn()
    region_norm(torch.randn(4, 3, 1, 1), torch.ones(4, 1, 1, 1))  # batch statistics over 4 values: fine


def test_bad_input_and_hyperparameters():
    layer, rnl = RegionNorm2d(3), LearnableRegionNorm2d(3)
    mask = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="expected 3 channels in dim 1, got 4"):
        layer(torch.randn(2, 4, 4, 4), mask)
    with pytest.raises(ValueError, match="expected 3 channels in dim 1, got 5"):
        rnl(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="non-empty batch"):
        layer(torch.randn(0, 3, 4, 4), torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="non-empty batch"):
        rnl(torch.randn(0, 3, 4, 4))
    with pytest.raises(ValueError, match="non-empty"):
        region_norm(torch.randn(0, 3, 4, 4), torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(2, 3, 4), mask)
    with pytest.raises(TypeError, match="floating"):
        rnl(torch.ones(2, 3, 4, 4, dtype=torch.long))
    bad = [(RegionNorm2d, {"num_features": 0}, "num_features must be a positive int"),
           (RegionNorm2d, {"eps": -1.0}, "eps must be non-negative"),
           (RegionNorm2d, {"stats": "layer"}, "stats must be one of"),
           (LearnableRegionNorm2d, {"kernel_size": 5}, r"kernel_size must be one of \(3, 7\), got 5"),
           (LearnableRegionNorm2d, {"threshold": float("nan")}, "threshold must be a number"),
           (LearnableRegionNorm2d, {"stats": "group"}, "stats must be one of")]
    for cls, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            cls(**{"num_features": 3, **kw})
    with pytest.raises(TypeError, match="official_bias must be a bool"):
        RegionNorm2d(3, official_bias=1)
    with pytest.raises(ValueError, match="stats must be one of"):
        region_norm(torch.randn(2, 3, 4, 4), mask, stats="group")


def test_reset_parameters_and_repr():
    layer = randomize(RegionNorm2d(5))
    layer.reset_parameters()
    assert all(torch.equal(p, torch.zeros(5)) for p in layer.parameters())
    assert "5, eps=1e-05, stats='batch', official_bias=False, affine=True" in repr(layer)
    rnl = LearnableRegionNorm2d(5, kernel_size=3)
    before = rnl.gamma_conv.weight.clone()
    rnl.reset_parameters()
    assert not torch.equal(rnl.gamma_conv.weight, before) and rnl.gamma_conv.weight.shape == (1, 1, 3, 3)
    assert "5, threshold=0.8, kernel_size=3, eps=1e-05, stats='batch'" in repr(rnl)


def test_compiles_aot_eager_same_outputs_and_grads():
    torch._dynamo.reset()
    x, m = data(dtype=torch.float32, seed=11)
    for layer in layers()[1:]:
        compiled = torch.compile(layer, backend="aot_eager")
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = call(layer, xe, m), call(compiled, xc, m, layer)
        torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6)
        grads_e = torch.autograd.grad(ye.square().sum(), [xe, *layer.parameters()])
        grads_c = torch.autograd.grad(yc.square().sum(), [xc, *layer.parameters()])
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)
