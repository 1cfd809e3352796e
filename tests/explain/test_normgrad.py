import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.bench.tasks import SaliencyCNN
from normlab.explain._capture import LayerCapture, normalize_minmax
from normlab.explain.gradcam import GradCAM
from normlab.explain.metrics import class_sensitivity
from normlab.explain.normgrad import PHASE1, PHASE2, PRESETS, NormGrad, extract_aggregate, meta_saliency, normgrad


def seeded_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return SaliencyCNN().to(dtype).eval()


def digits_like(n=4, seed=1, dtype=torch.float32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def act_grad(seed=0, shape=(2, 3, 4, 5), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)


def explicit_contributions(x, g, phase1):
    """e_u materialised, ``(N, K, h, w)``: outer products, unfold, products, as the sheet defines them."""
    n, c, h, w = x.shape
    unf = F.unfold(x, 3, padding=1).view(n, 9 * c, h, w)
    if phase1 == "conv1x1":
        return torch.einsum("nihw,njhw->nijhw", x, g).reshape(n, c * c, h, w)
    if phase1 == "conv3x3":
        return torch.einsum("nihw,njhw->nijhw", unf, g).reshape(n, 9 * c * c, h, w)
    if phase1 == "conv3x3_depthwise":
        return (unf.view(n, c, 9, h, w) * g[:, :, None]).reshape(n, 9 * c, h, w)
    if phase1 == "scaling":
        return x * g
    return g


def explicit_aggregate(e, phase2):
    if phase2 == "norm":
        return e.pow(2).sum(1, keepdim=True).sqrt()
    if phase2 == "filter_norm":
        return torch.relu(e).pow(2).sum(1, keepdim=True).sqrt()
    if phase2 == "sum":
        return e.sum(1, keepdim=True)
    return e.max(1, keepdim=True).values


@pytest.mark.parametrize("phase1,phase2", list(itertools.product(PHASE1, PHASE2)))
def test_every_extractor_and_aggregator_vs_the_explicit_form(phase1, phase2):
    x, g = act_grad()
    expected = explicit_aggregate(explicit_contributions(x, g, phase1), phase2)
    torch.testing.assert_close(extract_aggregate(x, g, phase1, phase2), expected, atol=1e-10, rtol=1e-10)


def test_normgrad_is_the_product_of_norms_in_float32():
    x, g = act_grad(dtype=torch.float32, shape=(1, 32, 8, 8))
    outer = torch.einsum("nihw,njhw->nijhw", x, g).flatten(1, 2)
    explicit = outer.norm(dim=1, keepdim=True)
    assert ((extract_aggregate(x, g) - explicit).abs() / explicit).max() < 1e-5  # float32 rounding only
    torch.testing.assert_close(extract_aggregate(x, g, "scaling", "sum"), (x * g).sum(1, keepdim=True))
    torch.testing.assert_close(extract_aggregate(x, g, "bias", "norm"), g.norm(dim=1, keepdim=True))


def test_virtual_identity_layers_match_real_parameter_gradients():
    """sum_u e_u equals the weight gradient of a real identity layer inserted after the hooked layer."""
    torch.manual_seed(0)
    c = 4
    body = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.Tanh()).double()
    head = nn.Sequential(nn.Conv2d(c, 3, 3), nn.Flatten(), nn.LazyLinear(5)).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    head(body(x))  # materialise the lazy layer
    conv1 = nn.Conv2d(c, c, 1, bias=False).double()
    conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False).double()
    dw3 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).double()
    with torch.no_grad():
        conv1.weight.copy_(torch.eye(c)[:, :, None, None])
        conv3.weight.zero_()
        conv3.weight[:, :, 1, 1] = torch.eye(c)
        dw3.weight.zero_()
        dw3.weight[:, :, 1, 1] = 1.0
    scale = torch.ones(1, c, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, c, 1, 1, dtype=torch.float64, requires_grad=True)
    a = body(x).detach().requires_grad_()
    (g,) = torch.autograd.grad(head(a)[0, 2], a)
    for layer in (conv1, conv3, dw3):
        assert torch.allclose(layer(a), a)  # the identity in the forward pass
        (wg,) = torch.autograd.grad(head(layer(a))[0, 2], layer.weight)
        if layer is conv1:
            e = torch.einsum("nihw,njhw->nijhw", a, g).sum((0, 3, 4))
            torch.testing.assert_close(e, wg.view(c, c).T)
        elif layer is conv3:
            unf = F.unfold(a, 3, padding=1).view(1, 9 * c, 6, 6)
            e = torch.einsum("nihw,njhw->nijhw", unf, g).sum((0, 3, 4))
            torch.testing.assert_close(e, wg.view(c, 9 * c).T)
        else:
            unf = F.unfold(a, 3, padding=1).view(1, c, 9, 6, 6)
            torch.testing.assert_close((unf * g[:, :, None]).sum((0, 3, 4)), wg.view(c, 9))
    gs, gb = torch.autograd.grad(head(a * scale + bias)[0, 2], [scale, bias])
    torch.testing.assert_close((a * g).sum((0, 2, 3)), gs.flatten())
    torch.testing.assert_close(g.sum((0, 2, 3)), gb.flatten())


def test_torchray_formulas_on_a_hand_worked_toy():
    # x, g: (1, C=2, 2x3); values chosen so the maps are easy by hand.
    x = torch.tensor([[[[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]], [[4.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    g = torch.tensor([[[[1.0, 2.0, -1.0], [1.0, 0.0, 2.0]], [[0.0, 2.0, 1.0], [0.0, 3.0, -2.0]]]])
    # norm_grad: ||x_u|| ||g_u||  -> 5*1, 1*sqrt(8), 1*sqrt(2); 0*1, 2*3, sqrt(2)*sqrt(8)
    expected = torch.tensor([[[[5.0, 8 ** 0.5, 2 ** 0.5], [0.0, 6.0, 4.0]]]])
    torch.testing.assert_close(extract_aggregate(x, g), expected)
    # norm_grad_selective: ||max(x_u * g_u, 0)|| -> (3,0)->3, (0,2)->2, (-1,0)->0; (0,0)->0, (0,0)->0, (2,-2)->2
    sel = NormGrad.from_preset(nn.Conv2d(1, 1, 1), "normgrad_selective")
    assert (sel.phase1, sel.phase2) == ("scaling", "filter_norm")
    torch.testing.assert_close(extract_aggregate(x, g, "scaling", "filter_norm"),
                               torch.tensor([[[[3.0, 2.0, 0.0], [0.0, 0.0, 2.0]]]]))
    # the grid's conv1x1 + filter_norm with x >= 0: ||x|| ||g+|| -> 5*1, 1*sqrt(8), 1*1; 0, 2*3, sqrt(2)*2
    torch.testing.assert_close(extract_aggregate(x, g, "conv1x1", "filter_norm"),
                               torch.tensor([[[[5.0, 8 ** 0.5, 1.0], [0.0, 6.0, 2 * 2 ** 0.5]]]]))


def test_map_pipeline_matches_capture_plus_formula():
    model, x = seeded_cnn(), digits_like()
    target = torch.tensor([1, 1, 4, 7])
    with LayerCapture(model, "conv2") as cap:
        _, _, (a,), (g,) = cap.run(x, target)
    raw = a.norm(dim=1, keepdim=True) * g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(NormGrad(model, "conv2", upsample=False)(x, target), raw)
    out = NormGrad(model)(x, target)  # "auto" = the last Conv2d = conv2
    torch.testing.assert_close(out, normalize_minmax(raw))
    torch.testing.assert_close(normgrad(model, x, target), out)
    assert out.shape == (4, 1, 8, 8) and out.min() == 0 and out.amax(dim=(1, 2, 3)).eq(1).all()


def test_class_insensitive_at_the_layer_feeding_gap_and_linear():
    """The sheet's check (1): the gradient at relu2 is w_c / HW everywhere, so every class gets one map."""
    model, x = seeded_cnn(dtype=torch.float64), digits_like(6, dtype=torch.float64)
    corr = class_sensitivity(NormGrad(model, "relu2"), model, x)
    assert corr.isfinite().all()
    torch.testing.assert_close(corr, torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    # ... while Grad-CAM at the same layer and NormGrad one layer earlier do tell classes apart
    assert class_sensitivity(GradCAM(model, "relu2"), model, x).mean() < 0.99
    assert class_sensitivity(NormGrad(model, "conv2"), model, x).mean() < 0.999


def test_multi_layer_product_and_mean():
    model, x = seeded_cnn(), digits_like()
    maps = [NormGrad(model, name)(x) for name in ("relu1", "conv2")]
    torch.testing.assert_close(NormGrad(model, ["relu1", "conv2"])(x), maps[0] * maps[1])
    torch.testing.assert_close(NormGrad(model, ["relu1", model.conv2], combine="mean")(x), (maps[0] + maps[1]) / 2)


def test_product_warns_about_a_constant_layer_map():
    model, x = seeded_cnn(), digits_like()
    with pytest.warns(RuntimeWarning, match="relu2"):
        out = NormGrad(model, ["relu1", "relu2"], phase1="bias")(x)  # bias+norm at relu2 is constant
    assert torch.equal(out, torch.zeros_like(out))


class PooledCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(5 * 16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.pool(self.conv(x))).flatten(1))


def test_upsampled_to_the_input_then_normalised():
    torch.manual_seed(2)
    model, x = PooledCNN().eval(), digits_like(3)
    raw = NormGrad(model, "pool", upsample=False)(x)
    assert raw.shape == (3, 1, 4, 4)
    expected = normalize_minmax(F.interpolate(raw, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(NormGrad(model, "pool")(x), expected)


def test_batched_equals_per_sample_and_targets():
    model, x = seeded_cnn(), digits_like(5)
    ng = NormGrad(model, ["relu1", "conv2"])
    torch.testing.assert_close(ng(x), torch.cat([ng(x[i:i + 1]) for i in range(5)]), atol=1e-5, rtol=0)
    pred = model(x).argmax(1)
    torch.testing.assert_close(ng(x), ng(x, pred))
    torch.testing.assert_close(ng(x, 3), ng(x, torch.full((5,), 3)))


def test_half_precision_model():
    model, x = seeded_cnn(dtype=torch.bfloat16), digits_like(dtype=torch.bfloat16)
    out = NormGrad(model, "conv2")(x)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_errors():
    model = seeded_cnn()
    with pytest.raises(ValueError, match="unknown phase1 'conv5x5'"):
        NormGrad(model, phase1="conv5x5")
    with pytest.raises(ValueError, match="unknown phase2 'mean'"):
        NormGrad(model, phase2="mean")
    with pytest.raises(ValueError, match="unknown combine 'sum'"):
        NormGrad(model, ["relu1", "relu2"], combine="sum")
    with pytest.raises(ValueError, match="'layer4' is not in the model"):
        NormGrad(model, "layer4")
    with pytest.raises(ValueError, match="upsample=True"):
        NormGrad(model, ["relu1", "relu2"], upsample=False)
    with pytest.raises(ValueError, match="nn.Conv2d"):
        NormGrad(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(ValueError, match="4-D"):
        NormGrad(model, "head")(digits_like())
    with pytest.raises(ValueError, match="unknown preset"):
        NormGrad.from_preset(model, "gradcam")
    with pytest.raises(ValueError, match="same shape|one shape"):
        extract_aggregate(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 4))
    assert set(PRESETS) >= {"normgrad", "normgrad_selective"}
    assert "conv1x1" in repr(NormGrad(model))


def reference_meta(model, x, target, lr, negate=False, layer="relu2"):
    """One torch.optim.SGD step on a deep copy (CE of one image), then plain NormGrad on the copy."""
    maps = []
    for i in range(len(x)):
        clone = copy.deepcopy(model).eval()
        opt = torch.optim.SGD(clone.parameters(), lr=lr)
        loss = F.cross_entropy(clone(x[i:i + 1]), target[i:i + 1])
        (-loss if negate else loss).backward()
        opt.step()
        maps.append(NormGrad(clone, layer)(x[i:i + 1], target[i:i + 1]))
    return torch.cat(maps)


@pytest.mark.parametrize("negate", [False, True])
def test_meta_saliency_matches_an_sgd_step_on_a_copy(negate):
    model, x = seeded_cnn(dtype=torch.float64), digits_like(3, dtype=torch.float64)
    target = torch.tensor([2, 5, 5])
    out = meta_saliency(NormGrad(model, "relu2"), model, x, target, lr=0.1, negate_loss=negate)
    torch.testing.assert_close(out, reference_meta(model, x, target, 0.1, negate))
    assert class_sensitivity(lambda xs, t: meta_saliency(NormGrad(model, "relu2"), model, xs, t, lr=0.1),
                             model, x).mean() < 0.999  # the step breaks the class-insensitivity


def test_meta_saliency_lr_zero_is_the_plain_map_and_default_target():
    model, x = seeded_cnn(), digits_like(3)
    ng = NormGrad(model, "conv2")
    torch.testing.assert_close(meta_saliency(ng, model, x, lr=0.0), ng(x))


def test_meta_saliency_restores_everything():
    model = seeded_cnn().train()
    model.conv1.bias.requires_grad_(False)
    model.head.weight.grad = torch.full_like(model.head.weight, 3.0)
    before = copy.deepcopy(model.state_dict())
    x = digits_like(2)
    meta_saliency(NormGrad(model, "relu2"), model, x, torch.tensor([1, 2]), lr=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.conv1.bias.requires_grad and model.conv1.weight.requires_grad
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 3.0))
    assert model.conv1.weight.grad is None
    assert all(m.training for m in model.modules())

    def failing(xs, t):
        assert not torch.equal(model.conv2.weight, before["conv2.weight"])  # the step was taken
        raise RuntimeError("saliency failed")

    with pytest.raises(RuntimeError, match="saliency failed"):
        meta_saliency(failing, model, x, torch.tensor([1, 2]), lr=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_meta_saliency_per_image_and_errors():
    model, x = seeded_cnn(), digits_like(3)
    ng = NormGrad(model, "relu2")
    batched = meta_saliency(ng, model, x, torch.tensor([0, 1, 2]), lr=0.2)
    singles = torch.cat([meta_saliency(ng, model, x[i:i + 1], i, lr=0.2) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        meta_saliency(ng, model, x, lr=-1)
