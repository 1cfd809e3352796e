"""Region Normalization: RN-B (a given mask) and RN-L (a mask learned from the features).

Paper: Yu, Guo, Jin, Wu, Chen, Li, Zhang, Liu, "Region Normalization for Image Inpainting", AAAI 2020,
arXiv:1911.10375; official code: geekyutao/RN (``rn.py``: ``RN_binarylabel``, ``RN_B``,
``SelfAware_Affine``, ``RN_L``; used in ``networks.py``'s ``G_Net``). normlab follows the official code;
where it differs from the paper this is said below.

Region standardization ``RN(x, m)`` (:func:`normlab.functional.region_norm`): ``x`` ``(B, C, H, W)``, a
binary mask ``m`` ``(B, 1, H, W)``, **1 = hole** (region "1"), 0 = valid pixels (region "0"). Each region
R in {m, 1 - m} is standardized per channel with its own mean and biased variance:

    n_R = sum R (clamped to 1),  mu_R = sum R x / n_R,  var_R = sum R (x - mu_R)^2 / n_R
    RN(x, m) = sum_R R * (x - mu_R) / sqrt(var_R + eps * n / n_R)

with the sums over batch and space (``stats="batch"``, the official code; n = B*H*W) or over space per
sample (``stats="instance"``, the paper's equations; n = H*W; with an all-zero or all-one mask this is
``F.instance_norm``). ``eps * n / n_R`` is the effective eps of the official code's trick (fill the
positions outside R with ``mu_R``, apply ``BatchNorm2d(affine=False, track_running_stats=False)``,
multiply by ``sqrt(n_R / n)``): normlab computes the direct formula with that eps, which equals the trick
to rounding (tested in float64). A region that is empty (e.g. after down-sampling the mask) contributes
nothing, never a NaN. The mask gets no gradient; gradients flow through ``mu_R`` and ``var_R``. Because
the statistics of the valid pixels never see the hole's values, changing the input inside the hole
leaves the output at valid pixels exactly unchanged (BatchNorm and InstanceNorm do not have this
property); with ``stats="batch"`` the other samples' holes still enter, as in the official code.

RN-B, :class:`RegionNorm2d` ``forward(x, mask)``: the mask is resized to the feature size with nearest
(as the official ``F.interpolate(mask, size, mode="nearest")``), ``r = RN(x, m)`` and

    y = m * r * (1 + foreground_gamma) + (1 - m) * r * (1 + background_gamma) + bias

with per-channel ``foreground_*`` (region 1, the hole) and ``background_*`` (region 0) parameters, all
initialised to 0 (the layer starts as pure standardization), named as in the official ``RN_B`` so that
its state_dict loads as it is. Bias: the paper intends region-wise shifts ``m * foreground_beta + (1 - m)
* background_beta`` (the default); the official code adds both betas everywhere (``official_bias=True``,
i.e. one shared bias ``foreground_beta + background_beta``). The two agree at initialisation.

RN-L, :class:`LearnableRegionNorm2d` ``forward(x)`` (official ``RN_L`` with ``SelfAware_Affine``):

    s = sigmoid(response_conv([mean_c(x); max_c(x)]))     (B, 1, H, W), conv k x k, 2 -> 1, no bias
    m = 1[s >= threshold]                                 (no gradient through the threshold)
    y = RN(x, m) * (1 + gamma_conv(s)) + beta_conv(s)     1 -> 1 convs k x k with bias, broadcast over C

Gradients reach ``response_conv`` only through ``s -> gamma, beta``. The last mask is kept (detached,
bool) in ``self.last_mask`` for diagnostics. Official state_dict keys map as ``sa.conv1`` ->
``response_conv``, ``sa.gamma_conv`` -> ``gamma_conv``, ``sa.beta_conv`` -> ``beta_conv``.

Defaults: ``eps=1e-5`` (the official BatchNorm), ``threshold=0.8`` and ``kernel_size=7`` (``RN_L`` and
``SelfAware_Affine``; kernel 3 or 7, padding k // 2), ``stats="batch"`` (the code), convs with PyTorch's
default init.

Train and eval are the same: there are **no running statistics**; statistics always come from the
current input (the official BatchNorm has ``track_running_stats=False``), so with ``stats="batch"`` an
output depends on the rest of the batch, also in eval. A statistic over a single value per channel
(B = H = W = 1 with ``stats="batch"``, H = W = 1 with ``"instance"``) raises ``ValueError``. With B = 1
both ``stats`` coincide.

Deviations and notes:
- The mask may be bool, integer or float, ``(B, 1, H', W')`` or ``(B, H', W')``; values other than 0 and 1
  raise ``ValueError("mask must be binary ...")`` (the official code would silently weight the regions).
- ``stats="instance"`` (the paper) is offered besides the code's batch statistics; the effective eps then
  is ``eps * H * W / n_R`` (what the fill trick gives per sample).
- float16/bfloat16 input: statistics (and RN-L's response map and affine maps) in float32, the output in
  the input dtype; float64 stays float64.
- Distributed (``process_group``, default WORLD, used when ``torch.distributed`` is initialized and
  ``stats="batch"``): the per-region sums and counts, then the squared deviations, are all-reduced
  (:func:`normlab.distributed.all_reduce_sum`), so every rank normalizes with the global batch's region
  statistics.

Speed: both regions' sums are one ``einsum`` per pass (the two regions stacked); each region's mean,
scale and shift are picked per position with ``torch.where`` (about six full-size passes forward, more
than BatchNorm's one fused kernel; ``normlab speed`` reports the ratio).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import functional as NF
from .._validation import check_channel_input, check_eps

__all__ = ["LearnableRegionNorm2d", "RegionNorm2d"]

KERNEL_SIZES = (3, 7)


def _check_num_features(num_features: int) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")


def _check_stats(stats: str) -> None:
    if stats not in NF.REGION_STATS:
        raise ValueError(f"stats must be one of {NF.REGION_STATS}, got {stats!r}")


class RegionNorm2d(nn.Module):
    """RN-B: ``RegionNorm2d(num_features, eps=1e-5, stats="batch", official_bias=False, affine=True,
    process_group=None, device=None, dtype=None)``; ``forward(x, mask)`` with ``x`` ``(B, C, H, W)`` and
    ``mask`` ``(B, 1, H', W')`` or ``(B, H', W')`` (bool or 0/1, **1 = hole**, resized with nearest).
    Parameters (``affine=True``, shape ``(C,)``, init 0): ``foreground_gamma``, ``foreground_beta`` (the
    hole), ``background_gamma``, ``background_beta``. No buffers; train == eval."""

    def __init__(self, num_features: int, eps: float = 1e-5, stats: str = "batch", official_bias: bool = False,
                 affine: bool = True, process_group: dist.ProcessGroup | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_num_features(num_features)
        check_eps(eps)
        _check_stats(stats)
        for name, value in (("official_bias", official_bias), ("affine", affine)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.num_features, self.eps, self.stats = num_features, float(eps), stats
        self.official_bias, self.affine, self.process_group = official_bias, affine, process_group
        names = ("foreground_gamma", "foreground_beta", "background_gamma", "background_beta")
        for name in names:
            param = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype)) if affine else None
            self.register_parameter(name, param)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            for param in (self.foreground_gamma, self.foreground_beta, self.background_gamma, self.background_beta):
                nn.init.zeros_(param)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, stats={self.stats!r}, official_bias={self.official_bias}, "
                f"affine={self.affine}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, type(self).__name__)
        mask = NF._region_mask(mask, x, type(self).__name__)
        d, rstd = NF._region_moments(x, mask, self.eps, self.stats, self.process_group, type(self).__name__)
        if not self.affine:
            return (d * NF._region_select(mask, rstd)).to(x.dtype)
        dtype = d.dtype
        gamma = torch.stack([self.background_gamma, self.foreground_gamma]).to(dtype)[:, None]  # (2, 1, C)
        scale = NF._region_select(mask, rstd * (1.0 + gamma))
        if self.official_bias:
            shift = (self.foreground_beta + self.background_beta).to(dtype)[:, None, None]
        else:
            beta = torch.stack([self.background_beta, self.foreground_beta]).to(dtype)[:, None]
            shift = NF._region_select(mask, beta)
        return torch.addcmul(shift, d, scale).to(x.dtype)


class LearnableRegionNorm2d(nn.Module):
    """RN-L: ``LearnableRegionNorm2d(num_features, threshold=0.8, kernel_size=7, eps=1e-5, stats="batch",
    process_group=None, device=None, dtype=None)``; ``forward(x)`` with ``x`` ``(B, C, H, W)``. Submodules
    ``response_conv`` (2 -> 1, no bias), ``gamma_conv`` and ``beta_conv`` (1 -> 1, with bias), all
    ``kernel_size`` square with padding ``kernel_size // 2``. ``last_mask``: the last forward's mask
    ``(B, 1, H, W)`` (bool, 1 = ``s >= threshold``), ``None`` before the first. No buffers; train == eval."""

    batchnorm_state: tuple[str, ...] = ()  # stands in for a BatchNorm2d; none of its entries carry over

    def __init__(self, num_features: int, threshold: float = 0.8, kernel_size: int = 7, eps: float = 1e-5,
                 stats: str = "batch", process_group: dist.ProcessGroup | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_num_features(num_features)
        check_eps(eps)
        _check_stats(stats)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        if kernel_size not in KERNEL_SIZES or isinstance(kernel_size, bool):
            raise ValueError(f"kernel_size must be one of {KERNEL_SIZES}, got {kernel_size!r}")
        self.num_features, self.threshold, self.kernel_size = num_features, float(threshold), kernel_size
        self.eps, self.stats, self.process_group = float(eps), stats, process_group
        factory = {"device": device, "dtype": dtype}
        pad = kernel_size // 2
        self.response_conv = nn.Conv2d(2, 1, kernel_size, padding=pad, bias=False, **factory)
        self.gamma_conv = nn.Conv2d(1, 1, kernel_size, padding=pad, **factory)
        self.beta_conv = nn.Conv2d(1, 1, kernel_size, padding=pad, **factory)
        self.last_mask: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        for conv in (self.response_conv, self.gamma_conv, self.beta_conv):
            conv.reset_parameters()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, threshold={self.threshold}, kernel_size={self.kernel_size}, eps={self.eps}, "
                f"stats={self.stats!r}")

    @staticmethod
    def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        bias = None if conv.bias is None else conv.bias.to(x.dtype)
        return F.conv2d(x, conv.weight.to(x.dtype), bias, padding=conv.padding)

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """The response map ``s = sigmoid(response_conv([mean_c(x); max_c(x)]))``, ``(B, 1, H, W)``, in
        :func:`normlab.functional.compute_dtype`."""
        xc = x.to(NF.compute_dtype(x.dtype))
        pooled = torch.cat([xc.mean(1, keepdim=True), xc.max(1, keepdim=True).values], dim=1)
        return torch.sigmoid(self._conv(self.response_conv, pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, type(self).__name__)
        s = self.response(x)
        mask = s.detach() >= self.threshold
        self.last_mask = mask
        d, rstd = NF._region_moments(x, mask, self.eps, self.stats, self.process_group, type(self).__name__)
        r = d * NF._region_select(mask, rstd)
        return torch.addcmul(self._conv(self.beta_conv, s), r, 1.0 + self._conv(self.gamma_conv, s)).to(x.dtype)
