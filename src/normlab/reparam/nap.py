"""Normalize-and-Project (NaP): a normalization layer before every nonlinearity, and after every optimizer
step each scale-invariant weight projected back to its initial norm.

Paper: C. Lyle, Z. Zheng, K. Khetarpal, J. Martens, H. van Hasselt, R. Pascanu, W. Dabney, "Normalization and
effective learning rates in reinforcement learning", NeurIPS 2024, arXiv:2407.01800. No official code was
found; the joint (g, beta) projection follows a third-party flax ``NAPProjector``, the layer-wise weight
projection also a third-party PyTorch snippet (``get_initial_norms`` / ``weight_project``).

Why: with a normalization after a linear layer the network is invariant to the scale of that layer's weight,
so the effective step on the weight's direction is ``lr / ||W||^2`` for SGD (``lr / ||W||`` for Adam-like
optimizers). Weight norms grow during training, which silently decays the effective learning rate (ELR); NaP
holds every norm fixed, so the ELR is the user's schedule (see :mod:`normlab.analysis.effective_lr`).

Normalize (:func:`add_nap`, in place): inside every ``nn.Sequential`` (nested ones too), a hidden
``nn.Linear`` directly followed by a nonlinearity of a type in ``before`` gets an ``nn.LayerNorm(out_features,
eps)`` inserted between the two; a Conv1d/2d/3d gets ``nn.GroupNorm(1, out_channels, eps)`` (LayerNorm over
(C, *spatial) per sample with a per-channel affine: the sheet's "LN over (C,H,W)"). Every hidden Linear/Conv
directly followed by a LayerNorm/GroupNorm (inserted or already there) must be bias-free, because a bias breaks
the scale invariance (``LN(cWh + b) != LN(Wh + b)``): ``bias="drop"`` (default) removes it (the norm's own beta
supplies the shift after normalizing), ``bias="error"`` raises naming the first such layer before changing
anything. The head (a last layer not followed by a nonlinearity) keeps its bias and gets no norm.

Project (:class:`NaPProjector`, under ``no_grad``, after ``optimizer.step()``; :class:`NaPOptimizer` wraps any
``torch.optim.Optimizer`` to do both in one ``step``)::

    W_l <- W_l * ||W_l^0||_F / ||W_l||_F              granularity="layer" (default)
    w_lj <- w_lj * ||w_lj^0|| / ||w_lj||                granularity="unit" (each output row / filter)
    (g, beta) <- c (g, beta),  c = sqrt(s^0 / (||g||^2 + ||beta||^2))        project_affine=True

with the targets ``||W^0||`` and ``s^0 = ||g^0||^2 + ||beta^0||^2`` recorded when the projector is built (after
any custom init, before the first step; ``s^0 = d``, the feature count, at PyTorch's default init). With a
homogeneous nonlinearity (ReLU) after the norm and a normalized next layer, the affine rescaling leaves the
function unchanged, except at the last norm, whose output reaches the head: ``project_last_norm=False``
leaves that one free. The weight projection never changes the function.

Defaults (the sheet's): LayerNorm eps 1e-5 with affine, layer-wise targets, affine projection on, every step.
Default parameter selection: every bias-free weight (``dim >= 2``) of a module directly followed, inside an
``nn.Sequential``, by a normalization (LayerNorm, GroupNorm, RMSNorm, BatchNorm); the affine pairs are those
norms' ``(weight, bias)`` (RMSNorm: its gain alone). An explicit ``params`` list may name other tensors, but
one the structural check does not find invariant (no norm after it, a bias before the norm, a parametrized
weight, a model with a custom ``forward``) raises unless ``allow_non_invariant=True``: projecting it changes
the function. :func:`normlab.analysis.effective_lr.scale_invariant_parameters` detects invariance numerically
for models outside ``nn.Sequential``.

Notes and pitfalls:
- Norms are computed in float32 for float16/bfloat16 tensors (float64 stays float64).
- A tensor (or unit) whose norm is <= ``eps`` (e.g. zero-initialised) is skipped with a warning, at
  construction (no target) and at projection time; nothing is divided by 0.
- Weight decay on a projected tensor only changes a norm that is then reset: :class:`NaPOptimizer` warns.
- Because the implicit ELR decay is gone, NaP is meant to run with an explicit lr schedule (the paper
  reintroduces decay); NaP itself does not change the optimizer's lr.
- ``state_dict()`` holds the targets and the step counter; a checkpoint must restore them.
- Only the structure of ``nn.Sequential`` containers is seen: a Linear followed by an activation inside a
  custom ``forward`` is invisible to :func:`add_nap`, which raises when it finds no hidden layer at all.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._validation import check_eps

__all__ = ["NaPOptimizer", "NaPProjector", "add_nap"]

_LINEAR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_NORMS = (nn.LayerNorm, nn.GroupNorm)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
_BIAS_MODES = ("drop", "error")
_GRANULARITIES = ("layer", "unit")


def _sequential_pairs(model: nn.Module) -> Iterator[tuple[str, nn.Sequential, int]]:
    """``(qualified name of the Sequential, the Sequential, index)`` for every pair of neighbouring children."""
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                yield qualname, module, i


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_before(before: Any) -> tuple[type[nn.Module], ...]:
    if isinstance(before, type):
        before = (before,)
    if not isinstance(before, tuple) or not before or not all(
            isinstance(t, type) and issubclass(t, nn.Module) for t in before):
        raise TypeError(f"before must be an nn.Module subclass or a non-empty tuple of them, got {before!r}")
    return before


def _new_norm(layer: nn.Module, eps: float, where: str) -> nn.Module:
    weight = layer.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(layer).__name__} ({where}) is not initialized yet (lazy module); run a forward "
                         f"first")
    kw = {"eps": eps, "device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        return nn.LayerNorm(layer.out_features, **kw)
    return nn.GroupNorm(1, layer.out_channels, **kw)


def add_nap(model: nn.Module, before: type[nn.Module] | tuple[type[nn.Module], ...] = (nn.ReLU, nn.GELU, nn.Tanh),
            eps: float = 1e-5, bias: str = "drop") -> list[str]:
    """NaP's "Normalize" step, in place: a LayerNorm (GroupNorm(1, C) after a conv) between every hidden
    ``nn.Linear``/``nn.Conv*d`` and a directly following nonlinearity of a type in ``before``, inside every
    ``nn.Sequential``, where no norm is there yet; then every hidden Linear/Conv feeding a LayerNorm/GroupNorm
    loses its bias (``bias="drop"``) or, with ``bias="error"``, ``ValueError`` names the first that has one.
    Returns the qualified names (in the changed model) of the inserted norms and of the layers whose bias was
    dropped. Everything is checked first: on any error the model is untouched. ``ValueError`` when no hidden
    Linear/Conv followed by a nonlinearity or a norm is found in any ``nn.Sequential``."""
    before = _check_before(before)
    check_eps(eps)
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    inserts: dict[int, tuple[str, nn.Sequential, list[int]]] = {}  # id(seq) -> (name, seq, indices)
    feeding: list[tuple[str, nn.Sequential, int]] = []  # layers that feed a norm (existing or inserted)
    for seq_name, seq, i in _sequential_pairs(model):
        layer, nxt = seq[i], seq[i + 1]
        if not isinstance(layer, _LINEAR_CONV):
            continue
        where = _join(seq_name, list(seq._modules)[i])
        if isinstance(nxt, before):
            _new_norm(layer, eps, where)  # validates (lazy modules) before any change
            inserts.setdefault(id(seq), (seq_name, seq, []))[2].append(i)
            feeding.append((seq_name, seq, i))
        elif isinstance(nxt, _LAYER_NORMS):
            feeding.append((seq_name, seq, i))
    if not feeding:
        raise ValueError("add_nap found no hidden Linear/Conv directly followed by a nonlinearity of types "
                         f"{[t.__name__ for t in before]} or by a LayerNorm/GroupNorm inside an nn.Sequential "
                         f"of {type(model).__name__}; it sees only nn.Sequential containers")
    with_bias = [(seq_name, seq, i) for seq_name, seq, i in feeding if seq[i].bias is not None]
    if with_bias and bias == "error":
        seq_name, seq, i = with_bias[0]
        raise ValueError(f"{type(seq[i]).__name__} {_join(seq_name, list(seq._modules)[i])!r} feeds a "
                         f"normalization but has a bias, which breaks NaP's scale invariance; pass bias='drop' "
                         f"or remove it")
    for _, seq, i in with_bias:
        seq[i].bias = None
    dropped = [(seq, seq[i]) for _, seq, i in with_bias]
    inserted: list[tuple[nn.Sequential, nn.Module]] = []
    for seq_name, seq, indices in inserts.values():
        keys, mods = list(seq._modules), list(seq._modules.values())
        numbered = all(k.isdigit() for k in keys)
        new: list[tuple[str, nn.Module]] = []
        for j, (key, mod) in enumerate(zip(keys, mods)):
            new.append((key, mod))
            if j in indices:
                norm = _new_norm(mod, eps, _join(seq_name, key))
                name = f"{key}_norm"
                while name in keys:
                    name += "_"
                new.append((name, norm))
                inserted.append((seq, norm))
        if numbered:
            new = [(str(k), mod) for k, (_, mod) in enumerate(new)]
        seq._modules = OrderedDict(new)
    changed = {id(m) for _, m in inserted + dropped}
    return [name for name, m in model.named_modules() if id(m) in changed]


def _invariant_weights(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """``{id(weight): (qualified name, following norm)}`` for every bias-free, non-parametrized weight (dim >= 2)
    directly followed by a normalization inside an ``nn.Sequential``."""
    found = {}
    for seq_name, seq, i in _sequential_pairs(model):
        layer, nxt = seq[i], seq[i + 1]
        weight = getattr(layer, "weight", None)
        if (not isinstance(nxt, _NORMS) or not isinstance(weight, nn.Parameter) or weight.dim() < 2
                or getattr(layer, "bias", None) is not None or parametrize.is_parametrized(layer)):
            continue
        found[id(weight)] = (_join(_join(seq_name, list(seq._modules)[i]), "weight"), nxt)
    return found


def _norm_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tensor_norm(t: torch.Tensor, unit: bool) -> torch.Tensor:
    t = t.detach()
    if unit:
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=_norm_dtype(t))
    return torch.linalg.vector_norm(t, dtype=_norm_dtype(t))


class NaPProjector:
    """NaP's "Project" step. Call :meth:`step` right after every ``optimizer.step()``: it counts steps and,
    every ``every`` steps, puts each selected weight back to its norm recorded here at construction
    (``granularity="layer"``: Frobenius norm per tensor; ``"unit"``: per output row/filter) and, with
    ``project_affine``, each affine pair ``(g, beta)`` of the norms after them back to its initial
    ``||g||^2 + ||beta||^2`` (all but the last with ``project_last_norm=False``). ``params``: tensors of
    ``model`` or their qualified names (default: found structurally, see the module docstring); ``eps``: norms
    at or below it are skipped with a warning."""

    def __init__(self, model: nn.Module, params: Iterable[torch.Tensor | str] | None = None,
                 granularity: str = "layer", project_affine: bool = True, every: int = 1, eps: float = 1e-12,
                 *, project_last_norm: bool = True, allow_non_invariant: bool = False) -> None:
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        check_eps(eps)
        for name, value in (("project_affine", project_affine), ("project_last_norm", project_last_norm),
                            ("allow_non_invariant", allow_non_invariant)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.granularity, self.every, self.eps, self.steps = granularity, every, float(eps), 0
        names = {id(p): n for n, p in model.named_parameters()}
        invariant = _invariant_weights(model)
        if params is None:
            chosen = [p for p in model.parameters() if id(p) in invariant]
        else:
            by_name = dict(model.named_parameters())
            chosen = []
            for p in params:
                if isinstance(p, str):
                    if p not in by_name:
                        raise ValueError(f"{p!r} is not a parameter of the model")
                    p = by_name[p]
                elif not isinstance(p, torch.Tensor) or id(p) not in names:
                    where = " (not in the model)" if isinstance(p, torch.Tensor) else ""
                    raise ValueError(f"params must be parameters of the model or their names, got "
                                     f"{type(p).__name__}{where}")
                if id(p) not in invariant and not allow_non_invariant:
                    raise ValueError(f"{names[id(p)]!r} is not followed by a normalization in an nn.Sequential (or "
                                     f"carries a bias, or is parametrized): projecting it changes the function; "
                                     f"pass allow_non_invariant=True if it is scale invariant in your model")
                if granularity == "unit" and p.dim() < 2:
                    raise ValueError(f"granularity='unit' needs tensors with dim >= 2, got {names[id(p)]!r} of "
                                     f"shape {tuple(p.shape)}")
                chosen.append(p)
        if not chosen:
            raise ValueError("NaPProjector found no scale-invariant weight (a bias-free Linear/Conv directly "
                             "followed by a normalization inside an nn.Sequential); pass params explicitly")
        self._weights: dict[str, nn.Parameter] = {names[id(p)]: p for p in chosen}
        norms = [invariant[id(p)][1] for p in chosen if id(p) in invariant]
        affine = [m for m in dict.fromkeys(norms) if getattr(m, "weight", None) is not None] if project_affine \
            else []
        if affine and not project_last_norm:
            order = {id(m): k for k, m in enumerate(model.modules())}
            affine.remove(max(affine, key=lambda m: order[id(m)]))
        self._affine: dict[str, list[nn.Parameter]] = {}
        module_names = {id(m): n for n, m in model.named_modules()}
        for m in affine:
            self._affine[module_names[id(m)]] = [t for t in (m.weight, getattr(m, "bias", None)) if t is not None]
        unit = granularity == "unit"
        self._weight_targets = {n: _tensor_norm(p, unit) for n, p in self._weights.items()}
        self._affine_targets = {n: self._sum_sq(ts) for n, ts in self._affine.items()}
        zero = [n for n, t in self._weight_targets.items() if bool((t <= self.eps).any())]
        zero += [n for n, t in self._affine_targets.items() if t.item() <= self.eps]
        if zero:
            warnings.warn(f"NaPProjector: zero initial norm for {zero}; those tensors (units) are not projected",
                          stacklevel=2)

    @staticmethod
    def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
        return sum(torch.linalg.vector_norm(t.detach(), dtype=_norm_dtype(t)) ** 2 for t in tensors)

    @property
    def weight_names(self) -> list[str]:
        """Qualified names of the projected weights."""
        return list(self._weights)

    @property
    def affine_names(self) -> list[str]:
        """Qualified names of the norm layers whose (g, beta) are projected jointly."""
        return list(self._affine)

    def target_norms(self) -> dict[str, torch.Tensor]:
        """The recorded targets: ``||W^0||`` per weight (per unit: a vector) and ``||g^0||^2 + ||beta^0||^2``
        per affine norm (keyed by the norm's name)."""
        return {**{n: t.clone() for n, t in self._weight_targets.items()},
                **{n: t.clone() for n, t in self._affine_targets.items()}}

    def step(self) -> bool:
        """Count one optimizer step; project when the count is a multiple of ``every``. Returns whether it did."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.project()
        return True

    @torch.no_grad()
    def project(self) -> None:
        """Project every selected tensor now (idempotent)."""
        unit = self.granularity == "unit"
        skipped = []
        for name, p in self._weights.items():
            target, norm = self._weight_targets[name], _tensor_norm(p, unit)
            ok = (norm > self.eps) & (target > self.eps)
            if not bool(ok.all()):
                skipped.append(name)
            scale = torch.where(ok, target / torch.where(ok, norm, 1.0), 1.0)
            p.mul_(scale.reshape(-1, *[1] * (p.dim() - 1)).to(p.dtype) if unit else scale.to(p.dtype))
        for name, tensors in self._affine.items():
            target, sum_sq = self._affine_targets[name], self._sum_sq(tensors)
            if sum_sq.item() <= self.eps or target.item() <= self.eps:
                skipped.append(name)
                continue
            scale = torch.sqrt(target / sum_sq)
            for t in tensors:
                t.mul_(scale.to(t.dtype))
        if skipped:
            warnings.warn(f"NaPProjector: zero norm, not projected: {skipped}", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        """Targets, step counter and settings (tensors cloned)."""
        return {"steps": self.steps, "every": self.every, "granularity": self.granularity,
                "weight_targets": {n: t.clone() for n, t in self._weight_targets.items()},
                "affine_targets": {n: t.clone() for n, t in self._affine_targets.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore targets and step counter; ``ValueError`` when the state is for other tensors or settings."""
        for key, mine in (("weight_targets", self._weight_targets), ("affine_targets", self._affine_targets)):
            theirs = state[key]
            if set(theirs) != set(mine) or any(theirs[n].shape != mine[n].shape for n in mine):
                raise ValueError(f"state_dict {key} are for {sorted(theirs)}, this projector has {sorted(mine)} "
                                 f"(or the shapes differ)")
        if state["granularity"] != self.granularity or state["every"] != self.every:
            raise ValueError(f"state_dict has granularity={state['granularity']!r}, every={state['every']}; this "
                             f"projector has granularity={self.granularity!r}, every={self.every}")
        for key, mine in (("weight_targets", self._weight_targets), ("affine_targets", self._affine_targets)):
            for n in mine:
                mine[n] = state[key][n].clone().to(mine[n].device)
        self.steps = int(state["steps"])


class NaPOptimizer(torch.optim.Optimizer):
    """Any ``torch.optim.Optimizer`` followed by a :class:`NaPProjector`: ``step(closure)`` runs the base
    optimizer's step, then ``projector.step()``, and returns the closure's loss. ``param_groups`` and ``state``
    are the base optimizer's (so lr schedulers and gradient clipping see them); ``state_dict()`` holds both
    the base optimizer's and the projector's state. Warns when a projected tensor has weight decay (it only
    changes a norm that projection resets)."""

    def __init__(self, optimizer: torch.optim.Optimizer, projector: NaPProjector) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(projector, NaPProjector):
            raise TypeError(f"projector must be a NaPProjector, got {type(projector).__name__}")
        self.optimizer, self.projector = optimizer, projector
        self.defaults = optimizer.defaults
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()
        projected = {id(p) for p in projector._weights.values()}
        decayed = [g.get("weight_decay", 0) for g in optimizer.param_groups
                   if g.get("weight_decay", 0) and any(id(p) in projected for p in g["params"])]
        if decayed:
            warnings.warn(f"NaPOptimizer: weight decay {decayed[0]} on projected weights is a no-op for the "
                          f"function (projection resets the norm); set it to 0 for them", stacklevel=2)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def __repr__(self) -> str:
        return f"NaPOptimizer({self.optimizer!r}, granularity={self.projector.granularity!r}, " \
               f"every={self.projector.every})"

    def step(self, closure=None):  # type: ignore[override]
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.projector.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "projector": self.projector.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.projector.load_state_dict(state_dict["projector"])

