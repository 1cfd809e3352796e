"""NaLa attention and the linear-attention baseline against formulas written out here (nalaformer.md):
the quadratic form of the implied attention, a transcription of the official ``NormAwareLinearAttn.forward``
and its 2-D RoPE, masked quadratic forms for causal mode, gradcheck, dtypes, errors, torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from normlab.attention import (NormAwareLinearAttention, linear_attention, nala_attention, nala_feature_maps,
                               rotary_tables)
from normlab.attention import linear

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64, scale=1.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(b=2, h=3, n=50, d=16, dv=None, seed=0, dtype=F64):
    return rand(b, h, n, d, seed=seed, dtype=dtype), rand(b, h, n, d, seed=seed + 1, dtype=dtype), \
        rand(b, h, n, dv or d, seed=seed + 2, dtype=dtype)


# ---- the official code, transcribed (NaLaformer/NALA.py) -------------------------------------------------

def official_features(q, k):
    """Steps 1-6 of the sheet as the official forward writes them (q_norm unclamped)."""
    k = k ** 3
    q1, q2, k1, k2 = torch.relu(q), torch.relu(-q), torch.relu(k), torch.relu(-k)
    q_norm = q.norm(dim=-1, p=2, keepdim=True)
    q1, q2 = q1 / q_norm, q2 / q_norm
    power = 3 * (0.5 + torch.tanh(q_norm))
    return torch.cat([q1 ** power, q2 ** power], -1), torch.cat([k1, k2], -1)


def rotate_every_two(x):
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def theta_shift(x, sin, cos):
    return x * cos + rotate_every_two(x) * sin


def official_rope(head_dim, h, w, dtype=F64):
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4, dtype=dtype))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
    ih, iw = torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype)
    sin_h = torch.sin(ih[:, None] * angle[None, :]).unsqueeze(1).repeat(1, w, 1)
    sin_w = torch.sin(iw[:, None] * angle[None, :]).unsqueeze(0).repeat(h, 1, 1)
    cos_h = torch.cos(ih[:, None] * angle[None, :]).unsqueeze(1).repeat(1, w, 1)
    cos_w = torch.cos(iw[:, None] * angle[None, :]).unsqueeze(0).repeat(h, 1, 1)
    return torch.cat([sin_h, sin_w], -1).flatten(0, 1), torch.cat([cos_h, cos_w], -1).flatten(0, 1)


def official_block(m, x, hw, sin, cos):
    """``NormAwareLinearAttn.forward`` on tokens (B, N, C) with the weights of ``m`` (float casts dropped)."""
    b, n, c = x.shape
    h, w = hw
    q, k, v, g = m.in_proj(x).reshape(b, n, 4, c).permute(2, 0, 1, 3)
    lepe = m.lepe(v.reshape(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, -1)
    q, k, v = (t.reshape(b, n, m.num_heads, m.head_dim).permute(0, 2, 1, 3) for t in (q, k, v))
    q, k = official_features(q, k)
    d = m.head_dim
    q_ = torch.cat([theta_shift(q[..., :d], sin, cos), theta_shift(q[..., d:], sin, cos)], -1)
    k_ = torch.cat([theta_shift(k[..., :d], sin, cos), theta_shift(k[..., d:], sin, cos)], -1)
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k_.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    out = (q_ @ kv * z).transpose(1, 2).reshape(b, n, -1)
    return m.out_proj(m.norm(out + lepe) * F.silu(g))


def quadratic(phi_q, phi_k, v, eps=1e-6, causal=False, phi_q_num=None, phi_k_num=None):
    """o = S_num v / (S 1 + eps n): the implied attention matrix, formed explicitly."""
    s = phi_q @ phi_k.transpose(-2, -1)
    s_num = s if phi_q_num is None else phi_q_num @ phi_k_num.transpose(-2, -1)
    n = phi_k.shape[-2]
    count = torch.full((phi_q.shape[-2], 1), float(n), dtype=v.dtype)
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        s, s_num = s.masked_fill(~mask, 0), s_num.masked_fill(~mask, 0)
        count = torch.arange(1, n + 1, dtype=v.dtype)[:, None]
    return (s_num @ v) / (s.sum(-1, keepdim=True) + eps * count)


# ---- feature maps ---------------------------------------------------------------------------------------

def test_feature_maps_match_the_official_code_and_the_sheet_formula():
    q, k, _ = qkv(seed=3)
    phi_q, phi_k = nala_feature_maps(q, k)
    ref_q, ref_k = official_features(q, k)
    torch.testing.assert_close(phi_q, ref_q, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(phi_k, ref_k, atol=1e-14, rtol=1e-12)
    # the sheet's step 6: phi_q . phi_k = sum_i [q_i k_i > 0] (|q_i| / r)^p |k_i|^3
    r = q.norm(dim=-1, keepdim=True)
    p = 3 * (0.5 + torch.tanh(r))
    qi, ki = q[0, 0, :, None, :], k[0, 0, None, :, :]
    same_sign = (qi * ki) > 0
    expected = (same_sign * (qi.abs() / r[0, 0, :, None]) ** p[0, 0, :, None] * ki.abs() ** 3).sum(-1)
    torch.testing.assert_close(phi_q[0, 0] @ phi_k[0, 0].T, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_scores_are_non_negative_and_opposite_signs_contribute_nothing(scale):
    q, k, _ = qkv(seed=5)
    phi_q, phi_k = nala_feature_maps(scale * q, scale * k)
    assert (phi_q >= 0).all() and (phi_k >= 0).all()
    assert (phi_q @ phi_k.transpose(-2, -1) >= 0).all()
    # a key that disagrees in sign with the query on every coordinate scores 0
    q1 = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    k1 = torch.tensor([[-1.0, 3.0, -0.1]], dtype=F64)
    pq, pk = nala_feature_maps(q1, k1)
    assert (pq @ pk.T).item() == 0.0


def test_key_power_and_power_scale_enter_as_documented():
    q, k, _ = qkv(n=7, d=4, seed=9)
    phi_q, phi_k = nala_feature_maps(q, k, power_scale=2.0, power_offset=1.0, key_power=5)
    r = q.norm(dim=-1, keepdim=True)
    u = q / r
    p = 2.0 * (1.0 + torch.tanh(r))
    torch.testing.assert_close(phi_q, torch.cat([F.relu(u) ** p, F.relu(-u) ** p], -1), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(phi_k, torch.cat([F.relu(k ** 5), F.relu(-(k ** 5))], -1), atol=1e-14,
                               rtol=1e-12)


# ---- the linear form against the quadratic form ---------------------------------------------------------

def test_linear_form_equals_the_explicit_quadratic_form():
    q, k, v = qkv()  # the sheet's measurement: float64, B=2, h=3, N=50, d=16
    phi_q, phi_k = official_features(q, k)
    torch.testing.assert_close(nala_attention(q, k, v), quadratic(phi_q, phi_k, v), atol=1e-12, rtol=0)


def test_value_dim_may_differ_and_queries_may_outnumber_keys():
    q = rand(2, 3, 9, 8, seed=1)
    k, v = rand(2, 3, 20, 8, seed=2), rand(2, 3, 20, 5, seed=3)
    phi_q, phi_k = official_features(q, k)
    out = nala_attention(q, k, v)
    assert out.shape == (2, 3, 9, 5)
    torch.testing.assert_close(out, quadratic(phi_q, phi_k, v), atol=1e-12, rtol=0)


def test_rows_of_the_implied_attention_sum_to_one_without_rope():
    q, k, _ = qkv(n=40, seed=4)
    ones = torch.ones(2, 3, 40, 1, dtype=F64)
    for causal in (False, True):
        # eps shrinks row n by eps / (mean score + eps): up to 3e-5 here at the default 1e-6
        assert (nala_attention(q, k, ones, causal=causal) <= 1).all()
        rowsum = nala_attention(q, k, ones, causal=causal, eps=1e-12)
        assert (rowsum - 1).abs().max() < 1e-6


@pytest.mark.parametrize("n", [1, 50, 64, 130, 200])
def test_causal_equals_the_masked_quadratic_form(n):
    q, k, v = qkv(b=2, h=2, n=n, d=8, seed=n)
    phi_q, phi_k = official_features(q, k)
    out = nala_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, quadratic(phi_q, phi_k, v, causal=True), atol=1e-12, rtol=0)
    # the last causal row sees every key: it is the non-causal row
    torch.testing.assert_close(out[..., -1, :], nala_attention(q, k, v)[..., -1, :], atol=1e-12, rtol=0)


def test_causal_rows_do_not_depend_on_later_tokens():
    q, k, v = qkv(b=1, h=2, n=150, d=8, seed=2)
    full = nala_attention(q, k, v, causal=True)
    prefix = nala_attention(q[..., :97, :], k[..., :97, :], v[..., :97, :], causal=True)
    torch.testing.assert_close(full[..., :97, :], prefix, atol=1e-13, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_rope_rotates_the_numerator_only(causal):
    q, k, v = qkv(b=2, h=2, n=100, d=8, seed=6)
    sin, cos = official_rope(8, 10, 10)
    phi_q, phi_k = official_features(q, k)
    rot = lambda x: torch.cat([theta_shift(x[..., :8], sin, cos), theta_shift(x[..., 8:], sin, cos)], -1)  # noqa: E731
    expected = quadratic(phi_q, phi_k, v, causal=causal, phi_q_num=rot(phi_q), phi_k_num=rot(phi_k))
    out = nala_attention(q, k, v, causal=causal, rope=(sin, cos))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    ones = torch.ones(2, 2, 100, 1, dtype=F64)
    assert (nala_attention(q, k, ones, rope=(sin, cos)) - 1).abs().max() > 1e-3  # rows no longer sum to 1


def test_rotary_tables_2d_match_the_official_rope_and_1d_is_standard_rope():
    sin, cos = rotary_tables(16, (3, 5), dtype=F64)
    ref_sin, ref_cos = official_rope(16, 3, 5)
    torch.testing.assert_close(sin, ref_sin, atol=1e-15, rtol=0)
    torch.testing.assert_close(cos, ref_cos, atol=1e-15, rtol=0)
    d, n = 8, 12
    sin, cos = rotary_tables(d, n, dtype=F64)
    theta = torch.arange(n, dtype=F64)[:, None] * 10000.0 ** (-2 * torch.arange(d // 2, dtype=F64) / d)
    torch.testing.assert_close(sin[:, 0::2], theta.sin(), atol=1e-15, rtol=0)
    torch.testing.assert_close(cos[:, 1::2], theta.cos(), atol=1e-15, rtol=0)
    # relative positions: <R_m x, R_n y> depends on n - m only
    x, y = rand(1, d, seed=1), rand(1, d, seed=2)
    rx, ry = theta_shift(x.expand(n, d), sin, cos), theta_shift(y.expand(n, d), sin, cos)
    torch.testing.assert_close((rx[2] * ry[5]).sum(), (rx[6] * ry[9]).sum(), atol=1e-12, rtol=0)


def test_elu_and_relu_linear_attention_equal_their_quadratic_forms():
    q, k, v = qkv(n=70, d=8, seed=8)
    for name, phi in (("elu", lambda x: F.elu(x) + 1), ("relu", F.relu)):
        for causal in (False, True):
            out = linear_attention(q, k, v, feature_map=name, causal=causal)
            torch.testing.assert_close(out, quadratic(phi(q), phi(k), v, causal=causal), atol=1e-12, rtol=0)


# ---- norm awareness: the paper's mechanism --------------------------------------------------------------

def entropy_of_rows(scores):
    a = scores / scores.sum(-1, keepdim=True)
    return -torch.xlogy(a, a).sum(-1).mean()


def test_larger_query_norm_gives_sharper_nala_attention_but_not_relu_attention():
    q, k = rand(64, 16, seed=0), rand(256, 16, seed=1)
    q = q / q.norm(dim=-1, keepdim=True)
    nala, relu = [], []
    for a in (0.25, 1.0, 4.0):
        phi_q, phi_k = nala_feature_maps(a * q, k)
        nala.append(entropy_of_rows(phi_q @ phi_k.T))
        relu.append(entropy_of_rows(F.relu(a * q) @ F.relu(k).T))
    assert nala[0] > nala[1] > nala[2]
    assert max(relu) - min(relu) < 1e-12


# ---- edge cases, dtypes, gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_all_zero_query_gives_zero_output_and_finite_grads(causal):
    q, k, v = qkv(b=1, h=2, n=10, d=4, seed=2)
    q[0, 1, 3] = 0
    ref_q, _ = official_features(q, k)
    assert ref_q[0, 1, 3].isnan().all()  # the official code's 0/0
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = nala_attention(q, k, v, causal=causal)
    assert torch.isfinite(out).all() and (out[0, 1, 3] == 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal, monkeypatch):
    monkeypatch.setattr(linear, "CHUNK_SIZE", 4)  # several chunks at N = 10
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, n=10, d=4, seed=1))
    with torch.no_grad():
        q[0, 0, 4, 1] = 0  # a zero coordinate: the relu kink of both halves (an all-zero query is tested above)
    sin, cos = official_rope(4, 2, 5)
    assert torch.autograd.gradcheck(lambda a, b, c: nala_attention(a, b, c, causal=causal), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: nala_attention(a, b, c, causal=causal, rope=(sin, cos),
                                                                   key_power=5, power_scale=2.0), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c, causal=causal), (q, k, v))


def test_gradients_match_autograd_through_the_official_formula():
    q, k, v = (t.requires_grad_() for t in qkv(n=30, d=8, seed=11))
    g = rand(2, 3, 30, 8, seed=12)
    ours = torch.autograd.grad(nala_attention(q, k, v), (q, k, v), g)
    ref = torch.autograd.grad(quadratic(*official_features(q, k), v), (q, k, v), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_computed_in_float32(dtype):
    q, k, v = qkv(n=20, d=8, seed=3, dtype=torch.float32)
    k = k * 50  # |k|^3 > 65504: overflows float16 if cubed in the input dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = nala_attention(q, k, v, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = nala_attention(q.float(), k.float(), v.float(), causal=True).to(dtype)
    assert torch.equal(out, ref)
    phi_q, _ = nala_feature_maps(q, k)
    assert phi_q.dtype == torch.float32
    assert linear_attention(q, k, v).dtype == dtype


def test_float64_stays_float64_and_n1_batch1_and_unbatched_work():
    q, k, v = qkv(b=1, h=1, n=1, d=4)
    for causal in (False, True):
        out = nala_attention(q, k, v, causal=causal)
        assert out.dtype == F64 and out.shape == (1, 1, 1, 4)
        phi_q, phi_k = official_features(q, k)
        torch.testing.assert_close(out, quadratic(phi_q, phi_k, v), atol=1e-14, rtol=0)
    q2, k2, v2 = q[0, 0], k[0, 0], v[0, 0]  # (N, d) without batch dims
    torch.testing.assert_close(nala_attention(q2, k2, v2), out[0, 0], atol=1e-15, rtol=0)


def test_bad_shapes_dtypes_and_hyperparameters_raise_clear_errors():
    q, k, v = qkv(n=6, d=4)
    with pytest.raises(ValueError, match="sequence length must be positive"):
        nala_attention(q[..., :0, :], k[..., :0, :], v[..., :0, :])
    with pytest.raises(ValueError, match=r"k \(2, 3, 6, 5\)"):
        nala_attention(q, rand(2, 3, 6, 5), v)
    with pytest.raises(ValueError, match=r"v \(2, 3, 5, 4\)"):
        nala_attention(q, k, v[..., :5, :])
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        nala_attention(q[..., :3, :], k, v, causal=True)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N, d\)"):
        nala_attention(q[0, 0, 0], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        nala_attention(q.float(), k, v)
    with pytest.raises(TypeError, match="floating"):
        nala_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="rope needs"):
        nala_attention(q, k, v, rope=official_rope(4, 2, 2))
    for kwargs, name in (({"power_scale": 0.0}, "power_scale"), ({"power_offset": -1.0}, "power_offset"),
                         ({"eps": 0.0}, "eps"), ({"eps": math.nan}, "eps")):
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            nala_attention(q, k, v, **kwargs)
    for bad in (2, 0, 3.0, True):
        with pytest.raises(ValueError, match="key_power must be a positive odd integer"):
            nala_attention(q, k, v, key_power=bad)
    with pytest.raises(ValueError, match="unknown feature_map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="needs an even head_dim"):
        rotary_tables(5, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        rotary_tables(6, (2, 3))


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_no_n_by_n_tensor_forward_or_backward(causal):
    n = 2048
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, n=n, d=8, dtype=torch.float32))
    with LargestTensor() as mode:
        nala_attention(q, k, v, causal=causal).sum().backward()
    assert mode.largest <= n * linear.CHUNK_SIZE < n * n


# ---- the module -----------------------------------------------------------------------------------------

def randomized(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) + (1 if p.dim() == 1 else 0))
    return module


@pytest.mark.parametrize("causal", [False, True])
def test_module_without_rope_lepe_and_gate_is_the_function_in_the_projections(causal):
    m = randomized(NormAwareLinearAttention(24, 3, lepe_kernel_size=0, gate=False, causal=causal, dtype=F64))
    x = rand(2, 70, 24, seed=4)
    q, k, v = m.in_proj(x).chunk(3, -1)
    heads = lambda t: t.reshape(2, 70, 3, 8).transpose(1, 2)  # noqa: E731
    expected = m.out_proj(nala_attention(heads(q), heads(k), heads(v), causal=causal).transpose(1, 2)
                          .reshape(2, 70, 24))
    torch.testing.assert_close(m(x), expected, atol=1e-12, rtol=0)


def test_module_equals_the_official_block_with_2d_rope_lepe_and_gate():
    m = randomized(NormAwareLinearAttention(32, 2, rope="2d", dtype=F64), seed=2)
    x = rand(2, 6 * 7, 32, seed=5)
    sin, cos = official_rope(16, 6, 7)
    torch.testing.assert_close(m(x, hw=(6, 7)), official_block(m, x, (6, 7), sin, cos), atol=1e-10, rtol=1e-8)


def test_module_1d_rope_uses_the_1d_tables():
    m = randomized(NormAwareLinearAttention(16, 2, lepe_kernel_size=0, gate=False, rope="1d", causal=True,
                                            dtype=F64))
    x = rand(1, 9, 16, seed=7)
    q, k, v = (t.reshape(1, 9, 2, 8).transpose(1, 2) for t in m.in_proj(x).chunk(3, -1))
    out = nala_attention(q, k, v, causal=True, rope=rotary_tables(8, 9, dtype=F64))
    torch.testing.assert_close(m(x), m.out_proj(out.transpose(1, 2).reshape(1, 9, 16)), atol=1e-12, rtol=0)


def test_module_state_dict_train_eval_repr_and_reset():
    m = randomized(NormAwareLinearAttention(16, 4), seed=3)
    assert sorted(m.state_dict()) == ["in_proj.bias", "in_proj.weight", "lepe.bias", "lepe.weight", "norm.bias",
                                      "norm.weight", "out_proj.bias", "out_proj.weight"]
    assert m.in_proj.out_features == 64 and m.lepe.kernel_size == (5, 5) and m.lepe.groups == 16
    twin = NormAwareLinearAttention(16, 4)
    twin.load_state_dict(m.state_dict())
    x = rand(2, 12, 16, dtype=torch.float32)
    torch.testing.assert_close(twin(x, hw=(3, 4)), m(x, hw=(3, 4)), atol=0, rtol=0)
    torch.testing.assert_close(m.eval()(x, hw=(3, 4)), m.train()(x, hw=(3, 4)), atol=0, rtol=0)
    assert "num_heads=4" in repr(m) and "lepe_kernel_size=5" in repr(m)
    before = m.out_proj.weight.clone()
    m.reset_parameters()
    assert not torch.equal(before, m.out_proj.weight) and torch.equal(m.norm.weight, torch.ones(16))
    assert NormAwareLinearAttention(16, 4, gate=False).in_proj.out_features == 48


def test_module_batch1_n1_and_bfloat16():
    m = NormAwareLinearAttention(16, 2, lepe_kernel_size=0, rope="1d")
    x = torch.randn(1, 1, 16)
    assert m(x).shape == (1, 1, 16)
    mb = NormAwareLinearAttention(16, 2, rope="2d", dtype=torch.bfloat16)
    y = mb(torch.randn(2, 12, 16, dtype=torch.bfloat16), hw=(3, 4))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_module_rejects_bad_configuration_and_input():
    cases = [
        (dict(embed_dim=10, num_heads=3), "divisible by num_heads"),
        (dict(embed_dim=0, num_heads=1), "embed_dim must be a positive int"),
        (dict(embed_dim=8, num_heads=2, lepe_kernel_size=4), "lepe_kernel_size"),
        (dict(embed_dim=8, num_heads=2, causal=True), "causal=True needs lepe_kernel_size=0"),
        (dict(embed_dim=8, num_heads=2, rope="3d"), "rope must be one of"),
        (dict(embed_dim=12, num_heads=2, rope="2d"), "divisible by 4"),
        (dict(embed_dim=8, num_heads=2, eps=-1.0), "eps must be positive"),
        (dict(embed_dim=8, num_heads=2, power_scale=0), "power_scale must be positive"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            NormAwareLinearAttention(**kwargs)
    m = NormAwareLinearAttention(8, 2)
    with pytest.raises(ValueError, match="hw=\\(H, W\\) is needed"):
        m(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="H \\* W = N = 6"):
        m(torch.randn(2, 6, 8), hw=(2, 2))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, N, 8\), got \(2, 6, 7\)"):
        m(torch.randn(2, 6, 7), hw=(2, 3))
    with pytest.raises(ValueError, match="sequence length must be positive"):
        NormAwareLinearAttention(8, 2, lepe_kernel_size=0)(torch.randn(2, 0, 8))


# ---- torch.compile --------------------------------------------------------------------------------------

def test_compiled_function_and_module_give_the_same_outputs_and_grads():
    torch._dynamo.reset()
    q, k, v = qkv(b=1, h=2, n=70, d=8, dtype=torch.float32)
    sin, cos = rotary_tables(8, 70)
    fn = lambda a, b, c: nala_attention(a, b, c, causal=True, rope=(sin, cos))  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ins_c = [t.clone().requires_grad_() for t in (q, k, v)]
    out, out_c = fn(*ins), compiled(*ins_c)
    torch.testing.assert_close(out_c, out, atol=1e-6, rtol=1e-5)
    out.square().sum().backward(), out_c.square().sum().backward()
    for a, b in zip(ins, ins_c):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)
    m = randomized(NormAwareLinearAttention(16, 2, rope="2d"), seed=1)
    x = torch.randn(2, 12, 16)
    torch.testing.assert_close(torch.compile(m, backend="aot_eager")(x, hw=(3, 4)), m(x, hw=(3, 4)),
                               atol=1e-6, rtol=1e-5)
