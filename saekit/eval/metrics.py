"""Metrics of a trained autoencoder on a data set, computed exactly over all its examples.

`evaluate` reports the loss the model trains on (its terms from the forward pass, in evaluation
mode) over rows in memory; `evaluate_stream` the reconstruction and sparsity of a dictionary
over a stream of any size; `filter_localization` how local the filters learned on images are.
"""

import torch
import torch.nn.functional as F

from ..data.vectors import check_finite


def fraction(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN where the data have no variance to explain."""
    return numerator / denominator if denominator > 0 else float("nan")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, target: torch.Tensor | None = None) -> dict:
    """The cost and its terms over all of x (m, n_inputs) (the sigmoid kind's rho_hat exact over
    x), statistics of the mean codes rho_hat, and reconstruction errors against target (default x).

    mse is the mean squared error per input value; fvu, the fraction of variance unexplained,
    is sum ||x_hat - y||^2 / sum ||y - mean(y)||^2 (0 is perfect, 1 is no better than the mean).
    """
    y = x if target is None else target
    model.eval()
    out = model(x, target)
    reconstruction, sparsity, _, decay = out.terms.numbers()
    error = out.x_hat - y
    squared = float(error.pow(2).sum())
    rho_hat = model.dense_codes(out.codes).mean(0)
    return {
        "n_examples": x.shape[0],
        "cost": out.terms.total,
        "reconstruction": reconstruction,
        "weight_decay": decay,
        "sparsity": sparsity,
        "rho_hat_mean": float(rho_hat.mean()),
        "rho_hat_min": float(rho_hat.min()),
        "rho_hat_max": float(rho_hat.max()),
        "rho_hat_std": float(rho_hat.std()) if rho_hat.numel() > 1 else 0.0,
        "mse": squared / error.numel(),
        "fvu": fraction(squared, float((y - y.mean(0)).pow(2).sum())),
    }


@torch.no_grad()
def evaluate_stream(model, source, batch_size: int = 4096, max_rows: int | None = None) -> tuple[dict, torch.Tensor]:
    """Metrics of a dictionary over the first max_rows rows of a VectorSource, read in order.

    Returns (metrics, density) where density (n_hidden,) is each unit's firing frequency.
    mse is per output value; fvu = sum ||x_hat - y||^2 / sum ||y - mean(y)||^2 with y the rows
    themselves (a transcoder's source: their targets, see PairedSource); l0 is the mean
    number of active units per example; dead_fraction counts units that never fired here.
    """
    model.eval()
    n = source.n if max_rows is None else min(source.n, max_rows)
    dtype, device = model.W1.dtype, model.W1.device
    squared_error = total_squared = active = 0.0
    total = torch.zeros(model.n_outputs, dtype=torch.float64)
    fired = torch.zeros(model.n_hidden, dtype=torch.float64)
    for start in range(0, n, batch_size):
        block = check_finite(source.read(start, min(start + batch_size, n)).to(dtype=dtype), source, start)
        x, y = source.split(block.to(device))
        out = model(x, y)
        h = model.dense_codes(out.codes)
        squared_error += float((out.x_hat - y).double().pow(2).sum())
        total += y.double().sum(0).cpu()
        total_squared += float(y.double().pow(2).sum())
        fired += model.activity(out.codes).double().sum(0).cpu()
        active += float((h > 0).sum())
    variance = total_squared - float(total.pow(2).sum()) / n
    density = fired / n
    norms = model.W2.norm(dim=0).double()
    metrics = {
        "n_examples": n,
        "mse": squared_error / (n * model.n_outputs),
        "fvu": fraction(squared_error, variance),
        "l0": active / n,
        "dead_fraction": float((density == 0).double().mean()),
        "density_median": float(density.median()),
        "decoder_norm_mean": float(norms.mean()),
        "decoder_norm_min": float(norms.min()),
        "decoder_norm_max": float(norms.max()),
    }
    return metrics, density


@torch.no_grad()
def filter_localization(filters: torch.Tensor, image_shape: tuple[int, int]) -> float:
    """How local filters on images are: the share of each filter's energy (sum of squares) inside
    its best window of half the image's height and width, averaged over the filters.

    filters is (n_filters, h * w), each row an h x w image in row-major order (the encoder W1 for
    image_shape (h, w)); the window is (h // 2, w // 2), 4x4 on 8x8 patches. The share is 1 for a
    filter whose energy lies within one such window and about 1/4 for energy spread evenly over
    the image. Filters that are all zero have no share and are left out; NaN if all are.
    """
    h, w = image_shape
    energy = filters.detach().double().reshape(-1, 1, h, w).pow(2)
    window = (max(1, h // 2), max(1, w // 2))
    best = F.avg_pool2d(energy, window, stride=1).amax(dim=(1, 2, 3)) * (window[0] * window[1])
    total = energy.sum(dim=(1, 2, 3))
    shares = best[total > 0] / total[total > 0]
    return float(shares.mean()) if shares.numel() else float("nan")
