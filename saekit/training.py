"""Training: full-batch L-BFGS (UFLDL's minFunc) and minibatch Adam/SGD.

Both drive a `SparseAutoencoder` with a `TrainConfig`; neither knows the command line. Progress
shows as a bar (iteration, cost, mean rho_hat), and Ctrl-C stops training cleanly: the model
keeps the last accepted parameters and the history says it was interrupted, so the caller can
still save the run and resume it later.

The cost J = reconstruction + weight decay + sparsity penalty is computed one of two ways:
- the classic sigmoid/KL autoencoder uses its closed-form gradient (`saekit.classic`);
- every other combination is differentiated by autograd (`loss_terms`).
"""

import math
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


def loss_terms(model, x, cfg: TrainConfig, target=None):
    """The cost on a batch x (m, n_inputs), for autograd: returns (loss to differentiate, Evaluation).

    rho_hat is exact over the m examples given (full-batch training and evaluation).
    """
    y = x if target is None else target
    out = model(x)
    reconstruction = 0.5 * (out.x_hat - y).pow(2).sum(1).mean()
    decay = weight_decay(cfg.weight_decay, model.W1, model.W2)
    rho_hat = out.h.mean(0)
    if cfg.penalty == "kl":
        sparsity = cfg.beta * kl_divergence(cfg.rho, rho_hat).sum()
    elif cfg.penalty == "l1":
        sparsity = cfg.beta * out.h.abs().sum(1).mean()
    elif cfg.penalty == "contractive":
        sparsity = cfg.beta * contractive(out.h, model.W1, model.activation)
    else:
        sparsity = torch.zeros((), dtype=x.dtype, device=x.device)
    loss = reconstruction + decay + sparsity
    terms = [float(t.detach()) for t in (loss, reconstruction, decay, sparsity)]
    return loss, Evaluation(*terms, rho_hat.detach())


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
        shown = {"cost": f"{row['cost']:.6g}"}
        if math.isfinite(row["rho_hat_mean"]):  # a classifier has no rho_hat
            shown["rho_hat"] = f"{row['rho_hat_mean']:.4f}"
        bar.set_postfix(shown, refresh=False)

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
        # The sigmoid autoencoder's closed-form gradient is faster than autograd (saekit.classic).
        self.closed_form = (model.activation == "sigmoid" and model.output == "sigmoid" and not model.pre_bias
                            and cfg.penalty in ("kl", "l1", "none") and cfg.autocast == "none")
        self.workspace = None
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

    def _gradients(self, x_in, y):
        """Set the parameters' gradients for one batch; return this process's sums for the history
        (cost, reconstruction, sparsity, aux, weight decay, squared error, variance, active codes, each
        summed over the batch) and which units fired."""
        if self.closed_form:
            return self._closed_form_gradients(x_in, y)
        cfg, model = self.cfg, self.model
        aux_k = cfg.aux_k if model.activation in SPARSE_ACTIVATIONS else 0
        dead = self.dead().to(x_in.device) if aux_k else None
        with torch.autocast(x_in.device.type, dtype=AUTOCAST[cfg.autocast], enabled=cfg.autocast != "none"):
            out = model(x_in, dead=dead, aux_k=aux_k)
        error = out.x_hat.to(y.dtype) - y
        squared_error = error.pow(2).sum()
        reconstruction = 0.5 * squared_error / y.shape[0]
        h = out.h
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        penalty = sparsity = aux = decay = zero
        if cfg.penalty == "kl":
            penalty, sparsity = self.running.penalty(h, cfg.rho, cfg.beta, reduce=distributed.all_reduce_sum)
        elif cfg.penalty in ("l1", "l1-decoder"):
            codes = h.values if isinstance(h, SparseCodes) else h
            if cfg.penalty == "l1-decoder":
                norms = model.W2.norm(dim=0)
                codes = codes * (norms[h.indices] if isinstance(h, SparseCodes) else norms)
            penalty = sparsity = cfg.beta * codes.abs().sum(1).mean()
        elif cfg.penalty == "l0":
            penalty = sparsity = cfg.beta * model.jumprelu.l0(out.z2)
        elif cfg.penalty == "contractive":
            penalty = sparsity = cfg.beta * contractive(h, model.W1, model.activation)
        if out.aux is not None:
            aux = cfg.aux_coefficient * _auxk_loss(error.detach(), out.aux, model)
        if cfg.weight_decay:
            decay = weight_decay(cfg.weight_decay, model.W1, model.W2)
        (reconstruction + penalty + aux + decay).backward()
        if model.activation == "sigmoid":  # every unit is active; firing means nothing here
            active, fired = y.shape[0] * model.n_hidden, torch.ones(model.n_hidden, dtype=torch.bool, device=y.device)
        elif isinstance(h, SparseCodes):
            positive = h.values > 0
            active, fired = positive.sum(), torch.zeros(model.n_hidden, dtype=torch.bool, device=y.device)
            fired[h.indices[positive]] = True
        else:
            positive = h > 0
            active, fired = positive.sum(), positive.any(0)
        terms = [float(torch.as_tensor(t).detach()) for t in (reconstruction + sparsity + aux + decay, reconstruction, sparsity, aux, decay)]
        return self._sums(terms, float(squared_error.detach()), float(active), y), fired

    def _closed_form_gradients(self, x_in, y):
        """The sigmoid autoencoder's step by UFLDL's closed form (saekit.classic), its penalty's
        slope given per unit: the KL slope at the running rho_hat, or beta for L1 (a2 > 0)."""
        cfg, model = self.cfg, self.model
        batch = y.shape[0]

        def sparsity(rho_hat):
            if cfg.penalty == "kl":
                self.running.observe(rho_hat * batch, batch, reduce=distributed.all_reduce_sum)
                return self.running.slope_and_value(cfg.rho, cfg.beta)
            if cfg.penalty == "l1":  # beta * mean_i sum_j |a2_ij| = beta * sum_j rho_hat_j
                return torch.full_like(rho_hat, cfg.beta), cfg.beta * float(rho_hat.sum())
            return torch.zeros_like(rho_hat), 0.0

        W1, b1, W2, b2 = (p.detach() for p in model.parameters())
        result, self.workspace = classic.cost_and_grad(W1, b1, W2, b2, x_in, cfg.weight_decay, cfg.rho, cfg.beta,
                                                       target=y, workspace=self.workspace, sparsity=sparsity)
        for p, g in zip(model.parameters(), result.grads):
            p.grad = g  # the workspace's buffers, which the next step overwrites after the optimizer has read them
        terms = [result.cost, result.reconstruction, result.sparsity, 0.0, result.weight_decay]
        fired = torch.ones(model.n_hidden, dtype=torch.bool, device=y.device)
        return self._sums(terms, 2 * batch * result.reconstruction, batch * model.n_hidden, y), fired

    @torch.no_grad()
    def _sums(self, terms: list[float], squared_error: float, active: float, y: torch.Tensor) -> torch.Tensor:
        """The history's per-batch sums. The variance for the FVU is about the global batch's mean
        (sum ||y||^2 - <sum y, mean>), so it does not depend on the process count."""
        column_sum = y.sum(0)
        total = distributed.all_reduce_sum(torch.cat([column_sum, y.new_tensor([y.shape[0]])]))
        variance = float(torch.dot(y.reshape(-1), y.reshape(-1)) - column_sum @ (total[:-1] / total[-1]))
        batch = y.shape[0]
        return torch.tensor([t * batch for t in terms] + [squared_error, variance, active], dtype=torch.float64,
                            device=y.device)

    @torch.no_grad()
    def _remove_parallel_gradient(self) -> None:
        """Project each decoder column's gradient off the column, so a step moves it along the unit sphere."""
        W, G = self.model.W2.t(), self.model.W2.grad.t()
        G.sub_((G * W).sum(1, keepdim=True) * W)

    @torch.no_grad()
    def _normalize_decoder(self) -> None:
        W = self.model.W2.t()
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def run(self, progress: bool = True, checkpoint: Callable[[], None] | None = None,
            on_row: Callable[[dict], None] | None = None) -> tuple[list, bool]:
        """Train until total_steps, calling checkpoint() every cfg.checkpoint_every steps and
        on_row(row) with each new history row. Returns (the history, including rows from before a
        resume, interrupted)."""
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
                    self.optimizer.zero_grad(set_to_none=True)
                    sums, fired = self._gradients(x_in, y)
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
                    window += distributed.all_reduce_sum(sums).cpu()
                    examples_in_window += y.shape[0] * world
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        row = self._row(window, examples_in_window, time.perf_counter() - window_started, started)
                        self.history.append(row)
                        if on_row is not None:
                            on_row(row)
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
