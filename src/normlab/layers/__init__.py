"""Activation normalization layers, one file per method."""

from .layernorm import CRMSNorm, LayerNorm, RMSNorm
from .layernorm_lstm import LayerNormLSTM, LayerNormLSTMCell

__all__ = ["CRMSNorm", "LayerNorm", "LayerNormLSTM", "LayerNormLSTMCell", "RMSNorm"]
