"""Model surgery: exact conversions and architecture swaps, in place, returning the changed names."""

from .pre_rmsnorm import to_rmsnorm

__all__ = ["to_rmsnorm"]
