import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.training.pada import (GradNormCategorical, GradNormImportanceSampler, IndexedDataset,
                                   per_sample_grad_norm)


# --- per-sample gradient norms -----------------------------------------------------------------------------
def test_logit_proxy_equals_autograd_norm_of_ce_gradient():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(12, 7, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (12,), generator=gen)
    expected = torch.stack([_ce_logit_grad(z[i], y[i]).norm() for i in range(12)])
    got = per_sample_grad_norm(z, y)
    assert got.dtype == torch.float64 and got.shape == (12,)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def _ce_logit_grad(zi, yi):
    zi = zi.clone().requires_grad_()
    return torch.autograd.grad(F.cross_entropy(zi[None], yi[None]), zi)[0]


def test_logit_proxy_half_input_and_bound():
    z = torch.randn(5, 3).half()
    out = per_sample_grad_norm(z, torch.tensor([0, 1, 2, 0, 1]))
    assert out.dtype == torch.float32 and bool((out <= math.sqrt(2) + 1e-6).all())


def test_exact_equals_closed_form_for_linear_softmax():
    gen = torch.Generator().manual_seed(1)
    model = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=gen)
    got = per_sample_grad_norm(model, F.cross_entropy, x, y, kind="exact")
    p = torch.softmax(model(x), 1).detach()
    expected = (p - F.one_hot(y, 4).double()).norm(dim=1) * x.norm(dim=1)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_exact_matches_per_example_autograd_and_restores_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[0].weight.requires_grad_(False)
    model.eval()
    grads_before = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads_before):
        p.grad = g.clone()
    params_before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    got = per_sample_grad_norm(model, F.cross_entropy, x, y, kind="exact")
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), trainable)]).norm() for i in range(6)])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    only_last = per_sample_grad_norm(model, F.cross_entropy, x, y, kind="exact", params=["2.weight", model[2].bias])
    expected_last = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [model[2].weight, model[2].bias])]).norm() for i in range(6)])
    torch.testing.assert_close(only_last, expected_last, atol=1e-12, rtol=0)
    for p, before, g in zip(model.parameters(), params_before, grads_before):
        assert torch.equal(p, before) and torch.equal(p.grad, g)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad and not model.training


def test_grad_norm_errors():
    z = torch.randn(3, 4)
    with pytest.raises(TypeError, match="integer"):
        per_sample_grad_norm(z, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        per_sample_grad_norm(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        per_sample_grad_norm(z, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="kind"):
        per_sample_grad_norm(z, torch.tensor([0, 1, 2]), kind="fisher")
    with pytest.raises(TypeError, match="nn.Module"):
        per_sample_grad_norm(z, F.cross_entropy, z, torch.tensor([0, 1, 2]), kind="exact")
    with pytest.raises(ValueError, match="not one"):
        per_sample_grad_norm(nn.Linear(4, 2), F.cross_entropy, z, torch.tensor([0, 1, 0]), kind="exact",
                             params=["nope"])


# --- data sampler ------------------------------------------------------------------------------------------
def test_epoch_zero_permutation_epoch_one_uniform_then_lagged_tau():
    n, e = 50, 5
    gen = torch.Generator().manual_seed(3)
    s = GradNormImportanceSampler(n, e, generator=gen)
    assert sorted(s) == list(range(n))  # epoch 0 by default
    s.set_epoch(0)
    assert sorted(s.indices.tolist()) == list(range(n))
    scores = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    s.update(torch.arange(n), scores)
    s.set_epoch(1)
    assert torch.equal(s.probabilities, torch.full((n,), 1.0 / n, dtype=torch.float64))
    for epoch in range(2, e + 1):
        visited = torch.arange(0, n, 2)
        s.update(visited, scores[visited])
        s.set_epoch(epoch)
        tau = (epoch - 1) / e
        masked = torch.zeros(n, dtype=torch.float64)
        masked[visited] = scores[visited]
        expected = tau * masked / masked.sum() + (1 - tau) / n
        torch.testing.assert_close(s.probabilities, expected, atol=1e-15, rtol=0)
        assert abs(float(s.probabilities.sum()) - 1) < 1e-12
        assert torch.allclose(s.probabilities[1::2], torch.tensor((1 - tau) / n, dtype=torch.float64), atol=1e-18)


def test_constant_tau_one_gives_normalised_scores():
    s = GradNormImportanceSampler(4, 3, tau_schedule=lambda e: 1.0)
    s.update(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    s.set_epoch(1)
    torch.testing.assert_close(s.probabilities, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
                               atol=1e-15, rtol=0)


def test_drawn_indices_match_multinomial_with_the_same_generator():
    gen = torch.Generator().manual_seed(11)
    s = GradNormImportanceSampler(30, 4, generator=gen)
    s.set_epoch(0)
    s.update(torch.arange(30), torch.linspace(0.1, 3.0, 30))
    s.update(torch.arange(30), torch.linspace(3.0, 0.1, 30))
    s.update(torch.arange(30), torch.linspace(0.1, 3.0, 30))
    s.set_epoch(1)
    s.update(torch.arange(30), torch.linspace(0.1, 3.0, 30) ** 2)
    state = gen.get_state()
    s.set_epoch(2)
    ref = torch.Generator()
    ref.set_state(state)
    assert torch.equal(s.indices, torch.multinomial(s.probabilities, 30, replacement=True, generator=ref))
    assert len(s) == 30


def test_smoothing_pairwise_mean_and_repeats_in_batch_order():
    s = GradNormImportanceSampler(5, 3)
    s.update(torch.tensor([2]), torch.tensor([1.0]))
    s.update(torch.tensor([2, 4]), torch.tensor([3.0, 7.0]))
    assert s.scores[2] == 2.0 and s.scores[4] == 7.0
    s.update(torch.tensor([0, 3, 0, 2, 0]), torch.tensor([1.0, 5.0, 3.0, 4.0, 6.0]))
    assert s.scores[0] == ((1.0 + 3.0) / 2 + 6.0) / 2 and s.scores[3] == 5.0 and s.scores[2] == 3.0
    s.update(torch.tensor([], dtype=torch.long), torch.tensor([]))  # empty batch: no-op
    assert s.scores[1] == 0 and not s.seen[1]
    s.update(torch.tensor([1]), torch.tensor([0.0]))  # an exact 0 is a visit
    s.update(torch.tensor([1]), torch.tensor([4.0]))
    assert s.scores[1] == 2.0


def test_path_accumulator_is_an_ema_from_zero():
    c = GradNormCategorical(3, 4)
    c.update(torch.tensor([1]), torch.tensor([1.0]))
    c.update(torch.tensor([1]), torch.tensor([3.0]))
    assert c.accumulator.tolist() == [0.0, 1.75, 0.0]
    c.update(torch.tensor([0, 0, 2]), torch.tensor([2.0, 4.0, 0.0]))  # op 0 twice: mean of its edges
    assert c.accumulator.tolist() == [1.5, 1.75, 0.0]
    c.set_epoch(1)
    assert torch.equal(c.accumulator, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(c.probabilities, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_parity_with_a_transcription_of_the_reference_update():
    epochs, n, batch, cells, edges, ops = 6, 1000, 64, 15, 6, 5
    param_ops = (2, 3)  # none, skip, conv1x1, conv3x3, avgpool
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    data = GradNormImportanceSampler(n, epochs, generator=gen)
    paths = GradNormCategorical(ops, epochs)
    ref_p = np.full(n, 1.0 / n)
    ref_q = np.full(ops, 1.0 / ops)
    for epoch in range(epochs + 1):
        data.set_epoch(epoch)
        paths.set_epoch(epoch)
        assert np.abs(data.probabilities.numpy() - ref_p).max() <= 1e-18
        assert np.abs(paths.probabilities.numpy() - ref_q).max() <= 2.5e-16  # ~2 ulp: summation order
        if epoch == epochs:
            break
        scores, g = np.zeros(n), np.zeros(ops)
        for idx in data.indices.split(batch):
            proxies = rng.uniform(0.01, 1.4, len(idx))
            arch = paths.sample(edges, generator=gen).numpy()
            norms = rng.uniform(0.1, 2.0, (cells, edges))
            data.update(idx, torch.from_numpy(proxies))
            edge_norms = np.where(np.isin(arch, param_ops), norms.sum(0), 0.0)
            paths.update(torch.from_numpy(arch), torch.from_numpy(edge_norms))
            for i, v in zip(idx.tolist(), proxies):  # the reference, item by item
                scores[i] = (scores[i] + v) / 2 if scores[i] != 0 else v
            for k in param_ops:
                on = arch == k
                if on.any():
                    new = sum(norms[c, m] for c in range(cells) for m in range(edges) if on[m])
                    g[k] = (g[k] + new / on.sum()) / 2
        tau = epoch / epochs
        ref_p = tau * scores / scores.sum() + (1 - tau) / n
        ref_q = tau * g / g.sum() + (1 - tau) / ops


def test_update_uses_dataset_indices_through_a_shuffled_loader():
    x = torch.arange(20, dtype=torch.float64)[:, None]
    y = torch.zeros(20, dtype=torch.long)
    sampler = GradNormImportanceSampler(20, 3, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=6, sampler=sampler)
    sampler.set_epoch(0)
    for xb, yb, idx in loader:
        assert torch.equal(xb[:, 0].long(), idx)
        sampler.update(idx, xb[:, 0] + 1)  # score = dataset index + 1
    assert torch.equal(sampler.scores, torch.arange(20, dtype=torch.float64) + 1)
    assert IndexedDataset([5, 6])[1] == (6, 1)


def test_all_zero_scores_fall_back_to_uniform_with_a_warning():
    s = GradNormImportanceSampler(4, 4)
    s.set_epoch(1)
    with pytest.warns(RuntimeWarning, match="uniformly"):
        s.set_epoch(2)
    assert torch.equal(s.probabilities, torch.full((4,), 0.25, dtype=torch.float64))


def test_min_prob_floor_and_importance_weights():
    s = GradNormImportanceSampler(4, 2, tau_schedule=lambda e: 1.0, min_prob=0.05)
    s.update(torch.tensor([0]), torch.tensor([1.0]))
    s.set_epoch(1)
    expected = torch.tensor([0.8 + 0.05, 0.05, 0.05, 0.05], dtype=torch.float64)
    torch.testing.assert_close(s.probabilities, expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(s.importance_weights(torch.tensor([0, 3])), 1 / (4 * expected[[0, 3]]))
    c = GradNormCategorical(3, 2, tau_schedule=lambda e: 1.0, min_prob=0.1)
    c.update(torch.tensor([1]), torch.tensor([2.0]))
    c.set_epoch(1)
    torch.testing.assert_close(c.probabilities, torch.tensor([0.1, 0.8, 0.1], dtype=torch.float64))


def test_sampler_errors():
    with pytest.raises(ValueError, match="num_samples"):
        GradNormImportanceSampler(0, 3)
    with pytest.raises(ValueError, match="num_epochs"):
        GradNormImportanceSampler(5, 0)
    with pytest.raises(ValueError, match="num_choices"):
        GradNormCategorical(-1, 3)
    with pytest.raises(ValueError, match="smoothing"):
        GradNormCategorical(3, 3, smoothing=0.0)
    with pytest.raises(ValueError, match="tau_schedule"):
        GradNormImportanceSampler(5, 3, tau_schedule="cosine")
    with pytest.raises(ValueError, match="min_prob"):
        GradNormCategorical(3, 3, min_prob=0.5)
    s = GradNormImportanceSampler(5, 3, tau_schedule=lambda e: 2.0)
    with pytest.raises(ValueError, match="at index 3"):
        s.update(torch.tensor([1, 3]), torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="nan at index 4"):
        s.update(torch.tensor([4]), torch.tensor([math.nan]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        s.update(torch.tensor([5]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="integers"):
        s.update(torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same number"):
        s.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    s.update(torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.set_epoch(1)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


def test_reproducible_and_state_dict_resumes_bit_exactly():
    def make():
        return GradNormImportanceSampler(40, 5, generator=torch.Generator().manual_seed(7))

    def epoch(s, e):
        s.set_epoch(e)
        idx = s.indices
        s.update(idx[:25], (idx[:25].double() % 7) + 0.5)
        return idx

    a, b = make(), make()
    runs_a = [epoch(a, e) for e in range(4)]
    runs_b = [epoch(b, e) for e in range(2)]
    state = b.state_dict()
    c = make()
    c.load_state_dict(state)
    runs_c = [epoch(c, e) for e in range(2, 4)]
    runs_b += [epoch(b, e) for e in range(2, 4)]
    for x, y in zip(runs_a, runs_b):
        assert torch.equal(x, y)
    for x, y in zip(runs_a[2:], runs_c):
        assert torch.equal(x, y)
    assert torch.equal(a.probabilities, c.probabilities)
    paths = GradNormCategorical(3, 4)
    paths.update(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    other = GradNormCategorical(3, 4)
    other.load_state_dict(paths.state_dict())
    assert torch.equal(other.accumulator, paths.accumulator)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(paths.sample(8, generator=g1), other.sample(8, generator=g2))


# --- the theory ----------------------------------------------------------------------------------------------
def test_variance_identity_of_the_gradient_norm_proportional_sampler():
    gen = torch.Generator().manual_seed(5)
    n, d = 12, 7
    g = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    mean = g.mean(0)
    norms = g.norm(dim=1)

    def variance(p):  # enumeration over the draw i ~ p of the estimator g_i / (N p_i)
        return float((p * ((g / (n * p[:, None]) - mean) ** 2).sum(1)).sum())

    optimal = variance(norms / norms.sum())
    uniform = variance(torch.full((n,), 1.0 / n, dtype=torch.float64))
    assert optimal <= uniform
    assert abs(optimal - (float(norms.sum()) ** 2 / n**2 - float(mean.square().sum()))) < 1e-10
    other = torch.rand(n, generator=gen, dtype=torch.float64)
    assert optimal <= variance(other / other.sum())
