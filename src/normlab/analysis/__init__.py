"""Diagnostics of a model and its loss: Hessian spectra and the LLA criteria, loss landscapes, and the
initialisation schemes and filter diagnostics of the filter-design survey."""

from .filters import (SCHEMES, ReceptiveField, Redundancy, SignalPropagation, apply_init, dead_filters,
                      filter_norms, filter_redundancy, gaussian_, kmeans_patch_filters, lecun_normal_,
                      lecun_uniform_, lsuv_, orthogonality_error, receptive_field, signal_propagation,
                      singular_values, spectral_energy, stable_rank)
from .hessian import HessianOperator, exact_hessian, hessian_criteria, hvps_to_accuracy, spectral_density
from .landscape import (hessian_directions, loss_line, loss_surface, normalize_direction, plot_line, plot_surface,
                        random_directions)

__all__ = [
    "SCHEMES", "HessianOperator", "ReceptiveField", "Redundancy", "SignalPropagation", "apply_init", "dead_filters",
    "exact_hessian", "filter_norms", "filter_redundancy", "gaussian_", "hessian_criteria", "hessian_directions",
    "hvps_to_accuracy", "kmeans_patch_filters", "lecun_normal_", "lecun_uniform_", "loss_line", "loss_surface",
    "lsuv_", "normalize_direction", "orthogonality_error", "plot_line", "plot_surface", "random_directions",
    "receptive_field", "signal_propagation", "singular_values", "spectral_density", "spectral_energy",
    "stable_rank",
]
