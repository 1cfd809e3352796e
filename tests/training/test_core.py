"""The reconstructed Core loss and the Core test-time adaptation loop (alpha_bn.md)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.convert.swap import to_alpha_bn
from normlab.layers.alpha_bn import AlphaBatchNorm
from normlab.training.core import Core, pairwise_class_correlation_loss


def loss_reference(p, normalize):
    """Written out element by element (float64): off-diagonal mass of S = P^T P, row-normalized or not."""
    p = p.double()
    b, k = p.shape
    s = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            s[i, j] = sum(p[n, i] * p[n, j] for n in range(b))
    total = 0.0
    for i in range(k):
        row = s[i].sum()
        for j in range(k):
            if i != j:
                total = total + (s[i, j] / row if normalize == "row" else s[i, j])
    return total / k if normalize == "row" else total / (k * b)


@pytest.mark.parametrize("normalize", ["row", "none"])
def test_loss_matches_the_written_out_formula(normalize):
    p = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(pairwise_class_correlation_loss(p, normalize), loss_reference(p, normalize),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_loss_special_values(k):
    one_hot = torch.eye(k)[torch.randperm(k)]
    assert pairwise_class_correlation_loss(one_hot).item() == 0.0
    uniform = torch.full((7, k), 1.0 / k)
    torch.testing.assert_close(pairwise_class_correlation_loss(uniform), torch.tensor((k - 1) / k), atol=1e-6, rtol=0)
    torch.testing.assert_close(pairwise_class_correlation_loss(uniform, "none"), torch.tensor((k - 1) / k ** 2),
                               atol=1e-6, rtol=0)
    # fewer samples than classes: unpredicted classes give zero rows of S, which contribute 0 (no NaN)
    assert pairwise_class_correlation_loss(torch.eye(k)[:1]).item() == 0.0


def test_loss_prefers_confident_distinct_predictions():
    confident = torch.eye(4).repeat(2, 1) * 0.9 + 0.025
    collapsed = torch.tensor([[0.9, 0.05, 0.03, 0.02]]).repeat(8, 1)
    assert pairwise_class_correlation_loss(confident) < pairwise_class_correlation_loss(torch.full((8, 4), 0.25))
    assert pairwise_class_correlation_loss(confident, "none") < pairwise_class_correlation_loss(collapsed, "none")


@pytest.mark.parametrize("normalize", ["row", "none"])
def test_loss_gradcheck_float64(normalize):
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: pairwise_class_correlation_loss(z.softmax(-1), normalize), (logits,))


def test_loss_half_input_and_errors():
    p = torch.randn(6, 3).softmax(-1)
    out = pairwise_class_correlation_loss(p.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pairwise_class_correlation_loss(p), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        pairwise_class_correlation_loss(p, "col")
    with pytest.raises(ValueError, match=r"\(B, K\).*\(6,\)"):
        pairwise_class_correlation_loss(p[:, 0])
    with pytest.raises(ValueError, match=r"\(0, 3\)"):
        pairwise_class_correlation_loss(p[:0])
    with pytest.raises(TypeError, match="floating"):
        pairwise_class_correlation_loss(torch.ones(2, 3, dtype=torch.long))


def make_model(seed=0):
    """A small trained-looking MLP with BatchNorm1d and Dropout (Dropout must be off while adapting)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
                          nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):
        x = torch.randn(32, 8)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.train()  # the caller's mode must not matter


def stream(n=20, batch=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(batch, 8, generator=gen) + 0.7 for _ in range(n)]


def alpha_bn_copy(model, alpha):
    ref = copy.deepcopy(model)
    to_alpha_bn(ref, alpha)
    return ref.eval()


def test_lr_zero_reproduces_alpha_bn_exactly():
    model = make_model()
    core = Core(model, alpha=0.6, optimizer_factory=lambda p: torch.optim.Adam(p, lr=0.0))
    ref = alpha_bn_copy(model, 0.6)
    with torch.no_grad():  # Core turns gradients on for its step
        for x in stream():
            assert torch.equal(core(x), ref(x))


def test_only_bn_affine_parameters_change_and_predictions_come_first():
    model = make_model()
    core = Core(model, alpha=0.5, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.5))
    start = {k: v.clone() for k, v in core.model.state_dict().items()}
    twin = alpha_bn_copy(model, 0.5)
    for x in stream(5):
        twin.load_state_dict(core.model.state_dict())
        with torch.no_grad():
            expected = twin(x)
        assert torch.equal(core(x), expected)  # predicted with the parameters before this batch's step
    affine = {f"{n}.{p}" for n, m in core.model.named_modules() if isinstance(m, AlphaBatchNorm)
              for p in ("weight", "bias")}
    assert affine == {"1.weight", "1.bias", "5.weight", "5.bias"}
    end = core.model.state_dict()
    for key, value in start.items():
        assert torch.equal(value, end[key]) == (key not in affine), key
    assert {n for n, p in core.model.named_parameters() if p.requires_grad} == affine
    assert not core.model.training and all(not m.training for m in core.model.modules())


def test_inplace_false_leaves_the_callers_model_untouched():
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    core = Core(model, alpha=0.9)
    assert core.model is not model
    for x in stream(20):
        core(x)
    assert isinstance(model[1], nn.BatchNorm1d) and isinstance(model[5], nn.BatchNorm1d)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert not torch.equal(core.model[1].weight, model[1].weight)  # the copy did adapt


def test_inplace_true_adapts_the_given_model():
    model = make_model()
    core = Core(model, alpha=0.3, inplace=True)
    assert core.model is model and isinstance(model[1], AlphaBatchNorm) and model[1].alpha == 0.3
    before = model[5].bias.detach().clone()
    core(stream(1)[0])
    assert not torch.equal(model[5].bias, before)


def test_adaptation_lowers_the_loss_on_a_repeated_batch():
    model = make_model()
    core = Core(model, alpha=0.0, optimizer_factory=lambda p: torch.optim.Adam(p, 1e-2))
    x = stream(1)[0]
    with torch.no_grad():
        first = pairwise_class_correlation_loss(core.model(x).softmax(-1))
    for _ in range(30):
        core(x)
    with torch.no_grad():
        last = pairwise_class_correlation_loss(core.model(x).softmax(-1))
    assert last < first - 0.02


def test_reset_restores_parameters_and_optimizer_state():
    model = make_model()
    core = Core(model, alpha=0.5)
    xs = stream(6)
    first = [core(x) for x in xs]
    assert len(core.optimizer.state) == 4
    core.reset()
    assert len(core.optimizer.state) == 0
    again = [core(x) for x in xs]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_steps_per_batch_and_pluggable_loss():
    model = make_model()
    calls = []

    def entropy(p):
        calls.append(p.shape)
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()

    core = Core(model, alpha=0.0, steps_per_batch=3, loss=entropy)
    core(stream(1)[0])
    assert calls == [(16, 5)] * 3
    assert all(int(s["step"]) == 3 for s in core.optimizer.state.values())
    row_none = functools.partial(pairwise_class_correlation_loss, normalize="none")
    assert Core(model, loss=row_none).loss is row_none


def test_existing_alpha_bn_layers_get_alpha_and_errors():
    model = nn.Sequential(nn.Linear(4, 6), AlphaBatchNorm(6, alpha=0.1), nn.Linear(6, 3))
    assert Core(model, alpha=0.7).model[1].alpha == 0.7 and model[1].alpha == 0.1
    with pytest.raises(ValueError, match="BatchNorm"):
        Core(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="BatchNorm"):
        Core(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False)))
    with pytest.raises(ValueError, match="steps_per_batch"):
        Core(model, steps_per_batch=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        Core(model, alpha=1.2)
