"""Forward + backward time of k-sparse decoding against dense decoding, float32, on this machine.

    python benchmarks/sparse_decode.py [--repeats 3]

All three compute x_hat (B, d) from k-sparse codes (values, indices) and atoms W (n, d), and
the gradients with respect to values and W for a fixed grad_out:

- sparse:      saekit.kernels.sparse (embedding_bag and its own backward), cost B·k·d;
- dense:       dense_codes(values, indices, n) @ W with autograd, cost B·n·d (three matmuls);
- handwritten: embedding_bag forward, backward by hand as a gather + batched dot for the
               values and index_add_ for W, the alternative to embedding_bag's backward that
               saekit.kernels.sparse does not use.

Medians of `repeats` runs after one warm-up. The machine may be shared and noisy: compare
ratios within one run, not times across runs.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from saekit.kernels.sparse import dense_codes, sparse_decode, topk_codes


def sparse_step(values, indices, W, grad_out):
    sparse_decode(values, indices, W).backward(grad_out)
    return values.grad, W.grad


def dense_step(values, indices, W, grad_out):
    (dense_codes(values, indices, W.shape[0]) @ W).backward(grad_out)
    return values.grad, W.grad


def handwritten_step(values, indices, W, grad_out):
    with torch.no_grad():
        F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")
        # (B, k, d) gather of the used atoms, dotted with each row's grad_out.
        grad_values = torch.bmm(W[indices], grad_out.unsqueeze(2)).squeeze(2)
        contributions = (values.unsqueeze(2) * grad_out.unsqueeze(1)).reshape(-1, W.shape[1])
        grad_W = torch.zeros_like(W).index_add_(0, indices.reshape(-1), contributions)
    return grad_values, grad_W


def fresh(inputs):
    """The inputs with the leaves' gradients cleared, so every step allocates them anew."""
    values, indices, W, grad_out = inputs
    values.grad = W.grad = None
    return values, indices, W, grad_out


def median_seconds(step, inputs, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocator and caches
        args = fresh(inputs)
        start = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def make_inputs(B, n, d, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(n, d, generator=gen) / d**0.5).requires_grad_()
    values, indices = topk_codes(torch.randn(B, n, generator=gen), k)
    grad_out = torch.randn(B, d, generator=gen)
    return values.requires_grad_(), indices, W, grad_out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; "
        f"median of {args.repeats} forward+backward runs"
    )
    print(
        f"{'B':>5} {'n':>6} {'d':>4} {'k':>3} | {'sparse':>9} {'dense':>9} {'handwritten':>11} | "
        f"{'dense/sparse':>12} {'hand/sparse':>11} | max |grad diff|"
    )
    B, d, k = 4096, 512, 32
    for n in (4096, 16384):
        inputs = make_inputs(B, n, d, k)
        steps = (sparse_step, dense_step, handwritten_step)
        seconds = [median_seconds(step, inputs, args.repeats) for step in steps]
        # The three must agree, or the times compare different things.
        grads = [[g.clone() for g in step(*fresh(inputs))] for step in steps]
        diff = max((a - b).abs().max().item() for other in grads[1:] for a, b in zip(grads[0], other))
        s, de, h = seconds
        print(
            f"{B:>5} {n:>6} {d:>4} {k:>3} | {s * 1e3:7.1f}ms {de * 1e3:7.0f}ms {h * 1e3:9.0f}ms | "
            f"{de / s:11.1f}x {h / s:10.1f}x | {diff:.1e}"
        )


if __name__ == "__main__":
    main()
