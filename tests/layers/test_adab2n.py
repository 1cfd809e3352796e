"""AdaB²N against the sheet's formulas written out here in float64 (adab2n.md, verification a)."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normlab.layers.adab2n import AdaB2N, adab2n_loss, end_task, set_task_counts

D = torch.float64


def data(shape=(6, 3, 2, 2), seed=0, scale=1.5, shift=0.7, dtype=D):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=gen, dtype=dtype) + shift


def randomize(m, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.weight, m.bias, m.task_weight):
            if p is not None:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype) + (1.0 if p is m.weight else 0.0))
    return m


def reference_weighted(x, task_weight, task_ids, t):
    """The official ``training_forward``'s statistics: ``conc = exp(tw[:t+1]) + n``, ``pi = conc / sum``,
    ``w_i = pi[task_i] / n[task_i]``, weighted mean of the spatial means, weighted biased variance."""
    n = torch.zeros(t + 1, dtype=D)
    for j in task_ids.tolist():
        n[j] += 1
    conc = task_weight[: t + 1].exp() + n
    pi = conc / conc.sum()
    w = pi[task_ids] / n[task_ids]
    dims = tuple(range(2, x.dim()))
    xbar = x.mean(dims) if dims else x
    mean = (w[:, None] * xbar).sum(0)
    shape = (1, -1) + (1,) * len(dims)
    dev = (x - mean.view(shape)).square()
    dev = dev.mean(dims) if dims else dev
    var = (w[:, None] * dev).sum(0)
    return mean, var, w


def plain_stats(x):
    dims = (0,) + tuple(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


def normalize(x, mean, var, weight, bias, eps=1e-5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)


def eta_closed_form(k, m, kappa):
    a = (1 - m) ** kappa
    return 1.0 / (sum(a ** i for i in range(k - 1)) + a ** (k - 1) / m ** kappa)


# ----------------------------------------------------------------------------------------------- BN parity


def test_kappa1_first_task_equals_batchnorm2d_and_running_var_rescaling():
    m, k = 0.1, 5
    ada = randomize(AdaB2N(3, 2, kappa=1.0, dtype=D))
    bn = nn.BatchNorm2d(3, dtype=D)
    with torch.no_grad():
        bn.weight.copy_(ada.weight)
        bn.bias.copy_(ada.bias)
    n = 6 * 2 * 2
    for step in range(k):
        x = data(seed=step, shift=0.3 * step)
        torch.testing.assert_close(ada(x), bn(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(ada.running_mean, bn.running_mean, atol=1e-12, rtol=0)
    init = (1 - m) ** k  # the init value 1, decayed: not rescaled
    torch.testing.assert_close(ada.running_var - init, (bn.running_var - init) * (n - 1) / n, atol=1e-12, rtol=0)
    wrong = bn.running_var / (n / (n - 1))  # the tempting formula is off by exactly (1-m)^k / n
    assert (ada.running_var - wrong).abs().max() == pytest.approx(init / n, rel=1e-9)
    assert int(ada.num_batches_tracked) == k and float(ada.last_eta) < 0  # kappa=1 never starts the recursion


def test_2d_input_equals_batchnorm1d():
    ada = randomize(AdaB2N(4, 3, dtype=D))
    bn = nn.BatchNorm1d(4, dtype=D)
    with torch.no_grad():
        bn.weight.copy_(ada.weight)
        bn.bias.copy_(ada.bias)
    for step in range(3):
        x = data((7, 4), seed=step)
        torch.testing.assert_close(ada(x), bn(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(ada.running_mean, bn.running_mean, atol=1e-12, rtol=0)
    ada.eval(), bn.eval()
    x = data((5, 4), seed=9)
    torch.testing.assert_close(ada(x), normalize(x, ada.running_mean, ada.running_var, ada.weight, ada.bias))


def test_kappa0_running_mean_is_the_cumulative_average():
    ada = AdaB2N(3, 2, kappa=0.0, dtype=D)
    means = []
    for step in range(7):
        x = data(seed=step, shift=step - 3.0)
        means.append(plain_stats(x)[0])
        ada(x)
    torch.testing.assert_close(ada.running_mean, torch.stack(means).mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kappa,at50,limit", [(0.1, 0.0255, 0.01048), (0.4, 0.0466, 0.04127), (0.7, 0.0724, 0.07110)])
def test_eta_sequence_matches_the_closed_form(kappa, at50, limit):
    ada = AdaB2N(1, 1, kappa=kappa, dtype=D)
    x = data((2, 1), seed=0)
    for k in range(1, 51):
        rm0 = ada.running_mean.clone()
        ada(x)
        eta = float(ada.last_eta)
        assert eta == pytest.approx(eta_closed_form(k, 0.1, kappa), rel=1e-12, abs=0)
        # the buffer holds the eta this step used
        assert float(ada.running_mean - rm0) == pytest.approx(eta * float(x.mean() - rm0), rel=1e-10)
    assert eta == pytest.approx(at50, abs=5e-5)
    assert eta > limit * 1.01  # still away from its limit at step 50 (the sheet: test the limit later)
    for _ in range(3000):
        ada._eta()
    assert float(ada.last_eta) == pytest.approx(1 - 0.9 ** kappa, rel=1e-10, abs=0)


def test_momentum_none_batchnorm_maps_to_kappa0():
    bn = nn.BatchNorm2d(3, momentum=None, dtype=D)
    with pytest.raises(ValueError, match="kappa=0"):
        AdaB2N.from_batchnorm(bn, 5)
    ada = AdaB2N.from_batchnorm(bn, 5, kappa=0.0)
    assert ada.momentum is None
    for step in range(4):
        x = data(seed=step, shift=step)
        torch.testing.assert_close(ada(x), bn(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(ada.running_mean, bn.running_mean, atol=1e-12, rtol=0)  # BN's cumulative average
    with pytest.raises(ValueError, match="needs kappa=0"):
        AdaB2N(3, 2, kappa=0.5, momentum=None)


# ------------------------------------------------------------------------------------- weighted statistics


def run_weighted(ada, x, task_ids):
    set_task_counts(ada, task_ids)
    return ada(x)


def test_very_negative_task_weight_gives_the_plain_statistics():
    ada = AdaB2N(3, 3, kappa=1.0, init_weight=-30.0, dtype=D)
    ada.end_task(), ada.end_task()
    x = data()
    y = run_weighted(ada, x, torch.tensor([0, 0, 1, 2, 2, 2]))
    mean, var = plain_stats(x)
    torch.testing.assert_close(y, normalize(x, mean, var, ada.weight, ada.bias), atol=1e-10, rtol=0)
    torch.testing.assert_close(ada.running_mean, 0.1 * mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(ada.running_var, 0.9 + 0.1 * var, atol=1e-10, rtol=0)


def test_one_task_batch_shrinks_the_statistics_by_pi():
    """All B samples from task j at cur_tasks >= 1: sum w_i = pi_j < 1, not the plain statistics."""
    ada = randomize(AdaB2N(3, 4, kappa=1.0, dtype=D))
    ada.end_task(), ada.end_task()
    x, j, b = data(), 1, 6
    y = run_weighted(ada, x, torch.full((b,), j))
    tw = ada.task_weight.detach()
    pi_j = (tw[j].exp() + b) / (tw[:3].exp().sum() + b)
    assert pi_j < 1
    mean = pi_j * plain_stats(x)[0]
    var = pi_j * (x - mean.view(1, -1, 1, 1)).square().mean((0, 2, 3))
    torch.testing.assert_close(y, normalize(x, mean, var, ada.weight, ada.bias), atol=1e-10, rtol=0)
    torch.testing.assert_close(ada.running_mean, 0.1 * mean, atol=1e-12, rtol=0)
    assert not torch.allclose(mean, plain_stats(x)[0])


@pytest.mark.parametrize("shape", [(6, 3, 2, 2), (6, 3), (6, 3, 4), (6, 3, 2, 2, 2)])
def test_absent_task_weights_are_not_renormalised(shape):
    ada = randomize(AdaB2N(3, 5, kappa=0.4, dtype=D))
    for _ in range(3):
        ada.end_task()
    x, task_ids = data(shape), torch.tensor([0, 3, 3, 0, 1, 3])  # task 2 absent
    y = run_weighted(ada, x, task_ids)
    mean, var, w = reference_weighted(x, ada.task_weight.detach(), task_ids, 3)
    assert float(w.sum()) < 1 - 1e-3
    torch.testing.assert_close(y, normalize(x, mean, var, ada.weight, ada.bias), atol=1e-10, rtol=0)
    eta = 0.1 ** 0.4
    torch.testing.assert_close(ada.running_mean, eta * mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(ada.running_var, (1 - eta) + eta * var, atol=1e-12, rtol=0)


def test_task_weight_gradient_matches_the_reference():
    ada = randomize(AdaB2N(3, 3, dtype=D))
    ada.end_task(), ada.end_task()
    x, task_ids, gy = data(), torch.tensor([2, 2, 2, 0, 1, 2]), data(seed=5)
    (run_weighted(ada, x, task_ids) * gy).sum().backward()
    tw = ada.task_weight.detach().clone().requires_grad_()
    mean, var, _ = reference_weighted(x, tw, task_ids, 2)
    (normalize(x, mean, var, ada.weight.detach(), ada.bias.detach()) * gy).sum().backward()
    torch.testing.assert_close(ada.task_weight.grad, tw.grad, atol=1e-10, rtol=0)
    assert tw.grad.abs().max() > 1e-3


def test_large_task_weights_do_not_overflow():
    ada = AdaB2N(3, 2, init_weight=800.0)  # exp(800) overflows float32 and float64
    ada.end_task()
    y = run_weighted(ada, data(dtype=torch.float32), torch.tensor([0, 0, 1, 1, 1, 1]))
    assert torch.isfinite(y).all() and torch.isfinite(ada.running_var).all()


# --------------------------------------------------------------------------------------------- regulariser


@pytest.mark.parametrize("kappa", [0.0, 0.1, 0.7, 1.0])
def test_regulariser_is_the_shrunk_distance_to_the_old_buffers(kappa):
    ada = randomize(AdaB2N(3, 3, kappa=kappa, dtype=D))
    ada.end_task()
    for step, ids in enumerate(([0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], None, [0, 1, 0, 1, 0, 0])):
        x = data(seed=step, shift=0.5 * step)
        rm0, rv0 = ada.running_mean.clone(), ada.running_var.clone()
        if ids is None:
            ada(x)
            mean, var = plain_stats(x)
        else:
            run_weighted(ada, x, torch.tensor(ids))
            mean, var, _ = reference_weighted(x, ada.task_weight.detach(), torch.tensor(ids), 1)
        k = int(ada.num_batches_tracked)
        eta = {0.0: 1 / k, 1.0: 0.1}.get(kappa) or eta_closed_form(k, 0.1, kappa)
        expected = (1 - eta) ** 2 * (F.mse_loss(mean, rm0) + F.mse_loss(var, rv0))
        assert float(ada.loss.detach()) == pytest.approx(float(expected), rel=1e-12, abs=0)
        assert float(adab2n_loss(ada).detach()) == float(ada.loss.detach())


def test_regulariser_target_is_detached_and_two_forwards_can_backward():
    model = nn.Sequential(AdaB2N(3, 2, dtype=D), AdaB2N(3, 2, dtype=D))
    end_task(model)
    x = data().requires_grad_()
    set_task_counts(model, torch.tensor([0, 0, 1, 1, 1, 0]))
    out1 = model(x)
    loss1 = adab2n_loss(model) + out1.square().mean()
    set_task_counts(model, torch.tensor([0, 1, 1, 1, 1, 0]))
    model(x)  # moves the buffers before loss1's backward: the official reference to the buffer would raise
    loss1.backward()
    assert model[0].task_weight.grad.abs().max() > 0
    assert float(adab2n_loss(model).detach()) == pytest.approx(float((model[0].loss + model[1].loss).detach()))


# ------------------------------------------------------------------------------------------------ task API


def test_set_task_counts_builds_the_three_tensors():
    ada = AdaB2N(3, 5)
    for _ in range(3):
        ada.end_task()
    ids = torch.tensor([3, 0, 3, 1, 3])
    set_task_counts(ada, ids)
    task_of_sample, count_of_sample, task_counts = ada._counts
    assert task_of_sample.tolist() == ids.tolist()
    assert count_of_sample.tolist() == [3, 1, 3, 1, 3]
    assert task_counts.tolist() == [1, 1, 0, 3]


def test_counts_are_consumed_by_one_forward_and_validated():
    ada = AdaB2N(3, 3, init_weight=1.0, dtype=D)
    ada.end_task()
    x = data()
    set_task_counts(ada, torch.tensor([1, 1, 1, 1, 1, 1]))
    weighted = ada(x)
    assert ada._counts is None
    ada.reset_running_stats()
    plain = ada(x)  # no counts: the plain statistics
    torch.testing.assert_close(plain, normalize(x, *plain_stats(x), ada.weight, ada.bias), atol=1e-10, rtol=0)
    assert not torch.allclose(weighted, plain)
    set_task_counts(ada, torch.tensor([0, 1, 1]))
    before = {k: v.clone() for k, v in ada.state_dict().items()}
    with pytest.raises(ValueError, match="batch of 3 samples"):
        ada(x)  # stale counts of another batch size
    assert all(torch.equal(v, ada.state_dict()[k]) for k, v in before.items())
    set_task_counts(ada, torch.tensor([0, 1, 1, 0, 0, 0]))
    ada.cur_tasks.add_(1)  # a task count that no longer matches (set_task_counts was called before)
    with pytest.raises(ValueError, match="cover 2 task"):
        ada(x)


def test_task_api_errors():
    ada = AdaB2N(3, 2)
    with pytest.raises(ValueError, match=r"in \[0, cur_tasks=0\]"):
        set_task_counts(ada, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, cur_tasks=0\]"):
        set_task_counts(ada, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        set_task_counts(ada, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        set_task_counts(ada, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="no AdaB2N"):
        set_task_counts(nn.Linear(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="no AdaB2N"):
        adab2n_loss(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no training forward"):
        adab2n_loss(ada)
    end_task(ada)
    set_task_counts(ada, torch.tensor([1, 0]))
    end_task(ada)
    assert ada._counts is None  # end_task drops pending counts
    with pytest.raises(ValueError, match="already ended"):
        end_task(ada)
    with pytest.raises(ValueError, match="have ended"):
        set_task_counts(ada, torch.tensor([0, 1]))
    model = nn.Sequential(AdaB2N(3, 3), AdaB2N(3, 3))
    model[0].end_task()
    with pytest.raises(ValueError, match="disagree on cur_tasks"):
        set_task_counts(model, torch.tensor([0]))
    with pytest.raises(ValueError, match="count_of_sample must be >= 1"):
        model[0].set_counts(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="takes 1 to 3"):
        model[0].set_counts(torch.tensor([0]), torch.tensor([1]), torch.tensor([1, 0, 0, 0]))


# -------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("weighted", [True, False])
def test_gradcheck_output_wrt_input_affine_and_task_weight(weighted):
    ada = randomize(AdaB2N(3, 2, kappa=0.4, dtype=D))
    if weighted:
        ada.end_task()
    ids = torch.tensor([0, 1, 1, 0, 1, 1]) if weighted else torch.zeros(6, dtype=torch.long)
    x = data().requires_grad_()
    params = {name: p.detach().clone().requires_grad_() for name, p in ada.named_parameters()}

    def f(x, weight, bias, task_weight):
        set_task_counts(ada, ids)
        return functional_call(ada, {"weight": weight, "bias": bias, "task_weight": task_weight}, (x,))

    assert torch.autograd.gradcheck(f, (x, params["weight"], params["bias"], params["task_weight"]))


@pytest.mark.parametrize("weighted", [True, False])
def test_gradcheck_regulariser_with_buffers_restored(weighted):
    """momentum 0 (eta = 0): the target is the constant old buffer, so the regulariser as a function of x
    and task_weight is exactly what its gradient differentiates."""
    ada = randomize(AdaB2N(3, 2, kappa=1.0, momentum=0.0, dtype=D))
    if weighted:
        ada.end_task()
    with torch.no_grad():
        ada.running_mean.copy_(data((3,), seed=3))
        ada.running_var.copy_(data((3,), seed=4).abs() + 0.5)
    saved = {k: v.clone() for k, v in ada.state_dict().items()}
    ids = torch.tensor([0, 1, 1, 0, 1, 1]) if weighted else torch.zeros(6, dtype=torch.long)

    def loss(x, task_weight):
        ada.load_state_dict(saved)
        set_task_counts(ada, ids)
        functional_call(ada, {"task_weight": task_weight}, (x,), strict=False)
        return ada.loss

    tw = saved["task_weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (data().requires_grad_(), tw))


def test_regulariser_gradient_treats_the_updated_buffers_as_constants():
    """eta > 0: the gradient is that of MSE(mean, rm_1) + MSE(var, rv_1) with the updated buffers held
    constant (official), i.e. (1 - eta) times the derivative of the loss value, whose target moves with x."""
    ada = randomize(AdaB2N(3, 3, kappa=0.4, dtype=D))
    ada.end_task(), ada.end_task()
    ids = torch.tensor([0, 2, 2, 0, 1, 2])
    x = data().requires_grad_()
    run_weighted(ada, x, ids)
    ada.loss.backward()
    rm1, rv1 = ada.running_mean.clone(), ada.running_var.clone()
    xr, tw = x.detach().clone().requires_grad_(), ada.task_weight.detach().clone().requires_grad_()
    mean, var, _ = reference_weighted(xr, tw, ids, 2)
    (F.mse_loss(mean, rm1) + F.mse_loss(var, rv1)).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ada.task_weight.grad, tw.grad, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------ state, modes and dtypes


def test_state_dict_round_trip_resumes_bit_exactly():
    def step(m, i):
        x = data(seed=10 + i, shift=0.2 * i).float()
        set_task_counts(m, torch.tensor([0, 1, 2, 2, 1, 2]))
        y = m(x)
        (y.square().mean() + adab2n_loss(m)).backward()
        return y

    a = randomize(AdaB2N(3, 4, kappa=0.4))
    end_task(a), end_task(a)
    for i in range(3):
        step(a, i)
    assert float(a.last_eta) > 0
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = AdaB2N(3, 4, kappa=0.4)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert set(a.state_dict()) >= {"running_mean", "running_var", "num_batches_tracked", "cur_tasks", "last_eta",
                                   "task_weight"}
    a.zero_grad(), b.zero_grad()
    ya, yb = step(a, 3), step(b, 3)
    assert torch.equal(ya, yb) and torch.equal(a.loss, b.loss)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_eval_uses_running_statistics_and_changes_nothing():
    ada = randomize(AdaB2N(3, 2, kappa=0.4, dtype=D))
    ada.end_task()
    for i in range(3):
        run_weighted(ada, data(seed=i), torch.tensor([0, 1, 1, 0, 1, 1]))
    ada.eval()
    set_task_counts(ada, torch.tensor([0, 1, 1]))  # eval neither reads nor consumes counts
    before = {k: v.clone() for k, v in ada.state_dict().items()}
    x = data((2, 3, 2, 2), seed=7)
    torch.testing.assert_close(ada(x), normalize(x, ada.running_mean, ada.running_var, ada.weight, ada.bias))
    assert all(torch.equal(v, ada.state_dict()[k]) for k, v in before.items())
    assert ada._counts is not None
    ada(x[:1])  # a single sample is fine in eval mode


def test_from_batchnorm_copies_state_and_errors():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, dtype=D)
    bn(data((5, 4, 3, 3)))
    bn(data((5, 4, 3, 3), seed=1))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    bn.eval()
    ada = AdaB2N.from_batchnorm(bn, num_tasks=5, kappa=0.4, init_weight=0.5)
    assert (ada.eps, ada.momentum, ada.kappa, ada.num_tasks, ada.training) == (1e-3, 0.3, 0.4, 5, False)
    assert ada.running_mean.dtype == D and torch.equal(ada.task_weight, torch.full((5,), 0.5, dtype=D))
    for name in AdaB2N.batchnorm_state:
        assert torch.equal(getattr(ada, name), getattr(bn, name)), name
    x = data((2, 4, 3, 3), seed=2)
    torch.testing.assert_close(ada(x), bn(x))  # eval: the same map
    plain = AdaB2N.from_batchnorm(nn.BatchNorm2d(4, affine=False), 2)
    assert plain.weight is None and plain.bias is None and plain.training
    plain(data((2, 4, 3, 3)).float())
    with pytest.raises(ValueError, match="running statistics"):
        AdaB2N.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False), 2)
    with pytest.raises(TypeError, match="BatchNorm"):
        AdaB2N.from_batchnorm(nn.LayerNorm(4), 2)


def test_bfloat16_input_statistics_in_float32():
    ada32, ada16 = randomize(AdaB2N(3, 2)), randomize(AdaB2N(3, 2))
    ada32.end_task(), ada16.end_task()
    x = data(dtype=torch.float32).bfloat16()
    ids = torch.tensor([0, 1, 1, 0, 1, 1])
    y16 = run_weighted(ada16, x, ids)
    y32 = run_weighted(ada32, x.float(), ids)
    assert y16.dtype == torch.bfloat16 and ada16.running_mean.dtype == torch.float32
    torch.testing.assert_close(y16, y32.bfloat16())
    torch.testing.assert_close(ada16.running_var, ada32.running_var, atol=1e-7, rtol=0)
    assert ada16.loss.dtype == torch.float32
    ada16.eval()
    assert ada16(x).dtype == torch.bfloat16


def test_input_errors_leave_buffers_untouched():
    ada = AdaB2N(3, 2)
    before = {k: v.clone() for k, v in ada.state_dict().items()}
    with pytest.raises(ValueError, match="more than one value per channel"):
        ada(torch.randn(1, 3))
    with pytest.raises(ValueError, match="non-empty batch"):
        ada(torch.randn(0, 3, 2, 2))
    with pytest.raises(ValueError, match="expected 3 channels in dim 1, got 4"):
        ada(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="got 1D"):
        ada(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        ada(torch.ones(2, 3, dtype=torch.long))
    assert all(torch.equal(v, ada.state_dict()[k]) for k, v in before.items())
    y = ada(torch.randn(1, 3, 2, 2))  # batch size 1 with 4 values per channel: fine, no NaN
    assert torch.isfinite(y).all()
    ada.eval()
    with pytest.raises(ValueError, match="non-empty batch"):
        ada(torch.randn(0, 3))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_features": 0}, "num_features"), ({"num_tasks": 0}, "num_tasks"), ({"kappa": 1.5}, "kappa"),
    ({"momentum": -0.1}, "momentum"), ({"eps": -1.0}, "eps"), ({"init_weight": math.inf}, "init_weight")])
def test_invalid_hyperparameters(kwargs, match):
    args = {"num_features": 3, "num_tasks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        AdaB2N(**args)


def test_reset_and_repr():
    ada = randomize(AdaB2N(3, 2, kappa=0.4, init_weight=-1.0))
    ada.end_task()
    run_weighted(ada, torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 1]))
    ada.reset_parameters()
    assert torch.equal(ada.running_mean, torch.zeros(3)) and torch.equal(ada.running_var, torch.ones(3))
    assert int(ada.num_batches_tracked) == 0 and float(ada.last_eta) < 0 and int(ada.cur_tasks) == 1
    assert torch.equal(ada.task_weight, torch.full((2,), -1.0)) and torch.equal(ada.weight, torch.ones(3))
    assert repr(ada) == ("AdaB2N(3, num_tasks=2, kappa=0.4, momentum=0.1, eps=1e-05, init_weight=-1.0, "
                         "affine=True)")


def test_torch_compile_aot_eager_matches_eager():
    eager = randomize(AdaB2N(3, 3, kappa=0.4))
    compiled_module = randomize(AdaB2N(3, 3, kappa=0.4))
    end_task(eager), end_task(compiled_module)
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for i, ids in enumerate(([0, 1, 1, 0, 1, 1], None, [1, 1, 1, 1, 1, 1])):
        x = data(seed=i, dtype=torch.float32)
        outs = []
        for module, fn in ((eager, eager), (compiled_module, compiled)):
            if ids is not None:
                set_task_counts(module, torch.tensor(ids))
            y = fn(x)
            (y.square().mean() + module.loss).backward()
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(compiled_module.state_dict()[key], value, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(compiled_module.task_weight.grad, eager.task_weight.grad, atol=1e-6, rtol=1e-5)
    eager.eval(), compiled_module.eval()
    x = data(seed=9, dtype=torch.float32)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
