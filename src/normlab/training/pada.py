"""PA&DA: gradient-norm importance sampling of training data and of supernet paths.

Paper: Shun Lu, Yu Hu, Longxing Yang, Zihao Sun, Jilin Mei, Jianchao Tan, Chengru Song, "PA&DA: Jointly
Sampling PAth and DAta for Consistent NAS", CVPR 2023, arXiv:2302.14772. Official code:
https://github.com/ShunLu91/PA-DA (MIT), ``nasbench201/train_panda_201.py`` and
``nasbench201/datasets/dataloader.py``.

The variance of an importance-sampled SGD estimate ``g = grad l_i / (N p_i)`` is minimised by
``p_i ∝ ||grad l_i||`` (the same for the path of a weight-sharing supernet). PA&DA replaces uniform
sampling with sampling proportional to cheap gradient-norm proxies collected during the previous epoch,
mixed with the uniform distribution by a coefficient that ramps up over training. This module holds:

- :func:`per_sample_grad_norm`: the proxy ``s_i = ||softmax(z_i) - onehot(y_i)||_2`` (the norm of the
  cross-entropy gradient w.r.t. the logits, ``kind="logit"``), or exact per-sample parameter-gradient norms
  through ``torch.func`` (``vmap(grad(...))``, ``kind="exact"``);
- :class:`GradNormImportanceSampler`: the data sampler, a ``torch.utils.data.Sampler[int]``;
- :class:`GradNormCategorical`: the path (operation) sampler over ``K`` candidates;
- :class:`IndexedDataset`: a dataset wrapper that appends the dataset index to every item, so the loop
  knows which indices a batch holds.

The rule (the official code's; both samplers follow it). During epoch ``e`` the sampler uses

    p = tau * s / sum(s) + (1 - tau) / N,    tau = tau_schedule(e - 1)   (linear: (e - 1) / E)

built from the scores ``s`` collected during epoch ``e - 1`` (one epoch stale). Epoch 0 is a plain random
permutation (data) / uniform (paths), so epoch 1 is exactly uniform and the largest ``tau`` used during
training is ``(E - 2)/E``. From epoch 1 on the data sampler draws ``N`` indices **with replacement** from
``p``. Scores within an epoch are smoothed: an index seen again gets ``s <- (1 - a) s + a * new``
(``a = smoothing = 0.5``: the code's pairwise mean), a first visit is assigned; the path accumulator
starts from 0 every epoch and always averages, ``G_k <- (1 - a) G_k + a * new_k`` (so 1 then 3 gives 1.75,
as in the code), only for the operations sampled in that step. Unvisited indices and parameter-free
operations keep score 0, hence probability ``(1 - tau)/N`` (``(1 - tau)/K``): near the end of training a
parameter-free op is almost never sampled. ``min_prob`` (default 0, the code) puts a floor under every
probability: ``p <- (1 - K * min_prob) * p + min_prob``.

Usage (data)::

    sampler = GradNormImportanceSampler(len(ds), epochs, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(IndexedDataset(ds), batch_size=32, sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y, idx in loader:
            logits = model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            sampler.update(idx, per_sample_grad_norm(logits.detach(), y))
            loss = losses.mean()          # official code; or (losses * sampler.importance_weights(idx)).mean()

Defaults and their source: linear ``tau``, smoothing 0.5, ``N`` draws with replacement, probabilities
refreshed once per epoch (the code's ``update_freq`` argument is unused there, and absent here).

Deviations from the official code, and why:

- No importance-weight correction by default (the code's behaviour, biased but lower-variance); the
  unbiased estimator of the paper is ``losses * importance_weights(idx)`` (``1/(N p_i)``).
- "Seen this epoch" is a boolean mask, not the code's test ``s_i != 0``: a proxy that is exactly 0 is a
  visit, and the next one is averaged with it. With real-valued proxies the two agree.
- Several occurrences of one index in a batch (possible with replacement) are applied in batch order,
  as the code's loop does, but in closed form (vectorised).
- All-zero scores (nothing visited, or a perfectly fit epoch) fall back to uniform with a warning instead
  of dividing by zero; negative or NaN scores raise ``ValueError``.
- No ``replacement=False`` option: ``N`` draws out of ``N`` without replacement are a permutation, which
  ignores the probabilities.
- Distributed training: all-gather ``(indices, scores)`` before ``set_epoch`` and give every rank the same
  seeded generator, so that every rank draws the same index list; then shard it. Not done here.

Scope: the library parts only. The paper's consistency (Kendall tau) gains on NAS-Bench-201 are not
reproduced by normlab; its claim check (``normlab bench pada``) checks the variance mechanism on digits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Sampler

__all__ = ["GradNormCategorical", "GradNormImportanceSampler", "IndexedDataset", "per_sample_grad_norm"]

KINDS = ("logit", "exact")
TauSchedule = str | Callable[[int], float]


def per_sample_grad_norm(a: Any, b: Any, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                         kind: str = "logit", params: Iterable[str | nn.Parameter] | None = None
                         ) -> torch.Tensor:
    """Per-example gradient norms, shape ``(B,)``.

    ``per_sample_grad_norm(logits, target)`` (``kind="logit"``): ``||softmax(z_i) - onehot(y_i)||_2``, the
    norm of the gradient of the cross-entropy w.r.t. the logits ``(B, C)``, for integer targets ``(B,)``;
    computed without autograd (in float32 for half input).

    ``per_sample_grad_norm(model, loss_fn, x, y, kind="exact", params=None)``: the exact norm of the gradient
    of ``loss_fn(model(x_i[None]), y_i[None])`` w.r.t. ``params`` (names or parameters of ``model``; default
    every parameter that requires grad), through ``torch.func`` (``vmap`` over ``grad``). The model runs in
    its current train/eval mode; its parameters, buffers and ``.grad`` are not touched (a layer that
    updates buffers in train mode, such as BatchNorm, cannot be vmapped: put it in eval mode)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "logit":
        if x is not None or y is not None or params is not None:
            raise TypeError("kind='logit' takes (logits, target) only; x, y, params belong to kind='exact'")
        return _logit_grad_norm(a, b)
    if x is None or y is None:
        raise TypeError("kind='exact' takes (model, loss_fn, x, y)")
    return _exact_grad_norm(a, b, x, y, params)


def _logit_grad_norm(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise TypeError(f"logits must be a floating tensor of shape (B, C), got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() \
            or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer class-index tensor for kind='logit' (for other losses use "
                        f"kind='exact'), got {getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(f"target values must lie in [0, {logits.shape[1] - 1}], got "
                         f"[{int(target.min())}, {int(target.max())}]")
    z = logits.detach()
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    diff = torch.softmax(z, dim=1) - F.one_hot(target, z.shape[1]).to(z.dtype)
    return torch.linalg.vector_norm(diff, dim=1)


def _exact_grad_norm(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, params: Iterable[str | nn.Parameter] | None) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError(f"kind='exact' needs an nn.Module as first argument, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        by_id = {id(p): n for n, p in named.items()}
        names = []
        for p in params:
            name = p if isinstance(p, str) else by_id.get(id(p))
            if name not in named:
                raise ValueError(f"params must be names or parameters of the model; {p if isinstance(p, str) else 'a tensor'} "
                                 f"is not one (valid names: {', '.join(named)})")
            names.append(name)
    if not names:
        raise ValueError("no parameters to differentiate (none requires grad, or params is empty)")
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=named[names[0]].dtype, device=named[names[0]].device)
    chosen = {n: named[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in named.items() if n not in chosen}
    buffers = dict(model.named_buffers())

    def loss_one(weights, xi, yi):
        out = torch.func.functional_call(model, ({**fixed, **weights}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(chosen, x, y)
    squares = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())
    return squares.sqrt()


def _tau_fn(tau_schedule: TauSchedule, num_epochs: int) -> Callable[[int], float]:
    if tau_schedule == "linear":
        return lambda e: e / num_epochs
    if callable(tau_schedule):
        return tau_schedule
    raise ValueError(f"tau_schedule must be 'linear' or a callable epoch -> float, got {tau_schedule!r}")


def _check_common(num_epochs: int, smoothing: float, min_prob: float, size: int, what: str) -> None:
    if not isinstance(num_epochs, int) or num_epochs <= 0:
        raise ValueError(f"num_epochs must be a positive int, got {num_epochs!r}")
    if not 0.0 < smoothing <= 1.0:
        raise ValueError(f"smoothing must lie in (0, 1], got {smoothing!r}")
    if not 0.0 <= min_prob <= 1.0 / size:
        raise ValueError(f"min_prob must lie in [0, 1/{what}] = [0, {1.0 / size:g}], got {min_prob!r}")


def _mixed(scores: torch.Tensor, tau: float, min_prob: float, owner: str) -> torch.Tensor:
    """``tau * s / sum(s) + (1 - tau) / n``, floored by ``min_prob``; uniform (with a warning) for zero ``s``."""
    if not (isinstance(tau, (int, float)) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau_schedule must return a float in [0, 1], got {tau!r}")
    n = scores.numel()
    uniform = torch.full_like(scores, 1.0 / n)
    total = scores.sum()
    if tau > 0 and total == 0:
        warnings.warn(f"{owner}: every score of the last epoch is 0 (nothing visited, or a perfect fit); "
                      "sampling uniformly", RuntimeWarning, stacklevel=3)
        probs = uniform
    elif tau > 0:
        probs = tau * (scores / total) + (1.0 - tau) * uniform
    else:
        probs = uniform
    if min_prob > 0:
        probs = (1.0 - n * min_prob) * probs + min_prob
    return probs


def _check_scores(indices: torch.Tensor, values: torch.Tensor, what: str) -> None:
    bad = ~(values >= 0)  # negative or NaN
    if bad.any():
        pos = int(bad.nonzero()[0])
        raise ValueError(f"{what} must be finite and >= 0; got {float(values[pos])} at index {int(indices[pos])}")
    if torch.isinf(values).any():
        pos = int(torch.isinf(values).nonzero()[0])
        raise ValueError(f"{what} must be finite and >= 0; got inf at index {int(indices[pos])}")


def _as_index_values(indices: Any, values: Any, size: int, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.as_tensor(indices)
    values = torch.as_tensor(values)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{names[0]} must be integers, got {indices.dtype}")
    if not values.is_floating_point():
        values = values.to(torch.float64)
    indices, values = indices.reshape(-1), values.detach().reshape(-1)
    if indices.numel() != values.numel():
        raise ValueError(f"{names[0]} and {names[1]} must have the same number of elements, got "
                         f"{indices.numel()} and {values.numel()}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(f"{names[0]} must lie in [0, {size - 1}], got [{int(indices.min())}, {int(indices.max())}]")
    return indices.cpu().long(), values.cpu().to(torch.float64)


class GradNormImportanceSampler(Sampler[int]):
    """PA&DA's data sampler: ``GradNormImportanceSampler(num_samples, num_epochs, tau_schedule="linear",
    smoothing=0.5, generator=None, min_prob=0.0)``.

    ``set_epoch(e)`` (call it before every epoch, like ``DistributedSampler``) fixes the epoch's index
    list: epoch 0 a random permutation of ``range(N)``; epoch ``e >= 1`` ``N`` draws with replacement from
    the mix of the scores collected since the previous ``set_epoch`` with ``tau_schedule(e - 1)`` (see the
    module docstring), after which the scores are reset. ``update(indices, scores)`` records the proxies of
    the dataset ``indices`` of a batch (not positions in the epoch's list: use :class:`IndexedDataset`).
    ``probabilities`` is the epoch's distribution (float64, sums to 1); ``importance_weights(indices)`` is
    ``1 / (N p_i)``, the unbiasing factor of the loss. Iterating before any ``set_epoch`` uses epoch 0;
    iterating twice within an epoch yields the same list. ``generator=None`` draws from torch's default
    generator; pass a seeded ``torch.Generator`` for reproducible runs (and the same one on every rank)."""

    def __init__(self, num_samples: int, num_epochs: int, tau_schedule: TauSchedule = "linear",
                 smoothing: float = 0.5, generator: torch.Generator | None = None, min_prob: float = 0.0) -> None:
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        _check_common(num_epochs, smoothing, min_prob, num_samples, "num_samples")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_samples, self.num_epochs = num_samples, num_epochs
        self.smoothing, self.min_prob, self.generator = float(smoothing), float(min_prob), generator
        self._tau = _tau_fn(tau_schedule, num_epochs)
        self.scores = torch.zeros(num_samples, dtype=torch.float64)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)
        self.epoch: int | None = None
        self._probs = torch.full((num_samples,), 1.0 / num_samples, dtype=torch.float64)
        self._indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self._indices is None:
            self.set_epoch(0)
        return iter(self._indices.tolist())

    @property
    def probabilities(self) -> torch.Tensor:
        """The sampling distribution of the current epoch, ``(N,)`` float64 (uniform in epochs 0 and 1)."""
        return self._probs.clone()

    @property
    def indices(self) -> torch.Tensor:
        """The current epoch's index list, in iteration order."""
        if self._indices is None:
            self.set_epoch(0)
        return self._indices.clone()

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        n = self.num_samples
        if epoch == 0:
            self._probs = torch.full((n,), 1.0 / n, dtype=torch.float64)
            self._indices = torch.randperm(n, generator=self.generator)
        else:
            self._probs = _mixed(self.scores, self._tau(epoch - 1), self.min_prob, type(self).__name__)
            self._indices = torch.multinomial(self._probs, n, replacement=True, generator=self.generator)
        self.scores.zero_()
        self.seen.zero_()
        self.epoch = epoch

    def update(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Record per-example proxies of one batch (dataset indices; repeated indices in batch order)."""
        idx, new = _as_index_values(indices, scores, self.num_samples, ("indices", "scores"))
        if idx.numel() == 0:
            return
        _check_scores(idx, new, "scores")
        a = self.smoothing
        order = torch.argsort(idx, stable=True)
        uniq, counts = torch.unique_consecutive(idx[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(idx)
        rank[order] = torch.arange(idx.numel()) - torch.repeat_interleave(starts, counts)
        count = torch.repeat_interleave(counts, counts)[torch.argsort(order)]  # occurrences of each element's index
        seen = self.seen[idx]
        weight = a * (1.0 - a) ** (count - 1 - rank).to(torch.float64)
        first_unseen = (rank == 0) & ~seen
        weight = torch.where(first_unseen, (1.0 - a) ** (count - 1).to(torch.float64), weight)
        keep = torch.where(self.seen[uniq], (1.0 - a) ** counts.to(torch.float64), torch.zeros_like(counts, dtype=torch.float64))
        result = self.scores[uniq] * keep
        result = result.index_add(0, torch.searchsorted(uniq, idx), weight * new)
        self.scores[uniq] = result
        self.seen[uniq] = True

    def importance_weights(self, indices: torch.Tensor) -> torch.Tensor:
        """``1 / (N p_i)`` for dataset ``indices`` under the current epoch's distribution (float64)."""
        idx = torch.as_tensor(indices)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(f"indices must lie in [0, {self.num_samples - 1}], got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        return 1.0 / (self.num_samples * self._probs[idx.cpu().long()]).to(idx.device)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "scores": self.scores.clone(), "seen": self.seen.clone(),
                "probabilities": self._probs.clone(),
                "indices": None if self._indices is None else self._indices.clone(),
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scores"].shape != (self.num_samples,):
            raise ValueError(f"state is for {state['scores'].shape[0]} samples, this sampler has {self.num_samples}")
        self.epoch = state["epoch"]
        self.scores = state["scores"].clone().to(torch.float64)
        self.seen = state["seen"].clone().to(torch.bool)
        self._probs = state["probabilities"].clone().to(torch.float64)
        self._indices = None if state["indices"] is None else state["indices"].clone()
        if state["generator"] is not None and self.generator is not None:
            self.generator.set_state(state["generator"])


class GradNormCategorical:
    """PA&DA's path sampler over ``num_choices`` candidate operations: ``GradNormCategorical(num_choices,
    num_epochs, tau_schedule="linear", smoothing=0.5, min_prob=0.0)``.

    ``sample(size, generator=None)`` draws ``size`` i.i.d. operation indices (one per edge) from the current
    distribution ``probabilities``. ``update(choice_idx, grad_norm)`` takes one step's sampled operations
    ``(M,)`` and a gradient norm per edge ``(M,)`` (e.g. ``||W.grad|| + ||b.grad||`` of the edge's op, summed
    over cells that share the edge; 0 for a parameter-free op); for each operation ``k`` sampled in the step,
    ``new_k`` is the sum of its edges' norms divided by its number of edges, and
    ``G_k <- (1 - smoothing) G_k + smoothing * new_k``. ``set_epoch(e)`` builds the distribution of epoch
    ``e`` from ``G`` (mixed with uniform at ``tau_schedule(e - 1)``; uniform for ``e = 0``) and resets ``G``
    to 0."""

    def __init__(self, num_choices: int, num_epochs: int, tau_schedule: TauSchedule = "linear",
                 smoothing: float = 0.5, min_prob: float = 0.0) -> None:
        if not isinstance(num_choices, int) or num_choices <= 0:
            raise ValueError(f"num_choices must be a positive int, got {num_choices!r}")
        _check_common(num_epochs, smoothing, min_prob, num_choices, "num_choices")
        self.num_choices, self.num_epochs = num_choices, num_epochs
        self.smoothing, self.min_prob = float(smoothing), float(min_prob)
        self._tau = _tau_fn(tau_schedule, num_epochs)
        self.accumulator = torch.zeros(num_choices, dtype=torch.float64)
        self.epoch: int | None = None
        self._probs = torch.full((num_choices,), 1.0 / num_choices, dtype=torch.float64)

    @property
    def probabilities(self) -> torch.Tensor:
        return self._probs.clone()

    def sample(self, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        if size == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.multinomial(self._probs, size, replacement=True, generator=generator)

    def update(self, choice_idx: torch.Tensor, grad_norm: torch.Tensor) -> None:
        idx, norms = _as_index_values(choice_idx, grad_norm, self.num_choices, ("choice_idx", "grad_norm"))
        if idx.numel() == 0:
            return
        _check_scores(idx, norms, "grad_norm")
        counts = torch.bincount(idx, minlength=self.num_choices)
        sums = torch.zeros(self.num_choices, dtype=torch.float64).index_add_(0, idx, norms)
        hit = counts > 0
        new = sums / counts.clamp_min(1)
        a = self.smoothing
        self.accumulator = torch.where(hit, (1.0 - a) * self.accumulator + a * new, self.accumulator)

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch == 0:
            self._probs = torch.full((self.num_choices,), 1.0 / self.num_choices, dtype=torch.float64)
        else:
            self._probs = _mixed(self.accumulator, self._tau(epoch - 1), self.min_prob, type(self).__name__)
        self.accumulator = torch.zeros_like(self.accumulator)
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "accumulator": self.accumulator.clone(), "probabilities": self._probs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accumulator"].shape != (self.num_choices,):
            raise ValueError(f"state is for {state['accumulator'].shape[0]} choices, this sampler has "
                             f"{self.num_choices}")
        self.epoch = state["epoch"]
        self.accumulator = state["accumulator"].clone().to(torch.float64)
        self._probs = state["probabilities"].clone().to(torch.float64)


class IndexedDataset(Dataset):
    """``dataset[i]`` with the index ``i`` appended: ``(x, y, i)`` for a dataset of ``(x, y)`` pairs,
    ``(item, i)`` for a dataset of single items; so a loop knows each batch's dataset indices."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return item, index
