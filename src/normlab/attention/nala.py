"""NaLa: norm-aware linear attention.

Paper: Meng, Luo, Huo, Li, Wang, Li, Zhang, "NaLaFormer: Norm-Aware Linear Attention for Transformer Models",
2025, arXiv:2506.21137 (ICML 2026 version: "Norm x Direction: Restoring the Missing Query Norm in Vision Linear
Attention"); official code: ZacharyMeng/NaLaFormer, ``NaLaformer/NALA.py`` (``NormAwareLinearAttn``), which
this module follows where the paper's text could not be checked.

In linear attention the query norm cancels between numerator and normaliser, so attention cannot get
sharper for a larger ``||q||`` as softmax does. NaLa splits q into norm and direction and raises the
direction to a power that grows with the norm. Per head, for q, k in R^{N x d}:

    k <- k^key_power                                    (element-wise, odd: keeps the sign; default 3)
    r = ||q||_2,   p = power_scale * (power_offset + tanh(r))                  (p in [1.5, 4.5) by default)
    phi_q = [relu(q / r), relu(-q / r)]^p,   phi_k = [relu(k), relu(-k)]        (in R^{2d}, both >= 0)
    o_n = phi_q^R(n) (1/N sum_m phi_k^R(m) v_m^T) / (phi_q(n) . (1/N sum_m phi_k(m)) + eps)

so ``phi_q . phi_k = sum_i [q_i k_i > 0] (|q_i| / r)^p |k_i|^3``: coordinates where q and k disagree in sign
add nothing, the others are never negative. ``^R`` is the optional rotary embedding, applied to both halves
of the features in the numerator only (official code); without it, rows of the implied attention sum to 1.
Defaults (``power_scale=3``, ``power_offset=0.5``, ``key_power=3``, ``eps=1e-6``) are the official code's
constants. Causal mode (not in the paper or the code, for language models) uses the prefix sums over
m <= n with 1/n in place of 1/N, chunk-wise in linear time (:mod:`normlab.attention.linear`).

The block (:class:`NormAwareLinearAttention`) is the official one on a ``(B, N, C)`` token sequence:
``[q, k, v, g] = in_proj(x)``, heads of size C / num_heads, NaLa, heads merged, ``+ LePE(v)`` (a depthwise
k x k convolution of v seen as an H x W image), ``LayerNorm``, ``* SiLU(g)``, ``out_proj``. ``rope="2d"``
is the official 2-D RoPE (angles ``10000^-linspace(0, 1, d/4)``, each used twice, for the row and the
column index); ``rope="1d"`` is the standard RoPE of Su et al. (angles ``10000^(-2j/d)``) on the same
interleaved pairs. The official model always uses 2-D RoPE, LePE and the gate; here they are options
(``rope=None`` by default, as the sheet's API proposes) because a token sequence without an image shape has
none of them.

Deviations from the official code:
- An all-zero query gives a NaN there (0/0 in ``q / ||q||``); here ``||q||`` is floored at 1e-6 in the
  division, so the query's features are 0 and its output is 0 (and the gradients stay finite).
- Half-precision input: the kernel runs in float32 as in the official code, but the result is cast back to
  the input dtype before LePE and the LayerNorm (the official code keeps float32 up to ``out_proj``).
- The official default stages use 3, 6, 12, 24 heads in its base constructor but head size 64 in the
  registered variants (NALAFORMER_T: dims 64..512 with 1..8 heads); ``num_heads`` has no default here.

Speed (forward+backward at (B, heads, N, d) = (1, 4, N, 32), float32, against
``F.scaled_dot_product_attention``; ``normlab speed`` has the attention rows). The feature maps have
hand-written backwards (autograd's through a tensor-exponent ``pow`` and the sign split took 2-4x longer).
CPU time at 1 thread, interleaved medians on this project's shared 2-core machine: 0.59x SDPA at N=512,
0.18x at 2048, 0.045x at 8192; causal 0.49x SDPA ``is_causal`` at 2048. Wall-clock at 2 threads under a
load average of 8-12 the eager ratios were 1.2x, 2.2x and 0.20x (compiled with inductor: 3.6x, 0.94x,
0.25x): NaLa is a few dozen element-wise ATen ops each way, each a parallel region that stalls whenever
another process preempts one of its threads, where SDPA is one fused kernel each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import compute_dtype
from .linear import check_positive, check_qkv, kernelized_attention

#: floor of ``||q||`` in ``q / ||q||``: an all-zero query gets zero features instead of 0/0.
NORM_FLOOR = 1e-6
ROPE_BASE = 10000.0
ROPE_KINDS = (None, "1d", "2d")


def _split_signs(x: torch.Tensor) -> torch.Tensor:
    """``[relu(x), relu(-x)]`` along the last dim."""
    return torch.cat((x, -x), dim=-1).clamp_min(0)


def _check_powers(power_scale: float, power_offset: float, key_power: int) -> None:
    check_positive("power_scale", power_scale)
    check_positive("power_offset", power_offset)
    if isinstance(key_power, bool) or not isinstance(key_power, int) or key_power < 1 or key_power % 2 == 0:
        raise ValueError(f"key_power must be a positive odd integer, got {key_power!r}")


class _QueryFeatures(torch.autograd.Function):
    """``phi_q = b^p`` with ``b = [relu(u), relu(-u)]``, ``u = q / max(||q||, NORM_FLOOR)`` and
    ``p = s (o + tanh ||q||)``, with a hand-written backward: autograd's through ``pow`` with a tensor
    exponent evaluates ``pow`` again and masks ``log`` with ``where`` (slow on CPU): about 4x the time of this
    one forward+backward at (1, 4, 2048, 32), 1 thread.

    ``b`` is clamped at the dtype's smallest normal number instead of 0, which changes no value
    (``tiny^p`` underflows to 0 for p >= 1.5) and makes ``log b`` and ``phi / b`` finite, so that
    ``dL/db = g p phi / b``, ``dL/dp = sum(g phi log b)`` need no masks. Then ``dL/du = dL/db+ - dL/db-``,
    ``dp/dr = s (1 - tanh^2 r)``, ``dr/dq = q / r`` (0 at q = 0) and ``du/dq = (I - u u^T) / r`` where
    r >= NORM_FLOOR, ``I / NORM_FLOOR`` below it.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, power_scale: float, power_offset: float) -> torch.Tensor:
        r = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        tanh_r = torch.tanh(r)
        u = q / r.clamp_min(NORM_FLOOR)
        base = torch.cat((u, -u), dim=-1).clamp_min_(torch.finfo(q.dtype).tiny)
        phi = base.pow(power_scale * (power_offset + tanh_r))
        ctx.save_for_backward(u, base, phi, r, tanh_r)
        ctx.power_scale, ctx.power_offset = power_scale, power_offset
        return phi

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, base, phi, r, tanh_r = ctx.saved_tensors
        d = u.shape[-1]
        grad_phi = grad * phi
        grad_p = (grad_phi * base.log()).sum(-1, keepdim=True)
        grad_base = grad_phi.div_(base).mul_(ctx.power_scale * (ctx.power_offset + tanh_r))
        grad_u = grad_base[..., :d] - grad_base[..., d:]
        r_floor = r.clamp_min(NORM_FLOOR)
        grad_r = grad_p * ctx.power_scale * (1 - tanh_r.square())
        # u * coef collects the rank-one terms: -u (u . grad_u) / r above the floor, and dr/dq = u * r_floor / r
        along_u = torch.where(r >= NORM_FLOOR, (u * grad_u).sum(-1, keepdim=True), 0.0)
        coef = grad_r * torch.where(r > 0, r_floor / r, 0.0) - along_u / r_floor
        return grad_u.div_(r_floor).add_(u * coef), None, None


class _KeyFeatures(torch.autograd.Function):
    """``phi_k = [relu(k), relu(-k)]^key_power`` (= the split of ``k^key_power`` for odd powers) with a
    hand-written backward ``dL/dk = key_power (g+ b+^(key_power-1) - g- b-^(key_power-1))``: one product
    and one difference, where autograd's goes through pow, relu and cat backwards (2-4x the time)."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, key_power: int) -> torch.Tensor:
        base = _split_signs(k)
        lower = base.pow(key_power - 1) if key_power > 1 else (base > 0).to(base.dtype)  # 0^0 would be 1
        ctx.save_for_backward(lower)
        ctx.key_power = key_power
        return lower * base

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (lower,) = ctx.saved_tensors
        d = lower.shape[-1] // 2
        grad_base = grad * lower
        return (grad_base[..., :d] - grad_base[..., d:]).mul_(ctx.key_power), None


def _features(q: torch.Tensor, k: torch.Tensor, power_scale: float, power_offset: float, key_power: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return _QueryFeatures.apply(q, power_scale, power_offset), _KeyFeatures.apply(k, key_power)


def nala_feature_maps(q: torch.Tensor, k: torch.Tensor, *, power_scale: float = 3.0, power_offset: float = 0.5,
                      key_power: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi_q, phi_k)`` of ``q: (..., N_q, d)`` and ``k: (..., N, d)``: ``(..., N_q, 2d)`` and
    ``(..., N, 2d)``, non-negative, in the compute dtype (float32 for half-precision input);
    ``phi_q(n) . phi_k(m)`` is NaLa's un-normalised attention score."""
    check_qkv(q, k, k)
    _check_powers(power_scale, power_offset, key_power)
    dtype = compute_dtype(q.dtype)
    return _features(q.to(dtype), k.to(dtype), power_scale, power_offset, key_power)


def rotary_tables(head_dim: int, shape: int | tuple[int, int], *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)``, each ``(N, head_dim)``: 1-D RoPE for ``shape = N`` (head_dim even), the official 2-D
    RoPE for ``shape = (H, W)`` (head_dim divisible by 4; tokens in row-major order, N = H * W)."""
    if isinstance(shape, int):
        if head_dim % 2 or shape < 1:
            raise ValueError(f"1-D RoPE needs an even head_dim and N >= 1, got head_dim={head_dim}, N={shape}")
        angle = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
        theta = torch.arange(shape, device=device, dtype=torch.float64)[:, None] * angle.repeat_interleave(2)
    else:
        height, width = shape
        if head_dim % 4 or height < 1 or width < 1:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4 and H, W >= 1, got head_dim={head_dim}, "
                             f"hw={tuple(shape)}")
        angle = ROPE_BASE ** -torch.linspace(0, 1, head_dim // 4, device=device, dtype=torch.float64)
        angle = angle.repeat_interleave(2)
        rows = torch.arange(height, device=device, dtype=torch.float64)[:, None, None] * angle
        cols = torch.arange(width, device=device, dtype=torch.float64)[None, :, None] * angle
        theta = torch.cat((rows.expand(height, width, -1), cols.expand(height, width, -1)), -1).flatten(0, 1)
    return theta.sin().to(dtype), theta.cos().to(dtype)


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE on consecutive pairs: ``(x_2t, x_2t+1) -> (x_2t cos - x_2t+1 sin, x_2t+1 cos + x_2t sin)``."""
    pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + pairs * sin


def nala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, power_scale: float = 3.0,
                   power_offset: float = 0.5, key_power: int = 3, eps: float = 1e-6, causal: bool = False,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """NaLa attention of ``q: (..., N_q, d)``, ``k: (..., N, d)`` and ``v: (..., N, d_v)`` -> ``(..., N_q, d_v)``
    in the input dtype (computed in float32 for half-precision input). ``rope = (sin, cos)``, each
    broadcastable to ``(..., N, d)`` (see :func:`rotary_tables`; needs N_q = N), rotates the numerator's
    features only. ``causal=True`` (N_q = N) attends to m <= n. No 1/sqrt(d) scale: the kernel has none."""
    check_qkv(q, k, v, causal=causal)
    _check_powers(power_scale, power_offset, key_power)
    check_positive("eps", eps)
    dtype = compute_dtype(q.dtype)
    phi_q, phi_k = _features(q.to(dtype), k.to(dtype), power_scale, power_offset, key_power)
    v_c = v.to(dtype)
    if rope is None:
        return kernelized_attention(phi_q, phi_k, v_c, eps, causal).to(q.dtype)
    sin, cos = rope
    if not torch.compiler.is_compiling():
        n, d = k.shape[-2:]
        if d % 2 or q.shape[-2] != n or sin.shape != cos.shape or sin.shape[-2:] != (n, d):
            raise ValueError(f"rope needs as many queries as keys, an even d and sin, cos of shape (..., N, d) = "
                             f"(..., {n}, {d}), got q {tuple(q.shape)}, sin {tuple(sin.shape)}, cos "
                             f"{tuple(cos.shape)}")
    sin2, cos2 = (torch.cat((t, t), -1).to(dtype) for t in (sin, cos))  # one table per sign half
    out = kernelized_attention(_rotate(phi_q, sin2, cos2), _rotate(phi_k, sin2, cos2), v_c, eps, causal,
                               phi_q, phi_k)
    return out.to(q.dtype)


class NormAwareLinearAttention(nn.Module):
    """The NaLaFormer attention block on tokens ``(B, N, C)``:
    ``NormAwareLinearAttention(embed_dim, num_heads, *, lepe_kernel_size=5, gate=True, causal=False,
    rope=None, power_scale=3.0, eps=1e-6, device=None, dtype=None)``.

    ``forward(x, hw=None)``: ``hw = (H, W)`` with ``H * W = N`` is needed for LePE and 2-D RoPE (tokens in
    row-major image order). ``lepe_kernel_size=0`` disables LePE (required with ``causal=True``: the 2-D
    convolution would see later tokens); ``gate=False`` drops the gate and its LayerNorm; ``rope`` is
    ``None``, ``"1d"`` or ``"2d"``. Parameters: ``in_proj`` (C -> 4C with the gate, 3C without), ``lepe``
    (depthwise ``Conv2d``), ``norm`` (``LayerNorm(C)``), ``out_proj`` (C -> C), all with torch's default init.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, lepe_kernel_size: int = 5, gate: bool = True,
                 causal: bool = False, rope: str | None = None, power_scale: float = 3.0, eps: float = 1e-6,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(lepe_kernel_size, bool) or not isinstance(lepe_kernel_size, int) or lepe_kernel_size < 0 \
                or (lepe_kernel_size and lepe_kernel_size % 2 == 0):
            raise ValueError(f"lepe_kernel_size must be 0 (off) or a positive odd int, got {lepe_kernel_size!r}")
        if causal and lepe_kernel_size:
            raise ValueError("causal=True needs lepe_kernel_size=0: LePE's 2-D convolution sees later tokens")
        if rope not in ROPE_KINDS:
            raise ValueError(f"rope must be one of {list(ROPE_KINDS)}, got {rope!r}")
        head_dim = embed_dim // num_heads
        if rope is not None and head_dim % (4 if rope == "2d" else 2):
            raise ValueError(f"rope={rope!r} needs a head dim divisible by {4 if rope == '2d' else 2}, got "
                             f"{head_dim}")
        check_positive("power_scale", power_scale)
        check_positive("eps", eps)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.lepe_kernel_size, self.gate, self.causal, self.rope = lepe_kernel_size, gate, causal, rope
        self.power_scale, self.eps = power_scale, eps
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, (4 if gate else 3) * embed_dim, **factory)
        self.lepe = nn.Conv2d(embed_dim, embed_dim, lepe_kernel_size, padding=lepe_kernel_size // 2,
                              groups=embed_dim, **factory) if lepe_kernel_size else None
        self.norm = nn.LayerNorm(embed_dim, **factory) if gate else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, **factory)

    def reset_parameters(self) -> None:
        for module in (self.in_proj, self.lepe, self.norm, self.out_proj):
            if module is not None:
                module.reset_parameters()

    def extra_repr(self) -> str:
        return (f"{self.embed_dim}, num_heads={self.num_heads}, lepe_kernel_size={self.lepe_kernel_size}, "
                f"gate={self.gate}, causal={self.causal}, rope={self.rope!r}, power_scale={self.power_scale}, "
                f"eps={self.eps}")

    def _check(self, x: torch.Tensor, hw: tuple[int, int] | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"expected input of shape (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("sequence length must be positive")
        needs_hw = self.lepe is not None or self.rope == "2d"
        if hw is None and needs_hw:
            raise ValueError("hw=(H, W) is needed for LePE and 2-D RoPE; use lepe_kernel_size=0 and rope=None or "
                             "'1d' for a sequence without an image shape")
        if hw is not None and (len(hw) != 2 or hw[0] * hw[1] != x.shape[1]):
            raise ValueError(f"hw={tuple(hw)} must be (H, W) with H * W = N = {x.shape[1]}")

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self._check(x, hw)
        batch, n, channels = x.shape
        parts = self.in_proj(x).split(channels, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in parts[:3])
        rope = None
        if self.rope is not None:
            rope = rotary_tables(self.head_dim, n if self.rope == "1d" else tuple(hw), device=x.device,
                                 dtype=compute_dtype(x.dtype))
        out = nala_attention(q, k, v, power_scale=self.power_scale, eps=self.eps, causal=self.causal, rope=rope)
        out = out.transpose(1, 2).reshape(batch, n, channels)
        if self.lepe is not None:
            image = parts[2].unflatten(1, tuple(hw)).permute(0, 3, 1, 2)
            out = out + self.lepe(image).permute(0, 2, 3, 1).reshape(batch, n, channels)
        if self.gate:
            out = self.norm(out) * F.silu(parts[3])
        return self.out_proj(out)
