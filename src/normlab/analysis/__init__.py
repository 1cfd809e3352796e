"""Diagnostics of a model and its loss: Hessian spectra and the LLA criteria, loss landscapes, and the
initialisation schemes and filter diagnostics of the filter-design survey."""

from .filters import (SCHEMES, ReceptiveField, Redundancy, SignalPropagation, apply_init, dead_filters,
                      filter_norms, filter_redundancy, gaussian_, kmeans_patch_filters, lecun_normal_,
                      lecun_uniform_, lsuv_, orthogonality_error, receptive_field, signal_propagation,
                      singular_values, spectral_energy, stable_rank)
from .hessian import HessianOperator, exact_hessian, hessian_criteria, hvps_to_accuracy, spectral_density
from .landscape import (hessian_directions, loss_line, loss_surface, normalize_direction, plot_line, plot_surface,
                        random_directions)
from .effective_lr import EffectiveLRLogger, effective_lr, scale_invariant_parameters
from .signal import expansion_terms, log_norm_growth, path_order_profile, residual_signal_growth

__all__ = [
    "EffectiveLRLogger", "HessianOperator", "ReceptiveField", "Redundancy", "SCHEMES", "SignalPropagation",
    "apply_init", "dead_filters", "effective_lr", "exact_hessian", "expansion_terms", "filter_norms",
    "filter_redundancy", "gaussian_", "hessian_criteria", "hessian_directions", "hvps_to_accuracy",
    "kmeans_patch_filters", "lecun_normal_", "lecun_uniform_", "log_norm_growth", "loss_line", "loss_surface",
    "lsuv_", "normalize_direction", "orthogonality_error", "path_order_profile", "plot_line", "plot_surface",
    "random_directions", "receptive_field", "residual_signal_growth", "scale_invariant_parameters",
    "signal_propagation", "singular_values", "spectral_density", "spectral_energy", "stable_rank",
]
