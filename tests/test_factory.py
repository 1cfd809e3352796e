"""create_norm / create_optimizer: names, classes, partials and the errors."""

import inspect
from functools import partial

import pytest
import torch
from torch import nn

import normlab


def test_create_norm_by_name_class_and_partial():
    assert isinstance(normlab.create_norm("rmsnorm", 16, eps=1e-6), normlab.RMSNorm)
    assert isinstance(normlab.create_norm("LayerNorm", 16), normlab.LayerNorm)
    assert normlab.create_norm("crmsnorm", 15).num_features == 15
    assert isinstance(normlab.create_norm(nn.LayerNorm, 16), nn.LayerNorm)
    made = normlab.create_norm(partial(normlab.RMSNorm, eps=1e-3), 16)
    assert made.eps == 1e-3 and made.normalized_shape == (16,)


def _catalog_classes(kind: str, base: type) -> list[type]:
    objects = (getattr(normlab, o, None) for e in normlab.list_methods() if kind in e.kinds for o in e.objects)
    return [obj for obj in objects if isinstance(obj, type) and issubclass(obj, base)]


def test_every_catalog_norm_and_optimizer_is_a_factory_key():
    """Norms are the layer classes built from a channel count (not LSTM cells or the TD-LN parameter)."""
    norms = {cls.__name__.lower() for cls in _catalog_classes("layer", nn.Module)
             if next(iter(inspect.signature(cls).parameters)) in ("num_features", "normalized_shape")}
    assert {"powernorm", "unifiednorm", "tdlayernorm", "tdrmsnorm", "adalayernorm"} <= norms
    assert norms <= set(normlab.norm_names())
    optimizers = {cls.__name__.lower() for cls in _catalog_classes("optimizer", torch.optim.Optimizer)}
    assert {"adamp", "sgdp", "diffgrad", "swan", "sinkgd", "gradregnewton", "gradnormalizedgd"} <= optimizers
    assert optimizers <= set(normlab.optimizer_names())


def test_unknown_names_list_valid_ones():
    with pytest.raises(KeyError, match="unknown norm 'batchnorm9'; valid: adab2n, adalayernorm, alphabatchnorm, "
                       "batchchannelnorm2d, crmsnorm, evonormb0, .*, unifiednorm\"$"):
        normlab.create_norm("batchnorm9", 8)
    with pytest.raises(KeyError, match="unknown optimizer 'lion'; valid: .*adamw"):
        normlab.create_optimizer("lion", [torch.zeros(1, requires_grad=True)])
    with pytest.raises(TypeError, match="name, a class or a functools.partial"):
        normlab.create_norm(3, 8)


def test_create_optimizer():
    p = nn.Parameter(torch.ones(3))
    opt = normlab.create_optimizer("adamw", [p], lr=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.1
    assert isinstance(normlab.create_optimizer(partial(torch.optim.SGD, momentum=0.9), [p], lr=0.1),
                      torch.optim.SGD)
