"""Techniques that wrap a training or test-time loop, one file per method."""

from .core import Core, pairwise_class_correlation_loss
from .meta_rescale import STORM, LossRescaler, lookahead_meta_loss, rescaler_features
from .pada import GradNormCategorical, GradNormImportanceSampler, IndexedDataset, per_sample_grad_norm
from .tract import TrActConv2d, TrActLinear, convert_first_layer

__all__ = [
    "Core", "GradNormCategorical", "GradNormImportanceSampler", "IndexedDataset", "LossRescaler", "STORM",
    "TrActConv2d", "TrActLinear", "convert_first_layer", "lookahead_meta_loss",
    "pairwise_class_correlation_loss", "per_sample_grad_norm", "rescaler_features",
]
