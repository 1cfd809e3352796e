"""Hessian spectra of a model's loss: HVPs, top eigenpairs, Hutchinson trace, SLQ density, LLA criteria.

Paper: N. Gabdullin, "Loss Landscape Analysis (LLA): Investigating generalization capabilities of neural
networks by means of loss landscapes and Hessian analysis", 2024, arXiv:2412.10146; official code:
GabdullinN/loss-landscape-analysis (``src/src_lla/hessian/hessian.py``: ``eigs_calc``, ``tr_calc``,
``esd_calc``; ``viz.py``: ``hessian_criteria``, ``density_plot``). The power-iteration and Hutchinson
schemes are PyHessian's (Yao et al. 2020, arXiv:1912.07145), which LLA copies.

θ is the list of the model's parameters with ``requires_grad`` (P entries in all; ``requires_grad=False``
parameters are constants everywhere). L(θ) is ``loss_fn(model(x), y)`` on one batch, or the batch-size
weighted mean of the per-batch losses over an iterable of batches. Vectors are lists of tensors shaped
like θ, or flat tensors of P entries (``matvec``), with <u, v> = Σ_tensors (u * v).sum().

- HVP (double backprop): g = ∂L/∂θ with ``create_graph=True``, Hv = ∂<g, v>/∂θ. For one batch the graph of
  g is built at the first HVP and kept for the operator's lifetime (its activations stay in memory), so
  an HVP costs one double-backward pass; over a loader every HVP repeats the forward and both backwards
  for each batch and accumulates Σ_b n_b H_b v / Σ_b n_b.
- ``top_eigen(method="power")``: power iteration with deflation (LLA ``eigs_calc`` = PyHessian): for each
  i, v random normal; repeat: v ⊥ u_1..u_{i-1}, v /= ||v||, λ = <Hv, v>, v = Hv / ||Hv||, stop when
  |λ_prev - λ| / (|λ_prev| + 1e-6) < tol. Finds the k eigenvalues of largest |λ| (they can be negative).
- ``top_eigen(method="lanczos")``: Lanczos with full reorthogonalisation; stops when every one of the k
  Ritz pairs of largest |θ| has residual ||H y - θ y|| = β_{j+1} |s_{j,i}| <= tol |θ| (which bounds the
  eigenvalue error by the same tol, relative).
- ``trace``: Hutchinson, mean of <Hz, z> over Rademacher z; with ``tol`` it stops once the running mean
  changes relatively by less than ``tol`` (after >= 2 samples, as the official code effectively does).
- ``esd``: stochastic Lanczos quadrature. Per run, v_1 = Rademacher / sqrt(P), m Lanczos steps, T = tridiag
  (α, β), T = S diag(λ) S^T; nodes λ_i, weights τ_i = S[0, i]^2 (they sum to 1).
- ``spectral_density``: Σ_i τ_i N(x; λ_i, σ²) on a grid over [mean_r min λ - 0.001, mean_r max λ + 0.001]
  with σ² = sigma2 · max(1, range), averaged over runs and renormalised to unit Riemann integral (official).
- ``hessian_criteria``: re = |min λ / max λ| and Khn = Σ_{λ<0} |λ τ|^n / Σ_{λ>0} (λ τ)^n per run, then
  the mean over runs; n = 0.5 gives the paper's KH05 (the power applies to the product λ·τ).

Defaults follow the official code (``max_iter=100``, ``tol=1e-3``, ``n_iter=100``, ``n=0.5``, density grid
10,000 points, σ² = 1e-5) except ``top_eigen``'s ``k=2`` (LLA's ``viz_esd`` default, used for the
Hessian-axes landscape).

Deviations from the official code and why:
- The model is evaluated with ``torch.func.functional_call`` in eval mode (BatchNorm uses its running
  statistics, dropout is off), on a snapshot of θ taken at construction: the operator is the Hessian at
  that point and does not change if the model is trained further; build a new one then. The model's
  parameters, ``.grad``, ``requires_grad`` and every module's train/eval flag are left exactly as they
  were (official: ``loss.backward(create_graph=True)`` writes ``.grad`` and leaves the model in eval mode).
- Lanczos reorthogonalises fully against every stored vector, twice (official: against the last 11 only),
  and restarts with a fresh random vector orthogonal to the basis when β < 1e-8 · max|α| (β = 0 in T, so
  the quadrature weights are unchanged). Memory: m · P numbers. The number of SLQ steps is capped at
  P - 1 with a warning: Lanczos steps close to P on a rank-deficient Hessian lose orthogonality and the
  sheet measured re = 0.56 where the truth was 0.0013.
- Vectors are normalised by v / ||v|| (official: v / (||v|| + 1e-6), a 1e-6 relative bias in λ); the power
  iteration's final vector is orthogonalised once more against the earlier eigenvectors.
- Negative ``n`` in Khn raises (official: warns). No positive Ritz value gives Khn = inf with a warning.
- Randomness comes only from the ``generator`` argument; ``None`` means a fresh CPU generator seeded with
  0 (deterministic; the global RNG is never touched).

Parameters that the loss does not use have zero Hessian rows, and a loss linear in θ has H = 0. A loss
that does not depend on θ through autograd (a ``torch.no_grad`` block around the output), a gradient
whose graph does not reach θ (a custom autograd function marked ``once_differentiable``) or a double
backward that fails (in-place ops) raises ``RuntimeError``; a ``no_grad`` block or ``once_differentiable``
function around only part of the model cannot be detected and drops that part's curvature. ReLU networks
have Hessians without the kink terms: finite-difference curvature disagrees with them near kinks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._model_state import eval_mode

__all__ = ["HessianOperator", "exact_hessian", "hessian_criteria", "hvps_to_accuracy", "spectral_density"]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
METHODS = ("power", "lanczos")
_BREAKDOWN = 1e-8  # Lanczos restarts when beta < _BREAKDOWN * max|alpha|
_REFERENCE_STEPS = 1000  # Lanczos steps allowed to the reference of hvps_to_accuracy


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_tol(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _unit(v: Tensor) -> Tensor:
    """``v / ||v||``; the zero vector stays zero."""
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def _is_batch(data: object) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data))


def _batches(data: object) -> list[Batch] | Iterable[Batch]:
    """``[data]`` for one ``(x, y)`` batch, else the re-iterable ``data`` itself."""
    if _is_batch(data):
        return [tuple(data)]
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"data must be one batch (x, y) of tensors or an iterable of such batches, "
                        f"got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError("data is an iterator, which one pass would exhaust; pass a list of batches or a "
                        "DataLoader")
    return data


def _weighted_batches(batches: Iterable[Batch]) -> Iterator[tuple[Tensor, Tensor, int]]:
    for batch in batches:
        if not _is_batch(batch):
            raise TypeError(f"every batch must be a pair (x, y) of tensors, got {type(batch).__name__}")
        x, y = batch
        yield x, y, x.shape[0] if x.dim() else 1


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True")
    return [n for n, _ in named], [p for _, p in named]


def _scalar_loss(model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    with eval_mode(model):
        out = functional_call(model, params, (x,))
    loss = loss_fn(out, y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got "
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
    return loss


class HessianOperator:
    """The Hessian of ``loss_fn(model(x), y)`` w.r.t. the model's trainable parameters, as a linear operator.

    ``data`` is one batch ``(x, y)`` or a re-iterable of batches (list, DataLoader); over several batches
    the operator is the batch-size weighted mean of the per-batch Hessians. ``loss_fn`` must return the
    mean loss of a batch. See the module docstring for the algorithms, defaults and deviations.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch]) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self._names, self.params = _trainable(model)
        self._batches = _batches(data)
        self._theta = [p.detach().clone().requires_grad_(True) for p in self.params]
        self._shapes = [p.shape for p in self.params]
        self._sizes = [p.numel() for p in self.params]
        self.numel = sum(self._sizes)
        self.dtype = self._theta[0].dtype
        for t in self._theta[1:]:
            self.dtype = torch.promote_types(self.dtype, t.dtype)
        self.device = self._theta[0].device
        self._cached_grads: list[Tensor | None] | None = None

    # ---- vector plumbing -------------------------------------------------------------------------------
    def flatten(self, vectors: Sequence[Tensor]) -> Tensor:
        """A list shaped like ``params`` as one flat tensor of ``numel`` entries."""
        self._check_vectors(vectors)
        return torch.cat([v.reshape(-1).to(self.dtype) for v in vectors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """A flat tensor of ``numel`` entries as a list shaped like ``params``."""
        if not isinstance(flat, Tensor) or flat.shape != (self.numel,):
            raise ValueError(f"expected a flat tensor of shape ({self.numel},), got "
                             f"{tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__}")
        return [c.reshape(s).to(t.dtype) for c, s, t in zip(flat.split(self._sizes), self._shapes, self._theta)]

    def _check_vectors(self, vectors: Sequence[Tensor]) -> None:
        if not isinstance(vectors, (list, tuple)) or len(vectors) != len(self._shapes):
            raise ValueError(f"expected a list of {len(self._shapes)} tensors shaped like the parameters, got "
                             f"{len(vectors) if isinstance(vectors, (list, tuple)) else type(vectors).__name__}")
        for i, (v, s) in enumerate(zip(vectors, self._shapes)):
            if not isinstance(v, Tensor) or v.shape != s:
                raise ValueError(f"vector {i} ({self._names[i]}): expected shape {tuple(s)}, got "
                                 f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")

    def _random(self, generator: torch.Generator, kind: str) -> Tensor:
        if kind == "normal":
            v = torch.randn(self.numel, generator=generator, dtype=self.dtype, device=generator.device)
        else:  # Rademacher
            v = torch.randint(0, 2, (self.numel,), generator=generator, device=generator.device)
            v = (2 * v - 1).to(self.dtype)
        return v.to(self.device)

    # ---- Hessian-vector products -----------------------------------------------------------------------
    def _grads(self, x: Tensor, y: Tensor) -> list[Tensor | None]:
        loss = _scalar_loss(self.model, self.loss_fn, dict(zip(self._names, self._theta)), x, y)
        if not loss.requires_grad:
            raise RuntimeError("the loss does not depend on the parameters through autograd (a torch.no_grad "
                               "block or a detach inside the model?); Hessian-vector products need double "
                               "backward")
        return list(torch.autograd.grad(loss, self._theta, create_graph=True, allow_unused=True))

    def _hvp_from(self, grads: list[Tensor | None], vectors: Sequence[Tensor], retain: bool) -> list[Tensor]:
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:  # the gradient is constant: a loss linear in θ has H = 0
            return [torch.zeros_like(t) for t in self._theta]
        try:
            hv = torch.autograd.grad([grads[i] for i in live], self._theta,
                                     grad_outputs=[vectors[i].to(self._theta[i].dtype) for i in live],
                                     retain_graph=retain, allow_unused=True)
        except RuntimeError as err:
            raise RuntimeError(f"double backward through the model failed (in-place ops or custom autograd "
                               f"functions without double-backward support?): {err}") from err
        if all(h is None for h in hv):
            raise RuntimeError("the gradient's graph does not reach the parameters (a custom autograd function "
                               "marked once_differentiable, or a torch.no_grad block inside the model?); "
                               "Hessian-vector products need double backward")
        return [torch.zeros_like(t) if h is None else h.detach() for h, t in zip(hv, self._theta)]

    def hvp(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """H v for a list ``vectors`` shaped like ``params`` (does not modify the model)."""
        self._check_vectors(vectors)
        if isinstance(self._batches, list) and len(self._batches) == 1:
            if self._cached_grads is None:
                self._cached_grads = self._grads(*self._batches[0])
            return self._hvp_from(self._cached_grads, vectors, retain=True)
        total = None
        count = 0
        for x, y, n in _weighted_batches(self._batches):
            hv = self._hvp_from(self._grads(x, y), vectors, retain=False)
            total = [h * n for h in hv] if total is None else [t + h * n for t, h in zip(total, hv)]
            count += n
        if total is None or count == 0:
            raise ValueError("data holds no samples")
        return [t / count for t in total]

    def matvec(self, flat: Tensor) -> Tensor:
        """H v for a flat ``v`` of ``numel`` entries."""
        return self.flatten(self.hvp(self.unflatten(flat)))

    # ---- spectra --------------------------------------------------------------------------------------
    def top_eigen(self, k: int = 2, max_iter: int = 100, tol: float = 1e-3, method: str = "power",
                  generator: torch.Generator | None = None) -> tuple[Tensor, list[list[Tensor]]]:
        """The ``k`` eigenvalues of largest magnitude, in decreasing |λ|, and their unit eigenvectors.

        ``method="power"``: power iteration with deflation, ``max_iter`` HVPs per eigenvalue at most.
        ``method="lanczos"``: Lanczos with full reorthogonalisation, ``max_iter`` HVPs in all at most
        (capped at ``numel``). ``tol`` is relative (see the module docstring for each stopping rule).
        """
        _check_positive_int("k", k)
        _check_positive_int("max_iter", max_iter)
        _check_tol("tol", tol)
        if k > self.numel:
            raise ValueError(f"k={k} exceeds the number of parameters {self.numel}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
        if method == "lanczos" and max_iter < k:
            raise ValueError(f"method='lanczos' needs max_iter >= k, got max_iter={max_iter}, k={k}")
        gen = _generator(generator)
        if method == "power":
            values, vectors = self._power(k, max_iter, tol, gen)
        else:
            values, vectors, _ = self._lanczos_top(k, min(max_iter, self.numel), tol, gen)
        return values, [self.unflatten(v) for v in vectors]

    def _power(self, k: int, max_iter: int, tol: float, gen: torch.Generator) -> tuple[Tensor, list[Tensor]]:
        values: list[float] = []
        basis = torch.empty(0, self.numel, dtype=self.dtype, device=self.device)
        for _ in range(k):
            lam = None
            v = self._random(gen, "normal")
            for it, (lam_new, v) in enumerate(power_steps(self.matvec, v, basis)):
                converged = lam is not None and abs(lam - lam_new) / (abs(lam) + 1e-6) < tol
                lam = lam_new
                if converged or it + 1 == max_iter:
                    break
            v = _unit(v - basis.T @ (basis @ v))
            values.append(lam)
            basis = torch.cat([basis, v[None]])
        return torch.tensor(values, dtype=self.dtype), list(basis)

    def _lanczos_top(self, k: int, m: int, tol: float, gen: torch.Generator
                     ) -> tuple[Tensor, list[Tensor], bool]:
        for step in lanczos_steps(self.matvec, self._random(gen, "normal"), m, lambda: self._random(gen, "normal")):
            j = len(step.alpha)
            if j < k:
                continue
            theta, s = step.ritz()
            order = theta.abs().argsort(descending=True)[:k]
            residual = step.beta_next * s[-1, order].abs()
            converged = bool((residual <= tol * theta[order].abs()).all())
            if converged or j == m:
                vectors = (step.basis.T @ s[:, order].to(step.basis.dtype)).T
                return theta[order].to(self.dtype), [_unit(v) for v in vectors], converged
        raise AssertionError("unreachable: lanczos_steps yields m >= k steps")

    def trace(self, n_samples: int = 100, tol: float | None = None, generator: torch.Generator | None = None
              ) -> float:
        """Hutchinson's estimate of tr H from up to ``n_samples`` Rademacher probes (early stop with ``tol``)."""
        _check_positive_int("n_samples", n_samples)
        if tol is not None:
            _check_tol("tol", tol)
        gen = _generator(generator)
        total, mean = 0.0, 0.0
        for i in range(n_samples):
            z = self._random(gen, "rademacher")
            total += float(self.matvec(z) @ z)
            previous, mean = mean, total / (i + 1)
            if tol is not None and i > 0 and abs(mean - previous) / (abs(previous) + 1e-6) < tol:
                break
        return mean

    def esd(self, n_iter: int = 100, n_runs: int = 1, generator: torch.Generator | None = None
            ) -> tuple[Tensor, Tensor]:
        """Stochastic Lanczos quadrature: float64 ``(nodes, weights)`` of shape ``(n_runs, m)``,
        m = min(n_iter, numel - 1) Lanczos steps per run (full reorthogonalisation)."""
        _check_positive_int("n_iter", n_iter)
        _check_positive_int("n_runs", n_runs)
        m = min(n_iter, max(self.numel - 1, 1))
        if m < n_iter:
            warnings.warn(f"n_iter={n_iter} Lanczos steps capped at numel - 1 = {m}: more steps than that lose "
                          f"orthogonality on rank-deficient Hessians", stacklevel=2)
        gen = _generator(generator)
        nodes, weights = [], []
        for _ in range(n_runs):
            step = None
            for step in lanczos_steps(self.matvec, self._random(gen, "rademacher"), m,
                                      lambda: self._random(gen, "normal")):
                pass
            theta, s = step.ritz()
            nodes.append(theta)
            weights.append(s[0] ** 2)
        return torch.stack(nodes), torch.stack(weights)


# ---- iteration kernels (shared by HessianOperator and hvps_to_accuracy) --------------------------------
def power_steps(matvec: Callable[[Tensor], Tensor], v: Tensor, basis: Tensor) -> Iterator[tuple[float, Tensor]]:
    """Endless power iteration deflated against the rows of ``basis``: yields (λ = <Hv, v>, Hv / ||Hv||)
    after each HVP."""
    while True:
        v = _unit(v - basis.T @ (basis @ v))
        hv = matvec(v)
        lam = float(hv @ v)
        v = _unit(hv)
        yield lam, v


class LanczosState:
    """The Lanczos recurrence after j steps: α_1..α_j, β_2..β_j (``beta``), β_{j+1} (``beta_next``) and
    the orthonormal basis (j x P)."""

    def __init__(self, alpha: list[float], beta: list[float], beta_next: float, basis: Tensor) -> None:
        self.alpha, self.beta, self.beta_next, self.basis = alpha, beta, beta_next, basis

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and eigenvectors of T_j, in float64."""
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if self.beta:
            off = torch.tensor(self.beta, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        return torch.linalg.eigh(t)


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """``w`` minus its projection on the rows of ``basis``, done twice (classical Gram-Schmidt twice)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos_steps(matvec: Callable[[Tensor], Tensor], v: Tensor, m: int, fresh: Callable[[], Tensor]
                  ) -> Iterator[LanczosState]:
    """Lanczos with full reorthogonalisation from ``v``: yields the state after each of ``m`` HVPs. On
    breakdown (β < 1e-8 max|α|) it continues from ``fresh()`` orthogonalised against the basis, with β = 0."""
    basis = v.new_empty(min(m, 32), v.numel())  # grown by doubling: memory follows the steps taken
    alpha: list[float] = []
    beta: list[float] = []
    q = _unit(v)
    for j in range(m):
        if j == len(basis):
            basis = torch.cat([basis, basis.new_empty(min(len(basis), m - j), v.numel())])
        basis[j] = q
        w = matvec(q)
        alpha.append(float(w @ q))
        w = _orthogonalize(w, basis[:j + 1])
        b = float(w.norm())
        yield LanczosState(alpha, beta, b, basis[:j + 1])
        if j + 1 == m:
            return
        if b < _BREAKDOWN * max(abs(a) for a in alpha):
            beta.append(0.0)
            q = _unit(_orthogonalize(fresh(), basis[:j + 1]))
        else:
            beta.append(b)
            q = w / b


# ---- functions on spectra -------------------------------------------------------------------------------
def _as_runs(name: str, values: object) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape (m,) or (n_runs, m) with m >= 1, got {tuple(t.shape)}")
    return t


def _nodes_weights(nodes: object, weights: object) -> tuple[Tensor, Tensor]:
    lam, tau = _as_runs("nodes", nodes), _as_runs("weights", weights)
    if lam.shape != tau.shape:
        raise ValueError(f"nodes and weights must have the same shape, got {tuple(lam.shape)} and "
                         f"{tuple(tau.shape)}")
    return lam, tau


def spectral_density(nodes: object, weights: object, num_bins: int = 10000, sigma2: float = 1e-5
                     ) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed spectral density of SLQ output: ``(grid, density)``, each of ``num_bins`` points;
    ``density.sum() * (grid[1] - grid[0]) == 1``."""
    lam, tau = _nodes_weights(nodes, weights)
    _check_positive_int("num_bins", num_bins)
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    _check_tol("sigma2", sigma2)
    hi = lam.max(dim=1).values.mean() + 0.001
    lo = lam.min(dim=1).values.mean() - 0.001
    grid = torch.linspace(float(lo), float(hi), num_bins, dtype=torch.float64)
    s2 = sigma2 * max(1.0, float(hi - lo))
    diff = grid[:, None, None] - lam[None]  # (bins, runs, m)
    kernel = torch.exp(-diff ** 2 / (2 * s2)) / math.sqrt(2 * math.pi * s2)
    density = (kernel * tau[None]).sum(dim=2).mean(dim=1)
    return grid, density / (density.sum() * (grid[1] - grid[0]))


def hessian_criteria(nodes: object, weights: object, n: float = 0.5) -> tuple[float, float]:
    """LLA's ``(re, Khn)`` from SLQ nodes/weights (or an exact spectrum with weights 1/P), mean over runs."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not n > 0:
        raise ValueError(f"n must be a positive number, got {n!r}")
    lam, tau = _nodes_weights(nodes, weights)
    lmax = lam.max(dim=1).values
    re = (lam.min(dim=1).values / lmax).abs()
    prod = (lam * tau).abs() ** n
    pos = torch.where(lam > 0, prod, 0.0).sum(dim=1)
    neg = torch.where(lam < 0, prod, 0.0).sum(dim=1)
    if bool((pos == 0).any()):
        warnings.warn("a run has no positive Ritz value: Khn is inf", RuntimeWarning, stacklevel=2)
    khn = torch.where(pos > 0, neg / pos.clamp_min(torch.finfo(torch.float64).tiny), math.inf)
    return float(re.mean()), float(khn.mean())


def exact_hessian(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch]) -> Tensor:
    """The dense P x P Hessian (``torch.func.jacrev`` twice: reverse-over-reverse, which needs the same
    double-backward support as the HVPs) of the same loss as :class:`HessianOperator`, in the parameters'
    order. O(P²) memory: for small models and tests."""
    names, params = _trainable(model)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_at(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        tensors = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]
        return _scalar_loss(model, loss_fn, dict(zip(names, tensors)), x, y)

    total, count = None, 0
    for x, y, n in _weighted_batches(_batches(data)):
        h = torch.func.jacrev(torch.func.jacrev(loss_at))(flat0, x, y) * n
        total = h if total is None else total + h
        count += n
    if total is None or count == 0:
        raise ValueError("data holds no samples")
    return total / count


def _largest_magnitude(values: Tensor) -> float:
    return float(values[values.abs().argmax()])


def hvps_to_accuracy(op: HessianOperator, method: str, rel_tol: float = 1e-3,
                     generator: torch.Generator | None = None, max_hvps: int = 1000) -> int:
    """HVPs that ``method`` ("power" or "lanczos") needs until its estimate of the top (largest |λ|)
    eigenvalue is within ``rel_tol`` of a converged Lanczos reference (residual <= max(1e-3 · rel_tol,
    100 eps) · |λ| within 1,000 steps; its HVPs are not counted). With equally seeded generators both
    methods start from the same vector. ``RuntimeError`` when the reference does not converge or the
    method needs more than ``max_hvps``."""
    if not isinstance(op, HessianOperator):
        raise TypeError(f"op must be a HessianOperator, got {type(op).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    _check_tol("rel_tol", rel_tol)
    _check_positive_int("max_hvps", max_hvps)
    gen = _generator(generator)
    ref_tol = max(1e-3 * rel_tol, 100 * torch.finfo(op.dtype).eps)
    values, _, converged = op._lanczos_top(1, min(_REFERENCE_STEPS, op.numel), ref_tol, gen)
    if not converged:
        raise RuntimeError(f"the Lanczos reference did not converge to a relative residual of {ref_tol:g} in "
                           f"{min(_REFERENCE_STEPS, op.numel)} steps")
    ref = float(values[0])
    v = op._random(gen, "normal")
    if method == "power":
        estimates = (lam for lam, _ in power_steps(op.matvec, v, v.new_empty(0, op.numel)))
    else:
        estimates = (_largest_magnitude(s.ritz()[0])
                     for s in lanczos_steps(op.matvec, v, min(max_hvps, op.numel), lambda: op._random(gen, "normal")))
    for count, lam in enumerate(estimates, start=1):
        if abs(lam - ref) <= rel_tol * abs(ref):
            return count
        if count == max_hvps:
            break
    raise RuntimeError(f"{method} did not reach {rel_tol:g} relative accuracy of the top eigenvalue {ref:.6g} "
                       f"within {max_hvps} HVPs")
