"""The torch.optim conventions every stochastic normlab optimizer keeps (DESIGN.md, "Optimizers"):
bit-exact resume through ``state_dict``, closures, sparse gradients refused, invalid lr refused, a
``torch.compile``-d step equal to the eager one, and ``DistributedDataParallel`` on 2 gloo ranks equal
to one process on the whole batch."""

import copy
import io

import pytest
import torch
from torch import nn

import normlab
from gloo import run_gloo
from normlab import optim

OPTIMIZERS = {
    "adamp": lambda m, **kw: optim.AdamP(m.parameters(), **{"lr": 1e-2, "weight_decay": 1e-2, **kw}),
    "sgdp": lambda m, **kw: optim.SGDP(m.parameters(), **{"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                                          "weight_decay": 1e-4, **kw}),
    "diffgrad": lambda m, **kw: optim.DiffGrad(m.parameters(), **{"lr": 1e-2, "weight_decay": 1e-3, **kw}),
    "swan": lambda m, **kw: optim.SWAN(optim.swan_param_groups(m, **{"lr": 1e-2, **kw})),
    "sinkgd": lambda m, **kw: optim.SinkGD(optim.sinkgd_param_groups(m, **{"lr": 1e-2, **kw})),
}


def _model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def _batch(step: int, n: int = 16, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rows: slice = slice(None)) -> None:
    for step in steps:
        x, y = _batch(step, dtype=next(model.parameters()).dtype)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_factory_name_builds_the_class(name):
    model = _model()
    built = OPTIMIZERS[name](model)
    assert isinstance(built, type(normlab.create_optimizer(name, built.param_groups, lr=1e-2)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_resume_is_bit_exact(name):
    straight, resumed = _model(), _model()
    opt = OPTIMIZERS[name](straight)
    _train(straight, opt, range(20))
    first = OPTIMIZERS[name](resumed)
    _train(resumed, first, range(10))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh_model = _model(seed=1)
    fresh_model.load_state_dict(saved["model"])
    fresh = OPTIMIZERS[name](fresh_model)
    fresh.load_state_dict(saved["opt"])
    _train(fresh_model, fresh, range(10, 20))
    for a, b in zip(straight.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_with_closure_returns_the_loss(name):
    model = _model()
    opt = OPTIMIZERS[name](model)
    x, y = _batch(0)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_gradients_are_refused(name):
    model = _model()
    opt = OPTIMIZERS[name](model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_invalid_lr_is_refused(name):
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        OPTIMIZERS[name](_model(), lr=-1.0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_matches_eager(name):
    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    eager, compiled = OPTIMIZERS[name](eager_model), OPTIMIZERS[name](compiled_model)
    compiled_step = torch.compile(compiled.step, backend="aot_eager")
    for step in range(3):
        x, y = _batch(step)
        for model, opt, step_fn in ((eager_model, eager, eager.step), (compiled_model, compiled, compiled_step)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            step_fn()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def _ddp_runs(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    half = 16 // world
    out = {}
    for name, make in OPTIMIZERS.items():
        model = nn.parallel.DistributedDataParallel(_model(dtype=torch.float64))
        _train(model, make(model.module), range(10), slice(rank * half, (rank + 1) * half))
        out[name] = [p.detach() for p in model.module.parameters()]
    return out


@pytest.fixture(scope="module")
def ddp_ranks():
    """Every optimizer trained 10 steps under DDP, each of 2 gloo ranks on half of each batch, in float64:
    SWAN's whitening divides by the smallest singular values of an ill-conditioned batch-16 gradient, so
    float32 summation-order differences between 2 ranks and 1 process grow to ~1e-6 on their own."""
    return run_gloo(_ddp_runs, 2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_ddp_on_two_gloo_ranks_equals_one_process_on_the_whole_batch(name, ddp_ranks):
    single = _model(dtype=torch.float64)
    _train(single, OPTIMIZERS[name](single), range(10))
    for p0, p1, ref in zip(ddp_ranks[0][name], ddp_ranks[1][name], single.parameters()):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, ref.detach(), rtol=1e-6, atol=1e-6)
