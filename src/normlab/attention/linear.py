"""Linear attention (the kernelised baseline) and the linear-time core that NaLa attention shares.

Paper: Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive Transformers with
Linear Attention", ICML 2020, arXiv:2006.16236, official code: idiap/fast-transformers.

With a non-negative feature map phi (``elu(x) + 1`` in the paper, ``relu`` as the second baseline of the
NaLaFormer sheet), attention row n is ``A_nm = phi(q_n).phi(k_m) / sum_m' phi(q_n).phi(k_m')``, computed
in O(N d^2) without forming A:

    non-causal:  o_n = phi(q_n) (1/N sum_m phi(k_m) v_m^T) / (phi(q_n) . (1/N sum_m phi(k_m)) + eps)
    causal:      o_n = phi(q_n) (1/n sum_{m<=n} phi(k_m) v_m^T) / (phi(q_n) . (1/n sum_{m<=n} phi(k_m)) + eps)

``eps`` is added to the mean-normalised denominator, as in the official NaLaFormer code (its ``z``); the
paper adds 1e-6 to the sum, which is the same form with ``eps * n``. The 1/N and 1/n cancel otherwise.

The causal form runs chunk-wise (chunks of ``CHUNK_SIZE`` tokens): inside a chunk a masked C x C product,
across chunks an exclusive prefix sum (``cumsum``) of the per-chunk ``phi(k)^T v`` states, so time and memory
stay linear in N with no loop over tokens or chunks and no N x N tensor (the recurrence of the paper's
Section 3.4, evaluated in parallel).

Everything is computed in float32 for float16/bfloat16 input (as the official NaLaFormer code casts to
float) and returned in the input dtype; float64 stays float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validation import FLOAT_DTYPES
from ..functional import compute_dtype

#: tokens per chunk of the causal form: the C x C intra-chunk products cost O(N C d), the chunk states
#: O(N d^2 / C) memory.
CHUNK_SIZE = 64

FEATURE_MAPS = ("elu", "relu")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> None:
    """``ValueError`` naming the shapes unless ``q: (..., N_q, d)``, ``k: (..., N, d)`` and ``v: (..., N, d_v)``
    share their leading dims, with ``N_q = N`` when ``causal``, and every length is >= 1; ``TypeError`` unless
    all three are floating tensors of one dtype. Skipped while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., N, d), got {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"expected q (..., N_q, d), k (..., N, d) and v (..., N, d_v) with the same leading "
                         f"dims, got {shapes}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {shapes}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError("sequence length must be positive")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got {shapes}")


def check_positive(name: str, value: float) -> None:
    """``ValueError`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def kernelized_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float, causal: bool,
                         phi_q_den: torch.Tensor | None = None, phi_k_den: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """``o_n = phi_q(n) mean_m[phi_k(m) v_m^T] / (phi_q_den(n) . mean_m phi_k_den(m) + eps)`` over all m
    (``causal=False``) or m <= n (``causal=True``, chunk-wise). The denominator features default to the
    numerator's (they differ only where NaLa rotates the numerator's with RoPE). Inputs are already in the
    compute dtype; shapes ``(..., N, f)`` and ``v`` ``(..., N, d_v)``."""
    if phi_q_den is None:
        phi_q_den, phi_k_den = phi_q, phi_k
    n = phi_k.shape[-2]
    if not causal:
        kv = (phi_k.transpose(-2, -1) @ v) / n
        den = phi_q_den @ phi_k_den.mean(-2).unsqueeze(-1) + eps
        return (phi_q @ kv) / den
    size = min(CHUNK_SIZE, n)
    chunks = -(-n // size)
    pad = chunks * size - n  # zero tokens at the end: causal rows never see them, and they are dropped

    def split(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, pad)).unflatten(-2, (chunks, size))

    q_c, k_c, v_c = split(phi_q), split(phi_k), split(v)
    mask = torch.ones(size, size, dtype=torch.bool, device=v.device).tril()
    scores = (q_c @ k_c.transpose(-2, -1)).masked_fill(~mask, 0.0)
    state = k_c.transpose(-2, -1) @ v_c  # (..., chunks, f, d_v): each chunk's sum of phi_k v^T
    state = F.pad(state.cumsum(-3)[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # exclusive prefix over chunks
    num = scores @ v_c + q_c @ state
    if phi_q_den is phi_q:
        den_scores = scores
        qd_c, kd_c = q_c, k_c
    else:
        qd_c, kd_c = split(phi_q_den), split(phi_k_den)
        den_scores = (qd_c @ kd_c.transpose(-2, -1)).masked_fill(~mask, 0.0)
    ksum = F.pad(kd_c.sum(-2).cumsum(-2)[..., :-1, :], (0, 0, 1, 0))  # (..., chunks, f), exclusive
    den = den_scores.sum(-1, keepdim=True) + qd_c @ ksum.unsqueeze(-1)
    count = torch.arange(1, chunks * size + 1, device=v.device, dtype=v.dtype).view(chunks, size, 1)
    out = num / (den + eps * count)
    return out.flatten(-3, -2)[..., :n, :]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu",
                     causal: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with ``phi = elu(x) + 1`` (Katharopoulos et al.) or ``phi = relu(x)``.

    ``q: (..., N_q, d)``, ``k: (..., N, d)``, ``v: (..., N, d_v)``; returns ``(..., N_q, d_v)`` in the input
    dtype. No 1/sqrt(d) scale (the feature map replaces the softmax). ``causal=True`` (N_q = N) attends to
    m <= n only.
    """
    check_qkv(q, k, v, causal=causal)
    check_positive("eps", eps)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; valid: {list(FEATURE_MAPS)}")
    dtype = compute_dtype(q.dtype)
    phi = (lambda x: F.elu(x) + 1) if feature_map == "elu" else F.relu
    out = kernelized_attention(phi(q.to(dtype)), phi(k.to(dtype)), v.to(dtype), eps, causal)
    return out.to(q.dtype)
