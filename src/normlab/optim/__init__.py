"""Optimizers, one file per method, each a pure per-tensor step function under a thin
``torch.optim.Optimizer`` (the torch.optim pattern)."""

from ._common import optimizer_state_bytes, split_matrix_params

__all__ = ["optimizer_state_bytes", "split_matrix_params"]
