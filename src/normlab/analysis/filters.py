"""Filter initialisation schemes and filter / signal-propagation diagnostics.

Source: G. Hirani, W. Abdulla, "On filter design in deep convolutional neural network", 2024,
arXiv:2410.21644. **The paper is a survey**: it proposes no algorithm and has no official code. It reviews
filter initialisation (Gaussian/uniform, LeCun, Xavier/Glorot, He/Kaiming, orthogonal, data-driven), filter
size and count in the classic CNNs, and unsupervised filter learning, and concludes that filter design is
still largely empirical. What this module offers from it is the set of initialisation rules it collates and
diagnostics that make its qualitative arguments (vanishing/exploding signals, dead or redundant filters,
receptive field) measurable.

Notation: a conv weight ``W`` has shape ``(C_out, C_in / groups, *kernel)``; ``fan_in = W[0].numel()``,
``fan_out = C_out * prod(kernel)`` (PyTorch's convention, so a depthwise conv has ``fan_in = prod(kernel)``).
A linear weight ``(out, in)`` has ``fan_in = in``.

Initialisers (biases set to 0 by :func:`apply_init` and :func:`lsuv_`):

- :func:`gaussian_`: ``W ~ N(0, std^2)``, std 0.01 (the early-CNN / AlexNet practice).
- :func:`lecun_uniform_`: ``W ~ U(-2.4 / fan_in, 2.4 / fan_in)`` (LeCun 1989 as the survey cites it: 1/fan_in,
  not 1/sqrt(fan_in)); :func:`lecun_normal_`: ``N(0, 1 / fan_in)``.
- ``xavier_uniform`` / ``xavier_normal`` (gain), ``he_normal`` / ``he_uniform`` (``mode="fan_in"``,
  ``nonlinearity="relu"``) and ``orthogonal`` (gain; QR of a Gaussian matrix with sign correction): the
  ``torch.nn.init`` functions themselves, reached through :func:`apply_init`. Orthogonal init of a float16 /
  bfloat16 tensor (torch has no half-precision QR) draws and factorises in float32 and casts back.
- :func:`lsuv_` (Mishkin & Matas 2016, "All you need is a good init", reference code
  ``ducha-aiki/LSUV-pytorch`` ``LSUVinit``): orthonormal init (gain 1) of every conv/linear weight, zero biases,
  then layer by layer in forward order, with ``h`` the layer's input on the calibration batch after the earlier
  layers are fixed: up to ``max_iter`` times ``v = Var(L(h))`` (all elements, unbiased); stop when
  ``|v - 1| < tol``; else ``W <- W / sqrt(v)``. Eval mode and no grad; each module's train/eval mode is
  restored. Defaults tol 0.05, max_iter 10 (the paper's).
- :func:`kmeans_patch_filters` (Coates & Ng-style first-layer filters learnt by k-means on image patches, one
  of the survey's "unsupervised" routes): random k x k patches; per-patch contrast normalisation
  ``(x - mean(x)) / sqrt(var(x) + contrast_eps)`` (10 for 0-255 data as in Coates & Ng, about 0.01 for [0, 1]
  data); optional ZCA whitening ``P = U (S + eps_zca)^(-1/2) U^T`` of the centred patches; scikit-learn
  ``KMeans(n_clusters=C_out, n_init=1, random_state=seed)``; filters ``W = C P`` (the whitening folded into the
  centroids, so a plain conv applies them to raw patches; the constant term ``-mean P C^T`` of a folded
  whitening is a per-filter bias and is dropped), each L2-normalised.

Diagnostics (pure: weights and models are left exactly as they were):

- :func:`filter_norms`, :func:`dead_filters` (norm < tol * max norm; all filters of an all-zero weight);
- :func:`filter_redundancy`: cosine-similarity matrix of the flattened filters, max off-diagonal ``|S|`` and the
  fraction of pairs with ``|S| > 0.9``;
- :func:`orthogonality_error`: ``||W^ W^T - I||_F / sqrt(C_out)`` with ``W^`` the row-normalised
  ``(C_out, fan_in)`` matrix; when ``C_out > fan_in`` (rows cannot be orthogonal; torch's orthogonal init makes
  the columns orthonormal) it is taken on the smaller side, columns normalised: ``||W^T W^ - I||_F /
  sqrt(fan_in)``. 0 for an orthogonal init, about ``sqrt((m - 1) / n)`` for a Gaussian ``m x n``, ``m <= n``;
- :func:`singular_values`, :func:`stable_rank` ``= ||W||_F^2 / sigma_max^2`` of the ``(C_out, fan_in)`` matrix;
- :func:`spectral_energy`: per filter, the fraction of its 2-D FFT energy (over the last two dims, summed over
  input channels) outside the DC bin; without padding it equals ``1 - sum_i (sum_hw W_i)^2 / (k_h k_w sum W^2)``.
  0 for a constant filter, 1 for a zero-sum one (e.g. a +-1 checkerboard of even size; an odd-size checkerboard
  has a nonzero sum: 80/81 at 3x3), NaN for an all-zero filter;
- :func:`receptive_field`: ``r_l = r_{l-1} + (k_l - 1) d_l j_{l-1}``, ``j_l = j_{l-1} s_l`` (r_0 = j_0 = 1) per
  axis along an ``nn.Sequential`` chain of conv and pool layers;
- :func:`signal_propagation`: mean and std of every activation module's output, and the std of the gradient of
  the loss (cross-entropy with a target, ``mean(logits^2) / 2`` without) with respect to every conv/linear
  weight, by ``torch.autograd.grad``.

Statistics of float16/bfloat16 tensors are computed in float32; float64 stays float64.

Choices where the sheet is silent: :func:`lsuv_` warns below 64 calibration samples, for layers the forward
never calls and for layers that did not converge, and takes a ``generator`` for its orthonormal start;
:func:`signal_propagation` reports linear weights' gradients beside the conv ones and restores buffers and
the global RNG state, so it can run in train mode; :func:`receptive_field` accepts only ``nn.Sequential``
chains (a branching model has no single chain; walking its call order would double-count shortcut strides).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------- initialisers


def _fans(tensor: torch.Tensor, name: str = "tensor") -> tuple[int, int]:
    """``(fan_in, fan_out)`` in PyTorch's convention; ``ValueError`` below 2 dims."""
    if tensor.dim() < 2:
        raise ValueError(f"{name}: fan in/out need a tensor with at least 2 dims, got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def gaussian_(tensor: torch.Tensor, std: float = 0.01, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with ``N(0, std^2)`` (``torch.nn.init.normal_``); default std 0.01."""
    if std < 0:
        raise ValueError(f"gaussian_: std must be >= 0, got {std}")
    return nn.init.normal_(tensor, 0.0, std, generator=generator)


def lecun_uniform_(tensor: torch.Tensor, scale: float = 2.4, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Fill ``tensor`` with ``U(-scale / fan_in, scale / fan_in)`` (LeCun 1989: scale 2.4, bound 1/fan_in)."""
    if scale < 0:
        raise ValueError(f"lecun_uniform_: scale must be >= 0, got {scale}")
    bound = scale / _fans(tensor, "lecun_uniform_")[0]
    return nn.init.uniform_(tensor, -bound, bound, generator=generator)


def lecun_normal_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with ``N(0, 1 / fan_in)``."""
    return nn.init.normal_(tensor, 0.0, 1.0 / math.sqrt(_fans(tensor, "lecun_normal_")[0]), generator=generator)


def _orthogonal_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """``torch.nn.init.orthogonal_`` with a ``ValueError`` for < 2 dims or no elements, and float32 QR for
    half-precision tensors (torch has no half QR)."""
    if tensor.dim() < 2 or tensor.numel() == 0:
        raise ValueError(f"orthogonal init needs a tensor with >= 2 dims and > 0 elements, got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.dtype not in _LOW_PRECISION:
        return nn.init.orthogonal_(tensor, gain, generator=generator)
    full = nn.init.orthogonal_(torch.empty(tensor.shape, device=tensor.device), gain, generator=generator)
    with torch.no_grad():
        return tensor.copy_(full)


def _he_normal_(tensor, mode="fan_in", nonlinearity="relu", generator=None):
    return nn.init.kaiming_normal_(tensor, mode=mode, nonlinearity=nonlinearity, generator=generator)


def _he_uniform_(tensor, mode="fan_in", nonlinearity="relu", generator=None):
    return nn.init.kaiming_uniform_(tensor, mode=mode, nonlinearity=nonlinearity, generator=generator)


SCHEMES: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian": gaussian_,
    "lecun_uniform": lecun_uniform_,
    "lecun_normal": lecun_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "he_normal": _he_normal_,
    "he_uniform": _he_uniform_,
    "orthogonal": _orthogonal_,
}


def _check_modules(modules: tuple[type[nn.Module], ...], fn: str) -> None:
    if not isinstance(modules, tuple) or not modules or not all(
            isinstance(m, type) and issubclass(m, nn.Module) for m in modules):
        raise TypeError(f"{fn}: modules must be a non-empty tuple of nn.Module classes, got {modules!r}")


def _targets(model: nn.Module, modules: tuple[type[nn.Module], ...], fn: str) -> list[tuple[str, nn.Module]]:
    _check_modules(modules, fn)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, modules) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not found:
        raise ValueError(f"{fn}: the model has no module of type {[m.__name__ for m in modules]} with a weight")
    return found


def apply_init(model: nn.Module, scheme: str = "he_normal", *,
               modules: tuple[type[nn.Module], ...] = DEFAULT_MODULES, zero_bias: bool = True,
               generator: torch.Generator | None = None, **kw) -> list[str]:
    """Initialise the weight of every module of a type in ``modules`` (in ``named_modules`` order) with
    ``scheme`` (one of :data:`SCHEMES`; ``kw`` goes to it: ``std``, ``scale``, ``gain``, ``mode``,
    ``nonlinearity``) and, with ``zero_bias``, set biases to 0. Returns the qualified names initialised;
    ``ValueError`` for an unknown scheme or a model without such modules."""
    if scheme not in SCHEMES:
        raise ValueError(f"apply_init: unknown scheme {scheme!r}; valid: {sorted(SCHEMES)}")
    init = SCHEMES[scheme]
    targets = _targets(model, modules, "apply_init")
    with torch.no_grad():
        for _, module in targets:
            init(module.weight, generator=generator, **kw)
            if zero_bias and isinstance(getattr(module, "bias", None), torch.Tensor):
                module.bias.zero_()
    return [name for name, _ in targets]


def _call_order(model: nn.Module, batch: torch.Tensor, targets: list[tuple[str, nn.Module]]
                ) -> list[tuple[str, nn.Module]]:
    """``targets`` in the order of their first call in ``model(batch)``."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def hook(name, module):
        def record(*_):
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module))
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in targets]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _layer_input(model: nn.Module, batch: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The input of ``layer``'s first call in ``model(batch)``."""
    captured: list[torch.Tensor] = []

    def record(_, args):
        if not captured:
            captured.append(args[0])

    handle = layer.register_forward_pre_hook(record)
    try:
        model(batch)
    finally:
        handle.remove()
    return captured[0]


def lsuv_(model: nn.Module, batch: torch.Tensor, tol: float = 0.05, max_iter: int = 10, *,
          modules: tuple[type[nn.Module], ...] = DEFAULT_MODULES, generator: torch.Generator | None = None
          ) -> dict[str, float]:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016) of ``model`` on the calibration ``batch``.

    Returns ``{qualified name: output variance after the last iteration}`` in forward order; a layer that
    did not reach ``|v - 1| < tol`` within ``max_iter`` iterations keeps its last value there and is named
    in a warning. Layers of the types in ``modules`` that the forward never calls are orthonormal-initialised
    only (warning). ``RuntimeError`` naming the layer when its output variance is 0 or not finite (dead
    units upstream). A batch of fewer than 64 samples warns: the variance then comes from few samples.
    """
    if not tol > 0:
        raise ValueError(f"lsuv_: tol must be > 0, got {tol}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"lsuv_: max_iter must be a positive int, got {max_iter!r}")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"lsuv_: batch must be a tensor, got {type(batch).__name__}")
    if batch.shape[0] < 64:
        warnings.warn(f"lsuv_: calibration batch of {batch.shape[0]} sample(s); >= 64 recommended (with one "
                      "sample the variance is over its positions only)", stacklevel=2)
    targets = _targets(model, modules, "lsuv_")
    modes = {m: m.training for m in model.modules()}
    result: dict[str, float] = {}
    not_converged = []
    try:
        model.eval()
        with torch.no_grad():
            for _, module in targets:
                _orthogonal_(module.weight, 1.0, generator=generator)
                if isinstance(getattr(module, "bias", None), torch.Tensor):
                    module.bias.zero_()
            order = _call_order(model, batch, targets)
            for name, layer in order:
                h = _layer_input(model, batch, layer)
                for _ in range(max_iter):
                    var = layer(h).float().var().item()
                    if not (math.isfinite(var) and var > 0):
                        raise RuntimeError(f"lsuv_: output variance of layer {name!r} is {var} on the calibration "
                                           "batch (dead units upstream?); cannot rescale it to 1")
                    if abs(var - 1.0) < tol:
                        break
                    w = layer.weight
                    w.copy_((w.float() / math.sqrt(var)).to(w.dtype) if w.dtype in _LOW_PRECISION
                            else w / math.sqrt(var))
                else:
                    var = layer(h).float().var().item()
                    if abs(var - 1.0) >= tol:
                        not_converged.append(name)
                result[name] = var
    finally:
        for m, mode in modes.items():
            m.train(mode)
    uncalled = [name for name, m in targets if all(m is not layer for _, layer in order)]
    if uncalled:
        warnings.warn(f"lsuv_: layers never called in the forward (orthonormal init only): {uncalled}",
                      stacklevel=2)
    if not_converged:
        warnings.warn(f"lsuv_: |Var - 1| >= {tol} after {max_iter} iterations for {not_converged}", stacklevel=2)
    return result


def kmeans_patch_filters(images: torch.Tensor, out_channels: int, kernel_size: int, n_patches: int = 10000,
                         whiten: bool = True, eps_zca: float = 0.01, contrast_eps: float = 10.0, seed: int = 0
                         ) -> torch.Tensor:
    """First-layer filters ``(out_channels, C, k, k)`` (float32, unit L2 norm each) learnt by k-means on
    ``n_patches`` random ``k x k`` patches of ``images`` ``(N, C, H, W)`` (Coates & Ng). Deterministic for a
    fixed ``seed`` (patch positions and the k-means initialisation)."""
    from sklearn.cluster import KMeans

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"kmeans_patch_filters: images must be a tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    n, c, height, width = images.shape
    if not isinstance(kernel_size, int) or not 1 <= kernel_size <= min(height, width):
        raise ValueError(f"kmeans_patch_filters: kernel_size must be an int in [1, {min(height, width)}], "
                         f"got {kernel_size!r}")
    if not isinstance(out_channels, int) or not 1 <= out_channels <= n_patches:
        raise ValueError(f"kmeans_patch_filters: out_channels must be an int in [1, n_patches={n_patches}], "
                         f"got {out_channels!r}")
    if eps_zca <= 0 or contrast_eps < 0:
        raise ValueError(f"kmeans_patch_filters: need eps_zca > 0 and contrast_eps >= 0, got {eps_zca}, "
                         f"{contrast_eps}")
    k = kernel_size
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_patches,), generator=gen)
    top = torch.randint(0, height - k + 1, (n_patches,), generator=gen)
    left = torch.randint(0, width - k + 1, (n_patches,), generator=gen)
    offsets = torch.arange(k)
    rows = (top[:, None] + offsets)[:, None, :, None]
    cols = (left[:, None] + offsets)[:, None, None, :]
    src = images.detach().to("cpu", torch.float64)
    patches = src[idx[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols].reshape(n_patches, -1)
    patches = (patches - patches.mean(1, keepdim=True)) / (patches.var(1, keepdim=True) + contrast_eps).sqrt()
    if whiten:
        centred = patches - patches.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov(centred.T))
        zca = evecs @ torch.diag((evals.clamp_min(0) + eps_zca).rsqrt()) @ evecs.T
        patches = centred @ zca
    km = KMeans(n_clusters=out_channels, n_init=1, random_state=seed).fit(patches.numpy())
    filters = torch.from_numpy(km.cluster_centers_).to(torch.float64)
    if whiten:
        filters = filters @ zca
    return F.normalize(filters, dim=1).reshape(out_channels, c, k, k).float()


# ---------------------------------------------------------------------------------------------- diagnostics


def _stat(weight: torch.Tensor, fn: str, min_dim: int = 2) -> torch.Tensor:
    """``weight`` detached, in float32 when it is half precision (or not floating), after a dims check."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: expected a weight tensor, got {type(weight).__name__}")
    if weight.dim() < min_dim or weight.numel() == 0:
        raise ValueError(f"{fn}: expected a weight with >= {min_dim} dims and > 0 elements, got shape "
                         f"{tuple(weight.shape)}")
    w = weight.detach()
    return w.float() if w.dtype in _LOW_PRECISION or not w.is_floating_point() else w


def _matrix(weight: torch.Tensor, fn: str) -> torch.Tensor:
    w = _stat(weight, fn)
    return w.reshape(w.shape[0], -1)


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||W_o||_2`` of each output filter, shape ``(C_out,)``."""
    return torch.linalg.vector_norm(_matrix(weight, "filter_norms"), dim=1)


def dead_filters(weight: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Indices (int64) of filters whose norm is below ``tol`` times the largest filter norm (every filter of
    an all-zero weight)."""
    if tol < 0:
        raise ValueError(f"dead_filters: tol must be >= 0, got {tol}")
    norms = filter_norms(weight)
    return torch.nonzero((norms < tol * norms.max()) | (norms == 0)).flatten()


@dataclass(frozen=True)
class Redundancy:
    """``similarity``: cosine similarities ``(C_out, C_out)`` of the flattened filters (0 for an all-zero one);
    ``max_abs``: max off-diagonal ``|S|``; ``fraction``: fraction of pairs ``o < o'`` with ``|S| > threshold``."""

    similarity: torch.Tensor
    max_abs: float
    fraction: float


def filter_redundancy(weight: torch.Tensor, threshold: float = 0.9) -> Redundancy:
    """Cosine-similarity redundancy of the filters of ``weight`` (needs at least 2 filters)."""
    w = _matrix(weight, "filter_redundancy")
    if w.shape[0] < 2:
        raise ValueError(f"filter_redundancy: needs >= 2 filters, got shape {tuple(weight.shape)}")
    unit = F.normalize(w, dim=1)
    sim = unit @ unit.T
    pairs = sim[torch.triu_indices(*sim.shape, offset=1).unbind()].abs()
    return Redundancy(sim, pairs.max().item(), (pairs > threshold).double().mean().item())


def orthogonality_error(weight: torch.Tensor) -> float:
    """``||W^ W^T - I||_F / sqrt(C_out)`` of the row-normalised ``(C_out, fan_in)`` matrix, or the same with
    columns on the smaller Gram side when ``C_out > fan_in``."""
    w = _matrix(weight, "orthogonality_error")
    if w.shape[0] > w.shape[1]:
        w = w.T
    unit = F.normalize(w, dim=1)
    eye = torch.eye(unit.shape[0], dtype=unit.dtype, device=unit.device)
    return (torch.linalg.matrix_norm(unit @ unit.T - eye) / math.sqrt(unit.shape[0])).item()


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of the ``(C_out, fan_in)`` reshape of ``weight``."""
    return torch.linalg.svdvals(_matrix(weight, "singular_values"))


def stable_rank(weight: torch.Tensor) -> float:
    """``||W||_F^2 / sigma_max^2`` of the ``(C_out, fan_in)`` reshape (between 1 and the rank; NaN for 0)."""
    s = singular_values(weight)
    return (s.square().sum() / s[0].square()).item()


def spectral_energy(weight: torch.Tensor, pad_to: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Per output filter, the fraction of 2-D FFT energy (over the last two dims, zero-padded to ``pad_to``,
    summed over input channels) outside the DC bin, shape ``(C_out,)``. NaN for an all-zero filter."""
    w = _stat(weight, "spectral_energy", min_dim=3)
    size = w.shape[-2:] if pad_to is None else (pad_to, pad_to) if isinstance(pad_to, int) else tuple(pad_to)
    if len(size) != 2 or any(p < q for p, q in zip(size, w.shape[-2:])):
        raise ValueError(f"spectral_energy: pad_to must be >= the kernel size {tuple(w.shape[-2:])}, got {pad_to!r}")
    power = torch.fft.fft2(w, s=size).abs().square()
    power = power.reshape(w.shape[0], -1, *size).sum(1)
    total = power.sum((-2, -1))
    return (total - power[:, 0, 0]) / total


@dataclass(frozen=True)
class ReceptiveField:
    """One step of the receptive-field walk: the module's qualified name (``"input"`` first), its receptive
    field ``rf`` and jump (cumulative stride) ``jump`` per spatial axis, and its output's spatial ``size``."""

    name: str
    rf: tuple[int, ...]
    jump: tuple[int, ...]
    size: tuple[int, ...]


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_GLOBAL = (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POINTWISE = ACTIVATIONS + (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _leaves(seq: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in seq.named_children():
        full = f"{prefix}{name}"
        out.extend(_leaves(child, full + ".") if isinstance(child, nn.Sequential) else [(full, child)])
    return out


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def receptive_field(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[ReceptiveField]:
    """Receptive field and jump after each conv/pool layer of the ``nn.Sequential`` chain ``model`` (nested
    Sequentials flattened) for an input of ``input_shape`` (``(N, C, *spatial)``), starting with the input
    (``rf = jump = 1``). Activations, dropout and normalisation layers (``torch.nn``'s and
    ``normlab.layers``') count as pointwise (their statistics, which pool over positions, are ignored as in
    the usual receptive-field arithmetic); the walk ends at the first module that leaves the spatial grid
    (Flatten, Linear, adaptive pooling). ``TypeError`` for any other module. The model runs once on zeros in
    eval mode without grad (for the sizes); each module's mode is restored."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"receptive_field: expected an nn.Sequential chain, got {type(model).__name__}")
    if len(input_shape) < 3:
        raise ValueError(f"receptive_field: input_shape must be (N, C, *spatial), got {tuple(input_shape)}")
    n_axes = len(input_shape) - 2
    chain: list[tuple[str, nn.Module]] = []
    for name, module in _leaves(model):
        if isinstance(module, _GLOBAL):
            break
        pointwise = isinstance(module, _POINTWISE) or type(module).__module__.startswith("normlab.layers")
        if not (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed) \
                and not isinstance(module, _POOLS) and not pointwise:
            raise TypeError(f"receptive_field: no receptive-field rule for module {name!r} "
                            f"({type(module).__name__}); supported: conv, max/avg pool, pointwise layers")
        chain.append((name, module))
    sizes: dict[str, tuple[int, ...]] = {}
    param = next(model.parameters(), None)
    x = torch.zeros(input_shape, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)

    def record(name):
        def hook(_, __, out):
            sizes[name] = tuple(out.shape[2:])
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(record(n)) for n, m in chain
               if isinstance(m, (nn.modules.conv._ConvNd,) + _POOLS)]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    rf, jump = (1,) * n_axes, (1,) * n_axes
    steps = [ReceptiveField("input", rf, jump, tuple(input_shape[2:]))]
    for name, module in chain:
        if name not in sizes:
            continue
        k = _tuple(module.kernel_size, n_axes)
        s = _tuple(module.stride if module.stride is not None else module.kernel_size, n_axes)
        d = _tuple(getattr(module, "dilation", 1), n_axes)
        rf = tuple(r + (kk - 1) * dd * j for r, kk, dd, j in zip(rf, k, d, jump))
        jump = tuple(j * ss for j, ss in zip(jump, s))
        steps.append(ReceptiveField(name, rf, jump, sizes[name]))
    return steps


@dataclass(frozen=True)
class SignalPropagation:
    """``activations``: ``(module name, mean, std)`` of each hooked module's output in call order (a module
    called twice appears twice); ``grad_std``: std of ``d loss / d W`` per conv/linear weight
    (``"<module>.weight"``); ``loss``: the loss that was differentiated."""

    activations: list[tuple[str, float, float]]
    grad_std: dict[str, float]
    loss: float


def signal_propagation(model: nn.Module, batch: torch.Tensor, target: torch.Tensor | None = None, *,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                       modules: tuple[type[nn.Module], ...] = ACTIVATIONS) -> SignalPropagation:
    """Forward ``batch`` through ``model`` in its current train/eval mode with hooks on every module of a type
    in ``modules`` (default: the activation functions), then the gradient of ``loss_fn(model(batch), target)``
    (``mean(logits^2) / 2`` without a target) with respect to every conv/linear weight by
    ``torch.autograd.grad``. Parameters, ``.grad``, ``requires_grad``, buffers (e.g. BatchNorm running
    statistics) and the global RNG state (dropout) are left as they were."""
    _check_modules(modules, "signal_propagation")
    weights = [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
               if isinstance(m, _WEIGHTED) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not weights:
        raise ValueError("signal_propagation: the model has no conv or linear weight")
    activations: list[tuple[str, float, float]] = []

    def hook(name):
        def record(_, __, out):
            o = out.detach()
            o = o.float() if o.dtype in _LOW_PRECISION else o
            activations.append((name, o.mean().item(), o.std().item()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, modules)]
    buffers = [(b, b.clone()) for b in model.buffers()]
    flags = [(w, w.requires_grad) for _, w in weights if w.is_leaf]
    devices = [batch.device] if batch.device.type == "cuda" else []
    try:
        for w, _ in flags:
            w.requires_grad_(True)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            out = model(batch)
            loss = loss_fn(out, target) if target is not None else out.float().square().mean() / 2
            grads = torch.autograd.grad(loss, [w for _, w in weights], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for w, flag in flags:
            w.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    grad_std = {name: ((g.float() if g.dtype in _LOW_PRECISION else g).std().item() if g is not None else math.nan)
                for (name, _), g in zip(weights, grads)}
    return SignalPropagation(activations, grad_std, loss.item())
