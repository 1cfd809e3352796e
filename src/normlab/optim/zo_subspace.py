r"""Zeroth-order Adam with Subspace Gradient (ZOODiP) and partial uniform timestep sampling.

Paper: "Efficient Personalization of Quantized Diffusion Model without Backpropagation" (ZOODiP, 2024).
Official code: https://github.com/ignoww/ZOODiP, file ``train_zoodip.py`` (class ``ZOAdam``: ``update``,
``update_eigenvecs``; functions ``zo_step``, ``zo_perturb_parameters``; the PCA refresh inside the training
loop) with the settings of ``train_zoodip.sh``. The paper trains one Textual-Inversion token of an int8
Stable Diffusion with forward passes only; this module offers the optimizer for any parameters of any model
whose loss a closure evaluates (quantised or otherwise non-differentiable ones included).

One step of :class:`ZOAdam` (``k`` counts completed updates; ``v`` is every parameter of a group flattened
into one vector of length ``d``)::

    L0 = closure()                                                    (under torch.no_grad)
    for i = 1..n:  s_i ~ private generator;  z_i = randn(d; seed s_i)  (parameter dtype, master dtype
                   for float16/bfloat16 parameters)
                   v <- v + mu z_i;  L_i = closure();  v <- v - mu z_i;  g_i = (L_i - L0) / mu
    g_hat = sum_i g_i z_i / (n sqrt((d_eff + n - 1) / n))             (z_i regenerated from s_i)
    g_hat <- P(g_hat)                                                  (subspace denoiser, if any)
    m <- b1 m + (1 - b1) g_hat;   s <- b2 s + (1 - b2) g_hat^2
    v <- v (1 - lr wd) - lr (m / (1 - b1^k)) / (sqrt(s / (1 - b2^k)) + eps)
    denoiser.observe(v)                                                (history of the iterates)

``d_eff = d - r`` with ``r`` the number of directions the denoiser currently removes (``r = 0`` before its
first refresh). ``sqrt((d + n - 1)/n)`` is MeZO's norm constant (exact for ``z`` uniform on the sphere of
radius ``sqrt(d)``; for Gaussian ``z`` the exact value is ``(d + n + 1)/n``); ``E[g_hat] = grad L /
sqrt((d_eff + n - 1)/n)`` before denoising. ``norm_scale=False`` divides by ``n`` only.

:class:`SubspaceDenoiser` keeps a ring buffer of the last ``history`` iterates (parameters, not gradients,
despite the official variable name ``grad_buffer``) and refreshes right after update ``k`` whenever
``k % refresh_every == 0`` (default ``refresh_every = history``, so the first refresh is at ``k = tau`` and
its basis applies from update ``k + 1``): ``H`` = the stored rows, each column standardised (subtract the
column mean, divide by the ``ddof=0`` std; exactly constant columns keep scale 1, as sklearn's
``StandardScaler``), float64 SVD of the centred ``H`` with ``K = min(rows, d)`` components, explained-variance
ratios ``r_j = S_j^2 / sum S^2`` with cumulative ``c_j``; ``i`` = first index with ``c_i > 1 - nu``; ``rho`` =
number of components with ``r_j > 1e-12``. ``mode="remove_minor"`` (the official code, default) removes
``V = components[i+1 : rho]`` (``g <- g - (g V^T) V``, ``r = rho - i - 1``): the gradient keeps the top
``i + 1`` history directions and everything orthogonal to the history span. ``mode="keep_top"`` projects
onto the top ``i + 1`` directions only (``r = d - i - 1``), the paper's wording. A history with zero total
variance removes nothing; a non-finite history raises ``FloatingPointError``. As in the code the basis is
computed in standardised coordinates and applied to the raw gradient (the PCA mean is unused), and ``d_eff``
shrinks at a refresh, which changes the step size discontinuously.

:func:`partial_uniform_timesteps` is the paper's PUTS: diffusion timesteps uniform on ``[t_min, t_max)``,
``[500, 900)`` of 1,000 training steps (the code's ``randint(500, T_train - 100)``).

Defaults are the released run script's: ``lr=1e-2``, ``betas=(0.9, 0.999)``, ``eps=1e-3`` (large on purpose:
it damps coordinates whose estimate has tiny variance), ``n_probes=2``, ``mu=1e-3``, ``history=128``,
``nu=1e-3`` (the argparse default 0.99 is not what the script runs).

Departures from the official code, and why:

- The zero-variance PCA components are excluded from ``V``. The code takes ``components[i+1:tau]``, which
  also holds the ``K - rho`` (normally one) null-space vectors the SVD backend picks arbitrarily, so it
  removes one extra random direction (and its ``d_eff`` is one smaller); that is not reproducible.
- Probe seeds come from a private ``torch.Generator`` (``generator=``, else one seeded with
  ``torch.initial_seed()``); the code reseeds the global RNG per probe, which also fixes the next step's
  data noise. ``step`` returns ``L0`` (the code returns the last perturbed loss).
- ``V``, ``m`` and ``s`` are kept in float32 (float64 for float64 parameters); the code keeps them in float16,
  where ``(1 - b2) g^2`` underflows for ``|g| < 8e-3``. float16/bfloat16 parameters get a float32 master copy
  (``mu = 1e-3`` is below float16 resolution for ``|v| > 2``): the probes write ``master + mu z`` into the
  parameter and restore it from the master, bit for bit. Other dtypes restore by subtraction, as the code does,
  so ``|delta v_j| <= n eps_mach (|v_j| + mu max_i |z_ij|)`` after a step with ``lr = 0``.
- Several param groups: one probe perturbs every group at once (one forward per probe, as MeZO); each group
  has its own flattened vector, Adam state and denoiser, and ``d_eff`` sums over the groups. ``n_probes``,
  ``mu`` and ``norm_scale`` must therefore agree across groups. ``subspace`` is a :class:`SubspaceDenoiser`
  (one group only) or a zero-argument factory called once per group. ``weight_decay`` is decoupled (AdamW);
  the code has none.
- A warning is issued when every ``g_i`` was exactly zero for :data:`ZERO_STEPS_WARN` steps in a row (``mu`` too
  small for a quantised, piecewise-constant loss).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ._common import CheckedGroups, check_betas, check_nonnegative, check_positive

__all__ = ["SubspaceDenoiser", "ZOAdam", "partial_uniform_timesteps", "probe_direction"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
ZERO_STEPS_WARN = 5          # consecutive all-zero-difference steps before the warning
_VARIANCE_FLOOR = 1e-12      # explained-variance ratio below which a component counts as zero variance
_MODES = ("remove_minor", "keep_top")


def partial_uniform_timesteps(batch: int, t_min: int = 500, t_max: int = 900,
                              generator: torch.Generator | None = None) -> Tensor:
    """Partial Uniform Timestep Sampling: ``batch`` int64 timesteps uniform on ``{t_min, ..., t_max - 1}``
    (default ``[500, 900)``, the official ``randint(500, T_train - 100)`` with ``T_train = 1000``)."""
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"Invalid batch: {batch}")
    if not (isinstance(t_min, int) and isinstance(t_max, int) and 0 <= t_min < t_max):
        raise ValueError(f"Invalid timestep range: [{t_min}, {t_max}) (need integers 0 <= t_min < t_max)")
    device = generator.device if generator is not None else None
    return torch.randint(t_min, t_max, (batch,), generator=generator, device=device, dtype=torch.long)


def probe_direction(seed: int, numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The probe ``z ~ N(0, I_numel)`` drawn from a generator seeded with ``seed``: the seed trick, the same
    ``z`` every time it is regenerated with the same arguments."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(numel, generator=gen, dtype=dtype, device=device)


# --------------------------------------------------------------------------- subspace denoiser


def _standardize(h: Tensor) -> Tensor:
    """Columns of ``h`` centred and divided by their ddof-0 std; exactly constant columns become zero."""
    constant = h.amax(0) == h.amin(0)
    centred = torch.where(constant, 0.0, h - h.mean(0))
    std = centred.square().mean(0).sqrt()
    return centred / torch.where(constant, 1.0, std)


def history_basis(history: Tensor, nu: float, standardize: bool = True) -> tuple[Tensor, int, int]:
    """``(components, i, rho)`` of the refresh: the float64 PCA basis of the (standardised) rows of
    ``history`` (``K = min(rows, d)`` orthonormal rows, by decreasing variance), the first index ``i`` whose
    cumulative explained-variance ratio exceeds ``1 - nu`` and the number ``rho`` of components with ratio
    above 1e-12. Zero total variance gives ``i = rho = 0`` (nothing to remove)."""
    if not bool(torch.isfinite(history).all()):
        raise FloatingPointError("SubspaceDenoiser: the parameter history contains NaN or inf")
    h = history.double()
    z = _standardize(h) if standardize else h - h.mean(0)
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    var = s.square()
    total = var.sum()
    if total == 0:
        return vh, 0, 0
    ratios = var / total
    rho = int((ratios > _VARIANCE_FLOOR).sum())
    above = (ratios.cumsum(0) > 1 - nu).nonzero()
    i = int(above[0]) if len(above) else rho - 1
    return vh, min(i, rho - 1), rho


class SubspaceDenoiser:
    """The history-subspace projection of ZOODiP ("Subspace Gradient"); see the module docstring.

    ``observe(flat_params)`` appends one iterate to the ring buffer of the last ``history`` iterates and
    refreshes the basis every ``refresh_every`` observations (default ``history``); ``__call__(flat_grad)``
    applies the projection (the identity before the first refresh and when the history has zero variance).
    ``removed_dim`` is the number of directions removed (``r``). The buffer is allocated on the first
    ``observe`` in that tensor's dtype and device; the basis is kept in the same dtype.
    """

    def __init__(self, history: int = 128, nu: float = 1e-3, standardize: bool = True,
                 mode: str = "remove_minor", refresh_every: int | None = None) -> None:
        if not isinstance(history, int) or history < 2:
            raise ValueError(f"Invalid history: {history} (need an integer >= 2)")
        if not 0.0 < nu < 1.0:
            raise ValueError(f"Invalid nu: {nu} (need 0 < nu < 1)")
        if mode not in _MODES:
            raise ValueError(f"Invalid mode: {mode!r} (valid: {list(_MODES)})")
        if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
            raise ValueError(f"Invalid refresh_every: {refresh_every} (need an integer >= 1 or None)")
        self.history, self.nu, self.standardize, self.mode = history, nu, standardize, mode
        self.refresh_every = history if refresh_every is None else refresh_every
        self.buffer: Tensor | None = None
        self.count = 0
        self.basis: Tensor | None = None  # rows removed (remove_minor) or kept (keep_top)
        self.removed_dim = 0

    def observe(self, flat_params: Tensor) -> None:
        """Store one iterate (a 1-d tensor) and refresh the basis when the period is reached."""
        flat = flat_params.detach().reshape(-1)
        if self.buffer is None:
            self.buffer = torch.zeros(self.history, flat.numel(), dtype=flat.dtype, device=flat.device)
        elif flat.numel() != self.buffer.shape[1]:
            raise ValueError(f"SubspaceDenoiser: expected {self.buffer.shape[1]} values per iterate, got "
                             f"{flat.numel()}")
        self.buffer[self.count % self.history].copy_(flat)
        self.count += 1
        if self.count % self.refresh_every == 0 and self.count >= 2:
            self.refresh()

    def refresh(self) -> None:
        """Recompute the basis from the stored iterates (module docstring, refresh)."""
        rows = self.buffer[: min(self.count, self.history)]
        vh, i, rho = history_basis(rows, self.nu, self.standardize)
        d = rows.shape[1]
        if rho == 0:
            self.basis, self.removed_dim = None, 0
        elif self.mode == "remove_minor":
            r = max(rho - i - 1, 0)
            self.basis = vh[i + 1: rho].to(rows.dtype) if r else None
            self.removed_dim = r
        else:
            self.basis = vh[: i + 1].to(rows.dtype)
            self.removed_dim = d - i - 1

    def __call__(self, flat_grad: Tensor) -> Tensor:
        if self.basis is None:
            return flat_grad
        basis = self.basis.to(flat_grad.dtype)
        kept = flat_grad @ basis.T @ basis
        return flat_grad - kept if self.mode == "remove_minor" else kept

    def state_dict(self) -> dict:
        return {"buffer": None if self.buffer is None else self.buffer.clone(), "count": self.count,
                "basis": None if self.basis is None else self.basis.clone(), "removed_dim": self.removed_dim}

    def load_state_dict(self, state: dict) -> None:
        buffer = state["buffer"]
        if buffer is not None and buffer.shape[0] != self.history:
            raise ValueError(f"SubspaceDenoiser: state has history {buffer.shape[0]}, this one {self.history}")
        self.buffer = None if buffer is None else buffer.clone()
        self.count = int(state["count"])
        self.basis = None if state["basis"] is None else state["basis"].clone()
        self.removed_dim = int(state["removed_dim"])

    def __repr__(self) -> str:
        return (f"SubspaceDenoiser(history={self.history}, nu={self.nu}, standardize={self.standardize}, "
                f"mode={self.mode!r}, refresh_every={self.refresh_every})")


# --------------------------------------------------------------------------- Adam part


def zo_adam_update(master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One Adam update of the flat vector ``master`` in place: bias-corrected, ``eps`` outside the sqrt,
    decoupled weight decay (the official ``ZOAdam.update`` operations in their order, so the result is
    bitwise the official one). ``grad`` is used as scratch space and overwritten."""
    scratch = torch.mul(grad, 1 - beta1)
    exp_avg.mul_(beta1).add_(scratch)
    exp_avg_sq.mul_(beta2).add_(grad.square_().mul_(1 - beta2))
    if weight_decay:
        master.mul_(1 - lr * weight_decay)
    v_hat = torch.div(exp_avg_sq, 1 - beta2 ** step, out=grad)
    step_size = torch.div(exp_avg, 1 - beta1 ** step, out=scratch).mul_(lr)
    master.sub_(step_size.div_(v_hat.sqrt_().add_(eps)))


class ZOAdam(CheckedGroups):
    """Zeroth-order Adam (ZOODiP): forward-difference probes along Gaussian directions, an Adam update, and
    an optional history-subspace denoiser; see the module docstring for the rule, defaults and departures.

    ``step(closure)`` needs the closure (it evaluates the loss ``n_probes + 1`` times under ``torch.no_grad``,
    with the same data each time) and returns the unperturbed loss. It never calls ``backward``; parameters
    may have ``requires_grad=False``. All parameters of a group share one dtype and device.
    State of each group (under its first parameter): ``step``, ``exp_avg``, ``exp_avg_sq`` (flat, float32 for
    float16/bfloat16 parameters) and ``master`` (float16/bfloat16 only); ``state_dict`` also carries the
    generator state and the denoisers' buffers and bases, so a resumed run is bit-identical.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-3, weight_decay: float = 0.0, n_probes: int = 2, mu: float = 1e-3,
                 norm_scale: bool = True,
                 subspace: SubspaceDenoiser | Callable[[], SubspaceDenoiser] | None = None,
                 generator: torch.Generator | None = None) -> None:
        if subspace is not None and not isinstance(subspace, SubspaceDenoiser) and not callable(subspace):
            raise TypeError(f"subspace must be a SubspaceDenoiser, a factory of them or None, got {subspace!r}")
        self._subspace = subspace
        self.denoisers: list[SubspaceDenoiser | None] = []
        self.generator = generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed())
        self._zero_steps = 0
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, n_probes=n_probes, mu=mu,
                        norm_scale=norm_scale)
        self._check_options(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_options(group: dict) -> None:
        check_nonnegative("lr", group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if not isinstance(group["n_probes"], int) or group["n_probes"] < 1:
            raise ValueError(f"Invalid n_probes: {group['n_probes']} (need an integer >= 1)")
        check_positive("mu", group["mu"])

    def _check_group(self, group: dict) -> None:
        self._check_options(group)
        params = group["params"]
        if not params:
            raise ValueError("ZOAdam got a param group without parameters")
        first = params[0]
        for p in params:
            if p.is_sparse:
                raise ValueError("ZOAdam does not support sparse parameters")
            if not p.is_floating_point():
                raise ValueError(f"ZOAdam needs floating-point parameters, got {p.dtype}")
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"ZOAdam needs one dtype and device per param group, got {first.dtype} on "
                                 f"{first.device} and {p.dtype} on {p.device}")
        if self.param_groups[0] is not group:
            for key in ("n_probes", "mu", "norm_scale"):
                if group[key] != self.param_groups[0][key]:
                    raise ValueError(f"Invalid {key}: {group[key]} (all param groups share the probes, so "
                                     f"{key} must equal the first group's {self.param_groups[0][key]})")
        if isinstance(self._subspace, SubspaceDenoiser):
            if len(self.param_groups) > 1:
                raise ValueError("one SubspaceDenoiser serves one param group: pass a factory "
                                 "(e.g. lambda: SubspaceDenoiser(...)) for several groups")
            denoiser = self._subspace
        else:
            denoiser = self._subspace() if self._subspace is not None else None
        self.denoisers.append(denoiser)

    # -- state -----------------------------------------------------------------------------------------

    def _group_state(self, group: dict) -> dict:
        params = group["params"]
        state = self.state[params[0]]
        if not state:
            first = params[0]
            low = first.dtype in _LOW_PRECISION
            dtype = torch.float32 if low else first.dtype
            d = sum(p.numel() for p in params)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(d, dtype=dtype, device=first.device)
            state["exp_avg_sq"] = torch.zeros(d, dtype=dtype, device=first.device)
            if low:
                state["master"] = torch.cat([p.detach().reshape(-1).float() for p in params])
        return state

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["zo"] = {"generator": self.generator.get_state(), "zero_steps": self._zero_steps,
                     "denoisers": [None if den is None else den.state_dict() for den in self.denoisers]}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo")
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype: restore the float32 state of low-precision groups
        saved = state_dict["state"]
        index = 0
        for group in self.param_groups:
            if index in saved:
                first = group["params"][0]
                self.state[first] = {k: v.to(first.device, copy=True) if isinstance(v, Tensor) else v
                                     for k, v in saved[index].items()}
            index += len(group["params"])
        self.generator.set_state(zo["generator"])
        self._zero_steps = int(zo["zero_steps"])
        if len(zo["denoisers"]) != len(self.denoisers):
            raise ValueError(f"state has {len(zo['denoisers'])} denoiser entries, this optimizer {len(self.denoisers)}")
        for den, st in zip(self.denoisers, zo["denoisers"]):
            if (den is None) != (st is None):
                raise ValueError("state and optimizer disagree on which groups have a SubspaceDenoiser")
            if den is not None:
                den.load_state_dict(st)

    # -- step ------------------------------------------------------------------------------------------

    def _shift(self, group: dict, state: dict, mu_z: Tensor, restore: bool) -> None:
        """``v <- v + mu z`` or, with ``restore``, ``v <- v - mu z`` (the official restore by subtraction);
        float16/bfloat16 groups write ``master + mu z`` and restore from the master."""
        params = group["params"]
        sizes = [p.numel() for p in params]
        if "master" in state:
            shifted = state["master"] if restore else state["master"] + mu_z
            for p, c in zip(params, shifted.split(sizes)):
                p.copy_(c.view_as(p))
        else:
            chunks = [c.view_as(p) for p, c in zip(params, mu_z.split(sizes))]
            (torch._foreach_sub_ if restore else torch._foreach_add_)(list(params), chunks)

    @staticmethod
    def _check_finite(value: float, step: int, what: str) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(f"ZOAdam: non-finite loss {value} at step {step} ({what})")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One ZO-Adam step; returns the unperturbed loss ``L0``."""
        if closure is None:
            raise RuntimeError("ZOAdam requires a closure")
        groups = self.param_groups
        states = [self._group_state(g) for g in groups]
        k = states[0]["step"] + 1  # for messages; each group counts its own updates
        n, mu = groups[0]["n_probes"], groups[0]["mu"]
        dims = [s["exp_avg"].numel() for s in states]
        dtypes = [s["exp_avg"].dtype for s in states]
        devices = [g["params"][0].device for g in groups]
        loss0 = closure()
        l0 = float(loss0)
        self._check_finite(l0, k, "unperturbed")
        seeds = torch.randint(0, 2 ** 62, (n,), generator=self.generator, device=self.generator.device).tolist()
        diffs = []
        for i, seed in enumerate(seeds):
            mu_zs = [probe_direction(seed + j, d, dt, dev).mul_(mu)
                     for j, (d, dt, dev) in enumerate(zip(dims, dtypes, devices))]
            for g, s, mu_z in zip(groups, states, mu_zs):
                self._shift(g, s, mu_z, restore=False)
            li = float(closure())
            for g, s, mu_z in zip(groups, states, mu_zs):
                self._shift(g, s, mu_z, restore=True)
            self._check_finite(li, k, f"probe {i + 1} of {n}")
            diffs.append((li - l0) / mu)
        self._zero_steps = self._zero_steps + 1 if all(g == 0 for g in diffs) else 0
        if self._zero_steps == ZERO_STEPS_WARN:
            warnings.warn(f"ZOAdam: every finite difference was exactly zero for {ZERO_STEPS_WARN} steps in a row "
                          f"(mu={mu} may be below the loss resolution of a quantised model)", RuntimeWarning,
                          stacklevel=2)
        d_eff = sum(d - (den.removed_dim if den is not None else 0) for d, den in zip(dims, self.denoisers))
        scale = n * math.sqrt((d_eff + n - 1) / n) if groups[0]["norm_scale"] else n
        for j, (group, state, den) in enumerate(zip(groups, states, self.denoisers)):
            grad = torch.zeros(dims[j], dtype=dtypes[j], device=devices[j])
            for seed, gi in zip(seeds, diffs):
                grad.add_(probe_direction(seed + j, dims[j], dtypes[j], devices[j]).mul_(gi))
            grad.div_(scale)
            if den is not None:
                grad = den(grad)
            state["step"] += 1
            params = group["params"]
            in_place = "master" not in state and len(params) == 1 and params[0].is_contiguous()
            if "master" in state:
                master = state["master"]
            else:
                master = params[0].view(-1) if in_place else torch.cat([p.reshape(-1) for p in params])
            beta1, beta2 = group["betas"]
            zo_adam_update(master, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            if not in_place:
                for p, c in zip(params, master.split([p.numel() for p in params])):
                    p.copy_(c.view_as(p))
            if den is not None:
                den.observe(master)
        return loss0
