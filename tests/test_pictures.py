"""saekit.viz.pictures: pixel values, grid geometry and chart marks checked against hand-built cases."""

import math
import os

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from saekit.errors import UserError
from saekit.viz.pictures import (
    confusion_matrix_image,
    histogram_chart,
    histogram_counts,
    line_chart,
    save_filters,
    save_png,
    side_by_side,
    tile_filters,
    tile_images,
    upscale,
)
from saekit.viz.report import most_contrast_first

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # the first two series colours
DARK_BLUE = (8, 48, 107)  # a confusion-matrix cell holding its whole row


def colour_mask(img, rgb):
    return (img == np.array(rgb, dtype=np.uint8)).all(axis=2)


# ---------------------------------------------------------------------------- tile_filters


def test_filter_values_map_zero_to_grey_and_extremes_to_black_and_white():
    # One 2x2 filter with max |value| 1: v -> floor(128 + 127.5 v), worked by hand.
    img = tile_filters(np.array([[0.0, 0.5, -1.0, 1.0]]))
    expected = np.zeros((4, 4), np.uint8)  # 1 pixel of black border all round
    expected[1:3, 1:3] = [[128, 191], [0, 255]]
    np.testing.assert_array_equal(img, expected)
    assert img.dtype == np.uint8


def test_scale_each_versus_one_global_scale():
    W = np.array([[1.0, -1.0], [10.0, 5.0]])  # two 1x2 filters of very different size
    each = tile_filters(W, image_shape=(1, 2))
    both = tile_filters(W, image_shape=(1, 2), scale_each=False)
    assert each.shape == both.shape == (3, 7)  # 1 row, 2 columns of 1x2 tiles, padding 1
    # Own scale: filter 1 spans black..white; filter 2 is 10 -> 255, 5 -> 128 + 63.75.
    np.testing.assert_array_equal(each[1, 1:3], [255, 0])
    np.testing.assert_array_equal(each[1, 4:6], [255, 191])
    # Shared scale 10: filter 1 is +-0.1 -> 128 +- 12.75, nearly grey.
    np.testing.assert_array_equal(both[1, 1:3], [140, 115])
    np.testing.assert_array_equal(both[1, 4:6], [255, 191])


@pytest.mark.parametrize(
    "n, shape, padding", [(5, (3, 2), 2), (10, (8, 8), 1), (1, (4, 4), 0), (16, (2, 2), 1), (17, (2, 3), 3)]
)
def test_grid_geometry(n, shape, padding):
    h, w = shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    rng = np.random.default_rng(n)
    W = rng.uniform(0.5, 1.0, (n, h * w))  # all positive: every tile pixel is > 128
    img = tile_filters(W, image_shape=shape, padding=padding)
    assert img.shape == (padding + rows * (h + padding), padding + cols * (w + padding))
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        top, left = padding + i * (h + padding), padding + j * (w + padding)
        cell = img[top : top + h, left : left + w]
        assert (cell > 128).all() if k < n else (cell == 0).all()  # empty cells are black
    # Padding lines are black.
    for i in range(rows + 1):
        assert (img[i * (h + padding) : i * (h + padding) + padding] == 0).all()
    for j in range(cols + 1):
        assert (img[:, j * (w + padding) : j * (w + padding) + padding] == 0).all()


def test_order_c_versus_f_on_an_asymmetric_filter():
    f = np.zeros((1, 6))
    f[0, 1], f[0, 4] = 1.0, -1.0  # a 2x3 picture
    c = tile_filters(f, image_shape=(2, 3), padding=0)
    fortran = tile_filters(f, image_shape=(2, 3), padding=0, order="F")
    # Row-major: index 1 -> (0, 1), index 4 -> (1, 1). Column-major (columns of 2 stacked):
    # index 1 -> (1, 0), index 4 -> (0, 2).
    np.testing.assert_array_equal(c, [[128, 255, 128], [128, 0, 128]])
    np.testing.assert_array_equal(fortran, [[128, 128, 0], [255, 128, 128]])


def test_fortran_order_matches_matlab_column_stacking_for_many_filters():
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(3, 4, 5))
    # MATLAB's patch(:) stacks columns: element (r, c) goes to position r + c * h.
    flat = np.array([[t[r, c] for c in range(5) for r in range(4)] for t in tiles])
    np.testing.assert_array_equal(tile_filters(flat, (4, 5), order="F"), tile_filters(tiles.reshape(3, 20), (4, 5)))


def test_all_zero_filter_is_flat_grey_without_dividing_by_zero():
    W = np.zeros((2, 4))
    W[1] = [1, 2, 3, 4]
    with np.errstate(all="raise"):
        img = tile_filters(W)
        both = tile_filters(np.zeros((1, 4)), scale_each=False)
    assert (img[1:3, 1:3] == 128).all()
    assert (both[1:3, 1:3] == 128).all()


@pytest.mark.parametrize(
    "W, kw, words",
    [
        (np.zeros((3, 10)), {}, "perfect square"),
        (np.zeros((3, 10)), {"image_shape": (3, 3)}, "image_shape"),
        (np.zeros(9), {}, "2-D"),
        (np.zeros((0, 9)), {}, "2-D"),
        (np.full((1, 4), np.nan), {}, "NaN"),
        (np.zeros((1, 4)), {"order": "K"}, "order"),
        (np.zeros((1, 4)), {"padding": -1}, "padding"),
    ],
)
def test_tile_filters_rejects_bad_input(W, kw, words):
    with pytest.raises(UserError, match=words):
        tile_filters(W, **kw)


def test_non_square_filters_with_an_explicit_shape():
    img = tile_filters(np.ones((2, 10)), image_shape=(2, 5), padding=1)
    assert img.shape == (1 + 1 * 3, 1 + 2 * 6)


# ---------------------------------------------------------------------------- tile_images


def test_tile_images_uses_one_shared_scale_from_the_data():
    X = np.array([[0.0, 2.0], [4.0, 8.0]])  # two 1x2 images; data range 0..8
    img = tile_images(X, image_shape=(1, 2))
    assert img.shape == (3, 7)
    # x -> 2 x / 8 - 1 in [-1, 1] -> floor(128 + 127.5 v): 0 -> 0, 2 -> 64, 4 -> 128, 8 -> 255.
    np.testing.assert_array_equal(img[1, 1:3], [0, 64])
    np.testing.assert_array_equal(img[1, 4:6], [128, 255])  # not stretched to 0..255 alone
    assert img[0].tolist() == [128] * 7  # padding is mid-grey


def test_tile_images_with_a_given_range_clips_outside_it():
    X = np.array([[-1.0, 0.0, 2.0, 4.0, 9.0]])
    img = tile_images(X, image_shape=(1, 5), low=0.0, high=4.0, padding=0)
    np.testing.assert_array_equal(img, [[0, 0, 128, 255, 255]])


def test_tile_images_of_constant_data_is_grey():
    img = tile_images(np.full((4, 9), 3.0), padding=0)
    assert (img == 128).all()


@pytest.mark.parametrize("kw", [{"low": 1.0, "high": 1.0}, {"low": 2.0, "high": 1.0}, {"low": 5.0}, {"high": -1.0}])
def test_tile_images_rejects_an_empty_range(kw):
    with pytest.raises(UserError, match="empty"):
        tile_images(np.arange(4.0).reshape(1, 4), **kw)  # data range 0..3


def test_tile_images_with_one_bound_takes_the_other_from_the_data():
    img = tile_images(np.array([[0.0, 1.0, 2.0, 4.0]]), image_shape=(1, 4), high=2.0, padding=0)
    np.testing.assert_array_equal(img, [[0, 128, 255, 255]])


# ---------------------------------------------------------------------------- side_by_side

PAGE, FRAME_GREY = 255, 120  # the page around the tiles and the frame around each tile


def grey(values, lo, hi):
    """The shared grey scale, by hand: lo -> 0, hi -> 255, clipped; floor(128 + 127.5 v) on v in [-1, 1]."""
    v = np.clip(2 * (np.asarray(values, dtype=np.float64) - lo) / (hi - lo) - 1, -1, 1)
    return np.floor(128 + 127.5 * v).astype(np.uint8)


def test_side_by_side_puts_every_tile_zoomed_and_framed_at_its_place():
    # 3 pairs of 8x8 tiles, worked by hand: zoom 7 (56 px tiles), groups 56 + 6 + 56 = 118 wide,
    # ceil(sqrt(3 * 56 / 118)) = 2 group columns and 2 rows; the grid is 2 * 118 + 20 = 256
    # wide, centred on the 640-pixel minimum width (left 192), below the margin (12), the
    # title line and the label line (22 each): top 56. Height 56 + 2 * (56 + 20) + 22 + 12.
    rng = np.random.default_rng(0)
    inputs, outputs = rng.normal(size=(3, 64)), rng.normal(size=(3, 64))
    img = side_by_side(inputs, outputs)
    assert img.shape == (242, 640) and img.dtype == np.uint8
    lo, hi = np.percentile(np.concatenate([inputs, outputs]), [1, 99])
    for g in range(3):
        i, j = divmod(g, 2)
        top = 56 + i * (56 + 20)
        for a, rows in enumerate((inputs, outputs)):
            left = 192 + j * (118 + 20) + a * (56 + 6)
            expected = np.kron(grey(rows[g].reshape(8, 8), lo, hi), np.ones((7, 7), np.uint8))
            np.testing.assert_array_equal(img[top : top + 56, left : left + 56], expected)
            frame = img[top - 1 : top + 57, left - 1 : left + 57]
            assert (frame[0] == FRAME_GREY).all() and (frame[-1] == FRAME_GREY).all()
            assert (frame[:, 0] == FRAME_GREY).all() and (frame[:, -1] == FRAME_GREY).all()
    assert (img[56 + 76 - 1 : 56 + 76 + 57, 192 + 138 - 1 : 192 + 138 + 119] == PAGE).all()  # the empty 4th cell
    assert (img[57 : 56 + 55, 192 + 56 + 1 : 192 + 62 - 1] == PAGE).all()  # the gap inside a pair
    assert (img[57 : 56 + 55, 192 + 118 + 1 : 192 + 138 - 1] == PAGE).all()  # the gap between pairs


@pytest.mark.parametrize(
    "n, k, shape, expected",
    [
        # 50 pairs of 8x8: zoom 7, groups 118 wide, ceil(sqrt(50 * 56 / 118)) = 5 columns, 10 rows:
        # width 5 * 118 + 4 * 20 + 2 * 12, height 56 + 10 * (56 + 20) + 22 + 12.
        (50, 2, (8, 8), (850, 694)),
        # 50 triples of 28x28 digits: zoom 2 (56 px), groups 3 * 56 + 2 * 6 = 180 wide,
        # ceil(sqrt(50 * 56 / 180)) = 4 columns, 13 rows.
        (50, 3, (28, 28), (56 + 13 * 76 + 34, 4 * 180 + 3 * 20 + 24)),
        # One pair of 2x3 tiles: zoom ceil(56 / 3) = 19, tiles 38 x 57; the minimum width.
        (1, 2, (2, 3), (56 + 38 + 20 + 34, 640)),
    ],
)
def test_side_by_side_size(n, k, shape, expected):
    arrays = [np.full((n, shape[0] * shape[1]), float(i)) for i in range(k)]
    assert side_by_side(*arrays, image_shape=shape).shape == expected


def test_side_by_side_on_given_bounds_with_a_chosen_zoom():
    inputs = np.array([[0.0] * 4, [1.0] * 4, [2.0] * 4])  # 2x2 tiles on the scale 0..4
    outputs = np.array([[4.0] * 4, [3.0] * 4, [5.0] * 4])  # 5 is beyond high: clipped to white
    img = side_by_side(inputs, outputs, low=0.0, high=4.0, zoom=1)
    # zoom 1: groups 2 + 6 + 2 = 10 wide, ceil(sqrt(3 * 2 / 10)) = 1 column of 3 rows, 2 + 20 apart.
    greys = {0.0: 0, 1.0: 64, 2.0: 128, 3.0: 191, 4.0: 255, 5.0: 255}  # floor(128 + 127.5 (x / 2 - 1))
    left = (640 - 10) // 2
    for g in range(3):
        top = 56 + g * 22
        assert (img[top : top + 2, left : left + 2] == greys[inputs[g, 0]]).all()
        assert (img[top : top + 2, left + 8 : left + 10] == greys[outputs[g, 0]]).all()


def test_side_by_side_default_scale_clips_the_outer_percent():
    # One bright outlier must not squash every other tile to black: the scale runs from the 1st
    # to the 99th percentile of all values, and the outlier is clipped to white.
    rng = np.random.default_rng(1)
    inputs = rng.uniform(0, 1, (4, 16))
    outputs = inputs.copy()
    outputs[0, 0] = 1000.0
    img = side_by_side(inputs, outputs, zoom=1)
    lo, hi = np.percentile(np.concatenate([inputs, outputs]), [1, 99])
    assert hi < 2
    # 4 pairs of 4x4 at zoom 1: groups 14 wide, ceil(sqrt(4 * 4 / 14)) = 2 columns, 2 rows.
    left = (640 - (2 * 14 + 20)) // 2
    np.testing.assert_array_equal(img[56 : 56 + 4, left : left + 4], grey(inputs[0].reshape(4, 4), lo, hi))
    assert img[56, left + 10] == 255  # the outlier, first pixel of the first output


def test_side_by_side_of_constant_data_is_mid_grey():
    img = side_by_side(np.full((1, 4), 3.0), np.full((1, 4), 3.0), zoom=1)
    left = (640 - 10) // 2
    assert (img[56:58, left : left + 2] == 128).all() and (img[56:58, left + 8 : left + 10] == 128).all()


def dark_columns(img, rows):
    """Columns holding text (dark ink) in the given rows."""
    return np.flatnonzero((img[rows] < 100).any(axis=0))


def test_side_by_side_labels_each_tile_column_and_the_title_sits_above():
    x = np.random.default_rng(2).normal(size=(3, 64))
    # 2 group columns of pairs (see the first test): tile columns at left 192, 254, 330, 392, 56 wide.
    unlabelled = side_by_side(x, x, labels=("", ""))
    labelled = side_by_side(x, x, labels=("in", "out"), title="a title")
    changed = np.flatnonzero((unlabelled != labelled).any(axis=1))
    assert changed.min() >= 12 and changed.max() < 56  # only the title and label lines change
    ink = dark_columns(labelled, slice(34, 56))
    assert dark_columns(unlabelled, slice(34, 56)).size == 0
    for left in (192, 254, 330, 392):
        inside = ink[(ink >= left) & (ink < left + 56)]
        assert inside.size > 3 and abs((inside.min() + inside.max()) / 2 - (left + 28)) <= 2  # centred
    title_ink = dark_columns(labelled, slice(12, 34))
    assert abs((title_ink.min() + title_ink.max()) / 2 - 320) <= 2  # centred on the page
    # The scale line under the grid is there with or without labels.
    assert dark_columns(unlabelled, slice(242 - 34, 242 - 12)).size > 50


@pytest.mark.parametrize(
    "arrays, kw, words",
    [
        ((np.zeros((3, 4)), np.zeros((2, 4))), {}, "same shape"),
        ((np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 5))), {}, "same shape"),
        ((np.zeros((3, 4)), np.zeros((3, 4))), {"labels": ("only one",)}, "one label per array"),
        ((np.zeros((3, 4)), np.zeros((3, 4))), {"zoom": 0}, "zoom"),
        ((np.zeros((3, 4)), np.zeros((3, 4))), {"low": 1.0, "high": 0.0}, "empty"),
    ],
)
def test_side_by_side_rejects_bad_input(arrays, kw, words):
    with pytest.raises(UserError, match=words):
        side_by_side(*arrays, **kw)


def test_most_contrast_first_orders_rows_by_their_spread():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [5.0, 5.0, 6.0], [0.0, 10.0, 0.0]])
    np.testing.assert_array_equal(most_contrast_first(x).numpy(), x.numpy()[[3, 1, 2, 0]])


# ---------------------------------------------------------------------------- upscale


def test_upscale_repeats_each_pixel_in_a_whole_block():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3)
    big = upscale(img, min_size=7)  # 3 * 3 = 9 >= 7 > 3 * 2
    assert big.shape == (6, 9)
    for r in range(2):
        for c in range(3):
            assert (big[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] == img[r, c]).all()
    rgb = upscale(np.zeros((2, 3, 3), np.uint8), min_size=7)
    assert rgb.shape == (6, 9, 3)
    np.testing.assert_array_equal(upscale(img, min_size=3), img)  # already big enough


# ---------------------------------------------------------------------------- save_png


def test_save_png_round_trips_pixels_and_leaves_no_temporary_file(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    for name, img in [("grey.png", grey), ("rgb.png", rgb), ("grey.png", grey[::-1].copy())]:
        path = save_png(img, tmp_path / name)  # the third call overwrites the first
        assert path == tmp_path / name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    assert sorted(os.listdir(tmp_path)) == ["grey.png", "rgb.png"]


def test_save_png_failure_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_png(np.zeros((2, 2), np.uint8), tmp_path / "a.png")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(np.full((2, 2), 255, np.uint8), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.png"]
    assert (np.asarray(Image.open(path)) == 0).all()


def test_save_png_rejects_bad_pictures_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="uint8"):
        save_png(np.zeros((2, 2)), tmp_path / "a.png")
    with pytest.raises(UserError, match="uint8"):
        save_png(np.zeros((2, 2, 4), np.uint8), tmp_path / "a.png")
    with pytest.raises(UserError, match="does not exist"):
        save_png(np.zeros((2, 2), np.uint8), tmp_path / "nope" / "a.png")


def test_save_filters_writes_the_upscaled_grid(tmp_path):
    W = np.array([[0.0, 0.5, -1.0, 1.0]])  # a 4x4 grid, upscaled by 128 to 512x512
    path = save_filters(W, tmp_path / "filters.png")
    img = np.asarray(Image.open(path))
    assert img.shape == (512, 512)
    np.testing.assert_array_equal(img[::128, ::128], tile_filters(W))


# ---------------------------------------------------------------------------- line_chart


def near(img, rgb, tolerance=30):
    """Pixels within `tolerance` of a colour in every channel (lines are anti-aliased at their edges)."""
    return (np.abs(img.astype(int) - np.array(rgb)) <= tolerance).all(axis=2)


def series_pixels(series, **kw):
    """Pixels of each series colour drawn as data, without the legend's swatches (found by
    drawing the same names with no drawable points: the legend sits under the axes either way)."""
    img = line_chart(series, **kw)
    empty = line_chart({name: [np.nan] for name in series}, **kw)
    return img, [near(img, c) & ~near(empty, c) for c in (BLUE, ORANGE)]


def test_line_chart_size_and_one_colour_per_series():
    img, (blue, orange) = series_pixels(
        {"up": np.arange(50.0), "down": 50 - np.arange(50.0)}, title="t", xlabel="x", ylabel="y", width=640, height=400
    )
    assert img.shape == (400, 640, 3) and img.dtype == np.uint8
    assert blue.sum() > 200 and orange.sum() > 200
    # Image rows grow downwards: the rising series is higher (smaller row) on the right.
    rows, cols = np.nonzero(blue)
    middle = (cols.min() + cols.max()) / 2
    assert rows[cols > middle].mean() < rows[cols < middle].mean()
    rows, cols = np.nonzero(orange)
    assert rows[cols > middle].mean() > rows[cols < middle].mean()


def test_line_chart_breaks_the_line_at_nan():
    y = np.r_[np.linspace(0, 1, 20), np.full(20, np.nan), np.linspace(1, 2, 20)]
    _, (blue, _) = series_pixels({"a": y})
    cols = np.flatnonzero(blue.any(axis=0))
    # The NaN third of the x range has no line.
    assert np.diff(cols).max() > 0.25 * (cols.max() - cols.min())


def test_line_chart_draws_a_single_point_and_a_constant_series():
    _, (dot, _) = series_pixels({"a": [3.0]})
    assert 5 <= dot.sum() < 400  # a small dot
    _, (flat, _) = series_pixels({"a": np.full(30, 7.0)})
    rows = np.flatnonzero(flat.any(axis=1))
    assert flat.sum() > 300 and rows.max() - rows.min() <= 4  # one horizontal line


def test_line_chart_takes_x_and_y_rows_and_log_y_skips_non_positive_values():
    img = line_chart({"a": np.array([[0, 10, 20, 30], [1.0, 0.0, -1.0, 100.0]])}, log_y=True)
    assert img.shape == (500, 800, 3)
    _, (blue, _) = series_pixels({"a": [1e-3, 1e-2, 0.0, -1.0, 10.0]}, log_y=True)
    assert blue.sum() > 50


def test_line_chart_says_when_a_log_series_has_nothing_above_zero():
    # A weight decay of 0 on a log axis: no line, and the legend says why (its entry is longer
    # than that of a series that is simply missing).
    zero = line_chart({"cost": [3.0, 2.0, 1.0], "decay": [0.0, 0.0, 0.0]}, log_y=True)
    missing = line_chart({"cost": [3.0, 2.0, 1.0], "decay": [np.nan] * 3}, log_y=True)
    orange = np.flatnonzero(near(zero, ORANGE).any(axis=1))  # only the legend's swatch: no line, no dot
    assert orange.size and orange.max() - orange.min() <= 4 and orange.min() > 400
    legend = slice(orange.min() - 7, orange.max() + 8)
    ink = [np.flatnonzero((img[legend] < 100).all(axis=2).any(axis=0)) for img in (zero, missing)]
    assert ink[0].max() - ink[0].min() > ink[1].max() - ink[1].min() + 50


def test_line_chart_all_nan_still_draws_axes():
    img = line_chart({"a": [np.nan, np.nan]})
    assert img.shape == (500, 800, 3) and (img < 100).any()  # frame and labels in dark ink


@pytest.mark.parametrize(
    "series, kw, words",
    [
        ({}, {}, "at least one series"),
        ({"a": np.zeros((3, 3))}, {}, "1-D"),
        ({"a": [1.0]}, {"width": 50}, "width"),
    ],
)
def test_line_chart_rejects_bad_input(series, kw, words):
    with pytest.raises(UserError, match=words):
        line_chart(series, **kw)


# ---------------------------------------------------------------------------- histograms


def test_histogram_counts_set_negative_infinity_apart():
    counts, edges, n_dead = histogram_counts([-np.inf, 0.0, -np.inf, 0.0, 0.0, 1.0], bins=2)
    np.testing.assert_array_equal(counts, [3, 1])
    np.testing.assert_allclose(edges, [0.0, 0.5, 1.0])
    assert n_dead == 2


def test_histogram_counts_on_a_log_axis_sets_zeros_apart():
    counts, edges, n_zero = histogram_counts([0.0, 1.0, 10.0, 0.0, 100.0], bins=2, log_x=True)
    np.testing.assert_allclose(edges, [0.0, 1.0, 2.0])  # log10 of 1 .. 100
    np.testing.assert_array_equal(counts, [1, 2])  # numpy's last bin includes its right edge
    assert n_zero == 2


@pytest.mark.parametrize(
    "values, kw, words",
    [
        ([1.0, np.nan], {}, "NaN"),
        ([1.0, np.inf], {}, r"\+inf"),
        ([1.0, -2.0], {"log_x": True}, ">= 0"),
        ([1.0], {"bins": 0}, "bins"),
    ],
)
def test_histogram_counts_rejects_bad_input(values, kw, words):
    with pytest.raises(UserError, match=words):
        histogram_counts(values, **kw)


def test_histogram_chart_bar_heights_follow_the_counts():
    img = histogram_chart([0.0, 0.0, 0.0, 1.0, -np.inf], bins=2, title="density", width=640, height=480)
    assert img.shape == (480, 640, 3)
    heights = colour_mask(img, BLUE).sum(axis=0)  # bar pixels per column
    bars = heights[heights > 0]
    left, right = bars[: len(bars) // 2], bars[len(bars) // 2 :]
    assert abs(np.median(left) / np.median(right) - 3) < 0.05  # 3 values vs 1
    assert abs(len(left) - len(right)) <= 2  # equal bins are equally wide


def test_histogram_chart_of_only_dead_values_draws_no_bars():
    img = histogram_chart([-np.inf] * 4)
    assert img.shape == (500, 800, 3) and not near(img, BLUE).any()


# ---------------------------------------------------------------------------- confusion matrix


def blues(share):
    """The colour of a cell holding `share` of its row, by matplotlib's own Blues map: sqrt of the share."""
    return np.array(matplotlib.colormaps["Blues"](np.sqrt(share))[:3]) * 255


def full_rows(cm):
    """Pixels of cells that hold their whole row (dark blue), without the colour bar's dark end: found
    by drawing a matrix of the same size in which no cell holds its whole row."""
    img = confusion_matrix_image(cm)
    return img, colour_mask(img, DARK_BLUE) & ~colour_mask(confusion_matrix_image(np.ones_like(cm)), DARK_BLUE)


def test_confusion_matrix_rows_are_true_classes_and_columns_predictions():
    # Every example predicted as class 1: both cells of column 1 hold their whole row, and
    # shade a vertical strip (a horizontal one would mean rows are the predictions).
    _, dark = full_rows(np.array([[0, 5], [0, 5]]))
    rows, cols = np.nonzero(dark)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - 2 * width) <= 3  # one column, two rows of square cells
    # Predicted as class 0 instead: the same strip one cell further left.
    cols_0 = np.nonzero(full_rows(np.array([[5, 0], [5, 0]]))[1])[1]
    assert abs(cols_0.min() - (cols.min() - width)) <= 1 and abs(cols_0.max() - (cols.max() - width)) <= 1


def test_confusion_matrix_diagonal_is_dark_and_off_diagonal_the_lightest_blue():
    img, dark = full_rows(np.diag([7, 3, 9]))
    rows, cols = np.nonzero(dark)
    cell = (cols.max() - cols.min() + 1) / 3
    top, left = rows.min(), cols.min()
    for i in range(3):
        for j in range(3):
            y, x = int(top + (i + 0.15) * cell), int(left + (j + 0.15) * cell)  # off the text
            np.testing.assert_allclose(img[y, x], blues(1.0 if i == j else 0.0), atol=1.5)


def test_confusion_matrix_shades_a_smaller_share_lighter():
    img, dark = full_rows(np.array([[9, 1], [0, 10]]))
    rows, cols = np.nonzero(dark)  # the (1, 1) cell only
    cell = cols.max() - cols.min() + 1
    top, left = rows.min() - cell, cols.min() - cell  # the grid's top-left corner
    big, small = img[top + 3, left + 3], img[top + 3, left + cell + 3]
    np.testing.assert_allclose(big, blues(0.9), atol=1.5)
    np.testing.assert_allclose(small, blues(0.1), atol=1.5)
    assert small.astype(int).sum() > big.astype(int).sum() > sum(DARK_BLUE)  # lighter
    assert (small < 240).any()  # a 10% confusion is clearly tinted


def test_confusion_matrix_picture_grows_with_the_number_of_classes():
    small, large = confusion_matrix_image(np.eye(3, dtype=int)), confusion_matrix_image(np.eye(20, dtype=int))
    assert small.ndim == large.ndim == 3 and small.dtype == np.uint8
    assert large.shape[0] > small.shape[0] and large.shape[1] > small.shape[1]


@pytest.mark.parametrize(
    "cm, names, words",
    [
        (np.zeros((2, 3)), None, "square"),
        (np.array([[1, -1], [0, 1]]), None, "counts"),
        (np.array([[1.5, 0], [0, 1]]), None, "counts"),
        (np.zeros((2, 2)), None, "all zeros"),
        (np.eye(2), ["a"], "class_names"),
    ],
)
def test_confusion_matrix_rejects_bad_input(cm, names, words):
    with pytest.raises(UserError, match=words):
        confusion_matrix_image(cm, names)
