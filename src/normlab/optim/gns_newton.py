"""Gradient-regularized Newton with an adaptive radius (GNS-Newton) and its first-order variant.

Paper: Andrei Semenov, Martin Jaggi, Nikita Doikov, "Gradient-Normalized Smoothness for Optimization with
Approximate Hessians" (2025), arXiv:2506.13710 (ICLR 2026). Official code (NumPy/SciPy):
https://github.com/epfml/grad-norm-smooth, ``src/methods.py`` (``grad_norm_smooth`` = Algorithm 1,
``grad_norm_smooth_gradient_method``).

One outer iteration from x with gradient g, a (possibly approximate) PSD Hessian H = H(x), computed once,
a metric B (SPD, default I) and the dual norm ‖g‖_* = (gᵀB⁻¹g)^½ searches the radius γ:

    λ = ‖g‖_* / (γ + ε)
    if Cholesky(H + λB) fails:  γ <- γ/2, next trial (no evaluation)
    Δ = -(H + λB)⁻¹ g,   x⁺ = x + Δ,   evaluate f(x⁺), g⁺ = ∇f(x⁺)
    accept iff  f(x) - f(x⁺) >= ‖g⁺‖_*² / (8λ):   then γ <- max(2γ, γ_min) and stop
    else γ <- γ/2 and try again (at most ``max_search`` trials)

The step of the last trial that factorised is taken even when its test failed (search exhausted, warned
once); γ persists across iterations. With ``adaptive=False`` the first trial is taken and γ never changes: a
plain gradient-regularised Newton step. :class:`GradNormalizedGD` is the same search with H = 0, B = I:
x⁺ = x - g/λ = x - (γ + ε) g/‖g‖, normalised gradient descent with an adaptive radius.

Defaults are the paper's / official code's: γ_0 = 1, ε = 1e-8, γ_min = 1e-9, acceptance constant 1/8,
factors 2 and 1/2, B = I, ``max_search=40`` trials (the official Newton loop effectively runs 41 because
its early exit only fires with its ``warnings`` flag on; pass 41 for trajectory parity; its gradient
method runs exactly 40).

Deviation from the official code, on purpose: a failed Cholesky factorisation is a failed trial (γ halved,
λ doubled, no f/∇f evaluation). If no trial of an iteration factorises, x stays where it is and a warning is
issued once. The official code instead leaves the search and applies the last Δ it computed (at trial 0 the
previous iteration's step, with stale f and g). Every solve is a dense Cholesky of a (d, d) matrix: memory
O(d²), time O(d³); there is no Hessian-vector-product/CG mode, which would change the acceptance test.
The optimizers call the closure once at the start of every step (the parameters or the data may have changed
since the last one), one f/∇f evaluation more per iteration than the official loop, which carries the last
trial's values over; the iterates are the same.

Two interfaces share one search function, :func:`gns_search`:

- :func:`grad_reg_newton` / :func:`grad_normalized_gd`: functional drivers over a flat vector ``x`` with
  ``f(x)``, ``grad(x)`` and ``hess(x)`` callables, returning ``(x, history)``.
- :class:`GradRegNewton` / :class:`GradNormalizedGD`: closure-based ``torch.optim`` optimizers for small
  full-batch problems; all parameters are flattened into one vector (float64 recommended), one parameter
  group only (like ``torch.optim.LBFGS``), one ``step(closure)`` = one outer iteration. ``hessian="exact"``
  builds the dense Hessian by double backward: the closure must then call
  ``loss.backward(create_graph=True)`` (the convention of Hessian-based optimizers such as AdaHessian); a
  callable ``hessian(x_flat) -> (d, d)`` (e.g. :func:`boehning_logistic`, :func:`diag_hessian`,
  :func:`gauss_newton_logsumexp`, :func:`gauss_newton_softmax`) works with an ordinary closure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from ._common import check_nonnegative, check_positive, grads_of

__all__ = [
    "GradNormalizedGD", "GradRegNewton", "SearchResult", "boehning_logistic", "diag_hessian",
    "gauss_newton_logsumexp", "gauss_newton_softmax", "gns_search", "grad_normalized_gd", "grad_reg_newton",
]

Evaluate = Callable[[torch.Tensor], tuple[float, torch.Tensor]]
HessianFn = Callable[[torch.Tensor], torch.Tensor]


class SearchResult(NamedTuple):
    """One outer iteration of :func:`gns_search`: the new point with its loss, gradient and dual gradient norm,
    the new radius, the Cholesky factorisations that succeeded (``n_solves``), the points evaluated
    (``n_evals``), ``accepted`` (a trial passed the acceptance test) and ``moved`` (some trial factorised)."""

    x: torch.Tensor
    f: float
    g: torch.Tensor
    gnorm: float
    gamma: float
    n_solves: int
    n_evals: int
    accepted: bool
    moved: bool


def _dual_norm_sq(g: torch.Tensor, metric_chol: torch.Tensor | None) -> float:
    """‖g‖_*² = gᵀB⁻¹g with B = L Lᵀ (Euclidean when ``metric_chol`` is None)."""
    if metric_chol is None:
        return float(g @ g)
    w = torch.linalg.solve_triangular(metric_chol, g[:, None], upper=False)
    return float((w * w).sum())


def gns_search(x: torch.Tensor, f_x: float, g: torch.Tensor, gnorm: float, gamma: float,
               hessian: torch.Tensor | None, evaluate: Evaluate, *, metric: torch.Tensor | None = None,
               metric_chol: torch.Tensor | None = None, eps: float = 1e-8, gamma_min: float = 1e-9,
               max_search: int = 40, adaptive: bool = True) -> SearchResult:
    """The radius search of one outer iteration (Algorithm 1; module docstring). ``hessian=None`` is the
    gradient-normalised method (H = 0, B = I). ``evaluate(x) -> (f(x), ∇f(x))``. ``gnorm`` must be > 0."""
    d = x.shape[0]
    last = None
    n_solves = n_evals = 0
    for _ in range(max_search):
        lam = gnorm / (gamma + eps)
        if hessian is None:
            dx = -g / lam
        else:
            system = hessian.clone() if metric is None else hessian + lam * metric
            if metric is None:
                system.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(system)
            if int(info) != 0:
                gamma *= 0.5
                continue
            n_solves += 1
            dx = torch.cholesky_solve(-g.reshape(d, 1), chol).reshape(d)
        x_new = x + dx
        f_new, g_new = evaluate(x_new)
        n_evals += 1
        gn2 = _dual_norm_sq(g_new, metric_chol)
        last = (x_new, f_new, g_new, gn2)
        if not adaptive:
            break
        if f_x - f_new >= gn2 / (8 * lam):
            gamma = max(2.0 * gamma, gamma_min)
            return SearchResult(x_new, f_new, g_new, math.sqrt(gn2), gamma, n_solves, n_evals, True, True)
        gamma *= 0.5
    if last is None:
        return SearchResult(x, f_x, g, gnorm, gamma, n_solves, n_evals, False, False)
    x_new, f_new, g_new, gn2 = last
    return SearchResult(x_new, f_new, g_new, math.sqrt(gn2), gamma, n_solves, n_evals, not adaptive, True)


def _check_search_options(gamma0: float, eps: float, gamma_min: float, max_search: int) -> None:
    check_positive("gamma0", gamma0)
    check_nonnegative("eps", eps)
    check_nonnegative("gamma_min", gamma_min)
    if isinstance(max_search, bool) or not isinstance(max_search, int) or max_search < 1:
        raise ValueError(f"Invalid max_search: {max_search} (need an integer >= 1)")


def _check_matrix(M: Any, d: int, what: str) -> torch.Tensor:
    """``M`` if it is a (d, d), finite matrix, symmetric to sqrt(machine eps) relative (Cholesky reads its
    lower triangle); ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(M, torch.Tensor) or M.shape != (d, d):
        shape = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"{what} must be a ({d}, {d}) matrix (one row per parameter entry), got {shape}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{what} contains NaN or infinity")
    if float((M - M.mT).abs().max()) > math.sqrt(torch.finfo(M.dtype).eps) * float(M.abs().max()):
        raise ValueError(f"{what} is not symmetric")
    return M


def _metric_factor(metric: Any, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, cholesky(B))`` for an SPD ``metric``; ``ValueError`` otherwise."""
    B = _check_matrix(torch.as_tensor(metric).to(like), d, "metric")
    chol, info = torch.linalg.cholesky_ex(B)
    if int(info) != 0:
        raise ValueError("metric must be symmetric positive definite (its Cholesky factorisation failed)")
    return B, chol


def _warn_once(seen: set[str], kind: str, name: str, stacklevel: int) -> None:
    if kind in seen:
        return
    seen.add(kind)
    if kind == "exhausted":
        warnings.warn(f"{name}: the radius search exhausted its trials; the last trial's step was taken "
                      "(reported once)", RuntimeWarning, stacklevel=stacklevel)
    else:
        warnings.warn(f"{name}: no trial of the radius search factorised H + lambda*B; the point was left "
                      "unchanged (reported once)", RuntimeWarning, stacklevel=stacklevel)


def _drive(f: Callable[[torch.Tensor], Any], grad: Callable[[torch.Tensor], torch.Tensor],
           hess: HessianFn | None, x0: torch.Tensor, n_iters: int, *, gamma0: float, adaptive: bool, eps: float,
           gamma_min: float, max_search: int, metric: Any, f_star: float | None, tol: float,
           grad_tol: float | None, name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    _check_search_options(gamma0, eps, gamma_min, max_search)
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"Invalid n_iters: {n_iters} (need an integer >= 0)")
    x = torch.as_tensor(x0).detach().clone()
    if x.dim() != 1:
        raise ValueError(f"x0 must be a 1-D vector, got shape {tuple(x.shape)}")
    d = x.shape[0]
    B, B_chol = _metric_factor(metric, d, x) if metric is not None else (None, None)

    def evaluate(point: torch.Tensor) -> tuple[float, torch.Tensor]:
        return float(f(point)), torch.as_tensor(grad(point)).to(point).reshape(d)

    f_x, g = evaluate(x)
    gnorm = math.sqrt(_dual_norm_sq(g, B_chol))
    gamma, n_solves, n_evals = float(gamma0), 0, 1
    history: dict[str, Any] = {"func": [], "grad_norm": [], "gamma": [], "n_solves": [], "n_evals": [],
                               "accepted": []}
    seen: set[str] = set()
    status = f"n_iters={n_iters} reached"
    for k in range(n_iters + 1):
        for key, value in zip(("func", "grad_norm", "gamma", "n_solves", "n_evals"),
                              (f_x, gnorm, gamma, n_solves, n_evals)):
            history[key].append(value)
        if f_star is not None and f_x - f_star < tol:
            status = f"f - f* < {tol:g} after {k} iterations"
            break
        if (grad_tol is not None and gnorm < grad_tol) or gnorm == 0:
            status = f"gradient norm {gnorm:.3g} after {k} iterations"
            break
        if k == n_iters:
            break
        H = _check_matrix(torch.as_tensor(hess(x.clone())).to(x), d, "the Hessian") if hess is not None else None
        res = gns_search(x, f_x, g, gnorm, gamma, H, evaluate, metric=B, metric_chol=B_chol, eps=eps,
                         gamma_min=gamma_min, max_search=max_search, adaptive=adaptive)
        if not res.moved:
            _warn_once(seen, "stuck", name, 4)
        elif not res.accepted:
            _warn_once(seen, "exhausted", name, 4)
        x, f_x, g, gnorm, gamma = res.x, res.f, res.g, res.gnorm, res.gamma
        n_solves += res.n_solves
        n_evals += res.n_evals
        history["accepted"].append(res.accepted)
    history["status"] = status
    return x, history


def grad_reg_newton(f: Callable[[torch.Tensor], Any], grad: Callable[[torch.Tensor], torch.Tensor],
                    hess: HessianFn, x0: torch.Tensor, n_iters: int, *, gamma0: float = 1.0,
                    adaptive: bool = True, eps: float = 1e-8, gamma_min: float = 1e-9, max_search: int = 40,
                    metric: Any = None, f_star: float | None = None, tol: float = 1e-8,
                    grad_tol: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run Algorithm 1 from ``x0`` for at most ``n_iters`` outer iterations; ``hess(x) -> (d, d)`` PSD.

    Stops early when ``f(x) - f_star < tol`` (with ``f_star``), ``‖g‖_* < grad_tol`` or g = 0. History
    (one entry per iterate x_0..x_K, like the official code's trace): ``func``, ``grad_norm``, ``gamma``
    (the radius at the start of the iteration), cumulative ``n_solves`` and ``n_evals``; ``accepted`` (one
    per iteration taken: its step passed the acceptance test) and ``status``."""
    return _drive(f, grad, hess, x0, n_iters, gamma0=gamma0, adaptive=adaptive, eps=eps, gamma_min=gamma_min,
                  max_search=max_search, metric=metric, f_star=f_star, tol=tol, grad_tol=grad_tol,
                  name="grad_reg_newton")


def grad_normalized_gd(f: Callable[[torch.Tensor], Any], grad: Callable[[torch.Tensor], torch.Tensor],
                       x0: torch.Tensor, n_iters: int, *, gamma0: float = 1.0, adaptive: bool = True,
                       eps: float = 1e-8, gamma_min: float = 1e-9, max_search: int = 40,
                       f_star: float | None = None, tol: float = 1e-8, grad_tol: float | None = None
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`grad_reg_newton` with H = 0: x⁺ = x - (γ + ε) g/‖g‖ with the adaptive radius search."""
    return _drive(f, grad, None, x0, n_iters, gamma0=gamma0, adaptive=adaptive, eps=eps, gamma_min=gamma_min,
                  max_search=max_search, metric=None, f_star=f_star, tol=tol, grad_tol=grad_tol,
                  name="grad_normalized_gd")


def boehning_logistic(X: torch.Tensor) -> HessianFn:
    """Böhning's fixed bound XᵀX/(4n) >= ∇²f(x) of the mean logistic loss over rows of ``X`` (computed once)."""
    H = X.mT @ X / (4 * X.shape[0])
    return lambda x: H


def diag_hessian(hessian: HessianFn) -> HessianFn:
    """The diagonal of ``hessian(x)`` as a (d, d) matrix: a diagonal Hessian approximation."""
    return lambda x: torch.diag(torch.diagonal(hessian(x)))


def gauss_newton_logsumexp(A: torch.Tensor, b: torch.Tensor | None = None, mu: float = 1.0) -> HessianFn:
    """Weighted Gauss-Newton Hessian Aᵀdiag(π)A/μ of f(x) = μ log Σ_i exp((a_iᵀx - b_i)/μ),
    π = softmax((Ax - b)/μ): the exact Hessian without its rank-one term -(Aᵀπ)(Aᵀπ)ᵀ/μ."""
    check_positive("mu", mu)
    offset = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device) if b is None else b

    def hess(x: torch.Tensor) -> torch.Tensor:
        pi = torch.softmax((A @ x - offset) / mu, dim=0)
        return (A.mT * pi) @ A / mu

    return hess


def gauss_newton_softmax(X: torch.Tensor, num_classes: int) -> HessianFn:
    """Weighted Gauss-Newton Hessian of the mean softmax cross-entropy with logits ``X @ W.T``, where the
    flat vector is ``W.reshape(-1)`` for ``W`` of shape ``(num_classes, n_features)`` (an ``nn.Linear``
    weight): block-diagonal with blocks Xᵀdiag(P[:, c])X/n, P = softmax(X Wᵀ). It drops the rank-one
    terms -p_i p_iᵀ ⊗ x_i x_iᵀ of the exact Hessian (the log-sum-exp approximation, per sample)."""
    n, d = X.shape

    def hess(w: torch.Tensor) -> torch.Tensor:
        P = torch.softmax(X @ w.reshape(num_classes, d).mT, dim=1)
        blocks = (P.mT[:, :, None] * X).mT @ X / n
        return torch.block_diag(*blocks)

    return hess


class _GradNormSearch(Optimizer):
    """Shared closure handling of :class:`GradRegNewton` and :class:`GradNormalizedGD`."""

    _exact = False

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], defaults: dict, d_max: float) -> None:
        super().__init__(params, defaults)
        name = type(self).__name__
        if len(self.param_groups) != 1:
            raise ValueError(f"{name} flattens all parameters into one vector: it takes a single parameter "
                             f"group, got {len(self.param_groups)}")
        group = self.param_groups[0]
        _check_search_options(group["gamma0"], group["eps"], group["gamma_min"], group["max_search"])
        if not isinstance(group["adaptive"], bool):
            raise ValueError(f"Invalid adaptive: {group['adaptive']!r} (need a bool)")
        params = self.param_groups[0]["params"]
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError(f"{name} needs every parameter on one device with one dtype")
        self._numel = sum(p.numel() for p in params)
        if self._numel > d_max:
            raise ValueError(f"{name} solves dense ({self._numel}, {self._numel}) systems; that is above "
                             f"d_max={d_max} (raise d_max if the memory O(d^2) and time O(d^3) are acceptable)")
        self._warned: set[str] = set()

    def _params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    def _write(self, x: torch.Tensor) -> None:
        offset = 0
        for p in self._params():
            p.copy_(x[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _closure_eval(self, closure: Callable[[], Any], hessian: bool) -> tuple[Any, float, torch.Tensor,
                                                                                    torch.Tensor | None]:
        """``(loss, float(loss), flat gradient, exact Hessian or None)`` at the current parameters."""
        params = self._params()
        name = type(self).__name__
        with torch.enable_grad():
            loss = closure()
            if loss is None:
                raise RuntimeError(f"{name}: the closure must return the loss")
            with_grad, grads = grads_of(params, name)
            if not with_grad:
                raise RuntimeError(f"{name}: no parameter has a gradient after the closure; it must call "
                                   "loss.backward()")
            by_id = {id(p): gr for p, gr in zip(with_grad, grads)}
            flat = torch.cat([by_id[id(p)].reshape(-1) if id(p) in by_id else torch.zeros_like(p).reshape(-1)
                              for p in params])
            H = None
            if hessian:
                if not flat.requires_grad:
                    raise RuntimeError(f"{name}(hessian='exact') differentiates the gradient: the closure must "
                                       "call loss.backward(create_graph=True)")
                rows = torch.autograd.grad(flat, params, torch.eye(self._numel, dtype=flat.dtype,
                                                                   device=flat.device),
                                           is_grads_batched=True, allow_unused=True)
                H = torch.cat([torch.zeros(self._numel, p.numel(), dtype=flat.dtype, device=flat.device)
                               if r is None else r.reshape(self._numel, -1) for p, r in zip(params, rows)], dim=1)
        return loss, float(loss), flat.detach(), None if H is None else H.detach()

    def _hessian(self, x: torch.Tensor, exact: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def _metric(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One outer iteration. ``closure()`` must zero the gradients, compute the loss, back-propagate and
        return the loss; it is called at the current point and at every trial point. Returns the loss at
        the starting point."""
        name = type(self).__name__
        if closure is None:
            raise RuntimeError(f"{name}.step needs a closure that re-evaluates the loss and its gradients "
                               "(it evaluates trial points during the radius search)")
        group = self.param_groups[0]
        state = self.state[self._params()[0]]
        if not state:
            state.update(gamma=float(group["gamma0"]), step=0, n_solves=0, n_evals=0, n_exhausted=0, n_stuck=0)
        loss, f_x, g, H_exact = self._closure_eval(closure, self._exact)
        state["step"] += 1
        state["n_evals"] += 1
        x = self._flat()
        B, B_chol = self._metric()
        gnorm = math.sqrt(_dual_norm_sq(g, B_chol))
        if gnorm == 0:
            return loss
        H = self._hessian(x, H_exact)

        def evaluate(point: torch.Tensor) -> tuple[float, torch.Tensor]:
            self._write(point)
            _, f_new, g_new, _ = self._closure_eval(closure, False)
            return f_new, g_new

        res = gns_search(x, f_x, g, gnorm, state["gamma"], H, evaluate, metric=B, metric_chol=B_chol,
                         eps=group["eps"], gamma_min=group["gamma_min"], max_search=group["max_search"],
                         adaptive=group["adaptive"])
        state["gamma"] = res.gamma
        state["n_solves"] += res.n_solves
        state["n_evals"] += res.n_evals
        if not res.moved:
            state["n_stuck"] += 1
            _warn_once(self._warned, "stuck", name, 5)
        elif not res.accepted:
            state["n_exhausted"] += 1
            _warn_once(self._warned, "exhausted", name, 5)
        return loss


class GradRegNewton(_GradNormSearch):
    """Gradient-regularised Newton with the adaptive radius search (Algorithm 1 of Semenov, Jaggi, Doikov
    2025; module docstring): x⁺ = x - (H + ‖g‖_*/(γ+ε) B)⁻¹ g for full-batch problems, one ``step(closure)``
    per outer iteration.

    Args:
        params: the parameters (one group), flattened into one vector of size d <= ``d_max``.
        hessian: ``"exact"`` (dense autograd Hessian; the closure calls ``loss.backward(create_graph=True)``)
            or a callable ``hessian(x_flat) -> (d, d)`` symmetric PSD matrix (an approximation).
        gamma0: initial radius γ_0 > 0 (λ_0 = ‖g_0‖_*/γ_0). eps: ε >= 0 in λ = ‖g‖_*/(γ+ε).
        adaptive: run the doubling/halving search (False: fixed γ, plain gradient-regularised Newton).
        gamma_min: floor of γ after a successful doubling. max_search: trials per iteration.
        metric: SPD (d, d) matrix B (default identity). d_max: refuse d above this (default 5000).

    ``state_dict()`` holds the radius ``gamma`` and the counters ``step``, ``n_solves``, ``n_evals``,
    ``n_exhausted`` (searches that ran out of trials) and ``n_stuck`` (iterations where no trial factorised).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], hessian: str | HessianFn = "exact",
                 gamma0: float = 1.0, adaptive: bool = True, eps: float = 1e-8, gamma_min: float = 1e-9,
                 max_search: int = 40, metric: Any = None, d_max: int = 5000) -> None:
        if not (hessian == "exact" or callable(hessian)):
            raise ValueError(f"Invalid hessian: {hessian!r} (need 'exact' or a callable x_flat -> (d, d))")
        defaults = dict(gamma0=gamma0, adaptive=adaptive, eps=eps, gamma_min=gamma_min, max_search=max_search)
        super().__init__(params, defaults, d_max)
        self._exact = hessian == "exact"
        self._hessian_fn = None if self._exact else hessian
        first = self._params()[0]
        self._metric_pair = (None, None) if metric is None else _metric_factor(metric, self._numel, first.detach())

    def _hessian(self, x: torch.Tensor, exact: torch.Tensor | None) -> torch.Tensor:
        H = exact if self._exact else torch.as_tensor(self._hessian_fn(x.clone())).to(x)
        return _check_matrix(H, self._numel, "the Hessian")

    def _metric(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self._metric_pair


class GradNormalizedGD(_GradNormSearch):
    """The paper's gradient-normalised gradient method: :class:`GradRegNewton` with H = 0 and B = I,
    x⁺ = x - (γ+ε) g/‖g‖ with the adaptive radius search; one ``step(closure)`` per outer iteration.
    Arguments and state as :class:`GradRegNewton`, without ``hessian``, ``metric`` and ``d_max`` (no solve:
    memory and time are O(d))."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], gamma0: float = 1.0,
                 adaptive: bool = True, eps: float = 1e-8, gamma_min: float = 1e-9, max_search: int = 40) -> None:
        defaults = dict(gamma0=gamma0, adaptive=adaptive, eps=eps, gamma_min=gamma_min, max_search=max_search)
        super().__init__(params, defaults, math.inf)
