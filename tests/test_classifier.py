"""Tests for saekit.classify.softmax: softmax regression, the classifier on encoders, evaluation
(and saekit.viz.report.save_confusion_png, which draws an evaluation).

Costs are checked against numbers worked out by hand or in NumPy, gradients against central
finite differences and UFLDL's closed form, and training against problems whose answer is known.
"""

import math

import numpy as np
import pytest
import torch
from conftest import make_model
from PIL import Image

from saekit.classify.softmax import (
    FeatureClassifier,
    SoftmaxRegression,
    Solver,
    confusion_matrix,
    evaluate_classifier,
    trainable,
)
from saekit.errors import UserError
from saekit.viz.report import save_confusion_png


def numpy_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def numpy_softmax_nll(logits, y):
    """-(1/m) sum_i log p(y_i | x_i), written out in NumPy."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(y)), y]))


def finite_difference_grads(cost, params, eps=1e-6):
    """Central differences of cost() with respect to every entry of every parameter."""
    grads = []
    with torch.no_grad():
        for p in params:
            g, flat = torch.zeros_like(p), p.data.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                plus = float(cost())
                flat[i] = old - eps
                minus = float(cost())
                flat[i] = old
                g.view(-1)[i] = (plus - minus) / (2 * eps)
            grads.append(g)
    return grads


def blobs(n_per_class=60, seed=0):
    """Three well-separated Gaussian clusters in 2-D: x (3n, 2), y (3n,)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0.0], [-4.0, 3.0], [0.0, -5.0]])
    x = np.concatenate([c + 0.5 * rng.standard_normal((n_per_class, 2)) for c in centres])
    return x, np.repeat(np.arange(3), n_per_class)


def set_softmax(model, theta, b):
    with torch.no_grad():
        model.theta.copy_(torch.as_tensor(theta, dtype=torch.float64))
        model.b.copy_(torch.as_tensor(b, dtype=torch.float64))


# ---------------------------------------------------------------- SoftmaxRegression


def test_softmax_cost_matches_a_hand_computed_case():
    model = SoftmaxRegression(2, 3, weight_decay=0.1)
    set_softmax(model, [[1, 0], [0, 1], [-1, -1]], [0.5, 0, -0.5])
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    # Logits: row 1 = (1.5, 2, -3.5), true class 2; row 2 = (0.5, -1, 0.5), true class 0.
    log_p1 = -3.5 - math.log(math.exp(1.5) + math.exp(2) + math.exp(-3.5))
    log_p2 = 0.5 - math.log(math.exp(0.5) + math.exp(-1) + math.exp(0.5))
    nll = -(log_p1 + log_p2) / 2
    decay = 0.1 / 2 * (1 + 1 + 1 + 1)  # theta's squares; the bias is not decayed
    with torch.no_grad():
        J, got_nll, got_decay = model.cost(x, y)
    assert float(got_nll) == pytest.approx(nll, rel=1e-14)
    assert float(got_decay) == pytest.approx(decay, rel=1e-14)
    assert float(J) == pytest.approx(nll + decay, rel=1e-14)


def test_softmax_gradient_matches_finite_differences_and_ufldls_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    model = SoftmaxRegression(4, 3, weight_decay=0.3, seed=2)
    with torch.no_grad():
        model.b.copy_(torch.tensor([0.2, -0.1, 0.3]))
    J = model.cost(x, y)[0]
    grad_theta, grad_b = torch.autograd.grad(J, [model.theta, model.b])

    fd_theta, fd_b = finite_difference_grads(lambda: model.cost(x, y)[0], [model.theta, model.b])
    torch.testing.assert_close(grad_theta, fd_theta, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_b, fd_b, rtol=1e-6, atol=1e-8)

    # UFLDL: grad = -(1/m) (Y - P)^T X + lambda theta, with Y one-hot and P the probabilities.
    theta, b, X = model.theta.detach().numpy(), model.b.detach().numpy(), x.numpy()
    P = np.exp(X @ theta.T + b)
    P /= P.sum(1, keepdims=True)
    Y = np.eye(3)[y.numpy()]
    np.testing.assert_allclose(grad_theta.numpy(), -(Y - P).T @ X / 7 + 0.3 * theta, rtol=1e-12)
    np.testing.assert_allclose(grad_b.numpy(), -(Y - P).sum(0) / 7, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("solver", [Solver(max_iter=100), Solver("adam", epochs=20, batch_size=60, lr=0.1)])
def test_softmax_separates_well_separated_clusters(solver):
    x, y = blobs(seed=0)
    model = SoftmaxRegression(2, 3)
    history = model.fit(x, y, solver)
    x_new, y_new = blobs(seed=1)
    assert (model.predict(x) == y).all()
    assert (model.predict(x_new) == y_new).all()
    assert history[-1]["cost"] < min(0.1, history[0]["cost"])
    assert set(history[0]) == {"step", "cost", "nll", "weight_decay", "seconds"}


def test_softmax_lbfgs_lands_on_the_minimum():
    """On a non-separable problem the convex cost has one minimum, where the gradient is zero."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 3))
    y = rng.integers(0, 4, 80)
    model = SoftmaxRegression(3, 4, weight_decay=1e-2)
    model.fit(x, y, Solver(max_iter=200))
    J = model.cost(torch.as_tensor(x), torch.as_tensor(y))[0]
    for g in torch.autograd.grad(J, list(model.parameters())):
        assert g.abs().max() < 1e-6


def test_a_frozen_bias_stays_at_zero_as_in_ufldls_model():
    x, y = blobs(seed=0)
    model = SoftmaxRegression(2, 3)
    model.b.requires_grad_(False)
    history = model.fit(x, y, Solver(max_iter=20))
    assert torch.equal(model.b, torch.zeros(3, dtype=torch.float64))
    assert history[-1]["cost"] < history[0]["cost"]


# ---------------------------------------------------------------- FeatureClassifier


def two_encoders():
    return [make_model(6, 5, seed=1), make_model(5, 3, seed=2)]


def test_feature_classifier_forward_is_the_composition_of_its_parts():
    saes = two_encoders()
    clf = FeatureClassifier(saes, n_classes=4, seed=3)
    x = np.random.default_rng(0).random((9, 6))
    W1a, b1a, W1b, b1b = (p.detach().numpy() for p in (saes[0].W1, saes[0].b1, saes[1].W1, saes[1].b1))
    theta, b = clf.softmax.theta.detach().numpy(), clf.softmax.b.detach().numpy()
    h = numpy_sigmoid(numpy_sigmoid(x @ W1a.T + b1a) @ W1b.T + b1b)
    np.testing.assert_allclose(clf.features(torch.as_tensor(x)).detach().numpy(), h, rtol=1e-13)
    np.testing.assert_allclose(clf(torch.as_tensor(x)).detach().numpy(), h @ theta.T + b, rtol=1e-13)
    np.testing.assert_array_equal(clf.predict(x), np.argmax(h @ theta.T + b, 1))


@pytest.mark.parametrize("decay_encoders", [False, True])
def test_fine_tuning_cost_and_gradient(decay_encoders):
    saes = two_encoders()
    clf = FeatureClassifier(saes, n_classes=4, seed=3)
    rng = np.random.default_rng(1)
    x, y = torch.as_tensor(rng.random((8, 6))), torch.as_tensor(rng.integers(0, 4, 8))
    lambda_ = 0.05
    W1a, b1a, W1b, b1b = (p.detach().numpy() for p in (saes[0].W1, saes[0].b1, saes[1].W1, saes[1].b1))
    theta, b = clf.softmax.theta.detach().numpy(), clf.softmax.b.detach().numpy()
    logits = numpy_sigmoid(numpy_sigmoid(x.numpy() @ W1a.T + b1a) @ W1b.T + b1b) @ theta.T + b
    # UFLDL's stackedAECost decays theta only; decay_encoders adds every encoder's W1.
    squares = (theta**2).sum() + ((W1a**2).sum() + (W1b**2).sum() if decay_encoders else 0)
    J, nll, got_decay = clf.cost(x, y, lambda_, decay_encoders)
    nll, got_decay = float(nll.detach()), float(got_decay.detach())
    assert nll == pytest.approx(numpy_softmax_nll(logits, y.numpy()), rel=1e-13)
    assert got_decay == pytest.approx(lambda_ / 2 * squares, rel=1e-13)

    params = trainable(clf)
    assert len(params) == 6  # W1, b1 per encoder, theta, b: no decoder weights
    grads = torch.autograd.grad(J, params)
    fd = finite_difference_grads(lambda: clf.cost(x, y, lambda_, decay_encoders)[0], params)
    for got, expected in zip(grads, fd):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_frozen_training_fits_only_the_softmax_on_the_features():
    saes = two_encoders()
    before = [p.detach().clone() for p in saes[0].parameters()]
    rng = np.random.default_rng(2)
    x, y = rng.random((50, 6)), rng.integers(0, 3, 50)
    clf = FeatureClassifier(saes, n_classes=3, seed=4)
    clf.fit(x, y, softmax_solver=Solver(max_iter=30))
    for encoder, sae in zip(clf.encoders, saes):
        torch.testing.assert_close(encoder.W1, sae.W1, rtol=0, atol=0)
        torch.testing.assert_close(encoder.b1, sae.b1, rtol=0, atol=0)

    # The same softmax trained directly on the features computed by hand comes out the same.
    with torch.no_grad():
        h = torch.as_tensor(x)
        for sae in saes:
            h = torch.sigmoid(h @ sae.W1.T + sae.b1)
    alone = SoftmaxRegression(3, 3, seed=4)
    alone.fit(h, y, Solver(max_iter=30))
    torch.testing.assert_close(clf.softmax.theta, alone.theta, rtol=1e-10, atol=1e-12)
    for p, q in zip(saes[0].parameters(), before):
        assert torch.equal(p, q)


def test_fine_tuning_changes_the_encoders_but_not_the_autoencoders():
    saes = two_encoders()
    originals = [p.detach().clone() for sae in saes for p in sae.parameters()]
    rng = np.random.default_rng(2)
    x, y = rng.random((50, 6)), rng.integers(0, 3, 50)
    clf = FeatureClassifier(saes, n_classes=3)
    history = clf.fit(x, y, fine_tune=True, softmax_solver=Solver(max_iter=20), fine_tune_solver=Solver(max_iter=20))
    assert len(history["fine_tune"]) > 0
    for encoder, sae in zip(clf.encoders, saes):
        assert not torch.allclose(encoder.W1, sae.W1)
    for p, q in zip((p for sae in saes for p in sae.parameters()), originals):
        assert torch.equal(p, q)
    assert history["fine_tune"][-1]["cost"] < history["fine_tune"][0]["cost"]


@pytest.mark.slow  # 200 L-BFGS iterations of fine-tuning
def test_fine_tuning_learns_xor_which_frozen_random_features_cannot():
    """XOR of two bits is not linearly separable; an untrained encoder's small weights give nearly
    linear features, so only fine-tuning the encoder can separate it."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (200, 2))
    x, y = np.clip(0.1 + 0.8 * bits + 0.05 * rng.standard_normal((200, 2)), 0, 1), bits[:, 0] ^ bits[:, 1]
    clf = FeatureClassifier([make_model(2, 4, seed=0)], n_classes=2)
    clf.fit_softmax(x, y)
    assert (clf.predict(x) == y).mean() < 0.8
    clf.fine_tune(x, y, Solver(max_iter=200), lambda_=1e-4)
    assert (clf.predict(x) == y).all()


# ---------------------------------------------------------------- evaluation


def test_evaluate_classifier_on_hand_built_predictions(tmp_path):
    # theta = 10 I makes the model predict the position of the 1 in a one-hot row.
    model = SoftmaxRegression(4, 4)
    set_softmax(model, 10 * np.eye(4), np.zeros(4))
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 0, 2]
    result = evaluate_classifier(model, np.eye(4)[y_pred], y_true, ["a", "b", "c", "d"])
    expected_cm = [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(result["confusion_matrix"], expected_cm)
    assert result["accuracy"] == pytest.approx(6 / 9)
    per_class = result["per_class_accuracy"]
    assert per_class["a"] == pytest.approx(2 / 3)
    assert per_class["b"] == pytest.approx(1 / 2)
    assert per_class["c"] == pytest.approx(3 / 4)
    assert math.isnan(per_class["d"])  # no examples of class d
    assert result["n_examples"] == 9

    path = save_confusion_png(result, tmp_path / "cm.png", "test")
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size[0] > 100


def test_confusion_matrix_counts_pairs():
    np.testing.assert_array_equal(confusion_matrix([1, 1, 0, 2], [1, 0, 0, 1], 3), [[1, 0, 0], [1, 1, 0], [0, 1, 0]])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((4, 3)), [0, 1, 0, 1], "features per row"),
        (np.full((4, 2), np.nan), [0, 1, 0, 1], "NaN"),
        (np.zeros(4), [0, 1, 0, 1], "2-D"),
        (np.zeros((4, 2)), [0, 1, 0, 3], "0..2"),
        (np.zeros((4, 2)), [0, 1, 0], "one label per example"),
        (np.zeros((4, 2)), [0.0, 1.0, 0.0, 1.0], "integers"),
    ],
)
def test_bad_data_raises_user_error(x, y, message):
    with pytest.raises(UserError, match=message):
        SoftmaxRegression(2, 3).fit(x, y)


def test_bad_settings_raise_user_error():
    with pytest.raises(UserError, match="previous one's features"):
        FeatureClassifier([make_model(6, 5), make_model(4, 3)], 2)
    with pytest.raises(UserError, match="optimizer"):
        Solver("newton")
    with pytest.raises(UserError, match="max_iter"):
        Solver(max_iter=0)
    with pytest.raises(UserError, match="one name per class"):
        evaluate_classifier(SoftmaxRegression(2, 3), np.zeros((2, 2)), [0, 1], ["a", "b"])
    with pytest.raises(UserError, match="weight_decay"):
        SoftmaxRegression(2, 3, weight_decay=-1)
