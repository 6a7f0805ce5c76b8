"""saekit.estimator.SparseAutoencoderEstimator: the scikit-learn contract, checked by hand."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from saekit.config import TrainConfig
from saekit.errors import UserError
from saekit.estimator import SparseAutoencoderEstimator

N_HIDDEN = 6


@pytest.fixture(scope="module")
def X(patches):
    return patches[:150]


@pytest.fixture(scope="module")
def fitted(X):
    return SparseAutoencoderEstimator(n_hidden=N_HIDDEN, max_iter=10).fit(X)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_fit_returns_self_and_learns(X):
    est = SparseAutoencoderEstimator(n_hidden=N_HIDDEN, max_iter=10)
    assert est.fit(X) is est
    assert est.n_features_in_ == 64 and len(est.history_) == 10
    assert est.history_[-1]["cost"] < est.history_[0]["cost"]


def test_transform_and_inverse_transform(fitted, X):
    H = fitted.transform(X)
    assert isinstance(H, np.ndarray) and H.shape == (150, N_HIDDEN)
    assert H.min() > 0 and H.max() < 1  # sigmoid codes
    W1, b1, W2, b2 = (p.detach().numpy() for p in (fitted.model_.W1, fitted.model_.b1, fitted.model_.W2, fitted.model_.b2))
    np.testing.assert_allclose(H, _sigmoid(X @ W1.T + b1), rtol=1e-12)
    X_hat = fitted.inverse_transform(H)
    assert X_hat.shape == X.shape
    np.testing.assert_allclose(X_hat, _sigmoid(H @ W2.T + b2), rtol=1e-12)
    np.testing.assert_allclose(fitted.fit_transform(X), H, rtol=0, atol=0)  # same seed, same fit


def test_score_is_minus_the_mean_squared_error(fitted, X):
    W1, b1, W2, b2 = (p.detach().numpy() for p in (fitted.model_.W1, fitted.model_.b1, fitted.model_.W2, fitted.model_.b2))
    X_hat = _sigmoid(_sigmoid(X @ W1.T + b1) @ W2.T + b2)
    assert fitted.score(X) == pytest.approx(-np.mean((X_hat - X) ** 2), rel=1e-12)


def test_get_params_set_params_round_trip():
    est = SparseAutoencoderEstimator(n_hidden=7, rho=0.05, optimizer="adam")
    params = est.get_params()
    assert set(params) == set(inspect.signature(SparseAutoencoderEstimator).parameters)
    assert params["n_hidden"] == 7 and params["rho"] == 0.05 and params["optimizer"] == "adam"
    assert SparseAutoencoderEstimator(**params).get_params() == params  # what scikit-learn's clone does
    assert est.set_params(beta=1.5, max_iter=3) is est
    assert est.get_params()["beta"] == 1.5 and est.get_params()["max_iter"] == 3


def test_defaults_equal_the_train_config_defaults():
    config = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    params = SparseAutoencoderEstimator().get_params()
    shared = set(config) & set(params)
    assert {"n_hidden", "rho", "beta", "weight_decay", "max_iter", "optimizer", "seed"} <= shared
    for name in shared:
        assert params[name] == config[name], name


def test_float32_fit(X):
    est = SparseAutoencoderEstimator(n_hidden=N_HIDDEN, max_iter=3, dtype="float32").fit(X)
    assert est.model_.W1.dtype == torch.float32
    assert est.transform(X).dtype == np.float32


def test_not_fitted(X):
    est = SparseAutoencoderEstimator()
    for method in (est.transform, est.inverse_transform, est.score):
        with pytest.raises(UserError, match="not fitted"):
            method(X)


@pytest.mark.parametrize(
    "method, bad, words",
    [
        ("transform", lambda X: X[:, :10], "features"),
        ("score", lambda X: X[:, :10], "features"),
        ("inverse_transform", lambda X: X[:, :N_HIDDEN + 1], "fitted on"),
        ("transform", lambda X: np.where(np.eye(*X.shape) > 0, np.nan, X), "NaN"),
        ("transform", lambda X: X[0], "2-D"),
    ],
)
def test_bad_input_after_fit(fitted, X, method, bad, words):
    with pytest.raises(UserError, match=words):
        getattr(fitted, method)(bad(X))


@pytest.mark.parametrize(
    "settings, bad, words",
    [
        (dict(), lambda X: X[0], "2-D"),
        (dict(), lambda X: np.where(np.eye(*X.shape) > 0, np.inf, X), "NaN or infinite"),
        (dict(), lambda X: X * 4 - 2, "rescale"),
        (dict(rho=1.5), lambda X: X, "--rho"),
    ],
)
def test_bad_input_to_fit(X, settings, bad, words):
    with pytest.raises(UserError, match=words):
        SparseAutoencoderEstimator(n_hidden=N_HIDDEN, max_iter=2, **settings).fit(bad(X))


def test_unknown_parameter():
    with pytest.raises(UserError, match="unknown parameter"):
        SparseAutoencoderEstimator().set_params(n_hiden=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_missing_cuda_is_a_user_error(X):
    with pytest.raises(UserError):
        SparseAutoencoderEstimator(n_hidden=N_HIDDEN, max_iter=2, device="cuda").fit(X)
