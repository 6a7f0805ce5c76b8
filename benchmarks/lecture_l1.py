"""Seconds per epoch of seed 003's exercise: saekit's trainer against the lecture's plain PyTorch loop.

The exercise: a 784-400-784 sigmoid autoencoder on MNIST's 60,000 training digits, an L1 penalty
on the hidden activations, minibatch SGD with batch 1000. The baseline is written the way the
lecture writes it: nn.Sequential(Linear, Sigmoid) encoder and decoder, the penalty as a custom
autograd Function (identity forward, + weight * sign(h) backward), nn.MSELoss, and
zero_grad / backward / step. Both run in the same process on the same data, alternating, and
the script prints each one's median seconds per epoch and their ratio.

    python benchmarks/lecture_l1.py [--epochs 3] [--examples 60000]

MNIST is read from $SAEKIT_DATA_DIR (or ../shared/data); without it, random digits-shaped data
in [0, 1] stand in (the time per epoch does not depend on the values).
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from saekit.config import build_config
from saekit.data.vectors import open_vectors
from saekit.kinds import build
from saekit.kinds.penalties import L1Penalty
from saekit.train import Minibatch


def load_digits(n: int) -> tuple[torch.Tensor, str]:
    here = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    data_dir = os.environ.get("SAEKIT_DATA_DIR") or (str(here) if here.is_dir() else None)
    if data_dir:
        from saekit.data.idx import load_digits as read

        images, _ = read("mnist", "train", data_dir, download=False)
        return torch.from_numpy(images[:n]), f"MNIST ({data_dir})"
    return torch.rand(n, 784), "random data (no MNIST found)"


def lecture_epoch(x: torch.Tensor, batch: int, lr: float, l1_weight: float, encoder, decoder) -> float:
    """One epoch of the lecture's loop; returns seconds."""
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr)
    criterion = nn.MSELoss()
    started = time.perf_counter()
    for start in range(0, x.shape[0], batch):
        inputs = x[start : start + batch]
        optimizer.zero_grad()
        outputs = decoder(L1Penalty.apply(encoder(inputs), l1_weight))
        loss = criterion(outputs, inputs)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def saekit_epoch(x: torch.Tensor, cfg) -> float:
    model = build(cfg.model, 784, dtype=torch.float32, seed=0)
    trainer = Minibatch(model, open_vectors(x), cfg.optim)
    started = time.perf_counter()
    trainer.run(progress=False)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed for each trainer")
    parser.add_argument("--examples", type=int, default=60000)
    args = parser.parse_args()
    x, source = load_digits(args.examples)
    cfg = build_config("lecture-l1", overrides={"epochs": 1, "n_examples": args.examples})
    print(
        f"data: {x.shape[0]} x {x.shape[1]} from {source}; 784-{cfg.model.n_hidden}-784, batch {cfg.optim.batch_size}, "
        f"float32, {torch.get_num_threads()} threads"
    )
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(784, cfg.model.n_hidden), nn.Sigmoid())
    decoder = nn.Sequential(nn.Linear(cfg.model.n_hidden, 784), nn.Sigmoid())
    times = {"lecture (plain PyTorch autograd)": [], "saekit": []}
    lecture_epoch(x, cfg.optim.batch_size, cfg.optim.lr, 0.1, encoder, decoder)  # warm-up
    saekit_epoch(x[: 4 * cfg.optim.batch_size], cfg)
    for _ in range(args.epochs):
        times["lecture (plain PyTorch autograd)"].append(
            lecture_epoch(x, cfg.optim.batch_size, cfg.optim.lr, 0.1, encoder, decoder)
        )
        times["saekit"].append(saekit_epoch(x, cfg))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:34s} {medians[name]:7.2f} s per epoch  (runs: {', '.join(f'{v:.2f}' for v in t)})")
    ratio = medians["lecture (plain PyTorch autograd)"] / medians["saekit"]
    print(f"saekit is {ratio:.2f}x the lecture's speed per epoch")


if __name__ == "__main__":
    main()
