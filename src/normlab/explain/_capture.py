"""Shared machinery of the saliency methods: layer lookup, activation/gradient capture, targets, scaling.

Every saliency method in :mod:`normlab.explain` explains the OUTPUT of one or more modules of a classifier
(``model(x) -> logits (N, classes)``) for a target class per sample, and returns maps ``(N, 1, H, W)`` at the
input's resolution. The pieces they share live here:

- :func:`resolve_layer` / :func:`resolve_layers`: a layer given by its qualified name
  (``model.named_modules()``) or as the module object; ``ValueError`` if it is not part of the model.
- :class:`LayerCapture`: a context manager that puts the model in eval mode (restoring every module's own
  ``training`` flag on exit), registers on each layer a forward hook that stores the layer's output
  (detached and CLONED, so an in-place ReLU after the layer cannot overwrite it) and, on that output, a
  tensor hook that stores its gradient (registered before any in-place op, so it receives the gradient of
  the value the forward hook stored). Every hook is removed on exit, also when an exception escapes.
  :meth:`LayerCapture.run` does one forward and one ``torch.autograd.grad`` of the score (never
  ``.backward()``: no parameter's ``.grad`` is touched) and returns the logits, the targets, the
  activations and their gradients; a layer whose output is not 4-D ``(N, C, h, w)`` raises ``ValueError``.
- :func:`select_target` / :func:`target_score`: ``target=None`` means the argmax logit per sample, an
  ``int`` the same class for every sample, a LongTensor ``(N,)`` one class per sample; the score is
  ``sum_n logits[n, t_n]`` (the raw logit, not the softmax). In eval mode samples do not interact, so the
  gradient of this sum is, per sample, the gradient of that sample's own logit.
- :func:`upsample`: bilinear to the input size, ``align_corners=False`` (``F.interpolate``).
- :func:`normalize_minmax` / :func:`normalize_max`: per-image ``(m - min) / (max - min)`` and ``m / max``;
  a constant map (resp. a map with ``max <= 0``) becomes zeros instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._model_state import eval_mode

LayerSpec = str | nn.Module


def resolve_layer(model: nn.Module, layer: LayerSpec) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of ``layer`` (a name from ``model.named_modules()`` or a submodule)."""
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            names = [n for n in modules if n]
            raise ValueError(f"layer {layer!r} is not in the model; valid names: {names}")
        return layer, modules[layer]
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"layer {type(layer).__name__} (id {id(layer):#x}) is not a submodule of the model")
    raise TypeError(f"layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")


def resolve_layers(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> list[tuple[str, nn.Module]]:
    """:func:`resolve_layer` for one layer or a non-empty sequence of distinct layers."""
    specs = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    if not specs:
        raise ValueError("layers must name at least one layer, got an empty sequence")
    resolved = [resolve_layer(model, spec) for spec in specs]
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"layers must be distinct, got {names}")
    return resolved


def check_images(x: torch.Tensor) -> None:
    """``TypeError``/``ValueError`` unless ``x`` is a floating-point batch ``(N, C, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected an input batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")


def select_target(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """The target class per sample as a LongTensor ``(N,)`` (None = argmax logit)."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)):
        raise TypeError(f"target must be None, an int or a LongTensor of shape (N,), got {type(target).__name__}")
    if isinstance(target, int):
        target = torch.full((n,), target, dtype=torch.long, device=logits.device)
    elif target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or \
            target.shape != (n,):
        raise ValueError(f"target tensor must be integer of shape ({n},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    target = target.to(device=logits.device, dtype=torch.long)
    if n and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"target classes must lie in 0..{classes - 1}, got {target.tolist()}")
    return target


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_n logits[n, target_n]``."""
    return logits.gather(1, target[:, None]).sum()


class LayerCapture:
    """Hooks on ``layers`` of ``model`` while the ``with`` block runs; see the module docstring.

    ``with LayerCapture(model, ["features.3"]) as cap: logits, target, acts, grads = cap.run(x, target)``.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> None:
        self.model = model
        self.layers = resolve_layers(model, layers)
        self._handles: list = []
        self._eval = None
        self._acts: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}

    def __enter__(self) -> LayerCapture:
        self._eval = eval_mode(self.model)
        self._eval.__enter__()
        try:
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._eval is not None:
            self._eval.__exit__(None, None, None)
            self._eval = None

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"layer {name!r} must output a 4-D tensor (N, C, h, w) with spatial dims, "
                                 f"got {shape}")
            if name in self._acts:
                raise ValueError(f"layer {name!r} ran more than once in one forward pass; hook a module "
                                 "that is called once")
            self._acts[name] = output.detach().clone()
            if output.requires_grad:
                output.register_hook(self._grad_hook(name))
        return hook

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self._grads[name] = grad.detach()
        return hook

    def run(self, x: torch.Tensor, target: int | torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One forward and one backward of the target logits: ``(logits, target (N,), acts, grads)``,
        ``acts[i]`` and ``grads[i]`` of shape ``(N, C_i, h_i, w_i)`` in the order of ``layers``."""
        if not self._handles:
            raise RuntimeError("LayerCapture.run must be called inside its `with` block")
        check_images(x)
        self._acts, self._grads = {}, {}
        x_in = x.detach().requires_grad_()
        with torch.enable_grad():
            logits = self.model(x_in)
            if logits.dim() != 2:
                raise ValueError(f"the model must return logits (N, classes), got {tuple(logits.shape)}")
            target = select_target(logits, target)
            score = target_score(logits, target)
            missing = [name for name, _ in self.layers if name not in self._acts]
            if missing:
                raise ValueError(f"layer(s) {missing} did not run in the model's forward pass")
            # Differentiating w.r.t. the input walks the whole graph, firing every tensor hook.
            torch.autograd.grad(score, x_in, allow_unused=True)
        names = [name for name, _ in self.layers]
        acts = [self._acts[name] for name in names]
        grads = [self._grads.get(name, torch.zeros_like(self._acts[name])) for name in names]
        self._acts, self._grads = {}, {}
        return logits.detach(), target, acts, grads


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is half precision (float16/bfloat16); float32/float64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, 1, h, w)`` maps to ``size`` (``align_corners=False``); a no-op at that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def normalize_minmax(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per image ``(m - min) / (max - min)``; zeros where ``max - min <= eps`` (a constant map)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.view_as(maps)


def normalize_max(maps: torch.Tensor) -> torch.Tensor:
    """Per image ``m / max``; zeros where ``max <= 0``."""
    flat = maps.flatten(1)
    hi = flat.max(dim=1, keepdim=True).values
    out = torch.where(hi > 0, flat / torch.where(hi > 0, hi, torch.ones_like(hi)), torch.zeros_like(flat))
    return out.view_as(maps)
