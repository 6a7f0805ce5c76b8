"""Metrics of a trained autoencoder on a data set, computed exactly over all its examples."""

import torch

from .config import TrainConfig
from .training import loss_terms


@torch.no_grad()
def evaluate(model, x: torch.Tensor, cfg: TrainConfig, target: torch.Tensor | None = None) -> dict:
    """Cost and its terms (rho_hat exact over x), rho_hat statistics and reconstruction errors.

    mse is the mean squared error per input value; fvu, the fraction of variance unexplained,
    is sum ||x_hat - y||^2 / sum ||y - mean(y)||^2 (0 is perfect, 1 is no better than the mean).
    """
    y = x if target is None else target
    _, ev = loss_terms(model, x, cfg, target)
    error = model(x).x_hat - y
    squared = float(error.pow(2).sum())
    rho_hat = ev.rho_hat
    return {
        "n_examples": x.shape[0],
        "cost": ev.cost,
        "reconstruction": ev.reconstruction,
        "weight_decay": ev.weight_decay,
        "sparsity": ev.sparsity,
        "rho_hat_mean": float(rho_hat.mean()),
        "rho_hat_min": float(rho_hat.min()),
        "rho_hat_max": float(rho_hat.max()),
        "rho_hat_std": float(rho_hat.std()) if rho_hat.numel() > 1 else 0.0,
        "mse": squared / error.numel(),
        "fvu": squared / float((y - y.mean(0)).pow(2).sum()),
    }
