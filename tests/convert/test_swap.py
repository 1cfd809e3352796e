"""BatchNorm swaps, alpha-BN conversion and sync_norms: what each changes, what it carries over, and that a
module it cannot convert leaves the model untouched."""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normlab.bench.tasks import DigitsCNN
from normlab.convert import (ConversionError, replace_batchnorm, replace_bn_relu, sync_norms, to_alpha_bn, to_bcn_ws,
                             to_gn_ws)
from normlab.layers import (AdaB2N, AlphaBatchNorm, BatchChannelNorm2d, EvoNormB0, EvoNormS0, PowerNorm)
from normlab.reparam import WeightStandardization, add_weight_standardization

BN_NAMES = ["features.1.0", "features.3.0", "features.6.0"]
RELU_NAMES = ["features.1.1", "features.3.1", "features.6.1"]
CONV_NAMES = ["features.0", "features.2", "features.5"]


def trained_cnn(dtype=torch.float64, eps=1e-3):
    """DigitsCNN with BatchNorms holding non-default affine parameters and running statistics."""
    torch.manual_seed(0)
    model = DigitsCNN(lambda c: nn.Sequential(nn.BatchNorm2d(c, eps=eps), nn.ReLU())).to(dtype)
    with torch.no_grad():
        for name in BN_NAMES:
            bn = model.get_submodule(name)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
    return model


def images(n=6, dtype=torch.float64):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    types, state = before
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


class ShortcutNet(nn.Module):
    """conv -> BN -> ReLU, and a shortcut conv -> BN added to it (a BN no ReLU follows)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.short, self.short_bn = nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + self.short_bn(self.short(x))


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SharedRelu(nn.Module):
    """One ReLU module applied after the BatchNorm and again after the residual add (torchvision style)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.relu(self.relu(self.bn(self.conv(x))) + x)


class MyBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


# ---- replace_batchnorm ---------------------------------------------------------------------------------------

def test_replace_batchnorm_carries_the_state_that_means_the_same():
    model = trained_cnn()
    original = copy.deepcopy(model)
    assert replace_batchnorm(model, "evonormb0") == BN_NAMES
    for name in BN_NAMES:
        new, bn = model.get_submodule(name), original.get_submodule(name)
        assert type(new) is EvoNormB0 and new.eps == 1e-3 and new.weight.dtype == torch.float64 and new.training
        for entry in ("weight", "bias", "running_var"):
            assert torch.equal(getattr(new, entry), getattr(bn, entry))
    assert replace_batchnorm(model, "evonormb0") == []


def test_replace_batchnorm_keeps_eval_mode_and_a_partial_fixed_eps():
    model = trained_cnn().eval()
    replace_batchnorm(model, partial(EvoNormS0, groups=8, eps=1e-2))
    layer = model.get_submodule(BN_NAMES[0])
    assert type(layer) is EvoNormS0 and layer.eps == 1e-2 and not layer.training


def test_replace_batchnorm_uses_from_batchnorm():
    model = trained_cnn().eval()
    x = images()
    expected = model(x)
    assert replace_batchnorm(model, AlphaBatchNorm, alpha=1.0) == BN_NAMES
    assert all(type(model.get_submodule(n)) is AlphaBatchNorm for n in BN_NAMES)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    model = trained_cnn()
    replace_batchnorm(model, AdaB2N, num_tasks=5, kappa=0.4)
    layer = model.get_submodule(BN_NAMES[1])
    assert type(layer) is AdaB2N and layer.kappa == 0.4
    assert torch.equal(layer.running_mean, trained_cnn().get_submodule(BN_NAMES[1]).running_mean)


def test_replace_batchnorm_replaces_a_shared_module_under_every_name():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    assert replace_batchnorm(model, EvoNormB0) == ["0", "2"]
    assert model[0] is model[2] and type(model[0]) is EvoNormB0


def test_replace_batchnorm_refuses_a_subclass_and_leaves_the_model_untouched():
    model = nn.Sequential(nn.BatchNorm2d(4), MyBatchNorm(4))
    before = snapshot(model)
    with pytest.raises(ConversionError, match="1: MyBatchNorm is a BatchNorm subclass"):
        replace_batchnorm(model, EvoNormB0)
    assert_untouched(model, before)


def test_replace_batchnorm_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="valid:"):
        replace_batchnorm(trained_cnn(), "nosuchnorm")


# ---- replace_bn_relu -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, cls", [("B0", EvoNormB0), ("S0", EvoNormS0)])
def test_replace_bn_relu_computes_the_evonorm_model(kind, cls):
    model = trained_cnn()
    assert replace_bn_relu(model, kind, **({"groups": 8} if kind == "S0" else {})) == BN_NAMES + RELU_NAMES
    for bn_name, relu_name in zip(BN_NAMES, RELU_NAMES):
        assert type(model.get_submodule(bn_name)) is cls and model.get_submodule(bn_name).nonlinearity
        assert type(model.get_submodule(relu_name)) is nn.Identity
    layer = (lambda c: cls(c, eps=1e-3)) if kind == "B0" else (lambda c: cls(c, groups=8, eps=1e-3))
    expected = DigitsCNN(lambda c: nn.Sequential(layer(c), nn.Identity())).to(torch.float64)
    expected.load_state_dict(model.state_dict())
    x = images()
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


def test_replace_bn_relu_makes_a_bn_without_relu_affine_only():
    model = ShortcutNet()
    assert replace_bn_relu(model) == ["bn", "short_bn", "act"]
    assert model.bn.nonlinearity and not model.short_bn.nonlinearity and type(model.act) is nn.Identity
    x = torch.randn(2, 1, 5, 5)
    shortcut = model.short(x) * model.short_bn.weight[:, None, None] + model.short_bn.bias[:, None, None]
    torch.testing.assert_close(model(x) - model.bn(model.conv(x)), shortcut)


@pytest.mark.parametrize("net, message", [(FunctionalRelu, "a functional relu"),
                                          (SharedRelu, "a ReLU module also applied elsewhere")])
def test_replace_bn_relu_refuses_a_relu_it_cannot_remove(net, message):
    model = net()
    before = snapshot(model)
    with pytest.raises(ConversionError, match=f"bn: the ReLU after it is {message}"):
        replace_bn_relu(model)
    assert_untouched(model, before)


def test_replace_bn_relu_refuses_other_batchnorm_types_and_bad_kind():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    before = snapshot(model)
    with pytest.raises(ConversionError, match="1: BatchNorm1d is a BatchNorm type this conversion cannot convert"):
        replace_bn_relu(model)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="kind must be 'B0' or 'S0', got 'B1'"):
        replace_bn_relu(trained_cnn(), "B1")


def test_replace_bn_relu_refuses_an_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(1), nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(x)) if x.sum() > 0 else x

    model = Branchy()
    before = snapshot(model)
    with pytest.raises(ConversionError, match="torch.fx cannot trace its forward"):
        replace_bn_relu(model)
    assert_untouched(model, before)


# ---- to_gn_ws / to_bcn_ws ------------------------------------------------------------------------------------

@pytest.mark.parametrize("convert, layer", [
    (partial(to_gn_ws, num_groups=8), lambda c: nn.GroupNorm(8, c, eps=1e-3)),
    (partial(to_bcn_ws, num_groups=8), lambda c: BatchChannelNorm2d(c, num_groups=8, eps=1e-3)),
])
def test_to_ws_equals_the_model_built_that_way(convert, layer):
    model = trained_cnn()
    assert convert(model) == BN_NAMES + CONV_NAMES
    for name in CONV_NAMES:
        assert isinstance(model.get_submodule(name).parametrizations.weight[0], WeightStandardization)
    expected = DigitsCNN(lambda c: nn.Sequential(layer(c), nn.ReLU())).to(torch.float64)
    add_weight_standardization(expected)
    expected.load_state_dict(model.state_dict())
    x = images()
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    reference = trained_cnn().get_submodule(BN_NAMES[2])
    assert torch.equal(model.get_submodule(BN_NAMES[2]).weight, reference.weight)
    assert convert(model) == []


def test_to_bcn_ws_carries_the_running_statistics():
    model = trained_cnn()
    to_bcn_ws(model, num_groups=8)
    bcn, bn = model.get_submodule(BN_NAMES[0]), trained_cnn().get_submodule(BN_NAMES[0])
    assert torch.equal(bcn.running_mean, bn.running_mean) and torch.equal(bcn.running_var, bn.running_var)


def test_to_gn_ws_standardizes_only_convs_feeding_a_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert to_gn_ws(model, num_groups=2) == ["3", "6", "2"]
    assert not parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[2], "weight")
    assert type(model[6]) is nn.GroupNorm


@pytest.mark.parametrize("convert", [partial(to_gn_ws, num_groups=5), partial(to_bcn_ws, num_groups=5)])
def test_to_ws_refuses_groups_that_do_not_divide(convert):
    model = trained_cnn()
    before = snapshot(model)
    with pytest.raises(ConversionError, match="features.1.0: num_groups=5 does not divide its 32 channels"):
        convert(model)
    assert_untouched(model, before)


def test_to_gn_ws_refuses_fan_in_one():
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4))
    before = snapshot(model)
    with pytest.raises(ConversionError, match="0: weight standardization needs fan-in > 1"):
        to_gn_ws(model, num_groups=2)
    assert_untouched(model, before)


# ---- to_alpha_bn ---------------------------------------------------------------------------------------------

def test_to_alpha_bn_at_one_is_the_eval_model_and_sets_alpha_on_existing_layers():
    model = trained_cnn().eval()
    x = images(3)
    expected = model(x)
    assert to_alpha_bn(model, alpha=1.0) == BN_NAMES
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert to_alpha_bn(model, alpha=0.5) == BN_NAMES
    assert all(model.get_submodule(n).alpha == 0.5 for n in BN_NAMES)


def test_to_alpha_bn_refuses_a_bn_without_running_statistics():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    before = snapshot(model)
    with pytest.raises(ConversionError, match="^1: "):
        to_alpha_bn(model)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        to_alpha_bn(trained_cnn(), 1.5)


# ---- sync_norms ----------------------------------------------------------------------------------------------

def test_sync_norms_turns_batchnorms_into_the_same_function():
    model = trained_cnn()
    reference = copy.deepcopy(model)
    group = object()
    assert sync_norms(model, group) == BN_NAMES
    assert all(model.get_submodule(n).process_group is group for n in BN_NAMES)
    x = images(8)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-12)
    for name in BN_NAMES:
        for entry in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(model.get_submodule(name), entry),
                                       getattr(reference.get_submodule(name), entry), rtol=0, atol=1e-12)
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x[:1]), reference(x[:1]), rtol=0, atol=1e-12)


def test_sync_norms_sets_the_group_of_normlab_layers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), EvoNormB0(4), EvoNormS0(4), nn.Flatten(1, 2), PowerNorm(4))
    group = object()
    assert sync_norms(model, group) == ["1", "4"]
    assert model[1].process_group is group and model[4].process_group is group


@pytest.mark.parametrize("odd", [MyBatchNorm(4), type("MyEvo", (EvoNormB0,), {})(4)])
def test_sync_norms_refuses_unknown_subclasses(odd):
    model = nn.Sequential(nn.BatchNorm2d(4), odd)
    before = snapshot(model)
    with pytest.raises(ConversionError, match="^1"):
        sync_norms(model)
    assert_untouched(model, before)
