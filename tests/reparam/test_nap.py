import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.reparam.nap import NaPOptimizer, NaPProjector, add_nap


def mlp(seed=0, bias=True, widths=(64, 128, 128, 10), dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias or i == len(widths) - 2, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def ln_mlp(seed=0, widths=(64, 128, 128, 10), dtype=torch.float32):
    """LinearNoBias -> LN -> ReLU blocks and a biased head: written out, not via add_nap."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b, bias=False, dtype=dtype), nn.LayerNorm(b, dtype=dtype), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1], dtype=dtype))
    return nn.Sequential(*layers)


def scaled_output_change(model, name, c, x):
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        dict(model2.named_parameters())[name].mul_(c)
        return (model2(x) - model(x)).abs().max().item()


def train_steps(model, steps=20, lr=1e-2, seed=0, projector=None):
    gen = torch.Generator().manual_seed(seed)
    dtype = model[0].weight.dtype
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    in_features = model[0].in_features
    for _ in range(steps):
        x = torch.randn(32, in_features, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if projector is not None:
            projector.step()
    return opt


X = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))


# --- scale invariance and add_nap --------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [0.1, 10.0])
@pytest.mark.parametrize("name", ["0.weight", "3.weight"])
def test_ln_mlp_is_scale_invariant_in_each_hidden_weight(name, c):
    model = ln_mlp()
    for i in (1, 4):
        model[i].eps = 0.0  # exact invariance; eps makes LN(cz) != LN(z) by about eps / (2 c^2 var(z))
    assert scaled_output_change(model, name, c, X) < 1e-5


def test_with_ln_eps_invariance_is_exact_up_to_the_next_norm():
    """With eps = 1e-5 the first hidden weight stays invariant (the next LN removes the per-sample eps
    factor); the last one's rescaling reaches the head through eps / (2 c^2 var): up to ~5e-3 at c = 0.1."""
    model = ln_mlp()
    for c in (0.1, 10.0):
        assert scaled_output_change(model, "0.weight", c, X) < 1e-5
        assert scaled_output_change(model, "3.weight", c, X) < 2e-2


def test_a_bias_before_the_ln_breaks_scale_invariance():
    model = ln_mlp()
    torch.manual_seed(5)
    biased = nn.Linear(64, 128)
    with torch.no_grad():
        biased.weight.copy_(model[0].weight)
    model[0] = biased
    changes = [scaled_output_change(model, "0.weight", c, X) for c in (0.1, 10.0)]
    assert min(changes) > 0.05  # the sheet measured 0.2-0.9 (max abs)


def test_add_nap_on_the_sheet_model():
    model = mlp()
    head_bias = model[4].bias.detach().clone()
    changed = add_nap(model)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert changed == ["0", "1", "3", "4"]
    assert model[0].bias is None and model[3].bias is None
    assert torch.equal(model[6].bias, head_bias)
    for i in (1, 4):
        ln = model[i]
        assert ln.normalized_shape == (128,) and ln.eps == 1e-5 and ln.elementwise_affine
        assert torch.equal(ln.weight, torch.ones(128)) and torch.equal(ln.bias, torch.zeros(128))
    for c in (0.1, 10.0):
        assert scaled_output_change(model, "0.weight", c, X) < 1e-5
    exact = copy.deepcopy(model)
    exact[1].eps = exact[4].eps = 0.0
    for name in ("0.weight", "3.weight"):
        for c in (0.1, 10.0):
            assert scaled_output_change(exact, name, c, X) < 1e-5
    assert add_nap(model) == []  # already done: nothing changes


def test_add_nap_drops_a_constant_bias_before_an_existing_ln_without_changing_outputs():
    model = ln_mlp()
    for i in (0, 3):
        old = model[i]
        new = nn.Linear(old.in_features, old.out_features)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.fill_(0.37 * (i + 1))
        model[i] = new
    before = model(X).detach()
    changed = add_nap(model)
    assert changed == ["0", "3"]
    assert model[0].bias is None and model[3].bias is None
    assert (model(X) - before).abs().max().item() < 1e-6


def test_bias_error_raises_and_leaves_the_model_unchanged():
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    structure = repr(model)
    with pytest.raises(ValueError, match=r"Linear '0' feeds a normalization but has a bias"):
        add_nap(model, bias="error")
    assert repr(model) == structure
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()
    ok = mlp(bias=False)
    assert add_nap(ok, bias="error") == ["1", "4"]


def test_add_nap_named_nested_and_conv():
    model = nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())),
        ("fc1", nn.Linear(4, 8)), ("act1", nn.GELU()),
        ("fc2", nn.Linear(8, 8)), ("act2", nn.Sigmoid()),  # not in `before`: untouched
        ("head", nn.Linear(8, 3)),
    ]))
    changed = add_nap(model)
    assert changed == ["stem.0", "stem.1", "fc1", "fc1_norm"]
    assert isinstance(model.stem[1], nn.GroupNorm) and model.stem[1].num_groups == 1
    assert model.stem[1].num_channels == 4 and model.stem[0].bias is None
    assert list(model._modules) == ["stem", "fc1", "fc1_norm", "act1", "fc2", "act2", "head"]
    assert model.fc2.bias is not None
    x = torch.randn(2, 1, 3, 3)
    out = model(x)
    with torch.no_grad():
        model.stem[0].weight.mul_(7.0)
    assert (model(x) - out).abs().max().item() < 1e-5


def test_add_nap_custom_before_and_eps():
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    assert add_nap(model, before=nn.SiLU, eps=1e-3) == ["0", "1"]
    assert model[1].eps == 1e-3


@pytest.mark.parametrize("kwargs, err, match", [
    ({"bias": "keep"}, ValueError, "bias must be one of"),
    ({"before": (nn.ReLU, int)}, TypeError, "before must be"),
    ({"before": ()}, TypeError, "before must be"),
    ({"eps": -1.0}, ValueError, "eps must be non-negative"),
])
def test_add_nap_bad_arguments(kwargs, err, match):
    model = mlp()
    with pytest.raises(err, match=match):
        add_nap(model, **kwargs)
    assert model[0].bias is not None and len(model) == 5


def test_add_nap_finds_nothing_or_lazy():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    with pytest.raises(ValueError, match="sees only nn.Sequential"):
        add_nap(Custom())
    lazy = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="lazy module"):
        add_nap(lazy)
    assert len(lazy) == 5 and lazy[0].bias is not None


# --- projection ------------------------------------------------------------------------------------------------

def test_default_selection_excludes_head_and_biased_layers():
    model = mlp()
    add_nap(model)
    proj = NaPProjector(model)
    assert proj.weight_names == ["0.weight", "3.weight"] and proj.affine_names == ["1", "4"]
    biased = ln_mlp()
    biased[0] = nn.Linear(64, 128)
    proj = NaPProjector(biased)
    assert proj.weight_names == ["3.weight"]


def test_projection_restores_norms_affine_and_keeps_the_function():
    model = ln_mlp(widths=(64, 128, 128, 128, 10), dtype=torch.float64)
    proj = NaPProjector(model)
    targets = {n: p.detach().norm().item() for n, p in model.named_parameters() if n in proj.weight_names}
    train_steps(model, steps=30)
    params = dict(model.named_parameters())
    assert all(abs(params[n].norm().item() / t - 1) > 1e-3 for n, t in targets.items())  # norms drifted
    x = X.double()
    before = model(x).detach()
    NaPProjector(model, project_affine=False)  # building a projector changes nothing
    weights_only = copy.deepcopy(model)
    proj_w = NaPProjector(weights_only, project_affine=False)
    proj_w._weight_targets = {n: torch.tensor(t, dtype=torch.float64) for n, t in targets.items()}
    proj_w.project()
    assert (weights_only(x) - before).abs().max().item() < 1e-5
    proj.project()
    for n, t in targets.items():
        assert abs(params[n].norm().item() / t - 1) < 1e-6
    for i in (1, 4, 7):
        ln = model[i]
        assert abs((ln.weight.square().sum() + ln.bias.square().sum()).item() - 128) < 1e-5


def test_affine_projection_keeps_the_function_except_at_the_last_norm():
    model = ln_mlp(widths=(64, 96, 96, 96, 10))
    for i in (1, 4, 7):
        model[i].eps = 0.0  # with eps the rescaled next pre-activation moves LN's output by ~eps / var
    free_last = NaPProjector(model, project_last_norm=False)
    all_norms = NaPProjector(model)
    assert free_last.affine_names == ["1", "4"] and all_norms.affine_names == ["1", "4", "7"]
    with torch.no_grad():  # an affine state far from its initial radius
        for i in (1, 4, 7):
            model[i].weight.mul_(1.7).add_(0.1)
            model[i].bias.add_(0.3)
    before = model(X).detach()
    m1 = copy.deepcopy(model)
    p1 = NaPProjector(m1, project_last_norm=False)
    p1._affine_targets = {n: torch.tensor(96.0) for n in p1.affine_names}
    p1.project()
    assert (m1(X) - before).abs().max().item() < 1e-5
    m2 = copy.deepcopy(model)
    p2 = NaPProjector(m2)
    p2._affine_targets = {n: torch.tensor(96.0) for n in p2.affine_names}
    p2.project()
    assert (m2(X) - before).abs().max().item() > 1e-3


def test_projection_matches_the_reference_formula_and_is_idempotent():
    model = ln_mlp()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    proj = NaPProjector(model)
    train_steps(model, steps=10)
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    proj.project()
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in ("0.weight", "3.weight"):  # W <- W * ||W0|| / ||W||
        ref = current[n] * (init[n].norm() / current[n].norm())
        torch.testing.assert_close(once[n], ref, rtol=1e-6, atol=1e-7)
    for i in (1, 4):  # (g, b) <- c (g, b), c = sqrt(d / (||g||^2 + ||b||^2))
        g, b = current[f"{i}.weight"], current[f"{i}.bias"]
        c = (128 / (g.square().sum() + b.square().sum())).sqrt()
        torch.testing.assert_close(once[f"{i}.weight"], c * g)
        torch.testing.assert_close(once[f"{i}.bias"], c * b)
    torch.testing.assert_close(once["6.weight"], current["6.weight"], rtol=0, atol=0)  # head untouched
    proj.project()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), once[n], rtol=1e-6, atol=1e-7)


def test_unit_granularity():
    model = ln_mlp()
    rows0 = model[0].weight.detach().norm(dim=1).clone()
    proj = NaPProjector(model, granularity="unit")
    train_steps(model, steps=10)
    proj.project()
    torch.testing.assert_close(model[0].weight.detach().norm(dim=1), rows0, rtol=1e-6, atol=0)


def test_every_k_fires_on_multiples_of_k():
    model = ln_mlp()
    proj = NaPProjector(model, every=3)
    fired = [proj.step() for _ in range(9)]
    assert [i + 1 for i, f in enumerate(fired) if f] == [3, 6, 9]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 64, generator=gen)), torch.randint(0, 10, (8,), generator=gen)
                        ).backward()
        opt.step()
        proj.step()
        norms.append(model[0].weight.norm().item())
    target = proj.target_norms()["0.weight"].item()
    assert abs(norms[2] / target - 1) < 1e-6  # step 12 = 4 * 3
    assert abs(norms[0] / target - 1) > 1e-6 and abs(norms[3] / target - 1) > 1e-6


def test_zero_norm_is_skipped_with_a_warning():
    model = ln_mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    with pytest.warns(UserWarning, match="zero initial norm"):
        proj = NaPProjector(model, project_affine=False)
    with pytest.warns(UserWarning, match="not projected"):
        proj.project()
    assert torch.count_nonzero(model[0].weight) == 0 and torch.isfinite(model[3].weight).all()


def test_explicit_params_and_non_invariant_guard():
    model = ln_mlp()
    proj = NaPProjector(model, params=[model[3].weight])
    assert proj.weight_names == ["3.weight"] and proj.affine_names == ["4"]
    assert NaPProjector(model, params=["0.weight"]).weight_names == ["0.weight"]
    with pytest.raises(ValueError, match="'6.weight' is not followed by a normalization"):
        NaPProjector(model, params=[model[6].weight])
    forced = NaPProjector(model, params=[model[6].weight], allow_non_invariant=True)
    assert forced.weight_names == ["6.weight"] and forced.affine_names == []
    with pytest.raises(ValueError, match="not in the model"):
        NaPProjector(model, params=[nn.Parameter(torch.ones(2, 2))])
    with pytest.raises(ValueError, match="not a parameter"):
        NaPProjector(model, params=["nope"])
    with pytest.raises(ValueError, match="found no scale-invariant"):
        NaPProjector(mlp())


@pytest.mark.parametrize("kwargs, err, match", [
    ({"granularity": "row"}, ValueError, "granularity"),
    ({"every": 0}, ValueError, "every"),
    ({"every": 1.5}, ValueError, "every"),
    ({"eps": -1}, ValueError, "eps"),
    ({"project_affine": 1}, TypeError, "project_affine"),
])
def test_projector_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        NaPProjector(ln_mlp(), **kwargs)


def test_low_precision_norms_in_float32():
    model = ln_mlp(dtype=torch.bfloat16)
    proj = NaPProjector(model)
    assert proj.target_norms()["0.weight"].dtype == torch.float32
    with torch.no_grad():
        model[0].weight.mul_(3)
    proj.project()
    ratio = model[0].weight.float().norm() / proj.target_norms()["0.weight"]
    assert abs(ratio.item() - 1) < 1e-2


# --- state and the optimizer wrapper ----------------------------------------------------------------------------

def test_projector_state_dict_round_trip():
    model = ln_mlp()
    proj = NaPProjector(model, every=2)
    train_steps(model, steps=5, projector=proj)
    state = proj.state_dict()
    fresh_model = copy.deepcopy(model)  # its current norms differ from the recorded targets
    fresh = NaPProjector(fresh_model, every=2)
    assert not torch.equal(fresh.target_norms()["0.weight"], proj.target_norms()["0.weight"])
    fresh.load_state_dict(state)
    assert fresh.steps == 5
    for n, t in proj.target_norms().items():
        assert torch.equal(fresh.target_norms()[n], t)
    with pytest.raises(ValueError, match="granularity"):
        NaPProjector(copy.deepcopy(model), every=3).load_state_dict(state)
    with pytest.raises(ValueError, match="are for"):
        NaPProjector(copy.deepcopy(model), params=["0.weight"], every=2).load_state_dict(state)


def run_wrapped(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.is_tensor(loss)


def test_nap_optimizer_wraps_any_optimizer_and_resumes_bit_exactly():
    model = ln_mlp()
    opt = NaPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), NaPProjector(model))
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    run_wrapped(model, opt, 5, seed=0)
    target = opt.projector.target_norms()["3.weight"].item()
    assert abs(model[3].weight.norm().item() / target - 1) < 1e-6
    snapshot, state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    assert set(state) == {"optimizer", "projector"} and state["projector"]["steps"] == 5
    run_wrapped(model, opt, 3, seed=1)
    opt2 = NaPOptimizer(torch.optim.SGD(snapshot.parameters(), lr=0.1, momentum=0.9), NaPProjector(snapshot))
    opt2.load_state_dict(state)
    run_wrapped(snapshot, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), snapshot.parameters()):
        assert torch.equal(a, b)


def test_nap_optimizer_with_scheduler_hooks_and_weight_decay_warning():
    model = ln_mlp()
    with pytest.warns(UserWarning, match="weight decay"):
        NaPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), NaPProjector(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = NaPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), NaPProjector(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    run_wrapped(model, opt, 2, seed=0)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3) and calls == [1, 1]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        NaPOptimizer(object(), NaPProjector(model))
    with pytest.raises(TypeError, match="NaPProjector"):
        NaPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), None)
