"""Full-batch L-BFGS, as UFLDL's minFunc: any objective that returns its value and gradient.

An objective is a function of no arguments that evaluates J at the parameters' current values
and returns an `Evaluated`: the cost, the gradient of each parameter, and the numbers the
history records at that point (the cost's terms, rho_hat, ...). The autoencoder's objective is
`autoencoder_objective`; the classifiers (`saekit.classify`) bring their own.

Parameters are float64 for the optimizer whatever the model's dtype; J and its gradient are
computed in the model's dtype. Ctrl-C (or SIGTERM) stops at the end of an iteration: the
parameters keep the last accepted point and the caller is told it was interrupted.
"""

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch
from torch import nn

from ..errors import Diverged
from .config import OptimConfig
from .control import StepBoundaryStop, progress_bar


class Evaluated(NamedTuple):
    cost: float  # J at the current parameters
    grads: list[torch.Tensor]  # dJ/dp for each parameter, in order
    row: dict[str, float]  # what the history records at this point (cost included)


Objective = Callable[[], Evaluated]


def autoencoder_objective(model, x: torch.Tensor, target: torch.Tensor | None = None) -> Objective:
    """J of a sparse autoencoder over the whole of x (m, n_inputs), against target (default x).

    The model is evaluated in evaluation mode: its loss is then a fixed function of x (the
    sigmoid kind's rho_hat is exact over x), which the line searches need.
    """
    params = list(model.parameters())

    def objective() -> Evaluated:
        model.eval()
        out = model.compute_gradients(x, target)
        reconstruction, sparsity, _, decay = out.terms.numbers()
        cost = out.terms.total
        row = {
            "cost": cost,
            "reconstruction": reconstruction,
            "weight_decay": decay,
            "sparsity": sparsity,
            "rho_hat_mean": float(model.dense_codes(out.codes).detach().mean(0).mean()),
        }
        return Evaluated(cost, [p.grad for p in params], row)

    return objective


def _flatten(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double().cpu().numpy()


@torch.no_grad()
def _assign(params, theta: np.ndarray) -> None:
    offset = 0
    for p in params:
        p.copy_(torch.from_numpy(theta[offset : offset + p.numel()]).view(p.shape))
        offset += p.numel()


def train_lbfgs(
    params: list[nn.Parameter],
    objective: Objective,
    max_iter: int,
    memory: int = 100,
    progress: bool = True,
    on_iteration: Callable[[dict], None] | None = None,
) -> tuple[list[dict], bool]:
    """Minimise the objective over params with SciPy's L-BFGS-B. Returns (history, interrupted).

    The history has one row per iteration, measured at the accepted point: the objective's row
    with the step and the seconds since the start. on_iteration(row) is called after each
    iteration, with the parameters at the accepted point. Ctrl-C or SIGTERM stops at the end of
    the iteration; a cost that is not finite raises Diverged, the parameters at the last accepted
    point.
    """
    params = list(params)
    last: dict = {}  # the latest evaluation, to read the row at each accepted point
    history: list[dict] = []
    started = time.perf_counter()

    def fun(theta):
        _assign(params, theta)
        evaluated = objective()
        if not math.isfinite(evaluated.cost):
            raise Diverged(f"the cost became {evaluated.cost} at L-BFGS iteration {len(history) + 1}")
        last.update(theta=theta.copy(), evaluated=evaluated)
        return evaluated.cost, _flatten(evaluated.grads)

    def callback(intermediate_result):
        x = intermediate_result.x
        if not np.array_equal(x, last["theta"]):
            fun(x)  # rare: the accepted point was not the last one evaluated
        accepted["theta"] = x.copy()
        row = {"step": len(history) + 1, **last["evaluated"].row, "seconds": round(time.perf_counter() - started, 3)}
        history.append(row)
        if on_iteration is not None:
            on_iteration(row)
        bar.update(1)
        shown = {"cost": f"{row['cost']:.6g}"}
        if "rho_hat_mean" in row:
            shown["rho_hat"] = f"{row['rho_hat_mean']:.4f}"
        bar.set_postfix(shown, refresh=False)
        if stop.requested:
            raise StopIteration  # SciPy ends the minimisation at this accepted point

    accepted = {"theta": _flatten(params)}
    with progress_bar(max_iter, "L-BFGS", progress) as bar, StepBoundaryStop() as stop:
        try:
            scipy.optimize.minimize(
                fun,
                accepted["theta"],
                jac=True,
                method="L-BFGS-B",
                callback=callback,
                options={"maxiter": max_iter, "maxcor": memory, "ftol": 0.0, "gtol": 1e-10, "maxfun": 4 * max_iter},
            )
        finally:
            _assign(params, accepted["theta"])
    return history, stop.requested


class FullBatch:
    """L-BFGS over all the rows in memory, with the minibatch trainer's interface (step, run, state_dict).

    A denoising autoencoder's corruption is drawn once from the seed (the objective must stay
    fixed for the line searches). Resuming restarts L-BFGS's curvature memory at the saved
    parameters, as UFLDL's walkthrough does when it runs minFunc "50 iterations 8 times".
    """

    scale = 1.0  # full-batch training sees the inputs as they are

    def __init__(
        self,
        model,
        x: torch.Tensor,
        optim: OptimConfig,
        *,
        seed: int = 0,
        corruption=None,
        state: dict | None = None,
        history: list | None = None,
    ):
        self.model, self.optim = model, optim
        target = None
        if corruption is not None:
            x, target = corruption(x, torch.Generator().manual_seed(seed)), x
        self.objective = autoencoder_objective(model, x, target)
        self.history = [] if history is None else history
        self.step = 0 if state is None else state["step"]
        if state is not None:
            model.load_training_state(state["kind"])
        self.total_steps = optim.max_iter

    def state_dict(self) -> dict:
        return {"step": self.step, "scale": self.scale, "kind": self.model.training_state()}

    def run(
        self,
        progress: bool = True,
        checkpoint: Callable[[], None] | None = None,
        on_row: Callable[[dict], None] | None = None,
    ) -> tuple[list, bool]:
        """Iterate until total_steps, as Minibatch.run does (checkpoint every optim.checkpoint_every)."""
        done = self.step

        def on_iteration(row: dict) -> None:
            self.step += 1
            row = {**row, "step": done + row["step"]}
            self.history.append(row)
            if on_row is not None:
                on_row(row)
            if checkpoint is not None and self.step % self.optim.checkpoint_every == 0:
                checkpoint()

        interrupted = False
        if self.step < self.total_steps:
            _, interrupted = train_lbfgs(
                self.model.parameters(),
                self.objective,
                self.total_steps - self.step,
                self.optim.lbfgs_memory,
                progress,
                on_iteration,
            )
        return self.history, interrupted
