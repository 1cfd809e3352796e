"""normlab: normalization techniques from 30 papers for PyTorch, each with evidence of what it does.

Public API: the layers (``normlab.LayerNorm``, ``normlab.PowerNorm``, ...), the optimizers
(``normlab.AdamP``, ``normlab.SWAN``, ...), attention (``normlab.NormAwareLinearAttention``), the
conversions (``normlab.convert``), the factories :func:`create_norm` and :func:`create_optimizer`, and
the catalog (:func:`list_methods`).
"""

from . import analysis, attention, convert, distributed, explain, functional, optim, reparam, training
from .attention import NormAwareLinearAttention, linear_attention, nala_attention, nala_feature_maps
from .catalog import MethodEntry, get_method, list_methods
from .factory import create_norm, create_optimizer, norm_names, optimizer_names
from .layers import (AdaB2N, AdaLayerNorm, AlphaBatchNorm, BatchChannelNorm2d, CRMSNorm, EvoNormB0, EvoNormS0,
                     LayerNorm, LayerNormLSTM, LayerNormLSTMCell, LearnableRegionNorm2d, PowerNorm, RegionNorm2d,
                     RMSNorm, TDLayerNorm, TDRMSNorm, TimeDependentParameter, UnifiedNorm)
from .reparam import WeightStandardization, add_weight_standardization, weight_standardization
from .training import AdaptiveGuidance, Core, FedTiny, LinearAG, TruncatedGuidance, pairwise_class_correlation_loss
from .optim import (SGDP, SWAN, AdamP, DiffGrad, GradNormalizedGD, GradRegNewton, LogisticGDClassifier, SinkGD,
                    SubspaceDenoiser, ZOAdam, fit_separator, partial_uniform_timesteps)

__version__ = "0.1.0"

__all__ = [
    "AdaB2N", "AdaLayerNorm", "AdamP", "AdaptiveGuidance", "AlphaBatchNorm", "BatchChannelNorm2d", "CRMSNorm",
    "Core", "DiffGrad", "EvoNormB0", "EvoNormS0", "FedTiny", "GradNormalizedGD", "GradRegNewton", "LayerNorm",
    "LayerNormLSTM", "LayerNormLSTMCell", "LearnableRegionNorm2d", "LinearAG", "LogisticGDClassifier",
    "MethodEntry", "NormAwareLinearAttention", "PowerNorm", "RMSNorm", "RegionNorm2d", "SGDP", "SWAN", "SinkGD",
    "SubspaceDenoiser", "TDLayerNorm", "TDRMSNorm", "TimeDependentParameter", "TruncatedGuidance", "UnifiedNorm",
    "WeightStandardization", "ZOAdam", "add_weight_standardization", "analysis", "attention", "convert",
    "create_norm", "create_optimizer", "distributed", "explain", "fit_separator", "functional", "get_method",
    "linear_attention", "list_methods", "nala_attention", "nala_feature_maps", "norm_names", "optim",
    "optimizer_names", "pairwise_class_correlation_loss", "partial_uniform_timesteps", "reparam", "training",
    "weight_standardization",
]
