"""Normalized LR+GD: gradient descent on the logistic loss as a separator finder.

Paper: Alexander Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient Descent
with Large Step Sizes" (2024), arXiv:2412.08424. No official code was released.

Data ``X`` (rows ``a_i``), labels ``y_i`` in {-1, +1}; write ``z_i = y_i a_i`` and the margins
``m_i(θ) = z_iᵀθ``. Unregularised logistic loss and its per-sample weights:

    f(θ) = (1/n) Σ_i log(1 + exp(-m_i)),   s_i(θ) = sigmoid(-m_i) ∈ (0, 1),   ∇f(θ) = -(1/n) Σ_i s_i z_i.

The goal is a strict separator, ``m_i(θ) > 0`` for every i; ``n_iter`` is the first t at which θ_t is one
(θ_0 = 0 is not: all its margins are 0). The methods of :func:`fit_separator` (``lr`` = γ):

- ``"lr_gd"``: θ_{t+1} = θ_t - γ ∇f(θ_t).
- ``"normalized_lr_gd"`` (the paper's method): θ_{t+1} = θ_t - γ β_t ∇f(θ_t), β_t = (mean_i s_i(θ_t))⁻¹, i.e.
  θ_t + γ Σ_i w_i z_i with w = s / Σ s. The weights are computed as ``softmax(logsigmoid(-m))``, which is
  exactly s / Σ s and never overflows once every margin is huge (β_t itself would be ``inf``).
  Thm 6.1: from θ_0 = 0 it separates within R²/μ² + 2 log(2n - 1)/(γ μ²) iterations.
- ``"batch_perceptron"`` (the γ -> ∞ limit of LR+GD, Thm 3.2, θ_t/γ -> θ̂_t):
  θ̂_1 = θ̂_0 + γ (1/(2n)) Σ_{i∈S_0} z_i (the half is s_i = 1/2 at θ = 0), then
  θ̂_{t+1} = θ̂_t + γ (1/n) Σ_{i∈S_t} z_i with S_t = {i : m_i(θ̂_t) <= 0}; at most n R²/μ² iterations.
- ``"normalized_batch_perceptron"``: θ̂_{t+1} = θ̂_t + γ mean_{i∈S_t} z_i (no half step); R²/μ² iterations.
- ``"perceptron"`` (classical, one point per iteration): θ̂_{t+1} = θ̂_t + γ z_j, j = the smallest index in
  S_t (deterministic); R²/μ² iterations.

For the perceptrons γ only rescales the iterates when θ_0 = 0 (it is kept so that every method takes the
same arguments). μ = max_{‖θ‖=1} min_i m_i(θ) and R = max_i ‖a_i‖ are the margin and radius of the data.

Defaults (the sheet's): ``lr=1.0`` (the paper sweeps 0.001-100; larger is better for Normalized LR+GD),
``max_iter=10000``, no intercept (the paper has none; ``fit_intercept=True`` appends a column of ones and
the intercept is then the last entry of ``theta``). Work is done in float64 on the device of ``X``: with
γ = 100 the margins reach 1e3 within a few iterations. The iteration bounds assume θ_0 = 0; ``theta0``
is allowed but gives no guarantee. On data that cannot be separated (not linearly separable, or a row
``a_i = 0``) every method runs ``max_iter`` iterations and returns ``converged=False``.

:class:`LogisticGDClassifier` wraps :func:`fit_separator` as a scikit-learn binary classifier.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from ._common import check_positive

__all__ = ["METHODS", "LogisticGDClassifier", "SeparatorResult", "fit_separator", "labels01_to_pm1", "margin"]

METHODS = ("lr_gd", "normalized_lr_gd", "batch_perceptron", "normalized_batch_perceptron", "perceptron")


@dataclass
class SeparatorResult:
    """What :func:`fit_separator` found: the last iterate ``theta`` (float64, ``(d,)``, ``(d + 1,)`` with an
    intercept last), ``n_iter`` (the first t whose θ_t separates, or ``max_iter``), ``converged`` and, with
    ``record_history=True``, per t = 0..n_iter the logistic ``loss``, ``accuracy`` (fraction of margins > 0),
    ``grad_norm`` (‖∇f(θ_t)‖) and ``beta`` ((mean_i s_i(θ_t))⁻¹, ``inf`` once every s_i underflows)."""

    theta: torch.Tensor
    n_iter: int
    converged: bool
    history: dict[str, list[float]] | None = field(default=None)


def labels01_to_pm1(y: Any) -> torch.Tensor:
    """Labels in {0, 1} as float64 {-1, +1}; ``ValueError`` for any other value."""
    y = torch.as_tensor(y)
    if y.dim() != 1 or not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be a 1-D array of values in {0, 1}")
    return y.to(torch.float64) * 2 - 1


def _as_float64(a: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=a.device if device is None else device, dtype=torch.float64)
    return torch.tensor(np.asarray(a, dtype=np.float64), device=device)


def _signed_rows(X: Any, y: Any, fit_intercept: bool) -> torch.Tensor:
    """``Z = y[:, None] * [X | 1]`` after the sheet's input checks."""
    X = _as_float64(X)
    if X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must be 2-D with at least one row and one column, got shape {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or infinity")
    y = _as_float64(y, X.device)
    if y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be 1-D with one label per row of X ({X.shape[0]}), got shape {tuple(y.shape)}")
    if not bool(((y == 1) | (y == -1)).all()):
        raise ValueError("labels must be in {-1, +1}")
    if fit_intercept:
        X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
    return y[:, None] * X


def margin(X: Any, y: Any, theta: Any) -> float:
    """The normalised margin ``min_i y_i x_iᵀθ / ‖θ‖`` (``-inf`` for θ = 0: nothing is separated).
    ``theta`` has one entry per column of ``X`` (append the ones column yourself for an intercept)."""
    Z = _signed_rows(X, y, fit_intercept=False)
    theta = _as_float64(theta, Z.device)
    if theta.shape != (Z.shape[1],):
        raise ValueError(f"theta must have shape ({Z.shape[1]},), got {tuple(theta.shape)}")
    norm = float(torch.linalg.vector_norm(theta))
    return float((Z @ theta).min()) / norm if norm > 0 else -math.inf


def separator_step(theta: torch.Tensor, Z: torch.Tensor, margins: torch.Tensor, method: str, lr: float,
                   t: int) -> torch.Tensor:
    """θ_{t+1} of ``method`` from θ_t and its margins ``Z @ θ_t`` (``Z`` = signed rows ``y_i a_i``).

    The pure update behind :func:`fit_separator`, written once for every method (see the module docstring)."""
    n = Z.shape[0]
    if method == "lr_gd":
        direction = (torch.sigmoid(-margins) @ Z) / n
    elif method == "normalized_lr_gd":
        direction = torch.softmax(F.logsigmoid(-margins), dim=0) @ Z
    elif method == "perceptron":
        j = int(torch.nonzero(margins <= 0)[0])
        direction = Z[j]
    else:
        wrong = (margins <= 0).to(Z.dtype)
        if method == "normalized_batch_perceptron":
            direction = (wrong @ Z) / wrong.sum()
        else:  # batch_perceptron: the first step carries the logistic weight 1/2 of θ = 0
            direction = (wrong @ Z) / (2 * n if t == 0 else n)
    return theta + lr * direction


def _record(history: dict[str, list[float]], Z: torch.Tensor, margins: torch.Tensor) -> None:
    n = Z.shape[0]
    s = torch.sigmoid(-margins)
    s_sum = float(s.sum())
    history["loss"].append(float(F.softplus(-margins).mean()))
    history["accuracy"].append(float((margins > 0).to(torch.float64).mean()))
    history["grad_norm"].append(float(torch.linalg.vector_norm((s @ Z) / n)))
    history["beta"].append(n / s_sum if s_sum > 0 else math.inf)


def fit_separator(X: Any, y: Any, method: str = "normalized_lr_gd", lr: float = 1.0, max_iter: int = 10000,
                  theta0: Any = None, fit_intercept: bool = False, record_history: bool = False
                  ) -> SeparatorResult:
    """Run ``method`` (one of :data:`METHODS`) from ``theta0`` (default 0) until every ``y_i x_iᵀθ > 0`` or
    ``max_iter`` iterations. ``X``: ``(n, d)``, ``y``: ``(n,)`` in {-1, +1} (see :func:`labels01_to_pm1`);
    tensors or array-likes, computed in float64."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    check_positive("lr", lr)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter} (need an integer >= 1)")
    Z = _signed_rows(X, y, fit_intercept)
    d = Z.shape[1]
    if theta0 is None:
        theta = Z.new_zeros(d)
    else:
        theta = _as_float64(theta0, Z.device).clone()
        if theta.shape != (d,):
            raise ValueError(f"theta0 must have shape ({d},) (intercept last when fit_intercept=True), "
                             f"got {tuple(theta.shape)}")
    lr = float(lr)
    history = {"loss": [], "accuracy": [], "grad_norm": [], "beta": []} if record_history else None
    t = 0
    while True:
        margins = Z @ theta
        if history is not None:
            _record(history, Z, margins)
        if bool((margins > 0).all()):
            return SeparatorResult(theta, t, True, history)
        if t == max_iter:
            return SeparatorResult(theta, t, False, history)
        theta = separator_step(theta, Z, margins, method, lr, t)
        t += 1


class LogisticGDClassifier(ClassifierMixin, BaseEstimator):
    """A binary linear classifier fitted by :func:`fit_separator` (scikit-learn API: ``fit``, ``predict``,
    ``decision_function``, ``score``, ``get_params``/``set_params``, ``clone``).

    Any two class labels are accepted: ``classes_[0]`` is mapped to -1 and ``classes_[1]`` to +1, as in
    scikit-learn's linear classifiers. After ``fit``: ``coef_`` ``(1, n_features)``, ``intercept_`` ``(1,)``
    (zero without ``fit_intercept``), ``n_iter_``, ``converged_``; a fit that stops at ``max_iter`` without
    separating the data warns with ``ConvergenceWarning`` and keeps its last iterate.
    """

    def __init__(self, method: str = "normalized_lr_gd", lr: float = 1.0, max_iter: int = 10000,
                 fit_intercept: bool = False) -> None:
        self.method = method
        self.lr = lr
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: Any, y: Any) -> LogisticGDClassifier:
        X, y = validate_data(self, X, y, dtype=np.float64)
        y_type = type_of_target(y, input_name="y", raise_unknown=True)
        if y_type != "binary":
            raise ValueError(f"Only binary classification is supported. The type of the target is {y_type}.")
        classes = np.unique(y)
        if len(classes) != 2:
            raise ValueError(f"LogisticGDClassifier needs samples of 2 classes, got 1 class: {classes[0]!r}")
        self.classes_ = classes
        y_pm = np.where(y == self.classes_[1], 1.0, -1.0)
        result = fit_separator(X, y_pm, method=self.method, lr=self.lr, max_iter=self.max_iter,
                               fit_intercept=self.fit_intercept)
        theta = result.theta.cpu().numpy()
        self.coef_ = theta[None, :X.shape[1]]
        self.intercept_ = theta[X.shape[1]:] if self.fit_intercept else np.zeros(1)
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        if not result.converged:
            warnings.warn(f"{self.method} did not separate the training data in max_iter={self.max_iter} "
                          "iterations (not linearly separable, or more iterations needed)", ConvergenceWarning,
                          stacklevel=2)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """``X @ coef_.T + intercept_``, shape ``(n_samples,)``; positive means ``classes_[1]``."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_[0] + self.intercept_[0]

    def predict(self, X: Any) -> np.ndarray:
        """``classes_[1]`` where the decision function is > 0, else ``classes_[0]``."""
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(int)]
