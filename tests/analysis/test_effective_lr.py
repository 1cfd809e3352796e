import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.analysis.effective_lr import EffectiveLRLogger, effective_lr, scale_invariant_parameters


def ln_mlp(seed=0, dtype=torch.float32, eps=1e-5, head_bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32, bias=False, dtype=dtype), nn.LayerNorm(32, eps=eps, dtype=dtype),
                         nn.ReLU(), nn.Linear(32, 32, bias=False, dtype=dtype), nn.LayerNorm(32, eps=eps, dtype=dtype),
                         nn.ReLU(), nn.Linear(32, 5, bias=head_bias, dtype=dtype))


def batch(seed=1, n=24, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=gen, dtype=dtype), torch.randint(0, 5, (n,), generator=gen)


def perturb_affine(model):
    """Move the LN affine params off (1, 0), where a gain alone is (jointly) invariant."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in (1, 4):
            model[i].weight.add_(0.3 * torch.randn(model[i].weight.shape, generator=gen))
            model[i].bias.add_(0.3 * torch.randn(model[i].bias.shape, generator=gen))


def test_sgd_norm_growth_identity_in_float64():
    """||W_{t+1}||^2 = ||W_t||^2 + lr^2 ||g_t||^2 for scale-invariant W under plain SGD (g orthogonal to W)."""
    model = ln_mlp(dtype=torch.float64, eps=0.0)
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(3)
    history = []
    for _ in range(15):
        x = torch.randn(24, 16, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (24,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        w, g = model[3].weight.detach().clone(), model[3].weight.grad.clone()
        assert abs((w * g).sum().item()) < 1e-10 * w.norm().item() * g.norm().item() + 1e-14
        opt.step()
        new = model[3].weight.detach()
        expected = w.square().sum() + lr ** 2 * g.square().sum()
        assert abs(new.square().sum().item() / expected.item() - 1) < 1e-5
        history.append(new.norm().item())
    assert all(b > a for a, b in zip(history, history[1:]))
    elr = effective_lr(model, lr, "sgd", ["3.weight"])["3.weight"]
    assert elr == pytest.approx(lr / history[-1] ** 2, rel=1e-12)


def test_detects_exactly_the_scale_invariant_parameters():
    model = ln_mlp()
    perturb_affine(model)
    x, y = batch()
    assert scale_invariant_parameters(model, F.cross_entropy, x, y) == ["0.weight", "3.weight"]
    at_init = ln_mlp()  # beta = 0 makes a gain alone invariant (it equals the joint (g, beta) rescaling)
    found = scale_invariant_parameters(at_init, F.cross_entropy, x, y)
    assert {"0.weight", "3.weight"} <= set(found) and "6.weight" not in found and "6.bias" not in found
    biased = ln_mlp()
    perturb_affine(biased)
    biased[0] = nn.Linear(16, 32)
    assert scale_invariant_parameters(biased, F.cross_entropy, x, y) == ["3.weight"]


def test_unused_and_zero_parameters_are_not_reported():
    model = ln_mlp()
    perturb_affine(model)
    model.register_parameter("unused", nn.Parameter(torch.ones(3, 3)))  # never used by forward
    with torch.no_grad():
        model[4].bias.zero_()
    x, y = batch()
    assert scale_invariant_parameters(model, F.cross_entropy, x, y) == ["0.weight", "3.weight"]
    with torch.no_grad():
        model[3].weight.zero_()  # nothing before it reaches the loss any more
    assert scale_invariant_parameters(model, F.cross_entropy, x, y) == []


def test_detection_leaves_the_model_and_the_global_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(32, 5))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    found = scale_invariant_parameters(model, F.cross_entropy, x, y)
    assert found == ["0.weight"]  # BN in train mode, dropout masks held fixed across evaluations
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])
    assert not model[0].weight.requires_grad and model.training
    assert scale_invariant_parameters(model.eval(), F.cross_entropy, x, y) == []  # running stats: not invariant
    assert not model.training


def test_effective_lr_values_and_errors():
    model = ln_mlp()
    norms = {n: p.detach().norm().item() for n, p in model.named_parameters() if p.dim() >= 2}
    sgd = effective_lr(model, 0.1)
    adam = effective_lr(model, 0.1, "adam")
    assert set(sgd) == set(norms) == {"0.weight", "3.weight", "6.weight"}
    for n, v in norms.items():
        assert sgd[n] == pytest.approx(0.1 / v ** 2) and adam[n] == pytest.approx(0.1 / v)
    with pytest.raises(ValueError, match="kind must be one of"):
        effective_lr(model, 0.1, "lamb")
    with pytest.raises(ValueError, match="Invalid lr"):
        effective_lr(model, -1.0)
    with pytest.raises(ValueError, match="not parameters"):
        effective_lr(model, 0.1, params=["x"])
    x, y = batch()
    with pytest.raises(ValueError, match="scales"):
        scale_invariant_parameters(model, F.cross_entropy, x, y, scales=(1.0,))
    with pytest.raises(ValueError, match="rtol"):
        scale_invariant_parameters(model, F.cross_entropy, x, y, rtol=0)
    with pytest.raises(ValueError, match="scalar"):
        scale_invariant_parameters(model, lambda out, t: out, x, y)


def test_logger_logs_elr_norm_and_angle_for_any_optimizer():
    model = ln_mlp()
    perturb_affine(model)
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    log = EffectiveLRLogger(model, opt, F.cross_entropy, x, y)
    assert log.names == ["0.weight", "3.weight"] and log.power == 2
    for step in range(3):
        w0 = model[3].weight.detach().clone()
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        w1 = model[3].weight.detach()
        entry = log.history[-1]
        assert entry["step"] == step + 1
        assert entry["norm"]["3.weight"] == pytest.approx(w1.norm().item())
        assert entry["elr"]["3.weight"] == pytest.approx(lr / w1.norm().item() ** 2)
        angle = (w1 / w1.norm() - w0 / w0.norm()).norm().item()
        assert entry["angular_step"]["3.weight"] == pytest.approx(angle, rel=1e-4)
    log.remove()
    opt.step()
    assert len(log.history) == 3


def test_logger_kinds_params_and_errors():
    model = ln_mlp()
    x, y = batch()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    log = EffectiveLRLogger(model, adam, params=["0.weight"])
    assert log.power == 1 and log.names == ["0.weight"]

    class Custom(torch.optim.SGD):
        pass

    assert EffectiveLRLogger(model, Custom(model.parameters(), lr=0.1), params=["0.weight"]).power == 2

    class Other(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

    with pytest.raises(ValueError, match="does not know Other"):
        EffectiveLRLogger(model, Other(model.parameters()), params=["0.weight"])
    assert EffectiveLRLogger(model, Other(model.parameters()), params=["0.weight"], kind="adam").power == 1
    with pytest.raises(ValueError, match="pass loss_fn"):
        EffectiveLRLogger(model, adam)
    with pytest.raises(ValueError, match="not in the optimizer"):
        EffectiveLRLogger(model, torch.optim.Adam([model[0].weight]), params=["3.weight"])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        EffectiveLRLogger(model, object(), params=["0.weight"])


def test_logger_shows_nap_holds_the_elr():
    from normlab.reparam.nap import NaPOptimizer, NaPProjector

    x, y = batch(n=64)
    elrs = {}
    for arm in ("ln", "nap"):
        model = ln_mlp()
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt = NaPOptimizer(base, NaPProjector(model)) if arm == "nap" else base
        log = EffectiveLRLogger(model, opt, params=["0.weight", "3.weight"])
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(model(x), torch.roll(y, 1)).backward()
            opt.step()
        elrs[arm] = [h["elr"]["3.weight"] for h in log.history]
    assert elrs["ln"][-1] < 0.99 * elrs["ln"][0]
    assert max(elrs["nap"]) == pytest.approx(min(elrs["nap"]), rel=1e-5)
