import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.explain import metrics
from normlab.explain.metrics import class_sensitivity, deletion_insertion, deletion_insertion_curves, pearson


def small_model(seed=0, channels=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 3, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                         nn.Linear(3 * 16, 4)).eval()


def inputs(n=3, channels=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 4, 4, generator=gen), torch.rand(n, 1, 4, 4, generator=gen)


def reference_auc(model, x, saliency, target, steps, baseline):
    """The official metrics/auc.py loop, one image and one step at a time (numpy), ties by pixel index."""
    dels, ins = [], []
    for i in range(len(x)):
        img = x[i:i + 1]
        flat = saliency[i].flatten().numpy()
        order = np.argsort(-flat, kind="stable")
        total = flat.size
        step_size = total // steps
        curves = ([], [])
        for k in range(steps + 1):
            num = total if k == steps else k * step_size
            mask = np.zeros(total, dtype=bool)
            mask[order[:num]] = True
            m = torch.from_numpy(mask).view(1, 1, *img.shape[-2:])
            for curve, image in zip(curves, (torch.where(m, baseline, img), torch.where(m, img, baseline))):
                with torch.no_grad():
                    curve.append(torch.softmax(model(image), 1)[0, target[i]].item())
        fractions = np.linspace(0, 1, steps + 1)
        dels.append(np.trapezoid(curves[0], fractions))
        ins.append(np.trapezoid(curves[1], fractions))
    return torch.tensor(dels), torch.tensor(ins)


@pytest.mark.parametrize("steps", [None, 5, 16, 1])
def test_matches_the_official_loop(steps):
    model = small_model()
    x, sal = inputs()
    with torch.no_grad():
        target = model(x).argmax(1)
    d, i = deletion_insertion(model, x, sal, steps=steps)
    rd, ri = reference_auc(model, x, sal, target, 16 if steps is None else steps, torch.tensor(0.0))
    torch.testing.assert_close(d, rd.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(i, ri.float(), atol=1e-6, rtol=0)


def test_target_baseline_and_curve_ends():
    model = small_model()
    x, sal = inputs()
    target = torch.tensor([3, 0, 2])
    base = torch.full_like(x, 0.5)
    fractions, dele, ins, counts = deletion_insertion_curves(model, x, sal, target, steps=None, baseline=base)
    assert counts.tolist() == list(range(17)) and fractions[0] == 0 and fractions[-1] == 1
    with torch.no_grad():
        p_full = torch.softmax(model(x), 1)[torch.arange(3), target]
        p_base = torch.softmax(model(base), 1)[torch.arange(3), target]
    torch.testing.assert_close(dele[:, 0], p_full)
    torch.testing.assert_close(dele[:, -1], p_base)
    torch.testing.assert_close(ins[:, 0], p_base)
    torch.testing.assert_close(ins[:, -1], p_full)
    rd, ri = reference_auc(model, x, sal, target, 16, base[:1])
    d, i = deletion_insertion(model, x, sal[:, 0], target, baseline=0.5)  # (N, H, W) maps accepted too
    torch.testing.assert_close(d, rd.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(i, ri.float(), atol=1e-6, rtol=0)


def test_ties_broken_by_pixel_index():
    """A model whose logit 0 is the sum of the pixels 0..3: with a constant map the first pixels go first."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, :4] = 5.0
    x = torch.ones(1, 1, 4, 4)
    _, dele, _, _ = deletion_insertion_curves(model, x, torch.zeros(1, 1, 4, 4), target=0)
    assert (dele[0, :5].diff() < 0).all() and (dele[0, 4:] == dele[0, 4]).all()


def test_chunking_does_not_change_the_result(monkeypatch):
    model = small_model()
    x, sal = inputs(4)
    whole = deletion_insertion(model, x, sal)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7 * x[0].numel())
    chunked = deletion_insertion(model, x, sal)
    torch.testing.assert_close(whole, chunked)


def test_perfect_and_adversarial_orders():
    """Ranking by the model's own evidence beats the reverse order on both curves."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.linspace(-1, 1, 16), torch.zeros(16)]))
    x = torch.ones(1, 1, 4, 4)
    good = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    d_good, i_good = deletion_insertion(model, x, good, target=0)
    d_bad, i_bad = deletion_insertion(model, x, -good, target=0)
    assert d_good < d_bad and i_good > i_bad


def test_state_restored_and_errors():
    model = small_model().train()
    x, sal = inputs()
    deletion_insertion(model, x, sal)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"saliency must have shape \(3, 1, 4, 4\)"):
        deletion_insertion(model, x, torch.rand(3, 1, 2, 2))
    with pytest.raises(ValueError, match="steps must be an int in 1..16"):
        deletion_insertion(model, x, sal, steps=17)
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(model, x, sal, steps=0)
    with pytest.raises(ValueError, match="0..3"):
        deletion_insertion(model, x, sal, target=4)


def test_pearson_matches_numpy_and_flags_constant_maps():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 5, 5, generator=gen), torch.rand(3, 1, 5, 5, generator=gen)
    b[1] = 2 * a[1] + 1
    a[2] = 0.5
    r = pearson(a, b)
    assert r.dtype == torch.float64
    assert r[0].item() == pytest.approx(np.corrcoef(a[0].flatten(), b[0].flatten())[0, 1], abs=1e-12)
    assert r[1].item() == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(r[2].item())


def test_class_sensitivity_uses_the_max_and_min_logit_classes():
    model = small_model()
    x, _ = inputs(4)
    with torch.no_grad():
        logits = model(x)
    calls = []
    gen = torch.Generator().manual_seed(5)
    table = torch.rand(4, 1, 4, 4, generator=gen)  # one fixed map per class
    table[2] = 1.0  # class 2's map is constant

    def fake(xs, target):
        calls.append(target.clone())
        return table[target] + 0.01 * xs[:, :1]

    r = class_sensitivity(fake, model, x)
    assert torch.equal(calls[0], logits.argmax(1)) and torch.equal(calls[1], logits.argmin(1))
    expected = pearson(fake(x, calls[0]), fake(x, calls[1]))
    torch.testing.assert_close(r, expected, equal_nan=True)
    assert r.shape == (4,)


def test_class_sensitivity_needs_two_classes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match="class_sensitivity needs"):
        class_sensitivity(lambda xs, t: xs, model, torch.rand(2, 1, 4, 4))
