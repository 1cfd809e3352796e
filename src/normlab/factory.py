"""String factories: ``create_norm("rmsnorm", 768)``, ``create_optimizer("adamw", params, lr=1e-3)``.

Names are the lower-case public class names (``create_norm("adalayernorm", 64, cond_dim=128)`` passes
keyword arguments through). Each factory also accepts a class or a
``functools.partial`` (called with the same arguments), as timm's ``create_norm_layer`` does.
Optimizer names include torch's own (``sgd``, ``adam``, ``adamw``) as the baselines of the claim checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from . import layers, optim

# Norms built as ``cls(num_features, **kw)``; recurrent cells are layers of the catalog, not norm slots.
_NORMS: dict[str, type[nn.Module]] = {
    "layernorm": layers.LayerNorm,
    "rmsnorm": layers.RMSNorm,
    "crmsnorm": layers.CRMSNorm,
    "powernorm": layers.PowerNorm,
    "unifiednorm": layers.UnifiedNorm,
    "tdlayernorm": layers.TDLayerNorm,
    "tdrmsnorm": layers.TDRMSNorm,
    "adalayernorm": layers.AdaLayerNorm,
    "evonormb0": layers.EvoNormB0,
    "evonorms0": layers.EvoNormS0,
    "regionnorm2d": layers.RegionNorm2d,
    "learnableregionnorm2d": layers.LearnableRegionNorm2d,
    "batchchannelnorm2d": layers.BatchChannelNorm2d,
    "adab2n": layers.AdaB2N,
    "alphabatchnorm": layers.AlphaBatchNorm,
}

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adamp": optim.AdamP,
    "sgdp": optim.SGDP,
    "diffgrad": optim.DiffGrad,
    "swan": optim.SWAN,
    "sinkgd": optim.SinkGD,
    "gradregnewton": optim.GradRegNewton,
    "gradnormalizedgd": optim.GradNormalizedGD,
    "zoadam": optim.ZOAdam,
}


def norm_names() -> list[str]:
    """Valid names for :func:`create_norm`."""
    return sorted(_NORMS)


def optimizer_names() -> list[str]:
    """Valid names for :func:`create_optimizer`."""
    return sorted(_OPTIMIZERS)


def _resolve(name: str | type | partial, table: dict[str, Any], what: str) -> Callable[..., Any]:
    if isinstance(name, (type, partial)):
        return name
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a name, a class or a functools.partial, got {type(name).__name__}")
    try:
        return table[name.lower()]
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; valid: {', '.join(sorted(table))}") from None


def create_norm(name: str | type | partial, num_features: int, **kwargs: Any) -> nn.Module:
    """A norm layer over ``num_features`` channels, e.g. ``create_norm("rmsnorm", 768, eps=1e-6)``."""
    return _resolve(name, _NORMS, "norm")(num_features, **kwargs)


def create_optimizer(name: str | type | partial, params: Iterable[torch.Tensor] | Iterable[dict],
                     **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over ``params``, e.g. ``create_optimizer("adamw", model.parameters(), lr=1e-3)``."""
    return _resolve(name, _OPTIMIZERS, "optimizer")(params, **kwargs)
