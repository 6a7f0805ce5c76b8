"""Pictures: arrays in, PNG files out, drawn with Pillow and NumPy only.

Two kinds of picture:
- grey grids of tiles: learned filters (`tile_filters`, after UFLDL's display_network.m),
  inputs (`tile_images`) and reconstructions beside their inputs (`side_by_side`);
- charts: training curves (`line_chart`), histograms such as feature density
  (`histogram_chart`) and confusion matrices (`confusion_matrix_image`).

Every builder is pure and returns a uint8 array (H, W) or (H, W, 3), so tests can look at
pixels; `save_png` writes one atomically. The `save_*` wrappers for the grey grids also
`upscale` them, since an 8x8 patch is too small to see at one screen pixel per value.
"""

import io
import math
from pathlib import Path

import numpy as np
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


def _shared_grey(tiles: np.ndarray, low, high) -> np.ndarray:
    """Tiles -> uint8 with one scale for all: low -> 0, high -> 255 (default: data min, max).
    Values outside [low, high] are clipped; constant data with no bounds given is mid-grey."""
    if (low is not None and not np.isfinite(low)) or (high is not None and not np.isfinite(high)):
        raise UserError(f"low and high must be finite numbers; got low={low!r}, high={high!r}")
    lo = tiles.min() if low is None else float(low)
    hi = tiles.max() if high is None else float(high)
    if hi > lo:
        return _to_grey(np.clip(2 * (tiles - lo) / (hi - lo) - 1, -1, 1))
    if low is None and high is None:  # constant data: nothing to spread
        return _to_grey(np.zeros_like(tiles))
    raise UserError(f"the grey range from low={lo:g} to high={hi:g} is empty; pass both low and high with high > low")


def tile_images(X, image_shape=None, order="C", low=None, high=None, padding=1) -> np.ndarray:
    """Images X (n, d), one per row (patches, digits), as a grey grid (H, W) uint8.

    One shared scale for all tiles, unlike `tile_filters`: low -> black and high -> white
    (default: the data's min and max), so brightness compares across tiles. Layout as in
    `tile_filters`: ceil(sqrt(n)) columns, `padding` pixels of mid-grey (128) between tiles,
    a colour that stands out from both the black background and the white ink of digits.
    """
    tiles = _as_tiles(_rows(X, "X"), image_shape, order, "X")
    padding = _check_padding(padding)
    return _grid(_shared_grey(tiles, low, high), _square_cols(len(tiles)), padding, pad_value=128)


_PAIR_GAP = 1  # pixels between an input and its reconstruction
_GRID_GAP = 3  # pixels between pairs: wider, so pairs read as pairs


def side_by_side(inputs, outputs, *more, image_shape=None, order="C", low=None, high=None) -> np.ndarray:
    """Inputs (n, d) with their reconstructions (n, d), and any further (n, d) arrays, as a grey grid (H, W) uint8.

    Each cell is a group: input on the left, reconstruction next, then the others in order,
    1 pixel apart; groups are 3 pixels apart, on columns enough to make the picture
    near-square. All use one shared scale (low, high; default: min and max over all), so a
    faded reconstruction looks faded. Gaps are mid-grey (128), as in `tile_images`.
    """
    arrays = [_rows(inputs, "inputs"), _rows(outputs, "outputs")] + [_rows(a, "arrays") for a in more]
    x = arrays[0]
    if any(a.shape != x.shape for a in arrays[1:]):
        raise UserError(
            f"inputs {x.shape} and outputs {', '.join(str(a.shape) for a in arrays[1:])} must have "
            f"the same shape: one reconstruction per input"
        )
    tiles = _shared_grey(_as_tiles(np.concatenate(arrays), image_shape, order, "inputs"), low, high)
    n, k, h, w = len(x), len(arrays), tiles.shape[1], tiles.shape[2]
    groups = np.full((n, h, k * w + (k - 1) * _PAIR_GAP), 128, dtype=np.uint8)
    for i in range(k):
        groups[:, :, i * (w + _PAIR_GAP) : i * (w + _PAIR_GAP) + w] = tiles[i * n : (i + 1) * n]
    return _grid(groups, math.isqrt((n - 1) // k) + 1, _GRID_GAP, pad_value=128)


def upscale(img, min_size=512) -> np.ndarray:
    """Nearest-neighbour upscaling (H, W[, 3]) by the smallest whole factor that makes the
    longer side at least min_size pixels (factor 1 if it already is): each value becomes a
    k x k block, so tiles stay crisp and no pixel values are invented."""
    img = np.asarray(img)
    k = max(1, -(-int(min_size) // max(img.shape[:2])))
    return img.repeat(k, axis=0).repeat(k, axis=1)


# ----------------------------------------------------------------------------------------
# Charts: a white canvas, a plot area with ticks, data drawn in pixel coordinates

_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
_INK = (20, 20, 20)
_GRID = (225, 225, 225)
_WHITE = (255, 255, 255)


def _font(size: int):
    """Pillow's bundled font (Aileron via FreeType, Pillow >= 10.1) at `size` pixels."""
    return ImageFont.load_default(size=size)


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _line_height(font) -> int:
    """Height of a line of text drawn from its ascender ("a" anchors) to its descender."""
    ascent, descent = font.getmetrics()
    return ascent + descent


def _vertical_text(img: Image.Image, center: tuple[float, float], text: str, font, fill):
    """Draw `text` rotated 90 degrees (reading bottom to top) centred on `center`."""
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right, bottom), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
    mask = mask.crop((left, top, right, bottom)).rotate(90, expand=True)
    corner = (round(center[0] - mask.width / 2), round(center[1] - mask.height / 2))
    img.paste(Image.new("RGB", mask.size, fill), corner, mask)


def _nice_step(span: float, n_ticks: int) -> float:
    """The 1, 2 or 5 times a power of ten closest above span / n_ticks."""
    raw = span / n_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def _compact(text: str) -> str:
    """1e+06 -> 1e6, 5e-08 -> 5e-8, 2e+00 -> 2: exponents without sign and zero padding."""
    text = text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return text[:-2] if text.endswith("e0") else text


def _linear_labels(values: list[float], step: float) -> list[str]:
    """Labels for ticks `step` apart: decimals as many as the step needs, or, for huge or
    tiny numbers, scientific notation with just enough digits to tell neighbours apart."""
    top = max(abs(v) for v in values)
    if top < 1e6 and step >= 1e-3:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return [f"{v:.{decimals}f}" for v in values]
    digits = max(1, math.floor(math.log10(top)) - math.floor(math.log10(step) + 1e-9) + 1)
    return [_compact(f"{v:.{digits}g}") for v in values]


def _log_labels(values: list[float]) -> list[str]:
    """Labels for 1, 2, 5 times powers of ten: 0.01 ... 5000, or all as 1e-6 ... 1e0 once any
    is outside that range, so one axis never mixes the two styles."""
    if all(1e-3 <= v < 1e4 for v in values):
        return [f"{v:g}" for v in values]
    return [_compact(f"{v:.0e}") for v in values]


def _ticks(lo: float, hi: float, log: bool = False, integer: bool = False) -> list[tuple[float, str]]:
    """About six ticks (position, label) within [lo, hi]. `integer` keeps steps >= 1 (counts).

    On a log axis positions are log10 values: whole decades when three fit, else 1, 2 and 5
    times each decade, else (less than about half a decade) round values of 10**position
    placed at their logs.
    """
    if log:
        decades = max(1, math.ceil((hi - lo) / 6))
        for mults in ((1,), (1, 2, 5)):
            logs = [
                k + math.log10(m)
                for k in range(math.floor(lo), math.ceil(hi) + 1)
                if k % decades == 0
                for m in mults
                if lo <= k + math.log10(m) <= hi
            ]
            if len(logs) >= 3:
                return list(zip(logs, _log_labels([10.0**t for t in logs])))
        return [(math.log10(v), label) for v, label in _ticks(10.0**lo, 10.0**hi) if v > 0]
    step = _nice_step(hi - lo, 6)
    if integer:
        step = max(step, 1.0)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    values = [k * step for k in range(first, last + 1)]
    return list(zip(values, _linear_labels(values, step)))


def _limits(values: np.ndarray, margin: float, log=False) -> tuple[float, float]:
    """[min, max] of finite `values` widened by `margin` of the span; a single value gets
    half a decade (log) or 10% of itself (1 if zero) on each side; no values give [0, 1]."""
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    pad = margin * (hi - lo) if hi > lo else 0.5 if log else 0.1 * abs(lo) or 1.0
    return lo - pad, hi + pad


def _fonts(width: int, height: int):
    """(text font, title font) sized to the canvas so labels stay readable when it grows."""
    size = max(12, min(width, height) // 32)
    return _font(size), _font(round(size * 1.3))


def _check_canvas(width, height):
    if not (
        isinstance(width, (int, np.integer))
        and isinstance(height, (int, np.integer))
        and width >= 200
        and height >= 150
    ):
        raise UserError(
            f"chart size must be whole pixels, width >= 200 and height >= 150; got width={width!r}, height={height!r}"
        )


def _title(draw: ImageDraw.ImageDraw, width: int, top: int, text: str, font) -> int:
    """Draw a centred title line at `top` (if any); return the y below it."""
    if not text:
        return top
    draw.text((width / 2, top), text, font=font, fill=_INK, anchor="ma")
    return top + _line_height(font) + font.size // 2


def _axes(
    img: Image.Image,
    box,
    font,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    xlabel="",
    ylabel="",
    x_log=False,
    y_log=False,
    y_integer=False,
):
    """Draw a plot frame with grid lines, ticks and labels filling `box` (left, top, right,
    bottom), and return to_px(x, y) -> pixel coordinates of data points (log axes take
    log10 values)."""
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = box
    line_h = _line_height(font)
    gap = font.size // 2
    x_ticks = _ticks(*xlim, log=x_log)
    y_ticks = _ticks(*ylim, log=y_log, integer=y_integer)
    label_w = max(_text_size(font, s)[0] for _, s in y_ticks) if y_ticks else 0
    # Frame inside the box: room on the left for the y label and tick labels, at the
    # bottom for tick labels and the x label, on the right for half the last x label.
    x0 = left + gap + (line_h + gap if ylabel else 0) + label_w + gap
    x1 = right - max(gap, max((_text_size(font, s)[0] for _, s in x_ticks), default=0) // 2 + 2)
    y0 = top + line_h // 2
    y1 = bottom - gap - line_h - gap - (line_h + gap if xlabel else 0)

    def to_px(x, y):
        px = x0 + (np.asarray(x, float) - xlim[0]) / (xlim[1] - xlim[0]) * (x1 - x0)
        py = y1 - (np.asarray(y, float) - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0)
        return px, py

    for t, label in x_ticks:
        px = float(to_px(t, ylim[0])[0])
        draw.line([(px, y0), (px, y1)], fill=_GRID)
        draw.line([(px, y1), (px, y1 + gap // 2)], fill=_INK)
        draw.text((px, y1 + gap), label, font=font, fill=_INK, anchor="ma")
    for t, label in y_ticks:
        py = float(to_px(xlim[0], t)[1])
        draw.line([(x0, py), (x1, py)], fill=_GRID)
        draw.line([(x0 - gap // 2, py), (x0, py)], fill=_INK)
        draw.text((x0 - gap, py), label, font=font, fill=_INK, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline=_INK)
    if xlabel:
        draw.text(((x0 + x1) / 2, bottom - gap), xlabel, font=font, fill=_INK, anchor="md")
    if ylabel:
        _vertical_text(img, (left + gap + line_h / 2, (y0 + y1) / 2), ylabel, font, _INK)
    return to_px


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


def _legend(draw: ImageDraw.ImageDraw, names: list[str], width: int, top: int, font) -> int:
    """Draw a colour key for `names`, centred, wrapping onto more rows; return y below it."""
    line_h = _line_height(font)
    swatch, gap = 2 * font.size, font.size
    items = [(name, swatch + gap // 2 + _text_size(font, name)[0]) for name in names]
    rows: list[list] = []
    row: list = []
    for item_index, (name, w) in enumerate(items):
        if row and sum(r[2] for r in row) + gap * len(row) + w > width - 2 * gap:
            rows.append(row)
            row = []
        row.append((item_index, name, w))
    rows.append(row)
    for r in rows:
        x = (width - (sum(w for _, _, w in r) + gap * (len(r) - 1))) / 2
        cy = top + line_h / 2
        for item_index, name, w in r:
            colour = _PALETTE[item_index % len(_PALETTE)]
            draw.line([(x, cy), (x + swatch, cy)], fill=colour, width=max(3, font.size // 5))
            draw.text((x + swatch + gap // 2, cy), name, font=font, fill=_INK, anchor="lm")
            x += w + gap
        top += line_h + gap // 2
    return top + gap // 2


def line_chart(series: dict, title="", xlabel="", ylabel="", log_y=False, width=800, height=500) -> np.ndarray:
    """Curves such as cost per iteration as an RGB picture (height, width, 3) uint8.

    `series` maps a name to its y values (x = 0, 1, 2, ...) or to a (2, n) array of x and y
    rows. One colour per series (in dict order) with a legend under the title. NaN and inf
    points are skipped (the line breaks there), as are values <= 0 when log_y; a point with
    no drawn neighbour shows as a dot, so a single point is visible.
    """
    if not series:
        raise UserError("line_chart needs at least one series, e.g. {'cost': costs}")
    _check_canvas(width, height)
    font, title_font = _fonts(width, height)
    curves = []
    for name, values in series.items():
        x, y = _xy(values, str(name))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.log10(y) if log_y else y
        keep = np.isfinite(x) & np.isfinite(t)
        curves.append((x, t, keep))
    xs = np.concatenate([x[keep] for x, _, keep in curves])
    ts = np.concatenate([t[keep] for _, t, keep in curves])
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    top = _title(draw, width, font.size // 2, title, title_font)
    top = _legend(draw, [str(name) for name in series], width, top, font)
    to_px = _axes(
        img, (0, top, width, height), font, _limits(xs, 0.02), _limits(ts, 0.05, log_y), xlabel, ylabel, y_log=log_y
    )
    radius = max(2, font.size // 5)
    for i, (x, t, keep) in enumerate(curves):
        colour = _PALETTE[i % len(_PALETTE)]
        px, py = to_px(x, t)
        # Runs of consecutive drawable points: a line through each, a dot for a lone point.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start == 1:
                draw.ellipse(
                    [px[start] - radius, py[start] - radius, px[start] + radius, py[start] + radius], fill=colour
                )
            else:
                draw.line(
                    list(zip(px[start:stop], py[start:stop])), fill=colour, width=max(2, font.size // 7), joint="curve"
                )
    return np.asarray(img)


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
    histogram of log10 firing frequency those are the dead latents.
    """
    _check_canvas(width, height)
    counts, edges, n_neg_inf = histogram_counts(values, bins, log_x)
    font, title_font = _fonts(width, height)
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    top = _title(draw, width, font.size // 2, title, title_font)
    total = int(counts.sum()) + n_neg_inf
    note = f"{n_neg_inf} of {total} values are {'0' if log_x else '-inf'} (not drawn)"
    draw.text((width / 2, top), note, font=font, fill=_INK, anchor="ma")
    top += _line_height(font) + font.size
    ylim = (0.0, max(1, int(counts.max(initial=0))) * 1.08)
    to_px = _axes(
        img,
        (0, top, width, height),
        font,
        _limits(edges, 0.02, log_x),
        ylim,
        xlabel,
        "count",
        x_log=log_x,
        y_integer=True,
    )
    px, _ = to_px(edges, 0)
    _, py = to_px(0, counts)
    _, base = to_px(0, 0)
    for i in np.flatnonzero(counts):
        draw.rectangle([px[i], py[i], px[i + 1], base], fill=_PALETTE[0])
    return np.asarray(img)


_CM_LOW = np.array(_WHITE, dtype=np.float64)
_CM_HIGH = np.array((8, 48, 107), dtype=np.float64)  # dark blue


def confusion_matrix_image(cm, class_names=None, title="Confusion matrix") -> np.ndarray:
    """A confusion matrix (k, k) of counts, rows = true class, columns = predicted, as an
    RGB picture uint8 whose size follows k and the label lengths.

    Each cell shows its count and is shaded by its share of its row, the fraction of that
    true class predicted as the column's class (so small classes show as clearly as big
    ones): white at 0 to dark blue at 1, through the square root of the share so that a
    2% confusion is still visibly tinted. The title ends with the overall accuracy.
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
    shade = np.sqrt(np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0))
    colours = np.rint(_CM_LOW + shade[..., None] * (_CM_HIGH - _CM_LOW)).astype(int)

    font, title_font = _font(14), _font(18)
    line_h, gap = _line_height(font), 8
    cell = max(36, max(_text_size(font, str(c))[0] for c in cm.ravel()) + 12)
    name_w = max(_text_size(font, s)[0] for s in names)
    vertical_names = name_w > cell - 4  # too wide to sit above their columns: stand them up
    heading = f"{title}: accuracy {100 * correct / total:.2f}% ({correct} of {total})"
    # Left to right: "true class" (vertical), row names, grid, centred on the canvas.
    # Top to bottom: title, "predicted class", column names, grid.
    block_w = line_h + gap + name_w + gap + k * cell
    width = max(block_w, _text_size(title_font, heading)[0]) + 4 * gap
    x_true = (width - block_w) // 2
    grid_x = x_true + line_h + gap + name_w + gap
    y_predicted = 2 * gap + _line_height(title_font) + 2 * gap
    grid_y = y_predicted + line_h + gap + (name_w if vertical_names else line_h) + gap
    height = grid_y + k * cell + 3 * gap
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((width / 2, 2 * gap), heading, font=title_font, fill=_INK, anchor="ma")
    draw.text((grid_x + k * cell / 2, y_predicted), "predicted class", font=font, fill=_INK, anchor="ma")
    _vertical_text(img, (x_true + line_h / 2, grid_y + k * cell / 2), "true class", font, _INK)
    for i in range(k):
        middle = (i + 0.5) * cell
        draw.text((grid_x - gap, grid_y + middle), names[i], font=font, fill=_INK, anchor="rm")
        if vertical_names:
            w = _text_size(font, names[i])[0]
            _vertical_text(img, (grid_x + middle, grid_y - gap - w / 2), names[i], font, _INK)
        else:
            draw.text((grid_x + middle, grid_y - gap), names[i], font=font, fill=_INK, anchor="md")
        for j in range(k):
            x, y = grid_x + j * cell, grid_y + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=tuple(colours[i, j]))
            ink = _WHITE if shade[i, j] > 0.6 else _INK
            draw.text((x + cell / 2, y + cell / 2), str(cm[i, j]), font=font, fill=ink, anchor="mm")
    draw.rectangle([grid_x - 1, grid_y - 1, grid_x + k * cell, grid_y + k * cell], outline=_INK)
    return np.asarray(img)


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


def save_side_by_side(inputs, outputs, path, *more, min_size=512, **kw) -> Path:
    """`side_by_side(inputs, outputs, *more, **kw)`, upscaled to at least min_size pixels, saved."""
    return save_png(upscale(side_by_side(inputs, outputs, *more, **kw), min_size), path)
