"""Activation normalization layers, one file per method."""

from .layernorm import CRMSNorm, LayerNorm, RMSNorm
from .layernorm_lstm import LayerNormLSTM, LayerNormLSTMCell
from .powernorm import PowerNorm
from .td_layernorm import (AdaLayerNorm, TDLayerNorm, TDRMSNorm, TimeDependentParameter, no_weight_decay_names,
                           tdln_time_from_step)
from .unified import UnifiedNorm

__all__ = [
    "AdaLayerNorm", "CRMSNorm", "LayerNorm", "LayerNormLSTM", "LayerNormLSTMCell", "PowerNorm", "RMSNorm",
    "TDLayerNorm", "TDRMSNorm", "TimeDependentParameter", "UnifiedNorm", "no_weight_decay_names",
    "tdln_time_from_step",
]
