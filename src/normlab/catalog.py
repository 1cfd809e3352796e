"""The method catalog: one frozen entry per paper of ``papers.md``.

``status`` is how far the implementation has come: ``planned`` (nothing yet), ``implemented`` (the
objects exist and are tested), ``verified`` (the spec sheet's equivalence and reference checks pass in
the test suite). Claim verdicts are not a status: they live in the committed full-mode results under
``benchmarks/results/`` and are read by :func:`normlab.bench.report.committed_verdicts`.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("layer", "reparam", "optimizer", "conversion", "attention", "analysis", "explain", "training")
STATUSES = ("planned", "implemented", "verified")


@dataclass(frozen=True)
class MethodEntry:
    """One paper: its sheet slug, title, year, kinds, public objects, claim-check ids, status, and a note for
    what a user must know before trusting the implementation (e.g. a formula reconstructed, not verified)."""

    slug: str
    title: str
    year: int
    kinds: tuple[str, ...]
    objects: tuple[str, ...] = ()
    experiments: tuple[str, ...] = ()
    status: str = "planned"
    note: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"{self.slug}: unknown kinds {sorted(unknown)}; valid: {KINDS}")
        if self.status not in STATUSES:
            raise ValueError(f"{self.slug}: unknown status {self.status!r}; valid: {STATUSES}")


CATALOG: tuple[MethodEntry, ...] = (
    MethodEntry("gns_newton", "Gradient-Normalized Smoothness for Optimization with Approximate Hessians",
                2025, ("optimizer",), objects=("GradRegNewton", "GradNormalizedGD"),
                experiments=("gns_newton.logistic", "gns_newton.softmax"), status="verified"),
    MethodEntry("layernorm", "Layer Normalization", 2016, ("layer",),
                objects=("LayerNorm", "RMSNorm", "LayerNormLSTMCell", "LayerNormLSTM"),
                experiments=("layernorm",), status="verified"),
    MethodEntry("adamp", "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
                2020, ("optimizer",), objects=("AdamP", "SGDP"), experiments=("adamp", "adamp.sgdp"),
                status="verified"),
    MethodEntry("unified_norm", "Unified Normalization for Accelerating and Stabilizing Transformers", 2022,
                ("layer", "conversion"), objects=("UnifiedNorm", "fuse_norms"),
                experiments=("unified_norm", "unified_norm.inference"), status="verified"),
    MethodEntry("normgrad", "There and Back Again: Revisiting Backpropagation Saliency Methods", 2020,
                ("explain",), objects=("NormGrad", "normgrad", "meta_saliency", "class_sensitivity", "GradCAM",
                                       "deletion_insertion"),
                experiments=("normgrad.meta", "normgrad.deletion"), status="verified"),
    MethodEntry("nap", "Normalization and effective learning rates in reinforcement learning", 2024,
                ("reparam", "conversion", "analysis"),
                objects=("add_nap", "NaPProjector", "NaPOptimizer", "EffectiveLRLogger", "effective_lr",
                         "scale_invariant_parameters"),
                experiments=("nap", "nap.accuracy"), status="verified"),
    MethodEntry("powernorm", "PowerNorm: Rethinking Batch Normalization in Transformers", 2020, ("layer",),
                objects=("PowerNorm",), experiments=("powernorm",), status="verified"),
    MethodEntry("evonorm", "Evolving Normalization-Activation Layers", 2020, ("layer", "conversion"),
                objects=("EvoNormB0", "EvoNormS0", "replace_bn_relu"),
                experiments=("evonorm.s0_vs_gn", "evonorm.report"), status="verified"),
    MethodEntry("region_norm", "Region Normalization for Image Inpainting", 2019, ("layer",),
                objects=("RegionNorm2d", "LearnableRegionNorm2d", "region_norm"), experiments=("region_norm",),
                status="verified"),
    MethodEntry("filter_design", "On filter design in deep convolutional neural network", 2024, ("analysis",),
                objects=("apply_init", "gaussian_", "lecun_uniform_", "lecun_normal_", "lsuv_", "kmeans_patch_filters",
                         "filter_norms", "dead_filters", "filter_redundancy", "orthogonality_error", "stable_rank",
                         "singular_values", "spectral_energy", "receptive_field", "signal_propagation"),
                experiments=("filter_design.spread", "filter_design.training"), status="verified"),
    MethodEntry("lla_hessian", "Investigating generalization capabilities of neural networks by means of loss "
                "landscapes and Hessian analysis", 2024, ("analysis",),
                objects=("HessianOperator", "exact_hessian", "spectral_density", "hessian_criteria",
                         "random_directions", "hessian_directions", "loss_line", "loss_surface", "plot_surface"),
                experiments=("lla_hessian.criteria", "lla_hessian.slq", "lla_hessian.axes", "lla_hessian.report"),
                status="verified"),
    MethodEntry("cf_cam", "CF-CAM: Cluster Filter Class Activation Mapping for Reliable Gradient-Based "
                "Interpretability", 2025, ("explain",), objects=("CFCAM", "GradCAM", "deletion_insertion"),
                experiments=("cf_cam.faithfulness", "cf_cam.class_sensitivity", "cf_cam.robustness"),
                status="verified"),
    MethodEntry("meta_loss_rescaling", "Learning from Noisy Labels via Self-Taught On-the-Fly Meta Loss Rescaling",
                2024, ("training",), objects=("STORM", "LossRescaler", "rescaler_features", "lookahead_meta_loss"),
                experiments=("meta_loss_rescaling.noisy", "meta_loss_rescaling.clean"), status="verified",
                note="the rescaler's features, the validation-selection rule and the defaults are the spec sheet's "
                     "prototyped choices; the official code was not inspected"),
    MethodEntry("gmn_sinkgd", "Gradient Multi-Normalization for Stateless and Scalable LLM Training", 2025,
                ("optimizer",), objects=("SinkGD",), experiments=("gmn_sinkgd",), status="verified"),
    MethodEntry("swan", "SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training", 2024,
                ("optimizer",), objects=("SWAN",), experiments=("swan",), status="verified"),
    MethodEntry("pada", "PA&DA: Jointly Sampling PAth and DAta for Consistent NAS", 2023, ("training",),
                objects=("GradNormImportanceSampler", "GradNormCategorical", "IndexedDataset", "per_sample_grad_norm"),
                experiments=("pada.variance", "pada.accuracy", "pada.report", "pada.path_sampler"),
                status="verified"),
    MethodEntry("diffgrad", "diffGrad: An Optimization Method for Convolutional Neural Networks", 2019,
                ("optimizer",), objects=("DiffGrad",), experiments=("diffgrad", "diffgrad.well"), status="verified"),
    MethodEntry("tract", "TrAct: Making First-layer Pre-Activations Trainable", 2024, ("training",),
                objects=("TrActLinear", "TrActConv2d", "convert_first_layer"),
                experiments=("tract.sgd", "tract.adam", "tract.conv"), status="verified"),
    MethodEntry("pre_rmsnorm", "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN "
                "Transformers", 2023, ("layer", "conversion"),
                objects=("CRMSNorm", "to_rmsnorm"), experiments=("pre_rmsnorm",), status="verified"),
    MethodEntry("adab2n", "Overcoming Recency Bias of Normalization Statistics in Continual Learning: Balance "
                "and Adaptation", 2023, ("layer",),
                objects=("AdaB2N", "set_task_counts", "end_task", "adab2n_loss", "replace_batchnorm"),
                experiments=("adab2n.balance", "adab2n.no_harm"), status="verified"),
    MethodEntry("bcn_ws", "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
                2019, ("layer", "reparam", "conversion"),
                objects=("BatchChannelNorm2d", "WeightStandardization", "weight_standardization",
                         "add_weight_standardization", "to_gn_ws", "to_bcn_ws"),
                experiments=("bcn_ws.small_batch", "bcn_ws.report"), status="verified"),
    MethodEntry("zo_subspace", "Efficient Personalization of Quantized Diffusion Model without Backpropagation",
                2024, ("optimizer", "training"), objects=("ZOAdam", "SubspaceDenoiser", "partial_uniform_timesteps"),
                experiments=("zo_subspace.training", "zo_subspace.subspace", "zo_subspace.memory"), status="verified"),
    MethodEntry("normalized_lrgd", "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient "
                "Descent with Large Step Sizes", 2024, ("optimizer",),
                objects=("fit_separator", "LogisticGDClassifier"), experiments=("normalized_lrgd",),
                status="verified"),
    MethodEntry("weight_compander", "Weight Compander: A Simple Weight Reparameterization for Regularization",
                2023, ("reparam", "optimizer"),
                objects=("WeightCompander", "weight_compander", "add_weight_compander", "remove_weight_compander",
                         "compander_weight_decay", "compander_param_groups", "CompanderAdam"),
                experiments=("weight_compander.no_harm", "weight_compander.controls"), status="verified"),
    MethodEntry("fedtiny", "Distributed Pruning Towards Tiny Neural Networks in Federated Learning", 2022,
                ("training",), objects=("FedTiny", "adaptive_bn_selection", "prune_and_grow", "erk_densities"),
                experiments=("fedtiny", "fedtiny.report"), status="verified"),
    MethodEntry("adaptive_guidance", "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion "
                "Models", 2023, ("training",), objects=("AdaptiveGuidance", "LinearAG", "TruncatedGuidance", "ddpm_sample"),
                experiments=("adaptive_guidance.x0", "adaptive_guidance.eps"), status="verified"),
    MethodEntry("td_layernorm", "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion Models "
                "and Time-Dependent Layer Normalization", 2024, ("layer",),
                objects=("TDLayerNorm", "TDRMSNorm", "AdaLayerNorm", "TimeDependentParameter"),
                experiments=("td_layernorm",), status="verified"),
    MethodEntry("alpha_bn", "Test-time Batch Statistics Calibration for Covariate Shift", 2021,
                ("layer", "conversion", "training"),
                objects=("AlphaBatchNorm", "to_alpha_bn", "sync_norms", "Core", "pairwise_class_correlation_loss"),
                experiments=("alpha_bn",), status="verified",
                note="Core's loss is a reconstruction (the paper's text and code were not retrieved): no numerical "
                     "parity with the paper is claimed"),
    MethodEntry("nalaformer", "NaLaFormer: Norm-Aware Linear Attention for Transformer Models", 2025,
                ("attention",), objects=("NormAwareLinearAttention", "nala_attention", "linear_attention"),
                experiments=("nalaformer.norm_awareness", "nalaformer.recall", "nalaformer.scaling"),
                status="verified"),
    MethodEntry("residual_scaling", "On residual network depth", 2025, ("layer", "analysis"),
                objects=("ScaledResidual", "residual_alpha", "scale_residual_branches", "fixup_init_",
                         "residual_signal_growth", "path_order_profile"),
                experiments=("residual_scaling.signal", "residual_scaling.training"), status="verified"),
)

_BY_SLUG = {entry.slug: entry for entry in CATALOG}


def list_methods() -> list[MethodEntry]:
    """All catalog entries, in the papers' order."""
    return list(CATALOG)


def get_method(slug: str) -> MethodEntry:
    """The entry for ``slug``; ``KeyError`` listing the valid slugs otherwise."""
    try:
        return _BY_SLUG[slug]
    except KeyError:
        raise KeyError(f"unknown method {slug!r}; valid: {', '.join(sorted(_BY_SLUG))}") from None
