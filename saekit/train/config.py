"""The optimisation's part of a run's settings: which optimizer, how long, how the loop runs."""

from dataclasses import dataclass
from typing import Literal

import torch

from ..settings import Settings

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OptimConfig(Settings):
    optimizer: Literal["lbfgs", "adam", "sgd"] = "lbfgs"
    """'lbfgs' (full batch, as UFLDL's minFunc), 'adam' or 'sgd' (minibatches)."""
    max_iter: int = 400
    """L-BFGS iterations."""
    lbfgs_memory: int = 100
    """L-BFGS history length (minFunc's default is 100)."""
    epochs: int = 20
    """Passes over the data for minibatch training (adam, sgd)."""
    steps: int = 0
    """Minibatch steps to train (0: --epochs passes over the data)."""
    batch_size: int = 256
    """Examples per minibatch (adam, sgd), per process under torchrun."""
    lr: float = 1e-3
    """Learning rate (adam, sgd): the peak of the schedule."""
    adam_beta1: float = 0.9
    """Adam's decay rate for its running mean of the gradients (its momentum)."""
    adam_beta2: float = 0.999
    """Adam's decay rate for its running mean of the squared gradients."""
    warmup_steps: int = 0
    """Minibatch training: steps over which the learning rate rises linearly from 0 to --lr."""
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    """Minibatch training: after the warm-up, keep --lr ('none'), or lower it towards 0 over the remaining steps
    ('linear', 'cosine': the last step takes about 1/n of it)."""
    lr_decay_fraction: float = 1.0
    """Minibatch training: the share of the steps after the warm-up that --lr-decay takes, at their end (1: all
    of them; 0.2: --lr holds for the first 80%, then decays over the last 20%)."""
    lr_hold_steps: int = 0
    """Minibatch training: the most steps --lr holds after the warm-up before --lr-decay starts, so that a long
    run decays over more than --lr-decay-fraction of its steps (0: no limit)."""
    shuffle_buffer: int = 65536
    """Minibatch training: rows held in memory for shuffling a streamed data set."""
    shuffle: bool = True
    """Minibatch training: shuffle the rows (--no-shuffle reads them in their stored order, for data shuffled
    already, and for benchmarks that feed every trainer the same batches)."""
    scale_inputs: bool = False
    """Scale inputs to unit mean squared norm while training; the scale is folded into the saved weights."""
    normalize_decoder: bool = False
    """Keep the decoder's columns at unit norm (the gradient's component along each column is removed)."""
    decoder_bias_init: Literal["zeros", "mean", "geometric-median"] = "zeros"
    """Initial decoder bias b2: 'zeros', 'mean' or 'geometric-median' of the training data."""
    dead_after: int = 10_000_000
    """A unit is dead when it has not fired in this many training examples (AuxK revives dead units)."""
    autocast: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision: 'none', 'bf16' or 'fp16' (torch.autocast on the --device)."""
    log_every: int = 50
    """Minibatch training: steps between rows of history.csv."""
    checkpoint_every: int = 500
    """Steps (or L-BFGS iterations) between checkpoints; one is also written at the end and on Ctrl-C."""
    keep_checkpoints: int = 2
    """Checkpoints kept, newest first: if the newest is damaged, --resume falls back to the one before."""

    def problems(self) -> list[str]:
        problems = (
            self.at_least(
                1,
                "max_iter",
                "lbfgs_memory",
                "epochs",
                "batch_size",
                "shuffle_buffer",
                "dead_after",
                "log_every",
                "checkpoint_every",
                "keep_checkpoints",
            )
            + self.at_least(0, "steps", "warmup_steps", "lr_hold_steps")
            + self.from_zero_below_one("adam_beta1", "adam_beta2")
        )
        if not (self.lr > 0 and self.lr < float("inf")):
            problems.append(f"--lr must be a finite number > 0 (got {self.lr})")
        if not 0 < self.lr_decay_fraction <= 1:
            problems.append(f"--lr-decay-fraction must lie in (0, 1] (got {self.lr_decay_fraction})")
        return problems

    @property
    def full_batch(self) -> bool:
        return self.optimizer == "lbfgs"
