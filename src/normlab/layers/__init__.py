"""Activation normalization layers, one file per method."""

from .adab2n import AdaB2N, adab2n_loss, end_task, set_task_counts
from .alpha_bn import AlphaBatchNorm
from .batch_channel import BatchChannelNorm2d
from .evonorm import EvoNormB0, EvoNormS0
from .layernorm import CRMSNorm, LayerNorm, RMSNorm
from .layernorm_lstm import LayerNormLSTM, LayerNormLSTMCell
from .powernorm import PowerNorm
from .region import LearnableRegionNorm2d, RegionNorm2d
from .td_layernorm import (AdaLayerNorm, TDLayerNorm, TDRMSNorm, TimeDependentParameter, no_weight_decay_names,
                           tdln_time_from_step)
from .unified import UnifiedNorm
from .residual import ScaledResidual, fixup_init_, residual_alpha, scale_residual_branches

__all__ = [
    "AdaB2N", "AdaLayerNorm", "AlphaBatchNorm", "BatchChannelNorm2d", "CRMSNorm", "EvoNormB0", "EvoNormS0",
    "LayerNorm", "LayerNormLSTM", "LayerNormLSTMCell", "LearnableRegionNorm2d", "PowerNorm", "RMSNorm",
    "RegionNorm2d", "ScaledResidual", "TDLayerNorm", "TDRMSNorm", "TimeDependentParameter", "UnifiedNorm",
    "adab2n_loss", "end_task", "fixup_init_", "no_weight_decay_names", "residual_alpha",
    "scale_residual_branches", "set_task_counts", "tdln_time_from_step",
]
