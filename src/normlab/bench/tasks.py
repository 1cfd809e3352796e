"""Shared data and reference models of the claim checks: everything is generated or ships with a package.

- :func:`char_corpus`: the Python standard library's own ``.py`` sources as a character stream.
- :func:`digits` / :func:`corrupt_digits`: scikit-learn's 8x8 digits with generated noise, shifts, masks.
- :class:`TinyTransformer`: a small nanoGPT-style transformer with swappable norm slots, Pre- or Post-LN.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCABS = {"ascii128": 128, "bytes": 256}


@lru_cache(maxsize=8)
def _stdlib_bytes(n_files: int) -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:n_files]
    if len(files) < n_files:
        raise ValueError(f"the standard library at {stdlib} has {len(files)} .py files, asked for {n_files}")
    return b"".join(p.read_bytes() for p in files)


def char_corpus(n_files: int = 60, vocab: str = "ascii128", split: str = "train",
                val_fraction: float = 0.1) -> torch.Tensor:
    """Token ids (int64) of the first ``n_files`` sorted top-level ``.py`` files of the stdlib.

    ``vocab="ascii128"`` clips bytes to 0..127 (non-ASCII bytes become 127), ``"bytes"`` keeps all 256.
    ``split`` is ``"train"`` (the first 1 - val_fraction), ``"val"`` (the rest) or ``"all"``.
    """
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; valid: {sorted(VOCABS)}")
    ids = torch.frombuffer(bytearray(_stdlib_bytes(n_files)), dtype=torch.uint8).long()
    if vocab == "ascii128":
        ids = ids.clamp_(max=127)
    cut = int(len(ids) * (1 - val_fraction))
    splits = {"train": ids[:cut], "val": ids[cut:], "all": ids}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(splits)}")
    return splits[split]


def char_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``(batch, seq_len)`` and next-character targets of the same shape."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = ids[idx]
    return windows[:, :-1], windows[:, 1:]


def digits(split: str = "train", *, test_fraction: float = 0.25, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as images ``(N, 1, 8, 8)`` in [0, 1] and int64 labels, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=data.target)
    chosen = {"train": idx_train, "test": idx_test}
    if split not in chosen:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(chosen)}")
    return x[chosen[split]], y[chosen[split]]


def corrupt_digits(images: torch.Tensor, kind: str, severity: float, seed: int = 0) -> torch.Tensor:
    """A generated covariate shift of digit images ``(N, 1, 8, 8)``.

    ``"noise"``: Gaussian noise of std ``severity``, clipped to [0, 1]; ``"shift"``: each image rolled by
    a random offset of up to ``round(severity)`` pixels per axis (zero fill); ``"mask"``: a random square of
    side ``round(severity)`` pixels set to 0 per image.
    """
    gen = torch.Generator().manual_seed(seed)
    n, size = images.shape[0], images.shape[-1]
    if kind == "noise":
        return (images + severity * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    k = int(round(severity))
    if kind == "shift":
        offsets = torch.randint(-k, k + 1, (n, 2), generator=gen)
        rows = (torch.arange(size)[None, :] - offsets[:, :1]).clamp(-1, size)
        cols = (torch.arange(size)[None, :] - offsets[:, 1:]).clamp(-1, size)
        valid = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
        gathered = images[torch.arange(n)[:, None, None], :, rows.clamp(0, size - 1)[:, :, None],
                          cols.clamp(0, size - 1)[:, None, :]].permute(0, 3, 1, 2)
        return gathered * valid[:, None]
    if kind == "mask":
        corner = torch.randint(0, size - k + 1, (n, 2), generator=gen)
        grid = torch.arange(size)
        inside_r = (grid[None] >= corner[:, :1]) & (grid[None] < corner[:, :1] + k)
        inside_c = (grid[None] >= corner[:, 1:]) & (grid[None] < corner[:, 1:] + k)
        return images * ~(inside_r[:, :, None] & inside_c[:, None, :])[:, None]
    raise ValueError(f"unknown corruption {kind!r}; valid: ['mask', 'noise', 'shift']")


NormFactory = Callable[[int], nn.Module]


def _call_norm(norm: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor | None, tau: torch.Tensor | None
               ) -> torch.Tensor:
    extra = {k: v for k, v in (("pad_mask", pad_mask), ("tau", tau)) if v is not None}
    return norm(x, **extra)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: one ``qkv`` reader, one ``proj`` writer."""

    def __init__(self, d_model: int, n_heads: int, bias: bool, causal: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None
        if pad_mask is not None:  # pad_mask: (B, T), True = padding (as in every normlab layer)
            mask = ~pad_mask[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``fc1`` reads, ``fc2`` writes."""

    def __init__(self, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; Post-LN: ``norm1(x + attn(x))``, ..."""

    def __init__(self, d_model: int, n_heads: int, norm_layer: NormFactory, placement: str, bias: bool,
                 causal: bool, mlp_ratio: int) -> None:
        super().__init__()
        self.placement = placement
        self.norm1 = norm_layer(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, bias, causal)
        self.norm2 = norm_layer(d_model)
        self.mlp = MLP(d_model, mlp_ratio * d_model, bias)

    def forward(self, x, pad_mask=None, tau=None):
        if self.placement == "pre":
            x = x + self.attn(_call_norm(self.norm1, x, pad_mask, tau), pad_mask)
            return x + self.mlp(_call_norm(self.norm2, x, pad_mask, tau))
        x = _call_norm(self.norm1, x + self.attn(x, pad_mask), pad_mask, tau)
        return _call_norm(self.norm2, x + self.mlp(x), pad_mask, tau)


class TinyTransformer(nn.Module):
    """A small GPT-style language model (or sequence classifier) with swappable norms.

    ``norm_layer(d_model)`` builds every norm slot (default ``nn.LayerNorm``); slots receive
    ``pad_mask`` (B, T; True = padding, as in the norm layers and
    ``nn.MultiheadAttention``'s ``key_padding_mask``) and ``tau`` (a diffusion time, say) when given to
    ``forward``. ``placement="pre"`` adds a final norm before the head; ``"post"`` normalises after each
    residual add. ``tied_head=True`` shares the head with the token embedding.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 max_len: int = 128, norm_layer: NormFactory = nn.LayerNorm, placement: str = "pre",
                 bias: bool = True, tied_head: bool = False, causal: bool = True, mlp_ratio: int = 4,
                 n_outputs: int | None = None) -> None:
        super().__init__()
        if placement not in ("pre", "post"):
            raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, norm_layer, placement, bias, causal, mlp_ratio)
                                    for _ in range(n_layers))
        self.norm_f = norm_layer(d_model) if placement == "pre" else None
        self.head = nn.Linear(d_model, n_outputs or vocab_size, bias=False)
        self.reset_parameters()
        if tied_head:
            if n_outputs not in (None, vocab_size):
                raise ValueError("a tied head needs n_outputs == vocab_size")
            self.head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_emb, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * len(self.blocks)) if name.endswith(("proj.weight", "fc2.weight")) \
                    else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, tau: torch.Tensor | None = None
                ) -> torch.Tensor:
        if idx.dim() != 2 or idx.shape[1] > self.max_len:
            raise ValueError(f"expected token ids of shape (batch, seq_len <= {self.max_len}), got "
                             f"{tuple(idx.shape)}")
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, pad_mask, tau)
        if self.norm_f is not None:
            x = _call_norm(self.norm_f, x, pad_mask, tau)
        return self.head(x)
