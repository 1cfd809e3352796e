"""Loss landscapes: 1-D lines and 2-D surfaces of the loss around the trained parameters, with PNG plots.

Papers: H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the Loss Landscape of Neural Nets"
(NeurIPS 2018, arXiv 1712.09913; filter normalisation) and N. Gabdullin, "Loss Landscape Analysis (LLA):
Investigating generalization capabilities of neural networks by means of loss landscapes and Hessian analysis"
(2024, arXiv 2412.10146; official code ``GabdullinN/loss-landscape-analysis``, ``random_plane``; Hessian axes).

Parameters ``theta`` are the model's ``requires_grad`` parameters in ``named_parameters()`` order; a
*direction* is a list of tensors shaped like ``theta``. A surface is

    L[i, j] = L(theta + a_i d1 + b_j d2),   a = b = linspace(-dist/2, dist/2, steps)

(``steps`` odd puts ``theta`` exactly at the centre), a line is ``L(theta + a_i d)``. The loss of ``data`` is
``loss_fn(model(inputs), targets)`` for one batch ``(inputs, targets)``, or the sample-weighted mean of the
batch losses over a re-iterable of batches (a list or a data loader; ``loss_fn`` should return the batch
mean, as torch's losses do by default), exactly as in :class:`normlab.analysis.hessian.HessianOperator`.
The model is evaluated in **eval mode** (BatchNorm uses its running statistics, dropout is off), as the LLA
sheet prescribes; every module's train/eval flag is restored afterwards.

Directions (``random_directions``): entries N(0, 1) as in Li et al., drawn from a ``torch.Generator``, then
normalised per tensor w.r.t. ``theta`` (``normalize_direction``, order ``p`` = 1 or 2):

- ``"filter"`` (Li et al., default): tensors with dim >= 2, every slice f along dim 0:
  ``d_f <- d_f ||theta_f||_p / (||d_f||_p + 1e-10)``; 1-D tensors (biases, norm affine parameters) are
  rescaled as a whole, ``d <- d ||theta||_p / (||d||_p + 1e-10)`` (LLA), or zeroed with ``ignore_1d=True``
  (Li et al.);
- ``"layer"``: every tensor as a whole; ``"model"``: the whole vector; ``"weight"``: ``d <- d * theta``;
  ``None``: as drawn.

Hessian axes (``hessian_directions``): the top-``n`` eigenvectors (largest ``|lambda|``; unit norm) of
:class:`normlab.analysis.hessian.HessianOperator`. ``loss_surface`` applies ``normalization`` to whatever
axes it is given, as LLA's ``random_plane`` does; pass ``normalization=None`` to keep the unit eigenvectors
(then the curvature of the surface along axis k at the centre is ``lambda_k``).

Evaluation uses ``torch.func.functional_call`` on perturbed copies of ``theta`` (never in-place add/sub on
the model, which accumulates rounding error): ``theta`` stays bit-identical, ``.grad`` and ``requires_grad``
are never touched (no backward pass). Grid points are evaluated ``chunk_size`` at a time with
``torch.func.vmap`` (default: as many as keep the perturbed parameters and module outputs of a chunk,
measured by one plain forward pass, under 2**25 numbers, at most 256 points). Batched matrix products round
differently from unbatched ones, so vmapped values agree with a plain forward pass to rounding (1 ulp
measured), not bit-exactly; ``chunk_size=1`` evaluates one point per plain
``functional_call`` (slower, bit-exact at the centre, and for models ``vmap`` cannot trace: ``.item()``,
data-dependent control flow, in-place buffer updates).

Deviations from LLA's ``random_plane``: coordinates are ``linspace(-dist/2, dist/2, steps)`` in both axes
(official: ``(i - steps/2) dist/steps`` and ``(j + 1 - steps/2) dist/steps``, serpentine order with in-place
updates); random entries are N(0, 1) and not orthogonalised (official: U[0, 1) with the second direction made
orthogonal to the first); 1-D tensors get an epsilon like filters. LLA's Adam-moment axes and its ``adameq``
plane are not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .._model_state import eval_mode
from .hessian import HessianOperator, _batches, _weighted_batches

NORMALIZATIONS = ("filter", "layer", "model", "weight", None)
PLOT_KINDS = ("contour", "surface", "both")
EPS = 1e-10
CHUNK_ELEMENTS = 2 ** 25
MAX_CHUNK = 256

Direction = list[torch.Tensor]


def _named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``requires_grad`` parameters, detached (same storage: never written)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameters with requires_grad=True")
    return params


def _check_normalization(normalization: str | None, order: int) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid: {NORMALIZATIONS}")
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 or 2, got {order!r}")


def _check_grid(dist: float, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if isinstance(dist, bool) or not isinstance(dist, (int, float)) or not math.isfinite(dist) or dist <= 0:
        raise ValueError(f"dist must be a positive finite number, got {dist!r}")


def _check_direction(direction: Sequence[torch.Tensor], params: dict[str, torch.Tensor], name: str) -> Direction:
    """``direction`` as a list matching ``params`` in count, shape, dtype kind and device."""
    if isinstance(direction, torch.Tensor) or not isinstance(direction, Sequence):
        raise TypeError(f"{name} must be a list of tensors shaped like the model's parameters, "
                        f"got {type(direction).__name__}")
    if len(direction) != len(params):
        raise ValueError(f"{name} has {len(direction)} tensors, the model has {len(params)} parameters "
                         f"with requires_grad=True")
    out = []
    for (pname, p), d in zip(params.items(), direction):
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise TypeError(f"{name} entry for {pname!r} must be a floating tensor, got "
                            f"{getattr(d, 'dtype', type(d).__name__)}")
        if d.shape != p.shape:
            raise ValueError(f"{name} entry for {pname!r} has shape {tuple(d.shape)}, expected {tuple(p.shape)}")
        out.append(d.detach().to(device=p.device, dtype=p.dtype))
    return out


def _rescale(d: torch.Tensor, target: torch.Tensor, order: int) -> torch.Tensor:
    return d * (torch.linalg.vector_norm(target, order) / (torch.linalg.vector_norm(d, order) + EPS))


def normalize_direction(direction: Sequence[torch.Tensor], model: nn.Module, normalization: str | None = "filter",
                        *, order: int = 2, ignore_1d: bool = False) -> Direction:
    """``direction`` rescaled w.r.t. the model's parameters (see the module docstring); a new list.

    ``ignore_1d`` zeroes the 1-D tensors (Li et al.'s choice for biases and norm parameters) in the
    ``"filter"`` and ``"layer"`` modes.
    """
    _check_normalization(normalization, order)
    params = _named_params(model)
    direction = _check_direction(direction, params, "direction")
    thetas = list(params.values())
    if normalization is None:
        return direction
    if normalization == "weight":
        return [d * t for d, t in zip(direction, thetas)]
    if normalization == "model":
        scale = (torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in thetas]), order)
                 / (torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in direction]), order) + EPS))
        return [d * scale for d in direction]
    out = []
    for d, t in zip(direction, thetas):
        if t.dim() <= 1:
            out.append(torch.zeros_like(d) if ignore_1d else _rescale(d, t, order))
        elif normalization == "layer":
            out.append(_rescale(d, t, order))
        else:
            shape = (-1,) + (1,) * (t.dim() - 1)
            t_norm = torch.linalg.vector_norm(t.flatten(1), order, dim=1).reshape(shape)
            d_norm = torch.linalg.vector_norm(d.flatten(1), order, dim=1).reshape(shape)
            out.append(d * (t_norm / (d_norm + EPS)))
    return out


def random_directions(model: nn.Module, n: int, normalization: str | None = "filter", *, order: int = 2,
                      ignore_1d: bool = False, generator: torch.Generator | None = None) -> list[Direction]:
    """``n`` random directions with N(0, 1) entries, each normalised by :func:`normalize_direction`.

    Draws come from ``generator`` only (``None``: a fresh CPU generator seeded with 0, as in
    :mod:`normlab.analysis.hessian`; the global RNG is never touched); the same seeded generator gives the
    same directions.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_normalization(normalization, order)
    params = _named_params(model)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    draws = [[torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device).to(p.device)
              for p in params.values()] for _ in range(n)]
    return [normalize_direction(d, model, normalization, order=order, ignore_1d=ignore_1d) for d in draws]


def hessian_directions(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, n: int = 2, *,
                       max_iter: int = 100, tol: float = 1e-3, method: str = "power",
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[Direction]]:
    """The top-``n`` Hessian eigenpairs (largest ``|lambda|``) as ``(eigenvalues Tensor[n], directions)``.

    Each direction is a unit eigenvector (a list of tensors shaped like the parameters) from
    ``HessianOperator(model, loss_fn, data).top_eigen(n, max_iter, tol, method, generator)`` (eval mode,
    model restored). A negative eigenvalue means that axis has negative curvature.
    """
    values, vectors = HessianOperator(model, loss_fn, data).top_eigen(n, max_iter=max_iter, tol=tol,
                                                                      method=method, generator=generator)
    return values, [list(v) for v in vectors]


def _auto_chunk(model: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor, n_points: int) -> int:
    """Grid points per vmap call: their perturbed parameters and module outputs (measured by one plain
    forward pass with hooks) stay under ``CHUNK_ELEMENTS`` numbers, at most ``MAX_CHUNK`` points."""
    sizes: list[int] = []

    def record(module: nn.Module, args: Any, out: Any) -> None:
        sizes.append(out.numel() if isinstance(out, torch.Tensor) else 0)

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    per_point = sum(p.numel() for p in params.values()) + sum(sizes)
    return max(1, min(MAX_CHUNK, n_points, CHUNK_ELEMENTS // per_point))


def evaluate_points(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any,
                    directions: Sequence[Direction], coords: torch.Tensor, *,
                    chunk_size: int | None = None) -> torch.Tensor:
    """``L(theta + sum_k coords[i, k] directions[k])`` for every row of ``coords`` (``[points, k]``).

    The engine of :func:`loss_line` and :func:`loss_surface` (eval mode, model restored, see the module
    docstring); ``directions`` are used as given.
    """
    params = _named_params(model)
    dirs = [_check_direction(d, params, f"directions[{k}]") for k, d in enumerate(directions)]
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != len(dirs):
        raise ValueError(f"coords must be a tensor of shape (points, {len(dirs)}), got "
                         f"{tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    names = list(params)
    stacked = [torch.stack([d[i] for d in dirs]) for i in range(len(names))]  # per tensor: [k, *shape]
    first = next(iter(params.values()))
    coords = coords.to(device=first.device, dtype=first.dtype)
    total, seen = None, 0
    with eval_mode(model), torch.no_grad():
        for inputs, targets, n_b in _weighted_batches(_batches(data)):
            def point_loss(c: torch.Tensor) -> torch.Tensor:
                moved = {name: t + torch.tensordot(c, s, dims=1)
                         for name, t, s in zip(names, params.values(), stacked)}
                return loss_fn(functional_call(model, moved, (inputs,)), targets)

            if chunk_size is None:
                chunk_size = _auto_chunk(model, params, inputs, coords.shape[0])
            if chunk_size == 1:
                losses = torch.stack([point_loss(c) for c in coords])
            else:
                losses = vmap(point_loss, chunk_size=chunk_size)(coords)
            if losses.shape != coords.shape[:1]:
                raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(losses.shape[1:])}")
            total = losses if total is None else total + (losses - total) * (n_b / (seen + n_b))
            seen += n_b
    if total is None:
        raise ValueError("data has no batches")
    return total


def grid_coordinates(dist: float, steps: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``linspace(-dist/2, dist/2, steps)`` with the middle entry exactly 0 for odd ``steps``."""
    _check_grid(dist, steps)
    return (torch.arange(steps, dtype=torch.float64) - (steps - 1) / 2).mul(dist / (steps - 1)).to(dtype)


def loss_line(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, direction: Sequence[torch.Tensor],
              dist: float = 1.0, steps: int = 41, *, chunk_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas, losses)``: ``losses[i] = L(theta + alphas[i] direction)``, ``alphas`` the grid coordinates.

    ``direction`` is used as given; normalise it first (:func:`random_directions`,
    :func:`normalize_direction`) for a scale-invariant picture.
    """
    _check_grid(dist, steps)
    params = _named_params(model)
    direction = _check_direction(direction, params, "direction")
    dtype = next(iter(params.values())).dtype
    alphas = grid_coordinates(dist, steps, dtype)
    losses = evaluate_points(model, loss_fn, data, [direction], alphas[:, None], chunk_size=chunk_size)
    return alphas.to(losses.device), losses


def loss_surface(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any,
                 axes: str | tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] = "random",
                 normalization: str | None = "filter", dist: float = 1.0, steps: int = 41, *, order: int = 2,
                 ignore_1d: bool = False, generator: torch.Generator | None = None,
                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grid_x, grid_y, losses)``, each ``[steps, steps]``: ``losses[i, j] = L(theta + x d1 + y d2)`` at
    ``x = grid_x[i, j] = a_i``, ``y = grid_y[i, j] = b_j`` (``meshgrid(..., indexing="ij")``).

    ``axes``: ``"random"`` (two N(0, 1) directions from ``generator``), ``"hessian"`` (the top-2 Hessian
    eigenvectors, :func:`hessian_directions`; ``generator`` seeds its iteration) or a pair ``(d1, d2)``.
    ``normalization`` (with ``order`` and ``ignore_1d``) is applied to the axes whatever their kind.
    """
    _check_normalization(normalization, order)
    _check_grid(dist, steps)
    params = _named_params(model)
    if isinstance(axes, str):
        if axes == "random":
            d1, d2 = random_directions(model, 2, normalization, order=order, ignore_1d=ignore_1d,
                                       generator=generator)
        elif axes == "hessian":
            _, (d1, d2) = hessian_directions(model, loss_fn, data, 2, generator=generator)
            d1, d2 = (normalize_direction(d, model, normalization, order=order, ignore_1d=ignore_1d)
                      for d in (d1, d2))
        else:
            raise ValueError(f"unknown axes {axes!r}; valid: 'random', 'hessian' or a pair (d1, d2)")
    elif isinstance(axes, (tuple, list)) and len(axes) == 2:
        d1, d2 = (normalize_direction(_check_direction(d, params, f"axes[{k}]"), model, normalization,
                                      order=order, ignore_1d=ignore_1d) for k, d in enumerate(axes))
    else:
        raise ValueError(f"axes must be 'random', 'hessian' or a pair (d1, d2) of directions, got "
                         f"{type(axes).__name__}" + (f" of length {len(axes)}" if isinstance(axes, (tuple, list))
                                                     else ""))
    dtype = next(iter(params.values())).dtype
    grid_x, grid_y = torch.meshgrid(grid_coordinates(dist, steps, dtype), grid_coordinates(dist, steps, dtype),
                                    indexing="ij")
    coords = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    losses = evaluate_points(model, loss_fn, data, [d1, d2], coords, chunk_size=chunk_size)
    return grid_x.to(losses.device), grid_y.to(losses.device), losses.reshape(steps, steps)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numpy(t: Any):
    return torch.as_tensor(t).detach().to("cpu", torch.float64).numpy()


def plot_surface(grid_x: torch.Tensor, grid_y: torch.Tensor, losses: torch.Tensor, path: str | Path,
                 kind: str = "contour", *, title: str | None = None, levels: int = 30) -> Path:
    """Write a PNG of a :func:`loss_surface` result: filled contours, a 3-D surface, or both side by side.

    Returns the path. The centre (0, 0) is marked on the contour plot.
    """
    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {PLOT_KINDS}")
    x, y, z = _numpy(grid_x), _numpy(grid_y), _numpy(losses)
    if not (x.shape == y.shape == z.shape and z.ndim == 2):
        raise ValueError(f"grid_x, grid_y and losses must be 2-D of one shape, got {x.shape}, {y.shape}, {z.shape}")
    plt = _pyplot()
    panels = ["contour", "surface"] if kind == "both" else [kind]
    fig = plt.figure(figsize=(5 * len(panels), 4.2))
    for k, panel in enumerate(panels, start=1):
        if panel == "contour":
            ax = fig.add_subplot(1, len(panels), k)
            filled = ax.contourf(x, y, z, levels=levels, cmap="viridis")
            ax.contour(x, y, z, levels=levels, colors="k", linewidths=0.3)
            ax.plot([0], [0], "r+", markersize=10)
            fig.colorbar(filled, ax=ax, label="loss")
            ax.set_aspect("equal")
        else:
            ax = fig.add_subplot(1, len(panels), k, projection="3d")
            ax.plot_surface(x, y, z, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_zlabel("loss")
        ax.set_xlabel("axis 1")
        ax.set_ylabel("axis 2")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_line(alphas: torch.Tensor, losses: torch.Tensor | Sequence[torch.Tensor], path: str | Path, *,
              labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write a PNG of one or several :func:`loss_line` results (``losses`` 1-D, or ``[lines, steps]``)."""
    a = _numpy(alphas)
    z = _numpy(torch.stack([torch.as_tensor(v) for v in losses]) if isinstance(losses, (list, tuple))
               else losses)
    z = z[None] if z.ndim == 1 else z
    if a.ndim != 1 or z.ndim != 2 or z.shape[1] != a.shape[0]:
        raise ValueError(f"losses must be [steps] or [lines, steps] with steps = len(alphas) = {a.shape[0]}, "
                         f"got shape {z.shape}")
    if labels is not None and len(labels) != z.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {z.shape[0]} lines")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, row in enumerate(z):
        ax.plot(a, row, label=None if labels is None else labels[k])
    ax.set_xlabel("step along direction")
    ax.set_ylabel("loss")
    if labels is not None:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
