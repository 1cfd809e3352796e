"""Grad-CAM, the baseline of the saliency methods.

Paper: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
ICCV 2017 (arXiv 1610.02391). Reference implementation whose scaling is followed: PyPI ``grad-cam``
(``pytorch_grad_cam.GradCAM``, version 1.5.7).

For a target layer with output ``A (N, K, h, w)`` and ``G = d logit_t / dA`` (the raw logit of the target
class, default the argmax logit)::

    w_k  = mean_u G_k(u)                              # global-average-pooled gradient per channel
    cam  = relu(sum_k w_k A_k)                        # (N, h, w)
    cam  = (cam - min cam) / (max(cam - min cam) + 1e-7)   # per image, as pytorch_grad_cam.scale_cam_image
    map  = bilinear(cam, input size)                  # F.interpolate, align_corners=False

Deviation: ``pytorch_grad_cam`` resizes with ``cv2.resize`` (bilinear, half-pixel centres like
``align_corners=False``), we use ``F.interpolate`` so that no OpenCV is needed; at a layer with the input's
resolution (the claim checks' setting) the two are identical. The map is computed in float32 for
half-precision models (float64 stays float64). Batched: in eval mode every sample's map equals its own
single-image map.
"""

from __future__ import annotations

import torch
from torch import nn

from ._capture import LayerCapture, LayerSpec, at_least_float32, resolve_layer, upsample


def gradcam_raw(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``relu(sum_k mean_u(G_k) A_k)`` of ``(N, K, h, w)`` tensors, as ``(N, 1, h, w)`` (unscaled; float32 for
    half-precision input)."""
    a, g = at_least_float32(activation), at_least_float32(gradient)
    weights = g.mean(dim=(2, 3), keepdim=True)
    return (weights * a).sum(dim=1, keepdim=True).clamp_min(0)


def scale_cam(cam: torch.Tensor) -> torch.Tensor:
    """``pytorch_grad_cam``'s per-image scaling ``(cam - min) / (max(cam - min) + 1e-7)``."""
    flat = cam.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (flat.max(dim=1, keepdim=True).values + 1e-7)).view_as(cam)


class GradCAM:
    """Grad-CAM maps of ``model`` at ``target_layer`` (a module name or the module itself).

    ``GradCAM(model, "features.3")(x, target=None) -> Tensor (N, 1, H, W)`` in [0, 1]. Hooks live only during
    a call; the model's train/eval flags, parameters and ``.grad`` are left as they were.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec) -> None:
        self.model = model
        self.layer_name, self.target_layer = resolve_layer(model, target_layer)

    def __call__(self, x: torch.Tensor, target: int | torch.Tensor | None = None) -> torch.Tensor:
        with LayerCapture(self.model, self.target_layer) as cap:
            _, _, (act,), (grad,) = cap.run(x, target)
        return upsample(scale_cam(gradcam_raw(act, grad)), x.shape[-2:])

    def __repr__(self) -> str:
        return f"GradCAM(target_layer={self.layer_name!r})"
