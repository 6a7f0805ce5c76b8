"""Training: full-batch L-BFGS (UFLDL's minFunc) and minibatch Adam/SGD.

Both drive a `SparseAutoencoder` with a `TrainConfig`; neither knows the command line. Progress
shows as a bar (iteration, cost, mean rho_hat), and Ctrl-C stops training cleanly: the model
keeps the last accepted parameters and the history says it was interrupted, so the caller can
still save the run and resume it later.

The cost J = reconstruction + weight decay + sparsity penalty is computed one of two ways:
- the classic sigmoid/KL autoencoder uses its closed-form gradient (`saekit.classic`);
- every other combination is differentiated by autograd (`loss_terms`).
"""

import time
from typing import Callable, NamedTuple

import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm

from . import classic
from .config import TrainConfig
from .model import SparseAutoencoder
from .data import corrupt
from .penalties import RunningRhoHat, contractive, kl_divergence, weight_decay


class Evaluation(NamedTuple):
    cost: float  # J
    reconstruction: float  # (1/2m) sum ||x_hat - y||^2
    weight_decay: float
    sparsity: float
    rho_hat: torch.Tensor  # (n_hidden,) mean hidden activation over the evaluated examples


def is_classic(model: SparseAutoencoder, cfg: TrainConfig) -> bool:
    """True where the closed-form gradient of `saekit.classic` applies."""
    return model.activation == "sigmoid" and model.output == "sigmoid" and cfg.penalty == "kl"


def loss_terms(model, x, cfg: TrainConfig, target=None, running: RunningRhoHat | None = None):
    """The cost on a batch x (m, n_inputs), for autograd: returns (loss to differentiate, Evaluation).

    With `running`, rho_hat is the running estimate of minibatch training (see RunningRhoHat);
    without it, rho_hat is exact over the m examples given.
    """
    y = x if target is None else target
    out = model(x)
    reconstruction = 0.5 * (out.x_hat - y).pow(2).sum(1).mean()
    decay = weight_decay(cfg.weight_decay, model.W1, model.W2)
    rho_hat = out.h.mean(0)
    if cfg.penalty == "kl" and running is not None:
        surrogate, sparsity = running.penalty(out.h, cfg.rho, cfg.beta)
        rho_hat = running.rho_hat
    elif cfg.penalty == "kl":
        surrogate = sparsity = cfg.beta * kl_divergence(cfg.rho, rho_hat).sum()
    elif cfg.penalty == "l1":
        surrogate = sparsity = cfg.beta * out.h.abs().sum(1).mean()
    elif cfg.penalty == "contractive":
        surrogate = sparsity = cfg.beta * contractive(out.h, model.W1, model.activation)
    else:
        surrogate = sparsity = torch.zeros((), dtype=x.dtype, device=x.device)
    loss = reconstruction + decay + surrogate
    evaluation = Evaluation(
        float(reconstruction + decay + sparsity), float(reconstruction), float(decay), float(sparsity), rho_hat.detach()
    )
    return loss, evaluation


def full_batch_objective(model, x, cfg: TrainConfig, target=None) -> Callable[[], tuple[Evaluation, list]]:
    """A function evaluating J at the model's current parameters: (Evaluation, gradients in parameter order)."""
    params = list(model.parameters())
    if is_classic(model, cfg):
        state = {"workspace": None}

        def closed_form():
            W1, b1, W2, b2 = (p.detach() for p in params)
            result, state["workspace"] = classic.cost_and_grad(
                W1, b1, W2, b2, x, cfg.weight_decay, cfg.rho, cfg.beta, target=target, workspace=state["workspace"]
            )
            return Evaluation(*result[:5]), list(result.grads)

        return closed_form

    def by_autograd():
        loss, evaluation = loss_terms(model, x, cfg, target)
        return evaluation, torch.autograd.grad(loss, params)

    return by_autograd


def _flatten(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double().cpu().numpy()


@torch.no_grad()
def _assign(params, theta: np.ndarray) -> None:
    offset = 0
    for p in params:
        p.copy_(torch.from_numpy(theta[offset : offset + p.numel()]).view(p.shape))
        offset += p.numel()


def _record(history: list, step: int, ev: Evaluation, started: float, **extra) -> dict:
    row = {
        "step": step,
        "cost": ev.cost,
        "reconstruction": ev.reconstruction,
        "weight_decay": ev.weight_decay,
        "sparsity": ev.sparsity,
        "rho_hat_mean": float(ev.rho_hat.mean()),
        "seconds": round(time.perf_counter() - started, 3),
        **extra,
    }
    history.append(row)
    return row


def _progress(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, unit="it", disable=not show, dynamic_ncols=True, mininterval=0.5)


def train_lbfgs(model, objective, max_iter: int, memory: int = 100, progress: bool = True) -> tuple[list, bool]:
    """Minimise J with SciPy's L-BFGS-B, as minFunc does in UFLDL. Returns (history, interrupted).

    History has one row per iteration, measured at the accepted point. Parameters are float64 for
    the optimizer whatever the model's dtype; J and its gradient are computed in the model's dtype.
    """
    params = list(model.parameters())
    last = {}  # the latest evaluation, to read the cost terms at each accepted point
    history, started = [], time.perf_counter()

    def fun(theta):
        _assign(params, theta)
        evaluation, grads = objective()
        last.update(theta=theta.copy(), evaluation=evaluation)
        return evaluation.cost, _flatten(grads)

    def callback(intermediate_result):
        x = intermediate_result.x
        if not np.array_equal(x, last["theta"]):
            fun(x)  # rare: the accepted point was not the last one evaluated
        accepted.update(theta=x.copy())
        row = _record(history, len(history) + 1, last["evaluation"], started)
        bar.update(1)
        bar.set_postfix(cost=f"{row['cost']:.6g}", rho_hat=f"{row['rho_hat_mean']:.4f}", refresh=False)

    accepted = {"theta": _flatten(params)}
    interrupted = False
    with _progress(max_iter, "L-BFGS", progress) as bar:
        try:
            scipy.optimize.minimize(
                fun, accepted["theta"], jac=True, method="L-BFGS-B", callback=callback,
                options={"maxiter": max_iter, "maxcor": memory, "ftol": 0.0, "gtol": 1e-10, "maxfun": 4 * max_iter},
            )
        except KeyboardInterrupt:
            interrupted = True
    _assign(params, accepted["theta"])
    return history, interrupted


def train_minibatch(model, x, cfg: TrainConfig, target=None, progress: bool = True) -> tuple[list, bool]:
    """Adam or SGD over shuffled minibatches of x (m, n_inputs); one history row per epoch.

    The KL penalty uses a running estimate of rho_hat (see `RunningRhoHat` for why).
    Returns (history, interrupted).
    """
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr)
    running = RunningRhoHat(model.n_hidden, cfg.rho_momentum) if cfg.penalty == "kl" else None
    generator = torch.Generator().manual_seed(cfg.seed)
    history, started, interrupted = [], time.perf_counter(), False
    m = x.shape[0]
    with _progress(cfg.epochs, cfg.optimizer, progress) as bar:
        try:
            for epoch in range(1, cfg.epochs + 1):
                totals = np.zeros(4)
                order = torch.randperm(m, generator=generator).to(x.device)
                for start in range(0, m, cfg.batch_size):
                    rows = order[start : start + cfg.batch_size]
                    clean = x[rows] if target is None else target[rows]
                    x_in = corrupt(x[rows], cfg.corruption, cfg.corruption_level, generator)
                    loss, ev = loss_terms(model, x_in, cfg, clean, running)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    totals += np.array(ev[:4]) * len(rows)
                mean = Evaluation(*(totals / m), ev.rho_hat)
                row = _record(history, epoch, mean, started)
                bar.update(1)
                bar.set_postfix(cost=f"{row['cost']:.6g}", rho_hat=f"{row['rho_hat_mean']:.4f}", refresh=False)
        except KeyboardInterrupt:
            interrupted = True
    return history, interrupted


def fit(model: SparseAutoencoder, x: torch.Tensor, cfg: TrainConfig, target=None, progress: bool = True):
    """Train the model on x (m, n_inputs) as the config says. Returns (history, interrupted).

    A denoising autoencoder (cfg.corruption) reconstructs the clean x from a corrupted copy:
    L-BFGS corrupts the data once (the objective must stay fixed for its line searches),
    minibatch training corrupts every batch afresh.
    """
    if cfg.optimizer == "lbfgs":
        if cfg.corruption != "none":
            generator = torch.Generator().manual_seed(cfg.seed)
            x, target = corrupt(x, cfg.corruption, cfg.corruption_level, generator), x if target is None else target
        objective = full_batch_objective(model, x, cfg, target)
        return train_lbfgs(model, objective, cfg.max_iter, cfg.lbfgs_memory, progress)
    return train_minibatch(model, x, cfg, target, progress)
