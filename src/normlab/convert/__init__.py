"""Model surgery: exact conversions and architecture swaps, in place, returning the changed names."""

from .pre_rmsnorm import BlockSpec, ConversionError, PreLNSpec, to_rmsnorm

__all__ = ["BlockSpec", "ConversionError", "PreLNSpec", "to_rmsnorm"]
