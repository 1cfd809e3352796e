import copy
import math

import pytest
import torch
from torch import nn

from normlab.layers.residual import ScaledResidual, fixup_init_, residual_alpha, scale_residual_branches


def branch(width=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(dtype)


class Residual(nn.Module):
    """The unwrapped residual block the wrapper must reproduce with alpha = 1."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


def test_alpha_one_equals_unwrapped_residual_exactly_and_alpha_zero_is_identity():
    f = branch()
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(ScaledResidual(f, 1.0)(x), Residual(f)(x))
    assert torch.equal(ScaledResidual(f, 0.0)(x), x)
    y = ScaledResidual(f, 0.1, dtype=torch.float64)(x)
    torch.testing.assert_close(y, x + 0.1 * f(x), rtol=0, atol=1e-15)
    assert ScaledResidual(f, 0.1).alpha.item() == torch.tensor(0.1, dtype=torch.float32).item() != 0.1
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        ScaledResidual(f, 0.1, dtype=torch.float16)


def test_shortcut_used_and_shape_change_refused_without_one():
    down = nn.Linear(8, 4, bias=False).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Linear.*shortcut"):
        ScaledResidual(down, 0.5)(x)
    proj = nn.Linear(8, 4, bias=False).double()
    y = ScaledResidual(down, 0.5, shortcut=proj)(x)
    torch.testing.assert_close(y, proj(x) + 0.5 * down(x))


def test_buffer_or_parameter_state_dict_and_grad():
    fixed = ScaledResidual(branch(), 0.125)
    assert "alpha" in dict(fixed.named_buffers()) and "alpha" not in dict(fixed.named_parameters())
    assert fixed.alpha.dtype == torch.float32 and fixed.alpha.item() == 0.125
    learn = ScaledResidual(branch(), 0.0, learnable=True)
    assert isinstance(learn.alpha, nn.Parameter)
    x = torch.randn(4, 8, dtype=torch.float64)
    (g,) = torch.autograd.grad(learn(x).sum(), [learn.alpha])
    torch.testing.assert_close(g.double(), learn.block(x).sum(), rtol=1e-6, atol=1e-6)
    other = ScaledResidual(branch(seed=1), 0.3, learnable=True)
    other.load_state_dict(learn.state_dict())
    assert other.alpha.item() == 0.0 and torch.equal(other.block[0].weight, learn.block[0].weight)
    assert "alpha=0.125, learnable=False" in repr(fixed)


def test_low_precision_input_keeps_dtype_and_sums_in_float32():
    f = nn.Identity()
    x = torch.full((2, 4), 1000.0, dtype=torch.float16)
    y = ScaledResidual(f, 1 / 3)(x)
    assert y.dtype == torch.float16
    assert torch.equal(y, (x.float() + (torch.tensor(1 / 3) * x.float())).half())
    assert ScaledResidual(f, 0.5)(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    half = ScaledResidual(f, 1 / 3).half()  # alpha cast to float16 by .half(): the sum still runs in float32
    assert torch.equal(half(x), (x.float() + half.alpha.float() * x.float()).half())


def test_compiles_with_aot_eager():
    m = ScaledResidual(branch(dtype=torch.float32), 0.5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(torch.compile(m, backend="aot_eager")(x), m(x))


@pytest.mark.parametrize("rule,expected", [("1/n", 2.0 / 16), ("1/sqrt(n)", 2.0 / 4), ("skipinit", 0.0),
                                           ("none", 1.0)])
def test_residual_alpha_rules(rule, expected):
    assert residual_alpha(rule, 16, c=2.0) == expected


def test_residual_alpha_errors():
    with pytest.raises(ValueError, match="unknown rule 'x'"):
        residual_alpha("x", 4)
    with pytest.raises(ValueError, match="n_blocks must be an int >= 1, got 0"):
        residual_alpha("1/n", 0)
    with pytest.raises(ValueError, match="c must be a finite non-negative number, got -1"):
        residual_alpha("1/n", 4, -1.0)
    with pytest.raises(ValueError, match="alpha must be a finite"):
        ScaledResidual(nn.Identity(), math.nan)
    with pytest.raises(TypeError, match="nn.Module"):
        ScaledResidual(lambda x: x, 1.0)


def test_scale_residual_branches_rules_counts_and_errors():
    blocks = [branch(seed=i) for i in range(4)]
    wrapped = scale_residual_branches(blocks)
    assert [w.alpha.item() for w in wrapped] == [0.25] * 4 and all(w.block is b for w, b in zip(wrapped, blocks))
    assert not any(w.learnable for w in wrapped)
    staged = scale_residual_branches(blocks[:2], "1/sqrt(n)", n_blocks=16)  # one stage of a 16-branch tower
    assert [w.alpha.item() for w in staged] == [0.25, 0.25]
    skip = scale_residual_branches(blocks, "skipinit")
    assert all(w.learnable and w.alpha.item() == 0.0 for w in skip)
    fix = scale_residual_branches(blocks, "none", learnable=True)
    assert all(w.learnable and w.alpha.item() == 1.0 for w in fix)
    with pytest.raises(ValueError, match="skipinit' needs learnable=True"):
        scale_residual_branches(blocks, "skipinit", learnable=False)
    with pytest.raises(ValueError, match="n_blocks must be an int >= 1, got 0"):
        scale_residual_branches([])
    with pytest.raises(ValueError, match="less than the 4 blocks"):
        scale_residual_branches(blocks, n_blocks=2)
    with pytest.raises(ValueError, match="one entry per block"):
        scale_residual_branches(blocks, shortcuts=[None])
    with pytest.raises(ValueError, match="unknown rule"):
        scale_residual_branches(blocks, "1/n^2")


class ConvBranch(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class FixupNet(nn.Module):
    def __init__(self, n=3, ch=4, layers_per_branch=2):
        super().__init__()
        self.stem = nn.Conv2d(1, ch, 3, padding=1)
        if layers_per_branch == 2:
            self.branches = nn.ModuleList(ConvBranch(ch) for _ in range(n))
        else:
            self.branches = nn.ModuleList(
                nn.Sequential(nn.Linear(ch, ch), nn.ReLU(), nn.Linear(ch, ch), nn.ReLU(), nn.Linear(ch, ch))
                for _ in range(n))
        self.tower = nn.Sequential(*scale_residual_branches(list(self.branches), "none", learnable=True))
        self.fc = nn.Linear(ch, 10)

    def forward(self, x):
        return self.fc(self.tower(torch.relu(self.stem(x))).mean((2, 3)))


def conv_branches(net):
    return [[b.conv1, b.conv2] for b in net.branches]


def test_fixup_every_branch_outputs_zero_and_logits_are_zero():
    net = FixupNet()
    changed = fixup_init_(net, conv_branches(net), net.fc, generator=torch.Generator().manual_seed(0))
    assert changed == ["branches.0.conv1", "branches.0.conv2", "branches.1.conv1", "branches.1.conv2",
                       "branches.2.conv1", "branches.2.conv2", "fc"]
    x = torch.randn(2, 4, 8, 8)
    for b in net.branches:
        assert torch.equal(b(x), torch.zeros_like(x))
    h = torch.randn(2, 4, 8, 8)
    assert torch.equal(net.tower(h), h)  # the identity on the skip path
    assert torch.equal(net(torch.randn(2, 1, 8, 8)), torch.zeros(2, 10))


def test_fixup_scales_he_init_by_depth():
    n, ch = 64, 16
    net = FixupNet(n, ch)
    fixup_init_(net, conv_branches(net), generator=torch.Generator().manual_seed(0))
    weights = torch.cat([b.conv1.weight.flatten() for b in net.branches])
    expected = math.sqrt(2.0 / (ch * 9)) * n ** -0.5  # m = 2: L^(-1/2), fan_out = C_out * k * k
    assert weights.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(weights.mean().item()) < 0.05 * expected
    lin = FixupNet(4, 32, layers_per_branch=3)
    branches = [[s[0], s[2], s[4]] for s in lin.branches]
    fixup_init_(lin, branches, generator=torch.Generator().manual_seed(0))
    w = torch.cat([torch.cat([s[0].weight.flatten(), s[2].weight.flatten()]) for s in lin.branches])
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / 32) * 4 ** -0.25, rel=0.05)  # m = 3: L^(-1/4)
    assert all(torch.equal(s[4].weight, torch.zeros(32, 32)) and torch.equal(s[0].bias, torch.zeros(32))
               for s in lin.branches)


def test_fixup_scalar_biases_are_the_official_ones_and_train():
    net = FixupNet(2, 4)
    fixup_init_(net, conv_branches(net), net.fc, generator=torch.Generator().manual_seed(0))
    b = net.branches[0]
    with torch.no_grad():
        for p, v in ((b.conv1.fixup_bias_in, 0.1), (b.conv1.fixup_bias_out, -0.2), (b.conv2.fixup_bias_in, 0.3),
                     (b.conv2.fixup_bias_out, 0.4)):
            p.fill_(v)
    x = torch.randn(2, 4, 5, 5)
    c1 = nn.functional.conv2d(x + 0.1, b.conv1.weight, padding=1) - 0.2
    ref = nn.functional.conv2d(torch.relu(c1) + 0.3, b.conv2.weight, padding=1) + 0.4
    torch.testing.assert_close(b(x), ref)
    names = dict(net.named_parameters())
    assert "branches.0.conv1.fixup_bias_in" in names and "tower.0.alpha" in names
    sd = net.state_dict()
    fresh = FixupNet(2, 4)
    fixup_init_(fresh, conv_branches(fresh), fresh.fc, generator=torch.Generator().manual_seed(1))
    fresh.load_state_dict(sd)
    xin = torch.randn(2, 1, 6, 6)
    assert torch.equal(fresh(xin), net(xin))
    assert copy.deepcopy(net)(xin).shape == (2, 10)


def test_fixup_is_reproducible_with_a_generator():
    a, b = FixupNet(), FixupNet()
    fixup_init_(a, conv_branches(a), generator=torch.Generator().manual_seed(3))
    fixup_init_(b, conv_branches(b), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.branches.parameters(), b.branches.parameters()))
    c = FixupNet()
    fixup_init_(c, conv_branches(c), generator=torch.Generator().manual_seed(4))
    assert not torch.equal(c.branches[0].conv1.weight, a.branches[0].conv1.weight)


def test_fixup_errors_leave_model_untouched():
    net = FixupNet()
    before = copy.deepcopy(net.state_dict())
    outsider = nn.Conv2d(4, 4, 3)
    cases = [
        ([], None, ValueError, "at least one residual branch"),
        ([[]], None, ValueError, "is empty"),
        ([[net.branches[0].conv1, nn.ReLU()]], None, TypeError, "holds a ReLU"),
        (conv_branches(net) + [[outsider]], None, ValueError, "not a submodule"),
        ([[net.branches[0].conv1, net.branches[0].conv1]], None, ValueError, "more than one"),
        (conv_branches(net), net.branches[0].conv2, ValueError, "also a branch layer"),
        (conv_branches(net), outsider, ValueError, "classifier must be"),
    ]
    for branches, classifier, err, msg in cases:
        with pytest.raises(err, match=msg):
            fixup_init_(net, branches, classifier)
        after = net.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fixup_init_(net, conv_branches(net))
    with pytest.raises(ValueError, match="already has Fixup scalar biases"):
        fixup_init_(net, conv_branches(net))
