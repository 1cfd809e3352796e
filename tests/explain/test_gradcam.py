import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.bench.tasks import SaliencyCNN
from normlab.explain._capture import LayerCapture
from normlab.explain.gradcam import GradCAM, gradcam_raw, scale_cam


def seeded_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return SaliencyCNN().to(dtype).eval()


def digits_like(n=4, seed=1, dtype=torch.float32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_gradcam(model: SaliencyCNN, x, target):
    """Grad-CAM written out: A = relu2 output, G = d logit_t / dA, relu(sum_k mean_u G_k A_k), min-max."""
    a = model.relu2(model.conv2(model.relu1(model.conv1(x))))
    logits = model.head(a.mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), a)
    cam = torch.relu((g.mean(dim=(2, 3))[:, :, None, None] * a).sum(dim=1)).detach()
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return (cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7))[:, None]


def test_matches_the_formula_written_out():
    model, x = seeded_cnn(dtype=torch.float64), digits_like(dtype=torch.float64)
    target = torch.tensor([0, 3, 9, 3])
    out = GradCAM(model, "relu2")(x, target)
    assert out.shape == (4, 1, 8, 8) and out.dtype == torch.float64
    torch.testing.assert_close(out, reference_gradcam(model, x, target), atol=1e-12, rtol=0)


def test_default_target_is_the_argmax_logit():
    model, x = seeded_cnn(), digits_like()
    pred = model(x).argmax(1)
    torch.testing.assert_close(GradCAM(model, model.relu2)(x), GradCAM(model, "relu2")(x, pred))


def test_captum_layer_gradcam_peer():
    captum = pytest.importorskip("captum.attr")
    model, x = seeded_cnn(), digits_like(6)
    target = torch.tensor([1, 2, 3, 4, 5, 6])
    # captum's LayerGradCam (relu_attributions=True) is the unscaled map at the layer's resolution.
    theirs = captum.LayerGradCam(model, model.relu2).attribute(x, target=target, relu_attributions=True)
    with LayerCapture(model, "relu2") as cap:
        _, _, (a,), (g,) = cap.run(x, target)
    ours = gradcam_raw(a, g)
    assert theirs.shape == ours.shape == (6, 1, 8, 8)
    assert ours.amax() > 0
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(GradCAM(model, "relu2")(x, target), scale_cam(theirs.detach()), atol=1e-6,
                               rtol=1e-5)


class PooledCNN(nn.Module):
    """The target layer at half the input resolution, so the map must be upsampled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.act(self.pool(self.conv(x))).mean((2, 3)))


def test_upsampled_bilinear_after_scaling():
    torch.manual_seed(3)
    model = PooledCNN().eval()
    x = digits_like(3)
    with LayerCapture(model, "act") as cap:
        _, t, (a,), (g,) = cap.run(x)
    small = scale_cam(gradcam_raw(a, g))
    assert small.shape == (3, 1, 4, 4)
    expected = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(GradCAM(model, "act")(x), expected)


def test_scaling_is_in_unit_range_and_zero_for_constant_maps():
    cam = torch.stack([torch.rand(1, 5, 5), torch.zeros(1, 5, 5), torch.full((1, 5, 5), 2.0)])
    out = scale_cam(cam)
    assert out[0].min() == 0 and abs(out[0].max().item() - 1) < 1e-6
    assert torch.equal(out[1], torch.zeros(1, 5, 5)) and torch.equal(out[2], torch.zeros(1, 5, 5))


def test_batched_equals_per_sample():
    model, x = seeded_cnn(), digits_like(5)
    gc = GradCAM(model, "relu2")
    batched = gc(x)
    singles = torch.cat([gc(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)


def test_model_state_restored():
    model = seeded_cnn().train()
    model.head.weight.grad = torch.full_like(model.head.weight, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    GradCAM(model, "relu2")(digits_like())
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 2.0))
    assert model.conv1.weight.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_half_precision_map_in_float32():
    model, x = seeded_cnn(dtype=torch.bfloat16), digits_like(dtype=torch.bfloat16)
    out = GradCAM(model, "relu2")(x)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 8, 8)


def test_errors():
    model = seeded_cnn()
    with pytest.raises(ValueError, match="'layer5' is not in the model"):
        GradCAM(model, "layer5")
    with pytest.raises(ValueError, match="4-D"):
        GradCAM(model, "head")(digits_like())
    with pytest.raises(ValueError, match="0..9"):
        GradCAM(model, "relu2")(digits_like(), 10)
    assert "relu2" in repr(GradCAM(model, "relu2"))
