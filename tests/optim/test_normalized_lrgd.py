"""Normalized LR+GD and its relatives: the sheet's hand-derived steps, the perceptron limit, the iteration
bounds, Thm 4.1's loss unreliability, the input checks and the scikit-learn estimator contract."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import check_estimator

from normlab.optim.normalized_lrgd import (
    METHODS, LogisticGDClassifier, fit_separator, labels01_to_pm1, margin, separator_step,
)

F64 = torch.float64


def worst_case(n):
    """Thm 5.1: (0.5, -1) labelled +1 and n - 1 copies of (-0.5, -1) labelled -1."""
    X = torch.tensor([[0.5, -1.0]] + [[-0.5, -1.0]] * (n - 1), dtype=F64)
    y = torch.tensor([1.0] + [-1.0] * (n - 1), dtype=F64)
    return X, y


def separable(n=200, d=5, gap=0.3, seed=0):
    """Gaussian points at distance > gap from a random hyperplane through 0, labelled by its side."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=F64)
    w /= w.norm()
    X = torch.randn(4 * n, d, generator=gen, dtype=F64)
    X = X[(X @ w).abs() > gap][:n]
    return X, torch.sign(X @ w), w


def noisy(n=60, d=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=F64)
    y = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return X, y


def test_lr_gd_step_is_minus_lr_times_the_autograd_gradient():
    X, y = noisy()
    theta0 = torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=F64)
    theta = theta0.clone().requires_grad_(True)
    F.softplus(-y * (X @ theta)).mean().backward()
    res = fit_separator(X, y, "lr_gd", lr=0.7, max_iter=1, theta0=theta0)
    assert res.n_iter == 1 and not res.converged
    torch.testing.assert_close(res.theta, theta0 - 0.7 * theta.grad, rtol=0, atol=1e-12)


def test_normalized_step_is_beta_times_the_gradient_step():
    X, y = noisy()
    theta0 = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=F64)
    s = 1 / (1 + torch.exp(y * (X @ theta0)))
    grad = -(s * y) @ X / len(y)
    beta = 1 / s.mean()
    res = fit_separator(X, y, "normalized_lr_gd", lr=2.5, max_iter=1, theta0=theta0, record_history=True)
    torch.testing.assert_close(res.theta, theta0 - 2.5 * beta * grad, rtol=0, atol=1e-12)
    assert res.history["beta"][0] == pytest.approx(float(beta), rel=1e-12)
    assert res.history["grad_norm"][0] == pytest.approx(float(grad.norm()), rel=1e-12)


def test_normalized_first_step_from_zero_is_lr_times_the_mean_signed_row():
    X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 5.0], [0.0, 4.0]], dtype=F64)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    res = fit_separator(X, y, "normalized_lr_gd", lr=3.0, max_iter=1, record_history=True)
    assert res.history["beta"][0] == 2.0  # s_i = 1/2 at theta = 0
    assert res.history["loss"][0] == pytest.approx(math.log(2), rel=1e-15)
    assert torch.equal(res.theta, 3.0 * (y[:, None] * X).sum(0) / 4)


def test_batch_perceptron_is_the_large_step_limit_of_lr_gd():
    """Thm 3.2 on the worst-case data, n = 10: theta_t / gamma of LR+GD (gamma = 1e4) vs the batch perceptron
    written out here, t = 1..5 (steps continue past separation through the pure step function)."""
    X, y = worst_case(10)
    Z = y[:, None] * X
    n, gamma = len(y), 1e4
    theta = torch.zeros(2, dtype=F64)
    hat = Z.sum(0) / (2 * n)  # theta_hat_1
    hat_lib = torch.zeros(2, dtype=F64)
    for t in range(5):
        theta = separator_step(theta, Z, Z @ theta, "lr_gd", gamma, t)
        hat_lib = separator_step(hat_lib, Z, Z @ hat_lib, "batch_perceptron", 1.0, t)
        torch.testing.assert_close(theta / gamma, hat, rtol=0, atol=1e-9)
        torch.testing.assert_close(hat_lib, hat, rtol=0, atol=1e-15)
        wrong = (Z @ hat) <= 0
        hat = hat + Z[wrong].sum(0) / n


def test_normalized_lr_gd_tends_to_the_normalized_batch_perceptron():
    """While S_t is not empty, beta_t s_i / n -> 1[i in S_t] / |S_t| (after separation the normalised weights
    still sum to 1, so the two part ways there)."""
    X, y = worst_case(10)
    Z = y[:, None] * X
    theta = torch.zeros(2, dtype=F64)
    hat = torch.zeros(2, dtype=F64)
    steps = 0
    while bool(((Z @ hat) <= 0).any()):
        theta = separator_step(theta, Z, Z @ theta, "normalized_lr_gd", 1e4, steps)
        hat = hat + Z[(Z @ hat) <= 0].mean(0)
        steps += 1
        torch.testing.assert_close(theta / 1e4, hat, rtol=0, atol=1e-9)
    assert steps == 2 == fit_separator(X, y, "normalized_batch_perceptron").n_iter


@pytest.mark.parametrize("method,bound_factor", [("normalized_batch_perceptron", "1"), ("perceptron", "1"),
                                                 ("batch_perceptron", "n"), ("normalized_lr_gd", "thm61")])
def test_iteration_bounds_on_separable_data(method, bound_factor):
    X, y, w = separable()
    svm = LinearSVC(C=1e6, fit_intercept=False, max_iter=100_000, tol=1e-8).fit(X.numpy(), y.numpy())
    mu = max(margin(X, y, svm.coef_[0]), margin(X, y, w))  # both are lower bounds of the margin
    assert mu > 0.3 - 1e-12
    R2 = float((X * X).sum(1).max())
    n, lr = len(y), 10.0
    bound = {"1": R2 / mu**2, "n": n * R2 / mu**2,
             "thm61": R2 / mu**2 + 2 * math.log(2 * n - 1) / (lr * mu**2)}[bound_factor]
    res = fit_separator(X, y, method, lr=lr, max_iter=100_000)
    assert res.converged and 1 <= res.n_iter <= bound
    assert margin(X, y, res.theta) > 0


def test_perceptron_updates_the_smallest_misclassified_index():
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -3.0]], dtype=F64)
    y = torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    res = fit_separator(X, y, "perceptron", lr=1.0, max_iter=1)
    assert torch.equal(res.theta, torch.tensor([1.0, 0.0], dtype=F64))  # all margins 0: index 0 first


def test_large_loss_while_one_step_from_a_separator():
    """Thm 4.1: gamma = 50, theta_1 has a large loss (~gamma/8) and theta_2 separates with loss ~ 0."""
    X = torch.tensor([[1.0, -1.0], [-1.0, -4.0]], dtype=F64)
    y = torch.tensor([1.0, -1.0], dtype=F64)
    res = fit_separator(X, y, "lr_gd", lr=50.0, max_iter=10, record_history=True)
    assert res.converged and res.n_iter == 2
    loss = res.history["loss"]
    assert loss[1] > 5 and loss[2] < 1e-6 and loss[0] == pytest.approx(math.log(2))
    assert res.history["accuracy"] == [0.0, 0.5, 1.0]


def test_worst_case_counts_grow_for_lr_gd_only():
    """A few entries of the sheet's table (the claim check runs all 24)."""
    X, y = worst_case(10)
    assert fit_separator(X, y, "lr_gd", lr=1.0, max_iter=100_000).n_iter == 37
    assert fit_separator(X, y, "normalized_lr_gd", lr=1.0, max_iter=100_000).n_iter == 7
    X, y = worst_case(100)
    assert fit_separator(X, y, "lr_gd", lr=100.0, max_iter=100_000).n_iter == 31
    assert fit_separator(X, y, "normalized_lr_gd", lr=100.0, max_iter=100_000).n_iter == 2


def test_normalized_step_is_finite_when_every_margin_is_huge():
    X, y, _ = separable(n=50)
    Z = y[:, None] * X
    theta = 1e6 * torch.linalg.lstsq(Z, torch.ones(len(y), dtype=F64)).solution
    margins = Z @ theta
    assert bool((margins > 800).all())  # every s_i underflows to 0 in float64
    out = separator_step(theta, Z, margins, "normalized_lr_gd", 1.0, 7)
    log_s = -margins  # log sigmoid(-m) = -m - log1p(exp(-m)) = -m here
    weights = torch.exp(log_s - log_s.max())
    expected = theta + (weights / weights.sum()) @ Z
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    res = fit_separator(X, y, "normalized_lr_gd", theta0=theta, record_history=True)
    assert res.n_iter == 0 and res.history["beta"] == [math.inf]


@pytest.mark.parametrize("method", METHODS)
def test_non_separable_and_zero_rows_stop_at_max_iter(method):
    X = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]], dtype=F64)
    y = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)  # XOR: not linearly separable
    res = fit_separator(X, y, method, max_iter=50)
    assert not res.converged and res.n_iter == 50 and bool(torch.isfinite(res.theta).all())
    X0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)
    res = fit_separator(X0, torch.tensor([1.0, -1.0]), method, max_iter=20)
    assert not res.converged and res.n_iter == 20


@pytest.mark.parametrize("method", METHODS)
def test_single_point_separates_in_one_step(method):
    res = fit_separator(torch.tensor([[0.3, -2.0]]), torch.tensor([-1.0]), method)
    assert res.converged and res.n_iter == 1 and res.theta.dtype == F64


def test_separating_start_and_history_lengths():
    X, y, w = separable(n=40)
    res = fit_separator(X, y, theta0=w)
    assert res.converged and res.n_iter == 0 and torch.equal(res.theta, w)
    res = fit_separator(X, y, "lr_gd", lr=1.0, record_history=True)
    assert set(res.history) == {"loss", "accuracy", "grad_norm", "beta"}
    assert all(len(v) == res.n_iter + 1 for v in res.history.values())
    assert res.history["accuracy"][-1] == 1.0 and res.history["accuracy"][0] == 0.0
    assert fit_separator(X, y).history is None


def test_fit_intercept_appends_a_ones_column():
    X = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert not fit_separator(X, y, max_iter=200).converged  # no separator through the origin
    res = fit_separator(X, y, fit_intercept=True, max_iter=10_000)
    assert res.converged and res.theta.shape == (2,)
    assert margin(torch.cat([X, torch.ones(4, 1)], 1), y, res.theta) > 0


def test_inputs_are_computed_in_float64_and_accept_arrays():
    X, y, _ = separable(n=30)
    a = fit_separator(X.float(), y.float(), "lr_gd", lr=1.0)
    b = fit_separator(X.float().numpy().tolist(), y.numpy(), "lr_gd", lr=1.0)
    assert a.theta.dtype == F64 and torch.equal(a.theta, b.theta) and a.n_iter == b.n_iter


def test_margin():
    X = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    y = torch.tensor([1.0, -1.0])
    assert margin(X, y, [1.0, 1.0]) == pytest.approx(2 / math.sqrt(2))
    assert margin(X, y, [0.0, 0.0]) == -math.inf
    with pytest.raises(ValueError, match="theta must have shape"):
        margin(X, y, [1.0])


def test_labels01_to_pm1():
    assert torch.equal(labels01_to_pm1([0, 1, 1]), torch.tensor([-1.0, 1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="0, 1"):
        labels01_to_pm1([0, 2])


def test_invalid_inputs_raise():
    X, y = torch.ones(3, 2), torch.tensor([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"labels must be in \{-1, \+1\}"):
        fit_separator(X, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="2-D"):
        fit_separator(torch.ones(3), y)
    with pytest.raises(ValueError, match="2-D"):
        fit_separator(torch.ones(0, 2), torch.ones(0))
    with pytest.raises(ValueError, match="NaN"):
        fit_separator(torch.tensor([[1.0, math.nan]] * 3), y)
    with pytest.raises(ValueError, match="one label per row"):
        fit_separator(X, y[:2])
    with pytest.raises(ValueError, match="Invalid lr: 0"):
        fit_separator(X, y, lr=0)
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        fit_separator(X, y, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid max_iter: 0"):
        fit_separator(X, y, max_iter=0)
    with pytest.raises(ValueError, match="unknown method 'svm'; valid: lr_gd"):
        fit_separator(X, y, method="svm")
    with pytest.raises(ValueError, match=r"theta0 must have shape \(3,\)"):
        fit_separator(X, y, theta0=torch.zeros(2), fit_intercept=True)


#: sklearn checks that need what this environment does not have (pandas, SCIPY_ARRAY_API=1)
NOT_APPLICABLE = ("pandas is not installed", "SCIPY_ARRAY_API is not set")


def test_sklearn_estimator_checks():
    """Every scikit-learn estimator check passes; only those needing pandas or the array API may skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        results = check_estimator(LogisticGDClassifier(max_iter=50), on_skip=None, on_fail=None)
    assert len(results) > 40
    failed = [(r["check_name"], r["exception"]) for r in results if r["status"] == "failed"]
    assert not failed
    skipped = [r["check_name"] for r in results if r["status"] == "skipped"
               and not any(reason in str(r["exception"]) for reason in NOT_APPLICABLE)]
    assert not skipped


def test_classifier_fits_any_two_labels_like_fit_separator():
    X, y, _ = separable(n=80, d=3)
    labels = np.where(y.numpy() > 0, "spam", "ham")
    clf = LogisticGDClassifier(lr=10.0).fit(X.numpy(), labels)
    res = fit_separator(X, y, lr=10.0)
    assert list(clf.classes_) == ["ham", "spam"] and clf.converged_ and clf.n_iter_ == res.n_iter
    np.testing.assert_array_equal(clf.coef_, res.theta.numpy()[None])
    assert clf.coef_.shape == (1, 3) and clf.intercept_.tolist() == [0.0]
    assert clf.score(X.numpy(), labels) == 1.0
    np.testing.assert_array_equal(clf.predict(X.numpy()), np.where(clf.decision_function(X.numpy()) > 0,
                                                                    "spam", "ham"))
    twin = clone(clf).set_params(method="perceptron")
    assert twin.get_params()["method"] == "perceptron" and twin.get_params()["lr"] == 10.0


def test_classifier_intercept_and_convergence_warning():
    X = np.array([[1.0], [2.0], [3.0], [4.0]])
    clf = LogisticGDClassifier(fit_intercept=True).fit(X, [0, 0, 1, 1])
    assert clf.converged_ and clf.intercept_.shape == (1,) and clf.intercept_[0] < 0
    assert clf.predict([[0.5], [5.0]]).tolist() == [0, 1]
    with pytest.warns(ConvergenceWarning, match="did not separate"):
        clf = LogisticGDClassifier(max_iter=30).fit([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]],
                                                    [1, 1, 0, 0])
    assert not clf.converged_ and clf.n_iter_ == 30
    with pytest.raises(ValueError, match="Only binary classification"):
        LogisticGDClassifier().fit(X, [0, 1, 2, 2])
