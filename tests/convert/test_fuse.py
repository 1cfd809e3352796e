import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.convert.fuse import (ZeroMean, compress_reader_, compress_writer_, fold_affine_, fold_norm_affine,
                                  is_conv1d, recentre_output_, writer_tensors)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

D = 6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _affine_ln(d=D):
    ln = nn.LayerNorm(d).double()
    g = _gen(1)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64))
        ln.bias.copy_(0.3 * torch.randn(d, generator=g, dtype=torch.float64))
    return ln


def _readers():
    torch.manual_seed(0)
    lin = nn.Linear(D, 5).double()
    lin_nb = nn.Linear(D, 4, bias=False).double()
    conv = Conv1D(7, D).double()
    with torch.no_grad():
        conv.bias.normal_()
    return [lin, lin_nb, conv]


def test_is_conv1d():
    assert is_conv1d(Conv1D(3, 4)) and not is_conv1d(nn.Linear(4, 3))


def test_fold_norm_affine_into_linear_and_conv1d():
    ln, readers = _affine_ln(), _readers()
    x = torch.randn(3, 2, D, dtype=torch.float64, generator=_gen())
    before = [r(ln(x)) for r in readers]
    fold_norm_affine(ln, readers)
    assert torch.equal(ln.weight, torch.ones(D, dtype=torch.float64))
    assert torch.equal(ln.bias, torch.zeros(D, dtype=torch.float64))
    assert readers[1].bias is not None  # created where the reader had none
    for r, y in zip(readers, before):
        torch.testing.assert_close(r(ln(x)), y, rtol=0, atol=1e-12)


def test_fold_formula_by_hand():
    lin = nn.Linear(3, 2).double()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    gamma = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    beta = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    fold_affine_([lin], gamma, beta)
    torch.testing.assert_close(lin.weight, w * gamma[None, :])
    torch.testing.assert_close(lin.bias, b + w @ beta)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_multihead_attention(packed, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, 2, bias=bias, batch_first=True).double()
    if not packed:  # separate q/k/v projections (what kdim/vdim != embed_dim builds), all reading the norm
        mha._qkv_same_embed_dim = False
        mha.q_proj_weight = nn.Parameter(mha.in_proj_weight[:D].detach().clone())
        mha.k_proj_weight = nn.Parameter(mha.in_proj_weight[D:2 * D].detach().clone())
        mha.v_proj_weight = nn.Parameter(mha.in_proj_weight[2 * D:].detach().clone())
        mha.in_proj_weight = None
    ln = _affine_ln()
    x = torch.randn(2, 4, D, dtype=torch.float64, generator=_gen())
    z = ln(x)
    before = mha(z, z, z, need_weights=False)[0]
    fold_norm_affine(ln, [mha])
    z = ln(x)
    after = mha(z, z, z, need_weights=False)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    assert mha.in_proj_bias is not None


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
def test_recentre_output_gives_zero_mean_output(kind):
    torch.manual_seed(0)
    if kind == "linear":
        w, x, axis = nn.Linear(4, D).double(), torch.randn(3, 4, dtype=torch.float64), -1
    elif kind == "conv1d":
        w, x, axis = Conv1D(D, 4).double(), torch.randn(3, 4, dtype=torch.float64), -1
        with torch.no_grad():
            w.bias.normal_(mean=1.0)
    elif kind == "embedding":
        w, x, axis = nn.Embedding(9, D).double(), torch.arange(9), -1
    else:
        w, x, axis = nn.Conv2d(3, D, 2, stride=2).double(), torch.randn(2, 3, 4, 4, dtype=torch.float64), 1
    with torch.no_grad():
        w.weight.add_(0.5)
    assert w(x).mean(axis).abs().max() > 0.01
    recentre_output_(w)
    assert w(x).mean(axis).abs().max() < 1e-13


def test_recentre_parameter_and_writer_tensors():
    p = nn.Parameter(torch.randn(5, D, dtype=torch.float64) + 1)
    recentre_output_(p)
    assert p.mean(-1).abs().max() < 1e-14
    assert writer_tensors(p) == [("", -1)]
    assert writer_tensors(nn.Linear(2, 3)) == [("weight", 0), ("bias", 0)]
    assert writer_tensors(Conv1D(3, 2)) == [("weight", 1), ("bias", 0)]
    with pytest.raises(TypeError, match="not a writer"):
        writer_tensors(nn.LayerNorm(3))


def test_zero_mean_parametrization_matches_baked_and_projects_gradient():
    torch.manual_seed(0)
    a = nn.Linear(4, D).double()
    b = nn.Linear(4, D).double()
    b.load_state_dict(a.state_dict())
    parametrize.register_parametrization(a, "weight", ZeroMean(0))
    parametrize.register_parametrization(a, "bias", ZeroMean(0))
    recentre_output_(b)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-14)
    a(x).square().sum().backward()
    grad = a.parametrizations.weight.original.grad
    assert grad.mean(0).abs().max() < 1e-13  # the raw parameter only sees the zero-mean part
    assert "dim=0" in repr(a.parametrizations.weight[0])


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_compress_writer_and_reader_read_the_first_d_minus_1_coordinates(kind):
    torch.manual_seed(0)
    writer = nn.Linear(4, D).double() if kind == "linear" else Conv1D(D, 4).double()
    reader = nn.Linear(D, 3).double() if kind == "linear" else Conv1D(3, D).double()
    recentre_output_(writer)
    h = torch.randn(5, 4, dtype=torch.float64)
    full = reader(writer(h))
    compress_writer_(writer)
    compress_reader_(reader)
    assert writer(h).shape[-1] == D - 1
    torch.testing.assert_close(reader(writer(h)), full, rtol=0, atol=1e-13)
    if kind == "linear":
        assert writer.out_features == D - 1 and reader.in_features == D - 1
    else:
        assert writer.nf == D - 1 and reader.nx == D - 1 and is_conv1d(writer) and is_conv1d(reader)


def test_compress_embedding_writer():
    emb = nn.Embedding(4, D).double()
    recentre_output_(emb)
    compress_writer_(emb)
    assert emb.weight.shape == (4, D - 1) and emb.embedding_dim == D - 1


def test_compress_reader_refuses_multihead_attention_and_unknown_layers():
    with pytest.raises(TypeError, match="MultiheadAttention cannot read"):
        compress_reader_(nn.MultiheadAttention(D, 2))
    with pytest.raises(TypeError, match="not a reader"):
        compress_reader_(nn.Conv2d(D, 2, 1))
    with pytest.raises(TypeError, match="not a reader"):
        fold_affine_([nn.Embedding(3, D)], torch.ones(D), None)
