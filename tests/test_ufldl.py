"""saekit.ufldl: MATLAB layouts checked index by index, the exercise's gradient check, and bad input."""

import numpy as np
import pytest
import torch
from conftest import reference_terms
from PIL import Image

from saekit import ufldl
from saekit.data.images import natural_image_patches
from saekit.errors import UserError

VISIBLE, HIDDEN = 64, 5
LAMBDA, RHO, BETA = 1e-4, 0.01, 3.0


def _hand_built(hidden=2, visible=3):
    """W1, W2, b1, b2 whose every value is distinct and tells where it sits."""
    W1 = np.array([[100 + 10 * i + j for j in range(visible)] for i in range(hidden)], dtype=float)
    W2 = np.array([[200 + 10 * i + j for j in range(hidden)] for i in range(visible)], dtype=float)
    b1 = 300 + np.arange(hidden, dtype=float)
    b2 = 400 + np.arange(visible, dtype=float)
    return W1, W2, b1, b2


def _weights_by_hand(theta, visible, hidden):
    """W1, b1, W2, b2 from theta as MATLAB's reshape(theta(1:hv), hidden, visible) reads it, as tensors."""
    hv = hidden * visible
    W1 = theta[:hv].reshape(visible, hidden).T  # column j of W1 is theta[j*hidden : (j+1)*hidden]
    W2 = theta[hv : 2 * hv].reshape(hidden, visible).T
    b1, b2 = theta[2 * hv : 2 * hv + hidden], theta[2 * hv + hidden :]
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (W1, b1, W2, b2)]


@pytest.fixture(scope="module")
def data():
    return ufldl.sample_images(10, seed=0)


# --- theta layout ----------------------------------------------------------------------------


def test_pack_theta_is_matlab_column_major():
    W1, W2, b1, b2 = _hand_built(hidden=2, visible=3)
    theta = ufldl.pack_theta(W1, W2, b1, b2)
    assert theta.shape == (2 * 6 + 2 + 3,)
    # W1(:) stacks W1's columns: W1[0,0], W1[1,0], W1[0,1], W1[1,1], ...
    assert theta[:6].tolist() == [100, 110, 101, 111, 102, 112]
    assert theta[6:12].tolist() == [200, 210, 220, 201, 211, 221]
    assert theta[12:14].tolist() == [300, 301]
    assert theta[14:].tolist() == [400, 401, 402]
    for i in range(2):
        for j in range(3):
            assert theta[i + j * 2] == W1[i, j]
            assert theta[6 + j + i * 3] == W2[j, i]


def test_unpack_inverts_pack_and_returns_copies():
    parts = _hand_built(hidden=4, visible=3)
    theta = ufldl.pack_theta(*parts)
    unpacked = ufldl.unpack_theta(theta, 3, 4)
    for got, want in zip(unpacked, parts):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    unpacked[0][0, 0] = -1.0
    assert theta[0] == 100  # no aliasing


def test_initialize_parameters():
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(1))
    hv = HIDDEN * VISIBLE
    assert theta.shape == (2 * hv + HIDDEN + VISIBLE,)
    r = np.sqrt(6) / np.sqrt(HIDDEN + VISIBLE + 1)
    weights = theta[: 2 * hv]
    assert np.all(np.abs(weights) <= r) and np.abs(weights).max() > 0.9 * r  # spans the range
    assert abs(weights.mean()) < 0.1 * r  # centred
    assert np.all(theta[2 * hv :] == 0)
    again = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(1))
    other = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(2))
    np.testing.assert_array_equal(theta, again)
    assert not np.array_equal(theta, other)


# --- cost and gradient -----------------------------------------------------------------------


def test_cost_matches_the_formula_with_theta_read_by_hand(data):
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(0))
    theta[2 * HIDDEN * VISIBLE :] = np.random.default_rng(1).normal(size=HIDDEN + VISIBLE) * 0.1
    cost, grad = ufldl.sparse_autoencoder_cost(theta, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data)
    leaves = [t.requires_grad_() for t in _weights_by_hand(theta, VISIBLE, HIDDEN)]
    W1, b1, W2, b2 = leaves
    expected = sum(reference_terms(W1, b1, W2, b2, torch.from_numpy(data.T.copy()), LAMBDA, RHO, BETA))
    assert cost == pytest.approx(expected.item(), rel=1e-12)
    g_W1, g_b1, g_W2, g_b2 = (g.numpy() for g in torch.autograd.grad(expected, leaves))
    # The gradient comes back in theta's own layout: [dW1(:); dW2(:); db1; db2].
    np.testing.assert_allclose(grad, ufldl.pack_theta(g_W1, g_W2, g_b1, g_b2), rtol=1e-9, atol=1e-14)


def test_gradient_check_on_ten_patches(data):
    assert data.shape == (VISIBLE, 10)
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(0))

    def J(t):
        return ufldl.sparse_autoencoder_cost(t, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data)

    _, grad = J(theta)
    numerical = ufldl.compute_numerical_gradient(lambda t: J(t)[0], theta)
    assert ufldl.relative_difference(numerical, grad) < 1e-9


def test_returned_gradient_does_not_alias_reused_buffers(data):
    rng = np.random.default_rng(3)
    theta_a, theta_b = (ufldl.initialize_parameters(HIDDEN, VISIBLE, rng) for _ in range(2))
    _, grad_a = ufldl.sparse_autoencoder_cost(theta_a, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data)
    kept = grad_a.copy()
    ufldl.sparse_autoencoder_cost(theta_b, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data)
    np.testing.assert_array_equal(grad_a, kept)


def test_compute_numerical_gradient_on_a_known_function():
    theta = np.array([0.3, -1.2, 2.0])
    numerical = ufldl.compute_numerical_gradient(lambda t: np.sin(t).sum() + t[0] * t[1], theta)
    np.testing.assert_allclose(numerical, np.cos(theta) + np.array([theta[1], theta[0], 0]), rtol=1e-7)
    np.testing.assert_array_equal(theta, [0.3, -1.2, 2.0])  # the caller's theta is left alone


def test_relative_difference_by_hand():
    assert ufldl.relative_difference([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert ufldl.relative_difference([3.0, 4.0], [3.0, 4.0]) == 0.0


def test_check_numerical_gradient():
    assert ufldl.check_numerical_gradient() < 1e-9


def test_c_and_fortran_ordered_data_agree(data):
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(4))
    c_data, f_data = np.ascontiguousarray(data), np.asfortranarray(data)
    cost_c, grad_c = ufldl.sparse_autoencoder_cost(theta, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, c_data)
    cost_f, grad_f = ufldl.sparse_autoencoder_cost(theta, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, f_data)
    assert cost_c == pytest.approx(cost_f, rel=1e-13)
    np.testing.assert_allclose(grad_c, grad_f, rtol=1e-11, atol=1e-15)


def test_float32_path(data):
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(5))
    cost64, grad64 = ufldl.sparse_autoencoder_cost(theta, VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data)
    cost32, grad32 = ufldl.sparse_autoencoder_cost(
        theta.astype(np.float32), VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data.astype(np.float32)
    )
    assert grad32.dtype == np.float32 and grad32.shape == theta.shape
    assert cost32 == pytest.approx(cost64, rel=1e-5)
    assert ufldl.relative_difference(grad32.astype(np.float64), grad64) < 1e-5
    # Mixed precision falls back to float64.
    _, grad_mixed = ufldl.sparse_autoencoder_cost(theta.astype(np.float32), VISIBLE, HIDDEN, LAMBDA, RHO, BETA, data)
    assert grad_mixed.dtype == np.float64


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(theta_size=-1), "theta"),
        (dict(theta_2d=True), "theta"),
        (dict(data_rows=VISIBLE + 1), "data"),
        (dict(data_1d=True), "data"),
        (dict(sparsity_param=0.0), "sparsity_param"),
        (dict(sparsity_param=1.0), "sparsity_param"),
        (dict(sparsity_param=1.5), "sparsity_param"),
        (dict(beta=-1.0), "beta"),
        (dict(lambda_=-1e-4), "lambda_"),
    ],
)
def test_bad_input_raises_user_error(data, change, words):
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(0))
    if "theta_size" in change:
        theta = theta[:-1]
    if change.get("theta_2d"):
        theta = theta[:, None]
    x = data
    if "data_rows" in change:
        x = np.vstack([data, data[:1]])
    if change.get("data_1d"):
        x = data[:, 0]
    args = dict(lambda_=LAMBDA, sparsity_param=RHO, beta=BETA)
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(UserError, match=words):
        ufldl.sparse_autoencoder_cost(theta, VISIBLE, HIDDEN, args["lambda_"], args["sparsity_param"], args["beta"], x)


@pytest.mark.parametrize("name", ["beta", "lambda_"])
def test_nan_hyper_parameters_raise_user_error(data, name):
    theta = ufldl.initialize_parameters(HIDDEN, VISIBLE, np.random.default_rng(0))
    args = dict(lambda_=LAMBDA, sparsity_param=RHO, beta=BETA)
    args[name] = float("nan")
    with pytest.raises(UserError):
        ufldl.sparse_autoencoder_cost(
            theta, VISIBLE, HIDDEN, args["lambda_"], args["sparsity_param"], args["beta"], data
        )


# --- data and pictures -----------------------------------------------------------------------


def test_sample_images_shape_range_and_column_major_patches():
    images = ufldl.sample_images(200, seed=3)
    assert images.shape == (64, 200)
    assert images.min() >= 0.1 and images.max() <= 0.9
    # Column k is patch k flattened like MATLAB's patch(:); the same patch row-major is its transpose.
    rows = natural_image_patches(200, 8, seed=3)
    for k in (0, 57, 199):
        np.testing.assert_allclose(images[:, k].reshape(8, 8, order="F"), rows[k].reshape(8, 8), rtol=0, atol=1e-12)


def test_display_network_writes_the_grid_enlarged_to_a_readable_png(tmp_path):
    A = np.random.default_rng(0).normal(size=(64, 25))  # 25 filters of 8x8, one per column
    path = tmp_path / "weights.png"
    image = ufldl.display_network(A, str(path))
    assert image.shape == (46, 46)  # 5 x 5 tiles of 8 px, 1 px border around and between
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (552, 552)  # the smallest whole multiple of 46 that is >= 512: 12
        np.testing.assert_array_equal(np.asarray(png), np.kron(image, np.ones((12, 12), np.uint8)))
    ufldl.display_network(A, str(path), min_size=100)
    with Image.open(path) as png:
        assert png.size == (138, 138)  # 3 x 46


def test_display_network_draws_columns_column_major_without_writing(tmp_path):
    A = np.zeros((64, 1))
    A[1, 0] = 1.0  # MATLAB's A(2) of an 8x8 patch: row 2, column 1
    A[8, 0] = -1.0  # A(9): row 1, column 2
    image = ufldl.display_network(A, filename=None)
    assert image.shape == (10, 10)
    tile = image[1:9, 1:9]
    assert tile[1, 0] == 255 and tile[0, 1] == 0 and tile[0, 0] == 128
    assert list(tmp_path.iterdir()) == []
