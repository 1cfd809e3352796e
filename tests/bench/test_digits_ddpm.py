"""The class-conditional digits DDPM of bench/tasks.py (adaptive_guidance.md)."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from normlab.bench.tasks import (DIGITS_NULL_LABEL, DigitsDenoiser, digits_classifier_predict, digits_pixels,
                                 train_digits_ddpm)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixels_are_scaled_to_minus_one_one():
    x, y = digits_pixels()
    data = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and torch.equal(y, torch.tensor(data.target))
    torch.testing.assert_close(x, torch.tensor(data.data / 8 - 1, dtype=torch.float32))
    assert x.min() == -1 and x.max() == 1


def test_denoiser_is_the_sheet_mlp_on_x_and_summed_embeddings():
    torch.manual_seed(0)
    model = DigitsDenoiser(100)
    assert model.label_emb.num_embeddings == 11 and model.time_emb.num_embeddings == 100
    assert [tuple(m.weight.shape) for m in model.net if isinstance(m, torch.nn.Linear)] == \
        [(256, 192), (256, 256), (64, 256)]
    assert all(isinstance(model.net[i], torch.nn.SiLU) for i in (1, 3))
    x, n, c = torch.randn(3, 64), torch.tensor([1, 50, 100]), torch.tensor([0, 9, DIGITS_NULL_LABEL])
    e = model.label_emb.weight[c] + model.time_emb.weight[n - 1]
    h = F.silu(model.net[0](torch.cat([x, e], 1)))
    expected = model.net[4](F.silu(model.net[2](h)))
    torch.testing.assert_close(model(x, n, c), expected)
    torch.testing.assert_close(model(x, n, DIGITS_NULL_LABEL), model(x, n, torch.full((3,), 10)))


def test_training_is_seeded_learns_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model, sched = train_digits_ddpm(0, steps=60)
    assert torch.equal(torch.rand(1), before)
    again, _ = train_digits_ddpm(0, steps=60)
    other, _ = train_digits_ddpm(1, steps=60)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.net[0].weight, other.net[0].weight)
    assert not model.training and sched.num_steps == 100
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.05)
    # the epsilon loss falls below the trivial predictor's (1.0) after 60 steps
    x, y = digits_pixels()
    gen = torch.Generator().manual_seed(9)
    n = sched.sample_steps(512, gen)
    noise = torch.randn(512, 64, generator=gen)
    with torch.no_grad():
        loss = F.mse_loss(model(sched.q_sample(x[:512], n, noise), n, y[:512]), noise).item()
    assert loss < 0.8


def test_classifier_recognises_real_digits_and_checks_shape():
    x, y = digits_pixels()
    pred = digits_classifier_predict(x)
    assert pred.dtype == torch.long and (pred == y).double().mean() > 0.98
    assert (digits_classifier_predict(torch.full((2, 64), -1.0)) >= 0).all()
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        digits_classifier_predict(torch.zeros(2, 8, 8))
