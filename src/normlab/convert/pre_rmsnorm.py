"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm: an exact conversion of a Pre-LN transformer.

Paper: Jiang, Gu, Zhu, Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient
Pre-LN Transformers", NeurIPS 2023, arXiv:2305.14858; code: ZixuanJiang/pre-rmsnorm-transformer.

In a Pre-LN transformer every LayerNorm reads the residual stream, and ``LN(x + c 1) = LN(x)``. So the
mean of the stream is dead weight: recentre every *writer* (token/position embeddings, the last layer
of every residual branch) along its output dimension and the stream is zero-mean for every input,
where ``LN(x) = RMSNorm(x)`` exactly (same eps, inside the sqrt). ``compressed=True`` goes one step
further: a zero-mean d-vector is stored as its first d-1 coordinates, writers drop their last output
feature, readers (after the LN affine is folded into them) become ``W[:, :-1] - W[:, -1:]``, and the
norms become :class:`~normlab.CRMSNorm` of width d-1.

``zero_mean="bake"`` recentres the writers once (fastest inference). ``zero_mean="parametrize"``
recentres them on the fly (``torch.nn.utils.parametrize`` with :class:`~normlab.convert.fuse.ZeroMean`,
the official code's ``LinearZeroMeanOutput``) and keeps gain and bias on the RMSNorm: the raw parameters
then get exactly the Pre-LN gradients, so any elementwise optimizer (SGD, Adam, AdamW with weight decay)
follows the Pre-LN trajectory. A tied LM head stays tied to the raw table in that mode (it reads the
final norm, not the stream); ``"bake"`` and ``compressed=True`` untie it first (copying the weight),
since recentring the table would otherwise change the head. ``compressed=True`` promises inference
equivalence only (the compressed coordinates are not an orthogonal reparametrisation) and takes
``zero_mean="bake"``.

What gets converted comes from a :class:`PreLNSpec` (writers, blocks = norm + its readers + its
writers, final norm + head) or, for architectures normlab knows, from a built-in spec picked by the
model's type: normlab's :class:`~normlab.bench.tasks.TinyTransformer` (``placement="pre"``),
``torch.nn.TransformerEncoder`` whose layers are ``norm_first=True`` (with its final norm) and Hugging
Face ``GPT2LMHeadModel`` / ``GPT2Model`` (``Conv1D`` layers, tied head, cross-attention blocks).

Checks, all before the model is touched: the spec's modules exist and are of a kind normlab can
rewrite, widths agree, norms are LayerNorms over the stream width; then the conversion is rehearsed on
a float64 copy with the spec's ``example_input``, checking that the input of every norm is zero-mean
after recentring (a Post-LN block, a LayerNorm off the residual stream or a writer missing from the spec
shows up there) and that the outputs agree. Any failure raises :class:`ConversionError` naming the
module and leaves the model untouched.

``nn.TransformerEncoder``: its input comes from outside, so the converter cannot recentre what feeds
it; it registers a forward pre-hook (:class:`RecentreInput`) that subtracts the mean of the input once
at the encoder entry (``LN`` ignores it, the RMSNorm needs it gone), and swaps every converted
``nn.TransformerEncoderLayer`` to :class:`PreRMSNormEncoderLayer`, which never takes torch's fused fast
path (that path hard-codes LayerNorm math on ``norm1.weight``/``norm1.bias`` in eval/no-grad).
``compressed=True`` raises for it: ``nn.MultiheadAttention`` cannot read a d-1 wide stream. Without
a final norm the encoder's output is the raw stream, which is not convertible exactly (raises).

Hugging Face GPT-2: equivalence holds for ``input_ids`` (and ``token_type_ids``, read through ``wte``);
``inputs_embeds`` given from outside are not recentred, and the intermediate ``hidden_states`` are the
recentred stream (logits and ``last_hidden_state`` are equal). The converted state_dict loads into a
freshly converted model (not into ``from_pretrained`` of the original config: widths differ when
compressed, and ``config.tie_word_embeddings`` is set to False when the head was untied).

Deviations from the sheet's API proposal: one function ``to_rmsnorm(model, compressed=False, spec=None,
zero_mean="bake")`` (as the issue names it) in place of ``pre_ln_to_pre_rmsnorm`` /
``pre_ln_to_pre_crmsnorm``; gain and bias are kept on the RMSNorm for ``compressed=False`` (never
folded), since that is what makes training exact.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..layers.layernorm import CRMSNorm, RMSNorm
from .fuse import (ConversionError, ZeroMean, compress_reader_, compress_writer_, fold_norm_affine,
                   reader_in_features, recentre_output_, writer_out_features, writer_tensors)

__all__ = ["BlockSpec", "ConversionError", "PreLNSpec", "PreRMSNormEncoderLayer", "RecentreInput", "builtin_spec",
           "to_rmsnorm"]


@dataclass(frozen=True)
class BlockSpec:
    """One pre-norm slot: ``stream += writer(...(reader(norm(stream))))``.

    ``norm``: the LayerNorm reading the residual stream; ``readers``: every layer that consumes its output
    (q/k/v or qkv, fc1 or gate+up); ``writers``: the last layer of each branch it feeds (attention
    out-projection, fc2/down_proj), whose output is added to the stream. Names are qualified module names.
    """

    norm: str
    readers: tuple[str, ...]
    writers: tuple[str, ...]


@dataclass(frozen=True)
class PreLNSpec:
    """Where a Pre-LN model writes to and reads from its residual stream.

    ``writers``: what starts the stream (embedding modules, position tables or CLS tokens as qualified
    parameter names, patch-embedding Linear/Conv); ``blocks``: the pre-norm slots in order;
    ``final_norm`` and ``head`` (its readers; empty when the final norm's output is the model's output);
    ``recentre_input``: modules whose first input starts the stream from outside (``""`` = the model),
    recentred on entry by a :class:`RecentreInput` pre-hook; ``example_input(model) -> args``: inputs for
    the float64 rehearsal that checks the spec (None skips it).
    """

    writers: tuple[str, ...]
    blocks: tuple[BlockSpec, ...]
    final_norm: str
    head: tuple[str, ...] = ()
    recentre_input: tuple[str, ...] = ()
    example_input: Callable[[nn.Module], tuple] | None = field(default=None, compare=False)

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(b.norm for b in self.blocks) + (self.final_norm,)

    def readers_of(self, norm: str) -> tuple[str, ...]:
        if norm == self.final_norm:
            return self.head
        return next(b.readers for b in self.blocks if b.norm == norm)

    @property
    def all_writers(self) -> tuple[str, ...]:
        return self.writers + tuple(w for b in self.blocks for w in b.writers)

    @property
    def all_readers(self) -> tuple[str, ...]:
        return tuple(r for b in self.blocks for r in b.readers) + self.head


class RecentreInput:
    """Forward pre-hook ``x -> x - x.mean(-1)`` on a module's first input: the exact entry of a stream
    that an outside writer feeds."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0] - args[0].mean(-1, keepdim=True),) + tuple(args[1:]), kwargs
        first = next(iter(inspect.signature(module.forward).parameters))
        kwargs = dict(kwargs)
        kwargs[first] = kwargs[first] - kwargs[first].mean(-1, keepdim=True)
        return args, kwargs


class PreRMSNormEncoderLayer(nn.TransformerEncoderLayer):
    """A converted ``norm_first`` :class:`torch.nn.TransformerEncoderLayer`: the same modules and
    state_dict, but ``forward`` always runs the module path, never torch's fused fast path (which reads
    ``norm1``/``norm2`` as LayerNorm parameters in eval/no-grad and would silently compute LayerNorm)."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src + self._sa_block(self.norm1(src), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + self._ff_block(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------
# built-in specs


def _token_input(vocab: int, max_len: int) -> Callable[[nn.Module], tuple]:
    def make(model: nn.Module) -> tuple:
        gen = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        return (torch.randint(0, vocab, (2, min(7, max_len)), generator=gen).to(device),)
    return make


def _tiny_transformer_spec(model: nn.Module) -> PreLNSpec:
    for i, block in enumerate(model.blocks):
        if block.placement != "pre":
            raise ConversionError(f"blocks.{i}.norm1: Post-LN block (placement={block.placement!r}): its norm's "
                                  "output is the residual stream itself, so Pre-RMSNorm is not equivalent")
    if model.norm_f is None:
        raise ConversionError("norm_f: missing final norm: the head would read the raw residual stream")
    blocks = []
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        blocks += [BlockSpec(p + "norm1", (p + "attn.qkv",), (p + "attn.proj",)),
                   BlockSpec(p + "norm2", (p + "mlp.fc1",), (p + "mlp.fc2",))]
    return PreLNSpec(writers=("tok_emb", "pos_emb"), blocks=tuple(blocks), final_norm="norm_f", head=("head",),
                     example_input=_token_input(model.tok_emb.num_embeddings, model.max_len))


def _encoder_input(model: nn.Module) -> tuple:
    gen = torch.Generator().manual_seed(0)
    p = next(model.parameters())
    d = model.layers[0].self_attn.embed_dim
    return (torch.randn(2, 5, d, generator=gen, dtype=p.dtype).add_(0.7).to(p.device),)


def _transformer_encoder_spec(model: nn.TransformerEncoder) -> PreLNSpec:
    blocks = []
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        if type(layer) not in (nn.TransformerEncoderLayer, PreRMSNormEncoderLayer):
            raise ConversionError(f"layers.{i}: {type(layer).__name__} is not torch's own "
                                  "nn.TransformerEncoderLayer (a subclass's forward may take torch's fused "
                                  "LayerNorm fast path); pass a spec and make sure it never takes that path")
        if not layer.norm_first:
            raise ConversionError(f"layers.{i}.norm1: Post-LN layer (norm_first=False): its norm's output is the "
                                  "residual stream itself, so Pre-RMSNorm is not equivalent")
        blocks += [BlockSpec(p + "norm1", (p + "self_attn",), (p + "self_attn.out_proj",)),
                   BlockSpec(p + "norm2", (p + "linear1",), (p + "linear2",))]
    if model.norm is None:
        raise ConversionError("norm: nn.TransformerEncoder without a final norm returns the raw residual stream, "
                              "whose mean Pre-RMSNorm removes; give it norm=nn.LayerNorm(d) to convert")
    return PreLNSpec(writers=(), blocks=tuple(blocks), final_norm="norm", head=(), recentre_input=("",),
                     example_input=_encoder_input)


def _gpt2_spec(model: nn.Module) -> PreLNSpec:
    config = model.config
    has_head = hasattr(model, "lm_head")
    p = "transformer." if has_head else ""
    blocks = []
    for i in range(config.n_layer):
        h = f"{p}h.{i}."
        blocks.append(BlockSpec(h + "ln_1", (h + "attn.c_attn",), (h + "attn.c_proj",)))
        if getattr(config, "add_cross_attention", False):
            blocks.append(BlockSpec(h + "ln_cross_attn", (h + "crossattention.q_attn",),
                                    (h + "crossattention.c_proj",)))
        blocks.append(BlockSpec(h + "ln_2", (h + "mlp.c_fc",), (h + "mlp.c_proj",)))
    return PreLNSpec(writers=(p + "wte", p + "wpe"), blocks=tuple(blocks), final_norm=p + "ln_f",
                     head=("lm_head",) if has_head else (),
                     example_input=_token_input(config.vocab_size, config.n_positions))


def _is_transformers(model: nn.Module, names: tuple[str, ...]) -> bool:
    return any(c.__name__ in names and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def builtin_spec(model: nn.Module) -> PreLNSpec:
    """The built-in :class:`PreLNSpec` for ``model``'s type; :class:`ConversionError` when there is none or
    the model is not Pre-LN."""
    from ..bench.tasks import TinyTransformer

    if isinstance(model, TinyTransformer):
        return _tiny_transformer_spec(model)
    if isinstance(model, nn.TransformerEncoder):
        return _transformer_encoder_spec(model)
    if _is_transformers(model, ("GPT2LMHeadModel", "GPT2Model")):
        return _gpt2_spec(model)
    raise ConversionError(f"<model> ({type(model).__name__}): no built-in Pre-LN spec for this architecture "
                          "(known: TinyTransformer, nn.TransformerEncoder, GPT2LMHeadModel, GPT2Model); "
                          "pass spec=PreLNSpec(...)")


# ---------------------------------------------------------------------------------------------------------
# checks


def _get(model: nn.Module, name: str) -> nn.Module | nn.Parameter:
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise ConversionError(f"{name}: no such module or parameter in {type(model).__name__}") from None


def _check_static(model: nn.Module, spec: PreLNSpec, compressed: bool) -> int:
    """Every check that does not run the model; returns the stream width d."""
    if not spec.blocks and not spec.final_norm:
        raise ConversionError("spec: no norms to convert")
    names = spec.norms + spec.all_writers + spec.all_readers + spec.recentre_input
    for name in names:
        _get(model, name)
    d = None
    for name in spec.norms:
        norm = _get(model, name)
        if not isinstance(norm, nn.LayerNorm):
            raise ConversionError(f"{name}: expected an nn.LayerNorm, got {type(norm).__name__}")
        if len(norm.normalized_shape) != 1:
            raise ConversionError(f"{name}: LayerNorm over {tuple(norm.normalized_shape)}: only a norm over the "
                                  "last dim reads a residual stream of vectors")
        width = norm.normalized_shape[0]
        if d is None:
            d = width
        elif width != d:
            raise ConversionError(f"{name}: width {width} differs from the stream width {d} of {spec.norms[0]}")
    if len(set(spec.norms)) != len(spec.norms):
        raise ConversionError("spec: a norm is listed twice")
    for names, features, verb in ((spec.all_writers, writer_out_features, "writes {} features into"),
                                  (spec.all_readers, reader_in_features, "reads {} features from")):
        for name in names:
            try:
                width = features(_get(model, name))
            except TypeError as err:
                raise ConversionError(f"{name}: {err}") from None
            if width != d:
                raise ConversionError(f"{name}: {verb.format(width)} a stream of width {d}")
    for name in spec.all_readers:
        if compressed and isinstance(_get(model, name), nn.MultiheadAttention):
            raise ConversionError(f"{name}: compressed=True needs every reader to read a d-1 wide stream, and "
                                  "nn.MultiheadAttention cannot (its embed_dim is both the query width and the "
                                  "attention output width); use compressed=False")
    if compressed:
        if d == 1:
            raise ConversionError(f"{spec.norms[0]}: a width-1 stream cannot be compressed (d-1 = 0)")
        for name in spec.norms:
            if not spec.readers_of(name):
                raise ConversionError(f"{name}: compressed=True needs the norm's readers to absorb its gain, bias "
                                      "and the compression; the spec lists none (its output would leave d-1 wide)")
        twice = [r for r in dict.fromkeys(spec.all_readers) if spec.all_readers.count(r) > 1]
        if twice:
            raise ConversionError(f"{twice[0]}: listed as a reader of two norms; its gain cannot be folded twice")
        if spec.recentre_input:
            raise ConversionError(f"{spec.recentre_input[0] or '<model>'}: compressed=True cannot compress a "
                                  "stream fed from outside the model")
    return d


# ---------------------------------------------------------------------------------------------------------
# the conversion


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """``id(parameter) -> [(owner module, attribute, qualified name)]`` over every parameter, shared ones included."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, attr, f"{mod_name}.{attr}" if mod_name else attr))
    return out


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def _untie(model: nn.Module, spec: PreLNSpec, keep_reader_ties: bool, changed: list[str]) -> None:
    """Give every non-writer holder of a writer's parameter its own copy (an LM head tied to the table)."""
    holders = _holders(model)
    writer_params: dict[int, set[str]] = {}
    for name in spec.all_writers:
        w = _get(model, name)
        tensors = [(name, w)] if isinstance(w, torch.Tensor) else \
            [(f"{name}.{t}", getattr(w, t)) for t, _ in writer_tensors(w)]
        for qual, t in tensors:
            writer_params.setdefault(id(t), set()).add(qual)
    reader_prefixes = tuple(r + "." for r in spec.all_readers)
    for pid, quals in writer_params.items():
        for owner, attr, qual in holders.get(pid, []):
            if qual in quals:
                continue
            if keep_reader_ties and qual.startswith(reader_prefixes):
                continue
            p = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            changed.append(qual.rpartition(".")[0] or qual)
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False


def _new_norm(ln: nn.LayerNorm, d: int, compressed: bool) -> nn.Module:
    ref = ln.weight if ln.weight is not None else ln.bias
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    if compressed:
        return CRMSNorm(d - 1, eps=ln.eps, elementwise_affine=False, **factory)
    norm = RMSNorm(d, eps=ln.eps, elementwise_affine=ln.elementwise_affine, bias=ln.bias is not None, **factory)
    with torch.no_grad():
        if ln.weight is not None:
            norm.weight.copy_(ln.weight)
        if ln.bias is not None:
            norm.bias.copy_(ln.bias)
    norm.train(ln.training)
    return norm


def _set(model: nn.Module, name: str, value: nn.Module) -> None:
    parent, attr = _split(name)
    setattr(model.get_submodule(parent), attr, value)


def _apply(model: nn.Module, spec: PreLNSpec, compressed: bool, zero_mean: str, d: int) -> list[str]:
    changed: list[str] = []
    _untie(model, spec, keep_reader_ties=zero_mean == "parametrize" and not compressed, changed=changed)
    if compressed:
        for norm_name in spec.norms:
            fold_norm_affine(_get(model, norm_name), [_get(model, r) for r in spec.readers_of(norm_name)])
    seen: set[int] = set()
    for name in spec.all_writers:
        w = _get(model, name)
        if id(w) in seen:
            continue
        seen.add(id(w))
        if zero_mean == "bake":
            recentre_output_(w)
        elif isinstance(w, torch.Tensor):
            owner_name, attr = _split(name)
            parametrize.register_parametrization(model.get_submodule(owner_name), attr, ZeroMean(-1))
        else:
            for t, axis in writer_tensors(w):
                parametrize.register_parametrization(w, t, ZeroMean(axis))
        if compressed:
            if isinstance(w, torch.Tensor):
                owner_name, attr = _split(name)
                setattr(model.get_submodule(owner_name), attr,
                        nn.Parameter(w.detach()[..., :-1].clone(), requires_grad=w.requires_grad))
            else:
                compress_writer_(w)
        changed.append(name)
    if compressed:
        done: set[int] = set()
        for name in spec.all_readers:
            r = _get(model, name)
            if id(r) not in done:
                done.add(id(r))
                compress_reader_(r)
                changed.append(name)
    for name in spec.norms:
        _set(model, name, _new_norm(_get(model, name), d, compressed))
        changed.append(name)
    for name in spec.recentre_input:
        _get(model, name).register_forward_pre_hook(RecentreInput(), with_kwargs=True)
        changed.append(name)
    norms = set(spec.norms)
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if type(mod) is nn.TransformerEncoderLayer and {prefix + "norm1", prefix + "norm2"} & norms:
            mod.__class__ = PreRMSNormEncoderLayer
            changed.append(name)
        if isinstance(mod, nn.TransformerEncoder) and any(n.startswith(prefix + "layers.") for n in norms):
            mod.use_nested_tensor = False
    return list(dict.fromkeys(changed))


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    raise ConversionError(f"<model>: cannot find a tensor in its output of type {type(out).__name__}")


def _rehearse(model: nn.Module, spec: PreLNSpec, compressed: bool, zero_mean: str, d: int) -> None:
    """Convert float64 copies and check every norm's input is zero-mean and the outputs agree."""
    def fresh() -> nn.Module:
        return copy.deepcopy(model).double().eval()

    reference = fresh()
    args = spec.example_input(reference)
    with torch.no_grad():
        expected = _first_tensor(reference(*args)).clone()
    del reference
    twin = fresh()
    _apply(twin, spec, False, zero_mean if not compressed else "bake", d)
    stats: dict[str, tuple[float, float]] = {}

    def watch(name: str):
        def hook(module, inputs):
            x = inputs[0].detach()
            mean = x.mean(-1).abs().max().item()
            rms = x.square().mean(-1).sqrt().max().item()
            prev = stats.get(name, (0.0, 0.0))
            stats[name] = (max(prev[0], mean), max(prev[1], rms))
        return hook

    handles = [_get(twin, n).register_forward_pre_hook(watch(n)) for n in spec.norms]
    with torch.no_grad():
        got = _first_tensor(twin(*args))
    for h in handles:
        h.remove()
    for name in spec.norms:
        if name not in stats:
            raise ConversionError(f"{name}: not called by the model on the spec's example input")
        mean, rms = stats[name]
        if mean > 1e-7 * max(rms, 1e-30):
            raise ConversionError(
                f"{name}: its input is not the zero-mean residual stream after recentring every writer "
                f"(|mean| {mean:.2e}, rms {rms:.2e}): a Post-LN block, a LayerNorm off the residual stream, "
                "or a writer into the stream missing from the spec")
    _compare(expected, got, "Pre-RMSNorm")
    if compressed:
        twin = fresh()
        _apply(twin, spec, True, "bake", d)
        with torch.no_grad():
            got = _first_tensor(twin(*args))
        _compare(expected, got, "Pre-CRMSNorm")


def _compare(expected: torch.Tensor, got: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item() + 1.0
    if got.shape != expected.shape or not torch.isfinite(got).all():
        raise ConversionError(f"<model>: the {what} rehearsal changed the output shape or produced non-finite "
                              f"values ({tuple(expected.shape)} -> {tuple(got.shape)})")
    diff = (got - expected).abs().max().item()
    if diff > 1e-8 * scale:
        raise ConversionError(f"<model>: the {what} rehearsal in float64 changed the output by {diff:.2e}: "
                              "something reads the residual stream without a listed norm")


def to_rmsnorm(model: nn.Module, compressed: bool = False, spec: PreLNSpec | None = None,
               zero_mean: str = "bake") -> list[str]:
    """Convert a Pre-LN transformer, in place, into the equivalent Pre-RMSNorm (``compressed=False``) or
    Pre-CRMSNorm (``compressed=True``) model and return the qualified names it changed.

    ``spec`` says where the stream is written and read (default: the built-in spec of the model's type);
    ``zero_mean`` is ``"bake"`` (recentre the writers once) or ``"parametrize"`` (recentre them on the fly,
    training-exact; ``compressed=False`` only). Raises :class:`ConversionError` (a ``ValueError``) naming
    the module, and leaves the model untouched, when the model cannot be converted exactly.
    """
    if zero_mean not in ("bake", "parametrize"):
        raise ValueError(f"zero_mean must be 'bake' or 'parametrize', got {zero_mean!r}")
    if compressed and zero_mean == "parametrize":
        raise ValueError("zero_mean='parametrize' needs compressed=False: a compressed stream keeps d-1 free "
                         "coordinates and has no mean to remove on the fly")
    if spec is None:
        spec = builtin_spec(model)
    d = _check_static(model, spec, compressed)
    if spec.example_input is not None:
        _rehearse(model, spec, compressed, zero_mean, d)
    return _apply(model, spec, compressed, zero_mean, d)
