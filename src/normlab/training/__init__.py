"""Techniques that wrap a training or test-time loop, one file per method."""

from .core import Core, pairwise_class_correlation_loss
from .fedtiny import (BNStats, FedTiny, adaptive_bn_selection, aggregate_bn_stats, apply_masks, candidate_masks,
                      erk_densities, fedavg, install_bn_stats, magnitude_masks, prunable_weights, prune_and_grow,
                      reestimate_bn_stats, topk_pruned_grads)
from .guidance import (AdaptiveGuidance, LinearAG, TruncatedGuidance, calibrate_threshold, ddpm_sample,
                       guidance_cosine, predicted_x0)
from .meta_rescale import STORM, LossRescaler, lookahead_meta_loss, rescaler_features
from .pada import GradNormCategorical, GradNormImportanceSampler, IndexedDataset, per_sample_grad_norm
from .tract import TrActConv2d, TrActLinear, convert_first_layer

__all__ = [
    "AdaptiveGuidance", "BNStats", "Core", "FedTiny", "GradNormCategorical", "GradNormImportanceSampler",
    "IndexedDataset", "LinearAG", "LossRescaler", "STORM", "TrActConv2d", "TrActLinear", "TruncatedGuidance",
    "adaptive_bn_selection", "aggregate_bn_stats", "apply_masks", "calibrate_threshold", "candidate_masks",
    "convert_first_layer", "ddpm_sample", "erk_densities", "fedavg", "guidance_cosine", "install_bn_stats",
    "lookahead_meta_loss", "magnitude_masks", "pairwise_class_correlation_loss", "per_sample_grad_norm",
    "predicted_x0", "prunable_weights", "prune_and_grow", "reestimate_bn_stats", "rescaler_features",
    "topk_pruned_grads",
]
