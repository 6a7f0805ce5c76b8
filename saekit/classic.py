"""The classic sparse autoencoder's cost and its analytic gradient, vectorized (UFLDL, seed 002).

    J = (1/2m) sum_i ||x_hat_i - y_i||^2 + (lambda/2)(||W1||^2 + ||W2||^2) + beta sum_j KL(rho || rho_hat_j)

with sigmoid hidden units a2 = sigmoid(x W1^T + b1), sigmoid outputs x_hat = sigmoid(a2 W2^T + b2),
rho_hat = mean over the m examples of a2, and y the target (y = x, or the clean input of a
denoising autoencoder). Back-propagation with UFLDL's modified delta2:

    delta3 = (x_hat - y) * x_hat * (1 - x_hat)                                  (m, n_inputs)
    delta2 = (delta3 W2 + beta * (-rho/rho_hat + (1-rho)/(1-rho_hat))) * a2 * (1 - a2)   (m, n_hidden)
    dJ/dW2 = delta3^T a2 / m + lambda W2,    dJ/db2 = sum_i delta3 / m
    dJ/dW1 = delta2^T x  / m + lambda W1,    dJ/db1 = sum_i delta2 / m

Why this is fast: one evaluation is five matrix products (2 m n_in n_hidden FLOP each), and
everything else is element-wise work on (m, n_inputs) arrays, which is memory-bound. So the
matrix products run in OpenBLAS through NumPy views of the tensors on the CPU (on this kind of
machine it is well ahead of PyTorch's MKL), the element-wise steps run in place in reused
buffers (a fresh 60 MB array costs page faults each time), and the sigmoid's derivative is
fused with the error (`sigmoid_backward`). On a GPU everything stays in torch.
"""

from typing import NamedTuple

import numpy as np
import torch

from .penalties import kl_derivative, kl_divergence, weight_decay


class ClassicCost(NamedTuple):
    cost: float  # J, the total
    reconstruction: float  # (1/2m) sum ||x_hat - y||^2
    weight_decay: float  # (lambda/2)(||W1||^2 + ||W2||^2)
    sparsity: float  # beta sum_j KL(rho || rho_hat_j)
    rho_hat: torch.Tensor  # (n_hidden,) mean activation of each hidden unit
    grads: tuple  # dJ/dW1 (n_hidden, n_in), dJ/db1, dJ/dW2 (n_in, n_hidden), dJ/db2


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b, in OpenBLAS on the CPU (zero-copy NumPy views), in torch elsewhere."""
    if out.device.type == "cpu":
        np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    else:
        torch.matmul(a, b, out=out)
    return out


class Workspace:
    """Buffers reused across evaluations for one problem shape, so no large array is allocated per call."""

    def __init__(self, m: int, n_inputs: int, n_hidden: int, dtype: torch.dtype, device: torch.device):
        kw = dict(dtype=dtype, device=device)
        self.key = (m, n_inputs, n_hidden, dtype, device)
        self.a2 = torch.empty(m, n_hidden, **kw)  # hidden activations
        self.delta2 = torch.empty(m, n_hidden, **kw)
        self.a3 = torch.empty(m, n_inputs, **kw)  # reconstruction x_hat
        self.delta3 = torch.empty(m, n_inputs, **kw)
        self.ones = torch.ones(m, **kw)
        self.grad_W1 = torch.empty(n_hidden, n_inputs, **kw)
        self.grad_W2_t = torch.empty(n_hidden, n_inputs, **kw)  # stored like the model's W2

    @classmethod
    def get(cls, ws: "Workspace | None", x: torch.Tensor, n_hidden: int) -> "Workspace":
        key = (x.shape[0], x.shape[1], n_hidden, x.dtype, x.device)
        return ws if ws is not None and ws.key == key else cls(*key)


@torch.no_grad()
def cost_and_grad(
    W1: torch.Tensor,
    b1: torch.Tensor,
    W2: torch.Tensor,
    b2: torch.Tensor,
    x: torch.Tensor,
    lambda_: float,
    rho: float,
    beta: float,
    target: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> tuple[ClassicCost, Workspace]:
    """J and its gradient for x (m, n_inputs) and the target y (defaults to x).

    Returns the cost terms with the gradients, and the workspace to pass to the next call.
    The gradients live in the workspace's buffers: copy them before the next call if you keep them.
    """
    y = x if target is None else target
    m = x.shape[0]
    ws = Workspace.get(workspace, x, W1.shape[0])
    a2, d2, a3, d3 = ws.a2, ws.delta2, ws.a3, ws.delta3

    # Forward pass over all m examples first: delta2 needs rho_hat, a mean over the whole set.
    _matmul(x, W1.t(), a2).add_(b1)
    torch.sigmoid(a2, out=a2)
    rho_hat = _matmul(ws.ones, a2, torch.empty_like(b1)).div_(m)
    _matmul(a2, W2.t(), a3).add_(b2)
    torch.sigmoid(a3, out=a3)

    # Output layer: error, its squared norm, then delta3 = error * x_hat * (1 - x_hat) in one pass.
    torch.sub(a3, y, out=d3)
    squared_error = float(torch.dot(d3.view(-1), d3.view(-1)))
    torch.ops.aten.sigmoid_backward.grad_input(d3, a3, grad_input=d3)

    # Hidden layer: delta3 W2 plus UFLDL's sparsity term, times a2 * (1 - a2).
    _matmul(d3, W2, d2).add_(kl_derivative(rho, rho_hat), alpha=beta)
    torch.ops.aten.sigmoid_backward.grad_input(d2, a2, grad_input=d2)

    grad_W2 = _matmul(a2.t(), d3, ws.grad_W2_t).div_(m).add_(W2.t(), alpha=lambda_).t()
    grad_b2 = _matmul(ws.ones, d3, torch.empty_like(b2)).div_(m)
    grad_W1 = _matmul(d2.t(), x, ws.grad_W1).div_(m).add_(W1, alpha=lambda_)
    grad_b1 = _matmul(ws.ones, d2, torch.empty_like(b1)).div_(m)

    reconstruction = 0.5 * squared_error / m
    decay = float(weight_decay(lambda_, W1, W2))
    sparsity = beta * float(kl_divergence(rho, rho_hat).sum())
    result = ClassicCost(
        reconstruction + decay + sparsity, reconstruction, decay, sparsity, rho_hat, (grad_W1, grad_b1, grad_W2, grad_b2)
    )
    return result, ws
