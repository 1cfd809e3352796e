"""Weight surgery shared by the equivalence conversions: fold a norm's affine into the layers that read
its output, recentre the layers that write into a residual stream, and compress a zero-mean stream.

Layer kinds and the axis each helper works on:

============================  =================  ===============  ==========================
kind                          weight shape       input axis       output axis
============================  =================  ===============  ==========================
``nn.Linear``                 ``(out, in)``      1                0
Hugging Face ``Conv1D``       ``(in, out)``      0                1
``nn.MultiheadAttention``     ``in_proj (3E, E)``  1 (q, k, v)    (reader only)
``nn.Embedding`` / Parameter  ``(..., d)``       -                last
``nn.ConvNd`` (patch embed)   ``(out, in, *k)``  -                0
============================  =================  ===============  ==========================

Folding a norm's gain ``g`` and bias ``b`` into a reader ``y = W z + c`` (Jiang et al. 2023, Step 0):
``W' = W * g[None, :]``, ``c' = c + W b`` (a bias is created on a reader that has none). An
``nn.MultiheadAttention`` reader is taken to read the norm output as query, key and value
(self-attention), so all its in-projections are folded. Hugging Face's ``Conv1D`` is recognised by
its class name and its ``(nx, nf)`` weight, so ``transformers`` is never imported.

:func:`fuse_norms` removes, in place, the normalization ops of an inference model whose norms are
fixed per-channel affine maps in eval mode: every module with an ``inference_affine() -> (scale, shift)``
method (normlab's :class:`~normlab.UnifiedNorm` and :class:`~normlab.PowerNorm`; Yang et al. 2022,
arXiv:2208.01313, fold UN into the adjacent linear layer this way). It finds the layers that read each
norm from the model's dataflow (``torch.fx`` symbolic tracing of ``model(x)`` with every other argument at
its default, norms and ``nn.Linear`` kept as leaves). A norm whose output is read only by ``nn.Linear``
calls, each taking exactly that tensor, each Linear called only there and holding parameters no other
module shares, is folded into them (``W' = W * scale[None, :]``, ``c' = c + W shift``) and replaced by
:class:`FoldedNorm` (the identity); reads of the output's metadata (``.shape``, ``.size()``, ``.dim()``,
``.dtype``, ``.device``) do not count, since folding changes none of them. Every other norm (a post-norm
output that also feeds the residual, a final norm feeding a pooling, a norm the traced call never
reaches) becomes :class:`ChannelAffine`, the same map with no statistics. Both replacements take the
``pad_mask`` / ``tau`` keywords a norm slot may be called with, so the model keeps its forward.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
from torch import nn

from ..functional import compute_dtype

__all__ = [
    "ChannelAffine", "ConversionError", "FoldedNorm", "ZeroMean", "compress_reader_", "compress_writer_", "fold_affine_",
    "fold_norm_affine", "fuse_norms", "is_conv1d", "reader_in_features", "recentre_output_", "writer_out_features",
    "writer_tensors",
]


class ConversionError(ValueError):
    """A model, or one of its modules, that a conversion cannot convert exactly (the model is untouched)."""


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (a Linear with a transposed ``(in, out)`` weight)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and tuple(weight.shape) == (getattr(module, "nx", weight.shape[0]), module.nf))


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        return "conv"
    return ""


def _mha_in_weights(mha: nn.MultiheadAttention) -> list[str]:
    return ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def reader_in_features(module: nn.Module) -> int:
    """The input width of a reader; ``TypeError`` for a module that is not a supported reader."""
    kind = _kind(module)
    if kind == "linear":
        return module.in_features
    if kind == "conv1d":
        return module.weight.shape[0]
    if kind == "mha":
        return module.embed_dim
    raise TypeError(f"{type(module).__name__} is not a reader normlab can fold into or compress "
                    "(nn.Linear, Hugging Face Conv1D, nn.MultiheadAttention)")


@torch.no_grad()
def fold_affine_(readers: list[nn.Module], weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Fold ``z -> z * weight + bias`` into every reader of ``z``, in place: ``W' = W * weight[None, :]``,
    ``c' = c + W bias`` (computed from the unscaled ``W``). Readers without a bias get one when ``bias``
    is given. ``weight``/``bias`` may be None (identity gain / zero bias)."""
    for reader in readers:
        reader_in_features(reader)
    for reader in readers:
        kind = _kind(reader)
        if kind == "mha":
            names = _mha_in_weights(reader)
            shift = None if bias is None else torch.cat([getattr(reader, n) @ bias.to(getattr(reader, n))
                                                         for n in names])
            for n in names:
                w = getattr(reader, n)
                if weight is not None:
                    w.mul_(weight.to(w)[None, :])
            if shift is not None:
                if reader.in_proj_bias is None:
                    reader.in_proj_bias = nn.Parameter(shift)
                else:
                    reader.in_proj_bias.add_(shift)
            continue
        w = reader.weight
        g = None if weight is None else weight.to(w)
        b = None if bias is None else bias.to(w)
        shift = None
        if kind == "linear":
            shift = None if b is None else w @ b
            if g is not None:
                w.mul_(g[None, :])
        else:  # conv1d: (in, out)
            shift = None if b is None else b @ w
            if g is not None:
                w.mul_(g[:, None])
        if shift is not None:
            if reader.bias is None:
                reader.bias = nn.Parameter(shift)
            else:
                reader.bias.add_(shift)


@torch.no_grad()
def fold_norm_affine(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Move ``norm.weight`` / ``norm.bias`` into every reader of the norm's output (see
    :func:`fold_affine_`); afterwards the norm's gain is 1 and its bias 0, so the model computes the same
    function and the norm can be swapped for one without affine."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    fold_affine_(readers, None if weight is None else weight.detach().clone(),
                 None if bias is None else bias.detach().clone())
    if weight is not None:
        weight.fill_(1)
    if bias is not None:
        bias.zero_()


def writer_tensors(writer: nn.Module | nn.Parameter) -> list[tuple[str, int]]:
    """``[(tensor name, output axis)]`` of a writer: the tensors whose output axis gets recentred.
    An ``nn.Parameter`` (position table, CLS token) is named ``""``; ``TypeError`` for other modules."""
    if isinstance(writer, torch.Tensor):
        return [("", -1)]
    kind = _kind(writer)
    if kind in ("linear", "conv"):
        axes = [("weight", 0)]
    elif kind == "conv1d":
        axes = [("weight", 1)]
    elif kind == "embedding":
        axes = [("weight", -1)]
    else:
        raise TypeError(f"{type(writer).__name__} is not a writer normlab can recentre "
                        "(nn.Linear, Hugging Face Conv1D, nn.Embedding, nn.ConvNd or an nn.Parameter)")
    if getattr(writer, "bias", None) is not None:
        axes.append(("bias", 0))
    return axes


def writer_out_features(writer: nn.Module | nn.Parameter) -> int:
    """The width a writer adds to the stream."""
    if isinstance(writer, torch.Tensor):
        return writer.shape[-1]
    name, axis = writer_tensors(writer)[0]
    return getattr(writer, name).shape[axis]


@torch.no_grad()
def recentre_output_(writer: nn.Module | nn.Parameter) -> None:
    """Subtract the mean along the output axis from a writer's weight and bias, in place, so that what it
    adds to the stream has zero mean for every input (Step 1)."""
    for name, axis in writer_tensors(writer):
        t = writer if name == "" else getattr(writer, name)
        t.sub_(t.mean(axis, keepdim=True))


class ZeroMean(nn.Module):
    """Parametrization ``X - X.mean(dim)``: a writer recentred on the fly (the official code's
    ``LinearZeroMeanOutput``), so that its raw parameter keeps the Pre-LN gradient and update."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(self.dim, keepdim=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _narrow(t: torch.Tensor, axis: int) -> nn.Parameter:
    return nn.Parameter(t.detach().narrow(axis, 0, t.shape[axis] - 1).clone(), requires_grad=t.requires_grad)


@torch.no_grad()
def compress_writer_(writer: nn.Module) -> None:
    """Drop the last output feature of a recentred writer module (Step 3): a zero-mean d-vector is kept
    as its first d-1 coordinates. For an ``nn.Parameter`` writer use ``t[..., :-1]`` on its owner."""
    kind = _kind(writer)
    for name, axis in writer_tensors(writer):
        setattr(writer, name, _narrow(getattr(writer, name), axis))
    if kind == "linear":
        writer.out_features -= 1
    elif kind == "conv1d":
        writer.nf -= 1
    elif kind == "embedding":
        writer.embedding_dim -= 1
    else:
        writer.out_channels -= 1


@torch.no_grad()
def compress_reader_(reader: nn.Module) -> None:
    """Make a reader of a zero-mean d-vector read its first d-1 coordinates (Step 3):
    ``W~ = W[:, :-1] - W[:, -1:]`` (the dropped coordinate is minus the sum of the others); bias kept.
    ``TypeError`` for ``nn.MultiheadAttention``, whose ``embed_dim`` is both its input and output width."""
    kind = _kind(reader)
    if kind == "linear":
        w = reader.weight
        reader.weight = nn.Parameter(w[:, :-1] - w[:, -1:], requires_grad=w.requires_grad)
        reader.in_features -= 1
    elif kind == "conv1d":
        w = reader.weight
        reader.weight = nn.Parameter(w[:-1] - w[-1:], requires_grad=w.requires_grad)
        if hasattr(reader, "nx"):
            reader.nx -= 1
    elif kind == "mha":
        raise TypeError("nn.MultiheadAttention cannot read a d-1 wide stream: its embed_dim is both the query "
                        "width and the attention output width")
    else:
        reader_in_features(reader)


class ChannelAffine(nn.Module):
    """``y = x * weight + bias`` over the last dim: a norm's fixed eval-mode map with no statistics left.
    ``forward(x, pad_mask=None, tau=None)`` takes (and ignores) a norm slot's extra inputs; the arithmetic
    runs in float32 for float16/bfloat16 input, as in the norms it replaces."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, requires_grad: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, tau: torch.Tensor | None = None
                ) -> torch.Tensor:
        dtype = compute_dtype(x.dtype)
        return torch.addcmul(self.bias.to(dtype), x.to(dtype), self.weight.to(dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class FoldedNorm(nn.Module):
    """The identity left where a norm was folded into every layer that reads it;
    ``forward(x, pad_mask=None, tau=None)`` takes (and ignores) a norm slot's extra inputs."""

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, tau: torch.Tensor | None = None
                ) -> torch.Tensor:
        return x


_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
_METADATA_METHODS = frozenset({"size", "dim"})


def _fusable(module: nn.Module) -> bool:
    return callable(getattr(type(module), "inference_affine", None))


def _reads_metadata_only(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


class _NormTracer(fx.Tracer):
    """Keeps the norms and every ``nn.Linear`` (besides torch's own leaves) as single call nodes."""

    def __init__(self, norms: set[int]) -> None:
        super().__init__()
        self.norms = norms

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.norms or isinstance(m, nn.Linear) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, norms: dict[str, nn.Module], error, purpose: str) -> fx.Graph:
    """The dataflow graph of ``model(x)`` (other arguments at their defaults), ``norms`` kept as leaves;
    ``error`` naming the model and ``purpose`` (what the caller needs the graph for) if fx cannot trace."""
    params = inspect.signature(model.forward).parameters.values()
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    try:
        return _NormTracer({id(m) for m in norms.values()}).trace(model, concrete_args=concrete or None)
    except Exception as err:  # noqa: BLE001 -- any tracing failure means the dataflow is unknown
        raise error(f"<model> ({type(model).__name__}): torch.fx cannot trace its forward "
                    f"({type(err).__name__}: {err}); {purpose}") from err


def _owners(model: nn.Module) -> dict[int, set[int]]:
    """``id(parameter) -> {id(module) holding it}`` over the whole model."""
    out: dict[int, set[int]] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                out.setdefault(id(p), set()).add(id(mod))
    return out


def _linear_readers(model: nn.Module, graph: fx.Graph, norms: dict[str, nn.Module]
                    ) -> dict[str, list[str] | None]:
    """For each norm, the qualified names of the Linear layers it folds into, or None when it cannot fold."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    owners = _owners(model)
    out: dict[str, list[str] | None] = {}
    for name in norms:
        readers: list[str] = []
        foldable = bool(calls.get(name))
        for node in calls.get(name, []):
            for user in node.users:
                if _reads_metadata_only(user):
                    continue
                target = user.target if user.op == "call_module" else None
                module = model.get_submodule(target) if target is not None else None
                if (isinstance(module, nn.Linear) and user.args == (node,) and not user.kwargs
                        and len(calls[target]) == 1
                        and all(owners[id(p)] == {id(module)} for p in module.parameters(recurse=False))):
                    readers.append(target)
                else:
                    foldable = False
        out[name] = readers if foldable and readers else None
    return out


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return names


def fuse_norms(model: nn.Module) -> list[str]:
    """Fold every eval-mode norm with an ``inference_affine()`` (UnifiedNorm, PowerNorm without group
    scaling) into the ``nn.Linear`` layers that read it, in place; norms that cannot fold become
    :class:`ChannelAffine` (see the module docstring). Returns the qualified names it changed (norms and
    Linears). Raises :class:`~normlab.convert.ConversionError` (a ``ValueError``), leaving the model
    untouched, for a norm still in training mode, a norm with no fixed affine (PowerNorm with group
    scaling) or a model ``torch.fx`` cannot trace. The fused model computes the same function in eval
    mode up to floating-point rounding."""
    norms = {name: m for name, m in model.named_modules() if _fusable(m)}
    if not norms:
        return []
    affines = {}
    for name, norm in norms.items():
        if norm.training:
            raise ConversionError(f"{name}: {type(norm).__name__} is in training mode, where it normalises by "
                                  "batch statistics; call model.eval() before fuse_norms")
        try:
            affines[name] = norm.inference_affine()
        except ValueError as err:
            raise ConversionError(f"{name}: {err}") from None
    readers = _linear_readers(model, _trace(model, norms, ConversionError,
                                              "fuse_norms needs the dataflow to find the Linear layers that read each norm"), norms)
    changed: list[str] = []
    for name, norm in norms.items():
        scale, shift = affines[name]
        linears = readers[name]
        if linears is None:
            requires_grad = any(p.requires_grad for p in norm.parameters())
            changed += _replace(model, norm, ChannelAffine(scale, shift, requires_grad))
        else:
            fold_affine_([model.get_submodule(n) for n in linears], scale, shift)
            changed += _replace(model, norm, FoldedNorm()) + linears
    return changed
