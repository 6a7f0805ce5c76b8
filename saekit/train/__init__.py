"""Training: full-batch L-BFGS (`lbfgs`) and minibatch Adam/SGD (`minibatch`), for any kind.

`fit` trains a model on rows in memory as an `OptimConfig` says. Neither trainer knows the
command line or run folders: progress shows as a bar, checkpoints are callbacks, and Ctrl-C or
SIGTERM stops training cleanly, keeping the last accepted parameters.
"""

from typing import NamedTuple

import torch

from ..data import Corruption
from ..data.vectors import open_vectors
from .config import AUTOCAST, OptimConfig
from .lbfgs import Evaluated, autoencoder_objective, train_lbfgs
from .minibatch import Minibatch


class FitResult(NamedTuple):
    history: list[dict]  # one row per L-BFGS iteration, or per log_every minibatch steps
    interrupted: bool


def fit(
    model,
    x: torch.Tensor,
    optim: OptimConfig,
    *,
    target: torch.Tensor | None = None,
    corruption: Corruption | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Train the model on x (m, n_inputs) in place, as optim says.

    A denoising autoencoder (corruption) reconstructs the clean x from a corrupted copy: L-BFGS
    corrupts the data once (the objective must stay fixed for its line searches), minibatch
    training corrupts every batch afresh. With optim.scale_inputs the model trains on scaled
    inputs, and the scale is folded into its weights at the end, so it takes raw x.
    """
    if optim.full_batch:
        if corruption is not None:
            x, target = corruption(x, torch.Generator().manual_seed(seed)), x if target is None else target
        history, interrupted = train_lbfgs(
            model.parameters(), autoencoder_objective(model, x, target), optim.max_iter, optim.lbfgs_memory, progress
        )
        return FitResult(history, interrupted)
    trainer = Minibatch(model, open_vectors(x), optim, seed=seed, corruption=corruption)
    history, interrupted = trainer.run(progress)
    model.fold_input_scale_(trainer.scale)
    return FitResult(history, interrupted)


__all__ = [
    "AUTOCAST",
    "Evaluated",
    "FitResult",
    "Minibatch",
    "OptimConfig",
    "autoencoder_objective",
    "fit",
    "train_lbfgs",
]
