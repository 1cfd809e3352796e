"""What SWAN and SinkGD share as matrix-wise optimizers: the fallback groups are torch's AdamW bit for
bit, the matrices keep no state (so the state bytes are the fallback Adam's alone, the sheets' numbers
on the claim-check GPT) and a fresh optimizer every step is the same optimizer."""

import copy

import pytest
import torch
from torch import nn

from normlab.bench.tasks import GPT
from normlab.optim import SWAN, SinkGD, optimizer_state_bytes, sinkgd_param_groups, swan_param_groups

#: (class, group flag that routes a group to the Adam fallback when False, routing helper)
MATRIX_OPTIMIZERS = {"swan": (SWAN, "use_swan", swan_param_groups),
                     "sinkgd": (SinkGD, "use_sinkgd", sinkgd_param_groups)}


def _lm_step(model, opt, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()


@pytest.mark.parametrize("name", sorted(MATRIX_OPTIMIZERS))
def test_fallback_groups_are_torch_adamw_bit_for_bit(name):
    cls, flag, _ = MATRIX_OPTIMIZERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    opt = cls([{"params": model.parameters(), flag: False}], lr=1e-2, betas=(0.85, 0.98), adam_eps=1e-7,
              weight_decay=0.02)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.02)
    for step in range(5):
        x = torch.randn(10, 6, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], reference.state[q][key])


@pytest.mark.parametrize("name", sorted(MATRIX_OPTIMIZERS))
def test_matrices_keep_no_state_and_memory_is_the_fallback_adam(name):
    cls, _, param_groups = MATRIX_OPTIMIZERS[name]
    torch.manual_seed(0)
    model = GPT()
    groups = param_groups(model, lr=1e-3)
    opt = cls(groups)
    for step in range(3):
        _lm_step(model, opt, step)
    assert all(p not in opt.state for p in groups[0]["params"]) and len(groups[0]["params"]) == 12
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in groups[1]["params"])
    moments = sum(st[k].numel() * st[k].element_size() for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert moments == 8 * 75_008 == 600_064
    assert optimizer_state_bytes(opt) == 600_064 + 4 * 13  # + torch's float32 step counter per Adam tensor
    adamw = torch.optim.AdamW(model.parameters())
    _lm_step(model, adamw, 0)
    assert optimizer_state_bytes(adamw) == 8 * 468_224 + 4 * 25 == 3_745_792 + 100


@pytest.mark.parametrize("name", sorted(MATRIX_OPTIMIZERS))
def test_stateless_a_fresh_optimizer_every_step_is_the_same_optimizer(name):
    cls, _, _ = MATRIX_OPTIMIZERS[name]
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Tanh(), nn.Linear(20, 6, bias=False))
    b = copy.deepcopy(a)
    kept = cls(a.parameters(), lr=0.05)
    for step in range(10):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
        a.zero_grad()
        a(x).square().mean().backward()
        kept.step()
        b.zero_grad()
        b(x).square().mean().backward()
        cls(b.parameters(), lr=0.05).step()
    assert all(not st for st in kept.state.values())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", sorted(MATRIX_OPTIMIZERS))
def test_all_zero_gradient_leaves_the_weight_unchanged(name):
    cls, _, _ = MATRIX_OPTIMIZERS[name]
    w = nn.Parameter(torch.randn(6, 9))
    before = w.detach().clone()
    w.grad = torch.zeros(6, 9)
    cls([w], lr=0.5).step()
    assert torch.equal(w, before)
