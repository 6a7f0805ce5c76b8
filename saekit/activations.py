"""The sparsify step of the modern dictionaries: encoder pre-activations z2 (batch, n_hidden) -> codes.

- TopK keeps each example's k largest pre-activations (OpenAI's TopK autoencoders).
- BatchTopK keeps the k * batch largest over the whole batch, so examples share a budget of
  k on average; for inference it keeps a threshold (a running mean of the smallest kept value)
  and acts as a JumpReLU with that one threshold.
- JumpReLU zeroes pre-activations below a learned per-unit threshold theta, trained through a
  straight-through estimator with a rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024).

TopK and BatchTopK return `SparseCodes` (values and indices, k per row): decoding them costs
batch * k * n_inputs, not batch * n_hidden * n_inputs (see saekit.sparse_decode).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import blas, distributed


class SparseCodes(NamedTuple):
    values: torch.Tensor  # (batch, k) non-negative code values (zeros allowed: padding)
    indices: torch.Tensor  # (batch, k) int64 hidden-unit index of each value


class _SparseEncode(torch.autograd.Function):
    """Encode, select k codes per row, and back-propagate at a cost proportional to k.

    Forward: z2 = x W1^T + bias (the one dense product), then the selection (TopK or BatchTopK),
    and optionally the aux_k largest pre-activations of dead units for the AuxK loss. Backward:
    only the selected z2 entries have a gradient g, so

        dL/dW1[i] = sum over selected (b, j) with index i of g[b, j] * x[b]
        dL/dbias[i] = sum over selected (b, j) with index i of g[b, j]

    which is the weight gradient of an embedding bag (F.embedding_bag with per-sample weights g,
    fed x as its output gradient): batch * k * n_inputs work instead of batch * n_hidden * n_inputs.
    The input's gradient, when asked for, is that bag's forward: sum_j g[b, j] W1[indices[b, j]].
    """

    @staticmethod
    def forward(ctx, x, W1, bias, k, select, dead, aux_k):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the one dense product in low precision, the rest in x's dtype
            low = torch.get_autocast_dtype(device)
            z2 = torch.addmm(bias.to(low), x.to(low), W1.t().to(low)).to(x.dtype)
        else:
            z2 = blas.matmul(x, W1.t(), torch.empty(x.shape[0], W1.shape[0], dtype=x.dtype, device=x.device))
            z2.add_(bias)
        values, indices = select(z2) if select is not None else z2.topk(k, dim=1, sorted=False)
        values = values.relu()
        aux_values, aux_indices = values.new_empty(x.shape[0], 0), indices.new_empty(x.shape[0], 0)
        if dead is not None and aux_k > 0:
            n_dead = int(dead.sum())
            if n_dead > 0:
                aux_values, aux_indices = z2.masked_fill_(~dead, -torch.inf).topk(min(aux_k, n_dead), dim=1, sorted=False)
                aux_values = aux_values.relu()
        ctx.save_for_backward(x, W1, torch.cat([indices, aux_indices], 1), torch.cat([values, aux_values], 1) > 0)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _, grad_aux, __):
        x, W1, indices, active = ctx.saved_tensors
        g = torch.cat([grad_values, grad_aux], 1) * active
        grad_bias = torch.zeros(W1.shape[0], dtype=g.dtype, device=g.device).index_add_(0, indices.reshape(-1), g.reshape(-1))
        with torch.enable_grad():
            W = W1.detach().requires_grad_()
            bag = F.embedding_bag(indices, W, per_sample_weights=g, mode="sum")
            (grad_W1,) = torch.autograd.grad(bag, W, grad_outputs=x)
        # dL/dx[b] = sum_j g[b, j] W1[indices[b, j]]: the same bag, forward (needed only for attribution).
        grad_x = F.embedding_bag(indices, W1, per_sample_weights=g, mode="sum") if ctx.needs_input_grad[0] else None
        return grad_x, grad_W1, grad_bias, None, None, None, None


def sparse_encode(x, W1, bias, k: int, select=None, dead=None, aux_k: int = 0):
    """(SparseCodes of the selected codes, SparseCodes of the AuxK codes or None). See _SparseEncode."""
    values, indices, aux_values, aux_indices = _SparseEncode.apply(x, W1, bias, k, select, dead, aux_k)
    aux = SparseCodes(aux_values, aux_indices) if aux_values.shape[1] else None
    return SparseCodes(values, indices), aux


class BatchTopK(nn.Module):
    """Keep the k * batch largest pre-activations of the batch (in training); a threshold in inference.

    With several processes the batch is the global one: the threshold is found among every
    process's candidates, so 2 processes select exactly what 1 process would on their union.
    """

    def __init__(self, k: int, momentum: float = 0.99, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.k, self.momentum = k, momentum
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=dtype))  # -1: not estimated yet

    def _batch_threshold(self, candidates: torch.Tensor, n_keep: int) -> torch.Tensor:
        flat = distributed.all_gather_cat(candidates.reshape(-1))
        return flat.topk(min(n_keep, flat.numel()), sorted=False).values.min()

    def forward(self, z2: torch.Tensor):
        """Training: (values, indices) of the kept codes, zero-padded to the widest row.
        Inference: dense codes z2 * (z2 > threshold)."""
        if not self.training:
            keep = z2 > self.threshold.clamp_min(0)
            return z2 * keep
        batch, n_hidden = z2.shape
        n_keep = self.k * batch * distributed.world_size()
        # Each row's top `width` candidates hold every kept value unless a row is "full" (all its
        # candidates kept): then it may hold more, and we widen. Rarely needed beyond 4k.
        width = min(4 * self.k, n_hidden)
        while True:
            values, indices = z2.topk(width, dim=1, sorted=True)
            threshold = self._batch_threshold(values, n_keep)
            full = bool((values[:, -1] >= threshold).any()) and width < n_hidden
            if not distributed.any_true(full):
                break
            width = min(2 * width, n_hidden)
        keep = (values >= threshold) & (values > 0)
        used = distributed.max_int(max(1, int(keep.sum(1).max())))  # at least one (zero) code per row
        values, indices, keep = values[:, :used], indices[:, :used], keep[:, :used]
        with torch.no_grad():
            smallest = threshold.clamp_min(0).to(self.threshold.dtype)
            self.threshold.copy_(smallest if self.threshold < 0 else
                                 self.momentum * self.threshold + (1 - self.momentum) * smallest)
        return values * keep, indices


class _JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta); d/dz = H(z - theta); d/dtheta = -(theta / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * window * grad
        return grad * (z > theta), grad_theta.sum(0), None


class _StepFunction(torch.autograd.Function):
    """H(z - theta); d/dz = 0; d/dtheta = -(1 / eps) K((z - theta) / eps): the L0 count's estimator."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return None, (-(1 / eps) * window * grad).sum(0), None


class JumpReLU(nn.Module):
    """h = z2 * H(z2 - theta) with a learned threshold theta = exp(log_threshold) per hidden unit."""

    def __init__(self, n_hidden: int, initial_threshold: float = 0.001, bandwidth: float = 0.001, **kw):
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((n_hidden,), float(initial_threshold), **kw).log())

    def forward(self, z2: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(z2, self.log_threshold.exp(), self.bandwidth)

    def l0(self, z2: torch.Tensor) -> torch.Tensor:
        """Mean number of active units per example, differentiable in theta (straight-through)."""
        return _StepFunction.apply(z2, self.log_threshold.exp(), self.bandwidth).sum(1).mean()
