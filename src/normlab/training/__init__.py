"""Techniques that wrap a training or test-time loop, one file per method."""

from .core import Core, pairwise_class_correlation_loss

__all__ = ["Core", "pairwise_class_correlation_loss"]
