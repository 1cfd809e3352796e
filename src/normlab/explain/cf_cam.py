"""CF-CAM: Grad-CAM with DBSCAN channel clustering and cluster-wise gradient filtering.

Paper: He, Pan, Yao, "CF-CAM: Cluster Filter Class Activation Mapping for Reliable Gradient-Based
Interpretability", 2025, arXiv:2504.00060; official code: jerryp-hfut/CF-CAM (``cfcam.py``, class
``CFCAM``). normlab follows the official code (it produced the paper's numbers); where the code and the
paper text differ this is said below.

For an input x, a target layer with output A (K channels, h x w) and a class c (default: the argmax
logit), G = dy_c/dA is the gradient of the raw logit. Per sample:

1. M = A reshaped to (K, h*w); n_k = ||M_k||_2. Important channels I = {k : n_k >= P_q(n)} with
   q = ``importance_percentile`` (75; linear interpolation, like ``np.percentile``); R = the others.
2. DBSCAN (scikit-learn) on the rows M_R, Euclidean, with eps = max(P_e(D), 1e-5), e =
   ``eps_percentile`` (25), D = all pairwise distances between distinct rows of M_R (both (i, j) and
   (j, i)), and min_samples = max(2, floor(``min_samples_frac`` * |R|)) (0.05). Labels: -2 for I, DBSCAN's
   labels for R (-1 = noise, 0..J-1 = clusters).
3. Raw weights: w_k = mean_u G_k(u) for k in I (the Grad-CAM weight); for cluster j with members S_j,
   every member gets w_k = mean_u filt(mean_{k in S_j} G_k)(u); noise channels are dropped.
4. filt(g), the official "bilateral" filter: one h x w kernel per map,
   Kf(i, j) = S(i, j) R(i, j) / (sum S R + 1e-6), S = exp(-((i - h/2)^2 + (j - w/2)^2) / (2 sigma_s^2)),
   R = exp(-(g(i, j) - mean g)^2 / (2 sigma_r^2)), applied as ``F.conv2d(g, Kf, padding="same")``
   (cross-correlation with zero padding; for even sizes PyTorch pads (size - 1) // 2 before). The kernel
   is centred at index h/2, not (h - 1)/2, as in the code. ``filter="gaussian"`` is the paper text's
   "Gaussian filter": the same kernel with R = 1 (a fixed Gaussian, separable, same grid and padding).
5. alpha = softmax(w_valid / ``temperature``) over the valid channels (I and the clustered ones);
   cam = ReLU(sum_k alpha_k A_k).
6. Bilinear upsampling to the input size (``align_corners=False``), then cam / max(cam) where max > 0
   (all-zero maps stay zero). Output (N, 1, H, W) in [0, 1].

Defaults: ``importance_percentile=75``, ``eps_percentile=25``, ``min_samples_frac=0.05``,
``sigma_spatial=5.0``, ``sigma_range=0.1`` and ``filter="bilateral"`` are the official code's constants;
``temperature=1.0`` (normlab's addition) reproduces the code.

Caveat (measured by the ``cf_cam.class_sensitivity`` claim check on a digits CNN): the raw gradient means
are ~1e-2, so the softmax at temperature 1 is essentially uniform and the map is a class-agnostic
activation-energy map: the maps for the max- and the min-logit class correlate >= 0.9998 on every image
(Grad-CAM: -0.25 to -0.33, mean per seed). Its deletion/insertion and noise-robustness gains over
Grad-CAM (``cf_cam.faithfulness``, ``cf_cam.robustness``) come largely from ignoring the gradient. A
``temperature`` of the order of the weights makes the map class-dependent again (same CNN, seed 0, |w| up
to 1e-2: mean correlation 0.87 at T = 1e-2, 0.16 at T = 1e-3).

``sigma_range`` is in absolute gradient units: tiny gradients make R = 1 (a pure spatial Gaussian), large
ones make R a spike; normlab does not rescale (that would change the method).

Deviations from the official code (none changes a map the code computes, up to float rounding of a
distance that falls exactly at DBSCAN's eps):
- Batches: the official code explains sample 0 only; here every sample is explained (DBSCAN runs per
  sample, everything else is batched). The gradient is taken with ``torch.autograd.grad`` of the selected
  logits through a tensor hook (no ``.backward()``, no full backward hook, so in-place ReLUs are fine);
  the model's mode, parameters and ``.grad`` are left as they were.
- Distances are computed once, in float64, by ``torch.cdist`` without its matrix-product shortcut (exact
  zeros between identical maps; O(|R|^2) memory, never the official O(|R|^2 h w) difference tensor), and
  DBSCAN gets that same matrix (``metric="precomputed"``), so a pair at exactly eps is a neighbour for
  certain; the code lets DBSCAN recompute float32 distances. Channel norms are float64 too.
- |R| = 1 (K < 4 channels): no pairwise distance exists; the channel is noise (the code would crash).
- Non-finite activations or gradients raise ``ValueError``; for finite ones the important set is never
  empty, so the official "No valid clusters or important channels found" cannot occur.
- Computation in float32 (float64 stays float64); the code's ``noise_level`` argument, which adds noise
  after the weights were computed and so never changes the map, is not offered.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN
from torch import Tensor, nn

from ._capture import LayerCapture, LayerSpec, normalize_max, resolve_layer, upsample

IMPORTANT, NOISE = -2, -1
FILTERS = ("bilateral", "gaussian")
KERNEL_EPS = 1e-6  # added to the kernel's sum before normalising (official)
EPS_FLOOR = 1e-5  # lower bound of DBSCAN's eps (official)


def important_channels(norms: Tensor, percentile: float) -> Tensor:
    """``(N, K)`` bool: channels whose norm is >= the ``percentile``-th percentile of their sample's norms
    (linear interpolation, as ``np.percentile``)."""
    threshold = torch.quantile(norms, percentile / 100.0, dim=1, keepdim=True)
    return norms >= threshold


def cluster_channels(rows: Tensor, eps_percentile: float, min_samples_frac: float) -> np.ndarray:
    """DBSCAN labels (-1 = noise) of the ``(R, D)`` rows: eps = the ``eps_percentile``-th percentile of the
    pairwise distances of distinct rows (floor 1e-5), min_samples = max(2, floor(frac * R)). Fewer than
    two rows have no distance: all noise."""
    n = rows.shape[0]
    if n < 2:
        return np.full(n, NOISE, dtype=np.int64)
    rows = rows.double()
    dist = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist").numpy()
    eps = max(float(np.percentile(dist[~np.eye(n, dtype=bool)], eps_percentile)), EPS_FLOOR)
    min_samples = max(2, math.floor(min_samples_frac * n))
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(dist).labels_.astype(np.int64)


def channel_labels(activations: Tensor, importance_percentile: float, eps_percentile: float,
                   min_samples_frac: float) -> Tensor:
    """``(N, K)`` int64 labels of the channels of ``activations`` ``(N, K, h, w)``: -2 important, -1 noise,
    0..J-1 the DBSCAN cluster of the other channels (steps 1-2)."""
    rows = activations.flatten(2)
    norms = torch.linalg.vector_norm(rows.double(), dim=2)
    if not torch.isfinite(norms).all():
        raise ValueError("channel norms of the target layer's output overflow float64; CF-CAM needs finite ones")
    important = important_channels(norms, importance_percentile)
    labels = torch.full(important.shape, IMPORTANT, dtype=torch.long)
    for n in range(rows.shape[0]):  # DBSCAN is per sample
        rest = (~important[n]).nonzero().squeeze(1)
        labels[n, rest] = torch.from_numpy(cluster_channels(rows[n, rest], eps_percentile, min_samples_frac))
    return labels


def spatial_kernel(height: int, width: int, sigma_spatial: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(h, w)`` Gaussian exp(-((i - h/2)^2 + (j - w/2)^2) / (2 sigma^2)), unnormalised (official grid)."""
    x = torch.arange(height, dtype=dtype) - height / 2
    y = torch.arange(width, dtype=dtype) - width / 2
    return torch.exp(-(x[:, None] ** 2 + y[None, :] ** 2) / (2 * sigma_spatial ** 2))


def filter_kernels(grads: Tensor, sigma_spatial: float, sigma_range: float | None) -> Tensor:
    """One normalised ``(h, w)`` kernel per map of ``grads`` ``(M, h, w)``: spatial x range
    (``sigma_range``: bilateral) or spatial only (``None``: Gaussian), divided by (sum + 1e-6)."""
    kernel = spatial_kernel(*grads.shape[-2:], sigma_spatial, grads.dtype).expand_as(grads)
    if sigma_range is not None:
        diff = grads - grads.mean(dim=(-2, -1), keepdim=True)
        kernel = kernel * torch.exp(-diff ** 2 / (2 * sigma_range ** 2))
    return kernel / (kernel.sum(dim=(-2, -1), keepdim=True) + KERNEL_EPS)


def filter_maps(grads: Tensor, kernels: Tensor) -> Tensor:
    """``filt``: each map of ``grads`` ``(M, h, w)`` cross-correlated with its own kernel ``(M, kh, kw)``
    with 'same' zero padding, PyTorch's convention ((k - 1) // 2 before, the rest after), written out so
    that even kernel sizes raise no warning."""
    (kh, kw), groups = kernels.shape[-2:], grads.shape[0]
    padded = F.pad(grads[None], ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2))
    return F.conv2d(padded, kernels[:, None], groups=groups)[0]


def channel_weights(grads: Tensor, labels: Tensor, sigma_spatial: float, sigma_range: float | None) -> Tensor:
    """``(N, K)`` raw weights (step 3): the mean gradient for important channels, the mean of the filtered
    cluster-mean gradient for clustered ones, 0 for noise channels."""
    plain = grads.mean(dim=(-2, -1))
    n_clusters = int(labels.max()) + 1
    if n_clusters <= 0:
        return torch.where(labels == IMPORTANT, plain, torch.zeros_like(plain))
    member = F.one_hot(labels.clamp(min=NOISE) + 1, n_clusters + 1)[..., 1:].to(grads.dtype)  # (N, K, J)
    counts = member.sum(dim=1)
    present = counts > 0
    mean_grads = torch.einsum("nkj,nkhw->njhw", member, grads) / counts.clamp(min=1)[..., None, None]
    selected = mean_grads[present]
    filtered = filter_maps(selected, filter_kernels(selected, sigma_spatial, sigma_range))
    cluster_weight = torch.zeros_like(counts)
    cluster_weight[present] = filtered.mean(dim=(-2, -1))
    clustered = torch.einsum("nkj,nj->nk", member, cluster_weight)
    return torch.where(labels == IMPORTANT, plain, clustered)


def weighted_map(activations: Tensor, weights: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Step 5: alpha = softmax(w / T) over the valid channels and ReLU(sum_k alpha_k A_k) as ``(N, 1, h, w)``;
    returns the map and alpha (0 for invalid channels)."""
    alpha = torch.softmax((weights / temperature).masked_fill(~valid, -math.inf), dim=1)
    return torch.relu(torch.einsum("nk,nkhw->nhw", alpha, activations))[:, None], alpha


class CFCAM:
    """CF-CAM maps of ``model`` at ``target_layer`` (a module name or the module itself); see the module
    docstring for the algorithm and the defaults.

    ``CFCAM(model, "features.3")(x, target=None) -> Tensor (N, 1, H, W)`` in [0, 1]; with
    ``return_info=True`` also a dict with ``labels`` (N, K) (-2 important, -1 noise, 0.. cluster),
    ``weights`` (N, K) (raw weights, 0 for noise), ``alpha`` (N, K) (softmax weights, 0 for noise) and
    ``target`` (N,). Hooks live only during a call; the model's train/eval flags, parameters and ``.grad``
    are left as they were.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec, importance_percentile: float = 75.0,
                 eps_percentile: float = 25.0, min_samples_frac: float = 0.05, sigma_spatial: float = 5.0,
                 sigma_range: float = 0.1, filter: str = "bilateral", temperature: float = 1.0) -> None:
        for name, value in (("importance_percentile", importance_percentile), ("eps_percentile", eps_percentile)):
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must lie in [0, 100], got {value}")
        if not 0.0 <= min_samples_frac <= 1.0:
            raise ValueError(f"min_samples_frac must lie in [0, 1], got {min_samples_frac}")
        for name, value in (("sigma_spatial", sigma_spatial), ("sigma_range", sigma_range),
                            ("temperature", temperature)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
        self.model = model
        self.layer_name, self.target_layer = resolve_layer(model, target_layer)
        self.importance_percentile = float(importance_percentile)
        self.eps_percentile = float(eps_percentile)
        self.min_samples_frac = float(min_samples_frac)
        self.sigma_spatial = float(sigma_spatial)
        self.sigma_range = float(sigma_range)
        self.filter = filter
        self.temperature = float(temperature)

    def __call__(self, x: Tensor, target: int | Tensor | None = None, return_info: bool = False
                 ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        with LayerCapture(self.model, self.target_layer) as cap:
            _, target, (act,), (grad,) = cap.run(x, target)
        cam, info = self.compute(act, grad, tuple(x.shape[-2:]))
        return (cam, {**info, "target": target}) if return_info else cam

    def compute(self, activation: Tensor, gradient: Tensor, size: tuple[int, int]
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Steps 1-6 from a captured layer output ``activation`` and its gradient ``gradient``
        ``(N, K, h, w)``: the ``(N, 1, *size)`` maps and the info dict (``labels``, ``weights``, ``alpha``)."""
        dtype = torch.float64 if activation.dtype == torch.float64 else torch.float32
        act, grad = activation.to(dtype), gradient.to(dtype)
        for name, tensor in (("activation", act), ("gradient", grad)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"the target layer's {name} contains non-finite values; CF-CAM needs finite ones")
        labels = channel_labels(act, self.importance_percentile, self.eps_percentile, self.min_samples_frac)
        valid = labels != NOISE  # never empty: the largest-norm channel is always important
        weights = channel_weights(grad, labels, self.sigma_spatial,
                                  self.sigma_range if self.filter == "bilateral" else None)
        cam, alpha = weighted_map(act, weights, valid, self.temperature)
        return normalize_max(upsample(cam, size)), {"labels": labels, "weights": weights, "alpha": alpha}

    def __repr__(self) -> str:
        return (f"CFCAM(target_layer={self.layer_name!r}, importance_percentile={self.importance_percentile:g}, "
                f"eps_percentile={self.eps_percentile:g}, min_samples_frac={self.min_samples_frac:g}, "
                f"sigma_spatial={self.sigma_spatial:g}, sigma_range={self.sigma_range:g}, filter={self.filter!r}, "
                f"temperature={self.temperature:g})")
