"""Training: full-batch L-BFGS (UFLDL's minFunc) and minibatch Adam/SGD.

Both drive a `SparseAutoencoder` with a `TrainConfig`; neither knows the command line. Progress
shows as a bar (iteration, cost, mean rho_hat), and Ctrl-C stops training cleanly: the model
keeps the last accepted parameters and the history says it was interrupted, so the caller can
still save the run and resume it later.

The cost J = reconstruction + weight decay + sparsity penalty is computed one of two ways:
- the classic sigmoid/KL autoencoder uses its closed-form gradient (`saekit.classic`);
- every other combination is differentiated by autograd (`loss_terms`).
"""

import signal
import threading
import time
from typing import Callable, NamedTuple

import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm

from . import classic, distributed
from .activations import SparseCodes
from .config import TrainConfig
from .data import corrupt
from .data.vectors import VectorStream, geometric_median, mean_and_mean_squared_norm, open_vectors
from .model import SPARSE_ACTIVATIONS, SparseAutoencoder
from .penalties import RunningRhoHat, contractive, kl_divergence, weight_decay
from .sparse_decode import sparse_decode

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STATISTICS_ROWS = 65536  # rows read to estimate the input scale and the mean


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
    terms = [float(t.detach()) for t in (reconstruction + decay + sparsity, reconstruction, decay, sparsity)]
    evaluation = Evaluation(*terms, rho_hat.detach())
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


class Minibatch:
    """Minibatch training (Adam or SGD) on a stream of vectors, for every kind of sparse autoencoder.

    One step: take the next batch (this process's slice of the global batch under torchrun),
    corrupt it for a denoising autoencoder, compute the loss, back-propagate, sum the gradients
    across processes, keep the decoder's columns at unit norm if asked, step, and update the
    dead-unit counters. Everything needed to continue exactly where it stopped is in
    `state_dict()`: the step, optimizer moments, the stream's position, the counters, the running
    rho_hat and the input scale, so an interrupted run resumed gives the same weights as an
    uninterrupted one.
    """

    def __init__(self, model: SparseAutoencoder, source, cfg: TrainConfig, state: dict | None = None,
                 history: list | None = None):
        self.model, self.cfg = model, cfg
        self.history = [] if history is None else history  # rows of history.csv; run() appends
        params = list(model.parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr)
        self.stream = VectorStream(source, cfg.batch_size, min(cfg.shuffle_buffer, source.n), seed=cfg.seed,
                                   dtype=model.W1.dtype, rank=distributed.rank(), world_size=distributed.world_size())
        self.total_steps = cfg.steps or cfg.epochs * self.stream.steps_per_epoch
        self.running = RunningRhoHat(model.n_hidden, cfg.rho_momentum) if cfg.penalty == "kl" else None
        self.since_fired = torch.zeros(model.n_hidden, dtype=torch.int64)  # examples since each unit last fired
        self.step, self.scale = 0, 1.0
        if state is None:
            self._initialise(source)
        else:
            self.load_state_dict(state)

    @torch.no_grad()
    def _initialise(self, source) -> None:
        """Input scale and decoder bias from the data, before the first step."""
        cfg, model = self.cfg, self.model
        if cfg.scale_inputs:
            _, mean_squared_norm = mean_and_mean_squared_norm(source, max_rows=STATISTICS_ROWS)
            self.scale = float(mean_squared_norm) ** -0.5
        if cfg.decoder_bias_init != "zeros":
            center = (geometric_median(source, seed=cfg.seed) if cfg.decoder_bias_init == "geometric-median"
                      else mean_and_mean_squared_norm(source, max_rows=STATISTICS_ROWS)[0])
            model.b2.copy_(torch.as_tensor(center) * self.scale)

    def state_dict(self) -> dict:
        return {"step": self.step, "scale": self.scale, "optimizer": self.optimizer.state_dict(),
                "stream": self.stream.state_dict(), "since_fired": self.since_fired.clone(),
                "rho_hat": None if self.running is None else self.running.rho_hat}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.scale = state["step"], state["scale"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.since_fired.copy_(state["since_fired"])
        if self.running is not None:
            self.running.rho_hat = state["rho_hat"]

    def dead(self) -> torch.Tensor:
        """(n_hidden,) bool: units that have not fired in cfg.dead_after examples."""
        return self.since_fired >= self.cfg.dead_after

    def _loss(self, x_in, y):
        """The loss to differentiate, and this process's sums for the history."""
        cfg, model = self.cfg, self.model
        aux_k = cfg.aux_k if model.activation in SPARSE_ACTIVATIONS else 0
        dead = self.dead().to(x_in.device) if aux_k else None
        with torch.autocast(x_in.device.type, dtype=AUTOCAST[cfg.autocast], enabled=cfg.autocast != "none"):
            out = model(x_in, dead=dead, aux_k=aux_k)
        x_hat = out.x_hat.to(y.dtype)
        error = x_hat - y
        reconstruction = 0.5 * error.pow(2).sum(1).mean()
        h = out.h
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        penalty = sparsity = aux = decay = zero
        if cfg.penalty == "kl":
            penalty, sparsity = self.running.penalty(h, cfg.rho, cfg.beta, reduce=distributed.all_reduce_sum)
        elif cfg.penalty in ("l1", "l1-decoder"):
            codes = h.values if isinstance(h, SparseCodes) else h
            weights = model.W2.norm(dim=0) if cfg.penalty == "l1-decoder" else None
            if weights is not None and isinstance(h, SparseCodes):
                codes = codes * weights[h.indices]
            elif weights is not None:
                codes = codes * weights
            penalty = sparsity = cfg.beta * codes.abs().sum(1).mean()
        elif cfg.penalty == "l0":
            penalty = sparsity = cfg.beta * model.jumprelu.l0(out.z2)
        elif cfg.penalty == "contractive":
            penalty = sparsity = cfg.beta * contractive(h, model.W1, model.activation)
        if out.aux is not None:
            aux = cfg.aux_coefficient * _auxk_loss(error.detach(), out.aux, model)
        if cfg.weight_decay:
            decay = weight_decay(cfg.weight_decay, model.W1, model.W2)
        loss = reconstruction + penalty + aux + decay
        active = (h.values > 0) if isinstance(h, SparseCodes) else (h > 0)
        fired = torch.zeros(model.n_hidden, dtype=torch.bool, device=y.device)
        if isinstance(h, SparseCodes):
            fired[h.indices[active]] = True
        else:
            fired = active.any(0)
        sums = torch.stack([reconstruction + sparsity + aux + decay, reconstruction, sparsity, aux, decay]).detach() * y.shape[0]
        # The variance for the FVU is about the global batch's mean, so it does not depend on the process count.
        total = distributed.all_reduce_sum(torch.cat([y.sum(0), y.new_tensor([y.shape[0]])]))
        variance = (y - total[:-1] / total[-1]).pow(2).sum()
        sums = torch.cat([sums, torch.stack([error.pow(2).sum(), variance, active.sum()]).detach().to(sums.dtype)])
        return loss, sums, fired

    @torch.no_grad()
    def _remove_parallel_gradient(self) -> None:
        """Project each decoder column's gradient off the column, so a step moves it along the unit sphere."""
        W, G = self.model.W2.t(), self.model.W2.grad.t()
        G.sub_((G * W).sum(1, keepdim=True) * W)

    @torch.no_grad()
    def _normalize_decoder(self) -> None:
        W = self.model.W2.t()
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def run(self, progress: bool = True, checkpoint: Callable[[], None] | None = None) -> tuple[list, bool]:
        """Train until total_steps, calling checkpoint() every cfg.checkpoint_every steps.
        Returns (the history, including rows from before a resume, interrupted)."""
        cfg, model = self.cfg, self.model
        params = [p for p in model.parameters()]
        world = distributed.world_size()
        generator = torch.Generator()
        started, interrupted = time.perf_counter(), False
        window = torch.zeros(8, dtype=torch.float64)
        examples_in_window, window_started = 0, time.perf_counter()
        if cfg.normalize_decoder and self.step == 0:
            self._normalize_decoder()
        model.train()
        batches = iter(self.stream)
        with _progress(self.total_steps, cfg.optimizer, progress and distributed.is_main()) as bar, _StepBoundaryInterrupt() as stop:
            bar.update(self.step)
            try:
                while self.step < self.total_steps and not stop.requested:
                    y = next(batches).to(model.W1.device) * self.scale
                    # The corruption of the whole global batch is drawn from (seed, step), and each
                    # process takes its rows: N processes corrupt exactly as one does.
                    generator.manual_seed(cfg.seed * 1_000_003 + self.step)
                    x_in = corrupt(y, cfg.corruption, cfg.corruption_level, generator, distributed.rank(), world)
                    loss, sums, fired = self._loss(x_in, y)
                    self.optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    distributed.average_gradients(params)
                    if cfg.normalize_decoder:
                        self._remove_parallel_gradient()
                    self.optimizer.step()
                    if cfg.normalize_decoder:
                        self._normalize_decoder()
                    fired = distributed.all_reduce_sum(fired.to(torch.int64)).cpu() > 0
                    self.since_fired += y.shape[0] * world
                    self.since_fired[fired] = 0
                    self.step += 1
                    window += distributed.all_reduce_sum(sums.double()).cpu()
                    examples_in_window += y.shape[0] * world
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        row = self._row(window, examples_in_window, time.perf_counter() - window_started, started)
                        self.history.append(row)
                        bar.set_postfix(cost=f"{row['cost']:.5g}", fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}", refresh=False)
                        window.zero_()
                        examples_in_window, window_started = 0, time.perf_counter()
                    if checkpoint is not None and self.step % cfg.checkpoint_every == 0:
                        checkpoint()
            except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
                interrupted = True
        model.eval()
        return self.history, interrupted or stop.requested

    def _row(self, window, n, seconds, started) -> dict:
        total, reconstruction, sparsity, aux, decay, squared_error, variance, active = window.tolist()
        row = {"step": self.step, "cost": total / n, "reconstruction": reconstruction / n, "sparsity": sparsity / n,
               "aux": aux / n, "weight_decay": decay / n, "mse": squared_error / (n * self.model.n_inputs) / self.scale ** 2,
               "fvu": squared_error / max(variance, 1e-30), "l0": active / n,
               "dead_fraction": float(self.dead().double().mean()),
               "examples_per_s": round(n / max(seconds, 1e-9), 1), "seconds": round(time.perf_counter() - started, 3)}
        if self.running is not None:
            row["rho_hat_mean"] = float(self.running.rho_hat.mean())
        return row


class _StepBoundaryInterrupt:
    """Within this block, Ctrl-C (SIGINT) asks the loop to stop after the current step instead of
    breaking it in the middle, so the saved state is always that of a whole step. A second Ctrl-C
    interrupts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _auxk_loss(residual: torch.Tensor, aux: SparseCodes, model) -> torch.Tensor:
    """AuxK: how well the dead units' codes rebuild the residual e = y - x_hat, normalised by e's variance.

    The variance is the global batch's, so several processes compute the same loss as one.
    """
    e = -residual  # y - x_hat
    e_hat = sparse_decode(aux.values.to(model.W2.dtype), aux.indices, model.W2.t())
    total = distributed.all_reduce_sum(torch.cat([e.sum(0), e.new_tensor([e.shape[0]])]))
    variance = distributed.all_reduce_sum((e - total[:-1] / total[-1]).pow(2).sum())
    # Gradients are averaged over processes, so each one weighs its part by the process count.
    return distributed.world_size() * (e_hat - e).pow(2).sum() / variance.clamp_min(1e-30)


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
    return Minibatch(model, open_vectors(x), cfg).run(progress)
