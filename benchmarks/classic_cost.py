"""One cost + gradient evaluation of UFLDL's sparse autoencoder on the MNIST shape, against the matmul peak.

    python benchmarks/classic_cost.py [--repeats N]

Shape: m = 10,000 examples of 784 inputs, 196 hidden units (UFLDL's MNIST exercise). Data are
MNIST's 10,000 test images when the files are found ($SAEKIT_DATA_DIR, else ../shared/data
beside the repository), otherwise uniform random numbers in [0, 1]: the timings do not depend
on the values.

For float64 and float32 it times
  (a) saekit.ufldl.sparse_autoencoder_cost, data (784, m) Fortran-ordered (as its docstring
      advises) and C-ordered;
  (b) saekit.kernels.classic.cost_and_grad on a SparseAutoencoder's own parameters (the training step);
  (c) plain NumPy: the UFLDL formulas vectorized the obvious way, one example per column;
  (d) the peak: the five matrix products of one evaluation, each timed alone, the fastest of
      NumPy (OpenBLAS) and PyTorch (MKL), computing C or C^T; their sum is the least time the
      evaluation can take.
All of it runs in the same rounds, in a shuffled order each round, so that other processes on
the machine slow every candidate alike: compare numbers within one run only. "% of peak" is the
peak's time over the candidate's, "x NumPy" (c)'s time over the candidate's, each from medians
and from bests. The verdict uses medians: on a busy machine the best of a whole evaluation is
less likely to be undisturbed than the bests of its five short products, which biases the
best-based figure against the candidate; on a quiet machine the two agree.
"""

import argparse
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_info

from saekit import ufldl
from saekit.data.idx import load_digits
from saekit.errors import UserError
from saekit.kernels import classic
from saekit.kinds import build, config
from saekit.kinds.penalties import kl_term

M, N_IN, N_HID = 10_000, 784, 196
LAMBDA, RHO, BETA = 3e-3, 0.1, 3.0  # UFLDL's MNIST settings
GFLOP = 5 * 2 * M * N_IN * N_HID / 1e9  # five products of 2 m n_in n_hidden FLOP each
GOAL = 0.75  # fraction of the peak


def load_data() -> tuple[np.ndarray, str]:
    """(M, N_IN) float64 rows in [0, 1]: MNIST's test images if present, else random."""
    folder = os.environ.get("SAEKIT_DATA_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    try:
        images, _ = load_digits("mnist", "test", data_dir=folder, download=False)
        return images[:M].astype(np.float64), f"MNIST test images from {Path(folder).resolve()}"
    except UserError:
        return np.random.default_rng(0).random((M, N_IN)), "uniform random numbers in [0, 1]"


def plain_numpy(W1, W2, b1, b2, data, lambda_, rho, beta):
    """UFLDL's sparseAutoencoderCost as a student writes it in NumPy: data (visible, m), one example per column."""
    m = data.shape[1]
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    a2 = sigmoid(W1 @ data + b1[:, None])
    a3 = sigmoid(W2 @ a2 + b2[:, None])
    rho_hat = a2.mean(axis=1)
    kl = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
    cost = 0.5 / m * np.sum((a3 - data) ** 2) + lambda_ / 2 * (np.sum(W1**2) + np.sum(W2**2)) + beta * np.sum(kl)
    delta3 = (a3 - data) * a3 * (1 - a3)
    sparsity_delta = beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))
    delta2 = (W2.T @ delta3 + sparsity_delta[:, None]) * a2 * (1 - a2)
    W1grad = delta2 @ data.T / m + lambda_ * W1
    W2grad = delta3 @ a2.T / m + lambda_ * W2
    return cost, (W1grad, delta2.sum(axis=1) / m, W2grad, delta3.sum(axis=1) / m)


def max_relative_difference(grads, reference) -> float:
    """Largest ||g - g_ref|| / ||g_ref|| over the gradient arrays (W1, b1, W2, b2), in float64."""
    return max(
        float(np.linalg.norm(np.asarray(g, np.float64) - r) / np.linalg.norm(r)) for g, r in zip(grads, reference)
    )


def peak_products(dtype: torch.dtype) -> dict:
    """The five products of one evaluation, in NumPy and in PyTorch, each as C = A B and as C^T = B^T A^T.

    Both orientations count because a library is free to compute either (they differ in speed).
    Outputs are preallocated, as in a tuned implementation.
    """
    rand = lambda *shape: torch.rand(*shape, dtype=dtype)  # noqa: E731
    x, W1, W2_t = rand(M, N_IN), rand(N_HID, N_IN), rand(N_HID, N_IN)  # W2 = W2_t.T, stored like the model's
    a2, d2, d3 = rand(M, N_HID), rand(M, N_HID), rand(M, N_IN)
    products = {  # name: (A, B), C = A B
        "x W1^T    (m,784)(784,196)": (x, W1.t()),
        "a2 W2^T   (m,196)(196,784)": (a2, W2_t),
        "d3 W2     (m,784)(784,196)": (d3, W2_t.t()),
        "a2^T d3   (196,m)(m,784)": (a2.t(), d3),
        "d2^T x    (196,m)(m,784)": (d2.t(), x),
    }
    timed = {}
    for name, (a, b) in products.items():
        for orientation, (left, right) in (("C", (a, b)), ("C^T", (b.t(), a.t()))):
            out = torch.empty(left.shape[0], right.shape[1], dtype=dtype)
            timed[f"numpy {orientation} {name}"] = lambda a_=left, b_=right, o=out: np.matmul(
                a_.numpy(), b_.numpy(), out=o.numpy()
            )
            timed[f"torch {orientation} {name}"] = lambda a_=left, b_=right, o=out: torch.mm(a_, b_, out=o)
    return timed


def candidates(rows: np.ndarray, dtype: torch.dtype) -> dict:
    """The timed evaluations; each returns (cost, [grad W1, b1, W2, b2]) for the comparison."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    model = build(config("sigmoid", n_hidden=N_HID), N_IN, dtype=dtype, seed=0)
    W1, b1, W2, b2 = (p.detach().numpy() for p in (model.W1, model.b1, model.W2, model.b2))
    x = torch.from_numpy(rows.astype(np_dtype))  # (m, 784), examples in rows
    data_f = np.asfortranarray(rows.T.astype(np_dtype))  # (784, m) Fortran-ordered: data_f.T is x's layout
    data_c = np.ascontiguousarray(data_f)  # (784, m) C-ordered, as np.loadtxt or a .T.copy() gives
    W1_c, W2_c = np.ascontiguousarray(W1), np.ascontiguousarray(W2)
    theta = ufldl.pack_theta(W1, W2, b1, b2)
    state = {"workspace": None}

    def model_step():
        result, state["workspace"] = classic.cost_and_grad(
            model.W1, model.b1, model.W2, model.b2, x, LAMBDA, kl_term(RHO, BETA), workspace=state["workspace"]
        )
        return result.cost, [g.numpy() for g in result.grads]

    def ufldl_cost(data):
        cost, grad = ufldl.sparse_autoencoder_cost(theta, N_IN, N_HID, LAMBDA, RHO, BETA, data)
        W1g, W2g, b1g, b2g = ufldl.unpack_theta(grad, N_IN, N_HID)
        return cost, [W1g, b1g, W2g, b2g]

    timed = {
        "(a) ufldl, data Fortran-ordered": lambda: ufldl_cost(data_f),
        "(a) ufldl, data C-ordered": lambda: ufldl_cost(data_c),
        "(b) classic.cost_and_grad (model)": model_step,
        "(c) plain NumPy": lambda: plain_numpy(W1_c, W2_c, b1, b2, data_c, LAMBDA, RHO, BETA),
    }
    return timed


def _product_names(products: dict) -> list:
    """The five products' names, from peak_products' keys ("numpy C <name>")."""
    return [name.split(" ", 2)[2] for name in products if name.startswith("numpy C ")]


def run(rows: np.ndarray, dtype: torch.dtype, repeats: int) -> None:
    timed = candidates(rows, dtype)
    products = peak_products(dtype)
    jobs = {**timed, **products}
    outputs = {name: f() for name, f in timed.items()}  # warm-up (workspaces, page faults) and results
    for f in products.values():
        f()
    times = {name: [] for name in jobs}
    order = list(jobs)
    for _ in range(repeats):
        random.shuffle(order)
        for name in order:
            t = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - t)

    def summary(name):
        return float(np.median(times[name])), min(times[name])

    # The peak: each product's fastest way (library, orientation), by best and by median time.
    ways = [(lib, o) for lib in ("numpy", "torch") for o in ("C", "C^T")]
    peak_median = sum(min(summary(f"{lib} {o} {p}")[0] for lib, o in ways) for p in _product_names(products))
    peak_best = sum(min(summary(f"{lib} {o} {p}")[1] for lib, o in ways) for p in _product_names(products))
    base_median, base_best = summary("(c) plain NumPy")
    reference = [np.asarray(g, np.float64) for g in outputs["(c) plain NumPy"][1]]
    ref_cost = outputs["(c) plain NumPy"][0]

    print(f"\n{dtype}  ({GFLOP:.2f} GFLOP per evaluation)")
    print("  matrix products alone, ms (median / best), as C = A B and as C^T = B^T A^T:")
    for p in _product_names(products):
        cells = [
            f"{lib} {o:3s} {summary(f'{lib} {o} {p}')[0] * 1e3:6.1f} / {summary(f'{lib} {o} {p}')[1] * 1e3:6.1f}"
            for lib, o in ways
        ]
        print(f"    {p:28s} " + "   ".join(cells))
    print(f"  {'':36s}  median ms  best ms  GFLOP/s  % of peak    x NumPy   grad rel. diff  cost rel. diff")
    print(f"  {'':36s}  {'':9s}  {'':7s}  (median)  median/best  median/best")
    table = {"(d) peak: the five products alone": (peak_median, peak_best), **{name: summary(name) for name in timed}}
    for name, (med, best) in table.items():
        line = (
            f"  {name:36s}  {med * 1e3:9.1f}  {best * 1e3:7.1f}  {GFLOP / med:7.1f}"
            f"  {100 * peak_median / med:4.0f}/{100 * peak_best / best:3.0f}%"
            f"  {base_median / med:5.2f}/{base_best / best:4.2f}x"
        )
        if name in outputs and name != "(c) plain NumPy":
            cost, grads = outputs[name]
            line += f"  {max_relative_difference(grads, reference):14.1e}  {abs(cost - ref_cost) / abs(ref_cost):14.1e}"
        print(line)
    med, best = summary("(b) classic.cost_and_grad (model)")
    fraction = peak_median / med
    print(
        f"  verdict, {dtype}: cost_and_grad at {100 * fraction:.0f}% of peak and {base_median / med:.2f}x plain NumPy"
        f" by medians ({100 * peak_best / best:.0f}%, {base_best / best:.2f}x by bests); goal >= {100 * GOAL:.0f}% of"
        f" peak, here {GOAL * base_median / peak_median:.2f}x NumPy: {'MET' if fraction >= GOAL else 'NOT MET'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per candidate (default 7)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows, source = load_data()
    random.seed(0)
    blas = ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info())
    print(f"data: {source}; m={M}, {N_IN} inputs, {N_HID} hidden; {args.repeats} repeats")
    print(
        f"threads: torch {torch.get_num_threads()}; {blas}; load average {os.getloadavg()[0]:.1f} "
        "(other processes skew times)"
    )
    for dtype in (torch.float64, torch.float32):
        run(rows, dtype, args.repeats)


if __name__ == "__main__":
    main()
