"""Weight reparameterizations on ``torch.nn.utils.parametrize``, one file per method."""

from .weight_standardization import WeightStandardization, add_weight_standardization, weight_standardization
from .compander import (CompanderAdam, WeightCompander, add_weight_compander, compander_param_groups,
                        compander_weight_decay, remove_weight_compander, weight_compander)
from .nap import NaPOptimizer, NaPProjector, add_nap

__all__ = [
    "CompanderAdam", "NaPOptimizer", "NaPProjector", "WeightCompander", "WeightStandardization", "add_nap",
    "add_weight_compander", "add_weight_standardization", "compander_param_groups", "compander_weight_decay",
    "remove_weight_compander", "weight_compander", "weight_standardization",
]
