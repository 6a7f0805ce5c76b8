"""Training: full-batch L-BFGS (`lbfgs.FullBatch`) and minibatch Adam/SGD (`minibatch.Minibatch`), for any kind.

Both trainers have one interface: `step`, `total_steps`, `scale`, `state_dict()`, and
`run(progress, checkpoint, on_row)`. `trainer_for` picks one as an `OptimConfig` says; `fit`
trains a model on rows in memory. Neither knows the command line or run folders: progress shows
as a bar, checkpoints and history rows are callbacks, Ctrl-C or SIGTERM stops at the end of a
step, and a diverging loss raises `saekit.errors.Diverged`.
"""

from typing import NamedTuple

import torch

from ..data import Corruption, Dataset, open_pairs
from ..data.vectors import VectorStream
from ..errors import UserError
from .config import AUTOCAST, OptimConfig
from .lbfgs import Evaluated, FullBatch, autoencoder_objective, train_lbfgs
from .memory import Estimate, check_fits, estimate
from .minibatch import Minibatch


class FitResult(NamedTuple):
    history: list[dict]  # one row per L-BFGS iteration, or per log_every minibatch steps
    interrupted: bool


def trainer_for(
    model,
    data: Dataset,
    optim: OptimConfig,
    *,
    seed: int = 0,
    corruption: Corruption | None = None,
    state: dict | None = None,
    history: list | None = None,
    stream: VectorStream | None = None,
) -> FullBatch | Minibatch:
    """The trainer optim asks for: L-BFGS on the rows in memory, or minibatches from the stream (a
    stream another trainer reads too, for a sweep)."""
    if optim.full_batch:
        return FullBatch(model, data.in_memory(), optim, seed=seed, corruption=corruption, state=state, history=history)
    return Minibatch(
        model, data.source, optim, seed=seed, corruption=corruption, state=state, history=history, stream=stream
    )


def fit(
    model,
    x: torch.Tensor,
    optim: OptimConfig,
    *,
    corruption: Corruption | None = None,
    target: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Train the model on x (m, n_inputs) in place, as optim says.

    A denoising autoencoder (corruption) reconstructs the clean x from a corrupted copy; a
    transcoder (a model built with n_outputs) reconstructs target (m, n_outputs) from x. With
    optim.scale_inputs the model trains on scaled inputs, and the scale is folded into its weights
    at the end, so it takes raw x.
    """
    if (target is not None) != model.transcoder:
        raise UserError(
            "a transcoder (a model built with n_outputs) trains on x and its target; an autoencoder on x alone"
        )
    if target is not None and optim.full_batch:
        raise UserError("transcoders train with minibatches: use optimizer 'adam' (or 'sgd'), not L-BFGS")
    source = open_pairs(x, target_data=target)
    data = Dataset(x, None, None, f"{source.n} rows", source)
    trainer = trainer_for(model, data, optim, seed=seed, corruption=corruption)
    history, interrupted = trainer.run(progress)
    model.fold_input_scale_(trainer.scale)
    return FitResult(history, interrupted)


__all__ = [
    "AUTOCAST",
    "Estimate",
    "Evaluated",
    "FitResult",
    "FullBatch",
    "Minibatch",
    "OptimConfig",
    "autoencoder_objective",
    "check_fits",
    "estimate",
    "fit",
    "train_lbfgs",
    "trainer_for",
]
