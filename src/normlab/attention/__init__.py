"""Attention variants: NaLa (norm-aware linear attention) and the linear-attention baseline."""

from .linear import linear_attention
from .nala import NormAwareLinearAttention, nala_attention, nala_feature_maps, rotary_tables

__all__ = ["NormAwareLinearAttention", "linear_attention", "nala_attention", "nala_feature_maps", "rotary_tables"]
