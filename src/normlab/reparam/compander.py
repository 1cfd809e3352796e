r"""Weight Compander (WC): every conv/linear weight written as ``w = a * arctan(v / b)`` of a free tensor ``v``,
as a ``torch.nn.utils.parametrize`` parametrization, with fixed or learnable (a, b).

Paper: R. Cakaj, J. Mehnert, B. Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", IJCNN 2023, arXiv:2306.16993. No official code was released; the choices the paper leaves
open are marked [ours] below.

Function (paper Eq. 1-3), elementwise, with scalars a, b::

    w = Psi(v) = a * arctan(v / b)                        |w| < |a| pi / 2, odd, Psi(0) = 0
    dPsi/dv    = a b / (b^2 + v^2)                        largest (a / b) at v = 0
    dL/dv      = dL/dw * a b / (b^2 + v^2)                (chain rule, autograd)

Large magnitudes are *compressed* (bounded by |a| pi / 2) and the region around zero is *expanded* (the
gradient factor is largest there). ``fn="arsinh"`` (``a * arsinh(v / b)``, unbounded) and ``fn="erf"``
(``a * erf(v / b)``, bound |a|) are the paper's alternatives (Sec. IV-F); arctan is the method.

Initialisation (Eq. 4): ``v0 = Psi^-1(w0) = b * tan(w0 / a)`` (``right_inverse``), so a freshly
reparameterised network computes exactly what it computed before. It needs ``max|w0| < |a| pi / 2``; a
weight that violates the bound raises ``ValueError`` naming the layer and its max|w0|.

Where: :func:`add_weight_compander` puts it on the weight of every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
(first conv and classifier included, as the paper requires); never on biases, norm parameters or
embeddings. Fixed mode shares one (a, b) by value across the network; ``learnable="layer"`` (the paper's
"fine" version, the one it reports) gives each layer its own trainable (a, b), ``learnable="network"``
("coarse") one trainable pair shared by every layer (one :class:`WeightCompander` instance registered on all).

Defaults: fixed ``a=0.7, b=0.8`` [ours: the most frequent best pair in the paper's per-network grid
search over {0.5, ..., 1.0}^2]; learnable start ``a=0.5, b=1.0`` (the paper's best start for the fine
version).

Weight decay (paper Eq. 5). Fixed (a, b): decay the *effective* weight, not ``v``: add
:func:`compander_weight_decay` ``= (lam / 2) * sum Psi(v)^2`` to the loss (its gradient on ``v`` is
``lam * Psi(v) * Psi'(v)``, the torch ``weight_decay=lam`` convention on ``w``) and give ``v`` no optimizer
decay. Learnable (a, b): the paper decays ``v`` with the optimizer and never a, b.
:func:`compander_param_groups` builds the param groups with these rules.

Optimizer. SGD applies the rescaled gradient as intended. An adaptive optimizer would normalise the factor
Psi'(v) away; :class:`CompanderAdam` is the paper's (Powerpropagation's) modified step: Adam's moments are kept
on ``g_w = dL/dw = (dL/dv) / Psi'(v)`` and the resulting update is multiplied by ``Psi'(v)`` before it is
applied to ``v``.

Deployment: :func:`remove_weight_compander` bakes ``w = Psi(v)`` into plain layers (inference cost
unchanged). The raw ``v`` is what the state_dict stores (``parametrizations.weight.original``).

Deviations and choices, stated honestly:

- The paper puts no constraint on a learnable (a, b): a may change sign and b may approach 0 (a division
  by zero). That is the default here too; ``b_min`` [ours, off by default] clamps b from below in the
  forward pass.
- Psi and its inverse are computed in float32 for float16/bfloat16 weights (tan near its pole is badly
  conditioned), float64 stays float64; fixed a, b are Python floats, so the formula is exact in any dtype.
- ``g_w`` in :class:`CompanderAdam` is recovered by dividing by Psi'(v) (> 0 for a > 0). With ``fn="erf"``
  Psi'(v) underflows for ``|v| > ~9 b`` (float32); such entries get no update instead of a NaN.
  It runs a per-tensor loop (no ``foreach`` path); float16/bfloat16 parameters keep float32 moments.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype, _get_value

from .. import functional as NF
from ..optim._common import check_betas, check_nonnegative, grads_of
from ._common import parametrized_tensor

__all__ = [
    "CompanderAdam", "WeightCompander", "add_weight_compander", "compander_adam", "compander_param_groups",
    "compander_weight_decay", "remove_weight_compander", "weight_compander",
]

FNS = ("arctan", "arsinh", "erf")
LEARNABLE = (False, "layer", "network")
DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BOUND = {"arctan": math.pi / 2, "arsinh": math.inf, "erf": 1.0}  # sup |fn|


def _value(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _check_shape(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class WeightCompander(nn.Module):
    """The parametrization ``v -> w = a * fn(v / b)`` (``fn`` = arctan by default), elementwise.

    Args:
        a: scale (> 0); the effective weights are bounded by ``a * pi / 2`` (arctan). Default 0.7.
        b: stretch along v (> 0); the slope at 0 is ``a / b``. Default 0.8.
        learnable: ``a`` and ``b`` become ``nn.Parameter`` scalars trained with the network.
        fn: ``"arctan"`` (the method), ``"arsinh"`` or ``"erf"`` (the paper's alternatives).
        b_min: learnable only: clamp b from below in the forward pass (off by default; not in the paper).
        device, dtype: of the learnable a, b (default: torch's defaults).
    """

    def __init__(self, a: float = 0.7, b: float = 0.8, learnable: bool = False, fn: str = "arctan", *,
                 b_min: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        a, b = _check_shape(a, "a"), _check_shape(b, "b")
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        if fn not in FNS:
            raise ValueError(f"unknown fn {fn!r}; valid: {list(FNS)}")
        if b_min is not None:
            if not learnable:
                raise ValueError("b_min clamps a learnable b; with a fixed b it has no effect (learnable=False)")
            b_min = _check_shape(b_min, "b_min")
        self.fn, self.learnable, self.b_min = fn, learnable, b_min
        if learnable:
            self.a = nn.Parameter(torch.tensor(a, device=device, dtype=dtype))
            self.b = nn.Parameter(torch.tensor(b, device=device, dtype=dtype))
        else:
            self.a, self.b = a, b

    def extra_repr(self) -> str:
        a, b = _value(self.a), _value(self.b)
        extra = f", b_min={self.b_min}" if self.b_min is not None else ""
        return f"a={a:.4g}, b={b:.4g}, fn={self.fn}, learnable={self.learnable}{extra}"

    def _ab(self, dtype: torch.dtype) -> tuple[Tensor | float, Tensor | float]:
        if not self.learnable:
            return self.a, self.b
        b = self.b if self.b_min is None else self.b.clamp_min(self.b_min)
        return self.a.to(dtype), b.to(dtype)

    def bound(self) -> float:
        """``sup |Psi| = |a| * sup |fn|`` (``inf`` for arsinh), at the current a."""
        return abs(_value(self.a)) * _BOUND[self.fn]

    def forward(self, v: Tensor) -> Tensor:
        dtype = NF.compute_dtype(v.dtype)
        a, b = self._ab(dtype)
        x = v.to(dtype) / b
        y = {"arctan": torch.atan, "arsinh": torch.asinh, "erf": torch.erf}[self.fn](x)
        return (a * y).to(v.dtype)

    def right_inverse(self, w: Tensor) -> Tensor:
        """``v = b * fn^-1(w / a)`` (paper Eq. 4); ``ValueError`` if ``max|w|`` reaches the bound."""
        with torch.no_grad():
            dtype = NF.compute_dtype(w.dtype)
            a, b = (_value(t) for t in self._ab(dtype))
            peak = float(w.detach().abs().max()) if w.numel() else 0.0
            if not peak < self.bound():
                raise ValueError(f"weight compander needs max|w| < {self.bound():.6g} (|a| * sup|{self.fn}|, a = "
                                 f"{a:g}) to invert w = a * {self.fn}(v / b), got max|w| = {peak:.6g}; use a "
                                 f"larger a")
            x = w.to(dtype) / a
            y = {"arctan": torch.tan, "arsinh": torch.sinh, "erf": torch.erfinv}[self.fn](x)
            return (b * y).to(w.dtype)

    def derivative(self, v: Tensor) -> Tensor:
        """``dPsi/dv`` elementwise at the current a, b: arctan ``a b / (b^2 + v^2)``, arsinh
        ``a / sqrt(b^2 + v^2)``, erf ``(2 a / (b sqrt(pi))) exp(-(v / b)^2)``."""
        dtype = NF.compute_dtype(v.dtype)
        a, b = self._ab(dtype)
        v = v.to(dtype)
        if self.fn == "arctan":
            d = a * b / (b * b + v * v)
        elif self.fn == "arsinh":
            d = a * torch.rsqrt(b * b + v * v)
        else:
            d = (2 * a / (b * math.sqrt(math.pi))) * torch.exp(-(v / b) ** 2)
        return d


def _companders(module: nn.Module) -> list[tuple[str, WeightCompander]]:
    """``[(tensor name, compander)]`` of the parametrized tensors of ``module`` that carry a compander."""
    if not parametrize.is_parametrized(module):
        return []
    return [(name, p) for name, plist in module.parametrizations.items() for p in plist
            if isinstance(p, WeightCompander)]


def _named_companders(model: nn.Module) -> list[tuple[str, nn.Module, str, WeightCompander]]:
    return [(qualname, module, name, comp) for qualname, module in model.named_modules()
            for name, comp in _companders(module)]


def _check_module(module: nn.Module, name: str, compander: WeightCompander, where: str = "") -> None:
    """The errors :func:`weight_compander` raises, before anything changes."""
    param = parametrized_tensor(module, name, where)
    if not param.is_floating_point():
        raise TypeError(f"{type(module).__name__}{where}: {name!r} must be a floating-point tensor, got {param.dtype}")
    if any(n == name for n, _ in _companders(module)):
        raise ValueError(f"{type(module).__name__}{where}: {name!r} already has a weight compander")
    peak = float(param.detach().abs().max()) if param.numel() else 0.0
    if not peak < compander.bound():
        raise ValueError(f"weight compander{where}: max|{name}| = {peak:.6g} reaches the bound "
                         f"{compander.bound():.6g} = |a| * sup|{compander.fn}| (a = {_value(compander.a):g}), so "
                         f"v0 = b * {compander.fn}^-1(w0 / a) does not exist; use a larger a")


def weight_compander(module: nn.Module, name: str = "weight", a: float = 0.7, b: float = 0.8,
                     learnable: bool = False, fn: str = "arctan", *, b_min: float | None = None) -> nn.Module:
    """Register a :class:`WeightCompander` on ``module.<name>`` and return the module. The module computes the
    same function afterwards (``v0 = Psi^-1(w0)``). ``ValueError`` if ``max|w0|`` reaches the bound, the tensor
    already has a compander or is lazy. Learnable a, b get the weight's device and (compute) dtype."""
    param = getattr(module, name, None)
    kw = {}
    if isinstance(param, torch.Tensor) and not isinstance(param, nn.parameter.UninitializedParameter):
        kw = dict(device=param.device, dtype=NF.compute_dtype(param.dtype))
    compander = WeightCompander(a, b, learnable, fn, b_min=b_min, **kw)
    _check_module(module, name, compander)
    parametrize.register_parametrization(module, name, compander)
    return module


def add_weight_compander(model: nn.Module, *, a: float | None = None, b: float | None = None,
                         learnable: bool | str = False, fn: str = "arctan",
                         types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
                         b_min: float | None = None) -> list[str]:
    """Weight Compander on the ``weight`` of every module of ``types`` (default Linear and Conv1d/2d/3d) in
    ``model`` that does not have one yet, in place; returns the qualified names changed.

    ``learnable=False``: fixed (a, b), default (0.7, 0.8); ``"layer"``: one trainable (a, b) per layer (the
    paper's fine version); ``"network"``: one trainable pair shared by all layers; learnable defaults
    (0.5, 1.0). Every layer is checked first (bound, lazy weight); on an error the model is untouched.
    """
    if learnable is not False and learnable not in ("layer", "network"):
        raise ValueError(f"learnable must be one of {list(LEARNABLE)}, got {learnable!r}")
    if not (isinstance(types, tuple) and types and all(isinstance(t, type) for t in types)):
        raise TypeError(f"types must be a non-empty tuple of module classes, got {types!r}")
    default_a, default_b = (0.5, 1.0) if learnable else (0.7, 0.8)
    a = default_a if a is None else a
    b = default_b if b is None else b
    todo = [(qualname, m) for qualname, m in model.named_modules()
            if isinstance(m, types) and not any(n == "weight" for n, _ in _companders(m))]
    weights = [m.weight for _, m in todo if isinstance(getattr(m, "weight", None), torch.Tensor)
               and not isinstance(m.weight, nn.parameter.UninitializedParameter)]
    ref = weights[0] if weights else torch.empty(0)
    kw = dict(b_min=b_min, device=ref.device, dtype=NF.compute_dtype(ref.dtype) if ref.is_floating_point() else None)

    def make() -> WeightCompander:
        return WeightCompander(a, b, bool(learnable), fn, **kw)

    shared = make()  # validates a, b, fn, b_min before anything changes; the shared pair in "network" mode
    for qualname, module in todo:
        _check_module(module, "weight", shared, f" ({qualname or 'the model'})")
    for qualname, module in todo:
        compander = shared if learnable == "network" else make()
        if learnable == "layer":
            compander.to(device=module.weight.device, dtype=NF.compute_dtype(module.weight.dtype))
        parametrize.register_parametrization(module, "weight", compander)
    return [qualname for qualname, _ in todo]


def remove_weight_compander(model: nn.Module) -> list[str]:
    """Bake ``w = Psi(v)`` into plain tensors (``remove_parametrizations(..., leave_parametrized=True)``) on
    every companded tensor of ``model``, in place; returns the qualified names (``"layer.weight"``). A tensor
    that carries another parametrization as well raises ``ValueError`` before anything changes."""
    found = _named_companders(model)
    for qualname, module, name, _ in found:
        if len(module.parametrizations[name]) != 1:
            raise ValueError(f"{qualname or 'the model'}.{name} has other parametrizations besides the compander "
                             f"({[type(p).__name__ for p in module.parametrizations[name]]}); remove them first")
    for _, module, name, _ in found:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return [f"{qualname}.{name}" if qualname else name for qualname, _, name, _ in found]


def compander_weight_decay(model: nn.Module, lam: float) -> Tensor:
    """``(lam / 2) * sum Psi(v)^2`` over every tensor with a *fixed* (a, b) compander: the paper's weight decay
    on the effective weight (Eq. 5, torch's ``weight_decay=lam`` convention). Add it to the loss and give those
    ``v`` no optimizer decay (:func:`compander_param_groups`). Learnable companders are decayed on ``v`` by the
    optimizer instead and are not included. ``ValueError`` if the model has no fixed compander."""
    check_nonnegative("lam", lam)
    fixed = [(module, name) for _, module, name, comp in _named_companders(model) if not comp.learnable]
    if not fixed:
        raise ValueError("compander_weight_decay: the model has no fixed-(a, b) weight compander "
                         "(add_weight_compander(model) first; learnable ones are decayed on v by the optimizer)")
    total = sum(getattr(module, name).pow(2).sum() for module, name in fixed)
    return 0.5 * lam * total


def compander_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Param groups with the paper's decay rules, for any ``torch.optim`` optimizer:

    - ``"compander_v"``: raw ``v`` of *learnable* companders: ``weight_decay`` (decay on v);
    - ``"compander_v_fixed"``: raw ``v`` of fixed companders: 0 (decayed on Psi(v) by
      :func:`compander_weight_decay` in the loss);
    - ``"compander_ab"``: the learnable a, b: 0, always;
    - ``"other"``: every other parameter (biases, norm parameters ...): ``weight_decay``.

    Empty groups are left out; each group carries its ``name``."""
    check_nonnegative("weight_decay", weight_decay)
    v_learn, v_fixed, ab, seen = [], [], [], set()
    for _, module, name, comp in _named_companders(model):
        original = module.parametrizations[name].original
        (v_learn if comp.learnable else v_fixed).append(original)
        seen.add(id(original))
        if comp.learnable:
            for p in (comp.a, comp.b):
                if id(p) not in seen:
                    ab.append(p)
                    seen.add(id(p))
    other = [p for p in model.parameters() if id(p) not in seen]
    groups = [("compander_v", v_learn, weight_decay), ("compander_v_fixed", v_fixed, 0.0),
              ("compander_ab", ab, 0.0), ("other", other, weight_decay)]
    return [{"name": name, "params": params, "weight_decay": wd} for name, params, wd in groups if params]


def compander_adam(params: list[Tensor], grads: list[Tensor], derivs: list[Tensor | None], weights: list[Tensor | None],
                   exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    r"""One CompanderAdam step, per tensor (the math; :class:`CompanderAdam` builds the lists)::

        g_w = g / Psi'(v) + wd * Psi(v)      (companded v; deriv None: g_w = g + wd * p, plain Adam)
        m   = beta1 m + (1 - beta1) g_w,     s = beta2 s + (1 - beta2) g_w^2
        u   = -lr (m / (1 - beta1^t)) / (sqrt(s / (1 - beta2^t)) + eps)      (torch.optim.Adam's update)
        v  <- v + Psi'(v) * u                (p <- p + u for the others)

    ``derivs[i]`` is Psi'(v) at the pre-step v, ``weights[i]`` Psi(v) (used only when ``weight_decay != 0``)."""
    for p, g, d, w, m, s, step_t in zip(params, grads, derivs, weights, exp_avgs, exp_avg_sqs, steps, strict=True):
        step_t += 1
        t = _get_value(step_t)
        g = g.to(m.dtype)
        if d is not None:
            d = d.to(m.dtype)
            g = torch.where(d != 0, g / torch.where(d != 0, d, 1.0), 0.0)
        if weight_decay != 0:
            g = g.add(p.to(m.dtype) if w is None else w.to(m.dtype), alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (s.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        update = m / denom * (-lr / (1 - beta1 ** t))
        if d is not None:
            update = update * d
        p.add_(update.to(p.dtype))


class CompanderAdam(Optimizer):
    """Adam with the paper's modified step for companded weights (see :func:`compander_adam`): the moments are
    kept on the effective weight's gradient ``g_w = dL/dPsi(v)`` and the update is scaled by ``Psi'(v)``.
    Every other parameter in ``params`` (biases, learnable a, b, ...) gets plain ``torch.optim.Adam``.

    Args:
        params: parameters or param groups (e.g. ``model.parameters()`` or :func:`compander_param_groups`).
        model: the model whose companders (found on every step, so they may be added after construction)
            tell which parameters are raw ``v`` tensors.
        lr, betas, eps: as ``torch.optim.Adam`` (defaults 1e-3, (0.9, 0.999), 1e-8).
        weight_decay: coupled L2: ``wd * Psi(v)`` added to ``g_w`` of a companded ``v`` (decay on the
            effective weight, the paper's fixed-(a, b) rule) and ``wd * p`` to the gradient of the others.
    """

    def __init__(self, params: ParamsT, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_nonnegative("lr", lr)
        check_nonnegative("eps", eps)
        check_betas(betas)
        check_nonnegative("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._model = model

    def _raw(self) -> dict[int, tuple[nn.Module, str, WeightCompander]]:
        return {id(module.parametrizations[name].original): (module, name, comp)
                for _, module, name, comp in _named_companders(self._model)}

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` re-evaluates the model and returns the loss, which is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        raw = self._raw()
        for group in self.param_groups:
            params, grads = grads_of(group["params"], "CompanderAdam")
            derivs, weights, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, dtype=NF.compute_dtype(p.dtype))
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=NF.compute_dtype(p.dtype))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                if id(p) in raw:
                    _, _, comp = raw[id(p)]
                    derivs.append(comp.derivative(p))
                    weights.append(comp(p) if group["weight_decay"] != 0 else None)
                else:
                    derivs.append(None)
                    weights.append(None)
            beta1, beta2 = group["betas"]
            compander_adam(params, grads, derivs, weights, exp_avgs, exp_avg_sqs, steps, lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return loss
