"""saekit.estimator.SparseAutoencoderEstimator: the scikit-learn contract, checked by hand."""

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


def _weights(est):
    return est.model_.W1, est.model_.b1, est.model_.W2, est.model_.b2


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
    W1, b1, W2, b2 = (p.detach().numpy() for p in _weights(fitted))
    np.testing.assert_allclose(H, _sigmoid(X @ W1.T + b1), rtol=1e-12)
    X_hat = fitted.inverse_transform(H)
    assert X_hat.shape == X.shape
    np.testing.assert_allclose(X_hat, _sigmoid(H @ W2.T + b2), rtol=1e-12)
    np.testing.assert_allclose(fitted.fit_transform(X), H, rtol=0, atol=0)  # same seed, same fit


def test_score_is_minus_the_mean_squared_error(fitted, X):
    W1, b1, W2, b2 = (p.detach().numpy() for p in _weights(fitted))
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


def test_defaults_equal_the_train_config_defaults(X):
    config = TrainConfig().flat()
    params = SparseAutoencoderEstimator().get_params()
    shared = set(config) & set(params)
    assert {"kind", "n_hidden", "rho", "beta", "weight_decay", "max_iter", "optimizer", "seed"} <= shared
    for name in shared:
        # A kind's own settings default to None: the kind's default, whichever kind is chosen.
        assert params[name] == config[name] or (params[name] is None and name in TrainConfig().model.to_dict()), name
    # Those None settings come out as the kind's defaults in the fitted model.
    assert SparseAutoencoderEstimator(max_iter=1).fit(X).model_.cfg == TrainConfig().model
    relu = SparseAutoencoderEstimator(kind="relu", max_iter=1).fit(X).model_
    assert relu.cfg == TrainConfig.from_flat({"kind": "relu"}).model


def test_a_relu_estimator_transforms_with_its_kind(X):
    est = SparseAutoencoderEstimator(kind="relu", n_hidden=N_HIDDEN, penalty="l1", beta=0.01, max_iter=5).fit(X)
    assert (est.model_.kind, est.model_.cfg.output, est.model_.cfg.penalty) == ("relu", "linear", "l1")
    W1, b1, W2, b2 = (p.detach().numpy() for p in _weights(est))
    H = est.transform(X)
    np.testing.assert_allclose(H, np.maximum(X @ W1.T + b1, 0), rtol=1e-12)
    np.testing.assert_allclose(est.inverse_transform(H), H @ W2.T + b2, rtol=1e-12)  # linear output


def test_a_setting_the_kind_lacks_is_a_user_error(X):
    with pytest.raises(UserError, match="--rho is a setting of sigmoid, not of --kind relu"):
        SparseAutoencoderEstimator(kind="relu", rho=0.1, max_iter=2).fit(X)


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
        ("inverse_transform", lambda X: X[:, : N_HIDDEN + 1], "fitted on"),
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
