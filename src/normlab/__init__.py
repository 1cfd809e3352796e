"""normlab: normalization techniques from 30 papers for PyTorch, each with evidence of what it does.

Public API: the layers (``normlab.LayerNorm``, ``normlab.RMSNorm``, ...), the factories
:func:`create_norm` and :func:`create_optimizer`, and the catalog (:func:`list_methods`).
"""

from . import convert, functional
from .catalog import MethodEntry, get_method, list_methods
from .factory import create_norm, create_optimizer, norm_names, optimizer_names
from .layers import CRMSNorm, LayerNorm, LayerNormLSTM, LayerNormLSTMCell, RMSNorm

__version__ = "0.1.0"

__all__ = [
    "CRMSNorm", "LayerNorm", "LayerNormLSTM", "LayerNormLSTMCell", "MethodEntry", "RMSNorm", "convert",
    "create_norm", "create_optimizer", "functional", "get_method", "list_methods", "norm_names",
    "optimizer_names",
]
