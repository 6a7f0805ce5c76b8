"""Minibatch training (Adam or SGD) on a stream of vectors, for every kind of sparse autoencoder.

One step: take the next batch (this process's slice of the global batch under torchrun),
corrupt it for a denoising autoencoder, let the model compute its loss terms and their gradient
(`SparseAutoencoder.compute_gradients`: the kind's closed form or autograd), average the
gradients across processes, keep the decoder's columns at unit norm if asked, step, and update
the dead-unit counters. The trainer sums the terms and never asks which kind it trains.

Everything needed to continue exactly where it stopped is in `state_dict()`: the step, the
optimizer's moments, the stream's position, the dead-unit counters, the kind's own training
statistics and the input scale, so an interrupted run resumed gives the same weights as an
uninterrupted one. Ctrl-C or SIGTERM stops at the end of the current step.

A step whose loss is not finite, or more than DIVERGENCE_FACTOR times the first step's, raises
Diverged before the optimizer applies it, so the weights stay those of the step before.
"""

import math
import time
from collections.abc import Callable

import torch

from .. import distributed
from ..data import Corruption
from ..data.vectors import VectorStream, geometric_median, mean_and_mean_squared_norm, open_vectors
from ..errors import Diverged
from ..kernels.sparse import SparseCodes
from ..kinds import SparseAutoencoder
from .config import AUTOCAST, OptimConfig
from .control import StepBoundaryStop, progress_bar
from .memory import keep_freed_memory

STATISTICS_ROWS = 65536  # rows read to estimate the input scale and the mean
DIVERGENCE_FACTOR = 1e6  # a loss this many times the first step's means the run diverged
# Per-batch sums kept for the history: the loss terms, then squared error, variance, active codes.
SUMS = ("cost", "reconstruction", "sparsity", "aux", "weight_decay", "squared_error", "variance", "active")


def make_stream(source, optim: OptimConfig, seed: int, dtype: torch.dtype) -> VectorStream:
    """The shuffled minibatches of the source as optim says, this process's slice under torchrun."""
    return VectorStream(
        source,
        optim.batch_size,
        min(optim.shuffle_buffer, source.n),
        seed=seed,
        dtype=dtype,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        shuffle=optim.shuffle,
    )


def make_optimizer(params: list, optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel for the parameters' device (a step of the width-16,384
    TopK dictionary's Adam took 48 ms fused, 288 ms in torch's default foreach form), or SGD."""
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return Adam(params, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), fused=fused)


class Adam(torch.optim.Adam):
    """torch's Adam, handing a parameter stored transposed (W2, the transpose of a contiguous tensor) to the
    update as its contiguous transpose, with its gradient and moments: the update is element-wise, and torch's
    fused CPU kernel copies a tensor that is not contiguous (W2's Adam step at width 16,384, d 512: 39 ms
    against 6). Its state, saved and loaded, is torch's."""

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs else [])
        for i, tensors in enumerate(zip(*columns)):
            if all(_transposed(t) for t in tensors):
                for column, t in zip(columns, tensors):
                    column[i] = t.t()
        return has_complex


def _transposed(t: torch.Tensor) -> bool:
    """Whether t is the transpose of a contiguous matrix, and not contiguous itself."""
    return t.ndim == 2 and not t.is_contiguous() and t.t().is_contiguous()


class Minibatch:
    def __init__(
        self,
        model: SparseAutoencoder,
        source,
        optim: OptimConfig,
        *,
        seed: int = 0,
        corruption: Corruption | None = None,
        state: dict | None = None,
        history: list | None = None,
        stream: VectorStream | None = None,
    ):
        self.model, self.optim, self.seed, self.corruption = model, optim, seed, corruption
        self.source = open_vectors(source)  # splits a transcoder's batches into inputs and targets
        self.history = [] if history is None else history  # rows of history.csv; run() appends
        params = list(model.parameters())
        self.optimizer = make_optimizer(params, optim)
        self.stream = stream or make_stream(self.source, optim, seed, model.W1.dtype)
        self.total_steps = optim.steps or optim.epochs * self.stream.steps_per_epoch
        self.since_fired = torch.zeros(model.n_hidden, dtype=torch.int64)  # examples since each unit last fired
        self.step, self.scale = 0, 1.0
        self.first_loss: float | None = None  # the loss of step 1, the yardstick of divergence
        self.window = torch.zeros(len(SUMS), dtype=torch.float64)  # SUMS since the last history row
        self.window_examples = 0
        if state is None:
            self._initialise()
        else:
            self.load_state_dict(state)

    @torch.no_grad()
    def _initialise(self) -> None:
        """Input scale and decoder bias from the data, before the first step. A transcoder's inputs and
        targets share one scale (from both), so it folds into the weights as an autoencoder's does; its
        decoder bias starts at the targets' center."""
        optim, model = self.optim, self.model
        if optim.scale_inputs:
            _, mean_squared_norm = mean_and_mean_squared_norm(self.source, max_rows=STATISTICS_ROWS)
            self.scale = float(mean_squared_norm) ** -0.5
        if optim.decoder_bias_init != "zeros":
            center = (
                geometric_median(self.source.targets(), seed=self.seed)
                if optim.decoder_bias_init == "geometric-median"
                else mean_and_mean_squared_norm(self.source.targets(), max_rows=STATISTICS_ROWS)[0]
            )
            model.b2.copy_(torch.as_tensor(center) * self.scale)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "scale": self.scale,
            "first_loss": self.first_loss,
            "window": self.window.clone(),
            "window_examples": self.window_examples,
            "optimizer": self.optimizer.state_dict(),
            "stream": self.stream.state_dict(),
            "since_fired": self.since_fired.clone(),
            "kind": self.model.training_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.scale, self.first_loss = state["step"], state["scale"], state["first_loss"]
        self.window.copy_(state["window"])
        self.window_examples = state["window_examples"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.since_fired.copy_(state["since_fired"])
        self.model.load_training_state(state["kind"])

    def dead(self) -> torch.Tensor:
        """(n_hidden,) bool: units that have not fired in optim.dead_after examples."""
        return self.since_fired >= self.optim.dead_after

    def lr_factor(self) -> float:
        """The schedule's share of --lr at this step: a linear warm-up, then constant, or constant and then
        decaying to 0 over the last lr_decay_fraction of the steps after the warm-up, or over every step after
        the first lr_hold_steps of them where those are more."""
        optim, step = self.optim, self.step
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        after_warmup = self.total_steps - optim.warmup_steps
        decay = max(1, round(after_warmup * optim.lr_decay_fraction))
        if optim.lr_hold_steps:
            decay = max(decay, after_warmup - optim.lr_hold_steps)
        progress = min(1.0, max(0.0, (step - (self.total_steps - decay)) / decay))
        if optim.lr_decay == "linear":
            return 1.0 - progress
        if optim.lr_decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _step(self, x_in: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns this process's sums for the history (see SUMS) and which units fired."""
        model, optim = self.model, self.optim
        for group in self.optimizer.param_groups:  # from the step alone, so a resumed run follows it exactly
            group["lr"] = optim.lr * self.lr_factor()
        out = model.compute_gradients(x_in, y, dead=self.dead().to(y.device), autocast=AUTOCAST[optim.autocast])
        self._check_loss(out.terms.total)
        distributed.average_gradients(list(model.parameters()))
        if optim.normalize_decoder:
            model.remove_parallel_gradient_()
        self.optimizer.step()
        if optim.normalize_decoder:
            model.normalize_decoder_()
        return self._sums(out.terms, out.codes, y)

    def _check_loss(self, loss: float) -> None:
        """Raise Diverged where this step's loss shows the run diverged (every process agrees)."""
        if self.first_loss is None:
            self.first_loss = loss
        bound = DIVERGENCE_FACTOR * max(abs(self.first_loss), 1e-30)
        diverged = not math.isfinite(loss) or loss > bound
        if distributed.any_true(diverged):
            why = (
                "is not finite" if not math.isfinite(loss) else f"is over {DIVERGENCE_FACTOR:g} times the first step's"
            )
            raise Diverged(
                f"training diverged at step {self.step + 1}: the loss {loss:.4g} {why}; the learning rate "
                f"(--lr {self.optim.lr:g}) or a penalty weight is likely too large: start again with a smaller one"
            )

    @torch.no_grad()
    def _sums(self, terms, h, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The history's per-batch sums, and which units fired. The variance for the FVU is about the
        global batch's mean (sum ||y||^2 - <sum y, mean>), so it does not depend on the process count."""
        batch = y.shape[0]
        if isinstance(h, SparseCodes):
            positive = h.values > 0
            fired = torch.zeros(self.model.n_hidden, dtype=torch.bool, device=y.device)
            fired[h.indices[positive]] = True
        else:
            positive = h > 0
            fired = positive.any(0)
        numbers = terms.numbers()
        squared_error = 2 * batch * numbers[0]  # reconstruction = 0.5 mean_i ||x_hat_i - y_i||^2
        column_sum = y.sum(0)
        total = distributed.all_reduce_sum(torch.cat([column_sum, y.new_tensor([batch])]))
        variance = float(torch.dot(y.reshape(-1), y.reshape(-1)) - column_sum @ (total[:-1] / total[-1]))
        sums = [t * batch for t in (terms.total, *numbers)]
        return torch.tensor(
            [*sums, squared_error, variance, float(positive.sum())], dtype=torch.float64, device=y.device
        ), fired

    def run(
        self,
        progress: bool = True,
        checkpoint: Callable[[], None] | None = None,
        on_row: Callable[[dict], None] | None = None,
    ) -> tuple[list, bool]:
        """Train until total_steps, calling checkpoint() every optim.checkpoint_every steps and
        on_row(row) with each new history row. Returns (the history, including rows from before a
        resume, interrupted)."""
        self.start()
        batches = iter(self.stream)
        show = progress and distributed.is_main()
        with progress_bar(self.total_steps, self.optim.optimizer, show) as bar, StepBoundaryStop() as stop:
            bar.update(self.step)
            while self.step < self.total_steps and not stop.requested:
                row = self.train_on(next(batches), on_row)
                bar.update(1)
                if row is not None:
                    bar.set_postfix(
                        cost=f"{row['cost']:.5g}", fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}", refresh=False
                    )
                if checkpoint is not None and self.step % self.optim.checkpoint_every == 0:
                    checkpoint()
        self.model.eval()
        return self.history, stop.requested

    def start(self) -> None:
        """Before the first step of this run (or of a resumed one)."""
        if self.model.W1.device.type == "cpu":
            keep_freed_memory()
        if self.optim.normalize_decoder and self.step == 0:
            self.model.normalize_decoder_()
        self.model.train()
        self.started = self.window_started = time.perf_counter()

    def train_on(self, batch: torch.Tensor, on_row: Callable[[dict], None] | None = None) -> dict | None:
        """One step on this process's batch (batch, n_inputs) of the stream (a transcoder's: (batch, n_inputs +
        n_outputs)); the new history row, if one is due."""
        world = distributed.world_size()
        x_in, y = self.source.split(batch.to(self.model.W1.device) * self.scale)
        if self.corruption is not None:
            # The corruption of the whole global batch is drawn from (seed, step), and each
            # process takes its rows: N processes corrupt exactly as one does.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
            x_in = self.corruption(y, generator, distributed.rank(), world)
        sums, fired = self._step(x_in, y)
        fired = distributed.all_reduce_sum(fired.to(torch.int64)).cpu() > 0
        self.since_fired += y.shape[0] * world
        self.since_fired[fired] = 0
        self.step += 1
        self.window += distributed.all_reduce_sum(sums).cpu()
        self.window_examples += y.shape[0] * world
        if self.step % self.optim.log_every != 0 and self.step != self.total_steps:
            return None
        row = self._row(time.perf_counter() - self.window_started, self.started)
        self.history.append(row)
        if on_row is not None:
            on_row(row)
        self.window.zero_()
        self.window_examples, self.window_started = 0, time.perf_counter()
        return row

    def _row(self, seconds: float, started: float) -> dict:
        """The history row of the steps since the last one."""
        n = self.window_examples
        total, reconstruction, sparsity, aux, decay, squared_error, variance, active = self.window.tolist()
        row = {
            "step": self.step,
            "cost": total / n,
            "reconstruction": reconstruction / n,
            "sparsity": sparsity / n,
            "aux": aux / n,
            "weight_decay": decay / n,
            "mse": squared_error / (n * self.model.n_outputs) / self.scale**2,
            "fvu": squared_error / max(variance, 1e-30),
            "l0": active / n,
            "dead_fraction": float(self.dead().double().mean()),
            "examples_per_s": round(n / max(seconds, 1e-9), 1),
            "seconds": round(time.perf_counter() - started, 3),
        }
        return {**row, **self.model.history_stats()}
