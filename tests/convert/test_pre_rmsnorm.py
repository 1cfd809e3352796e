import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import normlab.convert.pre_rmsnorm as pr
from normlab import CRMSNorm, RMSNorm
from normlab.bench.tasks import TinyTransformer
from normlab.convert import BlockSpec, ConversionError, PreLNSpec, to_rmsnorm
from normlab.convert.pre_rmsnorm import PreRMSNormEncoderLayer, builtin_spec

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
VOCAB, D, LAYERS, T, B = 50, 32, 3, 10, 4


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Untuned weights whose residual stream is far from zero-mean: LN gain 1+0.1N, bias 0.1N, biases
    0.3+0.1N everywhere, embeddings and position tables with a large common offset."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                if mod.weight is not None:
                    mod.weight.copy_(1 + 0.1 * rand(mod.weight.shape))
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * rand(mod.bias.shape))
            elif isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                fan_in = mod.weight.shape[1] if isinstance(mod, nn.Linear) else mod.weight.shape[0]
                mod.weight.copy_(rand(mod.weight.shape) / math.sqrt(fan_in))
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * rand(mod.bias.shape) + 0.3)
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(rand(mod.weight.shape) + 1.0)
            elif isinstance(mod, nn.MultiheadAttention):
                mod.in_proj_weight.copy_(rand(mod.in_proj_weight.shape) / math.sqrt(mod.embed_dim))
                mod.in_proj_bias.copy_(0.1 * rand(mod.in_proj_bias.shape) + 0.3)
        if hasattr(model, "pos_emb"):
            model.pos_emb.copy_(0.5 * rand(model.pos_emb.shape) + 0.5)
    return model


def tiny(dtype=torch.float64, seed=0, **kw) -> TinyTransformer:
    torch.manual_seed(seed)
    kw = {"d_model": D, "n_layers": LAYERS, "n_heads": 4, "max_len": 16, **kw}
    return perturb(TinyTransformer(VOCAB, **kw), seed).to(dtype).eval()


def tokens(seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model)


def assert_untouched(model, snap):
    state, text = snap
    now = model.state_dict()
    assert list(now) == list(state) and repr(model) == text
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ---------------------------------------------------------------------------------------------------------
# TinyTransformer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("compressed,zero_mean", [(False, "bake"), (False, "parametrize"), (True, "bake")])
def test_tiny_transformer_logits_equal(dtype, compressed, zero_mean):
    model = tiny(dtype)
    conv = copy.deepcopy(model)
    to_rmsnorm(conv, compressed=compressed, zero_mean=zero_mean)
    idx = tokens()
    with torch.enable_grad():
        ref, out = model(idx), conv(idx)
    assert out.requires_grad
    assert ref.abs().max() > 1.0
    assert max_diff(ref, out) <= TOL[dtype]
    kind = CRMSNorm if compressed else RMSNorm
    assert all(isinstance(m, kind) for m in (conv.norm_f, *[b.norm1 for b in conv.blocks]))
    assert not any(isinstance(m, nn.LayerNorm) for m in conv.modules())
    if compressed:
        assert conv.tok_emb.weight.shape[-1] == D - 1 and conv.head.in_features == D - 1


def test_tiny_transformer_fp64_matches_the_sheet_precision():
    model = tiny()
    for compressed in (False, True):
        conv = copy.deepcopy(model)
        to_rmsnorm(conv, compressed=compressed)
        assert max_diff(model(tokens()), conv(tokens())) < 1e-13  # the sheet measured ~3e-15


def test_returns_the_changed_names():
    model = tiny()
    names = to_rmsnorm(model)
    expected = {"tok_emb", "pos_emb", "norm_f"}
    for i in range(LAYERS):
        expected |= {f"blocks.{i}.norm1", f"blocks.{i}.norm2", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc2"}
    assert set(names) == expected and len(names) == len(expected)
    names = to_rmsnorm(tiny(), compressed=True)
    assert {"head", "blocks.0.attn.qkv", "blocks.2.mlp.fc1"} <= set(names)


def test_main_branch_is_zero_mean_after_conversion():
    model = tiny()
    to_rmsnorm(model)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for m in model.modules()
             if isinstance(m, RMSNorm)]
    hooks += [b.register_forward_hook(lambda mod, args, out: seen.append(out)) for b in model.blocks]
    model(tokens())
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * LAYERS + 1 + LAYERS
    assert max(x.mean(-1).abs().max().item() for x in seen) <= 1e-12


@pytest.mark.parametrize("compressed,zero_mean", [(False, "bake"), (False, "parametrize"), (True, "bake")])
def test_tied_head(compressed, zero_mean):
    model = tiny(tied_head=True)
    assert model.head.weight is model.tok_emb.weight
    conv = copy.deepcopy(model)
    names = to_rmsnorm(conv, compressed=compressed, zero_mean=zero_mean)
    assert max_diff(model(tokens()), conv(tokens())) <= 1e-9
    if zero_mean == "parametrize":  # the head keeps reading the raw table, still shared
        assert conv.head.weight is conv.tok_emb.parametrizations.weight.original
    else:
        assert conv.head.weight is not conv.tok_emb.weight and "head" in names


def test_eps_copied_per_layer():
    model = tiny()
    eps = {}
    for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        m.eps = 10.0 ** -(1 + i)  # 0.1 down to 1e-7: large enough to matter
        eps[i] = m.eps
    conv = copy.deepcopy(model)
    to_rmsnorm(conv)
    assert [m.eps for m in conv.modules() if isinstance(m, RMSNorm)] == list(eps.values())
    assert max_diff(model(tokens()), conv(tokens())) <= 1e-9
    crms = copy.deepcopy(model)
    to_rmsnorm(crms, compressed=True)
    assert [m.eps for m in crms.modules() if isinstance(m, CRMSNorm)] == list(eps.values())
    assert max_diff(model(tokens()), crms(tokens())) <= 1e-9


def test_layernorm_without_affine_or_bias():
    torch.manual_seed(0)
    model = perturb(TinyTransformer(VOCAB, D, 2, 4, max_len=16,
                                    norm_layer=lambda d: nn.LayerNorm(d, bias=False))).double().eval()
    model.norm_f = nn.LayerNorm(D, elementwise_affine=False).double()
    for compressed in (False, True):
        conv = copy.deepcopy(model)
        to_rmsnorm(conv, compressed=compressed)
        assert max_diff(model(tokens()), conv(tokens())) <= 1e-9
    conv = copy.deepcopy(model)
    to_rmsnorm(conv)
    assert conv.blocks[0].norm1.bias is None and conv.norm_f.weight is None


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_training_follows_pre_ln_with_parametrize(opt_name):
    """20 steps in float64: the Pre-RMSNorm model with writers recentred on the fly follows Pre-LN."""
    ref = tiny(n_layers=2)
    conv = copy.deepcopy(ref)
    to_rmsnorm(conv, zero_mean="parametrize")

    def make(m):
        if opt_name == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)

    opts = [make(ref), make(conv)]
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(20):
        idx = torch.randint(0, VOCAB, (B, T), generator=gen)
        target = torch.randint(0, VOCAB, (B, T), generator=gen)
        logits = []
        for m, opt in zip((ref, conv), opts):
            out = m(idx)
            logits.append(out.detach())
            loss = nn.functional.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        worst = max(worst, max_diff(*logits))
        assert worst <= 1e-10
    assert max_diff(ref(tokens()), conv(tokens())) <= 1e-10
    # the raw writer parameters took the very same steps as Pre-LN's
    torch.testing.assert_close(conv.blocks[1].mlp.fc2.parametrizations.weight.original,
                               ref.blocks[1].mlp.fc2.weight, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# negative controls


def _spec_without_rehearsal(model):
    return dataclasses.replace(builtin_spec(model), example_input=None)


def test_negative_control_one_writer_not_recentred(monkeypatch):
    model = tiny()
    conv = copy.deepcopy(model)
    skipped = conv.blocks[1].mlp.fc2
    original = pr.recentre_output_
    monkeypatch.setattr(pr, "recentre_output_", lambda w: None if w is skipped else original(w))
    to_rmsnorm(conv, spec=_spec_without_rehearsal(conv))
    assert max_diff(model(tokens()), conv(tokens())) > 1e-3


def test_negative_control_compressed_reader_not_corrected(monkeypatch):
    model = tiny()
    conv = copy.deepcopy(model)
    skipped = conv.blocks[0].mlp.fc1
    original = pr.compress_reader_

    def drop_only(r):
        if r is skipped:
            r.weight = nn.Parameter(r.weight[:, :-1].detach().clone())
            r.in_features -= 1
        else:
            original(r)

    monkeypatch.setattr(pr, "compress_reader_", drop_only)
    to_rmsnorm(conv, compressed=True, spec=_spec_without_rehearsal(conv))
    assert max_diff(model(tokens()), conv(tokens())) > 1e-3


def test_rehearsal_catches_a_spec_missing_a_writer():
    model = tiny()
    spec = builtin_spec(model)
    blocks = list(spec.blocks)
    blocks[3] = dataclasses.replace(blocks[3], writers=())  # blocks.1.mlp.fc2 forgotten
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"^blocks\.2\.norm1: its input is not the zero-mean"):
        to_rmsnorm(model, spec=dataclasses.replace(spec, blocks=tuple(blocks)))
    assert_untouched(model, snap)


# ---------------------------------------------------------------------------------------------------------
# errors leave the model untouched


def test_post_ln_raises():
    torch.manual_seed(0)
    model = TinyTransformer(VOCAB, D, 2, 4, placement="post").eval()
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"^blocks\.0\.norm1: Post-LN"):
        to_rmsnorm(model)
    assert_untouched(model, snap)


def test_unknown_architecture_raises():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 5))
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"Sequential.*no built-in Pre-LN spec"):
        to_rmsnorm(model)
    assert_untouched(model, snap)


class OffStream(nn.Module):
    """``x = emb; x = x + fc2(norm2(fc1(norm1(x)))); head(norm_f(x))``: norm2 reads the MLP hidden."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm1, self.fc1, self.norm2, self.fc2 = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D), \
            nn.Linear(D, D)
        self.norm_f, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.fc2(self.norm2(self.fc1(self.norm1(x))))
        return self.head(self.norm_f(x))


def test_layernorm_off_the_residual_stream_raises():
    model = perturb(OffStream()).double()
    spec = PreLNSpec(writers=("emb",),
                     blocks=(BlockSpec("norm1", ("fc1",), ()), BlockSpec("norm2", ("fc2",), ("fc2",))),
                     final_norm="norm_f", head=("head",), example_input=lambda m: (tokens(),))
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"^norm2: its input is not the zero-mean residual stream"):
        to_rmsnorm(model, spec=spec)
    assert_untouched(model, snap)


def test_custom_spec_converts_a_correct_model():
    class Net(OffStream):
        def forward(self, idx):
            x = self.emb(idx)
            x = x + self.fc1(self.norm1(x))
            x = x + self.fc2(self.norm2(x))
            return self.head(self.norm_f(x))

    model = perturb(Net()).double()
    spec = PreLNSpec(writers=("emb",), blocks=(BlockSpec("norm1", ("fc1",), ("fc1",)),
                                               BlockSpec("norm2", ("fc2",), ("fc2",))),
                     final_norm="norm_f", head=("head",), example_input=lambda m: (tokens(),))
    ref = copy.deepcopy(model)
    to_rmsnorm(model, spec=spec)
    assert max_diff(ref(tokens()), model(tokens())) <= 1e-9


def test_spec_naming_a_layer_of_the_wrong_width_raises():
    model = perturb(OffStream()).double()
    model.up, model.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
    snap = snapshot(model)
    block = BlockSpec("norm1", ("fc1",), ("fc2",))
    with pytest.raises(ConversionError, match=rf"^up: writes {2 * D} features into a stream of width {D}"):
        to_rmsnorm(model, spec=PreLNSpec(writers=("emb", "up"), blocks=(block,), final_norm="norm_f",
                                         head=("head",)))
    with pytest.raises(ConversionError, match=rf"^down: reads {2 * D} features from a stream of width {D}"):
        to_rmsnorm(model, spec=PreLNSpec(writers=("emb",), blocks=(block,), final_norm="norm_f",
                                         head=("head", "down")))
    assert_untouched(model, snap)


def test_compress_width_one_raises():
    torch.manual_seed(0)
    model = TinyTransformer(VOCAB, d_model=1, n_layers=1, n_heads=1, max_len=16).double().eval()
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"^blocks\.0\.norm1: a width-1 stream cannot be compressed"):
        to_rmsnorm(model, compressed=True)
    assert_untouched(model, snap)


def test_bad_arguments():
    with pytest.raises(ValueError, match="zero_mean"):
        to_rmsnorm(tiny(), zero_mean="fold")
    with pytest.raises(ValueError, match="parametrize' needs compressed=False"):
        to_rmsnorm(tiny(), compressed=True, zero_mean="parametrize")
    model = tiny()
    spec = dataclasses.replace(builtin_spec(model), writers=("tok_emb", "nope"))
    with pytest.raises(ConversionError, match="^nope: no such module"):
        to_rmsnorm(model, spec=spec)
    spec = dataclasses.replace(builtin_spec(model), writers=("tok_emb", "blocks.0.norm1"))
    with pytest.raises(ConversionError, match=r"^blocks\.0\.norm1: LayerNorm is not a writer"):
        to_rmsnorm(model, spec=spec)


# ---------------------------------------------------------------------------------------------------------
# state_dict, compile


@pytest.mark.parametrize("compressed,zero_mean", [(False, "bake"), (False, "parametrize"), (True, "bake")])
def test_state_dict_loads_into_a_fresh_converted_model(compressed, zero_mean):
    model = tiny()
    to_rmsnorm(model, compressed=compressed, zero_mean=zero_mean)
    fresh = tiny(seed=5)
    to_rmsnorm(fresh, compressed=compressed, zero_mean=zero_mean)
    assert max_diff(model(tokens()), fresh(tokens())) > 1e-3
    fresh.load_state_dict(model.state_dict())
    assert max_diff(model(tokens()), fresh(tokens())) == 0


@pytest.mark.parametrize("compressed", [False, True])
def test_torch_compile_aot_eager(compressed):
    model = tiny(torch.float32)
    to_rmsnorm(model, compressed=compressed)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(tokens())
    torch.testing.assert_close(out, model(tokens()), rtol=1e-5, atol=1e-5)
    out.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# torch.nn.TransformerEncoder


def encoder(dtype=torch.float64, final_norm=True, norm_first=True, eps=(1e-5, 1e-6)):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first, layer_norm_eps=eps[0])
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D, eps=eps[1]) if final_norm else None,
                                enable_nested_tensor=False)
    return perturb(enc).to(dtype).eval()


def src(dtype=torch.float64):
    return (torch.randn(B, T, D, generator=torch.Generator().manual_seed(2)) + 1.0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transformer_encoder_outputs_equal_with_and_without_grad(dtype, monkeypatch):
    model = encoder(dtype)
    conv = copy.deepcopy(model)
    names = to_rmsnorm(conv)
    assert {"", "layers.0", "layers.1", "layers.0.norm1", "norm", "layers.1.linear2"} <= set(names)
    assert all(type(layer) is PreRMSNormEncoderLayer for layer in conv.layers)
    x = src(dtype)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -3:] = True
    with torch.no_grad():
        ref_nograd = model(x)  # the reference may take torch's fast path: it is LayerNorm math anyway
        ref_masked = model(x, src_key_padding_mask=mask)
        ref_layer = model.layers[0](x)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("a converted layer took torch's fused LayerNorm fast path")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", no_fast_path)
    out = conv(x)
    assert out.requires_grad
    assert max_diff(model(x), out) <= TOL[dtype]
    with torch.no_grad():
        assert max_diff(ref_nograd, conv(x)) <= TOL[dtype]
        got = conv(x, src_key_padding_mask=mask)
        assert max_diff(ref_masked[:, :-3], got[:, :-3]) <= TOL[dtype]
        # one layer: the stream minus its mean
        got_layer = conv.layers[0](x - x.mean(-1, keepdim=True))
        assert max_diff(ref_layer - ref_layer.mean(-1, keepdim=True), got_layer) <= TOL[dtype]


def test_transformer_encoder_eps_per_layer_and_input_recentring():
    model = encoder(eps=(1e-2, 1e-3))
    conv = copy.deepcopy(model)
    to_rmsnorm(conv)
    assert conv.layers[0].norm1.eps == 1e-2 and conv.norm.eps == 1e-3
    x = src()
    assert max_diff(model(x), conv(x)) <= 1e-9
    assert max_diff(model(x + 5.0), conv(x + 5.0)) <= 1e-9  # whatever mean the outside input has


def test_transformer_encoder_parametrize_and_state_dict():
    model = encoder()
    conv = copy.deepcopy(model)
    to_rmsnorm(conv, zero_mean="parametrize")
    assert max_diff(model(src()), conv(src())) <= 1e-9
    fresh = encoder()
    to_rmsnorm(fresh, zero_mean="parametrize")
    fresh.load_state_dict(conv.state_dict())
    assert max_diff(fresh(src()), conv(src())) == 0


def test_transformer_encoder_compressed_raises_saying_why():
    model = encoder()
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"^layers\.0\.self_attn: .*MultiheadAttention cannot"):
        to_rmsnorm(model, compressed=True)
    assert_untouched(model, snap)


@pytest.mark.parametrize("kwargs,pattern", [({"final_norm": False}, r"^norm: .*without a final norm"),
                                            ({"norm_first": False}, r"^layers\.0\.norm1: Post-LN")])
def test_transformer_encoder_not_convertible(kwargs, pattern):
    model = encoder(**kwargs)
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=pattern):
        to_rmsnorm(model)
    assert_untouched(model, snap)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face GPT-2


def gpt2(dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    perturb(model)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(0.5)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("compressed,zero_mean", [(False, "bake"), (False, "parametrize"), (True, "bake")])
def test_gpt2_logits_equal(dtype, compressed, zero_mean):
    model = gpt2(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight
    conv = copy.deepcopy(model)
    names = to_rmsnorm(conv, compressed=compressed, zero_mean=zero_mean)
    idx = tokens()
    ref, out = model(idx).logits, conv(idx).logits
    assert out.requires_grad and ref.abs().max() > 1.0
    assert max_diff(ref, out) <= TOL[dtype]
    if zero_mean == "bake":
        assert "lm_head" in names and conv.lm_head.weight is not conv.transformer.wte.weight
        assert conv.config.tie_word_embeddings is False
    types = {type(m) for m in conv.modules()}
    assert nn.LayerNorm not in types and (CRMSNorm if compressed else RMSNorm) in types
    if compressed:
        assert conv.transformer.h[0].attn.c_attn.weight.shape[0] == D - 1
        assert conv.transformer.h[0].attn.c_proj.nf == D - 1


def test_gpt2_token_type_ids_and_state_dict():
    model = gpt2()
    conv = copy.deepcopy(model)
    to_rmsnorm(conv, compressed=True)
    tt = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(7))
    assert max_diff(model(tokens(), token_type_ids=tt).logits, conv(tokens(), token_type_ids=tt).logits) <= 1e-9
    fresh = gpt2()
    to_rmsnorm(fresh, compressed=True)
    fresh.load_state_dict(conv.state_dict())
    assert max_diff(fresh(tokens()).logits, conv(tokens()).logits) == 0


def test_gpt2_training_follows_pre_ln_with_tied_head():
    model = gpt2()
    conv = copy.deepcopy(model)
    to_rmsnorm(conv, zero_mean="parametrize")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, conv)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        idx = torch.randint(0, VOCAB, (B, T), generator=gen)
        logits = []
        for m, opt in zip((model, conv), opts):
            out = m(idx, labels=idx)
            logits.append(out.logits.detach())
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert max_diff(*logits) <= 1e-10


def test_transformer_encoder_layer_subclass_raises():
    class MyLayer(nn.TransformerEncoderLayer):
        pass

    torch.manual_seed(0)
    model = nn.TransformerEncoder(MyLayer(D, 4, 64, batch_first=True, norm_first=True), 1, norm=nn.LayerNorm(D),
                                  enable_nested_tensor=False)
    snap = snapshot(model)
    with pytest.raises(ConversionError, match=r"^layers\.0: MyLayer is not torch's own nn.TransformerEncoder"):
        to_rmsnorm(model)
    assert_untouched(model, snap)


def test_gpt2_model_without_head():
    transformers = pytest.importorskip("transformers")
    model = gpt2()
    base = model.transformer
    assert isinstance(base, transformers.GPT2Model)
    conv = copy.deepcopy(base)
    names = to_rmsnorm(conv)
    assert "ln_f" in names and "wte" in names
    assert max_diff(base(tokens()).last_hidden_state, conv(tokens()).last_hidden_state) <= 1e-9
    snap = snapshot(base)
    with pytest.raises(ConversionError, match=r"^ln_f: compressed=True needs the norm's readers"):
        to_rmsnorm(base, compressed=True)
    assert_untouched(base, snap)
