"""Model surgery: exact conversions and architecture swaps, in place, returning the changed names."""

from .fuse import ChannelAffine, ConversionError, FoldedNorm, fuse_norms
from .pre_rmsnorm import BlockSpec, PreLNSpec, to_rmsnorm

__all__ = ["BlockSpec", "ChannelAffine", "ConversionError", "FoldedNorm", "PreLNSpec", "fuse_norms", "to_rmsnorm"]
