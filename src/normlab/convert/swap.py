"""Swapping the BatchNorms of an existing model, and turning on distributed statistics.

Architecture swaps (they change the model's function by design, carry over what means the same thing):

- :func:`replace_batchnorm`: every ``nn.BatchNorm{1,2,3}d`` / ``nn.SyncBatchNorm`` for another norm layer.
- :func:`replace_bn_relu`: every ``BatchNorm2d`` and the ReLU after it for one EvoNorm layer (Liu et al.
  2020, arXiv:2004.02967, which replaces the pair ``BN -> ReLU`` with a single layer).
- :func:`to_gn_ws` / :func:`to_bcn_ws`: BatchNorm -> GroupNorm or Batch-Channel Norm, plus Weight
  Standardization on the convolution feeding each one (Qiao et al. 2019, arXiv:1903.10520).

Equivalence conversion: :func:`to_alpha_bn` (alpha-BN, You, Li and Zhao 2021, arXiv:2110.04065): at alpha = 1 the model
computes exactly what it did in eval mode.

Distributed statistics: :func:`sync_norms` makes every batch-statistics layer of a model reduce its
statistics over a process group, on CPU (gloo) as on GPU, and refuses what it does not know.

All of them work in place and return the qualified names of the modules they changed. Each first
builds every replacement and checks every module it was asked to change; on any module it cannot convert
it raises :class:`~normlab.convert.ConversionError` (a ``ValueError``) naming the module, with the model
untouched. None of them skips a module silently. A BatchNorm *subclass* (anything deriving from torch's
``_BatchNorm`` that is not one of torch's own four classes) is refused everywhere: its ``forward`` may
compute something else, and carrying its state into another layer would silently drop that code, which is
what ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.

State carried over: a replacement that defines ``from_batchnorm(bn, **kwargs)`` (``AlphaBatchNorm``,
``AdaB2N``) builds itself from the BatchNorm; any other gets the BatchNorm's ``eps`` (when its constructor
takes one and the caller did not set it), its device and dtype, its train/eval mode, and a copy of the
entries named in its class attribute ``batchnorm_state`` (the parameters and buffers that mean the same
as the BatchNorm's same-named ones, e.g. EvoNorm-B0's ``weight``, ``bias`` and ``running_var``).
``nn.GroupNorm`` gets the BatchNorm's per-channel ``weight`` and ``bias``.

Which module follows which comes from the model's dataflow: :func:`replace_bn_relu`, :func:`to_gn_ws` and
:func:`to_bcn_ws` trace ``model(x)`` with ``torch.fx`` (other forward arguments at their defaults) and
raise on a model that cannot be traced. The ReLU after a BatchNorm counts only as an ``nn.ReLU`` module
applied to the BatchNorm's output alone and used nowhere else, because removing it in place means
replacing that module with ``nn.Identity``; a functional ``F.relu`` or a ReLU module shared with other
places (torchvision's ``BasicBlock.relu``) cannot be removed in place and raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..factory import create_norm
from ..layers.adab2n import AdaB2N
from ..layers.alpha_bn import AlphaBatchNorm
from ..layers.batch_channel import BatchChannelNorm2d
from ..layers.evonorm import EvoNormB0, EvoNormS0
from ..layers.powernorm import PowerNorm
from ..layers.region import LearnableRegionNorm2d, RegionNorm2d
from ..layers.unified import UnifiedNorm
from ..reparam.weight_standardization import WeightStandardization, weight_standardization
from .fuse import ConversionError, _reads_metadata_only, _replace, _trace

__all__ = ["BATCH_STATISTICS_LAYERS", "replace_batchnorm", "replace_bn_relu", "sync_norms", "to_alpha_bn",
           "to_bcn_ws", "to_gn_ws"]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: normlab layers whose statistics :func:`sync_norms` reduces over a process group.
BATCH_STATISTICS_LAYERS = (AdaB2N, AlphaBatchNorm, BatchChannelNorm2d, EvoNormB0, LearnableRegionNorm2d, PowerNorm,
                           RegionNorm2d, UnifiedNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONAL_RELUS = (F.relu, torch.relu, torch.relu_)

Builder = Callable[[str, nn.Module], nn.Module]


def _batchnorms(model: nn.Module, types: tuple[type, ...] = BATCHNORMS) -> dict[str, nn.Module]:
    """The model's BatchNorms of exactly ``types`` by qualified name; ``ConversionError`` for a BatchNorm
    subclass or a BatchNorm of another of torch's types the caller cannot convert."""
    found = {}
    for name, module in model.named_modules():
        if type(module) in types:
            found[name] = module
        elif isinstance(module, _BatchNorm):
            kind = "BatchNorm subclass" if type(module) not in BATCHNORMS else "BatchNorm type"
            raise ConversionError(f"{name}: {type(module).__name__} is a {kind} this conversion cannot convert "
                                  f"(it converts {', '.join(t.__name__ for t in types)}); a subclass's own forward "
                                  "would be silently dropped")
    return found


def _swap(model: nn.Module, plan: dict[str, nn.Module]) -> list[str]:
    """Put every planned replacement in place (under all names a shared module has); the changed names."""
    changed: list[str] = []
    for name, new in plan.items():
        changed += _replace(model, model.get_submodule(name), new)
    return changed


def _copy_state(name: str, bn: nn.Module, new: nn.Module, names: tuple[str, ...]) -> None:
    """Copy the BatchNorm's entries ``names`` into the same-named entries of ``new`` where both hold one."""
    with torch.no_grad():
        for entry in names:
            src, dst = getattr(bn, entry, None), getattr(new, entry, None)
            if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
                continue
            if src.shape != dst.shape:
                raise ConversionError(f"{name}: {entry} of shape {tuple(src.shape)} does not fit the "
                                      f"{type(new).__name__}'s {entry} of shape {tuple(dst.shape)}")
            dst.copy_(src)


def _like(bn: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` on the BatchNorm's device and dtype and in its train/eval mode."""
    reference = next(iter(bn.parameters()), None)
    if reference is None:
        reference = bn.running_mean
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    return new.train(bn.training)


def _factory_class(factory: Any) -> Any:
    if isinstance(factory, partial):
        return _factory_class(factory.func)
    if isinstance(factory, str):
        from ..factory import _NORMS
        return _NORMS.get(factory.lower())
    return factory


def _from_factory(factory: str | type | partial, kwargs: dict[str, Any]) -> Builder:
    """The builder :func:`replace_batchnorm` uses for ``factory``."""
    cls = _factory_class(factory)
    if hasattr(cls, "from_batchnorm"):
        def build(name: str, bn: nn.Module) -> nn.Module:
            fixed = factory.keywords if isinstance(factory, partial) else {}
            return cls.from_batchnorm(bn, **fixed, **kwargs)
        return build
    takes_eps = cls is not None and "eps" in inspect.signature(cls).parameters
    fixed = set(factory.keywords) if isinstance(factory, partial) else set()

    def build(name: str, bn: nn.Module) -> nn.Module:
        extra = {"eps": bn.eps} if takes_eps and "eps" not in kwargs and "eps" not in fixed else {}
        new = _like(bn, create_norm(factory, bn.num_features, **extra, **kwargs))
        _copy_state(name, bn, new, getattr(type(new), "batchnorm_state", ()))
        return new
    return build


def _plan(model: nn.Module, targets: dict[str, nn.Module], build: Builder) -> dict[str, nn.Module]:
    """Every replacement built before anything changes; a failure names its module."""
    plan = {}
    for name, module in targets.items():
        try:
            plan[name] = build(name, module)
        except ConversionError:
            raise
        except (ValueError, TypeError) as err:
            raise ConversionError(f"{name}: {err}") from err
    return plan


def replace_batchnorm(model: nn.Module, factory: str | type | partial, **kwargs: Any) -> list[str]:
    """Replace every ``nn.BatchNorm{1,2,3}d`` and ``nn.SyncBatchNorm`` of ``model`` with a layer built by
    ``factory`` (a :func:`normlab.create_norm` name, a class or a ``functools.partial``; ``kwargs`` go to
    it), in place; returns the replaced names. A class with ``from_batchnorm`` (``AlphaBatchNorm``,
    ``AdaB2N``) is built with ``cls.from_batchnorm(bn, **kwargs)``; any other with ``factory(num_features,
    eps=bn.eps, **kwargs)`` and the BatchNorm's ``batchnorm_state`` entries copied (module docstring).
    Example: ``replace_batchnorm(model, AdaB2N, num_tasks=5, kappa=0.4)``."""
    targets = _batchnorms(model)
    return _swap(model, _plan(model, targets, _from_factory(factory, kwargs)))


def _calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    out: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            out.setdefault(node.target, []).append(node)
    return out


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _reads_metadata_only(u)]


def _is_relu(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _FUNCTIONAL_RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _following_relu(model: nn.Module, name: str, calls: dict[str, list[fx.Node]]) -> str | None:
    """The ``nn.ReLU`` module applied to this BatchNorm's output and nothing else, or None when no ReLU
    follows; ``ConversionError`` for a ReLU that cannot be removed in place."""
    follows = set()
    relus = set()
    for node in calls.get(name, []):
        users = _users(node)
        relu = len(users) == 1 and _is_relu(model, users[0]) and users[0].args[0] is node
        follows.add(relu)
        if relu:
            user = users[0]
            if user.op != "call_module" or len(calls[user.target]) != 1:
                how = "a ReLU module also applied elsewhere" if user.op == "call_module" else "a functional relu"
                raise ConversionError(f"{name}: the ReLU after it is {how} ({user.format_node()}); it cannot be "
                                      "removed in place -- give this BatchNorm its own nn.ReLU module")
            relus.add(user.target)
    if len(follows) > 1:
        raise ConversionError(f"{name}: the BatchNorm is called at several places, followed by a ReLU at some and "
                              "not at others")
    return relus.pop() if relus else None


def replace_bn_relu(model: nn.Module, kind: str = "B0", **kwargs: Any) -> list[str]:
    """Replace every ``BatchNorm2d -> ReLU`` pair with one EvoNorm layer (``kind`` "B0" or "S0"; ``kwargs``
    go to :class:`~normlab.layers.EvoNormB0` / :class:`~normlab.layers.EvoNormS0`), in place, and the ReLU
    module with ``nn.Identity``; returns the changed names (BatchNorms and ReLUs).

    A ``BatchNorm2d`` that no ReLU follows becomes the affine-only layer (``nonlinearity=False``: ``y = x *
    weight + bias``), as the official EvoNorm ResNet has it for the last norm of each residual branch and
    the projection shortcut. Carried over: ``eps``, ``weight``, ``bias``; for B0 also ``momentum`` and
    ``running_var``. Other BatchNorm types raise (EvoNorm is a conv-net layer)."""
    layers = {"B0": EvoNormB0, "S0": EvoNormS0}
    if kind not in layers:
        raise ValueError(f"kind must be 'B0' or 'S0', got {kind!r}")
    cls = layers[kind]
    targets = _batchnorms(model, (nn.BatchNorm2d,))
    if not targets:
        return []
    calls = _calls(_trace(model, targets, ConversionError, "replace_bn_relu needs the dataflow to find the ReLU "
                                                           "after each BatchNorm"))
    relus = {name: _following_relu(model, name, calls) for name in targets}

    def build(name: str, bn: nn.Module) -> nn.Module:
        carried = {"eps": bn.eps, **({"momentum": bn.momentum} if cls is EvoNormB0 else {})}
        new = _like(bn, cls(bn.num_features, nonlinearity=relus[name] is not None, **{**carried, **kwargs}))
        _copy_state(name, bn, new, cls.batchnorm_state)
        return new

    plan = _plan(model, targets, build)
    plan.update({relu: nn.Identity() for relu in relus.values() if relu is not None})
    return _swap(model, plan)


def _feeding_convs(model: nn.Module, targets: dict[str, nn.Module], purpose: str) -> dict[str, nn.Module]:
    """The convolutions whose output goes only into one of ``targets`` (and nowhere else), by name."""
    calls = _calls(_trace(model, targets, ConversionError, purpose))
    convs = {}
    for name in targets:
        for node in calls.get(name, []):
            source = node.args[0] if node.args else None
            if not isinstance(source, fx.Node) or source.op != "call_module":
                continue
            conv = model.get_submodule(source.target)
            if type(conv) in _CONVS and _users(source) == [node] and len(calls[source.target]) == 1:
                convs[source.target] = conv
    return convs


def _standardize_convs(convs: dict[str, nn.Module]) -> list[str]:
    """Register Weight Standardization on the convs that do not have it yet; their names."""
    changed = []
    for name, conv in convs.items():
        if parametrize.is_parametrized(conv, "weight") and any(
                isinstance(p, WeightStandardization) for p in conv.parametrizations.weight):
            continue
        weight_standardization(conv)
        changed.append(name)
    return changed


def _check_fan_in(convs: dict[str, nn.Module]) -> None:
    for name, conv in convs.items():
        if conv.weight[0].numel() < 2:
            raise ConversionError(f"{name}: weight standardization needs fan-in > 1, got a {type(conv).__name__} "
                                  f"with weight shape {tuple(conv.weight.shape)}")


def _to_ws(model: nn.Module, build: Builder, types: tuple[type, ...], what: str) -> list[str]:
    targets = _batchnorms(model, types)
    if not targets:
        return []
    convs = _feeding_convs(model, targets, f"{what} needs the dataflow to find the convolution feeding each "
                                           "BatchNorm")
    _check_fan_in(convs)
    plan = _plan(model, targets, build)
    return _swap(model, plan) + _standardize_convs(convs)


def _check_groups(name: str, num_features: int, num_groups: int) -> None:
    if num_features % num_groups:
        raise ConversionError(f"{name}: num_groups={num_groups} does not divide its {num_features} channels")


def to_gn_ws(model: nn.Module, num_groups: int = 32) -> list[str]:
    """Replace every BatchNorm with ``nn.GroupNorm(num_groups, C)`` (the BatchNorm's eps, affine, weight and
    bias carried over) and register Weight Standardization on the convolution that feeds each one; in
    place, returns the changed names (norms, then convolutions). A BatchNorm fed by anything else than a
    convolution used only there is swapped without WS; ``num_groups`` must divide every channel count."""
    def build(name: str, bn: nn.Module) -> nn.Module:
        _check_groups(name, bn.num_features, num_groups)
        new = _like(bn, nn.GroupNorm(num_groups, bn.num_features, eps=bn.eps, affine=bn.affine))
        _copy_state(name, bn, new, ("weight", "bias"))
        return new
    return _to_ws(model, build, BATCHNORMS, "to_gn_ws")


def to_bcn_ws(model: nn.Module, num_groups: int = 32, **kwargs: Any) -> list[str]:
    """Replace every ``BatchNorm2d`` with :class:`~normlab.layers.BatchChannelNorm2d` (``kwargs`` go to it;
    the BatchNorm's eps, weight, bias and running statistics carried over as the batch stage's) and
    register Weight Standardization on the convolution that feeds each one; in place, returns the changed
    names. ``num_groups`` must divide every channel count."""
    def build(name: str, bn: nn.Module) -> nn.Module:
        _check_groups(name, bn.num_features, num_groups)
        new = _like(bn, BatchChannelNorm2d(bn.num_features, num_groups=num_groups,
                                           **{"eps": bn.eps, **kwargs}))
        _copy_state(name, bn, new, BatchChannelNorm2d.batchnorm_state)
        return new
    return _to_ws(model, build, (nn.BatchNorm2d,), "to_bcn_ws")


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def to_alpha_bn(model: nn.Module, alpha: float = 0.9) -> list[str]:
    """alpha-BN in place: every BatchNorm becomes ``AlphaBatchNorm.from_batchnorm(bn, alpha)`` and every
    :class:`~normlab.layers.AlphaBatchNorm` already there gets ``alpha``; returns those names. In eval mode
    the model then normalizes by ``alpha * source + (1 - alpha) * test-batch`` statistics; at ``alpha=1`` it
    computes exactly what it did. Raises, model untouched, for a BatchNorm without running statistics."""
    _check_alpha(alpha)
    targets = _batchnorms(model)
    plan = _plan(model, targets, lambda name, bn: AlphaBatchNorm.from_batchnorm(bn, alpha=alpha))
    existing = [name for name, m in model.named_modules() if isinstance(m, AlphaBatchNorm)]
    for name in existing:
        model.get_submodule(name).alpha = alpha
    return _swap(model, plan) + existing


def _unknown_batch_statistics(model: nn.Module) -> Iterator[str]:
    for name, module in model.named_modules():
        if isinstance(module, BATCH_STATISTICS_LAYERS) and type(module) not in BATCH_STATISTICS_LAYERS:
            yield f"{name} ({type(module).__name__})"


def sync_norms(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> list[str]:
    """Make every batch-statistics layer of ``model`` reduce its statistics over ``process_group`` (None =
    the default group), in place; returns the changed names. torch's BatchNorms become
    ``AlphaBatchNorm.from_batchnorm(bn, alpha=1.0)``, which is BatchNorm in train and eval mode and runs on
    CPU (gloo) as on GPU, unlike ``nn.SyncBatchNorm``; normlab's layers in
    :data:`BATCH_STATISTICS_LAYERS` get ``process_group`` set. Raises, model untouched, for a BatchNorm
    subclass or a subclass of one of normlab's layers (their own forward is unknown), and for a BatchNorm
    without running statistics."""
    unknown = list(_unknown_batch_statistics(model))
    if unknown:
        raise ConversionError(f"{', '.join(unknown)}: subclass of a normlab batch-statistics layer; its forward "
                              "may not reduce its statistics, so sync_norms does not convert it")
    plan = _plan(model, _batchnorms(model), lambda name, bn: AlphaBatchNorm.from_batchnorm(bn, alpha=1.0))
    for new in plan.values():
        new.process_group = process_group
    existing = [name for name, m in model.named_modules() if type(m) in BATCH_STATISTICS_LAYERS]
    for name in existing:
        model.get_submodule(name).process_group = process_group
    return _swap(model, plan) + existing
