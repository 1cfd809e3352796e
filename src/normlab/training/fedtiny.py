"""FedTiny: adaptive BatchNorm selection and progressive pruning for tiny models in federated learning.

Paper: Hong Huang, Lan Zhang, Chaoyue Sun, Ruogu Fang, Xiaoyong Yuan, Dapeng Wu, "Distributed Pruning
Towards Tiny Neural Networks in Federated Learning", ICDCS 2023, arXiv:2212.01977. Official code: none
released with the paper; a later port by the first author's group lives in the pull requests of
``FedPruning/FedPruning`` (``api/distributed/fedtiny``), used here for intent only (see departures).

Setup: a model with BatchNorm layers, target density ``d`` over the prunable weights (every conv/linear
``weight``; BN parameters, biases and buffers stay dense), ``K`` clients with ``n_k`` examples each.

Module 1, adaptive BN selection (once, before training). The server builds ``C`` candidate masks
(:func:`candidate_masks`): ``c = 0`` is layer-wise magnitude pruning with the ERK allocation
``d_l ∝ (sum of the dims of W_l) / |W_l|`` (:func:`erk_densities`), ``c >= 1`` multiplies each layer's ERK
density by ``u_l ~ U[0.5, 1.5]`` and rescales to the same global count. Each client re-estimates, for every
candidate ``W ⊙ M_c``, the BN statistics of its local data by count / sum / sum of squares of every BN
layer's input (:func:`reestimate_bn_stats`: ``mu = S/n``, ``sigma^2 = Q/n - mu^2``, population variance),
installs them and reports its eval-mode loss ``L_{k,c}``. The server pools (:func:`aggregate_bn_stats`)

    mu_c = sum_k n_k mu_k / sum_k n_k,    sigma^2_c = sum_k n_k (sigma^2_k + mu_k^2) / sum_k n_k - mu_c^2,
    L_c = sum_k n_k L_{k,c} / sum_k n_k,  c* = argmin_c L_c (ties: lowest index),

and installs ``M_{c*}`` with the pooled statistics (``running_var`` stored unbiased, ``sigma^2 n/(n-1)``).

Module 2, progressive pruning (during FedAvg). Clients train ``E`` local epochs of plain SGD with the mask
applied (:func:`apply_masks`: pruned weights and their gradients are exactly zero); the server averages
weights and BN buffers with weights ``n_k`` (:func:`fedavg`). On rounds ``t`` (from 1) with
``t mod ΔR = 0`` and ``t <= R_end``, the ``j``-th such round adjusts prunable layer ``j mod L`` by

    a_t = round(alpha/2 * (1 + cos(pi t / R_end)) * nnz_l)

positions: after local training every client computes the dense gradient of that layer on one local batch
and reports the top-``a_t`` ``|g|`` among pruned positions (:func:`topk_pruned_grads`); the server sums them
``n_k``-weighted (missing entries count 0), grows the ``a_t`` pruned positions with the largest sum and
prunes the ``a_t`` previously active positions with the smallest averaged ``|w|`` (:func:`prune_and_grow`,
ties by index; grown weights start at 0, so the density stays exactly ``d``).

Defaults (the sheet's recommendations where the paper is not specific): ``C = 10``, ``B_bn = 10`` batches,
``alpha = 0.3``, ``ΔR = 5``, ``R_end = 0.75 R``, one local epoch, SGD lr 0.05, batch 32.

Engines: :class:`FedTiny` runs the clients in one process (``engine="simulated"``, the default) or on the
ranks of an initialised ``torch.distributed`` group (``engine="distributed"``, gloo or NCCL; each rank
hosts the clients ``client_ranks`` assigns it and only needs their data). It is one code path: every
client result (weights and buffers, BN statistics, losses, top-K reports) is written into row ``k`` of a
``(K, ...)`` float64 buffer of zeros, :func:`normlab.distributed.all_reduce_sum` fills in the other ranks'
rows (``x + 0`` is exact), and every rank reduces over clients in index order with the same tensor op, so
the result does not depend on the rank layout and equals the simulated run bit for bit. Client ``k``'s
batch order comes from its own generator seeded with ``seed * 1_000_003 + k``, never from the rank.

Bytes (float32 = 4 bytes, both directions, all clients): per round and direction the active prunable
weights plus every other parameter and floating BN buffer; a 1-bit-per-weight mask bitmap downlink in round
1 and after each mask change; adaptive BN selection adds per client ``C`` sparse candidate models with
bitmaps (downlink) and ``C x (2 floats per BN channel + 1 loss) + 1`` (``n_k``) floats uplink; each top-K
entry costs 8 bytes (index + value). ``density=1`` is dense FedAvg: no masks, no selection, no bitmaps.

Departures, and why:

- Candidates are perturbed ERK allocations of one initialisation (the sheet's step 1), not the port's C
  random initialisations; candidate losses are ``n_k``-weighted (the port averages them unweighted); one
  layer per adjustment round (the paper's memory budget), not every layer at once as in the port.
- The port indexes the full tensor with positions picked inside the pruned subset and collects BN affine
  weights as "BN statistics"; both are bugs and are not copied.
- :func:`magnitude_masks` keeps at least one weight per output unit (the largest of each row), so no layer
  is disconnected; :func:`prune_and_grow` does not enforce that (the sheet does not ask for it).
- Local optimisers are created fresh every round (plain SGD, no momentum), so regrown weights never
  inherit optimizer state.
- A batch with a single example cannot give a BN variance: :func:`reestimate_bn_stats` raises, and the
  simulator's batching drops a trailing batch of size 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum, rank as dist_rank, world_size as dist_world_size

__all__ = ["BNStats", "FedTiny", "adaptive_bn_selection", "aggregate_bn_stats", "apply_masks",
           "candidate_masks", "erk_densities", "fedavg", "install_bn_stats", "magnitude_masks",
           "prunable_weights", "prune_and_grow", "reestimate_bn_stats", "topk_pruned_grads"]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ENGINES = ("simulated", "distributed")
Batch = tuple[torch.Tensor, torch.Tensor]


class BNStats(NamedTuple):
    """Statistics of one BN layer's input: per-channel mean and population variance (float64) over
    ``count`` values per channel."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int


# --- masks ---------------------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable weights of ``model``, ``{parameter name: weight}``: every ``nn.Linear`` / ``nn.Conv*d``
    weight, in module order (BN parameters and biases are never pruned)."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, PRUNABLE)}


def _check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"Invalid density: {density} (need 0 < density <= 1)")


def _allocate(raw: torch.Tensor, sizes: torch.Tensor, minimum: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts ``c_l`` with ``sum c_l = total``, ``minimum_l <= c_l <= sizes_l`` and ``c_l ∝ raw_l *
    sizes_l`` on the layers no bound holds (iterative capping with redistribution, then largest remainder,
    ties to the lower layer index)."""
    raw, sizes, minimum = raw.double(), sizes.double(), minimum.double()
    fixed = torch.zeros_like(sizes)
    is_fixed = torch.zeros(len(sizes), dtype=torch.bool)
    while True:
        free = ~is_fixed
        if not free.any():
            want = fixed
            break
        scale = (total - fixed[is_fixed].sum()) / (raw[free] * sizes[free]).sum()
        want = torch.where(is_fixed, fixed, scale * raw * sizes)
        over, under = free & (want > sizes), free & (want < minimum)
        if over.any():              # caps first: they only raise the share of the others
            fixed, is_fixed = torch.where(over, sizes, fixed), is_fixed | over
        elif under.any():
            fixed, is_fixed = torch.where(under, minimum, fixed), is_fixed | under
        else:
            break
    counts = want.floor().clamp(min=minimum, max=sizes)
    room = (sizes - counts) > 0
    remainder = torch.where(room, want - counts, torch.full_like(want, -math.inf))
    short = int(total - counts.sum())
    order = torch.sort(remainder, descending=True, stable=True).indices
    counts[order[:short]] += 1
    return counts.long()


def _erk_raw(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor([sum(w.shape) / w.numel() for w in weights.values()], dtype=torch.float64)


def _densities_from_raw(weights: dict[str, torch.Tensor], raw: torch.Tensor, density: float) -> dict[str, float]:
    sizes = torch.tensor([w.numel() for w in weights.values()])
    minimum = torch.tensor([w.shape[0] for w in weights.values()])
    total = round(density * int(sizes.sum()))
    if total < int(minimum.sum()):
        raise ValueError(f"Invalid density: {density} keeps {total} weights, fewer than the {int(minimum.sum())} "
                         "needed for one weight per output unit")
    counts = _allocate(raw, sizes, minimum, total)
    return {name: int(c) / int(n) for name, c, n in zip(weights, counts, sizes)}


def erk_densities(model: nn.Module, density: float) -> dict[str, float]:
    """Erdős–Rényi-kernel per-layer densities at global density ``density``: ``d_l ∝ sum(W_l.shape) /
    |W_l|``, capped at 1 with the excess redistributed, at least one weight per output unit, and rounded so
    that ``sum round(d_l |W_l|) = round(density * sum |W_l|)`` exactly (each ``d_l`` is a count / ``|W_l|``)."""
    _check_density(density)
    weights = prunable_weights(model)
    if not weights:
        raise ValueError("model has no prunable (nn.Linear / nn.Conv*d) weights")
    return _densities_from_raw(weights, _erk_raw(weights), density)


def _layer_mask(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest ``|w|`` (ties by index), always including the largest of each output unit."""
    flat = weight.detach().abs().reshape(weight.shape[0], -1)
    rank = torch.empty(flat.numel(), dtype=torch.long)
    rank[torch.sort(flat.flatten(), descending=True, stable=True).indices] = torch.arange(flat.numel())
    rank = rank.view_as(flat)
    best = rank.amin(dim=1, keepdim=True)
    priority = torch.where(rank == best, rank - flat.numel(), rank).flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(priority, stable=True).indices[:count]] = True
    return keep.view_as(weight)


def magnitude_masks(model: nn.Module, densities: dict[str, float]) -> dict[str, torch.Tensor]:
    """Layer-wise magnitude masks: layer ``l`` keeps ``round(d_l |W_l|)`` weights (at least one per output
    unit), the largest ``|w|`` with ties broken by the lower flat index; ``{name: BoolTensor}``."""
    weights = prunable_weights(model)
    unknown = sorted(set(densities) - set(weights))
    if unknown:
        raise ValueError(f"densities name unknown prunable weights {unknown}; valid: {list(weights)}")
    masks = {}
    for name, d in densities.items():
        w = weights[name]
        if not 0 < d <= 1:
            raise ValueError(f"Invalid density for {name}: {d}")
        count = min(max(round(d * w.numel()), w.shape[0]), w.numel())
        masks[name] = _layer_mask(w, count)
    return masks


def candidate_masks(model: nn.Module, density: float, num_candidates: int = 10,
                    generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """``num_candidates`` magnitude masks at global density ``density``: candidate 0 uses the ERK
    allocation, candidate ``c >= 1`` multiplies each layer's ERK density by a factor from ``U[0.5, 1.5]``
    (drawn from ``generator``) and rescales to the same exact global count."""
    _check_density(density)
    if not (isinstance(num_candidates, int) and num_candidates >= 1):
        raise ValueError(f"Invalid num_candidates: {num_candidates}")
    weights = prunable_weights(model)
    erk = erk_densities(model, density)
    base = torch.tensor(list(erk.values()), dtype=torch.float64)
    out = [magnitude_masks(model, erk)]
    for _ in range(1, num_candidates):
        factors = torch.rand(len(weights), generator=generator, dtype=torch.float64) + 0.5
        out.append(magnitude_masks(model, _densities_from_raw(weights, base * factors, density)))
    return out


_MASK_ATTR, _HOOK_ATTR = "_normlab_mask", "_normlab_mask_hooked"


def _mask_grad(param: nn.Parameter) -> None:
    param.grad.mul_(getattr(param, _MASK_ATTR))


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place and keep their gradients zero: a post-accumulate-grad
    hook multiplies ``.grad`` by the mask after every backward (registered once per weight; calling again
    replaces the mask). With an optimizer without weight decay or momentum on pruned entries (plain SGD)
    pruned weights stay exactly zero. ``torch.autograd.grad`` still sees the dense gradient."""
    weights = prunable_weights(model)
    for name, mask in masks.items():
        if name not in weights:
            raise ValueError(f"mask for unknown prunable weight {name!r}; valid: {list(weights)}")
        w = weights[name]
        if mask.shape != w.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, expected {tuple(w.shape)}")
        mask = mask.to(device=w.device, dtype=torch.bool)
        with torch.no_grad():
            w.mul_(mask)
        if getattr(w, _HOOK_ATTR, None) != id(w):     # a deep copy carries the attribute but not the hook
            w.register_post_accumulate_grad_hook(_mask_grad)
            setattr(w, _HOOK_ATTR, id(w))
        setattr(w, _MASK_ATTR, mask)


def prune_and_grow(weight: torch.Tensor, mask: torch.Tensor, agg_indices: torch.Tensor,
                   agg_scores: torch.Tensor, k: int) -> torch.Tensor:
    """One density-preserving mask update: grow the ``k`` pruned positions with the largest aggregated score
    (``agg_scores`` at flat ``agg_indices``, summed over duplicates; unreported positions score 0; ties by
    index) and prune the ``k`` previously active positions with the smallest ``|weight|`` (ties by index).
    Grown positions come from the pruned set, so a just-grown index is never pruned. Returns the new mask;
    the caller zeroes the pruned weights (grown ones are already 0)."""
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    flat = mask.flatten()
    active, pruned = int(flat.sum()), int((~flat).sum())
    if not (isinstance(k, int) and 0 <= k <= min(active, pruned)):
        raise ValueError(f"Invalid k: {k} (need 0 <= k <= min(active {active}, pruned {pruned}))")
    agg_indices = agg_indices.long().flatten()
    if agg_indices.shape != agg_scores.flatten().shape:
        raise ValueError(f"agg_indices and agg_scores differ in length: {agg_indices.numel()} vs "
                         f"{agg_scores.numel()}")
    if agg_indices.numel() and (agg_indices.min() < 0 or agg_indices.max() >= flat.numel()
                                or flat[agg_indices].any()):
        raise ValueError("agg_indices must be flat indices of currently pruned positions")
    if k == 0:
        return mask.clone()
    score = torch.zeros(flat.numel(), dtype=torch.float64)
    score.index_add_(0, agg_indices, agg_scores.flatten().double())
    score = torch.where(flat, torch.full_like(score, -math.inf), score)
    grow = torch.sort(score, descending=True, stable=True).indices[:k]
    magnitude = torch.where(flat, weight.detach().flatten().abs().double(), torch.full_like(score, math.inf))
    drop = torch.sort(magnitude, stable=True).indices[:k]
    new = flat.clone()
    new[grow] = True
    new[drop] = False
    return new.view_as(mask)


# --- BN statistics -------------------------------------------------------------------------------------------
def _bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@contextmanager
def _probe(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in train mode for a forward that must leave no trace: every buffer (BN running statistics)
    and every module's train/eval flag are restored on exit, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [b.clone() for b in model.buffers()]
    model.train()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for b, old in zip(model.buffers(), saved):
                b.copy_(old)


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def reestimate_bn_stats(model: nn.Module, batches: Iterable[Any], num_batches: int = 10) -> dict[str, BNStats]:
    """Exact BN statistics of ``model`` on up to ``num_batches`` batches (a tensor or a tuple whose first item
    is the input): a train-mode forward under ``no_grad`` with hooks accumulating, per BN channel, the count,
    sum and sum of squares (float64) of the layer's input; returns ``{name: BNStats(mean, population var,
    count)}``. Not read off PyTorch's ``momentum=None`` buffers (those average per-batch unbiased variances).
    The model's parameters, buffers and train/eval flags are left as they were."""
    if not (isinstance(num_batches, int) and num_batches >= 1):
        raise ValueError(f"Invalid num_batches: {num_batches}")
    layers = _bn_layers(model)
    if not layers:
        raise ValueError("model has no BatchNorm layers")
    acc: dict[str, list] = {name: [0, 0.0, 0.0] for name in layers}

    def hook(name: str):
        def fn(module, args):
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            a = acc[name]
            a[0] += x.shape[1]
            a[1] = a[1] + x.sum(1)
            a[2] = a[2] + x.square().sum(1)
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    seen = 0
    try:
        with _probe(model), torch.no_grad():
            for i, batch in enumerate(batches):
                if i == num_batches:
                    break
                x = _inputs(batch)
                if x.shape[0] < 2:
                    raise ValueError(f"reestimate_bn_stats: batch {i} has {x.shape[0]} example(s); BN statistics "
                                     "need at least 2 per batch in train mode")
                model(x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("reestimate_bn_stats: no batches")
    out = {}
    for name, (n, s, q) in acc.items():
        mean = s / n
        out[name] = BNStats(mean, (q / n - mean.square()).clamp(min=0), n)
    return out


def aggregate_bn_stats(stats_list: Sequence[dict[str, BNStats]], weights: Sequence[float] | None = None
                       ) -> dict[str, BNStats]:
    """Pooled statistics over clients, in list order: ``mu = sum_k w_k mu_k / sum_k w_k`` and ``sigma^2 =
    sum_k w_k (sigma^2_k + mu_k^2) / sum_k w_k - mu^2``; ``weights`` default to each layer's own counts
    (the exact statistics of the concatenated data), FedTiny passes ``n_k``. The count is the sum."""
    if not stats_list:
        raise ValueError("aggregate_bn_stats: empty stats_list")
    if weights is not None and len(weights) != len(stats_list):
        raise ValueError(f"aggregate_bn_stats: {len(weights)} weights for {len(stats_list)} clients")
    out = {}
    for name in stats_list[0]:
        w = torch.tensor([float(s[name].count) for s in stats_list] if weights is None else list(weights),
                         dtype=torch.float64)
        mean = torch.stack([s[name].mean for s in stats_list])
        second = torch.stack([s[name].var + s[name].mean.square() for s in stats_list])
        mu = (w[:, None] * mean).sum(0) / w.sum()
        var = ((w[:, None] * second).sum(0) / w.sum() - mu.square()).clamp(min=0)
        out[name] = BNStats(mu, var, sum(s[name].count for s in stats_list))
    return out


def install_bn_stats(model: nn.Module, stats: dict[str, BNStats]) -> None:
    """Write ``stats`` into the BN layers' running buffers: ``running_mean = mu``, ``running_var = sigma^2 n /
    (n - 1)`` (PyTorch stores the unbiased estimate)."""
    layers = _bn_layers(model)
    for name, s in stats.items():
        if name not in layers:
            raise ValueError(f"no BatchNorm layer named {name!r}; valid: {list(layers)}")
        if s.count < 2:
            raise ValueError(f"install_bn_stats: {name} has count {s.count}; need at least 2")
        m = layers[name]
        with torch.no_grad():
            m.running_mean.copy_(s.mean)
            m.running_var.copy_(s.var * (s.count / (s.count - 1)))


def topk_pruned_grads(model: nn.Module, batch: Batch, layer: str, k: int,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``|dL/dW|`` of prunable weight ``layer`` among its pruned positions (the mask set
    by :func:`apply_masks`), from one train-mode forward/backward on ``batch = (x, y)``; returns (flat
    indices, magnitudes), ties by index. Parameters, ``.grad`` and buffers are left untouched."""
    weights = prunable_weights(model)
    if layer not in weights:
        raise ValueError(f"unknown prunable weight {layer!r}; valid: {list(weights)}")
    w = weights[layer]
    if getattr(w, _HOOK_ATTR, None) != id(w):
        raise ValueError(f"{layer} has no mask: call apply_masks first")
    if not (isinstance(k, int) and k >= 0):
        raise ValueError(f"Invalid k: {k}")
    pruned = (~getattr(w, _MASK_ATTR)).flatten().nonzero().squeeze(1)
    with _probe(model):
        grad, = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), w)
    scores = grad.detach().abs().flatten()[pruned]
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    return pruned[top], scores[top]


# --- FedAvg --------------------------------------------------------------------------------------------------
def _pack(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in state.values()])


def _unpack(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, t in like.items():
        part = flat[offset:offset + t.numel()].view(t.shape)
        out[name] = part.round().to(t.dtype) if not t.is_floating_point() else part.to(t.dtype)
        offset += t.numel()
    return out


def _weighted_mean(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k rows_k / sum_k w_k`` over dim 0, float64: the one reduction both engines use."""
    w = weights.double().reshape(-1, *([1] * (rows.dim() - 1)))
    return (w * rows).sum(0) / weights.double().sum()


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The ``weights``-weighted mean of state dicts (weights and buffers; integer buffers rounded), computed
    in float64 over the clients in list order."""
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg: {len(states)} states and {len(weights)} weights")
    flat = _weighted_mean(torch.stack([_pack(s) for s in states]), torch.as_tensor(weights, dtype=torch.float64))
    return _unpack(flat, states[0])


# --- engines -------------------------------------------------------------------------------------------------
class _Clients:
    """Which clients this process hosts, their sizes, and the gather of per-client rows into ``(K, ...)``."""

    def __init__(self, clients: Sequence[Batch | None], engine: str, client_ranks: Sequence[int] | None,
                 process_group: dist.ProcessGroup | None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"Invalid engine: {engine!r}; valid: {list(ENGINES)}")
        self.num = len(clients)
        if self.num == 0:
            raise ValueError("no clients")
        self.group = process_group
        if engine == "distributed":
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("engine='distributed' needs an initialised torch.distributed process group")
            size, me = dist_world_size(process_group), dist_rank(process_group)
            ranks = list(client_ranks) if client_ranks is not None else [k * size // self.num for k in range(self.num)]
            if len(ranks) != self.num or any(not 0 <= r < size for r in ranks):
                raise ValueError(f"Invalid client_ranks: {ranks} (need {self.num} ranks in [0, {size}))")
            self.local = [k for k in range(self.num) if ranks[k] == me]
        else:
            if client_ranks is not None:
                raise ValueError("client_ranks only applies to engine='distributed'")
            self.local = list(range(self.num))
        self.distributed = engine == "distributed"
        for k in self.local:
            data = clients[k]
            if data is None or len(data[0]) == 0:
                raise ValueError(f"client {k} has no data")
            if len(data[0]) != len(data[1]):
                raise ValueError(f"client {k}: {len(data[0])} inputs but {len(data[1])} targets")
        self.data = {k: clients[k] for k in self.local}
        self.sizes = self.gather({k: torch.tensor([float(len(self.data[k][0]))]) for k in self.local}).squeeze(1)

    def gather(self, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """``(K, *shape)`` float64: row ``k`` is client ``k``'s tensor, whichever rank hosts it."""
        shape = next(iter(rows.values())).shape if rows else None
        if self.distributed:
            shapes = [None] * dist_world_size(self.group)
            dist.all_gather_object(shapes, shape, group=self.group)
            shape = next(s for s in shapes if s is not None)
        out = torch.zeros(self.num, *shape, dtype=torch.float64)
        for k, row in rows.items():
            out[k] = row.double()
        if self.distributed:
            out, = all_reduce_sum(out, process_group=self.group)
        return out


def _batches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int) -> list[Batch]:
    """Batches of ``order``; a trailing batch of size 1 is dropped (train-mode BN needs two values)."""
    out = [(x[idx], y[idx]) for idx in order.split(batch_size)]
    return out[:-1] if len(out) > 1 and len(out[-1][0]) == 1 else out


@torch.no_grad()
def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, batch_size: int) -> float:
    total = sum(float(loss_fn(model(xb), yb)) * len(yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return total / len(y)


def _stats_vector(stats: dict[str, BNStats]) -> torch.Tensor:
    return torch.cat([torch.cat([s.mean, s.var, torch.tensor([float(s.count)], dtype=torch.float64)])
                      for s in stats.values()])


def _stats_from_vector(vec: torch.Tensor, like: dict[str, BNStats]) -> dict[str, BNStats]:
    out, offset = {}, 0
    for name, s in like.items():
        c = s.mean.numel()
        out[name] = BNStats(vec[offset:offset + c], vec[offset + c:offset + 2 * c], int(vec[offset + 2 * c]))
        offset += 2 * c + 1
    return out


def adaptive_bn_selection(model: nn.Module, masks: Sequence[dict[str, torch.Tensor]],
                          clients: Sequence[Batch | None], *, num_batches: int = 10, batch_size: int = 32,
                          loss_fn: Callable = F.cross_entropy, engine: str = "simulated",
                          client_ranks: Sequence[int] | None = None,
                          process_group: dist.ProcessGroup | None = None
                          ) -> tuple[int, torch.Tensor, dict[str, BNStats]]:
    """Module 1: for each candidate mask, every client re-estimates the BN statistics of ``W ⊙ M_c`` on its
    first ``num_batches`` batches (in stored order), installs them and reports its eval-mode mean loss; the
    server pools statistics and losses with weights ``n_k``. Returns ``(c*, L (C,), pooled stats of c*)``
    with ``c* = argmin L`` (lowest index on ties). ``model`` is not modified. ``clients`` are ``(x, y)``
    pairs (``None`` for clients another rank hosts under ``engine="distributed"``)."""
    group = _Clients(clients, engine, client_ranks, process_group)
    return _select(model, masks, group, num_batches, batch_size, loss_fn)


def _select(model, masks, group: _Clients, num_batches, batch_size, loss_fn):
    if not masks:
        raise ValueError("adaptive_bn_selection: no candidate masks")
    work = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    rows: dict[int, torch.Tensor] = {}
    for k in group.local:
        x, y = group.data[k]
        per_candidate = []
        for mask in masks:
            work.load_state_dict(state)
            apply_masks(work, mask)
            stats = reestimate_bn_stats(work, _batches(x, y, torch.arange(len(y)), batch_size), num_batches)
            install_bn_stats(work, stats)
            work.eval()
            per_candidate.append(torch.cat([_stats_vector(stats),
                                            torch.tensor([_mean_loss(work, x, y, loss_fn, batch_size)],
                                                         dtype=torch.float64)]))
        rows[k] = torch.stack(per_candidate)
    table = group.gather(rows)                                    # (K, C, S + 1)
    losses = _weighted_mean(table[:, :, -1], group.sizes)         # (C,): the n_k-weighted candidate losses
    best = int(torch.argmin(losses))                              # first minimum on ties
    like = {name: BNStats(m.running_mean, m.running_var, 0) for name, m in _bn_layers(model).items()}
    per_client = [_stats_from_vector(table[k, best, :-1], like) for k in range(group.num)]
    stats = aggregate_bn_stats(per_client, group.sizes.tolist())
    return best, losses, stats


class FedTiny:
    """FedTiny (adaptive BN selection + progressive pruning) over FedAvg, simulated or on real ranks.

    ``model`` is the initialised global model (every rank must pass the same one); ``clients`` the clients'
    ``(x, y)`` tensors in client order (under ``engine="distributed"`` an entry may be ``None`` when another
    rank hosts that client; ``client_ranks[k]`` is client ``k``'s rank, default contiguous blocks).
    ``selection="adaptive_bn"`` runs module 1; an ``int`` installs that candidate as it is (default BN
    statistics). ``progressive=False`` keeps the mask fixed. ``density=1`` is dense FedAvg. Local training
    is plain SGD with ``lr`` for ``local_epochs`` epochs of batches of ``batch_size`` (a trailing batch of one
    example is dropped), client ``k`` shuffling with ``torch.Generator().manual_seed(seed * 1_000_003 + k)``.

    After :meth:`run` (or :meth:`select` and :meth:`train_round`): ``model`` is the global model, ``masks``
    its masks (``None`` when dense), ``history`` holds ``test_acc`` ([round, value], with ``eval_fn``),
    ``bytes`` ([round, cumulative bytes]), ``mask_changes`` ([round, layer, a_t]), ``candidate_losses``
    and ``selected``; ``selected_bn_stats`` are the pooled statistics installed by module 1; ``bytes_sent``
    is the running total.
    """

    def __init__(self, model: nn.Module, clients: Sequence[Batch | None], density: float, *,
                 num_candidates: int = 10, bn_batches: int = 10, alpha: float = 0.3, delta_rounds: int = 5,
                 end_fraction: float = 0.75, local_epochs: int = 1, lr: float = 0.05, batch_size: int = 32,
                 selection: str | int = "adaptive_bn", progressive: bool = True,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, seed: int = 0,
                 engine: str = "simulated", client_ranks: Sequence[int] | None = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        _check_density(density)
        if not (isinstance(num_candidates, int) and num_candidates >= 1):
            raise ValueError(f"Invalid num_candidates: {num_candidates}")
        if not (isinstance(bn_batches, int) and bn_batches >= 1):
            raise ValueError(f"Invalid bn_batches: {bn_batches}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"Invalid alpha: {alpha}")
        if not (isinstance(delta_rounds, int) and delta_rounds >= 1):
            raise ValueError(f"Invalid delta_rounds: {delta_rounds}")
        if not 0 < end_fraction <= 1:
            raise ValueError(f"Invalid end_fraction: {end_fraction}")
        if not (isinstance(local_epochs, int) and local_epochs >= 1):
            raise ValueError(f"Invalid local_epochs: {local_epochs}")
        if not lr > 0:
            raise ValueError(f"Invalid lr: {lr}")
        if not (isinstance(batch_size, int) and batch_size >= 2):
            raise ValueError(f"Invalid batch_size: {batch_size}")
        if selection != "adaptive_bn" and not (isinstance(selection, int) and 0 <= selection < num_candidates):
            raise ValueError(f"Invalid selection: {selection!r} (need 'adaptive_bn' or a candidate index "
                             f"in [0, {num_candidates}))")
        self.clients = _Clients(clients, engine, client_ranks, process_group)
        self.model, self.density = model, density
        self.num_candidates, self.bn_batches, self.alpha = num_candidates, bn_batches, alpha
        self.delta_rounds, self.end_fraction, self.local_epochs = delta_rounds, end_fraction, local_epochs
        self.lr, self.batch_size, self.selection, self.progressive = lr, batch_size, selection, progressive
        self.loss_fn, self.seed = loss_fn, seed
        self.generators = {k: torch.Generator().manual_seed(seed * 1_000_003 + k) for k in self.clients.local}
        self.masks: dict[str, torch.Tensor] | None = None
        self.selected: int | None = None
        self.candidate_losses: list[float] = []
        self.selected_bn_stats: dict[str, BNStats] | None = None
        self.bytes_sent = 0
        self.history: dict[str, Any] = {"test_acc": [], "bytes": [], "mask_changes": []}
        self._local = copy.deepcopy(model)
        weights = prunable_weights(model)
        self._bitmap_bytes = sum(math.ceil(w.numel() / 8) for w in weights.values())
        prunable_ids = {id(w) for w in weights.values()}
        self._other_floats = sum(t.numel() for t in [*model.parameters(), *model.buffers()]
                                 if t.is_floating_point() and id(t) not in prunable_ids)
        self._selected_done = False

    # bytes ------------------------------------------------------------------------------------------------
    def _model_bytes(self) -> int:
        weights = prunable_weights(self.model)
        nnz = sum(w.numel() for w in weights.values()) if self.masks is None else \
            sum(int(m.sum()) for m in self.masks.values())
        return 4 * (nnz + self._other_floats)

    def select(self) -> None:
        """Build the candidates and install the chosen mask (module 1, or the fixed ``selection``)."""
        if self._selected_done:
            raise RuntimeError("select() already ran")
        self._selected_done = True
        if self.density == 1:
            return
        candidates = candidate_masks(self.model, self.density, self.num_candidates,
                                     torch.Generator().manual_seed(self.seed))
        k = self.clients.num
        if self.selection == "adaptive_bn":
            best, losses, stats = _select(self.model, candidates, self.clients, self.bn_batches, self.batch_size,
                                          self.loss_fn)
            self.selected, self.candidate_losses, self.selected_bn_stats = best, losses.tolist(), stats
            self.masks = candidates[best]
            apply_masks(self.model, self.masks)
            install_bn_stats(self.model, stats)
            channels = sum(m.num_features for m in _bn_layers(self.model).values())
            self.bytes_sent += k * self.num_candidates * (self._model_bytes() + self._bitmap_bytes)
            self.bytes_sent += k * 4 * (self.num_candidates * (2 * channels + 1) + 1)
        else:
            self.selected = self.selection
            self.masks = candidates[self.selection]
            apply_masks(self.model, self.masks)

    def _adjustment(self, t: int, end_round: int) -> tuple[str, int] | None:
        if self.masks is None or not self.progressive or t % self.delta_rounds or t > end_round:
            return None
        names = list(self.masks)
        layer = names[(t // self.delta_rounds - 1) % len(names)]
        mask = self.masks[layer]
        nnz = int(mask.sum())
        a = round(self.alpha / 2 * (1 + math.cos(math.pi * t / end_round)) * nnz)
        a = min(a, mask.numel() - nnz)
        return (layer, a) if a > 0 else None

    def _local_train(self, k: int) -> None:
        x, y = self.clients.data[k]
        local = self._local
        opt = torch.optim.SGD(local.parameters(), lr=self.lr)
        local.train()
        for _ in range(self.local_epochs):
            order = torch.randperm(len(y), generator=self.generators[k])
            for xb, yb in _batches(x, y, order, self.batch_size):
                opt.zero_grad(set_to_none=True)
                self.loss_fn(local(xb), yb).backward()
                opt.step()

    def train_round(self, t: int, end_round: int) -> None:
        """FedAvg round ``t`` (from 1) with the progressive adjustment of the sheet (mask changes while
        ``t <= end_round``)."""
        if not self._selected_done:
            self.select()
        if t == 1 and self.masks is not None:
            self.bytes_sent += self.clients.num * self._bitmap_bytes
        self.bytes_sent += 2 * self.clients.num * self._model_bytes()
        adjust = self._adjustment(t, end_round)
        state = self.model.state_dict()
        rows, reports, entries = {}, {}, {}
        for k in self.clients.local:
            self._local.load_state_dict(state)
            if self.masks is not None:
                apply_masks(self._local, self.masks)
            self._local_train(k)
            rows[k] = _pack(self._local.state_dict())
            if adjust is not None:
                layer, a = adjust
                x, y = self.clients.data[k]
                idx = torch.randperm(len(y), generator=self.generators[k])[:self.batch_size]
                ind, val = topk_pruned_grads(self._local, (x[idx], y[idx]), layer, a, self.loss_fn)
                dense = torch.zeros(self.masks[layer].numel(), dtype=torch.float64)
                dense[ind] = val.double()
                reports[k], entries[k] = dense, torch.tensor([float(ind.numel())])
        sizes = self.clients.sizes
        self.model.load_state_dict(_unpack(_weighted_mean(self.clients.gather(rows), sizes), state))
        if adjust is not None:
            layer, a = adjust
            agg = _weighted_mean(self.clients.gather(reports), sizes)
            self.bytes_sent += 8 * int(self.clients.gather(entries).sum())
            nz = agg.nonzero().squeeze(1)
            weight = prunable_weights(self.model)[layer]
            self.masks[layer] = prune_and_grow(weight, self.masks[layer], nz, agg[nz], a)
            apply_masks(self.model, {layer: self.masks[layer]})
            self.bytes_sent += self.clients.num * self._bitmap_bytes
            self.history["mask_changes"].append([t, layer, a])

    def run(self, rounds: int, eval_fn: Callable[[nn.Module], float] | None = None) -> dict[str, Any]:
        """Selection, then ``rounds`` FedAvg rounds with mask changes up to ``R_end = round(end_fraction *
        rounds)``; returns :attr:`history` (``eval_fn(model)`` is recorded after every round)."""
        if not (isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"Invalid rounds: {rounds}")
        if not self._selected_done:
            self.select()
        end_round = max(1, round(self.end_fraction * rounds))
        for t in range(1, rounds + 1):
            self.train_round(t, end_round)
            self.history["bytes"].append([t, self.bytes_sent])
            if eval_fn is not None:
                with torch.no_grad():
                    self.model.eval()
                    self.history["test_acc"].append([t, float(eval_fn(self.model))])
        self.history.update(candidate_losses=self.candidate_losses, selected=self.selected)
        return self.history
