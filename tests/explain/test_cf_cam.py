import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN
from torch import nn

from normlab.explain.cf_cam import CFCAM, channel_labels, filter_kernels, filter_maps
from normlab.explain.metrics import class_sensitivity

# ---- a straight NumPy re-implementation of the sheet's steps 1-6 ----


def ref_filter(g, sigma_spatial, sigma_range):
    """filt(g): the h x w kernel S * R / (sum + 1e-6) centred at (h/2, w/2), cross-correlated with zero
    padding (h - 1) // 2 before and h // 2 after (PyTorch's 'same'); ``sigma_range=None``: R = 1."""
    h, w = g.shape
    i = np.arange(h)[:, None] - h / 2
    j = np.arange(w)[None, :] - w / 2
    kernel = np.exp(-(i ** 2 + j ** 2) / (2 * sigma_spatial ** 2))
    if sigma_range is not None:
        kernel = kernel * np.exp(-(g - g.mean()) ** 2 / (2 * sigma_range ** 2))
    kernel = kernel / (kernel.sum() + 1e-6)
    padded = np.pad(g, (((h - 1) // 2, h // 2), ((w - 1) // 2, w // 2)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w))
    return (windows * kernel).sum(axis=(-2, -1))


def ref_cf_cam(A, G, size, temperature=1.0, importance=75.0, eps_pct=25.0, frac=0.05, sigma_spatial=5.0,
               sigma_range=0.1):
    """One sample: A, G (K, h, w) float64 -> (cam (H, W), labels (K,), raw weights (K,))."""
    K = A.shape[0]
    M = A.reshape(K, -1)
    norms = np.linalg.norm(M, axis=1)
    important = norms >= np.percentile(norms, importance)
    labels = np.full(K, -2)
    rest = np.where(~important)[0]
    if len(rest) == 1:
        labels[rest] = -1
    elif len(rest) > 1:
        rows = M[rest]
        dist = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
        eps = max(np.percentile(dist[~np.eye(len(rest), dtype=bool)], eps_pct), 1e-5)
        labels[rest] = DBSCAN(eps=eps, min_samples=max(2, int(np.floor(frac * len(rest))))).fit(rows).labels_
    weights = np.zeros(K)
    weights[labels == -2] = G[labels == -2].mean(axis=(1, 2))
    for j in range(labels.max() + 1):
        members = labels == j
        weights[members] = ref_filter(G[members].mean(axis=0), sigma_spatial, sigma_range).mean()
    valid = labels != -1
    e = np.exp((weights[valid] - weights[valid].max()) / temperature)
    alpha = e / e.sum()
    cam = np.maximum((alpha[:, None, None] * A[valid]).sum(axis=0), 0)
    cam = F.interpolate(torch.from_numpy(cam)[None, None], size=size, mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    return (cam / cam.max() if cam.max() > 0 else cam), labels, weights


# ---- models ----


def random_cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).to(dtype)


def reference_inputs(model, cut, x, target):
    """A and dy_target/dA at ``model[:cut]``'s output, by splitting the model (independent of hooks)."""
    feats = model[:cut](x).detach().requires_grad_()
    logits = model[cut:](feats)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    return feats.detach().numpy(), grad.numpy()


def hand_built(seed=0):
    """8 channels on 8x8: 2 of large norm, 4 identical small maps, 2 small maps far from everything; the
    model is the flattened maps into a linear head, so G_k = W[c] reshaped (spatially varying)."""
    gen = torch.Generator().manual_seed(seed)
    small = 0.1 * torch.rand(8, 8, generator=gen, dtype=torch.float64) + 0.01
    A = torch.stack([5 * torch.rand(8, 8, generator=gen, dtype=torch.float64) + 0.01,
                     5 * torch.rand(8, 8, generator=gen, dtype=torch.float64) + 0.01,
                     small, small, small, small,
                     0.1 * torch.rand(8, 8, generator=gen, dtype=torch.float64) + 0.01,
                     0.1 * torch.rand(8, 8, generator=gen, dtype=torch.float64) + 0.01])
    head = nn.Linear(8 * 64, 3).double()
    with torch.no_grad():
        head.weight.copy_(0.2 * torch.randn(3, 8 * 64, generator=gen, dtype=torch.float64))
    return nn.Sequential(nn.ReLU(), nn.Flatten(), head), A[None]


# ---- the hand-built case and the reference ----


def test_hand_built_labels_weights_and_reference():
    model, x = hand_built()
    cam, info = CFCAM(model, "0")(x, target=1, return_info=True)
    labels, weights, alpha = info["labels"][0], info["weights"][0], info["alpha"][0]
    assert labels.tolist() == [-2, -2, 0, 0, 0, 0, -1, -1]
    assert torch.equal(weights[2:6], weights[2].expand(4))  # one weight per cluster
    assert alpha[6:].tolist() == [0.0, 0.0] and alpha.sum().item() == pytest.approx(1.0)
    G = model[2].weight[1].detach().view(8, 8, 8).numpy()
    ref_cam, ref_labels, ref_weights = ref_cf_cam(x[0].numpy(), G, (8, 8))
    assert ref_labels.tolist() == labels.tolist()
    np.testing.assert_allclose(weights.numpy(), ref_weights, atol=1e-12, rtol=1e-9)
    np.testing.assert_allclose(cam[0, 0].numpy(), ref_cam, atol=1e-6)
    # the bilateral filter is not the identity here: the cluster weight differs from the raw gradient mean
    assert abs(weights[2].item() - G[2:6].mean()) > 1e-4
    # noise channels are absent from the sum: changing them changes nothing
    x2 = x.clone()
    x2[0, 6] += 0.01
    cam2, info2 = CFCAM(model, "0")(x2, target=1, return_info=True)
    assert info2["labels"][0].tolist() == labels.tolist()
    torch.testing.assert_close(cam2, cam, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layer,cut", [("1", 2), ("3", 4)])
@pytest.mark.parametrize("sigma_range,filt", [(0.1, "bilateral"), (1e-3, "bilateral"), (0.1, "gaussian")])
def test_matches_numpy_reference_on_random_cnn(layer, cut, sigma_range, filt):
    model = random_cnn()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cam, info = CFCAM(model, layer, sigma_range=sigma_range, filter=filt)(x, return_info=True)
    A, G = reference_inputs(model, cut, x, info["target"])
    for n in range(3):
        ref_cam, ref_labels, ref_weights = ref_cf_cam(A[n], G[n], (8, 8), sigma_range=(
            sigma_range if filt == "bilateral" else None))
        assert info["labels"][n].tolist() == ref_labels.tolist()
        assert (ref_labels >= 0).any()  # the clustering path is exercised
        np.testing.assert_allclose(info["weights"][n].numpy(), ref_weights, atol=1e-12, rtol=1e-9)
        np.testing.assert_allclose(cam[n, 0].numpy(), ref_cam, atol=1e-6)


def test_upsampling_from_a_smaller_layer():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(12, 16, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 5)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    cam, info = CFCAM(model, "2")(x, return_info=True)
    assert cam.shape == (2, 1, 8, 8)
    A, G = reference_inputs(model, 3, x, info["target"])
    for n in range(2):
        np.testing.assert_allclose(cam[n, 0].numpy(), ref_cf_cam(A[n], G[n], (8, 8))[0], atol=1e-6)


# ---- filt ----


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("shape", [(5, 5), (6, 8), (7, 4)])
def test_filter_equals_conv2d_same_with_the_explicit_kernel(shape):
    g = 0.1 * torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernels = filter_kernels(g, 5.0, 0.1)
    out = filter_maps(g, kernels)
    for m in range(2):
        h, w = shape
        i = torch.arange(h, dtype=torch.float64)[:, None] - h / 2
        j = torch.arange(w, dtype=torch.float64)[None, :] - w / 2
        k = torch.exp(-(i ** 2 + j ** 2) / 50.0) * torch.exp(-(g[m] - g[m].mean()) ** 2 / 0.02)
        k = k / (k.sum() + 1e-6)
        torch.testing.assert_close(kernels[m], k, atol=1e-15, rtol=1e-12)
        expected = F.conv2d(g[m][None, None], k[None, None], padding="same")[0, 0]
        torch.testing.assert_close(out[m], expected, atol=1e-14, rtol=1e-12)
        np.testing.assert_allclose(out[m].numpy(), ref_filter(g[m].numpy(), 5.0, 0.1), atol=1e-14)


@pytest.mark.parametrize("sigma_range", [0.1, None])
def test_filter_of_a_constant_map(sigma_range):
    c = 0.37
    g = torch.full((1, 5, 5), c, dtype=torch.float64)
    kernel = filter_kernels(g, 5.0, sigma_range)[0]
    spatial = torch.exp(-((torch.arange(5.0, dtype=torch.float64)[:, None] - 2.5) ** 2
                          + (torch.arange(5.0, dtype=torch.float64)[None, :] - 2.5) ** 2) / 50.0)
    torch.testing.assert_close(kernel, spatial / (spatial.sum() + 1e-6))  # R = 1
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for p in range(5):
        for q in range(5):
            for a in range(5):
                for b in range(5):
                    if 0 <= p + a - 2 < 5 and 0 <= q + b - 2 < 5:
                        expected[p, q] += c * kernel[a, b]
    torch.testing.assert_close(filter_maps(g, kernel[None])[0], expected, atol=1e-15, rtol=1e-12)


def test_gaussian_kernel_is_separable_and_fixed():
    g = torch.randn(3, 6, 7, dtype=torch.float64)
    kernels = filter_kernels(g, 2.0, None)
    assert torch.equal(kernels[0], kernels[1]) and torch.equal(kernels[0], kernels[2])
    assert torch.linalg.matrix_rank(kernels[0]).item() == 1


# ---- temperature ----


def test_temperature_limits():
    model = random_cnn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, info = CFCAM(model, "3")(x, return_info=True)
    A = model[:4](x).detach()
    valid = (info["labels"] != -1).to(A.dtype)
    for temperature in (math.inf, 1e12):
        cam = CFCAM(model, "3", temperature=temperature)(x)
        uniform = torch.relu((valid[:, :, None, None] * A).sum(1, keepdim=True) / valid.sum(1)[:, None, None, None])
        torch.testing.assert_close(cam, uniform / uniform.amax(dim=(2, 3), keepdim=True), atol=1e-9, rtol=0)
    cam = CFCAM(model, "3", temperature=1e-12)(x)
    best = info["weights"].masked_fill(valid == 0, -math.inf).argmax(dim=1)
    top = torch.relu(A[torch.arange(2), best])[:, None]
    torch.testing.assert_close(cam, top / top.amax(dim=(2, 3), keepdim=True), atol=1e-9, rtol=0)


def blob_model(seed=0):
    """8 Gaussian blobs at different places under GAP + Linear(8, 10) with weights N(0, 1e-4)."""
    gen = torch.Generator().manual_seed(seed)
    centres = [(1, 1), (1, 6), (6, 1), (6, 6), (3, 3), (2, 4), (5, 2), (4, 6)]
    grid = torch.arange(8, dtype=torch.float64)
    blobs = torch.stack([torch.exp(-((grid[:, None] - r) ** 2 + (grid[None, :] - c) ** 2) / 2.0)
                         for r, c in centres])
    head = nn.Linear(8, 10).double()
    with torch.no_grad():
        head.weight.copy_(1e-2 * torch.randn(10, 8, generator=gen, dtype=torch.float64))
        head.bias.copy_(torch.randn(10, generator=gen, dtype=torch.float64))
    return nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head), blobs[None]


def test_class_insensitivity_caveat_in_miniature():
    model, x = blob_model()
    at_t1 = class_sensitivity(CFCAM(model, "0"), model, x)
    at_small_t = class_sensitivity(CFCAM(model, "0", temperature=1e-4), model, x)
    assert at_t1.item() > 0.99
    assert at_small_t.item() < 0.9


# ---- batching, restore, dtypes ----


def test_batched_equals_per_sample():
    model = random_cnn(dtype=torch.float32)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 3, 3, 9, 1, 2])
    cam, info = CFCAM(model, "3")(x, target=target, return_info=True)
    for n in range(6):
        one, one_info = CFCAM(model, "3")(x[n:n + 1], target=int(target[n]), return_info=True)
        assert torch.equal(one_info["labels"][0], info["labels"][n])
        torch.testing.assert_close(one[0], cam[n], atol=1e-6, rtol=0)
    assert cam.dtype == torch.float32 and cam.shape == (6, 1, 8, 8)
    assert ((cam >= 0) & (cam <= 1)).all() and torch.allclose(cam.amax(dim=(2, 3)), torch.ones(6, 1))


def test_deterministic_and_leaves_the_model_as_it_was():
    model = random_cnn(dtype=torch.float32)
    model.train()
    model[0].weight.requires_grad_(False)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    explainer = CFCAM(model, model[3])
    first = explainer(x)
    assert torch.equal(first, explainer(x))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight)) and model[2].bias.grad is None
    assert not model[3]._forward_hooks and not x.requires_grad


def test_zero_map_stays_zero():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    cam = CFCAM(model, "1")(torch.randn(2, 1, 8, 8))
    assert torch.equal(cam, torch.zeros(2, 1, 8, 8))


# ---- few channels ----


def test_few_channels():
    gen = torch.Generator().manual_seed(6)
    A = torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    assert channel_labels(A[:, :1], 75.0, 25.0, 0.05).tolist() == [[-2]]       # R empty
    assert channel_labels(A[:, :2], 75.0, 25.0, 0.05).tolist()[0].count(-1) == 1  # |R| = 1: noise
    labels = channel_labels(A, 75.0, 25.0, 0.05)[0]                               # |R| = 2: one cluster
    assert sorted(labels.tolist()) == [-2, 0, 0]
    same = A[:, :1].expand(1, 4, 4, 4)
    assert channel_labels(same, 75.0, 25.0, 0.05).tolist() == [[-2] * 4]      # tied norms: all important
    for k in (1, 2, 3):
        model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(k * 16, 2)).double()
        cam, info = CFCAM(model, "0")(A[:, :k] + 0.01, return_info=True)
        G = model[2].weight[info["target"][0]].detach().view(k, 4, 4).numpy()
        ref_cam, ref_labels, _ = ref_cf_cam((A[0, :k] + 0.01).numpy(), G, (4, 4))
        assert info["labels"][0].tolist() == ref_labels.tolist()
        np.testing.assert_allclose(cam[0, 0].numpy(), ref_cam, atol=1e-6)


# ---- errors ----


def test_errors():
    model = random_cnn(dtype=torch.float32)
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="not in the model"):
        CFCAM(model, "features.9")
    with pytest.raises(ValueError, match="not a submodule"):
        CFCAM(model, nn.ReLU())
    with pytest.raises(TypeError, match="layer must be"):
        CFCAM(model, 3)
    with pytest.raises(ValueError, match="4-D tensor"):
        CFCAM(model, "6")(x)
    for kwargs, match in (({"importance_percentile": 101}, "importance_percentile"),
                          ({"eps_percentile": -1}, "eps_percentile"),
                          ({"min_samples_frac": 1.5}, "min_samples_frac"),
                          ({"sigma_spatial": 0}, "sigma_spatial"), ({"sigma_range": -0.1}, "sigma_range"),
                          ({"temperature": 0}, "temperature"), ({"temperature": math.nan}, "temperature"),
                          ({"filter": "median"}, "filter")):
        with pytest.raises(ValueError, match=match):
            CFCAM(model, "3", **kwargs)
    with pytest.raises(ValueError, match="target classes"):
        CFCAM(model, "3")(x, target=10)
    broken = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))
    with torch.no_grad():
        broken[0].bias[1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        CFCAM(broken, "1")(x)
    huge = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4, 2)).double()
    with pytest.raises(ValueError, match="overflow"):
        CFCAM(huge, "1")(torch.full((1, 1, 4, 4), 1e300, dtype=torch.float64))


def test_repr():
    assert "temperature=0.5" in repr(CFCAM(random_cnn(), "3", temperature=0.5))
