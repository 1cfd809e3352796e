"""Output-signal growth of residual towers with depth, and the path (residual) expansion by order.

Paper: B. Dherin, M. Munn, "On residual network depth", 2025, arXiv:2510.03470 (no public code); the scaling
rule itself is :mod:`normlab.layers.residual`. For a tower ``h_{i+1} = h_i + alpha f_i(h_i)``:

- :func:`log_norm_growth` ``(blocks, alpha, x)``: per block and per sample ``log(||h_i|| / ||h_0||)`` (natural
  log; norms over every dim but the batch dim 0), shape ``(len(blocks), N)``.
- :func:`residual_signal_growth` ``(make_block, depths=(4, 16, 64, 256), rule="1/n", width=256,
  n_samples=512, seed=0, c=1.0)``: for each depth n a fresh tower of n branches ``make_block(width,
  generator)`` with ``alpha = residual_alpha(rule, n, c)`` on ``x ~ N(0, I)`` inputs (``n_samples x width``):
  ``{n: log10(mean_samples ||h_n|| / ||h_0||)}`` at init. The default branch the spec sheet measures is
  :func:`random_relu_branch`: ``f(h) = W2 relu(W1 h)``, ``W1 ~ N(0, 2/d)``, ``W2 ~ N(0, 1/d)``, no biases, for
  which ``E||h + f(h)||^2 = 2 ||h||^2``: with ``alpha = 1`` the log-ratio grows by ``ln(2)/2 ~ 0.35`` per block,
  ``alpha = 1/sqrt(n)`` tends to ``sqrt(e) ~ 1.65`` and ``alpha = 1/n`` to 1.
- :func:`expansion_terms` ``(blocks, alpha, x, max_order)``: the order-k terms ``T_0 .. T_K`` of the residual
  expansion at ``x``: ``T_0 = x``, ``T_1 = alpha sum_i f_i(x)``, ``T_k = alpha^k sum_{i_1<...<i_k}
  J_{i_k}(x) ... J_{i_2}(x) f_{i_1}(x)`` (Jacobians at the input, the sheet's nonlinear case), by the recursion
  over blocks ``T_k <- T_k + alpha J_i(x) T_{k-1}`` (``f_i(x)`` for k = 1) with ``torch.func.jvp``. For linear
  blocks ``f_i(x) = A_i x`` this is exact: ``sum_{k<=n} T_k`` is the tower's output.
- :func:`path_order_profile` ``(blocks, alpha, x, max_order=3)``: the norms of those terms, ``(K + 1, N)``.

Log space, as the sheet warns: a float32 forward with ``alpha = 1`` overflows to inf/nan near 256 blocks
(growth ~1e39), so the towers run in float64 (blocks are cast; inputs too) and ratios are reported as logs,
the sample mean taken with ``logsumexp``; a tower whose signal still overflows float64 (~1e308, about 2,000
such blocks) raises ``OverflowError`` rather than return inf. Renormalising ``h`` after each block would reach
any depth but is exact only for positively homogeneous blocks (bias-free ReLU), so it is not used.

Randomness only from a ``torch.Generator`` seeded with ``seed``: inputs first, then the blocks in order, so the
first blocks of a deeper tower are those of a shallower one. Blocks built here are ours; user blocks passed to
:func:`log_norm_growth` / :func:`expansion_terms` are run under no grad and in eval mode (restored after), in
the dtype of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._model_state import eval_mode
from ..layers.residual import residual_alpha

BlockMaker = Callable[[int, torch.Generator], nn.Module]


def random_relu_branch(width: int, generator: torch.Generator) -> nn.Module:
    """``Linear(W1) -> ReLU -> Linear(W2)``, no biases, ``W1 ~ N(0, 2/width)``, ``W2 ~ N(0, 1/width)``."""
    branch = nn.Sequential(nn.Linear(width, width, bias=False), nn.ReLU(), nn.Linear(width, width, bias=False))
    with torch.no_grad():
        branch[0].weight.normal_(0.0, math.sqrt(2.0 / width), generator=generator)
        branch[2].weight.normal_(0.0, math.sqrt(1.0 / width), generator=generator)
    return branch


def _check_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, alpha: float) -> list[nn.Module]:
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks must hold at least one residual branch")
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{i}] must be an nn.Module, got {type(block).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor (N, ...) with a batch dim, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return blocks


def _log_norms(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(h.flatten(1), dim=1).log()


def _call(block: nn.Module, h: torch.Tensor, i: int) -> torch.Tensor:
    out = block(h)
    if out.shape != h.shape:
        raise ValueError(f"blocks[{i}] ({type(block).__name__}) maps {tuple(h.shape)} to {tuple(out.shape)}: "
                         "a residual branch must keep the shape")
    return out


@torch.no_grad()
def log_norm_growth(blocks: Sequence[nn.Module], alpha: float, x: torch.Tensor) -> torch.Tensor:
    """``log(||h_i|| / ||h_0||)`` after each block i (rows) for each sample (columns) of the tower
    ``h_{i+1} = h_i + alpha * blocks[i](h_i)``, in the dtype of ``x``; ``OverflowError`` when ``h`` overflows."""
    blocks = _check_blocks(blocks, x, alpha)
    h, logs = x, []
    log0 = _log_norms(x)
    for i, block in enumerate(blocks):
        with eval_mode(block):
            h = h + alpha * _call(block, h, i)
        if not torch.isfinite(h).all():
            raise OverflowError(f"the signal overflowed {x.dtype} after block {i + 1} of {len(blocks)}; "
                                "use float64 inputs or fewer blocks")
        logs.append(_log_norms(h) - log0)
    return torch.stack(logs)


def _check_depths(depths: Sequence[int]) -> tuple[int, ...]:
    depths = tuple(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be ints >= 1, got {depths!r}")
    return depths


def residual_signal_growth(make_block: BlockMaker = random_relu_branch, depths: Sequence[int] = (4, 16, 64, 256),
                           rule: str = "1/n", width: int = 256, n_samples: int = 512, seed: int = 0,
                           c: float = 1.0) -> dict[int, float]:
    """``{depth: log10 of the sample mean of ||h_depth|| / ||h_0||}`` at init for towers of ``make_block(width,
    generator)`` branches scaled by ``rule`` (float64, ``x ~ N(0, I)`` of shape ``(n_samples, width)``)."""
    depths = _check_depths(depths)
    for name, value in (("width", width), ("n_samples", n_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    alphas = {n: residual_alpha(rule, n, c) for n in depths}
    out = {}
    for n in depths:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n_samples, width, generator=gen, dtype=torch.float64)
        blocks = [make_block(width, gen).to(torch.float64) for _ in range(n)]
        final = log_norm_growth(blocks, alphas[n], x)[-1]
        out[n] = ((torch.logsumexp(final, 0) - math.log(n_samples)) / math.log(10)).item()
    return out


def expansion_terms(blocks: Sequence[nn.Module], alpha: float, x: torch.Tensor, max_order: int) -> torch.Tensor:
    """The order-0..``max_order`` terms of the residual expansion of the tower at ``x``: ``(K + 1, *x.shape)``."""
    blocks = _check_blocks(blocks, x, alpha)
    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 0:
        raise ValueError(f"max_order must be an int >= 0, got {max_order!r}")
    terms = torch.zeros((max_order + 1, *x.shape), dtype=x.dtype, device=x.device)
    terms[0] = x
    if max_order == 0:
        return terms
    primal = x.unsqueeze(0).expand(max_order - 1, *x.shape).reshape(-1, *x.shape[1:])
    for i, block in enumerate(blocks):
        with eval_mode(block), torch.no_grad():
            f = _call(block, x, i)
            higher = torch.zeros_like(terms[2:])
            if max_order > 1:
                _, jv = torch.func.jvp(block, (primal,), (terms[1:-1].reshape(-1, *x.shape[1:]),))
                higher = jv.reshape(terms[2:].shape)
            terms[1:] = terms[1:] + alpha * torch.cat([f.unsqueeze(0), higher])
    return terms


def path_order_profile(blocks: Sequence[nn.Module], alpha: float, x: torch.Tensor, max_order: int = 3
                       ) -> torch.Tensor:
    """``||T_k||`` per sample for k = 0..``max_order`` (norms over every dim but the batch dim): ``(K + 1, N)``."""
    terms = expansion_terms(blocks, alpha, x, max_order)
    return torch.linalg.vector_norm(terms.flatten(2), dim=2)
