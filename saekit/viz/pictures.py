"""Pictures: arrays in, PNG files out.

Two kinds of picture:
- grey grids of tiles, drawn pixel by pixel with NumPy (exact: each value is one grey level):
  learned filters (`tile_filters`, after UFLDL's display_network.m), inputs (`tile_images`) and
  labelled groups of an input beside its reconstruction (`side_by_side`);
- charts, drawn by matplotlib (its Agg backend, no display): training curves (`line_chart`),
  histograms such as feature density (`histogram_chart`) and confusion matrices
  (`confusion_matrix_image`).

Every builder is pure and returns a uint8 array (H, W) or (H, W, 3), so tests can look at
pixels; `save_png` writes one atomically. The `save_*` wrappers for the filter and image grids
also `upscale` them, since an 8x8 patch is too small to see at one screen pixel per value.
"""

import io
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from saekit.errors import UserError
from saekit.files import atomic_write

# ----------------------------------------------------------------------------------------
# Grey grids of tiles


def _rows(X, name: str) -> np.ndarray:
    """X as a finite float64 array (n, d) with n, d >= 1, or a UserError naming `name`."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise UserError(f"{name} must be a non-empty 2-D array (n, d) with one example per row; got shape {X.shape}")
    if not np.isfinite(X).all():
        raise UserError(
            f"{name} contains NaN or inf; pictures need finite values (check the training run that produced it)"
        )
    return X


def _as_tiles(X: np.ndarray, image_shape, order: str, name: str) -> np.ndarray:
    """Rows (n, d) -> tiles (n, h, w), each row unflattened in `order` ("C" or "F")."""
    n, d = X.shape
    if image_shape is None:
        side = math.isqrt(d)
        if side * side != d:
            raise UserError(
                f"{name} has {d} values per row, which is not a perfect square; "
                f"pass image_shape=(height, width) with height * width = {d}"
            )
        image_shape = (side, side)
    h, w = image_shape
    if h * w != d:
        raise UserError(
            f"image_shape {tuple(image_shape)} holds {h * w} values but {name} has "
            f"{d} per row; pass a shape whose height * width = {d}"
        )
    if order not in ("C", "F"):
        raise UserError(f'order must be "C" (row-major, NumPy) or "F" (column-major, MATLAB); got {order!r}')
    if order == "C":
        return X.reshape(n, h, w)
    # Column-major (MATLAB's patch(:) stacks columns): each row holds the w columns of its
    # tile one after another, so read it as (w, h) and transpose.
    return X.reshape(n, w, h).transpose(0, 2, 1)


def _to_grey(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> uint8: -1 -> 0, 0 -> 128, 1 -> 255.

    floor(128 + 127.5 v) equals round((v + 1) / 2 * 255), which is what saving
    display_network's array with imwrite((array + 1) / 2) gives.
    """
    return np.clip(np.floor(128 + 127.5 * v), 0, 255).astype(np.uint8)


def _grid(tiles: np.ndarray, cols: int, padding: int, pad_value: int) -> np.ndarray:
    """Tiles (n, h, w) uint8 -> one (H, W) picture, row by row, with `padding` pixels of
    `pad_value` around and between tiles (display_network's buf); unused cells stay pad."""
    n, h, w = tiles.shape
    rows = -(-n // cols)
    out = np.full((padding + rows * (h + padding), padding + cols * (w + padding)), pad_value, dtype=np.uint8)
    for k in range(n):
        i, j = divmod(k, cols)
        top, left = padding + i * (h + padding), padding + j * (w + padding)
        out[top : top + h, left : left + w] = tiles[k]
    return out


def _square_cols(n: int) -> int:
    """ceil(sqrt(n)) exactly: the column count of a near-square grid of n cells."""
    return math.isqrt(n - 1) + 1


def _check_padding(padding) -> int:
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise UserError(f"padding must be a whole number of pixels >= 0; got {padding!r}")
    return int(padding)


def tile_filters(W, image_shape=None, scale_each=True, padding=1, order="C") -> np.ndarray:
    """Filters W (n_filters, d), one per row, as a grey grid (H, W) uint8, like display_network.m.

    Each filter is unflattened to image_shape (default: square, sqrt(d) on a side) in `order`
    ("F" for MATLAB's column-major patches) and divided by its own max |value| (scale_each,
    display_network's default) or by the max over all filters, so -max -> 0 (black),
    0 -> 128 (grey), +max -> 255 (white). An all-zero filter shows flat grey. Tiles sit on a
    grid of ceil(sqrt(n)) columns with `padding` black pixels around and between them.
    Unlike display_network we do not subtract the mean weight first: grey means exactly 0.
    """
    tiles = _as_tiles(_rows(W, "W"), image_shape, order, "W")
    padding = _check_padding(padding)
    maxabs = np.abs(tiles).max(axis=(1, 2) if scale_each else None, keepdims=True)
    scaled = np.divide(tiles, maxabs, out=np.zeros_like(tiles), where=maxabs > 0)
    return _grid(_to_grey(scaled), _square_cols(len(tiles)), padding, pad_value=0)


def _grey_range(tiles: np.ndarray, low, high, default) -> tuple[float, float]:
    """(low, high) of one grey scale: given bounds, else `default(tiles)` for the missing ones.
    An empty range is an error when a bound was given; constant data give (v, v)."""
    if (low is not None and not np.isfinite(low)) or (high is not None and not np.isfinite(high)):
        raise UserError(f"low and high must be finite numbers; got low={low!r}, high={high!r}")
    lo_default, hi_default = default(tiles)
    lo = lo_default if low is None else float(low)
    hi = hi_default if high is None else float(high)
    if hi <= lo and (low is not None or high is not None):
        raise UserError(
            f"the grey range from low={lo:g} to high={hi:g} is empty; pass both low and high with high > low"
        )
    return lo, hi


def _shared_grey(tiles: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Tiles -> uint8 with one scale for all: lo -> 0, hi -> 255, values outside clipped;
    an empty range (constant data) is mid-grey."""
    if hi > lo:
        return _to_grey(np.clip(2 * (tiles - lo) / (hi - lo) - 1, -1, 1))
    return _to_grey(np.zeros_like(tiles))


def _min_max(tiles: np.ndarray) -> tuple[float, float]:
    return float(tiles.min()), float(tiles.max())


def tile_images(X, image_shape=None, order="C", low=None, high=None, padding=1) -> np.ndarray:
    """Images X (n, d), one per row (patches, digits), as a grey grid (H, W) uint8.

    One shared scale for all tiles, unlike `tile_filters`: low -> black and high -> white
    (default: the data's min and max), so brightness compares across tiles. Layout as in
    `tile_filters`: ceil(sqrt(n)) columns, `padding` pixels of mid-grey (128) between tiles,
    a colour that stands out from both the black background and the white ink of digits.
    """
    tiles = _as_tiles(_rows(X, "X"), image_shape, order, "X")
    padding = _check_padding(padding)
    lo, hi = _grey_range(tiles, low, high, _min_max)
    return _grid(_shared_grey(tiles, lo, hi), _square_cols(len(tiles)), padding, pad_value=128)


# Geometry of `side_by_side`, in pixels. Text is black on a white page; tiles have a grey frame.
TILE_PX = 56  # tiles are zoomed by a whole factor to at least this many pixels on their longer side
TILE_GAP = 6  # between the tiles of one group
GROUP_GAP = 20  # between groups
MARGIN = 12  # around everything
FRAME = 1  # the frame drawn around each tile, inside the gaps
TEXT_LINE = 22  # height of a line of text: the title, the tile labels, the scale
MIN_WIDTH = 640  # so the title and the scale line fit when there are few groups
FONT_PX = 13
_PAGE, _FRAME_GREY, _INK = 255, 120, 0
CLIP_PERCENT = 1.0  # the default grey scale runs from this percentile of the values to 100 minus it


def _percentile_range(tiles: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(tiles, [CLIP_PERCENT, 100 - CLIP_PERCENT])
    return (float(lo), float(hi)) if hi > lo else _min_max(tiles)


class Layout(NamedTuple):
    """Where `side_by_side` puts things, in pixels."""

    zoom: int  # each value is a zoom x zoom block
    tile: tuple[int, int]  # (height, width) of a zoomed tile
    cols: int  # groups per row
    group_width: int
    origin: tuple[int, int]  # (top, left) of the grid
    shape: tuple[int, int]  # (height, width) of the picture

    def tile_corner(self, group: int, position: int) -> tuple[int, int]:
        """(top, left) of the position-th tile of a group."""
        i, j = divmod(group, self.cols)
        top = self.origin[0] + i * (self.tile[0] + GROUP_GAP)
        left = self.origin[1] + j * (self.group_width + GROUP_GAP) + position * (self.tile[1] + TILE_GAP)
        return top, left


def side_by_side_layout(n: int, k: int, tile_shape, zoom: int | None = None) -> Layout:
    """The layout of n groups of k tiles of tile_shape (h, w): whole zoom to at least TILE_PX
    (or `zoom`), as many group columns as make the grid near-square, the grid centred under a
    title line and a label line, a line for the grey scale under it."""
    h, w = tile_shape
    zoom = -(-TILE_PX // max(h, w)) if zoom is None else zoom
    th, tw = h * zoom, w * zoom
    group_w = k * tw + (k - 1) * TILE_GAP
    cols = min(n, max(1, math.ceil(math.sqrt(n * th / group_w))))
    rows = -(-n // cols)
    grid_w = cols * group_w + (cols - 1) * GROUP_GAP
    width = max(MIN_WIDTH, grid_w + 2 * MARGIN)
    top = MARGIN + 2 * TEXT_LINE  # the title, then a label over each tile of the top row
    height = top + rows * (th + GROUP_GAP) + TEXT_LINE + MARGIN  # a gap, then the scale line under the grid
    return Layout(zoom, (th, tw), cols, group_w, (top, (width - grid_w) // 2), (height, width))


def _write(page: np.ndarray, layout: Layout, title: str, labels: list[str], scale: str) -> np.ndarray:
    """The picture with the title on top, each tile column's label over the first row, the scale under all."""
    picture = Image.fromarray(page)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=FONT_PX)
    (height, width), top = layout.shape, layout.origin[0]
    draw.text((width / 2, MARGIN + TEXT_LINE / 2), title, font=font, fill=_INK, anchor="mm")
    for group in range(layout.cols):
        for position, label in enumerate(labels):
            left = layout.tile_corner(group, position)[1]
            draw.text((left + layout.tile[1] / 2, top - TEXT_LINE / 2), label, font=font, fill=_INK, anchor="mm")
    draw.text((width / 2, height - MARGIN - TEXT_LINE / 2), scale, font=font, fill=_INK, anchor="mm")
    return np.asarray(picture)


def side_by_side(
    inputs, outputs, *more, labels=None, title="", image_shape=None, order="C", low=None, high=None, zoom=None
) -> np.ndarray:
    """Inputs (n, d) with their reconstructions (n, d), and any further (n, d) arrays, as a
    labelled grey picture (H, W) uint8.

    Each group holds one example's tiles, left to right in argument order, TILE_GAP pixels
    apart and framed in grey; groups are GROUP_GAP pixels apart on a white page, row by row.
    Each tile is zoomed by a whole factor (default: to at least TILE_PX pixels; `zoom` sets
    it), so every value is a square block of one grey. Above the first row, each tile column
    carries its label (default "input", "output", "3", ...); `title` is a line above that, and
    a line under the grid states the grey scale. All tiles share that one scale, so a faded
    reconstruction looks faded: low -> black, high -> white, values beyond clipped (default:
    the 1st and 99th percentiles of all values, or their min and max if those are equal).
    See `side_by_side_layout` for where everything goes.
    """
    arrays = [_rows(inputs, "inputs"), _rows(outputs, "outputs")] + [_rows(a, "arrays") for a in more]
    x = arrays[0]
    if any(a.shape != x.shape for a in arrays[1:]):
        raise UserError(
            f"inputs {x.shape} and outputs {', '.join(str(a.shape) for a in arrays[1:])} must have "
            f"the same shape: one reconstruction per input"
        )
    n, k = len(x), len(arrays)
    labels = ["input", "output", *map(str, range(3, k + 1))] if labels is None else [str(s) for s in labels]
    if len(labels) != k:
        raise UserError(f"side_by_side got {len(labels)} labels for {k} arrays; give one label per array")
    if zoom is not None and (isinstance(zoom, bool) or not isinstance(zoom, (int, np.integer)) or zoom < 1):
        raise UserError(f"zoom must be a whole number >= 1; got {zoom!r}")
    tiles = _as_tiles(np.concatenate(arrays), image_shape, order, "inputs")
    lo, hi = _grey_range(tiles, low, high, _percentile_range)
    layout = side_by_side_layout(n, k, tiles.shape[1:], None if zoom is None else int(zoom))
    grey = _shared_grey(tiles, lo, hi).repeat(layout.zoom, axis=1).repeat(layout.zoom, axis=2)
    (th, tw), f = layout.tile, FRAME
    page = np.full(layout.shape, _PAGE, dtype=np.uint8)
    for group in range(n):
        for position in range(k):
            top, left = layout.tile_corner(group, position)
            page[top - f : top + th + f, left - f : left + tw + f] = _FRAME_GREY
            page[top : top + th, left : left + tw] = grey[position * n + group]
    scale = f"one grey scale for every tile: black = {lo:.3g} or less, white = {hi:.3g} or more"
    return _write(page, layout, title, labels, scale)


def upscale(img, min_size=512) -> np.ndarray:
    """Nearest-neighbour upscaling (H, W[, 3]) by the smallest whole factor that makes the
    longer side at least min_size pixels (factor 1 if it already is): each value becomes a
    k x k block, so tiles stay crisp and no pixel values are invented."""
    img = np.asarray(img)
    k = max(1, -(-int(min_size) // max(img.shape[:2])))
    return img.repeat(k, axis=0).repeat(k, axis=1)


# ----------------------------------------------------------------------------------------
# Charts, drawn by matplotlib on its Agg canvas (no display, no global pyplot state)

DPI = 100


def _figure(width: int, height: int) -> Figure:
    """A matplotlib figure of exactly width x height pixels, laid out so labels fit."""
    if not (
        isinstance(width, (int, np.integer))
        and isinstance(height, (int, np.integer))
        and width >= 200
        and height >= 150
    ):
        raise UserError(
            f"chart size must be whole pixels, width >= 200 and height >= 150; got width={width!r}, height={height!r}"
        )
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _pixels(figure: Figure) -> np.ndarray:
    """The figure rendered as RGB (height, width, 3) uint8."""
    canvas = figure.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _xy(values, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A series as (x, y): 1-D values are y at x = 0, 1, 2, ...; a (2, n) array is rows x, y."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        return np.arange(len(a), dtype=np.float64), a
    if a.ndim == 2 and a.shape[0] == 2:
        return a[0], a[1]
    raise UserError(
        f"series {name!r} must be a 1-D sequence of y values or a (2, n) array of x and y rows; got shape {a.shape}"
    )


def _lone_points(drawable: np.ndarray) -> np.ndarray:
    """Which drawable points have no drawable neighbour (a line through them would be invisible)."""
    padded = np.concatenate([[False], drawable, [False]])
    return drawable & ~padded[:-2] & ~padded[2:]


def line_chart(series: dict, title="", xlabel="", ylabel="", log_y=False, width=800, height=500) -> np.ndarray:
    """Curves such as cost per iteration as an RGB picture (height, width, 3) uint8.

    `series` maps a name to its y values (x = 0, 1, 2, ...) or to a (2, n) array of x and y
    rows; one colour per series (matplotlib's cycle, in dict order) with a legend. NaN and inf
    points are skipped (the line breaks there), as are values <= 0 when log_y (a series whose
    finite values are all <= 0, such as a weight decay of 0, says so in the legend); a point with
    no drawn neighbour shows as a dot, so a single point is visible.
    """
    if not series:
        raise UserError("line_chart needs at least one series, e.g. {'cost': costs}")
    figure = _figure(width, height)
    ax = figure.add_subplot()
    for i, (name, values) in enumerate(series.items()):
        x, y = _xy(values, str(name))
        drawable = np.isfinite(x) & np.isfinite(y) & ((y > 0) if log_y else True)
        colour = f"C{i}"
        nothing_positive = log_y and np.isfinite(y).any() and not drawable.any()
        label = f"{name} (<= 0, not drawn)" if nothing_positive else str(name)
        ax.plot(x, np.where(drawable, y, np.nan), color=colour, linewidth=2, label=label)
        lone = _lone_points(drawable)
        ax.plot(x[lone], y[lone], "o", color=colour, markersize=5)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", color="0.9")
    figure.legend(loc="outside lower center", ncols=min(len(series), 3))  # off the curves, whatever the data
    return _pixels(figure)


def histogram_counts(values, bins=50, log_x=False):
    """Counts of `values` in `bins` equal bins over their finite range, with -inf set apart.

    Returns (counts (bins,), edges (bins + 1,), n_neg_inf). -inf values (such as log10 of
    the firing frequency of a dead latent) fall in no bin: n_neg_inf counts them. With log_x
    the values must be >= 0, binning is over log10(values), edges are log10 values, and
    zeros are the ones counted in n_neg_inf.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise UserError(f"bins must be a whole number >= 1; got {bins!r}")
    if np.isnan(v).any() or (v == np.inf).any():
        raise UserError(
            "histogram values contain NaN or +inf; only finite values and -inf "
            "(e.g. log10 of a zero frequency) can be counted"
        )
    if log_x:
        if (v < 0).any():
            raise UserError(
                "histogram values must be >= 0 for log_x=True (log10 of a "
                "negative number is undefined); use log_x=False"
            )
        with np.errstate(divide="ignore"):
            v = np.log10(v)
    finite = v[np.isfinite(v)]
    counts, edges = np.histogram(finite, bins=int(bins))
    return counts, edges, int(v.size - finite.size)


def histogram_chart(values, bins=50, title="", xlabel="", log_x=False, width=800, height=500) -> np.ndarray:
    """A histogram as bars, RGB (height, width, 3) uint8; see `histogram_counts`.

    Values at -inf (zeros when log_x) cannot sit on the axis, so a line under the title says
    how many there are, e.g. "12 of 512 values are -inf (not drawn)": for a feature-density
    histogram of log10 firing frequency those are the dead latents. Bars are filled with
    matplotlib's first colour (C0) and nothing else is.
    """
    figure = _figure(width, height)
    counts, edges, n_neg_inf = histogram_counts(values, bins, log_x)
    ax = figure.add_subplot()
    if counts.sum():
        ax.stairs(counts, edges, fill=True, color="C0")
    total = int(counts.sum()) + n_neg_inf
    note = f"{n_neg_inf} of {total} values are {'0' if log_x else '-inf'} (not drawn)"
    ax.set_title(f"{title}\n{note}" if title else note)
    ax.set(xlabel=xlabel, ylabel="count")
    ax.set_ylim(0, max(1, int(counts.max(initial=0))) * 1.08)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts are whole
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)
    return _pixels(figure)


CONFUSION_CMAP = "Blues"
CONFUSION_GAMMA = 0.5  # colour follows the square root of the share, so a 2% confusion is still tinted


def confusion_matrix_image(cm, class_names=None, title="Confusion matrix") -> np.ndarray:
    """A confusion matrix (k, k) of counts, rows = true class, columns = predicted, as an
    RGB picture uint8 whose size grows with k.

    Each cell shows its count and is coloured by its share of its row, the fraction of that
    true class predicted as the column's class (so small classes show as clearly as big
    ones), on matplotlib's Blues map through the square root of the share (white at 0, dark
    blue at 1), with a colour bar. The title ends with the overall accuracy.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise UserError(f"confusion matrix must be a square (k, k) array; got shape {cm.shape}")
    if not (np.isfinite(cm).all() and (cm >= 0).all() and (cm == np.round(cm)).all()):
        raise UserError("confusion matrix must hold whole counts >= 0")
    cm = cm.astype(np.int64)
    k, total, correct = len(cm), int(cm.sum()), int(np.trace(cm))
    if total == 0:
        raise UserError("confusion matrix is all zeros: there are no predictions to show")
    names = [str(c) for c in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise UserError(f"class_names has {len(names)} names for a {k}x{k} confusion matrix; give one name per class")
    row_sums = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0)
    side = max(300, 60 + 46 * k)
    figure = _figure(side + 160, side + 90)
    ax = figure.add_subplot()
    image = ax.imshow(
        share, cmap=CONFUSION_CMAP, norm=PowerNorm(CONFUSION_GAMMA, vmin=0, vmax=1), interpolation="nearest"
    )
    for i in range(k):
        for j in range(k):
            ink = "white" if share[i, j] > 0.36 else "black"  # sqrt(0.36) = 0.6 of the way to dark blue
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=ink, fontsize=10)
    rotation = 90 if max(len(s) for s in names) > 3 else 0
    ax.set_xticks(range(k), names, rotation=rotation)
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{title}: accuracy {100 * correct / total:.2f}% ({correct} of {total})")
    figure.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    return _pixels(figure)


# ----------------------------------------------------------------------------------------
# Saving


def save_png(img, path) -> Path:
    """Write a uint8 picture (H, W) grey or (H, W, 3) RGB to `path` as PNG, atomically: a
    temporary file in the same folder, then os.replace, so readers never see half a file."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise UserError(f"a picture must be a uint8 array (H, W) or (H, W, 3); got {img.dtype} of shape {img.shape}")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it or choose another path")
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return atomic_write(path, buffer.getvalue())


def save_filters(W, path, min_size=512, **kw) -> Path:
    """`tile_filters(W, **kw)`, upscaled to at least min_size pixels, saved as PNG."""
    return save_png(upscale(tile_filters(W, **kw), min_size), path)


def save_images(X, path, min_size=512, **kw) -> Path:
    """`tile_images(X, **kw)`, upscaled to at least min_size pixels, saved as PNG."""
    return save_png(upscale(tile_images(X, **kw), min_size), path)


def save_side_by_side(inputs, outputs, path, *more, **kw) -> Path:
    """`side_by_side(inputs, outputs, *more, **kw)` saved as PNG (it is drawn at its full size)."""
    return save_png(side_by_side(inputs, outputs, *more, **kw), path)


def scatter_chart(
    points: list[tuple[str, float, float]], title="", xlabel="", ylabel="", width=800, height=500
) -> np.ndarray:
    """Labelled points (label, x, y) as an RGB picture (height, width, 3) uint8, each point named
    beside it (a sweep's members on the FVU-L0 plane). Points with a NaN or inf coordinate are left out."""
    drawn = [
        (label, x, y)
        for label, x, y in points
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if not drawn:
        raise UserError("scatter_chart needs at least one point with finite coordinates")
    figure = _figure(width, height)
    ax = figure.add_subplot()
    ax.plot([x for _, x, _ in drawn], [y for _, _, y in drawn], "o", color="C0", markersize=7)
    seen: dict[tuple[float, float], int] = {}  # labels of points drawn on one spot go one under the other
    for label, x, y in drawn:
        spot = (float(f"{x:.3g}"), float(f"{y:.3g}"))
        seen[spot] = seen.get(spot, -1) + 1
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * seen[spot]), fontsize=8)
    ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", color="0.9")
    return _pixels(figure)
