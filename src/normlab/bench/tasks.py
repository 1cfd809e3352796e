"""Shared data and reference models of the claim checks: everything is generated or ships with a package.

- :func:`char_corpus`: the Python standard library's own ``.py`` sources as a character stream.
- :func:`digits` / :func:`corrupt_digits`: scikit-learn's 8x8 digits with generated noise, shifts, masks.
- :class:`SaliencyCNN` / :func:`train_saliency_cnn`: the trained digits CNN the saliency checks explain.
- :class:`DigitsCNN`: the small CNN of the batch-statistics checks, with swappable norm+activation slots.
- :class:`TinyTransformer`: a small nanoGPT-style transformer with swappable norm slots, Pre- or Post-LN.
- :class:`DigitsDenoiser` / :func:`train_digits_ddpm`: a tiny class-conditional epsilon-prediction DDPM on the
  digits (label :data:`DIGITS_NULL_LABEL` is the unconditional one of classifier-free guidance), and
  :func:`digits_classifier_predict`, the digit classifier that scores its samples.
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


class DigitsCNN(nn.Module):
    """The small CNN of the batch-statistics claim checks (evonorm, bcn_ws, adab2n) on 8x8 digits:
    conv 3x3 (1->32) -> N -> conv 3x3 (32->64) -> N -> 2x2 max-pool -> conv 3x3 (64->64) -> N -> global
    average pool -> Linear(64->10). Convs are bias-free with padding 1; PyTorch default init.

    ``norm_act(channels)`` builds each N slot, a normalization *and* its activation (e.g.
    ``nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())``, or one EvoNorm layer, which is both), so
    :func:`normlab.convert.replace_batchnorm` and friends find the same BN -> ReLU pairs a user model has.
    """

    def __init__(self, norm_act: NormFactory, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), norm_act(32),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), norm_act(64),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), norm_act(64),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def bn_relu(channels: int) -> nn.Module:
    """``BatchNorm2d -> ReLU``, the baseline N slot of :class:`DigitsCNN`."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


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


@torch.fx.wrap
def _check_token_ids(idx: torch.Tensor, max_len: int) -> None:
    """``ValueError`` unless ``idx`` is ``(batch, seq_len <= max_len)``; one opaque call under ``torch.fx``
    tracing (so that conversions can trace the model), still checked when the traced graph runs."""
    if idx.dim() != 2 or idx.shape[1] > max_len:
        raise ValueError(f"expected token ids of shape (batch, seq_len <= {max_len}), got {tuple(idx.shape)}")


class TinyTransformer(nn.Module):
    """A small GPT-style language model (or sequence classifier) with swappable norms.

    ``norm_layer(d_model)`` builds every norm slot (default ``nn.LayerNorm``); slots receive
    ``pad_mask`` (B, T; True = padding, as in the norm layers and
    ``nn.MultiheadAttention``'s ``key_padding_mask``) and ``tau`` (a diffusion time, say) when given to
    ``forward``. ``placement="pre"`` adds a final norm before the head; ``"post"`` normalises after each
    residual add. ``tied_head=True`` shares the head with the token embedding.

    ``init="gpt"`` draws every weight matrix from nanoGPT's N(0, 0.02), the residual projections scaled by
    1/sqrt(2 n_layers); ``init="torch"`` gives every Linear and Embedding PyTorch's own default
    initialisation, which the prototypes behind the PowerNorm LM and the NaLa recall sheets used (with the
    GPT init the LM's LayerNorm arm lands 0.07 nats above its sheet and every recall arm stays at chance;
    with torch's defaults both tasks train as calibrated). The position embedding is N(0, 0.02) in both.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 max_len: int = 128, norm_layer: NormFactory = nn.LayerNorm, placement: str = "pre",
                 bias: bool = True, tied_head: bool = False, causal: bool = True, mlp_ratio: int = 4,
                 n_outputs: int | None = None, init: str = "gpt") -> None:
        super().__init__()
        if placement not in ("pre", "post"):
            raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
        if init not in ("gpt", "torch"):
            raise ValueError(f"init must be 'gpt' or 'torch', got {init!r}")
        self.max_len, self.init = max_len, init
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
        if self.init == "torch":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.reset_parameters()
            return
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * len(self.blocks)) if name.endswith(("proj.weight", "fc2.weight")) \
                    else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, tau: torch.Tensor | None = None
                ) -> torch.Tensor:
        _check_token_ids(idx, self.max_len)
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, pad_mask, tau)
        if self.norm_f is not None:
            x = _call_norm(self.norm_f, x, pad_mask, tau)
        return self.head(x)


# 2-D diffusion (td_layernorm.md; shared with the adaptive-guidance check): swiss-roll data and a DDPM schedule.

def swiss_roll(n: int, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """scikit-learn's ``make_swiss_roll(n, noise, random_state=seed)`` as 2-D points ``(n, 2)``, float32:
    its (x, z) coordinates divided by 5 (about [-2, 2.6] x [-2.3, 3])."""
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(n, noise=noise, random_state=seed)
    return torch.tensor(points[:, [0, 2]] / 5.0, dtype=torch.float32)


class DDPMSchedule:
    """The discrete DDPM forward process (Ho, Jain, Abbeel 2020) over steps ``n = 1..num_steps``.

    ``betas[n-1]`` rises linearly from ``beta_start`` to ``beta_end``, ``alphas = 1 - betas``,
    ``alphas_cumprod[n-1] = prod_{k <= n} alphas[k-1]`` (float64 tensors; index with ``n - 1``).
    ``q_sample(x0, n, noise) = sqrt(alphas_cumprod[n-1]) x0 + sqrt(1 - alphas_cumprod[n-1]) noise`` and
    ``time_input(n) = 2 n / num_steps - 1`` (the time input of DiMR's TD-LN, in (-1, 1]).
    """

    def __init__(self, num_steps: int = 200, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start!r}, "
                             f"beta_end={beta_end!r}")
        self.num_steps = num_steps
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    def sample_steps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch`` steps drawn uniformly from 1..num_steps (int64)."""
        return torch.randint(1, self.num_steps + 1, (batch,), generator=generator)

    def time_input(self, n: torch.Tensor) -> torch.Tensor:
        """``tau = 2 n / num_steps - 1`` (float32), see ``normlab.layers.td_layernorm.tdln_time_from_step``."""
        from ..layers.td_layernorm import tdln_time_from_step

        return tdln_time_from_step(n, self.num_steps)

    def q_sample(self, x0: torch.Tensor, n: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_n`` for clean ``x0`` of shape ``(B, ...)``, steps ``n`` (B,) in 1..num_steps and ``noise``."""
        if n.shape != x0.shape[:1] or noise.shape != x0.shape:
            raise ValueError(f"expected n of shape {tuple(x0.shape[:1])} and noise of shape {tuple(x0.shape)}, "
                             f"got n {tuple(n.shape)} and noise {tuple(noise.shape)}")
        if n.numel() and (n.min() < 1 or n.max() > self.num_steps):
            raise ValueError(f"steps must lie in 1..{self.num_steps}, got {n.min().item()}..{n.max().item()}")
        abar = self.alphas_cumprod.to(x0.device)[n - 1].reshape(-1, *(1,) * (x0.dim() - 1))
        return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise


# Character-level GPT of the SWAN and SinkGD claim checks (swan.md, gmn_sinkgd.md): separate q, k, v, o.

class QKVOAttention(nn.Module):
    """Causal multi-head self-attention with separate bias-free ``q``, ``k``, ``v`` readers and ``o`` writer
    (each a d x d matrix of its own, as matrix-wise optimizers see the LLaMA attention)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with a bias-free GELU MLP (4 d wide)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = QKVOAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, 4 * d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT-style causal LM: token and learned position embeddings, Pre-LN :class:`GPTBlock` s, a final
    LayerNorm and an untied bias-free head registered last. Every Linear is bias-free; every LayerNorm has
    gain and bias. PyTorch's default initialisation: it reproduces the sheets' calibration, while nanoGPT's
    N(0, 0.02) leaves AdamW at lr 1e-2 near the unigram loss for 100 steps. The defaults are the SWAN/SinkGD
    claim-check model: 468,224 parameters."""

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.shape[1] > self.context:
            raise ValueError(f"expected token ids of shape (batch, seq_len <= {self.context}), got "
                             f"{tuple(idx.shape)}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# Saliency checks (normgrad.md, cf_cam.md): one small trained CNN on the digits, shared by both sheets.

SALIENCY_SPLITS = {"train": (0, 1400), "val": (1400, 1500), "test": (1500, 1600), "heldout": (1400, 1797)}


class SaliencyCNN(nn.Module):
    """conv 3x3 (1->16, p1) -> ReLU -> conv 3x3 (16->32, p1) -> ReLU -> global average pool -> Linear(32->10),
    the CNN of the NormGrad and CF-CAM claim checks. The ReLUs are modules of their own (``relu1``,
    ``relu2``), not in place, so that the tensor the pooling reads (``relu2``'s output, 8x8 on the digits)
    can be hooked; PyTorch's default initialisation."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def saliency_digits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """All 1,797 digits ((N, 1, 8, 8) in [0, 1], labels) permuted by ``seed`` and cut as the saliency sheets
    say: ``train`` = the first 1,400, ``val`` = the next 100, ``test`` = the 100 after those, ``heldout`` =
    all 397 after the first 1,400 (so ``heldout[:100]`` is ``val``: CF-CAM's "first 100 held-out images")."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return {name: (x[perm[lo:hi]], y[perm[lo:hi]]) for name, (lo, hi) in SALIENCY_SPLITS.items()}


def train_saliency_cnn(seed: int, epochs: int = 15, *, batch_size: int = 64, lr: float = 3e-3
                       ) -> tuple[SaliencyCNN, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A :class:`SaliencyCNN` trained on ``saliency_digits(seed)["train"]`` with Adam (lr 3e-3), batch 64,
    ``epochs`` epochs, a fresh shuffle per epoch; returned in eval mode with the splits. Initialisation and
    shuffles come from ``seed`` only (the global RNG is forked, so the caller's stream is untouched)."""
    splits = saliency_digits(seed)
    x, y = splits["train"]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SaliencyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), splits


# Class-conditional DDPM on the digits (adaptive_guidance.md): data, denoiser, training, digit classifier.

DIGITS_NULL_LABEL = 10  # the "no label" class of classifier-free guidance


def digits_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as flat 64-d float32 vectors ``pixels / 8 - 1`` in [-1, 1], and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (torch.tensor(data.data / 8.0 - 1.0, dtype=torch.float32),
            torch.tensor(data.target, dtype=torch.long))


class DigitsDenoiser(nn.Module):
    """The epsilon-prediction MLP of the adaptive-guidance check: ``e = label_emb(c) + time_emb(n - 1)``
    (both 128-d; 11 labels, the last one the null label; one learned vector per step ``n = 1..num_steps``),
    then ``[x_n, e]`` (192-d) -> 256 -> 256 -> 64 with SiLU. ``forward(x, n, labels)``: ``x`` (B, 64),
    ``n`` int64 (B,) steps, ``labels`` int64 (B,) in 0..10 (or one int for the whole batch)."""

    def __init__(self, num_steps: int = 100, dim: int = 64, emb: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.label_emb = nn.Embedding(DIGITS_NULL_LABEL + 1, emb)
        self.time_emb = nn.Embedding(num_steps, emb)
        self.net = nn.Sequential(nn.Linear(dim + emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, n: torch.Tensor, labels: torch.Tensor | int) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=x.device).expand(x.shape[0])
        e = self.label_emb(labels) + self.time_emb(n.to(x.device) - 1)
        return self.net(torch.cat([x, e], 1))


def train_digits_ddpm(seed: int, steps: int = 2500, *, num_steps: int = 100, batch_size: int = 256,
                      lr: float = 1e-3, label_dropout: float = 0.2
                      ) -> tuple[DigitsDenoiser, DDPMSchedule]:
    """A :class:`DigitsDenoiser` trained on :func:`digits_pixels` with the epsilon loss of DDPM (linear betas
    1e-4..0.05 over ``num_steps``): each Adam step (lr 1e-3) draws ``batch_size`` digits with replacement,
    uniform steps and noise, and replaces each label by the null label with probability ``label_dropout``.
    Everything comes from ``seed`` (the global RNG is forked). Returned in eval mode with its schedule."""
    x, y = digits_pixels()
    schedule = DDPMSchedule(num_steps, 1e-4, 0.05)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsDenoiser(num_steps)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        n = schedule.sample_steps(batch_size, gen)
        noise = torch.randn(batch_size, x.shape[1], generator=gen)
        drop = torch.rand(batch_size, generator=gen) < label_dropout
        labels = torch.where(drop, DIGITS_NULL_LABEL, y[idx])
        loss = F.mse_loss(model(schedule.q_sample(x[idx], n, noise), n, labels), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), schedule


@lru_cache(maxsize=1)
def _digits_logreg():
    from sklearn.linear_model import LogisticRegression

    x, y = digits_pixels()
    return LogisticRegression(max_iter=5000).fit(x.numpy(), y.numpy())


def digits_classifier_predict(x: torch.Tensor) -> torch.Tensor:
    """Labels predicted for flat 64-d images in the :func:`digits_pixels` scaling by a scikit-learn
    ``LogisticRegression(max_iter=5000)`` fitted once on all 1,797 real digits (the quality judge of
    generated digits)."""
    if x.dim() != 2 or x.shape[1] != 64:
        raise ValueError(f"expected images of shape (N, 64), got {tuple(x.shape)}")
    return torch.as_tensor(_digits_logreg().predict(x.detach().double().numpy()), dtype=torch.long)
