import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.training import tract as T
from normlab.training.tract import (TrActConv2d, TrActLinear, convert_first_layer, tract, tract_conv2d,
                                    tract_linear)

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def linear_layer(n, m, seed=0, bias=True):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(n, m, bias=bias, dtype=D)


def conv_layer(cin, cout, k, stride=1, padding=0, seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Conv2d(cin, cout, k, stride, padding, dtype=D, **kw)


def grads(layer, x, upstream):
    """(output, grad_x, grad_W, grad_b) of <layer(x), upstream> by torch.autograd.grad."""
    x = x.detach().requires_grad_(True)
    out = layer(x)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    gs = torch.autograd.grad((out * upstream).sum(), params)
    return (out, *gs) if layer.bias is not None else (out, *gs, None)


def ridge_grad(rows, g, lam):
    """Reference: G^T x (x^T x / b + lambda I)^{-1} with an explicit float64 inverse."""
    n = rows.shape[1]
    return g.T @ rows @ torch.linalg.inv(rows.T @ rows / rows.shape[0] + lam * torch.eye(n, dtype=rows.dtype))


# ---------------------------------------------------------------- Linear equivalence checks


@pytest.mark.parametrize("b,n,m", [(40, 8, 5), (3, 12, 4)])  # b > n (n x n system) and b < n (Woodbury)
def test_linear_forward_input_and_bias_grads_match_plain_layer_and_weight_grad_matches_formula(b, n, m):
    plain = linear_layer(n, m)
    layer = tract(plain, 0.1)
    x, up = randn(b, n, seed=1), randn(b, m, seed=2)
    out0, gx0, gw0, gb0 = grads(plain, x, up)
    out1, gx1, gw1, gb1 = grads(layer, x, up)
    assert torch.equal(out0, out1)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-12)
    torch.testing.assert_close(gb1, gb0, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw1, ridge_grad(x, up, 0.1), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(gw1, gw0)  # the weight gradient really changed


def test_both_branch_formulas_agree():
    for b, n in ((50, 10), (6, 10)):
        a, g = randn(b, n, seed=3), randn(b, 4, seed=4)
        primal, dual = T._solve_primal(a, g, 0.1), T._solve_dual(a, g, 0.1)
        torch.testing.assert_close(primal, dual, rtol=0, atol=1e-12)


def test_linear_leading_dims_are_flattened_into_rows():
    plain = linear_layer(6, 3)
    layer = tract(plain, 0.3)
    x, up = randn(2, 5, 6, seed=5), randn(2, 5, 3, seed=6)
    out, gx, gw, gb = grads(layer, x, up)
    assert out.shape == (2, 5, 3) and gx.shape == x.shape
    assert torch.equal(out, plain(x))
    torch.testing.assert_close(gw, ridge_grad(x.reshape(-1, 6), up.reshape(-1, 3), 0.3), rtol=1e-10, atol=1e-12)
    x1 = randn(6, seed=7)
    assert torch.equal(layer(x1), plain(x1))  # a single unbatched vector is one row


def test_large_lambda_recovers_scaled_ordinary_gradient():
    for layer_fn, x_shape, up_shape in ((lambda: linear_layer(8, 5), (30, 8), (30, 5)),
                                        (lambda: conv_layer(2, 3, 3), (4, 2, 6, 6), (4, 3, 4, 4))):
        plain = layer_fn()
        x, up = randn(*x_shape, seed=8), randn(*up_shape, seed=9)
        _, _, gw0, _ = grads(plain, x, up)
        _, _, gw1, _ = grads(tract(plain, 1e6), x, up)
        assert ((1e6 * gw1 - gw0).norm() / gw0.norm()).item() < 1e-4


def test_sgd_step_is_the_ridge_fit_of_the_activation_proposal():
    """Hand-derived: one SGD step W' = W - eta grad_W solves min_W' (1/b)||x W'^T - z*||^2 + lambda ||W' - W||^2
    with the output proposal z* = z - b eta G (bias held fixed); solved here by lstsq on the stacked system."""
    b, n, m, lam, eta = 20, 6, 3, 0.2, 0.05
    plain = linear_layer(n, m, bias=False)
    layer = tract(plain, lam)
    x, y = randn(b, n, seed=10), randn(b, m, seed=11)
    w0 = plain.weight.detach().clone()
    z = x @ w0.T
    g = 2 * (z - y)  # dL/dz of the summed squared error
    target = z - b * eta * g
    opt = torch.optim.SGD(layer.parameters(), lr=eta)
    loss = ((layer(x) - y) ** 2).sum()
    layer.weight.grad = torch.autograd.grad(loss, layer.weight)[0]
    opt.step()
    # stacked least squares: [x / sqrt(b); sqrt(lambda) I] W'^T = [z* / sqrt(b); sqrt(lambda) W^T]
    lhs = torch.cat([x / b ** 0.5, lam ** 0.5 * torch.eye(n, dtype=D)])
    rhs = torch.cat([target / b ** 0.5, lam ** 0.5 * w0.T])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-10, atol=1e-12)


def test_empty_batch_gives_zero_weight_grad():
    layer = tract(linear_layer(4, 2))
    _, _, gw, gb = grads(layer, torch.zeros(0, 4, dtype=D), torch.zeros(0, 2, dtype=D))
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


# ---------------------------------------------------------------- Conv2d equivalence checks


def conv_reference(plain, x, up, lam):
    """reshape(dW_std @ inv(a^T a / N + lambda I)): dW_std by autograd through the plain conv, a by unfold."""
    _, _, gw_std, _ = grads(plain, x, up)
    a = F.unfold(x, plain.kernel_size, padding=plain.padding, stride=plain.stride)
    a = a.transpose(1, 2).reshape(-1, a.shape[1])
    inv = torch.linalg.inv(a.T @ a / a.shape[0] + lam * torch.eye(a.shape[1], dtype=D))
    return (gw_std.reshape(gw_std.shape[0], -1) @ inv).reshape(gw_std.shape)


@pytest.mark.parametrize("batch,cin,k,size,stride,padding", [
    (4, 2, 3, 7, 1, 0), (4, 2, 3, 7, 2, 1), (3, 3, 3, 6, 1, 1), (2, 2, 3, 8, 2, 0),
    (1, 4, 5, 5, 1, 0),  # N = 1 patch row < n = 100: the Woodbury branch
    (1, 3, 4, 5, 2, 1),  # N = 4 < n = 48
])
def test_conv_matches_plain_conv_and_unfold_formula(batch, cin, k, size, stride, padding):
    plain = conv_layer(cin, 5, k, stride, padding)
    layer = tract(plain, 0.1)
    x = randn(batch, cin, size, size, seed=12)
    out0 = plain(x)
    up = randn(*out0.shape, seed=13)
    _, gx0, _, gb0 = grads(plain, x, up)
    out1, gx1, gw1, gb1 = grads(layer, x, up)
    assert torch.equal(out0, out1)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-12)
    torch.testing.assert_close(gb1, gb0, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw1, conv_reference(plain, x, up, 0.1), rtol=1e-9, atol=1e-12)


def test_conv_same_and_valid_padding():
    for padding in ("same", "valid"):
        plain = conv_layer(2, 3, 3, padding=padding)
        layer = TrActConv2d(2, 3, 3, padding=padding, dtype=D)
        layer.load_state_dict(plain.state_dict())
        x = randn(2, 2, 6, 6, seed=14)
        out = plain(x)
        up = randn(*out.shape, seed=15)
        out1, _, gw, _ = grads(layer, x, up)
        assert torch.equal(out, out1)
        ref_plain = conv_layer(2, 3, 3, padding=1 if padding == "same" else 0)
        ref_plain.load_state_dict(plain.state_dict())
        torch.testing.assert_close(gw, conv_reference(ref_plain, x, up, 0.1), rtol=1e-9, atol=1e-12)
    with pytest.raises(NotImplementedError, match="even kernel"):
        TrActConv2d(2, 3, 4, padding="same")


def test_no_bias_layers():
    for plain, x in ((linear_layer(5, 3, bias=False), randn(7, 5)), (conv_layer(2, 3, 3, bias=False),
                                                                      randn(2, 2, 5, 5))):
        layer = tract(plain)
        assert layer.bias is None
        out, _, gw, gb = grads(layer, x, torch.ones_like(plain(x)))
        assert gb is None and gw.shape == plain.weight.shape and torch.equal(out, plain(x))


def test_functional_forms_match_modules():
    x, w, b = randn(9, 4), randn(3, 4, seed=1), randn(3, seed=2)
    assert torch.equal(tract_linear(x, w, b, 0.5), F.linear(x, w, b))
    xc, wc = randn(2, 2, 6, 6), randn(4, 2, 3, 3, seed=3)
    assert torch.equal(tract_conv2d(xc, wc, None, 2, 1), F.conv2d(xc, wc, None, 2, 1))


# ---------------------------------------------------------------- peer: the official torch_tract


def test_parity_with_torch_tract():
    peer = pytest.importorskip("torch_tract")
    for seed, (b, n, m) in enumerate([(30, 8, 5), (4, 16, 3), (64, 64, 10)]):
        plain = linear_layer(n, m, seed=seed)
        ref, mine = peer.TrAct(plain, l=0.1), tract(plain, 0.1)  # both share plain's Parameters
        x, up = randn(b, n, seed=seed), randn(b, m, seed=seed + 10)
        _, gx0, gw0, gb0 = grads(ref, x, up)
        _, gx1, gw1, gb1 = grads(mine, x, up)
        for got, want in ((gx1, gx0), (gw1, gw0), (gb1, gb0.reshape(-1))):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for seed, (batch, cin, k, size, stride, padding) in enumerate([(3, 2, 3, 7, 1, 0), (2, 3, 3, 8, 2, 1),
                                                                    (1, 4, 5, 5, 1, 0)]):
        plain = conv_layer(cin, 4, k, stride, padding, seed=seed)
        ref, mine = peer.TrAct(plain, l=0.1), tract(plain, 0.1)
        x = randn(batch, cin, size, size, seed=seed)
        up = randn(*ref(x).shape, seed=seed + 10)
        _, gx0, gw0, gb0 = grads(ref, x, up)
        _, gx1, gw1, gb1 = grads(mine, x, up)
        for got, want in ((gx1, gx0), (gw1, gw0), (gb1, gb0)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- modules, conversion, state


def test_state_dict_interchangeable_and_parameters_shared():
    plain = nn.Sequential(conv_layer(1, 4, 3), nn.ReLU(), nn.Flatten(), linear_layer(4 * 36, 10))
    converted = copy.deepcopy(plain)
    assert convert_first_layer(converted, "0", 0.2) == ["0"]
    assert isinstance(converted[0], TrActConv2d) and converted[0].lambda_ == 0.2
    assert converted.state_dict().keys() == plain.state_dict().keys()
    fresh = nn.Sequential(conv_layer(1, 4, 3, seed=5), nn.ReLU(), nn.Flatten(), linear_layer(4 * 36, 10, seed=5))
    fresh.load_state_dict(converted.state_dict())
    converted.load_state_dict(plain.state_dict())
    x = randn(2, 1, 8, 8)
    assert torch.equal(fresh(x), plain(x)) and torch.equal(converted(x), plain(x))
    layer = plain[0]
    shared = tract(layer)
    assert shared.weight is layer.weight and shared.bias is layer.bias


def test_convert_nested_name_and_train_mode_kept():
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(linear_layer(4, 3), nn.ReLU()))
    model.eval()
    weight = model.stem[0].weight
    assert convert_first_layer(model, "stem.0") == ["stem.0"]
    assert isinstance(model.stem[0], TrActLinear) and model.stem[0].weight is weight
    assert not model.stem[0].training
    assert list(model.stem[0].buffers()) == []
    x = randn(3, 4)
    model.train()
    out_train = model(x)
    model.eval()
    assert torch.equal(out_train, model(x))  # no train/eval difference


@pytest.mark.parametrize("bad,error,match", [
    (lambda: nn.Conv2d(2, 3, 3, dilation=2), NotImplementedError, "dilation"),
    (lambda: nn.Conv2d(2, 4, 3, groups=2), NotImplementedError, "groups"),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), NotImplementedError, "padding_mode"),
    (lambda: nn.Conv2d(2, 3, 4, padding="same"), NotImplementedError, "even kernel"),
    (lambda: nn.Conv1d(2, 3, 3), NotImplementedError, "Conv1d"),
    (lambda: nn.Conv3d(2, 3, 3), NotImplementedError, "Conv3d"),
    (lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(3, 3), TypeError, "NonDynamicallyQuantizable"),
    (lambda: nn.ReLU(), TypeError, "ReLU"),
])
def test_unsupported_layers_raise_and_leave_the_model_untouched(bad, error, match):
    model = nn.Sequential(bad(), nn.ReLU())
    before = model[0]
    with pytest.raises(error, match=match):
        convert_first_layer(model, "0")
    assert model[0] is before
    with pytest.raises(error, match=match):
        tract(before)


def test_convert_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no submodule 'head'"):
        convert_first_layer(model, "head")
    with pytest.raises(ValueError, match="qualified name"):
        convert_first_layer(model, "")
    with pytest.raises(ValueError, match="lambda_"):
        convert_first_layer(model, "0", lambda_=0.0)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("lam", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_lambda_raises(lam):
    with pytest.raises(ValueError, match="lambda_ must be a finite number > 0"):
        TrActLinear(3, 2, lambda_=lam)
    with pytest.raises(ValueError, match="lambda_"):
        tract_linear(randn(2, 3), randn(2, 3), None, lam)


def test_bad_input_shapes_raise():
    with pytest.raises(ValueError, match="last dim 3"):
        TrActLinear(3, 2)(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        TrActConv2d(2, 3, 3)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="padding"):
        tract_conv2d(randn(1, 2, 5, 5), randn(3, 2, 3, 3), padding="full")


def test_retract_changes_lambda_only():
    layer = TrActLinear(3, 2, lambda_=0.1)
    again = tract(layer, 2.0)
    assert again.lambda_ == 2.0 and again.weight is layer.weight and "lambda_=2.0" in repr(again)


def test_bfloat16_solves_in_float32():
    plain = nn.Linear(6, 4, dtype=torch.bfloat16)
    layer = tract(plain)
    x = torch.randn(10, 6, generator=gen(1)).bfloat16()
    up = torch.randn(10, 4, generator=gen(2)).bfloat16()
    out, _, gw, _ = grads(layer, x, up)
    assert out.dtype == gw.dtype == torch.bfloat16
    expected = ridge_grad(x.double(), up.double(), 0.1)
    torch.testing.assert_close(gw.double(), expected, rtol=2e-2, atol=2e-2)


def test_works_with_adam_and_fits_a_badly_scaled_regression():
    lin = TrActLinear(5, 1, bias=False, dtype=D)
    w_true = randn(1, 5, seed=21)
    x = randn(200, 5, seed=22) * torch.tensor([10.0, 1.0, 0.1, 1.0, 3.0], dtype=D)
    y = x @ w_true.T
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    start = F.mse_loss(lin(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        F.mse_loss(lin(x), y).backward()
        opt.step()
    assert F.mse_loss(lin(x), y).item() < 1e-2 * start
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_compiles_with_aot_eager():
    layer = TrActConv2d(2, 3, 3, padding=1, dtype=D)
    compiled = torch.compile(layer, backend="aot_eager")
    x = randn(2, 2, 5, 5)
    up = randn(2, 3, 5, 5, seed=3)
    eager = grads(layer, x, up)
    comp = grads(compiled, x, up)
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
