"""Residual-branch scaling: ``y = x + alpha * f(x)`` with ``alpha = c / n`` (or ``c / sqrt(n)``), and SkipInit
and Fixup as the baselines on the same wrapper.

Paper: B. Dherin, M. Munn, "On residual network depth", 2025, arXiv:2510.03470 (Google Research; no public
code). A theory paper: it proposes no new layer. Expanding a residual tower ``x_{i+1} = x_i + lambda f_i(x_i)``
around its input writes the output as a sum over ordered subsets of blocks ("paths"); in the linear case
``f_i(x) = A_i x``::

    prod_{i=n..1} (I + lambda A_i) x = sum_{k=0..n} lambda^k sum_{i_1<...<i_k} A_{i_k} ... A_{i_1} x,

``C(n, k)`` terms of order k, so with ``||A_i|| <= a`` the output is bounded by ``(1 + lambda a)^n ||x||``:
exponential in depth for ``lambda = 1``, at most ``e^{c a} ||x||`` for ``lambda = c / n`` (order-k terms weigh
at most ``(c a)^k / k!``), and for independent zero-mean random branches of gain ``s`` a bounded second moment
``E||y||^2 -> e^{c^2 s^2} ||x||^2`` for ``lambda = c / sqrt(n)``. :mod:`normlab.analysis.signal` measures this.

What this module offers (the spec sheet's rule, no new training math):

- :class:`ScaledResidual` ``(block, alpha, learnable=False, shortcut=None, *, device, dtype)``:
  ``y = x + alpha * block(x)`` (``shortcut(x)`` in place of ``x`` when a shortcut module is given). ``alpha`` is
  a scalar buffer, or a scalar ``Parameter`` with ``learnable=True``, float32 unless ``dtype=torch.float64``. A
  block whose output shape differs from its input (a downsampling stage) is not a pure residual branch: without
  a shortcut the forward raises ``ValueError`` naming the block and both shapes.
- :func:`residual_alpha` ``(rule, n_blocks, c=1.0)``: ``"1/n"`` (the paper's rule, default) ``c / n``;
  ``"1/sqrt(n)"`` (the variance rule) ``c / sqrt(n)``; ``"skipinit"`` 0; ``"none"`` 1.
- :func:`scale_residual_branches` ``(blocks, rule="1/n", c=1.0, learnable=None, *, n_blocks=None,
  shortcuts=None, dtype=None)`` wraps every branch and returns the wrappers (e.g.
  ``nn.Sequential(*scale_residual_branches(list(tower)))``).
  ``n`` is the number of residual branches, not of layers: for nested towers (stages) pass the total count as
  ``n_blocks`` to each call. ``learnable=None`` means the rule's own choice: True for SkipInit, False otherwise.
- SkipInit (De & Smith 2020, arXiv:2002.10444): ``rule="skipinit"``, a learnable scalar alpha initialised to 0
  (and no normalisation layers in the branch); ``learnable=False`` with it raises (the branch would be dead).
- Fixup (Zhang, Dauphin, Ma 2019, arXiv:1901.09321; official code ``hongyi-zhang/Fixup``,
  ``cifar/models/resnet_cifar.py`` ``FixupBasicBlock``/``FixupResNet``): :func:`fixup_init_` ``(model,
  branches, classifier=None, generator=None)`` with ``branches`` the list of each branch's weight layers
  (``nn.Linear``/``nn.Conv*``) in forward order, ``L = len(branches)`` and ``m`` = the branch's layer count: the
  last layer of each branch is set to 0, the others to He-normal ``N(0, 2 / fan_out) * L^(-1/(2m-2))`` (the
  official code's ``fan_out = out_channels * prod(kernel)``), every bias of those layers and the classifier's
  weight and bias to 0; and each branch layer gets two scalar biases (parameters ``fixup_bias_in`` and
  ``fixup_bias_out``, init 0) added to its input and to its output by forward hooks, which are the official
  ``bias1a, bias1b, bias2a, bias2b``. The per-branch scalar multiplier (init 1) is the wrapper's learnable
  alpha: ``scale_residual_branches(blocks, rule="none", learnable=True)``. At init every branch outputs
  exactly 0, so the tower is the identity.

Deviations and notes:
- In the official code ``bias2b`` is added after the multiplier; here ``fixup_bias_out`` of the last layer is
  inside the branch, before alpha (same function at init, a rescaled parametrization after).
- The scalar-bias hooks are not saved in a ``state_dict`` (the parameters are): to reload, build the model,
  call :func:`fixup_init_`, then ``load_state_dict``.
- With learnable alpha and weight decay, exclude alpha from decay (put it in a ``weight_decay=0`` group):
  decay would pull the SkipInit/Fixup multiplier towards 0 regardless of the data.
- alpha is float32 by default (``c / n`` with n large is small; ``dtype=torch.float64`` for float64 towers
  that must be exact: a float32 alpha is the number rounded to float32, which ``.double()`` does not undo), and
  the residual sum is computed in at least float32 (alpha's dtype or wider), then cast to the input dtype, so
  float16/bfloat16 branch outputs are not scaled in half precision. A model's ``.half()`` casts alpha with every
  other buffer and parameter, as for any module; the sum still runs in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

RULES = ("1/n", "1/sqrt(n)", "skipinit", "none")
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FIXUP_BIASES = ("fixup_bias_in", "fixup_bias_out")


class ScaledResidual(nn.Module):
    """``y = x + alpha * block(x)`` (``shortcut(x) + alpha * block(x)`` with a shortcut); alpha a float32 scalar
    buffer, or a float32 scalar parameter when ``learnable``."""

    def __init__(self, block: nn.Module, alpha: float, learnable: bool = False,
                 shortcut: nn.Module | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.block = block
        self.shortcut = shortcut
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"alpha's dtype must be torch.float32 or torch.float64, got {dtype}")
        value = torch.tensor(float(alpha), dtype=dtype, device=device)
        if learnable:
            self.alpha = nn.Parameter(value)
        else:
            self.register_buffer("alpha", value)

    @property
    def learnable(self) -> bool:
        return isinstance(self.alpha, nn.Parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.block(x)
        skip = x if self.shortcut is None else self.shortcut(x)
        if not torch.compiler.is_compiling() and branch.shape != skip.shape:
            what = "the block's output" if self.shortcut is None else "the block's and the shortcut's outputs"
            raise ValueError(
                f"ScaledResidual: {what} must have one shape, got input {tuple(x.shape)} -> block output "
                f"{tuple(branch.shape)}" + ("" if self.shortcut is None else f", shortcut {tuple(skip.shape)}")
                + f" for block {type(self.block).__name__}; a block that changes the shape needs a shortcut "
                "module (shortcut=...)")
        compute = torch.promote_types(torch.promote_types(branch.dtype, self.alpha.dtype), torch.float32)
        out = skip.to(compute) + self.alpha.to(compute) * branch.to(compute)
        return out.to(torch.promote_types(x.dtype, branch.dtype))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.item():.6g}, learnable={self.learnable}"


def _check_c(c: float) -> None:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"c must be a finite non-negative number, got {c!r}")


def residual_alpha(rule: str, n_blocks: int, c: float = 1.0) -> float:
    """The branch scale of ``rule`` for a tower of ``n_blocks`` residual branches: ``"1/n"`` -> c / n,
    ``"1/sqrt(n)"`` -> c / sqrt(n), ``"skipinit"`` -> 0, ``"none"`` -> 1."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {list(RULES)}")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be an int >= 1, got {n_blocks!r}")
    _check_c(c)
    return {"1/n": c / n_blocks, "1/sqrt(n)": c / math.sqrt(n_blocks), "skipinit": 0.0, "none": 1.0}[rule]


def scale_residual_branches(blocks: Sequence[nn.Module], rule: str = "1/n", c: float = 1.0,
                            learnable: bool | None = None, *, n_blocks: int | None = None,
                            shortcuts: Sequence[nn.Module | None] | None = None,
                            dtype: torch.dtype | None = None) -> list[ScaledResidual]:
    """Each residual branch of ``blocks`` wrapped in a :class:`ScaledResidual` with the rule's alpha, where n is
    ``n_blocks`` (default ``len(blocks)``; pass the total over all stages of a nested tower). ``learnable=None``
    is True for ``"skipinit"`` and False otherwise; ``shortcuts`` gives one module or None per block; ``dtype`` is
    alpha's (float32 by default)."""
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{i}] must be an nn.Module, got {type(block).__name__}")
    n = len(blocks) if n_blocks is None else n_blocks
    alpha = residual_alpha(rule, n, c)
    if n_blocks is not None and n_blocks < len(blocks):
        raise ValueError(f"n_blocks={n_blocks} is less than the {len(blocks)} blocks given")
    if learnable is None:
        learnable = rule == "skipinit"
    if rule == "skipinit" and not learnable:
        raise ValueError("rule 'skipinit' needs learnable=True: a fixed alpha of 0 leaves every branch dead")
    if shortcuts is None:
        shortcuts = [None] * len(blocks)
    elif len(shortcuts) != len(blocks):
        raise ValueError(f"shortcuts must give one entry per block ({len(blocks)}), got {len(shortcuts)}")
    return [ScaledResidual(block, alpha, learnable, shortcut, dtype=dtype)
            for block, shortcut in zip(blocks, shortcuts)]


def _add_in(module: nn.Module, args: tuple) -> tuple:
    return (args[0] + module.fixup_bias_in,) + tuple(args[1:])


def _add_out(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.fixup_bias_out


@torch.no_grad()
def fixup_init_(model: nn.Module, branches: Sequence[Sequence[nn.Module]], classifier: nn.Module | None = None,
                *, generator: torch.Generator | None = None) -> list[str]:
    """Fixup initialisation of the residual ``branches`` of ``model`` in place (see the module docstring) and
    the two scalar biases per branch layer; returns the qualified names of the layers changed. Everything is
    checked before anything changes. ``generator`` drives the He-normal draws."""
    names = {id(m): name for name, m in model.named_modules()}
    branches = [list(branch) for branch in branches]
    if not branches:
        raise ValueError("branches must name at least one residual branch")
    seen: set[int] = set()
    for b, branch in enumerate(branches):
        if not branch:
            raise ValueError(f"branches[{b}] is empty: each branch needs at least one weight layer")
        for layer in branch:
            if not isinstance(layer, WEIGHT_LAYERS):
                raise TypeError(f"branches[{b}] holds a {type(layer).__name__}; Fixup expects "
                                f"{', '.join(t.__name__ for t in WEIGHT_LAYERS)} layers")
            if id(layer) not in names:
                raise ValueError(f"branches[{b}] holds a {type(layer).__name__} that is not a submodule of the model")
            if id(layer) in seen:
                raise ValueError(f"layer {names[id(layer)]!r} appears in more than one branch position")
            if any(hasattr(layer, attr) for attr in FIXUP_BIASES):
                raise ValueError(f"layer {names[id(layer)]!r} already has Fixup scalar biases")
            seen.add(id(layer))
    if classifier is not None:
        if not isinstance(classifier, WEIGHT_LAYERS) or id(classifier) not in names:
            raise ValueError("classifier must be an nn.Linear/nn.Conv* submodule of the model")
        if id(classifier) in seen:
            raise ValueError(f"classifier {names[id(classifier)]!r} is also a branch layer")
    n_branches = len(branches)
    changed = []
    for branch in branches:
        m = len(branch)
        scale = n_branches ** (-1.0 / (2 * m - 2)) if m > 1 else 1.0
        for layer in branch[:-1]:
            fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_out) * scale, generator=generator)
        nn.init.zeros_(branch[-1].weight)
        for layer in branch:
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
            for attr in FIXUP_BIASES:
                layer.register_parameter(attr, nn.Parameter(torch.zeros((), dtype=layer.weight.dtype,
                                                                        device=layer.weight.device)))
            layer.register_forward_pre_hook(_add_in)
            layer.register_forward_hook(_add_out)
            changed.append(names[id(layer)])
    if classifier is not None:
        nn.init.zeros_(classifier.weight)
        if classifier.bias is not None:
            nn.init.zeros_(classifier.bias)
        changed.append(names[id(classifier)])
    return changed
