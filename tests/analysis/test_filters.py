import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.analysis import filters as fl


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)


def digits_images(n=128):
    """The first ``n`` scikit-learn digits ``(n, 1, 8, 8)``, pixel values 0-16."""
    return _digits()[:n].clone()


# ------------------------------------------------------------------------------------ initialisers


def test_wrappers_equal_torch_init_bit_exactly():
    shape = (16, 8, 3, 3)
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    ref = torch.empty(shape)
    assert torch.equal(fl.gaussian_(torch.empty(shape), generator=gen(3)),
                       nn.init.normal_(ref, 0.0, 0.01, generator=gen(3)))
    assert torch.equal(fl.gaussian_(torch.empty(shape), std=0.2, generator=gen(3)),
                       nn.init.normal_(ref, 0.0, 0.2, generator=gen(3)))
    assert torch.equal(fl.lecun_uniform_(torch.empty(shape), generator=gen(4)),
                       nn.init.uniform_(ref, -2.4 / fan_in, 2.4 / fan_in, generator=gen(4)))
    assert torch.equal(fl.lecun_uniform_(torch.empty(shape), scale=1.0, generator=gen(4)),
                       nn.init.uniform_(ref, -1.0 / fan_in, 1.0 / fan_in, generator=gen(4)))
    assert torch.equal(fl.lecun_normal_(torch.empty(shape), generator=gen(5)),
                       nn.init.kaiming_normal_(ref, nonlinearity="linear", generator=gen(5)))


REFERENCE = {
    "gaussian": lambda w, g: nn.init.normal_(w, 0.0, 0.01, generator=g),
    "xavier_uniform": lambda w, g: nn.init.xavier_uniform_(w, generator=g),
    "xavier_normal": lambda w, g: nn.init.xavier_normal_(w, generator=g),
    "he_normal": lambda w, g: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=g),
    "he_uniform": lambda w, g: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu", generator=g),
    "orthogonal": lambda w, g: nn.init.orthogonal_(w, generator=g),
}


@pytest.mark.parametrize("scheme", sorted(REFERENCE))
def test_apply_init_equals_torch_init_in_module_order(scheme):
    model, ref = small_net(), small_net()
    names = fl.apply_init(model, scheme, generator=gen(7))
    assert names == ["0", "2", "5", "9"]
    g = gen(7)
    for name in names:
        REFERENCE[scheme](ref.get_submodule(name).weight.data, g)
    for name in names:
        assert torch.equal(model.get_submodule(name).weight, ref.get_submodule(name).weight), name
        assert torch.count_nonzero(model.get_submodule(name).bias) == 0


def test_apply_init_passes_options_and_keeps_bias_on_request():
    model, ref = small_net(), small_net()
    bias = model[0].bias.detach().clone()
    fl.apply_init(model, "he_normal", mode="fan_out", zero_bias=False, modules=(nn.Conv2d,), generator=gen(1))
    assert torch.equal(model[0].bias, bias)
    g = gen(1)
    for i in (0, 2, 5):
        nn.init.kaiming_normal_(ref[i].weight.data, mode="fan_out", nonlinearity="relu", generator=g)
        assert torch.equal(model[i].weight, ref[i].weight)
    fl.apply_init(model, "orthogonal", gain=math.sqrt(2), modules=(nn.Linear,), generator=gen(2))
    expected = nn.init.orthogonal_(torch.empty(10, 12), math.sqrt(2), generator=gen(2))
    assert torch.equal(model[9].weight, expected)


def test_moments_of_the_sheet():
    shape = (256, 128, 3, 3)
    fan_in = 128 * 9
    w = fl.lecun_uniform_(torch.empty(shape), generator=gen(0))
    assert w.abs().max() <= 2.4 / fan_in
    assert w.std().item() == pytest.approx(2.4 / (fan_in * math.sqrt(3)), rel=0.02)
    conv = nn.Conv2d(128, 256, 3)
    fl.apply_init(nn.Sequential(conv), "he_normal", generator=gen(1))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    w = torch.empty(shape)
    assert fl.gaussian_(w, generator=gen(2)).std().item() == pytest.approx(0.01, rel=0.02)
    assert fl.lecun_normal_(w, generator=gen(3)).std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.02)


def test_depthwise_fan_in_uses_the_stored_weight_shape():
    conv = nn.Conv2d(64, 64, 3, groups=64)
    assert fl._fans(conv.weight) == nn.init._calculate_fan_in_and_fan_out(conv.weight) == (9, 576)
    w = fl.lecun_uniform_(conv.weight.data, generator=gen(0))
    assert 0.9 * 2.4 / 9 < w.abs().max() <= 2.4 / 9


def test_orthogonal_rows_and_columns():
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.Conv2d(2, 32, 2))  # 64 <= 144 rows; 32 > 8 columns
    fl.apply_init(model, "orthogonal", generator=gen(0))
    rows = model[0].weight.detach().reshape(64, -1).double()
    torch.testing.assert_close(rows @ rows.T, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)
    cols = model[1].weight.detach().reshape(32, -1).double()
    torch.testing.assert_close(cols.T @ cols, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert fl.orthogonality_error(model[0].weight) < 1e-5
    assert fl.orthogonality_error(model[1].weight) < 1e-5
    fl.apply_init(model, "orthogonal", gain=math.sqrt(2), generator=gen(0))
    assert fl.orthogonality_error(model[0].weight) < 1e-5  # scale-free


def test_orthogonality_error_of_gaussian_matrices():
    square = torch.randn(256, 256, generator=gen(0), dtype=torch.float64)
    assert fl.orthogonality_error(square) == pytest.approx(1.0, abs=0.03)
    wide = torch.randn(32, 512, generator=gen(1), dtype=torch.float64)
    assert fl.orthogonality_error(wide) == pytest.approx(math.sqrt(31 / 512), rel=0.1)
    # the formula written out on the row-normalised matrix
    unit = wide / wide.norm(dim=1, keepdim=True)
    expected = np.linalg.norm((unit @ unit.T - torch.eye(32, dtype=torch.float64)).numpy()) / math.sqrt(32)
    assert fl.orthogonality_error(wide) == pytest.approx(expected, rel=1e-12)
    assert fl.orthogonality_error(wide.T) == pytest.approx(expected, rel=1e-12)


def test_orthogonal_half_precision_and_errors():
    conv = nn.Conv2d(4, 6, 3).to(torch.bfloat16)
    fl.apply_init(nn.Sequential(conv), "orthogonal", generator=gen(0))
    expected = nn.init.orthogonal_(torch.empty(6, 4, 3, 3), generator=gen(0)).to(torch.bfloat16)
    assert conv.weight.dtype == torch.bfloat16 and torch.equal(conv.weight, expected)
    with pytest.raises(ValueError, match="orthogonal.*shape \\(5,\\)"):
        fl._orthogonal_(torch.empty(5))
    with pytest.raises(ValueError, match="orthogonal.*shape \\(0, 3\\)"):
        fl._orthogonal_(torch.empty(0, 3))


def test_init_errors():
    with pytest.raises(ValueError, match="unknown scheme 'kaiming'.*he_normal"):
        fl.apply_init(small_net(), "kaiming")
    with pytest.raises(ValueError, match="no module of type"):
        fl.apply_init(nn.Sequential(nn.ReLU()), "he_normal")
    with pytest.raises(TypeError, match="tuple of nn.Module classes"):
        fl.apply_init(small_net(), "he_normal", modules=nn.Conv2d)
    with pytest.raises(ValueError, match="lecun_uniform_.*at least 2 dims"):
        fl.lecun_uniform_(torch.empty(7))
    with pytest.raises(ValueError, match="std must be >= 0"):
        fl.gaussian_(torch.empty(3, 3), std=-1.0)


# -------------------------------------------------------------------------------------------- LSUV


def output_variances(model, batch, types=(nn.Conv2d, nn.Linear)):
    """Unbiased variance of every conv/linear output, by forward hooks (independent of lsuv_)."""
    out = {}

    def hook(name):
        def record(module, args, output):
            out.setdefault(name, torch.var(output).item())
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, types)]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return out


def test_lsuv_unit_variance_and_restored_modes():
    images = digits_images() / 16
    model = nn.Sequential(small_net(), nn.Dropout(0.5))
    model.train()
    model[0][1].eval()  # a mixed-mode model keeps each module's mode
    result = fl.lsuv_(model, images, generator=gen(0))
    assert list(result) == ["0.0", "0.2", "0.5", "0.9"]
    assert model.training and model[1].training and not model[0][1].training and model[0][0].training
    model.eval()
    measured = output_variances(model, images)
    for name, var in measured.items():
        assert 0.95 <= var <= 1.05, (name, var)
        assert result[name] == pytest.approx(var, rel=1e-4)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0


def test_lsuv_is_deterministic_per_generator():
    images = digits_images() / 16
    a, b, c = small_net(), small_net(), small_net()
    fl.lsuv_(a, images, generator=gen(1))
    fl.lsuv_(b, images, generator=gen(1))
    fl.lsuv_(c, images, generator=gen(2))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_lsuv_starts_from_an_orthonormal_init_and_only_rescales():
    images = digits_images() / 16
    model = small_net()
    fl.lsuv_(model, images, generator=gen(3))
    ref = small_net()
    fl.apply_init(ref, "orthogonal", generator=gen(3))
    for i in (0, 2, 5, 9):
        w, w0 = model[i].weight.detach().double(), ref[i].weight.detach().double()
        scale = (w.norm() / w0.norm()).item()
        torch.testing.assert_close(w, scale * w0, rtol=1e-5, atol=1e-7)


class Offset(nn.Linear):
    """A layer whose output variance has a floor that no weight scale can remove."""

    def forward(self, x):
        return super().forward(x) + 10 * x[:, :1]


def test_lsuv_reports_non_convergence():
    x = torch.randn(128, 4, generator=gen(0))
    model = nn.Sequential(Offset(4, 3))
    with pytest.warns(UserWarning, match="after 3 iterations for \\['0'\\]"):
        result = fl.lsuv_(model, x, max_iter=3, modules=(Offset,), generator=gen(0))
    assert abs(result["0"] - 1) >= 0.05


def test_lsuv_dead_layer_small_batch_and_uncalled_layer():
    with pytest.raises(RuntimeError, match="variance of layer '0' is 0.0"):
        fl.lsuv_(small_net(), torch.zeros(64, 1, 8, 8), generator=gen(0))
    with pytest.warns(UserWarning, match="1 sample"):
        fl.lsuv_(small_net(), digits_images(1) / 16, generator=gen(0))

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match="never called.*spare"):
        result = fl.lsuv_(WithSpare(), torch.randn(64, 4, generator=gen(0)), generator=gen(0))
    assert list(result) == ["used"]
    with pytest.raises(ValueError, match="tol"):
        fl.lsuv_(small_net(), digits_images(64), tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        fl.lsuv_(small_net(), digits_images(64), max_iter=0)


def test_lsuv_bfloat16():
    model = small_net().to(torch.bfloat16)
    images = (digits_images() / 16).to(torch.bfloat16)
    result = fl.lsuv_(model, images, generator=gen(0))
    assert model[0].weight.dtype == torch.bfloat16
    assert all(abs(v - 1) < 0.05 for v in result.values())


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_patch_filters_unit_norm_and_deterministic():
    images = digits_images(400)
    a = fl.kmeans_patch_filters(images, 8, 3, n_patches=1000, seed=0)
    b = fl.kmeans_patch_filters(images, 8, 3, n_patches=1000, seed=0)
    c = fl.kmeans_patch_filters(images, 8, 3, n_patches=1000, seed=1)
    assert a.shape == (8, 1, 3, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a.flatten(1).norm(dim=1), torch.ones(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    rgb = fl.kmeans_patch_filters(torch.rand(20, 3, 8, 8, generator=gen(0)), 4, 2, n_patches=500,
                                  contrast_eps=0.01, whiten=False)
    assert rgb.shape == (4, 3, 2, 2)


def test_kmeans_recovers_two_patterns():
    vertical = torch.tensor([1.0, -1.0]).repeat(4).repeat(8, 1)  # 8x8 stripes along columns
    patterns = torch.stack([vertical, vertical.T])  # orthogonal, zero mean
    noise = 0.05 * torch.randn(200, 8, 8, generator=gen(0))
    images = (patterns[torch.arange(200) % 2] + noise).unsqueeze(1)
    unit = F.normalize(patterns.flatten(1), dim=1)
    raw = fl.kmeans_patch_filters(images, 2, 8, n_patches=400, whiten=False, contrast_eps=0.01).flatten(1)
    cos = raw @ unit.T
    assert cos.diagonal().min() > 0.99 or cos.flip(1).diagonal().min() > 0.99
    # whitening centres the patches first: the clusters become +-(v - h)/2, an eigenvector of the covariance,
    # so the folded filters C P are +-(v - h)/|v - h|
    white = fl.kmeans_patch_filters(images, 2, 8, n_patches=400, whiten=True, contrast_eps=0.01).flatten(1)
    diff = F.normalize(unit[0] - unit[1], dim=0)
    assert (white @ diff).abs().min() > 0.99 and (white[0] @ white[1]).item() < -0.99


def test_kmeans_errors():
    with pytest.raises(ValueError, match="images must be a tensor \\(N, C, H, W\\)"):
        fl.kmeans_patch_filters(torch.zeros(10, 8, 8), 4, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        fl.kmeans_patch_filters(torch.zeros(10, 1, 8, 8), 4, 9)
    with pytest.raises(ValueError, match="out_channels"):
        fl.kmeans_patch_filters(torch.zeros(10, 1, 8, 8), 40, 3, n_patches=20)


# --------------------------------------------------------------------------------------- diagnostics


def test_filter_norms_and_dead_filters():
    w = torch.randn(6, 3, 3, 3, generator=gen(0))
    w[2] = 0
    w[4] = 1e-12
    torch.testing.assert_close(fl.filter_norms(w), torch.sqrt((w ** 2).sum((1, 2, 3))))
    assert fl.dead_filters(w).tolist() == [2, 4]
    assert fl.dead_filters(w, tol=0).tolist() == [2]
    assert fl.dead_filters(torch.zeros(3, 4)).tolist() == [0, 1, 2]
    half = fl.filter_norms(w.to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, fl.filter_norms(w), rtol=1e-2, atol=1e-6)


def test_filter_redundancy():
    w = torch.randn(5, 2, 3, 3, generator=gen(0), dtype=torch.float64)
    w[3] = w[1]
    w[4] = -2 * w[0]
    red = fl.filter_redundancy(w)
    assert red.max_abs == pytest.approx(1.0)
    flat = w.flatten(1).numpy()
    cos = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    np.testing.assert_allclose(red.similarity.numpy(), cos, atol=1e-12)
    pairs = np.abs(cos[np.triu_indices(5, 1)])
    assert red.fraction == pytest.approx(float((pairs > 0.9).mean()))
    assert red.fraction == pytest.approx(2 / 10)
    assert fl.filter_redundancy(w, threshold=0.0).fraction == 1.0
    with pytest.raises(ValueError, match=">= 2 filters"):
        fl.filter_redundancy(torch.randn(1, 9))


def test_singular_values_and_stable_rank():
    w = torch.randn(8, 4, 3, 3, generator=gen(0), dtype=torch.float64)
    s = np.linalg.svd(w.reshape(8, -1).numpy(), compute_uv=False)
    np.testing.assert_allclose(fl.singular_values(w).numpy(), s, rtol=1e-10)
    assert fl.stable_rank(w) == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-10)
    rank_one = torch.outer(torch.randn(6, generator=gen(1)), torch.randn(10, generator=gen(2)))
    assert fl.stable_rank(rank_one) == pytest.approx(1.0, rel=1e-5)
    assert fl.stable_rank(torch.eye(5)) == pytest.approx(5.0)


def test_spectral_energy_on_constructed_filters():
    constant = torch.ones(1, 3, 3, 3)
    checker4 = (-1.0) ** (torch.arange(4)[:, None] + torch.arange(4)[None, :]).float()
    checker3 = (-1.0) ** (torch.arange(3)[:, None] + torch.arange(3)[None, :]).float()
    assert fl.spectral_energy(constant).item() == pytest.approx(0.0, abs=1e-7)
    assert fl.spectral_energy(checker4.reshape(1, 1, 4, 4)).item() == pytest.approx(1.0)
    assert fl.spectral_energy(checker3.reshape(1, 1, 3, 3)).item() == pytest.approx(80 / 81)
    assert math.isnan(fl.spectral_energy(torch.zeros(1, 1, 3, 3)).item())


def test_spectral_energy_matches_closed_form_and_numpy_fft():
    w = torch.randn(5, 3, 3, 3, generator=gen(0), dtype=torch.float64)
    dc = (w.sum((2, 3)) ** 2).sum(1)
    closed = 1 - dc / (9 * (w ** 2).sum((1, 2, 3)))
    torch.testing.assert_close(fl.spectral_energy(w), closed)
    power = np.abs(np.fft.fft2(w.numpy(), s=(8, 8))) ** 2
    power = power.sum(1)
    expected = 1 - power[:, 0, 0] / power.sum((1, 2))
    np.testing.assert_allclose(fl.spectral_energy(w, pad_to=8).numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="pad_to"):
        fl.spectral_energy(w, pad_to=2)
    with pytest.raises(ValueError, match=">= 3 dims"):
        fl.spectral_energy(torch.randn(4, 9))


def test_receptive_field_of_the_sheet():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    steps = fl.receptive_field(model, (1, 1, 16, 16))
    assert [s.name for s in steps] == ["input", "0", "2", "5", "6"]
    assert [s.rf[0] for s in steps] == [1, 3, 5, 6, 10]
    assert [s.jump[0] for s in steps] == [1, 1, 1, 2, 2]
    assert [s.size for s in steps] == [(16, 16), (14, 14), (12, 12), (6, 6), (4, 4)]
    assert model.training and model[3].num_batches_tracked.item() == 0


def test_receptive_field_dilation_strides_and_nesting():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, (3, 5), stride=(1, 2)), nn.GELU()),
                          nn.Conv2d(2, 2, 3, dilation=2), nn.AvgPool2d(3, stride=1), nn.AdaptiveAvgPool2d(1))
    steps = fl.receptive_field(model, (2, 1, 32, 32))
    assert [s.name for s in steps] == ["input", "0.0", "1", "2"]
    # axis 0: 1 -> 3 -> 3 + 2*2*1 = 7 -> 7 + 2*1 = 9; axis 1: 1 -> 5 (j 2) -> 5 + 2*2*2 = 13 -> 13 + 2*2 = 17
    assert [s.rf for s in steps] == [(1, 1), (3, 5), (7, 13), (9, 17)]
    assert [s.jump for s in steps] == [(1, 1), (1, 2), (1, 2), (1, 2)]


def test_receptive_field_errors():
    with pytest.raises(TypeError, match="nn.Sequential"):
        fl.receptive_field(small_net()[0], (1, 1, 8, 8))
    with pytest.raises(TypeError, match="'1'.*Upsample"):
        fl.receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2)), (1, 1, 8, 8))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        fl.receptive_field(nn.Sequential(nn.ConvTranspose2d(1, 1, 3)), (1, 1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        fl.receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3)), (8, 8))


def bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_signal_propagation_against_a_manual_pass():
    torch.manual_seed(0)
    model = bn_net().double().eval()
    x = torch.randn(16, 1, 6, 6, generator=gen(1), dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen(2))
    stats = fl.signal_propagation(model, x, y)
    h1 = model[:3](x)
    out = model(x)
    h2 = model[:6](x)
    assert [a[0] for a in stats.activations] == ["2", "5"]
    assert stats.activations[0][1:] == pytest.approx((h1.mean().item(), h1.std().item()), rel=1e-12)
    assert stats.activations[1][1:] == pytest.approx((h2.mean().item(), h2.std().item()), rel=1e-12)
    params = dict(model.named_parameters())
    names = ["0.weight", "4.weight", "8.weight"]

    def loss_of(*ws):
        full = dict(params, **dict(zip(names, ws)))
        return F.cross_entropy(torch.func.functional_call(model, full, (x,)), y)

    grads = torch.autograd.functional.jacobian(loss_of, tuple(params[n].detach() for n in names))
    assert list(stats.grad_std) == names
    for name, g in zip(names, grads):
        assert stats.grad_std[name] == pytest.approx(g.std().item(), rel=1e-10)
    assert stats.loss == pytest.approx(F.cross_entropy(out, y).item())
    no_target = fl.signal_propagation(model, x)
    assert no_target.loss == pytest.approx((out ** 2).mean().item() / 2)


def test_signal_propagation_restores_everything():
    model = bn_net().train()
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.full_like(model[4].weight, 3.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 6, 6, generator=gen(0))
    rng = torch.get_rng_state()
    stats = fl.signal_propagation(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert model[0].weight.grad is None and torch.equal(model[4].weight.grad, torch.full_like(model[4].weight, 3.0))
    assert model.training and math.isfinite(stats.grad_std["0.weight"])
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared)
    assert [a[0] for a in fl.signal_propagation(twice, torch.randn(4, 3)).activations] == ["1", "1"]
    with pytest.raises(ValueError, match="no conv or linear weight"):
        fl.signal_propagation(nn.Sequential(nn.ReLU()), x)


def test_diagnostics_do_not_touch_weights():
    conv = nn.Conv2d(3, 6, 3)
    before = conv.weight.detach().clone()
    for fn in (fl.filter_norms, fl.dead_filters, fl.filter_redundancy, fl.orthogonality_error, fl.stable_rank,
               fl.singular_values, fl.spectral_energy):
        fn(conv.weight)
    assert torch.equal(conv.weight, before) and conv.weight.grad is None
    with pytest.raises(TypeError, match="weight tensor"):
        fl.filter_norms(conv)
