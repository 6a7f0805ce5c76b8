"""Tests for saekit.classify.stacked: greedy layer-wise pre-training and UFLDL's two pipelines.

The stack is checked against autoencoders trained one by one by hand; the pipelines run end
to end on a few hundred MNIST digits (skipped where MNIST is absent).
"""

import numpy as np
import pytest
import torch
from conftest import find_mnist_dir, make_model

from saekit import kinds
from saekit.classify import Layers, Solver, pretrain_stack, run_stacked, self_taught, self_taught_split, ufldl_layers
from saekit.data.idx import load_digits
from saekit.errors import UserError
from saekit.kinds.sigmoid import SigmoidConfig
from saekit.train import OptimConfig, fit

# UFLDL's settings for each layer of both exercises: rho 0.1, lambda 3e-3, beta 3 (sigmoid, KL).
UFLDL_LAYER = dict(rho=0.1, weight_decay=3e-3, beta=3.0)


def tiny_data(m=200, n=16, seed=0):
    """(m, n) values in [0, 1] with some structure: noisy mixtures of 4 random patterns."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((4, n))
    weights = rng.dirichlet(np.ones(4), m)
    return np.clip(weights @ patterns + 0.05 * rng.standard_normal((m, n)), 0, 1)


def test_ufldl_layers_are_ufldls_settings():
    assert ufldl_layers(max_iter=15) == Layers(SigmoidConfig(**UFLDL_LAYER), OptimConfig(max_iter=15), 0)
    assert ufldl_layers().optim.max_iter == 400


def test_pretrain_stack_trains_each_layer_on_the_previous_layers_features():
    x = tiny_data()
    layers = ufldl_layers(max_iter=15)
    stack = pretrain_stack(x, [8, 4], layers, progress=False)
    assert [(sae.n_inputs, sae.n_hidden) for sae in stack] == [(16, 8), (8, 4)]

    # By hand: the first layer on x, the second on the first's sigmoid activations; layer i has seed + i.
    first = make_model(16, 8, seed=layers.seed, **UFLDL_LAYER)
    fit(first, torch.as_tensor(x), OptimConfig(max_iter=15), progress=False)
    h = torch.sigmoid(torch.as_tensor(x) @ first.W1.detach().T + first.b1.detach())
    second = make_model(8, 4, seed=layers.seed + 1, **UFLDL_LAYER)
    fit(second, h, OptimConfig(max_iter=15), progress=False)
    for got, expected in zip(stack, (first, second)):
        assert got.cfg == expected.cfg
        for p, q in zip(got.parameters(), expected.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not torch.equal(stack[1].W1, make_model(8, 4, seed=layers.seed + 1).W1)  # it was trained


def test_pretrain_stack_takes_any_kind_dtype_and_seed():
    x = tiny_data(m=60)
    layers = Layers(kinds.config("relu", output="linear", beta=0.01), OptimConfig(max_iter=5), seed=3)
    (got,) = pretrain_stack(x, [6], layers, dtype=torch.float32, progress=False)
    expected = make_model(16, 6, "relu", "linear", dtype=torch.float32, seed=3, beta=0.01)
    fit(expected, torch.as_tensor(x, dtype=torch.float32), OptimConfig(max_iter=5), seed=3, progress=False)
    assert got.kind == "relu" and got.cfg == expected.cfg and got.W1.dtype == torch.float32
    for p, q in zip(got.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_pretrain_stack_rejects_bad_input():
    with pytest.raises(UserError, match="outside"):
        pretrain_stack(tiny_data() * 2, [4], ufldl_layers(max_iter=2), progress=False)
    with pytest.raises(UserError, match="layer_sizes"):
        pretrain_stack(tiny_data(), [], progress=False)
    with pytest.raises(UserError, match="NaN"):
        pretrain_stack(np.full((5, 3), np.nan), [2], progress=False)


def test_self_taught_split_follows_ufldl():
    images = np.arange(11)[:, None] * np.ones((1, 2))  # row i is (i, i): shows which rows went where
    labels = np.array([5, 0, 1, 9, 2, 3, 4, 7, 0, 6, 8])
    x_unlabeled, x_train, y_train, x_test, y_test = self_taught_split(images, labels)
    # Digits 0-4 sit at rows 1, 2, 4, 5, 6, 8: the first three train, the last three test.
    np.testing.assert_array_equal(x_unlabeled[:, 0], [0, 3, 7, 9, 10])
    np.testing.assert_array_equal(x_train[:, 0], [1, 2, 4])
    np.testing.assert_array_equal(y_train, [0, 1, 2])
    np.testing.assert_array_equal(x_test[:, 0], [5, 6, 8])
    np.testing.assert_array_equal(y_test, [3, 4, 0])


def test_self_taught_split_rounds_an_odd_half_up_as_matlab_does():
    labels = np.array([0, 1, 2, 3, 4])
    _, x_train, _, x_test, _ = self_taught_split(np.eye(5), labels)
    assert len(x_train) == 3 and len(x_test) == 2  # MATLAB's round(2.5) is 3


@pytest.fixture(scope="module")
def mnist_test_split():
    """The first 1000 MNIST test digits, (1000, 784) float32 in [0, 1], and their labels."""
    images, labels = load_digits("mnist", "test", data_dir=find_mnist_dir())
    return images[:1000], labels[:1000]


def test_run_stacked_end_to_end_on_a_few_hundred_digits(mnist_test_split):
    x, y = mnist_test_split
    result = run_stacked(
        x[:300],
        y[:300],
        x[300:500],
        y[300:500],
        layer_sizes=[20, 10],
        layers=ufldl_layers(max_iter=10),
        softmax_solver=Solver(max_iter=10),
        fine_tune_solver=Solver(max_iter=10),
        progress=False,
    )
    for key in ("accuracy_before", "accuracy_after"):
        assert 0 <= result[key] <= 1
    assert result["after"]["confusion_matrix"].sum() == 200
    assert set(result["seconds"]) == {"pretrain", "softmax", "fine_tune"}
    assert [sae.n_hidden for sae in result["layers"]] == [20, 10]


def test_self_taught_end_to_end_on_a_few_hundred_digits(mnist_test_split):
    x, y = mnist_test_split
    split = self_taught_split(x[:600], y[:600])
    result = self_taught(
        *split, n_hidden=20, layers=ufldl_layers(max_iter=10), solver=Solver(max_iter=10), progress=False
    )
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_raw"] <= 1
    assert result["features"]["confusion_matrix"].shape == (5, 5)
    assert result["features"]["n_examples"] == len(split[3])
