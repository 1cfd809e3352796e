"""Adaptive Guidance (AG) and LinearAG: classifier-free guidance that drops the unconditional evaluation
once it stops mattering.

Paper: Angela Castillo, Jonas Kohler, Juan C. Pérez, Juan Pablo Pérez, Albert Pumarola, Bernard Ghanem,
Pablo Arbeláez, Ali Thabet, "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
2023 (AAAI 2025), arXiv:2312.12487. Official code: none released (project page
bcv-uniandes.github.io/adaptiveguidance-wp). A community ComfyUI port (asagi4/ComfyUI-Adaptive-Guidance,
``AdaptiveGuider.check_similarity``) served as a behavioural reference only.

Classifier-free guidance (CFG) with scale ``s`` uses, at every denoising step,

    eps_tilde = eps_u + s (eps_c - eps_u),   eps_c = eps(x_t, t, c),   eps_u = eps(x_t, t, uncond)

i.e. two network evaluations. AG keeps a per-sample switch ``on_b`` (True at the first step). At each
step ``eps_c`` is evaluated for the whole batch and ``eps_u`` only for the samples still ``on``; for those

    gamma_b = <a_b, g_b> / max(||a_b|| ||g_b||, 1e-8)     (flattened over all non-batch dims, float32)

with ``(a, g) = (eps_c, eps_tilde)`` (``criterion="cond_vs_cfg"``, the paper's test) or ``(eps_c, eps_u)``
(``"cond_vs_uncond"``, what the ComfyUI port compares). The sample uses ``eps_tilde`` at this step and, if
``gamma_b > threshold``, switches guidance off for all later steps (one-way). Samples that are off use
``eps_c`` alone. ``space="x0"`` measures the cosine between the implied clean images
``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` instead (needs ``alpha_bar_t``). A zero vector
on either side is "not converged" (its cosine is 0 and it never fires). ``min_guided_steps = m``: the
first ``m`` steps always use CFG (the test may fire from step ``m - 1`` on, so at least ``max(m, 1)`` steps
are guided).

``nfe`` counts network evaluations per sample: one row of a batch passed through ``model_fn`` is one
evaluation, so a sampler of ``N`` steps on ``b`` samples costs ``N b`` (conditional only) to ``2 N b``
(plain CFG), and AG costs ``N b + (number of guided sample-steps)``.

LinearAG replaces the unconditional call at the chosen steps ``S`` (step indices in sampling order, 0 =
the first, noisiest step) by an OLS estimate from quantities already computed,

    eps_u_hat(k) = alpha_k0 eps_c(k) + sum_{j=1..w} [alpha_kj,c eps_c(k - j) + alpha_kj,u eps_u(k - j)]

(the previous steps' ``eps_u`` being the real or the estimated one), with scalar, intercept-free
coefficients per step fitted once over all pixels of full-CFG calibration trajectories (``fit``).

:class:`TruncatedGuidance` is the fixed schedule AG is compared with: CFG on the first ``k`` steps, then
conditional only. :func:`ddpm_sample` runs DDPM ancestral sampling with any of these policies.

Defaults: ``guidance_scale = 7.5`` (Stable Diffusion's), ``threshold = 0.99`` (the ComfyUI port's; the
sheet's toy needed 0.95-0.98 in x0 space), ``criterion="cond_vs_cfg"`` and ``space="eps"`` (the paper's),
``window = 1``.

Departures from the paper: the regressor set of LinearAG is the general "window of past estimates" above
(the paper's exact set was not verified); the paper's differentiable search over per-step policies is not
implemented; ``space="x0"`` is an addition (on pixel-space epsilon models the epsilon-space cosine falls
along the trajectory, so the premise of AG holds only in x0 space there; see ``normlab bench
adaptive_guidance``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

ModelFn = Callable[[torch.Tensor, Any, Any], torch.Tensor]
CRITERIA = ("cond_vs_cfg", "cond_vs_uncond")
SPACES = ("eps", "x0")
COSINE_EPS = 1e-8


def guidance_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Per-sample cosine of ``a`` and ``b`` (``(B, ...)``), flattened over all non-batch dims, in float32:
    ``<a, b> / max(||a|| ||b||, eps)``, so a zero vector gives 0 (never NaN)."""
    if a.shape != b.shape:
        raise ValueError(f"expected tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` in float32; ``alpha_bar_t`` a scalar or
    per-sample ``(B,)``."""
    abar = torch.as_tensor(alpha_bar_t, dtype=torch.float32, device=x_t.device)
    if abar.dim():
        abar = abar.reshape(-1, *(1,) * (x_t.dim() - 1))
    return (x_t.float() - (1 - abar).sqrt() * eps.float()) / abar.sqrt()


def _rows(value: Any, idx: torch.Tensor, batch: int) -> Any:
    """``value[idx]`` for a per-sample tensor (leading dim ``batch``); anything else is shared."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[idx]
    return value


class AdaptiveGuidance:
    """Classifier-free guidance with per-sample Adaptive Guidance (see the module docstring).

    Call :meth:`reset` with the batch size before each sampling run, then once per denoising step
    ``eps = ag(model_fn, x_t, t, cond, uncond, alpha_bar_t)`` where ``model_fn(x, t, c)`` returns the
    epsilon prediction. ``t``, ``cond``, ``uncond`` and ``alpha_bar_t`` may be per-sample (leading dim = the
    batch; sliced to the guided sub-batch) or shared. ``threshold=float('inf')`` never fires: plain CFG.
    After each call ``last_cosine`` holds the per-sample cosine (NaN for samples not guided at that step),
    ``last_eps_c`` and ``last_eps_u`` the conditional and unconditional predictions (NaN rows where no
    unconditional estimate was made).
    """

    def __init__(self, guidance_scale: float = 7.5, threshold: float = 0.99, criterion: str = "cond_vs_cfg",
                 space: str = "eps", min_guided_steps: int = 0) -> None:
        if not guidance_scale >= 0:
            raise ValueError(f"Invalid guidance_scale: {guidance_scale} (need >= 0)")
        if not (-1 <= threshold <= 1 or threshold == math.inf):
            raise ValueError(f"Invalid threshold: {threshold} (need -1 <= threshold <= 1, or inf for never)")
        if criterion not in CRITERIA:
            raise ValueError(f"Invalid criterion: {criterion!r}; valid: {list(CRITERIA)}")
        if space not in SPACES:
            raise ValueError(f"Invalid space: {space!r}; valid: {list(SPACES)}")
        if not isinstance(min_guided_steps, int) or min_guided_steps < 0:
            raise ValueError(f"Invalid min_guided_steps: {min_guided_steps!r} (need an int >= 0)")
        self.guidance_scale, self.threshold = float(guidance_scale), float(threshold)
        self.criterion, self.space, self.min_guided_steps = criterion, space, min_guided_steps
        self._on: torch.Tensor | None = None
        self.step, self.nfe = 0, 0
        self.last_cosine = self.last_eps_c = self.last_eps_u = None

    def reset(self, batch_size: int) -> None:
        """Start a sampling run of ``batch_size`` samples: every sample guided, ``nfe`` and ``step`` at 0."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        self._on = torch.ones(batch_size, dtype=torch.bool)
        self.step, self.nfe = 0, 0
        self.last_cosine = self.last_eps_c = self.last_eps_u = None
        self._apply_schedule()

    @property
    def guided_mask(self) -> torch.Tensor:
        """``(B,)`` bool: the samples that will be guided at the next step."""
        if self._on is None:
            raise RuntimeError("call reset(batch_size) before sampling")
        return self._on.clone()

    def _apply_schedule(self) -> None:
        """Hook for fixed schedules (:class:`TruncatedGuidance`), run at reset and after each step."""

    def _uncond(self, model_fn: ModelFn, x_t: torch.Tensor, t: Any, uncond: Any, eps_c: torch.Tensor,
                idx: torch.Tensor, full: bool) -> torch.Tensor:
        """The unconditional prediction of the rows ``idx`` (one network call on that sub-batch)."""
        b = x_t.shape[0]
        x, tt, u = (x_t, t, uncond) if full else (x_t[idx], _rows(t, idx, b), _rows(uncond, idx, b))
        eps_u = model_fn(x, tt, u)
        self.nfe += x.shape[0]
        return eps_u

    def __call__(self, model_fn: ModelFn, x_t: torch.Tensor, t: Any, cond: Any, uncond: Any,
                 alpha_bar_t: torch.Tensor | float | None = None) -> torch.Tensor:
        if self._on is None:
            raise RuntimeError("call reset(batch_size) before sampling")
        b = x_t.shape[0]
        if b != self._on.numel():
            raise ValueError(f"expected a batch of {self._on.numel()} samples (as given to reset), got {b}")
        if self.space == "x0" and alpha_bar_t is None:
            raise ValueError("space='x0' needs alpha_bar_t")
        eps_c = model_fn(x_t, t, cond)
        self.nfe += b
        if eps_c.shape != x_t.shape:
            raise ValueError(f"expected eps_c of shape {tuple(x_t.shape)}, got {tuple(eps_c.shape)}")
        idx = self._on.nonzero().squeeze(1).to(x_t.device)
        full = idx.numel() == b
        self.last_cosine = torch.full((b,), math.nan)
        self.last_eps_u = torch.full_like(eps_c, math.nan)
        self.last_eps_c = eps_c
        out = eps_c
        if idx.numel():
            eps_c_g = eps_c if full else eps_c[idx]
            eps_u = self._uncond(model_fn, x_t, t, uncond, eps_c, idx, full)
            if eps_u.shape != eps_c_g.shape:
                raise ValueError(f"eps_u has shape {tuple(eps_u.shape)}, expected the shape of eps_c "
                                 f"{tuple(eps_c_g.shape)}")
            guided = eps_u + self.guidance_scale * (eps_c_g - eps_u)
            other = guided if self.criterion == "cond_vs_cfg" else eps_u
            ref = eps_c_g
            if self.space == "x0":
                x_g = x_t if full else x_t[idx]
                abar = _rows(torch.as_tensor(alpha_bar_t), idx, b) if not full else alpha_bar_t
                ref, other = predicted_x0(x_g, ref, abar), predicted_x0(x_g, other, abar)
            cos = guidance_cosine(ref, other)
            self.last_cosine[idx.cpu()] = cos.cpu()
            if full:
                self.last_eps_u, out = eps_u, guided
            else:
                self.last_eps_u[idx] = eps_u
                out = eps_c.clone()
                out[idx] = guided
            if self.step + 1 >= self.min_guided_steps:
                self._on[idx.cpu()[(cos > self.threshold).cpu()]] = False
        self.step += 1
        self._apply_schedule()
        return out


class TruncatedGuidance(AdaptiveGuidance):
    """Fixed truncation: CFG on the first ``guided_steps`` steps, conditional only afterwards (the
    baseline of AG; ``guided_steps=0`` is conditional-only sampling). NFE = ``(N + guided_steps) b``."""

    def __init__(self, guidance_scale: float = 7.5, guided_steps: int = 0) -> None:
        if not isinstance(guided_steps, int) or guided_steps < 0:
            raise ValueError(f"Invalid guided_steps: {guided_steps!r} (need an int >= 0)")
        super().__init__(guidance_scale, threshold=math.inf)
        self.guided_steps = guided_steps

    def _apply_schedule(self) -> None:
        if self.step >= self.guided_steps:
            self._on[:] = False


class LinearAG(AdaptiveGuidance):
    """Adaptive Guidance whose unconditional call is replaced, at the steps ``linear_steps`` (indices in
    sampling order, each ``>= window``), by an intercept-free linear combination of ``eps_c`` now and
    ``eps_c``, ``eps_u`` at the ``window`` previous steps, with per-step coefficients from :meth:`fit`."""

    def __init__(self, guidance_scale: float = 7.5, threshold: float = 0.99, criterion: str = "cond_vs_cfg",
                 space: str = "eps", min_guided_steps: int = 0, *, linear_steps: Sequence[int] = (),
                 window: int = 1) -> None:
        super().__init__(guidance_scale, threshold, criterion, space, min_guided_steps)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"Invalid window: {window!r} (need an int >= 1)")
        steps = sorted(set(int(k) for k in linear_steps))
        if steps and steps[0] < window:
            raise ValueError(f"Invalid linear_steps: {steps} (each needs {window} earlier step(s), so >= {window})")
        self.linear_steps, self.window = tuple(steps), window
        self.coefficients: dict[int, torch.Tensor] = {}
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self._history = []

    def _regressors(self, eps_c: torch.Tensor, history: Sequence[tuple[torch.Tensor, torch.Tensor]]
                    ) -> list[torch.Tensor]:
        """``[eps_c(k), eps_c(k-1), eps_u(k-1), ..., eps_c(k-w), eps_u(k-w)]``."""
        out = [eps_c]
        for prev_c, prev_u in reversed(history[-self.window:]):
            out += [prev_c, prev_u]
        return out

    def fit(self, trajectories: Sequence[dict[str, Any]]) -> dict[int, torch.Tensor]:
        """Per-step OLS coefficients from full-CFG trajectories, each a dict with ``"eps_c"`` and ``"eps_u"``:
        ``(N, B, ...)`` tensors or lists of ``(B, ...)`` tensors, step 0 first. Returns (and stores)
        ``{step: coefficients (1 + 2 window,) float64}``."""
        if not trajectories:
            raise ValueError("fit needs at least one trajectory")
        stacked = []
        for traj in trajectories:
            c, u = (torch.stack(list(traj[k])) if not isinstance(traj[k], torch.Tensor) else traj[k]
                    for k in ("eps_c", "eps_u"))
            if c.shape != u.shape:
                raise ValueError(f"eps_c has shape {tuple(c.shape)} but eps_u has shape {tuple(u.shape)}")
            if self.linear_steps and c.shape[0] <= self.linear_steps[-1]:
                raise ValueError(f"a trajectory has {c.shape[0]} steps, linear_steps need "
                                 f"{self.linear_steps[-1] + 1}")
            stacked.append((c.double(), u.double()))
        coefficients = {}
        for k in self.linear_steps:
            columns = [[] for _ in range(1 + 2 * self.window)]
            targets = []
            for c, u in stacked:
                history = [(c[j], u[j]) for j in range(k - self.window, k)]
                for col, reg in zip(columns, self._regressors(c[k], history)):
                    col.append(reg.reshape(-1))
                targets.append(u[k].reshape(-1))
            design = torch.stack([torch.cat(col) for col in columns], 1)
            coefficients[k] = torch.linalg.lstsq(design, torch.cat(targets)[:, None]).solution[:, 0]
        self.coefficients = coefficients
        return coefficients

    def state_dict(self) -> dict[str, Any]:
        return {"linear_steps": list(self.linear_steps), "window": self.window,
                "coefficients": {k: v.clone() for k, v in self.coefficients.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["linear_steps"]) != list(self.linear_steps) or state["window"] != self.window:
            raise ValueError(f"state is for linear_steps={state['linear_steps']}, window={state['window']}; this "
                             f"LinearAG has linear_steps={list(self.linear_steps)}, window={self.window}")
        self.coefficients = {int(k): v.clone().double() for k, v in state["coefficients"].items()}

    def _uncond(self, model_fn, x_t, t, uncond, eps_c, idx, full):
        if self.step not in self.linear_steps:
            return super()._uncond(model_fn, x_t, t, uncond, eps_c, idx, full)
        if self.step not in self.coefficients:
            raise ValueError(f"LinearAG step {self.step} has no fitted coefficients: call fit() or "
                             f"load_state_dict() first")
        coef = self.coefficients[self.step]
        regs = self._regressors(eps_c, self._history)
        estimate = sum(a.to(eps_c.dtype) * r for a, r in zip(coef, regs))
        return estimate if full else estimate[idx]

    def __call__(self, model_fn, x_t, t, cond, uncond, alpha_bar_t=None):
        out = super().__call__(model_fn, x_t, t, cond, uncond, alpha_bar_t)
        self._history = (self._history + [(self.last_eps_c, self.last_eps_u)])[-self.window:]
        return out


def ddpm_sample(model_fn: ModelFn, schedule: Any, guidance: AdaptiveGuidance, cond: Any, uncond: Any,
                shape: Sequence[int], generator: torch.Generator, *, record: bool = False
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """DDPM ancestral sampling (Ho et al. 2020) over all ``schedule.num_steps`` steps with a guidance policy.

    ``x_N ~ N(0, I)``, then for ``n = N .. 1``: ``eps = guidance(model_fn, x_n, t, cond, uncond, abar_n)`` with
    ``t`` the int64 step ``n`` per sample, ``x_{n-1} = (x_n - beta_n / sqrt(1 - abar_n) eps) / sqrt(alpha_n)
    + sqrt(beta_n) z`` (no noise at ``n = 1``). All noise comes from ``generator`` (CPU) in a fixed order,
    so every policy sees the same initial and per-step noise. ``schedule`` is a
    :class:`normlab.bench.tasks.DDPMSchedule` (any object with ``num_steps``, ``betas``, ``alphas``,
    ``alphas_cumprod``). Returns the samples and ``{"nfe", "guided" (per-step count of guided samples),
    "cosine" (per-step mean of ``guidance.last_cosine`` over the guided samples)}``, plus ``"eps_c"`` and
    ``"eps_u"`` (``(N, B, ...)``, step 0 first) when ``record`` (the input of :meth:`LinearAG.fit`).
    """
    b = shape[0]
    guidance.reset(b)
    x = torch.randn(tuple(shape), generator=generator)
    info: dict[str, Any] = {"guided": [], "cosine": []}
    eps_c, eps_u = [], []
    for n in range(schedule.num_steps, 0, -1):
        beta, alpha = schedule.betas[n - 1].item(), schedule.alphas[n - 1].item()
        abar = schedule.alphas_cumprod[n - 1].item()
        info["guided"].append(int(guidance.guided_mask.sum()))
        eps = guidance(model_fn, x, torch.full((b,), n, dtype=torch.long), cond, uncond, abar)
        cos = guidance.last_cosine[~guidance.last_cosine.isnan()]
        info["cosine"].append(cos.mean().item() if cos.numel() else math.nan)
        if record:
            eps_c.append(guidance.last_eps_c.detach())
            eps_u.append(guidance.last_eps_u.detach())
        x = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        if n > 1:
            x = x + math.sqrt(beta) * torch.randn(tuple(shape), generator=generator)
    info["nfe"] = guidance.nfe
    if record:
        info["eps_c"], info["eps_u"] = torch.stack(eps_c), torch.stack(eps_u)
    return x, info


def calibrate_threshold(nfe_ratio_fn: Callable[[float], float], target_nfe_ratio: float = 0.75,
                        grid: Sequence[float] = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)) -> float:
    """The threshold of ``grid`` whose NFE ratio (``nfe_ratio_fn(threshold)``: NFE / (2 N b) of AG on a few
    calibration inputs, e.g. from :func:`ddpm_sample`) is closest to ``target_nfe_ratio``; ties go to the
    larger threshold (more guidance)."""
    if not 0.5 <= target_nfe_ratio <= 1:
        raise ValueError(f"Invalid target_nfe_ratio: {target_nfe_ratio} (need 0.5 <= ratio <= 1)")
    if not grid:
        raise ValueError("grid is empty")
    ratios = {float(g): float(nfe_ratio_fn(float(g))) for g in grid}
    return min(sorted(ratios, reverse=True), key=lambda g: abs(ratios[g] - target_nfe_ratio))
