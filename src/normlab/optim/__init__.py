"""Optimizers, one file per method, each a pure per-tensor step function under a thin
``torch.optim.Optimizer`` (the torch.optim pattern)."""

from ._common import optimizer_state_bytes, split_matrix_params
from .adamp import SGDP, AdamP, effective_step_size, is_scale_invariant, project_radial
from .diffgrad import DiffGrad, friction
from .gns_newton import (GradNormalizedGD, GradRegNewton, boehning_logistic, diag_hessian, gauss_newton_logsumexp,
                         gauss_newton_softmax, grad_normalized_gd, grad_reg_newton)
from .normalized_lrgd import LogisticGDClassifier, SeparatorResult, fit_separator, labels01_to_pm1, margin
from .sinkgd import SinkGD, column_normalize, multi_normalize, row_normalize, sinkgd_param_groups, sr_sinkhorn
from .swan import SWAN, grad_norm, grad_whitening, grad_whitening_svd, swan_direction, swan_param_groups
from .zo_subspace import SubspaceDenoiser, ZOAdam, partial_uniform_timesteps

__all__ = [
    "SGDP", "SWAN", "AdamP", "DiffGrad", "GradNormalizedGD", "GradRegNewton", "LogisticGDClassifier",
    "SeparatorResult", "SinkGD", "SubspaceDenoiser", "ZOAdam", "boehning_logistic", "column_normalize",
    "diag_hessian", "effective_step_size", "fit_separator", "friction", "gauss_newton_logsumexp",
    "gauss_newton_softmax", "grad_norm", "grad_normalized_gd", "grad_reg_newton", "grad_whitening",
    "grad_whitening_svd", "is_scale_invariant", "labels01_to_pm1", "margin", "multi_normalize",
    "optimizer_state_bytes", "partial_uniform_timesteps", "project_radial", "row_normalize",
    "sinkgd_param_groups", "split_matrix_params", "sr_sinkhorn", "swan_direction", "swan_param_groups",
]
