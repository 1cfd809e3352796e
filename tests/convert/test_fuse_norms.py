"""fuse_norms: eval-mode UnifiedNorm / PowerNorm folded into the Linear layers that read them (unified_norm.md)."""

import copy

import pytest
import torch
from torch import nn

from normlab.bench.tasks import TinyTransformer
from normlab.convert.fuse import ChannelAffine, FoldedNorm, fuse_norms
from normlab.convert.pre_rmsnorm import ConversionError
from normlab.layers.unified import UnifiedNorm

try:
    from normlab.layers.powernorm import PowerNorm
except ImportError:  # written in parallel; the PowerNorm cases run once it exists
    PowerNorm = None

needs_powernorm = pytest.mark.skipif(PowerNorm is None, reason="normlab.layers.powernorm not available")
D = 6


def randomize(model, seed=0):
    """Random gains, biases and running statistics in every norm: a model nobody tuned for the check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "inference_affine"):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
                for name in ("running_var", "running_phi"):
                    if hasattr(m, name):
                        getattr(m, name).copy_(0.3 + 3 * torch.rand(m.weight.shape, generator=gen))
    return model


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], copy.deepcopy(model.state_dict())


def assert_untouched(model, before):
    modules, state = before
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def tiny(placement, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyTransformer(30, d_model=16, n_layers=2, n_heads=4, max_len=12, norm_layer=UnifiedNorm,
                            placement=placement, **kw)
    return randomize(model, seed).to(dtype).eval()


def compare(model, fused, *args, tol, **kw):
    """Outputs with grad enabled (torch's fused inference fast paths stay off)."""
    expected, got = model(*args, **kw), fused(*args, **kw)
    assert expected.requires_grad and got.requires_grad
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_pre_norm_transformer_folds_every_norm():
    model = tiny("pre")
    fused = copy.deepcopy(model)
    changed = fuse_norms(fused)
    assert changed == ["blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.norm2", "blocks.0.mlp.fc1",
                       "blocks.1.norm1", "blocks.1.attn.qkv", "blocks.1.norm2", "blocks.1.mlp.fc1", "norm_f", "head"]
    assert not any(isinstance(m, (UnifiedNorm, ChannelAffine)) for m in fused.modules())
    assert fused.head.bias is not None  # the final norm's shift became a bias of the bias-free head
    idx = torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(1))
    compare(model, fused, idx, tol=1e-5)
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[1, :5] = True
    compare(model, fused, idx, pad_mask=pad, tol=1e-5)  # the norm slots still get pad_mask


def test_post_norm_transformer_keeps_the_residual_path_affine():
    model = tiny("post")
    fused = copy.deepcopy(model)
    changed = fuse_norms(fused)
    # every post-norm output feeds the residual too; only the last one feeds nothing but the head
    assert changed == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "head"]
    assert [type(fused.get_submodule(n)) for n in changed[:4]] == [ChannelAffine] * 3 + [FoldedNorm]
    compare(model, fused, torch.randint(0, 30, (3, 10)), tol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_float64_is_exact_to_rounding(placement):
    model = tiny(placement, torch.float64, seed=3)
    fused = copy.deepcopy(model)
    fuse_norms(fused)
    compare(model, fused, torch.randint(0, 30, (2, 12)), tol=1e-12)


def test_tied_head_is_not_folded():
    model = tiny("pre", tied_head=True)
    fused = copy.deepcopy(model)
    changed = fuse_norms(fused)
    assert "head" not in changed and isinstance(fused.norm_f, ChannelAffine)
    assert fused.head.weight is fused.tok_emb.weight
    torch.testing.assert_close(fused.tok_emb.weight, model.tok_emb.weight, rtol=0, atol=0)
    compare(model, fused, torch.randint(0, 30, (2, 12)), tol=1e-5)


class Untuned(nn.Module):
    """Norms in every situation fuse_norms distinguishes."""

    def __init__(self, powernorm):
        super().__init__()
        self.emb = nn.Linear(3, D)
        self.a, self.la = UnifiedNorm(D), nn.Linear(D, D)  # a -> la only: folds
        self.b, self.lb = UnifiedNorm(D), nn.Linear(D, D, bias=False)  # b -> lb and the residual: affine
        self.c, self.lc1, self.lc2 = UnifiedNorm(D), nn.Linear(D, 4, bias=False), nn.Linear(D, D)  # two readers
        self.d, self.ld = UnifiedNorm(D), nn.Linear(D, D)  # ld is called twice: affine
        self.e = PowerNorm(D, group_num=None, warmup_iters=0) if powernorm else UnifiedNorm(D)
        self.le = nn.Linear(D, D)
        self.h, self.t1, self.t2 = UnifiedNorm(D), nn.Linear(D, D), nn.Linear(D, D)  # t1 shares its weight
        self.t2.weight = self.t1.weight
        self.m, self.lm = UnifiedNorm(D), nn.Linear(D, 2 * D)  # m's shape is read too: still folds
        self.f, self.head = UnifiedNorm(D), nn.Linear(D, 5)  # f -> mean pooling -> head: affine
        self.g = UnifiedNorm(D)  # g's output leaves the model: affine

    def forward(self, x):
        h = self.emb(x)
        h = h + self.la(self.a(h))
        hb = self.b(h)
        h = hb + self.lb(hb)
        hc = self.c(h)
        h = h + self.lc2(hc) + self.lc1(hc).sum(-1, keepdim=True)
        h = h + self.ld(self.d(h)) + 0.5 * self.ld(h)
        h = h + self.le(self.e(h))
        h = h + self.t1(self.h(h))
        h = h + 0.1 * self.t2(h)
        hm = self.m(h)
        b, t, _ = hm.shape
        h = h + self.lm(hm).view(b, t, 2, D).mean(2)
        return torch.cat([self.head(self.f(h).mean(1)), self.g(h).mean(1)], -1)


@pytest.mark.parametrize("powernorm", [False, pytest.param(True, marks=needs_powernorm)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_untuned_model_every_case(powernorm, dtype, tol):
    torch.manual_seed(0)
    model = Untuned(powernorm)
    for norm in (m for m in model.modules() if hasattr(m, "inference_affine")):  # stats from training steps
        norm.train()
    for _ in range(3):
        model(torch.randn(4, 5, 3)).sum().backward()
    model = randomize(model, seed=2).to(dtype).eval()
    fused = copy.deepcopy(model)
    changed = fuse_norms(fused)
    # norms in registration order, each followed by its readers in call order
    assert changed == ["a", "la", "b", "c", "lc2", "lc1", "d", "e", "le", "h", "m", "lm", "f", "g"]
    folded = {n for n, m in fused.named_modules() if isinstance(m, FoldedNorm)}
    affine = {n for n, m in fused.named_modules() if isinstance(m, ChannelAffine)}
    assert folded == {"a", "c", "e", "m"} and affine == {"b", "d", "h", "f", "g"}
    assert fused.lc1.bias is not None and fused.t1.weight is fused.t2.weight
    x = torch.randn(3, 7, 3, dtype=dtype, generator=torch.Generator().manual_seed(5))
    compare(model, fused, x, tol=tol)
    torch.testing.assert_close(fused.ld.weight, model.ld.weight, rtol=0, atol=0)  # not folded


def test_a_norm_shared_by_two_call_sites_folds_into_both():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.l1, self.l2 = UnifiedNorm(D), nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            return self.l2(self.norm(self.l1(self.norm(x))))

    model = randomize(Shared()).eval()
    fused = copy.deepcopy(model)
    assert fuse_norms(fused) == ["norm", "l1", "l2"]
    compare(model, fused, torch.randn(2, 4, D), tol=1e-5)


def test_replacements_take_the_norm_slot_inputs():
    affine = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]))
    x = torch.tensor([[1.0, 1.0], [0.5, -2.0]])
    expected = torch.tensor([[3.0, 2.0], [2.0, -7.0]])
    torch.testing.assert_close(affine(x, pad_mask=torch.zeros(2, dtype=torch.bool), tau=torch.ones(1)), expected)
    assert affine(x.bfloat16()).dtype == torch.bfloat16
    assert FoldedNorm()(x, pad_mask=None, tau=torch.ones(1)) is x


def test_training_mode_raises_and_leaves_the_model_untouched():
    model = tiny("pre")
    model.blocks[1].norm2.train()
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"^blocks\.1\.norm2: UnifiedNorm is in training mode"):
        fuse_norms(model)
    assert_untouched(model, before)


@needs_powernorm
def test_powernorm_with_group_scaling_raises_and_leaves_the_model_untouched():
    model = nn.Sequential(PowerNorm(D, group_num=None), nn.Linear(D, D), PowerNorm(D, group_num=2),
                          nn.Linear(D, D)).eval()
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"^2: .*group_num=None"):
        fuse_norms(model)
    assert_untouched(model, before)


def test_untraceable_model_raises_and_leaves_the_model_untouched():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = UnifiedNorm(D), nn.Linear(D, D)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.lin(self.norm(x))

    model = randomize(Branchy()).eval()
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"torch\.fx cannot trace"):
        fuse_norms(model)
    assert_untouched(model, before)


def test_model_without_fusable_norms_is_a_no_op():
    model = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D)).eval()
    before = snapshot(model)
    assert fuse_norms(model) == []
    assert_untouched(model, before)
