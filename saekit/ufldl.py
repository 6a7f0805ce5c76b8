"""UFLDL's sparse autoencoder exercise, in the exercise's own names and layouts.

A person following the UFLDL tutorial can use these functions in place of their MATLAB files:

- data is (visible_size, m), one example per column;
- theta is the exercise's  [W1(:); W2(:); b1(:); b2(:)]  with MATLAB's column-major (:), so a
  theta moves between saekit and MATLAB/Octave unchanged;
- sample_images and display_network flatten patches column-major, as MATLAB's patch(:) does.

The work is done by saekit's own vectorized cost (`saekit.kernels.classic`); this module only converts
layouts, which costs no copy of the data when it is passed Fortran-ordered (np.asfortranarray),
the layout MATLAB itself uses.
"""

import numpy as np
import torch

from .data.images import natural_image_patches
from .errors import UserError
from .kernels import classic
from .kinds.penalties import kl_term
from .viz.pictures import save_png, tile_filters, upscale

_workspace = None  # reused buffers of the last problem shape (see classic.Workspace)


def _split_theta(theta: np.ndarray, visible_size: int, hidden_size: int):
    """Views of W1 (hidden, visible), W2 (visible, hidden), b1, b2 into theta (column-major)."""
    hv = hidden_size * visible_size
    if theta.ndim != 1 or theta.size != 2 * hv + hidden_size + visible_size:
        raise UserError(
            f"theta has shape {theta.shape}; for visible_size={visible_size}, hidden_size={hidden_size} "
            f"it must be a 1-D array of {2 * hv + hidden_size + visible_size} values: [W1(:); W2(:); b1; b2]."
        )
    W1 = theta[:hv].reshape((hidden_size, visible_size), order="F")
    W2 = theta[hv : 2 * hv].reshape((visible_size, hidden_size), order="F")
    return W1, W2, theta[2 * hv : 2 * hv + hidden_size], theta[2 * hv + hidden_size :]


def pack_theta(W1, W2, b1, b2) -> np.ndarray:
    """theta = [W1(:); W2(:); b1(:); b2(:)], column-major like MATLAB."""
    return np.concatenate([np.asarray(a).ravel(order="F") for a in (W1, W2, b1, b2)])


def unpack_theta(theta, visible_size: int, hidden_size: int):
    """(W1, W2, b1, b2) from theta; copies, so they do not alias theta."""
    return tuple(a.copy() for a in _split_theta(np.asarray(theta), visible_size, hidden_size))


def initialize_parameters(hidden_size: int, visible_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """UFLDL's initializeParameters: W ~ U(-r, r) with r = sqrt(6)/sqrt(hidden+visible+1), b = 0."""
    rng = np.random.default_rng() if rng is None else rng
    r = np.sqrt(6) / np.sqrt(hidden_size + visible_size + 1)
    W1 = rng.random((hidden_size, visible_size)) * 2 * r - r
    W2 = rng.random((visible_size, hidden_size)) * 2 * r - r
    return pack_theta(W1, W2, np.zeros(hidden_size), np.zeros(visible_size))


def sparse_autoencoder_cost(theta, visible_size, hidden_size, lambda_, sparsity_param, beta, data):
    """UFLDL's sparseAutoencoderCost: returns (cost, grad) with grad shaped like theta.

    data is (visible_size, m). Computed in float32 when both theta and data are float32,
    otherwise in float64.
    """
    global _workspace
    theta, data = np.asarray(theta), np.asarray(data)
    dtype = np.float32 if theta.dtype == data.dtype == np.float32 else np.float64
    theta, data = theta.astype(dtype, copy=False), data.astype(dtype, copy=False)
    if data.ndim != 2 or data.shape[0] != visible_size:
        raise UserError(
            f"data has shape {data.shape}; it must be (visible_size={visible_size}, m), one example per column."
        )
    if not (0 < sparsity_param < 1) or not beta >= 0 or not lambda_ >= 0:  # `not >=` also refuses NaN
        raise UserError("need 0 < sparsity_param < 1, beta >= 0 and lambda_ >= 0.")
    W1, W2, b1, b2 = (torch.from_numpy(a) for a in _split_theta(theta, visible_size, hidden_size))
    result, _workspace = classic.cost_and_grad(
        W1, b1, W2, b2, torch.from_numpy(data.T), lambda_, kl_term(sparsity_param, beta), workspace=_workspace
    )
    grad_W1, grad_b1, grad_W2, grad_b2 = (g.numpy() for g in result.grads)
    return result.cost, pack_theta(grad_W1, grad_W2, grad_b1, grad_b2)


def compute_numerical_gradient(J, theta, epsilon: float = 1e-4) -> np.ndarray:
    """Central differences: grad_i = (J(theta + eps e_i) - J(theta - eps e_i)) / (2 eps). J returns the cost."""
    theta = np.array(theta, dtype=np.float64)
    grad = np.empty_like(theta)
    for i in range(theta.size):
        old = theta[i]
        theta[i] = old + epsilon
        plus = J(theta)
        theta[i] = old - epsilon
        minus = J(theta)
        theta[i] = old
        grad[i] = (plus - minus) / (2 * epsilon)
    return grad


def relative_difference(numerical, analytic) -> float:
    """UFLDL's check: norm(num - grad) / norm(num + grad)."""
    numerical, analytic = np.asarray(numerical), np.asarray(analytic)
    return float(np.linalg.norm(numerical - analytic) / np.linalg.norm(numerical + analytic))


def check_numerical_gradient() -> float:
    """UFLDL's checkNumericalGradient on h(x) = x1^2 + 3 x1 x2 at (4, 10); returns the relative difference."""

    def simple_quadratic(x):
        return x[0] ** 2 + 3 * x[0] * x[1], np.array([2 * x[0] + 3 * x[1], 3 * x[0]])

    x = np.array([4.0, 10.0])
    _, grad = simple_quadratic(x)
    numerical = compute_numerical_gradient(lambda t: simple_quadratic(t)[0], x)
    return relative_difference(numerical, grad)


def sample_images(num_patches: int = 10000, patch_size: int = 8, seed: int = 0, images_mat=None) -> np.ndarray:
    """UFLDL's sampleIMAGES then normalizeData: (patch_size**2, num_patches), values in [0.1, 0.9].

    Uses IMAGES.mat when its path is given, else saekit's whitened bundled photographs.
    """
    patches = natural_image_patches(num_patches, patch_size, seed=seed, images_mat=images_mat, order="F")
    return np.asfortranarray(patches.T)


def display_network(
    A, filename: str | None = "weights.png", scale_each: bool = True, min_size: int = 512
) -> np.ndarray:
    """UFLDL's display_network: the columns of A (pixels, n_filters) as tiles; saves a PNG when filename is given.

    Each filter is scaled by its own largest absolute value (grey is 0), pixels column-major.
    Returns the grid at one pixel per weight, like display_network's `array` (25 filters of 8x8:
    46x46 with the 1-pixel borders). The PNG is that grid enlarged by a whole factor, each weight
    a square block, to at least min_size pixels on a side (552x552 for 25 filters of 8x8), as
    MATLAB's imagesc shows it enlarged in its figure window. Call it as the exercise does:
    display_network(W1.T).
    """
    image = tile_filters(np.asarray(A).T, scale_each=scale_each, order="F")
    if filename is not None:
        save_png(upscale(image, min_size), filename)
    return image
