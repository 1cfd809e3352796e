"""Saliency maps under one calling convention -- ``method(model, layer)(x, target=None) -> (N, 1, H, W)``
maps at input resolution, batched, eval mode forced and restored, hooks removed afterwards -- and the
faithfulness metrics implemented once for all of them."""

from .cf_cam import CFCAM
from .gradcam import GradCAM
from .metrics import class_sensitivity, deletion_insertion, deletion_insertion_curves
from .normgrad import NormGrad, meta_saliency, normgrad

__all__ = ["CFCAM", "GradCAM", "NormGrad", "class_sensitivity", "deletion_insertion", "deletion_insertion_curves",
           "meta_saliency", "normgrad"]
