"""Model surgery: exact conversions and architecture swaps, in place, returning the changed names."""

from .fuse import ChannelAffine, ConversionError, FoldedNorm, fuse_norms
from .pre_rmsnorm import BlockSpec, PreLNSpec, to_rmsnorm
from .swap import (BATCH_STATISTICS_LAYERS, replace_batchnorm, replace_bn_relu, sync_norms, to_alpha_bn, to_bcn_ws,
                   to_gn_ws)

__all__ = ["BATCH_STATISTICS_LAYERS", "BlockSpec", "ChannelAffine", "ConversionError", "FoldedNorm", "PreLNSpec",
           "fuse_norms", "replace_batchnorm", "replace_bn_relu", "sync_norms", "to_alpha_bn", "to_bcn_ws",
           "to_gn_ws", "to_rmsnorm"]
