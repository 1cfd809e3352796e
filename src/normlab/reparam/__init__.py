"""Weight reparameterizations on ``torch.nn.utils.parametrize``, one file per method."""

from .weight_standardization import WeightStandardization, add_weight_standardization, weight_standardization

__all__ = ["WeightStandardization", "add_weight_standardization", "weight_standardization"]
