"""Whitened natural images and patch sampling, checked against hand-built cases."""

import json
import socket

import numpy as np
import pytest
import safetensors.torch
import scipy.io
import torch

from saekit.config import TrainConfig
from saekit.data import images as I
from saekit.errors import UserError
from saekit.eval.metrics import filter_localization
from saekit.run import train_run


def _gain(f, n, f0_fraction=0.4):
    """The whitening filter's gain at radial frequency f cycles/picture, by hand."""
    return f * np.exp(-((f / (f0_fraction * n)) ** 4))


def _cosine(n, fx, fy):
    """(n, n) image cos(2 pi (fx x + fy y) / n): an eigenfunction of any radial filter."""
    y, x = np.mgrid[0:n, 0:n]
    return np.cos(2 * np.pi * (fx * x + fy * y) / n)


def _radial_power(image, lo, hi):
    """Mean power per frequency over the ring lo <= rho < hi cycles/picture."""
    n = image.shape[0]
    f = np.fft.fftfreq(n) * n
    rho = np.hypot(f[:, None], f[None, :])
    return (np.abs(np.fft.fft2(image)) ** 2)[(rho >= lo) & (rho < hi)].mean()


def _encoded_images(rows, cols, n):
    """(rows, cols, n) images whose pixel value spells its own position: 10000 k + 100 r + c."""
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(n), indexing="ij")
    return (10000 * k + 100 * r + c).astype(np.float64)


# --- whitening ---------------------------------------------------------------------------


@pytest.mark.parametrize("fx, fy", [(3, 4), (0, 1), (7, -2), (10, 9), (16, 16)])
def test_whiten_scales_a_cosine_by_the_filter_gain(fx, fy):
    n = 32
    image = 2.5 * _cosine(n, fx, fy) + 7.0  # the constant is DC, which must vanish
    expected = 2.5 * _gain(np.hypot(fx, fy), n) * _cosine(n, fx, fy)
    np.testing.assert_allclose(I.whiten(image), expected, atol=1e-10)


def test_whiten_matches_the_matlab_construction_with_explicit_dft():
    # The sparsenet script: meshgrid(-N/2:N/2-1), fftshift, fft2, real(ifft2). Rebuilt here
    # with a hand-written DFT matrix and np.roll in place of fftshift.
    n = 6
    image = np.random.default_rng(1).normal(size=(n, n))
    fx, fy = np.meshgrid(np.arange(-n // 2, n // 2), np.arange(-n // 2, n // 2))
    rho = np.sqrt(fx * fx + fy * fy)
    filt = np.roll(rho * np.exp(-((rho / (0.4 * n)) ** 4)), (-n // 2, -n // 2), axis=(0, 1))
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
    spectrum = dft @ image @ dft.T
    expected = (dft.conj() @ (spectrum * filt) @ dft.conj().T).real / n**2
    np.testing.assert_allclose(I.whiten(image), expected, atol=1e-12)


def test_whiten_f0_fraction_moves_the_roll_off():
    n = 32
    image = _cosine(n, 8, 6)  # 10 cycles/picture
    np.testing.assert_allclose(I.whiten(image, f0_fraction=0.2), _gain(10, n, 0.2) * image, atol=1e-10)


@pytest.mark.parametrize(
    "image, f0_fraction",
    [
        (np.zeros((4, 5)), 0.4),
        (np.zeros(4), 0.4),
        (np.zeros((1, 1)), 0.4),
        (np.full((4, 4), np.nan), 0.4),
        (np.zeros((4, 4)), 0.0),
    ],
)
def test_whiten_rejects_bad_input(image, f0_fraction):
    with pytest.raises(UserError):
        I.whiten(image, f0_fraction)


def test_whitened_images_scales_the_set_to_mean_variance_point_one():
    # Two cosines: after whitening, amplitude a_i = A_i g(f_i); the variance (ddof=1) of a
    # zero-mean cosine over whole periods on n*n pixels is a^2/2 * n^2 / (n^2 - 1).
    n = 16
    amplitudes, freqs = np.array([1.0, 3.0]), [(2, 0), (3, 4)]
    raw = [a * _cosine(n, *f) for a, f in zip(amplitudes, freqs)]
    whitened_amp = amplitudes * np.array([_gain(np.hypot(*f), n) for f in freqs])
    mean_var = np.mean(whitened_amp**2 / 2 * n**2 / (n**2 - 1))
    scale = np.sqrt(0.1 / mean_var)
    out = I.whitened_images(raw)
    assert out.shape == (n, n, 2)
    for i, f in enumerate(freqs):
        np.testing.assert_allclose(out[:, :, i], scale * whitened_amp[i] * _cosine(n, *f), atol=1e-10)


def test_whitened_images_mean_variance_on_random_images():
    rng = np.random.default_rng(2)
    images = [rng.normal(size=(20, 20)) * s for s in (0.5, 1.0, 4.0)]
    out = I.whitened_images(images)
    variances = [np.var(out[:, :, i], ddof=1) for i in range(3)]
    assert np.mean(variances) == pytest.approx(0.1)
    assert variances[0] < variances[1] < variances[2]  # relative contrast is kept


@pytest.mark.parametrize("images", [[], [np.zeros((4, 4)), np.zeros((6, 6))], [np.ones((4, 4))]])
def test_whitened_images_rejects_empty_mixed_or_flat_sets(images):
    with pytest.raises(UserError):
        I.whitened_images(images)


# --- bundled photographs -----------------------------------------------------------------


def test_bundled_photographs_load_offline_as_grey_even_squares(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("bundled_photographs tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    I._photographs.cache_clear()
    photos = I.bundled_photographs()
    assert len(photos) == 4  # grass, gravel, moon, chelsea: natural things only
    side = photos[0].shape[0]
    assert side % 2 == 0 and side >= 256
    for photo in photos:
        assert photo.shape == (side, side) and photo.dtype == np.float64
        assert photo.min() >= 0.0 and photo.max() <= 1.0 and photo.std() > 0.02
        assert not photo.flags.writeable


def test_whitening_flattens_the_power_spectrum_of_the_photographs():
    # Natural images have power ~ 1/f^2: far more at 4-8 than at 32-64 cycles/picture (about
    # 280 times for moon and chelsea, 6-8 for the textures grass and gravel, 26 over the set).
    # Whitening multiplies power by ~f^2, bringing the ratio of the two bands towards 1.
    photos = I.bundled_photographs()
    whitened = I.whitened_images(photos)

    def low_to_mid(images):
        return sum(_radial_power(im - im.mean(), 4, 8) for im in images) / sum(
            _radial_power(im - im.mean(), 32, 64) for im in images
        )

    raw_ratio = low_to_mid(photos)
    white_ratio = low_to_mid([whitened[:, :, i] for i in range(whitened.shape[2])])
    assert raw_ratio > 20
    assert abs(np.log(white_ratio)) < 0.5 * abs(np.log(raw_ratio))


# --- patch sampling ----------------------------------------------------------------------


def test_sample_patches_are_real_sub_windows_covering_every_corner():
    rows, cols, n, p = 10, 11, 2, 8
    images = _encoded_images(rows, cols, n)
    patches = I.sample_patches(images, p, 3000, rng=np.random.default_rng(0))
    assert patches.shape == (3000, p * p)
    corners = set()
    for patch in patches:
        k, r, c = int(patch[0]) // 10000, int(patch[0]) % 10000 // 100, int(patch[0]) % 100
        np.testing.assert_array_equal(patch, images[r : r + p, c : c + p, k].ravel())
        corners.add((k, r, c))
    # Every top-left corner of every image is reachable, and nothing beyond.
    assert corners == {(k, r, c) for k in range(n) for r in range(rows - p + 1) for c in range(cols - p + 1)}


def test_sample_patches_order_f_is_matlab_column_major():
    images = _encoded_images(12, 12, 3)
    c_order = I.sample_patches(images, 4, 50, rng=np.random.default_rng(5))
    f_order = I.sample_patches(images, 4, 50, rng=np.random.default_rng(5), order="F")
    np.testing.assert_array_equal(f_order.reshape(50, 4, 4), c_order.reshape(50, 4, 4).transpose(0, 2, 1))
    # In patch(:), the second value is one row down (+100), in row-major one column right (+1).
    np.testing.assert_array_equal(f_order[:, 1] - f_order[:, 0], 100)
    np.testing.assert_array_equal(c_order[:, 1] - c_order[:, 0], 1)


@pytest.mark.parametrize(
    "shape, p, n, order",
    [
        ((8, 8), 4, 10, "C"),
        ((8, 8, 2), 9, 10, "C"),
        ((8, 8, 2), 0, 10, "C"),
        ((8, 8, 2), 2.5, 10, "C"),
        ((8, 8, 2), 4, 0, "C"),
        ((8, 8, 2), 4, 10, "K"),
    ],
)
def test_sample_patches_rejects_bad_input(shape, p, n, order):
    with pytest.raises(UserError):
        I.sample_patches(np.zeros(shape), p, n, rng=np.random.default_rng(0), order=order)


# --- normalisation -----------------------------------------------------------------------


def test_normalize_patches_on_a_hand_built_array():
    # 49 patches [d+1, d-1] and one [d+7, d-7], each with its own DC d. After DC removal the
    # values are +/-1 (98 of them) and +/-7: mean 0, so std^2 = (98 + 2*49) / 99 (ddof=1).
    dc = np.arange(50.0) * 3 - 20
    centred = np.array([[1.0, -1.0]] * 49 + [[7.0, -7.0]])
    pstd = 3 * np.sqrt((98 + 2 * 49) / 99)  # 4.22..., so +/-7 is clipped
    out = I.normalize_patches(centred + dc[:, None])
    np.testing.assert_allclose(out[:49, 0], 0.5 + 0.4 / pstd)
    np.testing.assert_allclose(out[:49, 1], 0.5 - 0.4 / pstd)
    np.testing.assert_allclose(out[49], [0.9, 0.1])


def test_normalize_patches_is_linear_inside_three_std_and_clipped_outside():
    patches = np.random.default_rng(3).standard_t(df=3, size=(500, 16)) * 5 + 2
    centred = patches - patches.mean(axis=1, keepdims=True)
    pstd = 3 * np.std(centred, ddof=1)
    out = I.normalize_patches(patches)
    assert out.min() >= 0.1 and out.max() <= 0.9
    inside = np.abs(centred) <= pstd
    assert 0 < (~inside).sum() < 0.05 * inside.size  # heavy tails: some, not many, clipped
    np.testing.assert_allclose(out[inside], 0.5 + 0.4 * centred[inside] / pstd)
    np.testing.assert_allclose(out[~inside], np.where(centred[~inside] > 0, 0.9, 0.1))


@pytest.mark.parametrize(
    "patches", [np.zeros(5), np.zeros((1, 1)), np.ones((4, 3)), np.array([[0.0, np.inf], [1.0, 2.0]])]
)
def test_normalize_patches_rejects_bad_input(patches):
    with pytest.raises(UserError):
        I.normalize_patches(patches)


# --- IMAGES.mat --------------------------------------------------------------------------


def test_load_images_mat_round_trip(tmp_path):
    images = np.random.default_rng(4).normal(size=(6, 5, 3))
    path = tmp_path / "IMAGES.mat"
    scipy.io.savemat(path, {"IMAGES": images, "other": np.ones(2)})
    loaded = I.load_images_mat(path)
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, images)


def test_load_images_mat_reads_a_2d_images_as_one_image(tmp_path):
    path = tmp_path / "one.mat"
    scipy.io.savemat(path, {"IMAGES": np.arange(12.0).reshape(3, 4)})
    np.testing.assert_array_equal(I.load_images_mat(path)[:, :, 0], np.arange(12.0).reshape(3, 4))


def _v73_header():
    # The 128-byte header MATLAB writes before the HDF5 data of a -v7.3 file: text, subsystem
    # offset, version 0x0200, endian indicator.
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 2024 HDF5 schema 1.00 ."
    return text.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(512)


def _truncated_mat(path):
    scipy.io.savemat(path, {"IMAGES": np.ones((30, 30, 2))})
    return path.read_bytes()[:300]


@pytest.mark.parametrize(
    "contents, message",
    [
        (lambda p: b"not a mat file at all " * 20, "not a readable MATLAB"),
        (lambda p: b"", "not a readable MATLAB"),
        (_truncated_mat, "not a readable MATLAB"),
        (lambda p: _v73_header(), "save -v7"),
    ],
)
def test_load_images_mat_rejects_bad_files(tmp_path, contents, message):
    path = tmp_path / "IMAGES.mat"
    path.write_bytes(contents(path))
    with pytest.raises(UserError, match=message):
        I.load_images_mat(path)


def test_load_images_mat_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(UserError, match=r"(?s)nowhere\.mat.*rctn\.org/bruno/sparsenet"):
        I.load_images_mat(tmp_path / "nowhere.mat")


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"images": np.ones((4, 4, 2)), "labels": np.ones(3)}, r"no variable named IMAGES.*'images', 'labels'"),
        ({"IMAGES": np.ones((4, 4, 2, 2))}, "rows x cols x n_images"),
        ({"IMAGES": "some text"}, "rows x cols x n_images"),
        ({"IMAGES": np.full((4, 4, 2), np.nan)}, "NaN or inf"),
    ],
)
def test_load_images_mat_rejects_bad_contents(tmp_path, variables, message):
    path = tmp_path / "IMAGES.mat"
    scipy.io.savemat(path, variables)
    with pytest.raises(UserError, match=message):
        I.load_images_mat(path)


# --- the whole pipeline ------------------------------------------------------------------


def test_natural_image_patches_are_deterministic_normalised_rows():
    a = I.natural_image_patches(2000, seed=7)
    assert a.shape == (2000, 64) and a.dtype == np.float64
    assert a.min() >= 0.1 and a.max() <= 0.9
    np.testing.assert_array_equal(a, I.natural_image_patches(2000, seed=7))
    assert not np.array_equal(a, I.natural_image_patches(2000, seed=8))
    # Whitened patches are mostly small values around 0.5 with a few strong edges.
    assert abs(np.median(a) - 0.5) < 0.02 and 0.05 < a.std() < 0.2


def test_natural_image_patches_use_images_mat_as_is(tmp_path):
    images = _encoded_images(12, 12, 2)
    path = tmp_path / "IMAGES.mat"
    scipy.io.savemat(path, {"IMAGES": images})
    patches = I.natural_image_patches(100, patch_size=4, seed=3, images_mat=path, order="F")
    # Without whitening, an encoded patch minus its mean is the same ramp everywhere:
    # +100 per row and +1 per column, so every patch normalises to one identical row.
    r, c = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    ramp = (100 * r + c).ravel(order="F")
    centred = np.tile(ramp - ramp.mean(), (100, 1))
    pstd = 3 * np.std(centred, ddof=1)
    np.testing.assert_allclose(patches, 0.5 + 0.4 * np.clip(centred, -pstd, pstd) / pstd)


# --- how local learned filters are -------------------------------------------------------


def _best_window_share(tile, wh, ww):
    """Brute force: the largest share of a tile's sum of squares inside any wh x ww window."""
    energy = tile**2
    h, w = tile.shape
    best = max(energy[r : r + wh, c : c + ww].sum() for r in range(h - wh + 1) for c in range(w - ww + 1))
    return best / energy.sum()


def test_filter_localization_on_hand_built_filters():
    point = np.zeros(64)
    point[27] = -3.0  # all energy in one pixel: share 1
    uniform = np.ones(64)  # 16 of 64 pixels in any 4x4 window: 1/4
    corners = np.zeros((8, 8))
    corners[0, 0] = corners[7, 7] = 1.0  # no 4x4 window holds both: 1/2
    W = torch.tensor(np.stack([point, uniform, corners.ravel()]))
    assert filter_localization(W, (8, 8)) == pytest.approx((1 + 0.25 + 0.5) / 3, rel=1e-12)


@pytest.mark.parametrize("shape", [(8, 8), (4, 6), (28, 28), (5, 5)])
def test_filter_localization_matches_a_brute_force_search(shape):
    h, w = shape
    W = np.random.default_rng(h * w).normal(size=(7, h * w))
    expected = np.mean([_best_window_share(row.reshape(h, w), max(1, h // 2), max(1, w // 2)) for row in W])
    assert filter_localization(torch.tensor(W), shape) == pytest.approx(expected, rel=1e-12)


def test_filter_localization_leaves_out_zero_filters():
    W = torch.zeros(3, 16, dtype=torch.float64)
    assert np.isnan(filter_localization(W, (4, 4)))
    W[1, 5] = 2.0
    assert filter_localization(W, (4, 4)) == 1.0


def test_an_image_run_reports_how_local_its_filters_are(tmp_path):
    cfg = TrainConfig.from_flat({"n_examples": 300, "max_iter": 5, "n_hidden": 4})
    train_run(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    W1 = safetensors.torch.load_file(str(tmp_path / "run" / "weights.safetensors"))["W1"].numpy()
    expected = np.mean([_best_window_share(row.reshape(8, 8), 4, 4) for row in W1])
    assert metrics["filter_localization"] == pytest.approx(expected, rel=1e-10)
