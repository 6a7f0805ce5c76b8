"""The classic sparse autoencoder's cost and its analytic gradient, vectorized (UFLDL, seed 002).

    J = (1/2m) sum_i ||x_hat_i - y_i||^2 + (lambda/2)(||W1||^2 + ||W2||^2) + beta sum_j KL(rho || rho_hat_j)

with sigmoid hidden units a2 = sigmoid(x W1^T + b1), sigmoid outputs x_hat = sigmoid(a2 W2^T + b2),
rho_hat = mean over the m examples of a2, and y the target (y = x, or the clean input of a
denoising autoencoder). The sparsity term is passed in as a function of rho_hat (its value and
its slope per unit), so the same code serves KL, L1 on the codes, or none. Back-propagation
with UFLDL's modified delta2:

    delta3 = (x_hat - y) * x_hat * (1 - x_hat)                                  (m, n_inputs)
    delta2 = (delta3 W2 + beta * (-rho/rho_hat + (1-rho)/(1-rho_hat))) * a2 * (1 - a2)   (m, n_hidden)
    dJ/dW2 = delta3^T a2 / m + lambda W2,    dJ/db2 = sum_i delta3 / m
    dJ/dW1 = delta2^T x  / m + lambda W1,    dJ/db1 = sum_i delta2 / m

Why this is fast: one evaluation is five matrix products (2 m n_in n_hidden FLOP each), and
everything else is element-wise work on (m, n_inputs) arrays, which is memory-bound. So
- the matrix products run in OpenBLAS through NumPy views of the tensors on the CPU
  (`saekit.blas`: on this kind of machine it is well ahead of PyTorch's MKL);
- the two weight-gradient products, whose inner dimension is m, are computed as
  (n_inputs, n_hidden) results: OpenBLAS ran the (n_hidden, n_inputs) orientation up to 2x
  slower on a busy 2-core machine; copying the small result into the parameters' layout is free;
- b2 rides inside a product: a2 carries a column of ones and W2^T a row b2, so
  [a2 1] [W2^T; b2] = a2 W2^T + b2 with no pass over the (m, n_inputs) result, and
  delta3^T [a2 1] gives delta3^T a2 and m dJ/db2 in one product;
- the output layer's element-wise steps (sigmoid, error, squared error, delta3) run block by
  block of rows that stay in cache, in place in the product's buffer: one read of z3 and y and
  one write of delta3 instead of nine passes through memory (20-30% faster, measured);
- on the CPU, torch's element-wise work runs on one thread: after each product OpenBLAS's
  worker threads keep spinning for a while, and a second torch thread has to fight them (and
  any other process) for the cores: on a busy 2-core machine two threads made a whole
  evaluation 1.2-3x slower;
- all buffers are reused (a fresh 60 MB array costs page faults each time).
On a GPU everything stays in torch.
"""

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from .blas import matmul

BLOCK_BYTES = 1 << 20  # output-layer rows per element-wise block: about 1 MB per array, inside the 2 MB L2


class ClassicCost(NamedTuple):
    cost: float  # J, the total
    reconstruction: float  # (1/2m) sum ||x_hat - y||^2
    weight_decay: float  # (lambda/2)(||W1||^2 + ||W2||^2)
    sparsity: float  # beta sum_j KL(rho || rho_hat_j)
    rho_hat: torch.Tensor  # (n_hidden,) mean activation of each hidden unit
    grads: tuple  # dJ/dW1 (n_hidden, n_in), dJ/db1, dJ/dW2 (n_in, n_hidden), dJ/db2


@contextmanager
def _one_torch_thread(device: torch.device):
    """While inside, torch runs its CPU work on one thread (see the module docstring for why)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Workspace:
    """Buffers reused across evaluations for one problem shape, so no large array is allocated per call."""

    def __init__(self, m: int, n_inputs: int, n_hidden: int, dtype: torch.dtype, device: torch.device):
        kw: dict[str, Any] = dict(dtype=dtype, device=device)
        self.key = (m, n_inputs, n_hidden, dtype, device)
        self.a2_1 = torch.empty(m, n_hidden + 1, **kw)  # [a2 1]: hidden activations and a column of ones
        self.a2_1[:, n_hidden] = 1
        self.a2 = self.a2_1[:, :n_hidden]  # (m, n_hidden) hidden activations, a view
        self.W2_b2 = torch.empty(n_hidden + 1, n_inputs, **kw)  # [W2^T; b2]
        self.delta3 = torch.empty(m, n_inputs, **kw)  # z3 = a2 W2^T + b2 first, overwritten by delta3
        self.delta2 = torch.empty(m, n_hidden, **kw)
        self.block_rows = max(1, BLOCK_BYTES // (n_inputs * self.delta3.element_size()))
        self.error = torch.empty(min(m, self.block_rows), n_inputs, **kw)  # x_hat - y of one block
        self.d3T_a2_1 = torch.empty(n_inputs, n_hidden + 1, **kw)  # delta3^T [a2 1] = [delta3^T a2, sum_i delta3]
        self.xT_d2 = torch.empty(n_inputs, n_hidden, **kw)  # x^T delta2
        self.grad_W1 = torch.empty(n_hidden, n_inputs, **kw)
        self.grad_W2_t = torch.empty(n_hidden, n_inputs, **kw)  # stored like the model's W2
        self.grad_b2 = torch.empty(n_inputs, **kw)

    @classmethod
    def get(cls, ws: "Workspace | None", x: torch.Tensor, n_hidden: int) -> "Workspace":
        key = (x.shape[0], x.shape[1], n_hidden, x.dtype, x.device)
        return ws if ws is not None and ws.key == key else cls(*key)


def _output_deltas(delta3: torch.Tensor, y: torch.Tensor, ws: Workspace) -> float:
    """Turn z3 (m, n_inputs) into delta3 in place, block by block of rows; returns sum ||x_hat - y||^2."""
    squared_error = 0.0
    for start in range(0, delta3.shape[0], ws.block_rows):
        rows = slice(start, start + ws.block_rows)
        x_hat = torch.sigmoid(delta3[rows], out=delta3[rows])
        error = torch.sub(x_hat, y[rows], out=ws.error[: x_hat.shape[0]])
        squared_error += float(torch.dot(error.view(-1), error.view(-1)))
        # delta3 = error * x_hat * (1 - x_hat), written over x_hat
        torch.ops.aten.sigmoid_backward.grad_input(error, x_hat, grad_input=x_hat)
    return squared_error


@torch.no_grad()
def cost_and_grad(
    W1: torch.Tensor,
    b1: torch.Tensor,
    W2: torch.Tensor,
    b2: torch.Tensor,
    x: torch.Tensor,
    lambda_: float,
    sparsity: Callable[[torch.Tensor], tuple[torch.Tensor, float]],
    target: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> tuple[ClassicCost, Workspace]:
    """J and its gradient for x (m, n_inputs) and the target y (defaults to x).

    Returns the cost terms with the gradients, and the workspace to pass to the next call.
    The gradients live in the workspace's buffers: copy them before the next call if you keep them.

    `sparsity(rho_hat) -> (delta (n_hidden,), value)` is the penalty on the codes: delta is added
    to delta3 W2 before the sigmoid's derivative (UFLDL's modified delta2 has beta * KL'(rho_hat)
    there: `saekit.kinds.penalties.kl_term`), and value is reported as the sparsity term.
    Minibatch training passes the KL slope at a running estimate of rho_hat, or beta for an L1
    penalty on sigmoid codes (|a2| = a2).
    """
    y = x if target is None else target
    m, n_hidden = x.shape[0], W1.shape[0]
    ws = Workspace.get(workspace, x, n_hidden)
    a2, d2, d3 = ws.a2, ws.delta2, ws.delta3

    with _one_torch_thread(x.device):
        # Forward pass over all m examples first: delta2 needs rho_hat, a mean over the whole set.
        matmul(x, W1.t(), a2).add_(b1)
        torch.sigmoid(a2, out=a2)
        rho_hat = a2.mean(0)  # a torch sum: OpenBLAS's threaded gemv was slower on a busy machine
        ws.W2_b2[:n_hidden].copy_(W2.t())
        ws.W2_b2[n_hidden].copy_(b2)
        matmul(ws.a2_1, ws.W2_b2, d3)  # z3 = a2 W2^T + b2

        squared_error = _output_deltas(d3, y, ws)

        # Hidden layer: delta3 W2 plus UFLDL's sparsity term, times a2 * (1 - a2).
        delta, sparsity_value = sparsity(rho_hat)
        matmul(d3, W2, d2).add_(delta)
        torch.ops.aten.sigmoid_backward.grad_input(d2, a2, grad_input=d2)

        # Weight gradients as (n_inputs, .) products, then written in the parameters' own layout.
        matmul(d3.t(), ws.a2_1, ws.d3T_a2_1)
        grad_W2 = torch.mul(W2, lambda_, out=ws.grad_W2_t.t()).add_(ws.d3T_a2_1[:, :n_hidden], alpha=1 / m)
        grad_b2 = torch.div(ws.d3T_a2_1[:, n_hidden], m, out=ws.grad_b2)
        matmul(x.t(), d2, ws.xT_d2)
        grad_W1 = torch.mul(W1, lambda_, out=ws.grad_W1).add_(ws.xT_d2.t(), alpha=1 / m)
        grad_b1 = d2.mean(0)  # sum_i delta2 / m

    reconstruction = 0.5 * squared_error / m
    # (lambda/2)(||W1||^2 + ||W2||^2) as dot products of the flat weights: no temporary arrays.
    decay = (
        0.5 * lambda_ * sum(float(torch.dot(w.reshape(-1), w.reshape(-1))) for w in (W1, W2.t())) if lambda_ else 0.0
    )
    result = ClassicCost(
        reconstruction + decay + sparsity_value,
        reconstruction,
        decay,
        sparsity_value,
        rho_hat,
        (grad_W1, grad_b1, grad_W2, grad_b2),
    )
    return result, ws
