"""What the normlab optimizers share (optim/_common.py): validation, gradient collection, the routing rule
of SWAN and SinkGD, their Adam fallback (torch's own Adam/AdamW, bit for bit) and state accounting."""

import math
from collections import defaultdict

import pytest
import torch
from torch import nn

from gloo import run_gloo
from normlab.bench.tasks import GPT
from normlab.optim import _common
from normlab.optim._common import (adam_fallback_step, check_betas, check_nonnegative, check_positive, grads_of,
                                   optimizer_state_bytes, split_matrix_params)


def _names(model, params):
    ids = {id(p) for p in params}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def test_routing_of_the_claim_check_model():
    model = GPT()
    matrix, fallback = split_matrix_params(model)
    block_linears = [f"blocks.{b}.{lin}.weight" for b in range(2)
                     for lin in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2")]
    assert _names(model, matrix) == block_linears
    assert sum(p.numel() for p in matrix) == 393_216
    by_name = dict(zip(_names(model, fallback), fallback))
    assert sum(p.numel() for p in fallback) == 75_008
    assert by_name["tok_emb.weight"].numel() == 32_768 and by_name["pos_emb.weight"].numel() == 8_192
    assert by_name["head.weight"].numel() == 32_768
    assert sum(p.numel() for n, p in by_name.items() if "ln" in n) == 1_280 and len(by_name) == 13


def test_exclude_replaces_the_default_head_rule():
    model = GPT()
    matrix, fallback = split_matrix_params(model, exclude=["blocks.0.attn.q"])
    assert "blocks.0.attn.q.weight" in _names(model, fallback)
    assert "head.weight" in _names(model, matrix) and len(matrix) == 12
    assert len(split_matrix_params(model, exclude=[])[0]) == 13
    with pytest.raises(ValueError, match=r"exclude names no module: \['blocks.9'\]"):
        split_matrix_params(model, exclude=["blocks.9"])


def test_shared_tensors_go_to_the_fallback_once():
    model = GPT()
    model.head.weight = model.tok_emb.weight  # a tied head: shared by an Embedding and a Linear
    matrix, fallback = split_matrix_params(model, exclude=[])
    assert all(p is not model.head.weight for p in matrix)
    assert sum(p is model.head.weight for p in fallback) == 1
    a, b, head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    b.weight = a.weight  # two Linears share one matrix
    matrix, fallback = split_matrix_params(nn.Sequential(a, b, head))
    assert matrix == [] and sum(p is a.weight for p in fallback) == 1


def test_a_module_reused_in_two_places_is_still_one_matrix():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(5, 2))
    matrix, _ = split_matrix_params(model)
    assert matrix == [shared.weight]


def test_only_linear_weights_with_both_dims_above_one():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), MyLinear(4, 6), nn.Linear(6, 1), nn.Linear(1, 6),
                          nn.LayerNorm(6), nn.Linear(6, 3))
    matrix, fallback = split_matrix_params(model)
    assert matrix == [model[2].weight]  # the subclass; (1, 6) and (6, 1) weights and the conv are not
    assert {id(p) for p in matrix} | {id(p) for p in fallback} == {id(p) for p in model.parameters()}
    assert len(matrix) + len(fallback) == len(list(model.parameters()))


def _adam_models(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3)).to(dtype)
    model[3].weight.requires_grad_(False)  # a parameter without a gradient: no state, untouched
    twin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3)).to(dtype)
    twin.load_state_dict(model.state_dict())
    twin[3].weight.requires_grad_(False)
    return model, twin


def _grad_step(model, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(9, 5, generator=g, dtype=dtype)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_adam_fallback_step_is_torch_adam_bit_for_bit(decoupled, foreach):
    model, twin = _adam_models()
    params = list(model.parameters())
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    reference = torch_cls(twin.parameters(), lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                          foreach=foreach)
    state = defaultdict(dict)
    for step in range(6):
        _grad_step(model, step)
        _grad_step(twin, step)
        with torch.no_grad():
            adam_fallback_step(params, state, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                               decoupled=decoupled, foreach=foreach)
        reference.step()
    for p, q in zip(params, twin.parameters()):
        assert torch.equal(p, q)
        if not q.requires_grad:
            assert p not in state
            continue
        assert set(state[p]) == set(reference.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in state[p]:
            assert torch.equal(state[p][key], reference.state[q][key])
            assert state[p][key].dtype == reference.state[q][key].dtype


def test_adam_fallback_foreach_equals_the_loop_in_float64_for_every_state_tensor():
    model, twin = _adam_models(torch.float64)
    loop, multi = defaultdict(dict), defaultdict(dict)
    for step in range(5):
        for m, state, foreach in ((model, loop, False), (twin, multi, True)):
            _grad_step(m, step, torch.float64)
            with torch.no_grad():
                adam_fallback_step(list(m.parameters()), state, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=0.01, decoupled=True, foreach=foreach)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)
        if p.requires_grad:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(loop[p][key], multi[q][key], rtol=1e-14, atol=1e-15)


def test_adam_fallback_step_refuses_sparse_gradients_and_skips_missing_ones():
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    state = defaultdict(dict)
    adam_fallback_step([p, q], state, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True,
                       foreach=None)
    assert state == {} and torch.equal(p, torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        adam_fallback_step([p], state, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True,
                           foreach=None)


def test_grads_of():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, c.grad = torch.ones(2), torch.full((2,), 2.0)
    params, grads = grads_of([a, b, c], "X")
    assert params == [a, c] and grads[0] is a.grad and grads[1] is c.grad
    b.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="X does not support sparse gradients"):
        grads_of([a, b], "X")


def test_optimizer_state_bytes_counts_every_state_tensor():
    model = GPT()
    adamw = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(adamw) == 0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adamw.step()
    assert optimizer_state_bytes(adamw) == 8 * 468_224 + 4 * 25  # moments + one float32 step per tensor
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.step()
    assert optimizer_state_bytes(sgd) == 0
    double = nn.Linear(3, 2).double()
    adam = torch.optim.Adam(double.parameters())
    for p in double.parameters():
        p.grad = torch.ones_like(p)
    adam.step()
    assert optimizer_state_bytes(adam) == 16 * 8 + 4 * 2


@pytest.mark.parametrize("check, value", [(check_positive, 0.0), (check_positive, -1), (check_positive, math.nan),
                                          (check_nonnegative, -1e-9), (check_nonnegative, math.nan),
                                          (check_positive, "1")])
def test_checks_reject(check, value):
    with pytest.raises(ValueError, match=f"Invalid lr: {value}"):
        check("lr", value)


def test_checks_accept():
    check_positive("lr", 1e-3)
    check_positive("lr", torch.tensor(0.1))
    check_nonnegative("weight_decay", 0)
    check_betas((0.0, 0.999))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
        check_betas((0.9, 1.0))
    with pytest.raises(ValueError, match="need two values"):
        check_betas((0.9,))


def _dtensor_errors(rank, world):
    """On a 1-rank gloo group: what SWAN, SinkGD and reject_dtensor say about a DTensor parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from normlab.optim.sinkgd import SinkGD
    from normlab.optim.swan import SWAN

    mesh = init_device_mesh("cpu", (world,))
    weight = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    errors = []
    for make in (lambda: _common.reject_dtensor(weight, "SWAN"), lambda: SWAN([weight]), lambda: SinkGD([weight])):
        try:
            make()
            errors.append(None)
        except TypeError as exc:
            errors.append(str(exc))
    fallback = SWAN([{"params": [weight], "use_swan": False}])  # Adam handles DTensor shards itself
    return errors, len(fallback.param_groups)


def test_dtensor_parameters_are_refused_by_the_matrix_optimizers():
    (errors, fallback_groups), = run_gloo(_dtensor_errors, 1)
    assert all(e is not None and "DTensor" in e and "(8, 4)" in e for e in errors), errors
    assert "SWAN needs whole weight matrices" in errors[1] and "SinkGD needs whole weight matrices" in errors[2]
    assert fallback_groups == 1
    _common.reject_dtensor(torch.zeros(2, 2), "SWAN")  # a plain tensor passes
