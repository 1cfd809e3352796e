"""STORM: self-taught on-the-fly meta loss rescaling for training on noisy labels.

Paper: "Learning from Noisy Labels via Self-Taught On-the-Fly Meta Loss Rescaling", 2024 (Algorithm 1).
Official code: ``gitlab.cs.uni-duesseldorf.de/general/dsml/storm-public`` (GitLab; it could not be reached
while this was written). The look-ahead mechanics follow Meta-Weight-Net (Shu et al. 2019,
``xjtushujun/meta-weight-net``).

A small rescaler network ``Omega_w`` maps features of each training example, computed by the model under
training, to a weight ``u_i in (0, 1)``. The model is trained on the rescaled loss; the rescaler is
meta-learned online on *validation batches drawn from the noisy training data itself*, selected by the
rescaler ("self-taught"). For a batch of ``b`` examples with per-example losses ``l_i``:

    features   F_i = [l_i, p_i[y_i], max_c p_ic, H(p_i), 1[argmax p_i = y_i]]   (detached; H = -sum p log p,
               p clamped >= 1e-12); with G > 1 stochastic passes: the means over passes plus the std over
               passes of l_i and p_i[y_i] (7 features)
    rescaler   u = sigmoid(W2 relu(W1 F + c1) + c2),  W2 = 0, c2 = 0 at init (u = 0.5: uniform weights)
    inner step w_i = u_i / mean(u)  (detached),  L_train = mean_i w_i l_i,  any optimizer step on theta
    meta step  w_hat(omega) = u / sum(u),  theta'(omega) = theta - alpha grad_theta sum_i w_hat_i l_i(theta)
               pool: m*b examples drawn uniformly from the noisy training set, scored by Omega on features
               of the current model; b of them sampled without replacement with probability ~ u
               v(omega) = u_val / sum(u_val),  L_meta = sum_j v_j l_j(theta'(omega)),  omega <- Adam step

The look-ahead is one plain SGD step with ``alpha`` = the optimizer's current lr (as in Meta-Weight-Net,
even for Adam or momentum); ``L_meta`` is differentiated through ``theta'`` (second order, the "meta"
path) and through ``v`` (the "outer" path). ``theta'`` is discarded; the model is updated only by the
inner step. Order within :meth:`STORM.step`: the meta step first (from the current theta), then the
inner step with the updated rescaler, as in Meta-Weight-Net.

Defaults (spec sheet, calibrated at small scale; the paper's RoBERTa/TripPy values could not be
verified): hidden width 32, rescaler Adam lr 1e-3, a meta step every inner step, pool factor m = 4,
G = 1 forward pass, no warm-up steps by default (the sheet recommends about 3 epochs or 10 % of the
steps of plain cross-entropy: pass ``warmup_steps``).

Deviations and unverified choices:
- The feature list, their normalisation (none) and the validation-selection rule are the spec sheet's
  recommended concrete choices (prototyped), not a verified copy of the official code.
- The validation features ``F_val`` are the pool features of the selected examples, computed with the
  current theta (the paper computes them with theta'; the features are detached and one SGD step apart,
  and reusing them saves G forward passes).
- The sheet's ``rescaler_features(logits, target, mc_logits=None)`` is folded into one argument:
  ``logits`` of shape ``(b, C)`` (one pass) or ``(G, b, C)`` (G stochastic passes).
- Stochastic passes (G > 1) draw their dropout masks from the user's generator (through a forked global
  RNG), so runs are reproducible and the global RNG is left untouched.
- Auxiliary forwards (feature passes, pool scoring, the look-ahead) run through
  ``torch.func.functional_call`` on copies of the buffers: BatchNorm running statistics are updated only
  by the inner step's ordinary forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["LossRescaler", "STORM", "lookahead_meta_loss", "rescaler_features"]

PROB_FLOOR = 1e-12
ESS_WARN_FRACTION = 0.1

Pool = tuple[torch.Tensor, torch.Tensor] | Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _check_targets(target: torch.Tensor, batch: int, classes: int) -> None:
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long:
        raise TypeError(f"target must be an int64 tensor, got {getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != (batch,):
        raise ValueError(f"target must have shape ({batch},), got {tuple(target.shape)}")
    bad = ((target < 0) | (target >= classes)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(f"label {int(target[i])} at index {i} is outside [0, {classes})")


def rescaler_features(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Detached rescaler inputs ``(b, f)`` from ``logits`` ``(b, C)`` (f = 5: loss, p_y, max p, entropy,
    correct) or ``(G, b, C)`` of G stochastic passes (f = 7: the means over passes of those five, then the
    std over passes of the loss and of p_y; the std is 0 for G = 1). Computed in float32 for half input,
    float64 stays float64."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() not in (2, 3) or logits.shape[-1] < 2 or logits.shape[-2] == 0:
        raise ValueError(f"logits must have shape (b, C) or (G, b, C) with b >= 1, C >= 2, got {tuple(logits.shape)}")
    _check_targets(target, logits.shape[-2], logits.shape[-1])
    with torch.no_grad():
        z = logits.detach()
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        passes = z if z.dim() == 3 else z.unsqueeze(0)
        log_p = passes.log_softmax(-1)
        p = log_p.exp()
        idx = target.expand(passes.shape[0], -1).unsqueeze(-1)
        loss = -log_p.gather(-1, idx).squeeze(-1)
        p_y = p.gather(-1, idx).squeeze(-1)
        max_p, argmax = p.max(-1)
        pc = p.clamp_min(PROB_FLOOR)
        entropy = -(pc * pc.log()).sum(-1)
        correct = (argmax == target).to(z.dtype)
        per_pass = torch.stack([loss, p_y, max_p, entropy, correct], -1)  # (G, b, 5)
        feats = per_pass.mean(0)
        if z.dim() == 3:
            spread = torch.stack([loss, p_y], -1).std(0, unbiased=False)
            feats = torch.cat([feats, spread], -1)
    return feats


class LossRescaler(nn.Module):
    """The rescaler ``Omega``: MLP ``num_features -> hidden -> 1`` with ReLU and a sigmoid output, so
    ``forward(features (b, f)) -> u (b,)`` in (0, 1). ``init_uniform=True`` zeroes the last layer (weight
    and bias), so ``u = 0.5`` for every example at the start (uniform training weights)."""

    def __init__(self, num_features: int = 5, hidden: int = 32, init_uniform: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_features, self.hidden, self.init_uniform = num_features, hidden, init_uniform
        self.fc1 = nn.Linear(num_features, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, 1, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        if self.init_uniform:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (b, {self.num_features}), got {tuple(features.shape)}")
        return torch.sigmoid(self.fc2(F.relu(self.fc1(features.to(self.fc1.weight.dtype))))).squeeze(-1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, hidden={self.hidden}, init_uniform={self.init_uniform}"


def _per_example_loss(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(logits, target, reduction="none")
    if loss.shape != target.shape:
        raise ValueError(f"loss_fn(..., reduction='none') must return one loss per example {tuple(target.shape)}, "
                         f"got {tuple(loss.shape)}")
    return loss


def lookahead_meta_loss(model: nn.Module, rescale: Callable[[torch.Tensor], torch.Tensor],
                        x: torch.Tensor, y: torch.Tensor, features: torch.Tensor,
                        x_val: torch.Tensor, y_val: torch.Tensor, val_features: torch.Tensor,
                        lookahead_lr: float, loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
    """STORM's meta objective ``L_meta(omega) = sum_j v_j l_j(theta'(omega))``, differentiable in the
    parameters behind ``rescale`` (``features (b, f) -> u (b,)``): ``theta' = theta - lookahead_lr *
    grad_theta sum_i (u_i / sum u) l_i(theta)`` over the model's trainable parameters (second order,
    ``create_graph=True``), ``v = u(val_features) / sum u(val_features)``. The model is not changed: both
    forwards go through ``torch.func.functional_call`` with copies of its buffers."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = _per_example_loss(loss_fn, functional_call(model, {**params, **buffers}, (x,)), y)
    u = rescale(features)
    inner = (u / u.sum() * loss).sum()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
    fast = {n: p if g is None else p - lookahead_lr * g for (n, p), g in zip(params.items(), grads)}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    val_loss = _per_example_loss(loss_fn, functional_call(model, {**fast, **buffers}, (x_val,)), y_val)
    u_val = rescale(val_features)
    return (u_val / u_val.sum() * val_loss).sum()


class STORM:
    """STORM training helper (not an optimizer): ``STORM(model, optimizer, rescaler=None, rescaler_lr=1e-3,
    meta_every=1, pool_factor=4, warmup_steps=0, lookahead_lr=None, loss_fn=F.cross_entropy,
    forward_passes=1, generator=None)``.

    ``step(x, y, dataset)`` takes one training step on the batch ``(x, y)`` (b >= 2):
    during the first ``warmup_steps`` calls plain mean loss (weights 1); afterwards, every ``meta_every``
    steps, one meta step of the rescaler on a validation batch selected from ``dataset`` (the noisy
    training set as a pair of tensors ``(X, Y)``, or a sampler ``(k, generator) -> (x, y)`` of k random
    training examples), then the inner step on the rescaled loss. The inner step sets ``.grad`` of the
    model's trainable parameters (replacing what was there) and calls ``optimizer.step()``. With
    ``dataset=None`` no meta step is taken: the rescaler is frozen for that call. Returns
    ``{"loss": float, "weights": (b,) tensor (mean 1), "meta_loss": float or None, "ess": float}``, where
    ``ess = (sum w)^2 / sum w^2``; a ``UserWarning`` when it falls below 10 % of b (rescaler collapse).

    ``loss_fn(logits, target, reduction=...)`` must return one loss per example for ``reduction="none"``
    (the features assume logits of a classifier). ``rescaler=None`` builds a :class:`LossRescaler` with
    5 (G = 1) or 7 (G = ``forward_passes`` > 1) features on the model's device; the rescaler is trained by
    its own Adam with ``rescaler_lr``. ``lookahead_lr=None`` uses the optimizer's current lr (of its first
    param group). All sampling uses ``generator`` (a fresh CPU ``torch.Generator()`` when None).
    ``state_dict()`` / ``load_state_dict()`` cover the model, both optimizers, the rescaler, the step
    counter and the generator.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rescaler: nn.Module | None = None,
                 rescaler_lr: float = 1e-3, meta_every: int = 1, pool_factor: int = 4, warmup_steps: int = 0,
                 lookahead_lr: float | None = None, loss_fn: Callable = F.cross_entropy,
                 forward_passes: int = 1, generator: torch.Generator | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not rescaler_lr > 0:
            raise ValueError(f"Invalid rescaler_lr: {rescaler_lr}")
        if lookahead_lr is not None and not lookahead_lr > 0:
            raise ValueError(f"Invalid lookahead_lr: {lookahead_lr}")
        for name, value, low in (("meta_every", meta_every, 1), ("pool_factor", pool_factor, 1),
                                 ("warmup_steps", warmup_steps, 0), ("forward_passes", forward_passes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        num_features = 5 if forward_passes == 1 else 7
        if rescaler is None:
            device = next(model.parameters()).device
            rescaler = LossRescaler(num_features, device=device)
        elif isinstance(rescaler, LossRescaler) and rescaler.num_features != num_features:
            raise ValueError(f"rescaler takes {rescaler.num_features} features, forward_passes={forward_passes} "
                             f"gives {num_features}")
        self.model, self.optimizer, self.rescaler = model, optimizer, rescaler
        self.rescaler_optimizer = torch.optim.Adam(rescaler.parameters(), lr=rescaler_lr)
        self.meta_every, self.pool_factor, self.warmup_steps = meta_every, pool_factor, warmup_steps
        self.lookahead_lr, self.loss_fn, self.forward_passes = lookahead_lr, loss_fn, forward_passes
        self.generator = generator if generator is not None else torch.Generator()
        self.steps = 0

    # -- features -----------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Features of ``(x, y)`` from the current model: with G = 1 from ``logits`` (a forward of ``x``
        already made) or one extra no-grad pass; with G > 1 from G stochastic passes whose dropout masks
        come from the generator. Buffers (BatchNorm statistics) are never updated here."""
        if self.forward_passes == 1:
            return rescaler_features(self._aux_logits(x) if logits is None else logits, y)
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            passes = torch.stack([self._aux_logits(x) for _ in range(self.forward_passes)])
        return rescaler_features(passes, y)

    def _aux_logits(self, x: torch.Tensor) -> torch.Tensor:
        """A no-grad forward of the current model on copies of its buffers."""
        state = {n: p.detach() for n, p in self.model.named_parameters()}
        state.update({n: b.clone() for n, b in self.model.named_buffers()})
        with torch.no_grad():
            return functional_call(self.model, state, (x,))

    def weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The rescaler's training weights ``u / mean(u)`` for the batch ``(x, y)`` (detached, mean 1),
        from features of the current model; the model's buffers are not updated."""
        self._check_batch(x, y)
        with torch.no_grad():
            u = self.rescaler(self._features(x, y))
            return u / u.mean()

    # -- validation batch ---------------------------------------------------------------------------
    def _draw_pool(self, dataset: Pool, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if callable(dataset):
            xs, ys = dataset(k, self.generator)
        elif isinstance(dataset, (tuple, list)) and len(dataset) == 2:
            xs_all, ys_all = dataset
            n = len(ys_all)
            if len(xs_all) != n:
                raise ValueError(f"dataset inputs and labels differ in length: {len(xs_all)} vs {n}")
            idx = torch.randperm(n, generator=self.generator)[:k]
            xs, ys = xs_all[idx.to(xs_all.device)], ys_all[idx.to(ys_all.device)]
        else:
            raise TypeError("dataset must be a pair (X, Y) of tensors or a callable (k, generator) -> (x, y), "
                            f"got {type(dataset).__name__}")
        return xs, ys

    def _validation_batch(self, dataset: Pool, b: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys = self._draw_pool(dataset, self.pool_factor * b)
        if len(ys) < b:
            raise ValueError(f"the validation pool has {len(ys)} examples, fewer than the batch size {b}")
        feats = self._features(xs, ys)
        with torch.no_grad():
            u = self.rescaler(feats).float().cpu()
        chosen = torch.multinomial(u, b, replacement=False, generator=self.generator)
        return xs[chosen.to(xs.device)], ys[chosen.to(ys.device)], feats[chosen.to(feats.device)]

    # -- steps ----------------------------------------------------------------------------------------
    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be tensors")
        if len(y) < 2:
            raise ValueError(f"STORM needs a batch of at least 2 examples (mean-normalised weights of one "
                             f"example are always 1), got {len(y)}")
        if len(x) != len(y):
            raise ValueError(f"x and y differ in batch size: {len(x)} vs {len(y)}")

    def _lookahead_lr(self) -> float:
        return self.lookahead_lr if self.lookahead_lr is not None else float(self.optimizer.param_groups[0]["lr"])

    def step(self, x: torch.Tensor, y: torch.Tensor, dataset: Pool | None = None) -> dict:
        self._check_batch(x, y)
        b = len(y)
        params = [p for p in self.model.parameters() if p.requires_grad]
        logits = self.model(x)
        _check_targets(y, b, logits.shape[-1])
        loss = _per_example_loss(self.loss_fn, logits, y)
        meta_loss = None
        if self.steps < self.warmup_steps:
            weights = torch.ones_like(loss.detach())
        else:
            feats = self._features(x, y, logits.detach())
            if dataset is not None and (self.steps - self.warmup_steps) % self.meta_every == 0:
                meta_loss = self._meta_step(x, y, feats, dataset)
            with torch.no_grad():
                u = self.rescaler(feats)
                weights = (u / u.mean()).to(loss.dtype)
        total = (weights * loss).mean()
        grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.steps += 1
        ess = float(weights.sum() ** 2 / (weights ** 2).sum())
        if ess < ESS_WARN_FRACTION * b:
            warnings.warn(f"STORM: effective sample size {ess:.1f} of a batch of {b} (< 10 %): the rescaler "
                          "may have collapsed onto a few examples", UserWarning, stacklevel=2)
        return {"loss": float(total.detach()), "weights": weights.detach(), "meta_loss": meta_loss, "ess": ess}

    def _meta_step(self, x: torch.Tensor, y: torch.Tensor, feats: torch.Tensor, dataset: Pool) -> float:
        x_val, y_val, val_feats = self._validation_batch(dataset, len(y))
        meta = lookahead_meta_loss(self.model, self.rescaler, x, y, feats, x_val, y_val, val_feats,
                                   self._lookahead_lr(), self.loss_fn)
        rparams = [p for p in self.rescaler.parameters() if p.requires_grad]
        grads = torch.autograd.grad(meta, rparams, allow_unused=True)
        for p, g in zip(rparams, grads):
            p.grad = g
        self.rescaler_optimizer.step()
        return float(meta.detach())

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rescaler": self.rescaler.state_dict(), "rescaler_optimizer": self.rescaler_optimizer.state_dict(),
                "steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"model", "optimizer", "rescaler", "rescaler_optimizer", "steps", "generator"} - set(state)
        if missing:
            raise ValueError(f"STORM state_dict lacks {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rescaler.load_state_dict(state["rescaler"])
        self.rescaler_optimizer.load_state_dict(state["rescaler_optimizer"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
